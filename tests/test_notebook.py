"""The notebook experience in a real IPython kernel: the example notebook run by nbclient, the %%burla magic, the
live widget's state and the static summary a finished job leaves in its cell (what a saved notebook shows without a
kernel), remote errors and failed inputs listed, a job cancelled from elsewhere, a kernel interrupt cancelling a
job, and %burla attach / %burla jobs picking up a detached job after the kernel that started it was restarted; and
the widget alone, fed a big job, staying bounded."""

import ast
import os
import queue
import re
import time

import nbformat
import pytest
from jupyter_client.manager import start_new_kernel
from nbclient import NotebookClient

from burla.client import cluster_state

EXAMPLES = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples")


def widget_states(nb):
    """model id -> (model name, state) of the widgets the notebook saved."""
    saved = nb.metadata.get("widgets", {}).get("application/vnd.jupyter.widget-state+json", {})
    return {mid: (m["model_name"], m["state"]) for mid, m in saved.get("state", {}).items()}


def text(cell):
    parts = []
    for out in cell.outputs:
        parts.append(out.get("text", ""))
        parts.extend(str(v) for v in out.get("data", {}).values())
        if out.output_type == "error":
            parts.append("\n".join(out.traceback))
    return "\n".join(parts)


def run_notebook(nb, env=None, allow_errors=False, timeout=90):
    saved = dict(os.environ)
    os.environ.update(env or {})  # the kernel inherits it
    try:
        NotebookClient(nb, timeout=timeout, kernel_name="python3", allow_errors=allow_errors).execute()
    finally:
        os.environ.clear()
        os.environ.update(saved)
    return nb


def test_quickstart_notebook(tmp_path):
    """examples/quickstart.ipynb on the kernel's own embedded cluster."""
    nb = run_notebook(nbformat.read(os.path.join(EXAMPLES, "quickstart.ipynb"), as_version=4),
                      env={"TMPDIR": str(tmp_path), "BURLA_CLUSTER": ""})
    code = [c for c in nb.cells if c.cell_type == "code"]
    outputs = {c.source.splitlines()[0]: text(c) for c in code}
    assert "[0, 2, 4, 6, 8, 10, 12, 14, 16, 18]" in outputs["def my_function(my_input):"]
    assert "[100, 101, 102, 103, 104, 105, 106, 107]" in outputs["shifted"]
    assert "worker process" in outputs["%%burla"]
    assert "<table>" in outputs["%burla status"] and "local" in outputs["%burla status"]

    states = widget_states(nb)
    bars = [s for name, s in states.values() if name == "IntProgressModel"]
    assert len(bars) == 3 and all(b["value"] == b["max"] and b["bar_style"] == "success" for b in bars)
    # Each job's cell keeps a static summary in place of the live view: plain HTML, which a saved notebook shows
    # without a kernel (a widget view would say "Error displaying widget: model not found").
    jobs = [c for c in code if any(o.output_type == "display_data" for o in c.outputs)]
    assert len(jobs) == 3
    for cell in jobs:
        views = [o for o in cell.outputs if o.output_type == "display_data"]
        assert len(views) == 1 and set(views[0].data) == {"text/html", "text/plain"}, views
    summary = summary_of(nb.cells[2])
    assert "my_function" in summary and "10 / 10 calls" in summary and "0 failed" in summary
    assert 'data-state="done"' in summary and "<svg" in summary
    assert "<td>local</td><td>10</td>" in summary  # the per-worker table
    assert all(f"processing {i}" in summary for i in range(10))  # the last lines
    assert "my_function" in summary_of(nb.cells[2], "text/plain")
    assert all(f"working on {i}" in summary_of(nb.cells[5]) for i in range(8))
    # nothing printed outside the view: the lines belong to the job's cell, not to whatever runs next
    streams = [o.get("text", "") for c in code for o in c.outputs if o.output_type == "stream"]
    assert not any("processing" in t or "working on" in t for t in streams), streams


def summary_of(cell, kind="text/html"):
    """The static summary a finished job left in the cell."""
    found = [o.data[kind] for o in cell.outputs if o.output_type == "display_data" and "burla-summary" in
             o.data.get("text/html", "")]
    assert len(found) == 1, cell.outputs
    return found[0]


def test_remote_error_in_a_cell(cluster):
    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_code_cell(c) for c in (
        "%load_ext burla_jupyter",
        "%%burla x in [4, 2, 0, 1] -> out\ny = 8 // x\nprint(f'{x} -> {y}')\ny",
        "%%burla --parallelism 1 --retries 0 x in range(3)\nx * 10",
        "%%burla --bogus 1 x in range(3)\nx",
        "from burla import remote_parallel_map\n"
        "def shout(x):\n    print(f'shout {x}')\n    return x\n"
        "gen = remote_parallel_map(shout, range(5), generator=True)",
        "sorted(gen)",
    )]
    run_notebook(nb, env={"BURLA_CLUSTER": cluster.address}, allow_errors=True)
    error = nb.cells[1].outputs[-1]
    assert error.output_type == "error" and error.ename == "ZeroDivisionError"
    tb = text(nb.cells[1])
    assert "y = 8 // x" in tb  # the cell's own line, from the remote traceback
    assert "input 2" in tb
    assert "[0, 10, 20]" in text(nb.cells[2])
    assert nb.cells[3].outputs[-1].ename == "UsageError" and "--bogus" in text(nb.cells[3])
    # a generator consumed in a later cell: the view (and the calls' lines) stay in the cell that started it
    assert [o.output_type for o in nb.cells[4].outputs] == ["display_data"]
    assert [o.output_type for o in nb.cells[5].outputs] == ["execute_result"]
    assert "[0, 1, 2, 3, 4]" in text(nb.cells[5]) and "shout" not in text(nb.cells[5])
    assert "shout 4" in summary_of(nb.cells[4]) and 'data-state="done"' in summary_of(nb.cells[4])
    failed = [s for name, s in widget_states(nb).values() if name == "IntProgressModel" and s["bar_style"] == "danger"]
    assert len(failed) == 1
    # the failed job's summary: failed, in red, with the failed input listed (its type, message and traceback)
    summary = summary_of(nb.cells[1])
    assert 'data-state="failed"' in summary and "failures (1)" in summary
    assert "<b>input 2</b>" in summary and "ZeroDivisionError" in summary and "in burla_cell" in summary


def test_failures_are_listed_with_their_lines(cluster):
    """return_exceptions=True: the job ends done, and its summary lists every failed input with its exception,
    traceback, repr and the lines it printed; the search box that filters the log is there too."""
    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_code_cell(
        "from burla import remote_parallel_map\n"
        "def check(x):\n    print(f'checking {x}')\n    if x % 4 == 1:\n        raise KeyError(f'no key {x}')\n"
        "    return x\n"
        "out = remote_parallel_map(check, range(12), return_exceptions=True)\n"
        "[type(o).__name__ for o in out].count('KeyError')")]
    run_notebook(nb, env={"BURLA_CLUSTER": cluster.address})
    assert "3" in text(nb.cells[0])
    summary = summary_of(nb.cells[0])
    assert "check" in summary and "12 / 12 calls" in summary and "3 failed" in summary and "failures (3)" in summary
    assert 'data-state="done"' in summary
    failures = re.findall(r'<details class="burla-v-failure">(.*?)</details>', summary, re.S)
    assert len(failures) == 3
    for x, item in zip((1, 5, 9), failures):
        assert f"<b>input {x}</b>" in item and "KeyError" in item and f"no key {x}" in item
        assert "Traceback" in item and ", in check" in item  # the remote traceback
        assert f"checking {x}" in item and "checking 0" not in item  # its own lines, only
    assert 'class="burla-v-search"' in summary and "oninput=" in summary
    assert re.search(r'data-t="\[[^\]]+\] checking 11"', summary)  # each line carries what the search matches


def test_a_cancelled_job_says_cancelled(new_cluster):
    """A job cancelled from elsewhere while its cell runs (as the panel's Cancel does: a CANCEL from another
    connection) ends its cell's view as cancelled, in the warning colour, not as failed."""
    import threading

    import burla

    new_cluster.start_worker("w1", slots=2)
    new_cluster.wait_for(1, slots=2)
    cancelled = []

    def cancel_when_running():
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            jobs = cluster_state(new_cluster.address)["jobs"]
            if jobs and jobs[0]["done"] >= 2:
                burla.attach(jobs[0]["id"], cluster=new_cluster.address).cancel()
                cancelled.append(jobs[0]["id"])
                return
            time.sleep(0.05)

    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_code_cell(
        "import time\nfrom burla import remote_parallel_map\n"
        "def nap(x):\n    print(f'nap {x}')\n    time.sleep(0.3)\n    return x\n"
        "remote_parallel_map(nap, range(60))")]
    canceller = threading.Thread(target=cancel_when_running)
    canceller.start()
    run_notebook(nb, env={"BURLA_CLUSTER": new_cluster.address}, allow_errors=True)
    canceller.join()
    assert cancelled and nb.cells[0].outputs[-1].ename == "JobCancelledError", text(nb.cells[0])
    summary = summary_of(nb.cells[0])
    assert 'data-state="cancelled"' in summary and ">cancelled</span>" in summary and cancelled[0] in summary
    assert "var(--jp-warn-color1" in summary and ">failed</span>" not in summary


def test_interrupt_cancels_the_job(cluster):
    km, kc = start_new_kernel(kernel_name="python3", env=dict(os.environ, BURLA_CLUSTER=cluster.address))
    try:
        kc.execute_interactive("%load_ext burla", timeout=30)
        msg_id = kc.execute("%%burla x in range(40)\nimport time\ntime.sleep(2)\nx")
        seen, started = [], time.monotonic()
        while time.monotonic() - started < 30:  # until the calls run on both slots
            seen.append(kc.get_iopub_msg(timeout=10))
            if cluster_state(cluster.address)["workers"][0]["busy"] == 2:
                break
        interrupted = time.monotonic()
        km.interrupt_kernel()
        reply = kc.get_shell_msg(timeout=10)
        assert reply["parent_header"]["msg_id"] == msg_id
        assert reply["content"]["status"] == "error" and reply["content"]["ename"] == "KeyboardInterrupt"
        stopped = time.monotonic() - interrupted
        assert stopped < 3, stopped
        deadline = time.monotonic() + 2  # the slots are free within a second or so
        while cluster_state(cluster.address)["workers"][0]["busy"]:
            assert time.monotonic() < deadline, "the job was not cancelled"
            time.sleep(0.05)
        while True:
            try:
                seen.append(kc.get_iopub_msg(timeout=1))
            except queue.Empty:
                break
        updates = [m["content"]["data"]["state"] for m in seen if m["msg_type"] == "comm_msg"
                   and m["content"]["data"].get("method") == "update"]
        assert any("cancelled" in str(u.get("value", "")) for u in updates)
        assert any(u.get("bar_style") == "warning" for u in updates)
        assert kc.execute_interactive("1 + 1", timeout=10)["content"]["status"] == "ok"  # the kernel goes on
    finally:
        kc.stop_channels()
        km.shutdown_kernel(now=True)


pytestmark = pytest.mark.timeout(120)


def run_cell(kc, code, timeout=60):
    """Run code in the kernel: (the execute reply's content, the IOPub messages the cell caused)."""
    messages = []
    reply = kc.execute_interactive(code, timeout=timeout, output_hook=messages.append)
    return reply["content"], messages


def outputs_text(messages):
    return "\n".join(m["content"].get("text", "") + "".join(str(v) for v in m["content"].get("data", {}).values())
                     + "\n".join(m["content"].get("traceback", [])) for m in messages
                     if m["msg_type"] in ("stream", "execute_result", "display_data", "error"))


def value(messages, kind="text/plain"):
    """The cell's value (its execute_result) as that mime type."""
    results = [m["content"]["data"] for m in messages if m["msg_type"] == "execute_result"]
    assert len(results) == 1, messages
    return results[0][kind]


def widget_updates(messages):
    """model id -> (model name, state) of the widgets the messages opened, with every update applied."""
    models = {}
    for m in messages:
        data = m["content"].get("data", {})
        if m["msg_type"] == "comm_open" and data.get("state", {}).get("_model_name"):
            models[m["content"]["comm_id"]] = (data["state"]["_model_name"], dict(data["state"]))
        elif m["msg_type"] == "comm_msg" and data.get("method") == "update" and m["content"]["comm_id"] in models:
            models[m["content"]["comm_id"]][1].update(data["state"])
    return models


@pytest.mark.timeout(240)
def test_attach_to_a_detached_job_after_a_kernel_restart(new_cluster):
    """A kernel starts a detached job and is killed (a real restart); a cell of the new kernel picks the job up with
    %burla attach: the live view shows it, and the results are all there in input order. %burla jobs lists it; an
    interrupted %burla attach leaves its job running; a bad or unknown id is a one-line UsageError."""
    new_cluster.start_worker("w1", slots=2)
    new_cluster.wait_for(1, slots=2)
    km, kc = start_new_kernel(kernel_name="python3", env=dict(os.environ, BURLA_CLUSTER=new_cluster.address))
    try:
        reply, messages = run_cell(kc, "import burla, time\n"
                                       "def slow(x):\n    time.sleep(0.2)\n    print(f'slow {x}')\n    return x * x\n"
                                       "job = burla.remote_parallel_map(slow, range(30), detach=True)\n"
                                       "print('JOB', job.id)")
        assert reply["status"] == "ok", reply
        job_id = outputs_text(messages).split("JOB ", 1)[1].split()[0]
        pid = km.provisioner.pid
        km.restart_kernel(now=True)  # killed: the job has no client from here on
        kc.wait_for_ready(timeout=60)
        assert km.provisioner.pid != pid
        assert value(run_cell(kc, "'job' in dir()")[1]) == "False"  # a new kernel

        assert run_cell(kc, "%load_ext burla")[0]["status"] == "ok"
        reply, messages = run_cell(kc, f"%burla attach {job_id}", timeout=90)
        assert reply["status"] == "ok", reply
        assert ast.literal_eval(value(messages)) == [x * x for x in range(30)]  # all, in input order
        views = [m for m in messages if m["msg_type"] == "display_data"
                 and "application/vnd.jupyter.widget-view+json" in m["content"]["data"]]
        assert len(views) == 1  # the live view, in this cell
        models = widget_updates(messages)
        view = models[views[0]["content"]["data"]["application/vnd.jupyter.widget-view+json"]["model_id"]]
        assert view[0] == "VBoxModel" and view[1]["_dom_classes"][0] == "burla-job"
        bars = [s for name, s in models.values() if name == "IntProgressModel"]
        assert len(bars) == 1
        header = [s["value"] for name, s in models.values() if name == "HTMLModel" and "burla-v-title" in s["value"]]
        summaries = [m["content"]["data"]["text/html"] for m in messages if m["msg_type"] == "update_display_data"]
        assert len(summaries) == 1 and 'data-state="done"' in summaries[0] and job_id in summaries[0]
        assert "slow" in summaries[0] and "30 / 30 calls" in summaries[0]  # (the job's name, from the broker)

        reply, messages = run_cell(kc, f"%burla attach --timeout 60 {job_id[:8]} -> squares\nsquares[-1]")
        assert reply["status"] == "ok", reply
        assert value(messages) == str(29 * 29)  # a prefix of the id is enough

        reply, messages = run_cell(kc, "%burla jobs")
        assert reply["status"] == "ok", reply
        table = value(messages, "text/html")
        rows = [re.findall(r"<td>(.*?)</td>", r) for r in table.split("<tr>")]
        row = [r for r in rows if r[:1] == [job_id]]
        assert len(row) == 1 and row[0][1:4] == ["done", "30 / 30", "0"] and row[0][5] == "yes", table
        assert job_id in value(run_cell(kc, f"%burla jobs {new_cluster.address}")[1], "text/html")

        # interrupting the kernel while it reads a job stops the reading, not the job
        reply, messages = run_cell(kc, "import burla, time\ndef slow(x):\n    time.sleep(0.5)\n    return x + 1\n"
                                       "job = burla.remote_parallel_map(slow, range(20), detach=True)\njob.id")
        second = ast.literal_eval(value(messages))
        msg_id = kc.execute(f"%burla attach {second}")
        deadline = time.monotonic() + 60
        while True:  # until its view is up
            assert time.monotonic() < deadline, "no view"
            m = kc.get_iopub_msg(timeout=30)
            if m["parent_header"].get("msg_id") == msg_id and m["msg_type"] == "display_data":
                break
        km.interrupt_kernel()
        reply = kc.get_shell_msg(timeout=30)
        assert reply["parent_header"]["msg_id"] == msg_id and reply["content"]["ename"] == "KeyboardInterrupt"
        assert value(run_cell(kc, f"burla.attach('{second}').status().state")[1]) in ("'running'", "'done'")
        reply, messages = run_cell(kc, f"%burla attach {second} -> again\nagain", timeout=90)
        assert ast.literal_eval(value(messages)) == list(range(1, 21))

        absent = next(d for d in "0123456789abcdef" if d not in (job_id[0], second[0]))  # no job's id starts so
        for line, says in [("%burla attach 0123456789abcdef", "no job 0123456789abcdef on ipc://"),
                           ("%burla attach not-an-id", "16 hexadecimal digits"),
                           ("%burla attach", "one job id"),
                           (f"%burla attach {absent}", "no job on ipc://"),
                           ("%burla attach --bogus 1 " + job_id, "unknown option --bogus"),
                           ("%burla jobs --timeout 3", "%burla jobs [CLUSTER]"),
                           ("%burla jobs nowhere", "expected 'local'")]:
            reply, messages = run_cell(kc, line)
            errors = [m["content"] for m in messages if m["msg_type"] == "error"]
            assert reply["status"] == "error" and len(errors) == 1, (line, messages)
            assert errors[0]["ename"] == "UsageError" and says in errors[0]["evalue"], (line, errors)
            assert len(errors[0]["traceback"]) == 1, errors  # the message alone, not a traceback

        # The view's final state (drawn by its close() at the end of the read) and the job's id in its header.
        ended = (bars[0]["value"], bars[0]["max"], bars[0]["bar_style"], "done" in header[0], job_id in header[0])
        assert ended == (30, 30, "success", True, True)
    finally:
        kc.stop_channels()
        km.shutdown_kernel(now=True)


class FakeClock:
    def __init__(self):
        self.t = 1000.0

    def monotonic(self):
        return self.t


def test_the_widget_stays_bounded_for_a_big_job(monkeypatch):
    """The widget alone (no kernel: nothing is shown) fed a 5-minute job of 100,000 calls in 5,000 results on 64
    slots, every call printing a line and 1% failing: what it keeps and what it draws stay small, the charts are
    drawn about once a second of the job, and its end is a static summary of bounded size."""
    from burla_jupyter import widget

    clock = FakeClock()
    monkeypatch.setattr(widget, "time", clock)
    view = widget.JobWidget(100_000)
    view.name("simulate · cell [4]")
    view.job_id("0123456789abcdef")
    drawn = []
    charts_of = view.charts
    monkeypatch.setattr(view, "charts", lambda: drawn.append(clock.t) or charts_of())
    slots = [f"worker-{k}/{i}" for k in range(16) for i in range(4)]
    started = time.perf_counter()
    for r in range(5000):
        clock.t += 0.06
        slot, first = slots[r % 64], 20 * r
        view.lines(slot, [[first + j, 1 + (j == 3), f"call {first + j} says hello"] for j in range(20)])
        failed = [first + 3] if r % 5 == 0 else []
        for i in failed:
            view.failure(i, "builtins.ValueError", f"bad input {i}", f"Traceback ...\nValueError: bad input {i}",
                         repr(i))
        view.advance(20, slot, len(failed), 3.5)
        if r % 7 == 0:
            view.tick()
    took = time.perf_counter() - started
    assert took < 30, took  # (some 5 s here)
    assert 250 <= len(drawn) <= 310  # about once a second of the job's 300 s
    values = {"progress": view.progress_chart.value, "slots": view.slots_chart.value,
              "timeline": view.timeline_chart.value, "failures": view.failure_list.value,
              "log": view.logs.children[0].value, "worker log": view.log_views["worker-3"].value}
    for name, value in values.items():
        assert len(value) < 80_000, (name, len(value))
    assert len(view.timeline.bars) <= view.timeline.limit and len(view.input_lines) <= widget.INPUTS_KEPT
    assert len(view.failures) == widget.MAX_FAILURES and view.failed_count() == 1000
    assert view.tabs.titles[5] == "failures (1,000)"
    assert "call 99999 says hello" in values["log"]  # the tail
    assert "simulate · cell [4]" in view.header.value and "0123456789abcdef" in view.header.value

    view.close("done")
    summary = view.summary()["text/html"]
    assert len(summary) < 200_000, len(summary)
    assert "100,000 / 100,000 calls" in summary and "1,000 failed" in summary and "900 more failed" in summary
    assert "<b>input 3</b> &middot; ValueError: bad input 3" in summary
    assert "call 3 says hello" in summary.split("<b>input 3</b>", 1)[1].split("</details>", 1)[0]  # its lines


def test_the_first_end_is_the_one_shown(monkeypatch):
    """A cancelled job stays cancelled (warning colour) whatever is reported after; a client that passes no
    seconds, no failures and no name still gets a view."""
    from burla_jupyter import widget

    view = widget.JobWidget(None)
    view.lines("w1/0", [[0, 1, "hello"]])
    view.advance(1, "w1/0", 0)
    view.advance(1, "w1/1")
    view.close("cancelled")
    view.close("failed")
    assert view.state == "cancelled" and view.bar.bar_style == "warning"
    summary = view.summary()
    assert 'data-state="cancelled"' in summary["text/html"] and "<b>burla</b>" in summary["text/html"]
    assert "cancelled" in summary["text/plain"] and "2 calls" in summary["text/plain"]
    assert "failed</span>" not in summary["text/html"] and "0 failed" in summary["text/html"]
