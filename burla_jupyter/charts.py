"""The job's charts as small SVG strings: pure functions of plain data (no widgets), so the live widget and the
static summary a finished job leaves in the notebook draw the same pictures, and tests can check them alone.

What they draw from is bounded whatever the job's size: Buckets holds counts over time in a fixed number of
buckets that merge pairwise as the job runs on, and Timeline keeps at most `limit` bars, merging older neighbours
(then dropping the oldest) past it. Paths are written with rounded coordinates and one <path> per colour, so each
picture stays a few tens of KB at most.
"""

import html
import math
import re

OK, FAILED, RUNNING = "#3182bd", "#d62728", "#9ecae1"
PALETTE = ("#1f77b4", "#ff7f0e", "#2ca02c", "#9467bd", "#8c564b", "#e377c2", "#17becf", "#bcbd22")
OTHERS = "#999999"
LEFT, BOTTOM, TOP = 44, 16, 14  # margins: y labels, time axis, legend
RATE_BARS = 60  # at most, in the calls-per-second chart


class Buckets:
    """Amounts over time since the job's start, in `size` buckets of `width` seconds per named row. When time runs
    past the last bucket, neighbouring buckets merge pairwise and the width doubles: memory and drawing stay the
    same for a 10-second job and a 10-hour one."""

    def __init__(self, width=0.01, size=200):
        self.width, self.size = width, size - size % 2
        self.rows = {}  # name -> list of `size` floats

    def copy(self):
        other = Buckets(self.width, self.size)
        other.rows = {k: list(v) for k, v in self.rows.items()}
        return other

    def row(self, name):
        if name not in self.rows:
            self.rows[name] = [0.0] * self.size
        return self.rows[name]

    def fit(self, t):
        while t >= self.width * self.size:
            for r in self.rows.values():
                r[:] = [r[i] + r[i + 1] for i in range(0, self.size, 2)] + [0.0] * (self.size // 2)
            self.width *= 2

    def index(self, t):
        return min(int(t / self.width), self.size - 1)

    def add(self, name, t, amount=1.0):
        t = max(t, 0.0)
        self.fit(t)
        self.row(name)[self.index(t)] += amount

    def add_span(self, name, start, end, rate=1.0):
        """rate x the time of [start, end] spread over the buckets it overlaps (a slot busy then: slot-seconds)."""
        start = max(start, 0.0)
        if end <= start:
            return
        self.fit(end)
        r, w = self.row(name), self.width
        for i in range(self.index(start), self.index(end) + 1):
            overlap = min(end, (i + 1) * w) - max(start, i * w)
            if overlap > 0:
                r[i] += rate * overlap

    def used(self, now):
        """How many buckets [0, now] covers."""
        return min(max(math.ceil(now / self.width), 1), self.size)

    def spans(self, now):
        """The seconds each used bucket covers: the last one only up to now (at least a quarter, so a bucket
        just begun does not read as a burst)."""
        w = self.width
        return [max(min(w, now - i * w), w / 4) for i in range(self.used(now))]


class Timeline:
    """Bars of calls on slots, [row, start, end, state, calls] in the order they ended; state "ok" or "failed" (or
    "failures", see merge_pairs).
    Past `limit` bars, the older half is coarsened: on each slot, neighbouring bars of the same state merge
    pairwise (so old history gets coarser, recent stays sharp); if that frees too little, ok bars merge across the
    failed ones, then failed ones with each other; if that is still too little, the oldest are dropped."""

    def __init__(self, limit=1200):
        self.limit = limit
        self.bars = []
        self.rows = {}  # slot name -> row number (in order of appearance)
        self.dropped = 0  # calls whose bars were dropped

    def row(self, slot):
        return self.rows.setdefault(slot, len(self.rows))

    def add(self, slot, start, end, state="ok", calls=1):
        self.bars.append([self.row(slot), start, max(end, start), state, calls])
        if len(self.bars) > self.limit:
            self.compact()

    def compact(self):
        bars = self.bars
        for mode in ("adjacent", "ok", "all"):
            half = len(bars) // 2
            bars = merge_pairs(bars[:half], mode) + bars[half:]
            if len(bars) <= self.limit * 7 // 8:
                break
        else:  # (a bar per slot, thousands of slots) the oldest go
            cut = len(bars) - self.limit * 3 // 4
            self.dropped += sum(b[4] for b in bars[:cut])
            bars = bars[cut:]
        self.bars = bars


def touch(a, b):
    """Bars next to each other in time: a gap of at most a tenth of the two's span."""
    return max(a[1], b[1]) - min(a[2], b[2]) <= 0.1 * (max(a[2], b[2]) - min(a[1], b[1]))


def merge_pairs(bars, mode="adjacent"):
    """Each slot's bars, in order, merged two by two. mode "adjacent": neighbours of the same state (failed ones
    only where they touch, so red never spans time without failures); "ok": ok bars
    across the failed ones between them, which stay as they are (drawn over the ok ones, they still show where
    calls failed); "all": ok with ok, and failed with failed, neighbours or not: such a merge is "failures", a
    stretch where some calls failed, drawn as a thin red line rather than a red bar."""
    merged, open_ = [], {}  # open_: key -> index in merged of its last bar not yet merged in this pass
    for bar in bars:
        if mode == "ok" and bar[3] != "ok":
            merged.append(list(bar))
            continue
        key = bar[0] if mode == "adjacent" else (bar[0], bar[3] == "ok")
        j = open_.pop(key, None)
        if j is not None and (mode == "all" or merged[j][3] == bar[3] and (bar[3] == "ok" or touch(merged[j], bar))):
            m = merged[j]
            m[1], m[2], m[4] = min(m[1], bar[1]), max(m[2], bar[2]), m[4] + bar[4]
            if mode == "all" and m[3] != "ok":  # failed calls with ok ones between them: drawn thin
                m[3] = "failures"
        else:
            open_[key] = len(merged)
            merged.append(list(bar))
    return merged


# ---------------------------------------------------------------------------------------------- drawing helpers
def n(v):
    """A coordinate, rounded to a tenth of a pixel, short."""
    s = f"{v:.1f}"
    return s[:-2] if s.endswith(".0") else s


def short(v):
    """A count for an axis label: 950, 1.2k, 3.4M."""
    for limit, suffix in ((1e6, "M"), (1e3, "k")):
        if abs(v) >= limit:
            return f"{v / limit:.3g}{suffix}"
    return f"{v:.3g}" if v != int(v) else f"{int(v)}"


def unit(span):
    """The time unit an axis of that many seconds is labelled in: (seconds in it, its name)."""
    return (3600, "h") if span >= 7200 else (60, "min") if span >= 120 else (1, "s")


def seconds(t, span=None):
    size, name = unit(t if span is None else span)
    return f"{t / size:.3g} {name}"


def nice_step(span, ticks=5):
    """A tick step of 1, 2 or 5 times a power of ten, in the axis's unit, giving about `ticks` ticks."""
    size, _ = unit(span)
    raw = max(span / size, 1e-9) / ticks
    p = 10 ** math.floor(math.log10(raw))
    return next(m * p for m in (1, 2, 5, 10) if m * p >= raw) * size


def svg(width, height, title, body):
    return (f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
            f'viewBox="0 0 {width} {height}" style="max-width:100%;height:auto" font-family="sans-serif" '
            f'font-size="10" fill="currentColor"><title>{html.escape(title)}</title>{body}</svg>')


def rects(boxes):
    """One path's data for many rectangles (x, y, w, h): far smaller than a <rect> each."""
    return "".join(["M%.1f %.1fh%.1fv%.1fh%.1fz" % (x, y, w, h, -w) for x, y, w, h in boxes])


def polyline(points):
    """Path data through the points, from a move to the first."""
    return "M" + "L".join(["%.1f %.1f" % p for p in points])


def frame(width, height, now, ymax, ylabel, left=LEFT):
    """Axes: a baseline, the y maximum, and time ticks along the bottom. Returns (svg text, x(t), y(v))."""
    x0, x1, y0, y1 = left, width - 6, height - BOTTOM, TOP
    span = max(now, 1e-9)

    def x(t):
        return x0 + (x1 - x0) * min(max(t, 0.0), span) / span

    def y(v):
        return y0 - (y0 - y1) * v / ymax if ymax > 0 else y0

    parts = [f'<path d="M{x0} {y1}H{x1}M{x0} {y0}H{x1}" stroke="currentColor" stroke-opacity=".2" fill="none"/>']
    if ylabel:
        parts.append(f'<text x="{x0 - 4}" y="{y1 + 4}" text-anchor="end">{html.escape(ylabel)}</text>'
                     f'<text x="{x0 - 4}" y="{y0}" text-anchor="end">0</text>')
    step = nice_step(span)
    k = 0
    while k * step <= span * 1.0001:
        t = k * step
        anchor = "start" if k == 0 else "end" if x(t) > x1 - 16 else "middle"
        parts.append(f'<text x="{n(x(t))}" y="{height - 4}" text-anchor="{anchor}" fill-opacity=".7">'
                     f'{seconds(t, span) if k else "0"}</text>')
        k += 1
    return "".join(parts), x, y


def legend(width, items):
    """Coloured squares and names along the top right."""
    parts, at = [], width - 6
    for color, label in reversed(items):
        at -= 6 * len(label) + 4
        parts.append(f'<text x="{n(at)}" y="10">{html.escape(label)}</text>')
        at -= 12
        parts.append(f'<rect x="{n(at)}" y="2" width="9" height="9" fill="{color}"/>')
        at -= 8
    return "".join(parts)


# ---------------------------------------------------------------------------------------------- the charts
def progress_svg(counts, now, total=None, width=390, height=130):
    """Calls done over time (rows "ok" and "failed" of a Buckets), against the total when it is known."""
    used = counts.used(now)
    ok, failed = counts.rows.get("ok") or [0.0] * used, counts.rows.get("failed") or [0.0] * used
    done, points = 0.0, [(0.0, 0.0)]
    for i in range(used):
        done += ok[i] + failed[i]
        points.append((min((i + 1) * counts.width, now), done))
    ymax = max(total or 0, done, 1)
    axes, x, y = frame(width, height, now, ymax, short(ymax))
    xy = [(x(t), y(v)) for t, v in points]
    line = polyline(xy)
    area = f"{line}L{n(xy[-1][0])} {n(y(0))}L{n(xy[0][0])} {n(y(0))}z"
    body = [axes, f'<path d="{area}" fill="{OK}" fill-opacity=".15"/>',
            f'<path d="{line}" stroke="{OK}" stroke-width="1.5" fill="none"/>',
            f'<text x="{LEFT}" y="10" font-weight="bold">calls done</text>',
            f'<text x="{width - 6}" y="10" text-anchor="end">{int(done):,}'
            f'{f" / {total:,}" if total is not None else ""}</text>']
    if total:
        body.append(f'<path d="M{LEFT} {n(y(total))}H{width - 6}" stroke="currentColor" stroke-opacity=".5" '
                    'stroke-dasharray="4 3"/>')
    return svg(width, height, "calls done over time", "".join(body))


def rate_svg(counts, now, width=390, height=130):
    """Calls per second in each bucket: the ones that succeeded, and the failed stacked on them in red."""
    used, w, spans = counts.used(now), counts.width, counts.spans(now)
    ok, failed = counts.rows.get("ok") or [0.0] * used, counts.rows.get("failed") or [0.0] * used
    k = math.ceil(used / RATE_BARS)  # buckets per bar: results come in batches, so narrow bars would be spikes
    rates, w = [], w * k
    for i in range(0, used, k):
        span = sum(spans[i:i + k])
        rates.append((sum(ok[i:i + k]) / span, sum(failed[i:i + k]) / span))
    peak = max([a + b for a, b in rates] + [1e-9])
    axes, x, y = frame(width, height, now, peak, f"{short(peak)}/s")
    good, bad = [], []
    for i, (a, b) in enumerate(rates):
        left, right = x(i * w), x(min((i + 1) * w, now))
        bw = max(right - left - (0.5 if right - left > 2 else 0), 0.3)
        if a:
            good.append((left, y(a), bw, y(0) - y(a)))
        if b:
            bad.append((left, y(a + b), bw, y(a) - y(a + b)))
    body = [axes, f'<path d="{rects(good)}" fill="{OK}"/>' if good else "",
            f'<path d="{rects(bad)}" fill="{FAILED}"/>' if bad else "",
            f'<text x="{LEFT}" y="10" font-weight="bold">calls per second</text>',
            f'<text x="{width - 6}" y="10" text-anchor="end">peak {short(peak)}/s</text>']
    return svg(width, height, "calls per second", "".join(body))


def busy_svg(busy, now, names, width=800, height=130):
    """Busy slots over time, stacked per worker: busy holds slot-seconds per bucket, one row per name in names
    (the widget keeps a few workers apart and the rest as one row)."""
    used, w, spans = busy.used(now), busy.width, busy.spans(now)
    layers, below = [], [0.0] * used
    for name in names:
        r = busy.rows.get(name) or [0.0] * used
        below = [below[i] + r[i] / spans[i] for i in range(used)]
        layers.append(below)
    peak = max([v for v in (layers[-1] if layers else [])] + [1e-9])
    axes, x, y = frame(width, height, now, peak, short(float(f"{peak:.2g}")))
    centres = [x(min((i + 0.5) * w, now)) for i in range(used)]
    body = [axes]
    for k in range(len(layers) - 1, -1, -1):  # the top layer first: each lower one is painted over it
        color = PALETTE[k] if k < len(PALETTE) and names[k] != "others" else OTHERS
        edge = [(LEFT, y(0)), (LEFT, y(layers[k][0]))] + [(cx, y(v)) for cx, v in zip(centres, layers[k])]
        edge += [(x(now), y(layers[k][-1])), (x(now), y(0))]
        body.append(f'<path d="{polyline(edge)}z" fill="{color}" fill-opacity=".85"/>')
    body.append(f'<text x="{LEFT}" y="10" font-weight="bold">busy slots</text>')
    items = [(PALETTE[k] if k < len(PALETTE) and nm != "others" else OTHERS, nm[:14])
             for k, nm in enumerate(names)][:9]
    body.append(legend(width, items))
    return svg(width, height, "busy slots per worker over time", "".join(body))


def natural(name):
    return [int(p) if p.isdigit() else p for p in re.split(r"(\d+)", str(name))]


def timeline_svg(timeline, now, running=(), width=800, height=170):
    """The task stream: a row per slot, a bar per call (or per batch, or per merged run of them) from its start to
    its end, coloured by state; running: (slot, since) of the slots busy now."""
    slots = sorted(set(timeline.rows) | {s for s, _ in running}, key=natural)
    order = {s: k for k, s in enumerate(slots)}
    by_row = {timeline.rows[s]: order[s] for s in timeline.rows}
    nrows = max(len(slots), 1)
    top, bottom = TOP + 2, height - BOTTOM - 2
    rh = (bottom - top) / nrows
    gap = 1 if rh >= 4 else 0
    labels, last = [], -99.0  # each slot's name, or when rows are thin, each worker's at its first slot, if room
    for k, s in enumerate(slots):
        worker = str(s).rpartition("/")[0]
        y = top + (k + 0.5) * rh + 3
        if y - last >= 10 and (rh >= 10 or k == 0 or str(slots[k - 1]).rpartition("/")[0] != worker):
            labels.append((y, (str(s) if rh >= 10 else worker or str(s))[-14:]))
            last = y
    left = min(max([LEFT] + [6 * len(label) + 8 for _, label in labels]), 96)
    axes, _, _ = frame(width, height, now, 0, "", left)

    scale = (width - 6 - left) / max(now, 1e-9)
    bars = sorted(((by_row[b[0]], b[1], b[2], b[3]) for b in timeline.bars), key=lambda b: (b[0], b[1]))
    bars += [(order[slot], since, now, "running") for slot, since in running]
    spans = {}  # (display row, state) -> [[x0, x1]], merged where they touch on screen
    for row, start, end, state in bars:
        x0 = left + scale * min(max(start, 0.0), now)
        x1 = max(left + scale * min(end, now), x0 + (0.6 if state == "ok" else 1.5))  # (a failure shows)
        runs = spans.get((row, state))
        if runs is None:
            runs = spans[row, state] = []
        if runs and x0 <= runs[-1][1] + 0.3:
            runs[-1][1] = max(runs[-1][1], x1)
        else:
            runs.append([x0, x1])
    body = [axes]
    for state, color in (("ok", OK), ("failed", FAILED), ("failures", FAILED), ("running", RUNNING)):
        high = max(rh - gap, 0.5)  # (failures last but running: drawn over the ok bars)
        low = top + high - max(high / 3, 0.5) if state == "failures" else top
        boxes = [(x0, low + row * rh, x1 - x0, top + high - low)
                 for (row, st), runs in spans.items() if st == state for x0, x1 in runs]
        if boxes:
            body.append(f'<path d="{rects(boxes)}" fill="{color}"/>')
    body += [f'<text x="{left - 4}" y="{n(y)}" text-anchor="end" fill-opacity=".7">{html.escape(label)}</text>'
             for y, label in labels]
    calls = sum(b[4] for b in timeline.bars) + timeline.dropped
    body.append(f'<text x="{left}" y="10" font-weight="bold">task stream</text>'
                f'<text x="{left + 70}" y="10" fill-opacity=".7">{calls:,} call{"s" * (calls != 1)} on '
                f'{len(slots)} slot{"s" * (len(slots) != 1)}</text>')
    body.append(legend(width, [(OK, "ok"), (FAILED, "failed"), (RUNNING, "running")]))
    return svg(width, height, "calls per slot over time", "".join(body))
