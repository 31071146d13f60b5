"""burla_jupyter.charts alone: the bounded data behind the job's pictures (buckets that merge pairwise, a task
stream that coarsens its older bars) and the SVG they draw: valid, and small however big the job."""

import random
import xml.etree.ElementTree as ET

import pytest

from burla_jupyter import charts

SVG = "{http://www.w3.org/2000/svg}"


def parse(text):
    root = ET.fromstring(text)  # well-formed XML, or this raises
    assert root.tag == f"{SVG}svg"
    return root


def paths(root):
    return [p.get("d") for p in root.iter(f"{SVG}path")]


def test_buckets_merge_pairwise_and_keep_the_totals():
    b = charts.Buckets(width=0.5, size=10)
    for t in range(5):  # one a second for 5 s: fits in 10 buckets of 0.5 s
        b.add("ok", t + 0.1)
    assert b.width == 0.5 and b.rows["ok"][:10:2] == [1.0] * 5
    b.add("ok", 12.0)  # past 5 s: pairs merge (1 s, then 2 s) until 12 s fits
    assert b.width == 2.0 and len(b.rows["ok"]) == 10
    assert b.rows["ok"][:3] == [2.0, 2.0, 1.0] and b.rows["ok"][6] == 1.0 and sum(b.rows["ok"]) == 6
    b.add_span("busy", 1.0, 7.0, rate=2)  # 6 slot-seconds at 2 slots: spread over the buckets it overlaps
    assert b.rows["busy"][:5] == pytest.approx([2.0, 4.0, 4.0, 2.0, 0.0]) and sum(b.rows["busy"]) == 12
    assert b.used(12.5) == 7 and b.spans(12.5)[-1] == 0.5


def test_timeline_keeps_a_bounded_number_of_bars():
    tl = charts.Timeline(limit=1000)
    slots = [f"w{k}/{i}" for k in range(8) for i in range(4)]
    rng = random.Random(1)
    t = 0.0
    for k in range(100_000):  # 100,000 calls, one bar each
        t += 0.001
        tl.add(slots[k % 32], t - 0.03, t, "failed" if rng.random() < 0.01 else "ok")
    assert len(tl.bars) <= 1000
    assert sum(b[4] for b in tl.bars) + tl.dropped == 100_000  # every call is still counted
    assert tl.dropped == 0  # merged, not dropped
    assert any(b[3] == "failed" for b in tl.bars)  # a merge keeps failures visible
    assert min(b[1] for b in tl.bars) < 0.01  # the start of the job is still drawn
    assert tl.bars[-1][4] == 1  # the newest bars are single calls: recent history stays sharp
    assert len(tl.rows) == 32


def test_merging_keeps_failures_apart_where_it_can():
    bars = [[0, 0, 1, "ok", 1], [0, 1, 2, "ok", 1], [0, 2, 3, "failed", 1], [1, 0, 2, "ok", 1], [0, 3, 4, "ok", 1],
            [0, 4, 5, "failed", 1], [0, 5, 6, "ok", 1]]
    # neighbours of the same state
    assert charts.merge_pairs(bars) == [[0, 0, 2, "ok", 2], [0, 2, 3, "failed", 1], [1, 0, 2, "ok", 1],
                                        [0, 3, 4, "ok", 1], [0, 4, 5, "failed", 1], [0, 5, 6, "ok", 1]]
    # ok bars across the failed ones, which stay (drawn over them)
    assert charts.merge_pairs(bars, "ok") == [[0, 0, 2, "ok", 2], [0, 2, 3, "failed", 1], [1, 0, 2, "ok", 1],
                                              [0, 3, 6, "ok", 2], [0, 4, 5, "failed", 1]]
    # failed ones with each other too
    assert charts.merge_pairs(bars, "all") == [[0, 0, 2, "ok", 2], [0, 2, 5, "failures", 2], [1, 0, 2, "ok", 1],
                                               [0, 3, 6, "ok", 2]]
    assert bars[0] == [0, 0, 1, "ok", 1]  # (the input is left as it was)


def test_a_job_whose_every_result_has_a_failure_keeps_its_ok_bars():
    tl = charts.Timeline(limit=200)
    for k in range(10_000):  # states alternate on each slot: neighbours never share one
        tl.add(f"w/{k % 4}", k, k + 1, "failed" if k % 8 < 4 else "ok")
    assert len(tl.bars) <= 200 and tl.dropped == 0
    ok = sum(b[4] for b in tl.bars if b[3] == "ok")
    assert ok == 5000 and min(b[1] for b in tl.bars if b[3] == "ok") < 10


def test_a_slot_each_for_thousands_of_slots_drops_the_oldest():
    tl = charts.Timeline(limit=100)
    for k in range(1000):  # one bar per slot: nothing to merge
        tl.add(f"w{k}/0", k, k + 1)
    assert len(tl.bars) <= 100 and tl.dropped + len(tl.bars) == 1000 and tl.bars[-1][1] == 999


def big_job():
    """100,000 calls in 5,000 results over 64 slots during an hour, 1% of them failing."""
    counts, busy, tl = charts.Buckets(), charts.Buckets(), charts.Timeline()
    rng = random.Random(2)
    slots = [f"worker-{k}/{i}" for k in range(16) for i in range(4)]
    t = 0.0
    for r in range(5000):
        t += 0.72
        slot, took = slots[r % 64], rng.uniform(20, 46)
        failed = 1 if rng.random() < 0.2 else 0
        counts.add("ok", t, 20 - failed)
        counts.add("failed", t, failed)
        busy.add_span(slot.split("/")[0] if r % 64 < 28 else "others", t - took, t)
        tl.add(slot, t - took, t, "failed" if failed else "ok", 20)
    return counts, busy, tl, t, slots


def test_the_charts_of_a_big_job_are_valid_and_small():
    counts, busy, tl, now, slots = big_job()
    assert counts.width >= now / counts.size and len(counts.rows["ok"]) == counts.size
    names = [f"worker-{k}" for k in range(7)] + ["others"]
    running = [(s, now - 5) for s in slots[:40]]
    drawn = {"progress": charts.progress_svg(counts, now, total=100_000), "rate": charts.rate_svg(counts, now),
             "busy": charts.busy_svg(busy, now, names), "timeline": charts.timeline_svg(tl, now, running)}
    for name, text in drawn.items():
        root = parse(text)
        assert len(text) < 30_000, (name, len(text))
        assert root.find(f"{SVG}title") is not None
        for d in paths(root):
            assert d and "nan" not in d and "inf" not in d, (name, d)
    assert "100,000 / 100,000" in drawn["progress"]
    assert "100,000 calls on 64 slots" in drawn["timeline"]
    timeline = parse(drawn["timeline"])
    fills = {p.get("fill") for p in timeline.iter(f"{SVG}path")}
    assert {charts.OK, charts.FAILED, charts.RUNNING} <= fills
    labels = [t.text for t in timeline.iter(f"{SVG}text")]
    assert "worker-0" in labels and "0" in labels and "20 min" in labels and "60 min" in labels
    busy_labels = [t.text for t in parse(drawn["busy"]).iter(f"{SVG}text")]
    assert "others" in busy_labels and "worker-0" in busy_labels


def test_charts_of_a_job_that_has_just_begun():
    counts, busy, tl = charts.Buckets(), charts.Buckets(), charts.Timeline()
    for text in (charts.progress_svg(counts, 0.001, total=None), charts.progress_svg(counts, 0.001, total=0),
                 charts.rate_svg(counts, 0.001), charts.busy_svg(busy, 0.001, []),
                 charts.timeline_svg(tl, 0.001), charts.timeline_svg(tl, 0.5, [("a/0", 0.1)])):
        parse(text)
    counts.add("ok", 0.2, 3)
    tl.add("w1/0", 0.05, 0.2, "ok", 3)
    assert "3 / 10" in charts.progress_svg(counts, 0.25, total=10)
    assert "3 calls on 1 slot<" in charts.timeline_svg(tl, 0.25)


def test_names_are_escaped():
    busy = charts.Buckets()
    busy.add_span("<w&1>", 0, 1)
    tl = charts.Timeline()
    tl.add("<w&1>/0", 0, 1)
    for text in (charts.busy_svg(busy, 1, ["<w&1>"]), charts.timeline_svg(tl, 1)):
        assert "&lt;w&amp;1&gt;" in text and "<w&" not in text
        parse(text)


def test_time_labels():
    assert charts.seconds(0.25) == "0.25 s" and charts.seconds(90) == "90 s" and charts.seconds(600) == "10 min"
    assert charts.seconds(7200) == "2 h" and charts.seconds(60, span=600) == "1 min"
    assert charts.short(950) == "950" and charts.short(1200) == "1.2k" and charts.short(3.4e6) == "3.4M"
    assert charts.nice_step(10) == 2 and charts.nice_step(3600) == 1200 and charts.nice_step(36_000) == 7200
