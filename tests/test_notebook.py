"""The notebook experience in a real IPython kernel: the example notebook run by nbclient, the %%burla magic, the
live widget's state, remote errors in the cell, and a kernel interrupt cancelling a job."""

import os
import queue
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
    html = "\n".join(s.get("value", "") for name, s in states.values() if name == "HTMLModel")
    assert all(f"processing {i}" in html for i in range(10))  # the calls' lines, in the widget
    assert all(f"working on {i}" in html for i in range(8))
    assert "10 / 10 calls" in html and "0 failed" in html and "done" in html
    assert "<td>local</td><td>10</td>" in html  # the per-worker table
    # nothing printed outside the widget: the lines belong to the cell's view, not to whatever runs next
    assert "processing 0" not in outputs["def my_function(my_input):"]


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
    view = nb.cells[4].outputs[0].data["application/vnd.jupyter.widget-view+json"]["model_id"]
    assert widget_states(nb)[view][0] == "VBoxModel"
    failed = [s for name, s in widget_states(nb).values() if name == "IntProgressModel" and s["bar_style"] == "danger"]
    assert len(failed) == 1


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
