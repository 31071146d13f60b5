"""The JupyterLab panel in a real JupyterLab, driven in headless Chromium (Debian's) by Playwright: open the panel,
run a job from a notebook, see workers, progress and log lines appear, then cancel the job from the panel; pick a
finished detached job up in a new notebook cell from the panel, and copy its id; a job's charts and failures; the
panel's layout with many jobs and wide workers, its log search, and the chosen job after a reload (against a
stand-in broker that pushes the states the test writes); the server's own cluster stopped and started again under
a running kernel."""

import contextlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request

import nbformat
import pytest
import zmq

from burla import protocol as P
from burla.client import cluster_state

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BUILT = os.path.join(ROOT, "burla_jupyter", "labextension")
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
TOKEN = "burla-ui-test"
SCREENSHOT = os.environ.get("BURLA_SCREENSHOT")  # where to save the panel during the job (docs/panel.png)
SCREENSHOTS = os.environ.get("BURLA_SCREENSHOTS")  # a folder for the charts and failures pictures (docs/)

try:
    from playwright.sync_api import expect, sync_playwright
except ImportError:
    sync_playwright = None

pytestmark = [
    pytest.mark.skipif(CHROMIUM is None, reason="needs Debian's chromium"),
    pytest.mark.skipif(sync_playwright is None, reason="needs playwright"),
    pytest.mark.skipif(not os.path.exists(os.path.join(BUILT, "package.json")),
                       reason="the labextension is not built (npm run build in labextension/)"),
    pytest.mark.timeout(180),
]


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def lab(tmp_path, cluster):
    yield from start_lab(tmp_path, {"BURLA_CLUSTER": cluster.address})


@pytest.fixture
def own_cluster(new_cluster):
    """A cluster of the test's own, whose jobs the module's other tests do not see."""
    new_cluster.start_worker("w1", slots=2)
    new_cluster.wait_for(1, slots=2)
    return new_cluster


@pytest.fixture
def own_lab(tmp_path, own_cluster):
    yield from start_lab(tmp_path, {"BURLA_CLUSTER": own_cluster.address})


@pytest.fixture
def lab_without_cluster(tmp_path):
    yield from start_lab(tmp_path, {"BURLA_CLUSTER": "", "BURLA_CONFIG": str(tmp_path / "none.toml"),
                                    "TMPDIR": str(tmp_path)})


def start_lab(tmp_path, burla_env):
    """JupyterLab on loopback with the built panel and the server extension; its kernels get burla_env."""
    data = tmp_path / "jupyter-path" / "labextensions"
    data.mkdir(parents=True)
    (data / "burla-labextension").symlink_to(BUILT)
    config = tmp_path / "config"
    config.mkdir()
    (config / "jupyter_server_config.json").write_text(json.dumps(
        {"ServerApp": {"jpserver_extensions": {"burla_jupyter": True}}}))
    (config / "labconfig").mkdir()  # no "get notified about Jupyter news?" box in the way (or in the screenshot)
    (config / "labconfig" / "page_config.json").write_text(json.dumps(
        {"disabledExtensions": {"@jupyterlab/apputils-extension:announcements": True}}))
    notebooks = tmp_path / "notebooks"
    notebooks.mkdir()
    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_code_cell(
        "from burla import remote_parallel_map\nimport time\n\n"
        "def slow(x):\n    print(f'ui line {x}')\n    time.sleep(0.5)\n    return x\n\n"
        "remote_parallel_map(slow, range(60))")]
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nbformat.write(nb, notebooks / "job.ipynb")
    port = free_port()
    env = dict(os.environ, JUPYTER_PATH=str(tmp_path / "jupyter-path"), JUPYTER_CONFIG_DIR=str(config),
               HOME=str(tmp_path), **burla_env)
    server = subprocess.Popen(
        [sys.executable, "-m", "jupyterlab", "--no-browser", "--ip=127.0.0.1", f"--port={port}",
         f"--ServerApp.token={TOKEN}", f"--ServerApp.root_dir={notebooks}", "--LabApp.news_url=",
         "--LabApp.check_for_updates_class=jupyterlab.NeverCheckForUpdate"]
        + (["--allow-root"] if os.geteuid() == 0 else []),
        env=env, stdout=subprocess.DEVNULL, stderr=open(tmp_path / "lab.log", "w"), start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                urllib.request.urlopen(f"{url}/api/status?token={TOKEN}", timeout=2)
                break
            except OSError:
                assert server.poll() is None and time.monotonic() < deadline, (tmp_path / "lab.log").read_text()
                time.sleep(0.2)
        yield url
    finally:
        if server.poll() is None:
            os.killpg(server.pid, signal.SIGTERM)  # the server and the kernels it started
            try:
                server.wait(10)
            except subprocess.TimeoutExpired:
                os.killpg(server.pid, signal.SIGKILL)
                server.wait()


def test_panel_shows_a_notebook_job_and_cancels_it(lab, cluster, tmp_path, chromium):
    with panel_page(chromium, lab, "lab/tree/job.ipynb") as (page, panel):
        expect(panel.locator(".burla-cluster")).to_contain_text(f"connected to {cluster.address}", timeout=20_000)
        expect(panel.locator(".burla-worker")).to_contain_text("w1")

        page.locator(".jp-Notebook .jp-Cell .cm-content").first.click(timeout=60_000)
        kernel_idle(page)
        page.keyboard.press("Shift+Enter")  # run the cell: the job starts in the notebook's kernel
        running = panel.locator(".burla-job-running")
        expect(running).to_be_visible(timeout=60_000)
        expect(panel.locator(".burla-log")).to_contain_text("ui line", timeout=20_000)
        expect(panel.locator(".burla-worker")).to_contain_text("2/2")
        expect(running.locator(".burla-counts")).to_contain_text(" / 60 calls", timeout=10_000)
        # some progress to show: a call or more done
        expect(running.locator(".burla-counts")).to_have_text(re.compile(r"^[1-9][\d,]* / 60 calls"), timeout=20_000)
        page.screenshot(path=str(tmp_path / "panel.png"))  # the notebook's own view beside the panel
        if SCREENSHOT:
            shutil.copy(tmp_path / "panel.png", SCREENSHOT)

        running.locator(".burla-cancel").click()
        expect(panel.locator(".burla-job-cancelled")).to_be_visible(timeout=10_000)
        expect(page.locator(".jp-Cell .jp-OutputArea").first).to_contain_text("JobCancelledError", timeout=10_000)
        deadline = time.monotonic() + 5
        while cluster_state(cluster.address)["workers"][0]["busy"]:
            assert time.monotonic() < deadline, "cancelling from the panel did not free the slots"
            time.sleep(0.05)


def test_attach_a_detached_job_in_a_new_cell(own_lab, own_cluster, chromium):
    """A detached job that ended, and an attached one: the panel lists both; the detached one's "Attach in a new
    cell" puts a cell below the notebook's active cell that, run, gets the job's results; "Copy id" copies its id."""
    from burla import remote_parallel_map

    def triple(x):
        return 3 * x

    job = remote_parallel_map(triple, range(10), detach=True, cluster=own_cluster.address)
    assert job.result(timeout=60, spinner=False) == [3 * x for x in range(10)]
    before = {j["id"] for j in cluster_state(own_cluster.address)["recent"]}
    remote_parallel_map(triple, range(3), cluster=own_cluster.address, spinner=False)  # an attached job
    deadline = time.monotonic() + 10
    while True:  # (the client's end of the job reaches the broker after the results)
        attached = [j["id"] for j in cluster_state(own_cluster.address)["recent"]
                    if not j["detached"] and j["id"] not in before]
        if attached:
            break
        assert time.monotonic() < deadline, "the attached job is not among the broker's recent jobs"
        time.sleep(0.05)
    attached = attached[0]

    with panel_page(chromium, own_lab, "lab/tree/job.ipynb",
                    permissions=["clipboard-read", "clipboard-write"]) as (page, panel):
        row = panel.locator(f'.burla-job[data-job="{job.id}"]')
        expect(row).to_contain_text("done", timeout=20_000)
        expect(row).to_contain_text("detached")
        expect(row.locator(".burla-counts")).to_contain_text("10 / 10 calls")
        expect(row.locator(".burla-attach")).to_be_visible()
        expect(row.locator(".burla-copy")).to_be_visible()
        other = panel.locator(f'.burla-job[data-job="{attached}"]')
        expect(other.locator(".burla-copy")).to_be_visible()
        expect(other.locator(".burla-attach")).to_be_hidden()  # its results went to its client: nothing to attach to

        cells = page.locator(".jp-Notebook .jp-Cell")
        expect(cells).to_have_count(1, timeout=60_000)
        cells.first.locator(".cm-content").click()  # the active cell: the new one goes below it
        row.locator(".burla-attach").click()
        expect(cells).to_have_count(2)
        expect(cells.nth(1).locator(".cm-content")).to_contain_text(f'burla.attach("{job.id}"')
        expect(panel.locator(".burla-notice")).to_contain_text("job.ipynb")
        expect(cells.first.locator(".cm-content")).to_contain_text("remote_parallel_map(slow")  # (left alone)

        cells.nth(1).locator(".cm-content").click()
        kernel_idle(page)
        page.keyboard.press("Shift+Enter")  # run it, in the notebook's kernel (a fresh one)
        expect(cells.nth(1).locator(".jp-OutputArea")).to_contain_text("10 / 10", timeout=60_000)  # the live view
        expect(cells).to_have_count(3)  # (Shift+Enter on the last cell adds one, in edit mode)
        page.keyboard.type("print('got', results)")
        page.keyboard.press("Shift+Enter")
        expect(cells.nth(2).locator(".jp-OutputArea")).to_contain_text(f"got {[3 * x for x in range(10)]}",
                                                                     timeout=60_000)

        row.locator(".burla-copy").click()
        expect(panel.locator(".burla-notice")).to_contain_text(f"copied job id {job.id}")
        assert page.evaluate("navigator.clipboard.readText()") == job.id


# pytest-jupyter's autouse fixtures, made no-ops here: between calls Playwright marks the module's browser's event
# loop running, so they would take that loop, close it and run an in-process server's cleanup on it. These tests
# reach JupyterLab over HTTP only: no in-process server, no loop of their own.
@pytest.fixture(autouse=True)
def jp_asyncio_loop():
    yield None


@pytest.fixture(autouse=True)
def jp_server_cleanup():
    yield


@pytest.fixture(scope="module")
def chromium():
    """Headless Chromium, one for the module (it takes seconds to start); each test has a context of its own."""
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=[
            "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
            "--disable-component-update", "--disable-sync"])
        try:
            yield browser
        finally:
            browser.close()


@contextlib.contextmanager
def panel_page(chromium, lab, path="lab", permissions=(), events=None):
    """A fresh browser context on a JupyterLab page with the Burla panel open: (page, panel). events: a handler of
    Playwright's WebSocketRoute that stands between the page and the panel's push channel."""
    context = chromium.new_context(viewport={"width": 1400, "height": 900})
    try:
        if permissions:
            context.grant_permissions(list(permissions), origin=lab)
        page = context.new_page()
        if events:
            page.route_web_socket(re.compile(r".*/burla/events.*"), events)
        page.goto(f"{lab}/{path}?token={TOKEN}")
        page.locator('.jp-LabShell [data-id="burla-panel"]').click(timeout=60_000)  # the sidebar tab
        yield page, page.locator("#burla-panel")
    finally:
        context.close()


def reopen_panel(page, panel):
    """After a reload: JupyterLab may restore the sidebar open (a click would close it) or not."""
    tab = page.locator('.jp-LabShell [data-id="burla-panel"]')
    expect(tab).to_be_visible(timeout=60_000)
    try:
        expect(panel).to_be_visible(timeout=5_000)
    except AssertionError:
        tab.click()
        expect(panel).to_be_visible()


def test_start_and_stop_the_local_cluster_from_the_panel(lab_without_cluster, chromium):
    with panel_page(chromium, lab_without_cluster) as (page, panel):
        expect(panel.locator(".burla-cluster")).to_contain_text("not connected: no cluster", timeout=20_000)
        panel.locator(".burla-start").click()
        expect(panel.locator(".burla-cluster")).to_contain_text("connected to local cluster ipc://",
                                                                timeout=20_000)
        expect(panel.locator(".burla-worker")).to_contain_text("local", timeout=20_000)
        panel.locator(".burla-stop").click()
        expect(panel.locator(".burla-cluster")).to_contain_text("no cluster", timeout=20_000)
        expect(panel.locator(".burla-start")).to_be_visible()


def test_panel_keeps_up_with_a_big_job(lab, cluster, chromium):
    """A job of 100,000 calls that each print a line: the page keeps drawing (no long freeze of its main thread)
    and the panel ends at 100,000 done. Its last pushes of lines never reach the page (as when the page reconnects
    at the wrong moment): the page sees from the server's count that it lacks lines, and fetches the tail."""
    import threading

    from burla import remote_parallel_map

    lost = []

    def events(route):
        server = route.connect_to_server()

        def to_page(message):
            data = json.loads(message)
            if data.get("type") == "logs" and data.get("total", 0) > 90_000:
                lost.append(len(data["lines"]))
            else:
                route.send(message)
        server.on_message(to_page)

    with panel_page(chromium, lab, events=events) as (page, panel):
        expect(panel.locator(".burla-worker")).to_contain_text("w1", timeout=20_000)
        # the longest gap between two animation frames: how long the page was frozen at worst
        page.evaluate("""() => { window.burlaGap = 0; let last = performance.now();
            const tick = now => { window.burlaGap = Math.max(window.burlaGap, now - last); last = now;
                                  requestAnimationFrame(tick); };
            requestAnimationFrame(tick); }""")
        job = threading.Thread(target=remote_parallel_map, args=(print, range(100_000)),
                               kwargs={"cluster": cluster.address, "spinner": False})
        job.start()
        expect(panel.locator(".burla-job-done .burla-counts")).to_contain_text("100,000 / 100,000 calls",
                                                                           timeout=120_000)
        job.join(30)
        job_id = panel.locator(".burla-job-done").first.get_attribute("data-job")
        # The log ends with the job's last lines, though every push of lines past the 90,000th was lost. (The last
        # to come, which need not be input 99,999's: two slots' batches end at different times.)
        deadline = time.monotonic() + 10
        while True:
            with urllib.request.urlopen(f"{lab}/burla/jobs/{job_id}/logs?token={TOKEN}", timeout=10) as response:
                logs = json.loads(response.read())
            if logs["total"] == 100_000 or time.monotonic() > deadline:
                break
            time.sleep(0.2)
        assert logs["total"] == 100_000 and len(logs["lines"]) == 2000, (logs["total"], len(logs["lines"]))
        last = f"[{logs['lines'][-1][0]}] {logs['lines'][-1][2]}"
        expect(panel.locator(".burla-log")).to_have_text(re.compile(re.escape(last) + r"\s*$"), timeout=30_000)
        assert lost and sum(lost) > 100, lost
        gap = page.evaluate("window.burlaGap")
        print(f"longest frame gap during the job: {gap:.0f} ms")
        # A frozen page stops drawing for as long as it chews (tens of seconds for 100,000 unthrottled lines);
        # the bound is loose because this 2-core machine also runs the cluster, JupyterLab and the browser.
        assert gap < 5000, f"the page stopped drawing for {gap:.0f} ms"

        # its pictures stay small: the server's history of 100,000 calls is bounded, and so is what the page draws
        with urllib.request.urlopen(f"{lab}/burla/jobs/{job_id}/history?token={TOKEN}", timeout=10) as response:
            text = response.read()
        history = json.loads(text)
        assert len(text) < 300_000 and len(history["points"]) <= 300 and len(history["bars"]) <= 1500
        assert history["points"][-1][1] == 100_000
        panel.locator(f'.burla-job[data-job="{job_id}"] .burla-job-name').click()  # (the lab is shared: choose it)
        panel.locator(".burla-tab-charts").click()
        expect(panel.locator(".burla-progress-chart")).to_contain_text("100% done", timeout=10_000)
        rects = panel.locator(".burla-timeline rect").count()
        assert 0 < rects <= 1500, rects


# ---------------------------------------------------------------------------------------------------------------
# A stand-in broker: what the panel draws from states the test writes (many jobs, wide workers, failures, bars).


class FakeBroker:
    """Answers WATCH as the broker does: STATE every 0.25 s (the state tick(state) leaves), and the LOG lines given
    to log(), to every watcher. Nothing else: the panel's server only watches."""

    def __init__(self, directory, tick=None):
        self.address = f"ipc://{directory}/fake-broker"
        self.state = {"workers": [], "jobs": [], "recent": [], "nworkers": 0}
        self.tick = tick
        self.lines = []  # (job id bytes, slot, [[input, stream, text], ...]) to send
        self.lock = threading.Lock()
        self.stopped = False
        self.sock = P.socket(zmq.Context.instance(), zmq.ROUTER)
        self.sock.bind(self.address)
        self.thread = threading.Thread(target=self.run, daemon=True)
        self.thread.start()

    def log(self, job, slot, lines):
        with self.lock:
            self.lines.append((bytes.fromhex(job), slot, lines))

    def run(self):
        watchers, next_push = set(), 0.0
        while not self.stopped:
            if self.sock.poll(20):
                ident, _, command, _, _ = P.recv_routed(self.sock)
                if command == P.WATCH:
                    watchers.add(ident)
            with self.lock:
                lines, self.lines = self.lines, []
                if time.monotonic() >= next_push:
                    next_push = time.monotonic() + P.WATCH_INTERVAL
                    if self.tick:
                        self.tick(self.state)
                    messages = [(P.STATE, json.loads(json.dumps(self.state)))]
                else:
                    messages = []
            messages = [(P.LOG, {"j": j, "w": slot, "l": ls}) for j, slot, ls in lines] + messages
            for ident in list(watchers):
                for command, header in messages:
                    try:
                        P.send(self.sock, command, header, ident=ident, flags=zmq.NOBLOCK)
                    except zmq.ZMQError:
                        watchers.discard(ident)
                        break

    def close(self):
        self.stopped = True
        self.thread.join(5)
        self.sock.close(0)


def fake_job(k, **fields):
    now = time.time()
    record = {"id": f"{k * 0x9E3779B97F4A7C15 % 2 ** 64:016x}", "name": f"step_{k} · cell [{k}]", "state": "done",
              "done": 100, "failed": 0, "submitted": 100, "total": 100, "queued": 0, "slots": 0,
              "started": now - 600 + k, "elapsed": 30.0, "finished": now - 570 + k, "detached": 0, "attached": 0,
              "reason": None, "workers": []}
    record.update(fields)
    return record


WORKERS = [{"id": f"gpu-worker-{k}-with-a-long-name", "host": f"host-{k}.zone-b.example.internal", "slots": 8,
            "busy": 8 - k, "cpu": 32, "ram": 128.0, "gpu": ["A100-SXM4-80GB", "A100-SXM4-80GB"], "preparing": 0,
            "containers": None} for k in range(3)]
RUNNING = fake_job(255)["id"]


def busy_job(state):
    """The running job of the stand-in: 40 calls a push on 3 workers' 24 slots, a bar per result, failures."""
    now = time.time()
    job = next((j for j in state["jobs"] if j["id"] == RUNNING), None)
    if job is None:
        return
    job["elapsed"] = now - job["started"]
    seq = job.setdefault("seq", 0)
    if job["done"] < job["total"]:
        job["done"] = min(job["done"] + 40, job["total"])
        bars = job.setdefault("bars", [])
        for k in range(8):
            seq += 1
            slot = f"{WORKERS[seq % 3]['id']}/{seq % 8}"
            bars.append([seq, slot, now - 0.2 - 0.05 * (seq % 4), now - 0.01 * (seq % 3), 5, int(seq % 29 == 0)])
        del bars[:-64]
        job["seq"] = seq
    job["failed"] = len(job["failures"])


FAILURES = [{"i": 17, "type": "ValueError", "msg": "bad pixel at (3, 4)",
             "tb": 'Traceback (most recent call last):\n  File "<cell 7>", line 4, in simulate\n'
                   '    raise ValueError("bad pixel at (3, 4)")\nValueError: bad pixel at (3, 4)'},
            {"i": 230, "type": "ZeroDivisionError", "msg": "division by zero",
             "tb": "Traceback (most recent call last):\nZeroDivisionError: division by zero"}]


@pytest.fixture
def fake_broker(tmp_path):
    broker = FakeBroker(tmp_path, tick=busy_job)
    broker.state["workers"] = [dict(w) for w in WORKERS]
    broker.state["jobs"] = [fake_job(255, name="simulate · cell [7]", state="running", done=0, total=2000,
                                     slots=21, started=time.time(), elapsed=0.0, finished=None, attached=1,
                                     workers=[w["id"] for w in WORKERS], failures=FAILURES)]
    broker.state["recent"] = [fake_job(k) for k in range(1, 20)]
    yield broker
    broker.close()


@pytest.fixture
def fake_lab(tmp_path, fake_broker):
    yield from start_lab(tmp_path, {"BURLA_CLUSTER": fake_broker.address})


def test_layout_search_failures_charts_and_reload(fake_lab, fake_broker, chromium):
    """20 jobs and 3 wide workers: a worker is one line, the job list scrolls in a bounded height and the logs stay
    in view; jobs go by their function's name; the log search; the failures tab with each input's traceback and
    lines; the charts; and after a reload, the job chosen before, with its log."""
    old = fake_job(5)["id"]
    for k in range(30):
        fake_broker.log(old, f"gpu-worker-1-with-a-long-name/{k % 8}", [[k, 1, f"epoch {k} loss {1 / (k + 1):.3f}"]])
    fake_broker.log(RUNNING, f"{WORKERS[0]['id']}/3", [[17, 1, "reading tile 17"], [17, 2, "warning: odd pixel"],
                                                       [18, 1, "reading tile 18"]])
    with panel_page(chromium, fake_lab) as (page, panel):
        expect(panel.locator(".burla-job")).to_have_count(20, timeout=30_000)
        # (a) each worker on one line: no taller than the header row
        rows = panel.locator(".burla-worker")
        expect(rows).to_have_count(3)
        heights = page.evaluate("Array.from(document.querySelectorAll('.burla-workers tr'), r => r.offsetHeight)")
        assert len(heights) == 4 and max(heights[1:]) <= heights[0] + 1, f"a worker's row wraps: {heights}"
        assert "host-0.zone-b" in rows.first.get_attribute("title")
        # (b) the list scrolls in a bounded height: the chosen job's tabs and log are in view
        jobs = panel.locator(".burla-jobs")
        box = jobs.bounding_box()
        assert box["height"] <= 0.35 * 900, box
        assert page.evaluate("document.querySelector('.burla-jobs').scrollHeight") > box["height"]
        log_box = panel.locator(".burla-log").bounding_box()
        assert log_box["y"] + 40 < 900, f"the log is below the fold: {log_box}"
        # jobs go by their function (and cell); the id is secondary
        running = panel.locator(f'.burla-job[data-job="{RUNNING}"]')
        expect(running.locator(".burla-job-name")).to_have_text("simulate · cell [7]")
        expect(running.locator(".burla-job-id")).to_have_text(RUNNING[:8])
        expect(panel.locator(".burla-detail-title")).to_contain_text("simulate · cell [7]")

        # the failures tab: index, exception, traceback folded, and the input's own lines
        expect(panel.locator(".burla-tab-failures")).to_have_text("Failures (2)")
        panel.locator(".burla-tab-failures").click()
        failure = panel.locator('.burla-failure[data-input="17"]')
        expect(failure.locator(".burla-failure-head")).to_have_text("input 17 ValueError: bad pixel at (3, 4)")
        expect(failure.locator(".burla-traceback pre")).to_be_hidden()
        failure.locator(".burla-traceback summary").click()
        expect(failure.locator(".burla-traceback pre")).to_be_visible()
        expect(failure.locator(".burla-traceback pre")).to_contain_text('File "<cell 7>", line 4, in simulate')
        expect(failure.locator(".burla-failure-lines")).to_have_text(
            f"[{WORKERS[0]['id']}] reading tile 17\n[{WORKERS[0]['id']}] ! warning: odd pixel")
        expect(panel.locator('.burla-failure[data-input="230"]')).to_contain_text("it printed nothing")

        # the charts: throughput and progress, busy slots per worker, the timeline's bars
        panel.locator(".burla-tab-charts").click()
        charts = panel.locator(".burla-charts")
        expect(charts.locator(".burla-progress-chart .burla-rate")).to_have_count(1, timeout=10_000)
        expect(charts.locator(".burla-busy-chart .burla-band")).to_have_count(3)
        expect(charts.locator(".burla-legend")).to_contain_text("gpu-worker-2-with-a-long-name")
        expect(charts.locator(".burla-timeline .burla-bar-failed").first).to_be_attached(timeout=10_000)
        assert charts.locator(".burla-timeline rect").count() >= 8
        expect(charts.locator(".burla-progress-chart")).to_contain_text("% done")

        # choose an older job, search its log, then reload: the choice and its log come back
        panel.locator(f'.burla-job[data-job="{old}"]').click()
        panel.locator(".burla-tab-logs").click()
        expect(panel.locator(".burla-log")).to_contain_text("epoch 29 loss", timeout=10_000)
        panel.locator(".burla-log-search").fill("EPOCH 2")
        expect(panel.locator(".burla-log-title")).to_have_text("11 of 30 lines")  # 2, 20..29
        expect(panel.locator(".burla-log")).not_to_contain_text("epoch 3 ")
        panel.locator(".burla-log-search").fill("")
        page.reload()
        reopen_panel(page, panel)
        expect(panel.locator(f'.burla-job[data-job="{old}"]')).to_have_class("burla-job burla-job-done burla-selected",
                                                                              timeout=30_000)
        expect(panel.locator(".burla-log")).to_contain_text("epoch 29 loss", timeout=10_000)
        expect(panel.locator(".burla-detail-title")).to_contain_text("step_5 · cell [5]")


# ---------------------------------------------------------------------------------------------------------------
# A real job's charts and failures, and the server's own cluster restarted under a kernel.

CHARTS_CELL = """from burla import remote_parallel_map
import random, time

def simulate(x):
    time.sleep(random.uniform(0.01, 0.06))
    print(f"simulating tile {x}")
    if x % 37 == 5:
        raise ValueError(f"bad tile {x}")
    return x * x

results = remote_parallel_map(simulate, range(300), return_exceptions=True)
"""


def notebook(tmp_path, name, *cells):
    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_code_cell(c) for c in cells]
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nbformat.write(nb, tmp_path / "notebooks" / name)


@pytest.fixture
def two_workers(new_cluster):
    for name in ("w1", "w2"):
        new_cluster.start_worker(name, slots=3)
    new_cluster.wait_for(2, slots=6)
    return new_cluster


@pytest.fixture
def charts_lab(tmp_path, two_workers):
    yield from start_lab(tmp_path, {"BURLA_CLUSTER": two_workers.address})


def widen_sidebar(page, width=430):
    """Drag the left sidebar's edge: the pictures in docs/ show the panel wider than its default."""
    handle = page.locator(".jp-LabShell #jp-main-split-panel > .lm-SplitPanel-handle").first
    box = handle.bounding_box()
    page.mouse.move(box["x"] + box["width"] / 2, box["y"] + 200)
    page.mouse.down()
    page.mouse.move(width, box["y"] + 200, steps=5)
    page.mouse.up()


def run_cell(page, index):
    page.locator(".jp-Notebook .jp-Cell").nth(index).locator(".cm-content").click(timeout=60_000)
    kernel_idle(page)
    page.keyboard.press("Shift+Enter")


def kernel_idle(page):
    """Wait until the notebook's kernel is up and idle: a cell run while it still starts may never run (it stays
    "[ ]", which made a test wait in vain on a loaded machine)."""
    expect(page.get_by_role("button", name=re.compile(r"\| Idle$"))).to_be_visible(timeout=60_000)


def test_charts_and_failures_of_a_notebook_job(charts_lab, tmp_path, chromium):
    """A notebook job on 2 workers whose calls sometimes fail: the panel names it by its function and cell, draws
    its throughput, busy slots and timeline, and lists its failures with tracebacks and their inputs' lines."""
    notebook(tmp_path, "charts.ipynb", CHARTS_CELL)
    with panel_page(chromium, charts_lab, "lab/tree/charts.ipynb") as (page, panel):
        expect(panel.locator(".burla-worker")).to_have_count(2, timeout=20_000)
        run_cell(page, 0)
        row = panel.locator(".burla-job-running")
        # (the cell's number is the client's to get right: any number here)
        expect(row.locator(".burla-job-name")).to_have_text(re.compile(r"simulate · cell \[\d+\]"), timeout=60_000)
        panel.locator(".burla-tab-charts").click()
        charts = panel.locator(".burla-charts")
        expect(charts.locator(".burla-timeline rect").first).to_be_attached(timeout=20_000)  # while it runs
        expect(panel.locator(".burla-job-done .burla-counts")).to_contain_text("300 / 300 calls · 8 failed",
                                                                               timeout=60_000)
        expect(charts.locator(".burla-progress-chart")).to_contain_text("100% done", timeout=10_000)
        expect(charts.locator(".burla-progress-chart .burla-rate")).to_have_count(1)
        expect(charts.locator(".burla-busy-chart .burla-band")).to_have_count(2)
        expect(charts.locator(".burla-legend")).to_contain_text("w1")
        assert charts.locator(".burla-timeline .burla-bar-failed").count() >= 1
        assert charts.locator(".burla-timeline rect").count() >= 20  # (a bar per result)
        if SCREENSHOTS:
            widen_sidebar(page)
            time.sleep(1.5)  # (the charts redraw at the new width)
            page.screenshot(path=os.path.join(SCREENSHOTS, "panel-charts.png"))

        panel.locator(".burla-tab-failures").click()
        expect(panel.locator(".burla-tab-failures")).to_have_text("Failures (8)")
        failure = panel.locator('.burla-failure[data-input="42"]')
        expect(failure.locator(".burla-failure-head")).to_have_text("input 42 ValueError: bad tile 42")
        expect(failure.locator(".burla-failure-lines")).to_contain_text("simulating tile 42")
        expect(failure.locator(".burla-failure-lines")).not_to_contain_text("tile 43")
        failure.locator(".burla-traceback summary").click()
        expect(failure.locator(".burla-traceback pre")).to_contain_text("in simulate")
        expect(panel.locator(".burla-failure")).to_have_count(8)
        if SCREENSHOTS:
            page.screenshot(path=os.path.join(SCREENSHOTS, "panel-failures.png"))


def test_kernels_keep_the_servers_cluster_across_stop_and_start(lab_without_cluster, tmp_path, chromium):
    """A kernel started while the panel's local cluster runs has its address; after Stop and Start the address is
    the same, so the kernel's next job runs (it used to fail: a new cluster listened on a new path)."""
    notebook(tmp_path, "restart.ipynb",
             "import os\nfrom burla import remote_parallel_map\nprint('cluster', os.environ.get('BURLA_CLUSTER'))\n"
             "print('sum', sum(remote_parallel_map(abs, range(-5, 5), spinner=False)))")
    with panel_page(chromium, lab_without_cluster) as (page, panel):
        panel.locator(".burla-start").click()
        line = panel.locator(".burla-cluster")
        expect(line).to_contain_text("connected to local cluster ipc://", timeout=20_000)
        address = line.inner_text().split("local cluster ")[1].strip()
        page.goto(f"{lab_without_cluster}/lab/tree/restart.ipynb?token={TOKEN}")
        reopen_panel(page, panel)
        run_cell(page, 0)  # the kernel started now: it has the address
        output = page.locator(".jp-Cell .jp-OutputArea").first
        expect(output).to_contain_text(f"cluster {address}", timeout=60_000)
        expect(output).to_contain_text("sum 25", timeout=60_000)
        panel.locator(".burla-stop").click()
        expect(line).to_contain_text("no cluster", timeout=20_000)
        expect(panel.locator(".burla-hint")).to_contain_text("still point at it")
        panel.locator(".burla-start").click()
        expect(line).to_contain_text(f"connected to local cluster {address}", timeout=20_000)
        expect(panel.locator(".burla-worker")).to_contain_text("local", timeout=20_000)
        run_cell(page, 0)  # the same kernel, its next job
        expect(page.locator(".jp-Cell .jp-InputPrompt").first).to_contain_text("[2]", timeout=60_000)
        expect(output).to_contain_text("sum 25", timeout=60_000)
        expect(output).not_to_contain_text("Error")
