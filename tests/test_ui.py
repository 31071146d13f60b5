"""The JupyterLab panel in a real JupyterLab, driven in headless Chromium (Debian's) by Playwright: open the panel,
run a job from a notebook, see workers, progress and log lines appear, then cancel the job from the panel; pick a
finished detached job up in a new notebook cell from the panel, and copy its id."""

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request

import nbformat
import pytest

from burla.client import cluster_state

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BUILT = os.path.join(ROOT, "burla_jupyter", "labextension")
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
TOKEN = "burla-ui-test"
SCREENSHOT = os.environ.get("BURLA_SCREENSHOT")  # where to save the panel during the job (docs/panel.png)

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


def test_panel_shows_a_notebook_job_and_cancels_it(lab, cluster, tmp_path):
    with panel_page(lab, "lab/tree/job.ipynb") as (page, panel):
        expect(panel.locator(".burla-cluster")).to_contain_text(f"connected to {cluster.address}", timeout=20_000)
        expect(panel.locator(".burla-worker")).to_contain_text("w1")

        page.locator(".jp-Notebook .jp-Cell .cm-content").first.click(timeout=60_000)
        page.keyboard.press("Shift+Enter")  # run the cell: the job starts in the notebook's kernel
        running = panel.locator(".burla-job-running")
        expect(running).to_be_visible(timeout=60_000)
        expect(panel.locator(".burla-log")).to_contain_text("ui line", timeout=20_000)
        expect(panel.locator(".burla-worker")).to_contain_text("2/2 busy")
        expect(running.locator(".burla-counts")).to_contain_text(" / 60 calls", timeout=10_000)
        time.sleep(1.5)  # some progress to show
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


def test_attach_a_detached_job_in_a_new_cell(own_lab, own_cluster):
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

    with panel_page(own_lab, "lab/tree/job.ipynb", permissions=["clipboard-read", "clipboard-write"]) as (page, panel):
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
        page.keyboard.press("Shift+Enter")  # run it, in the notebook's kernel (a fresh one)
        expect(cells.nth(1).locator(".jp-OutputArea .burla-job")).to_be_visible(timeout=60_000)  # the live view
        expect(cells).to_have_count(3)  # (Shift+Enter on the last cell adds one, in edit mode)
        page.keyboard.type("print('got', results)")
        page.keyboard.press("Shift+Enter")
        expect(cells.nth(2).locator(".jp-OutputArea")).to_contain_text(f"got {[3 * x for x in range(10)]}",
                                                                     timeout=60_000)

        row.locator(".burla-copy").click()
        expect(panel.locator(".burla-notice")).to_contain_text(f"copied job id {job.id}")
        assert page.evaluate("navigator.clipboard.readText()") == job.id


@contextlib.contextmanager
def panel_page(lab, path="lab", permissions=()):
    """Headless Chromium on a JupyterLab page with the Burla panel open: (page, panel)."""
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=[
            "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
            "--disable-component-update", "--disable-sync"])
        try:
            context = browser.new_context(viewport={"width": 1400, "height": 900})
            if permissions:
                context.grant_permissions(list(permissions), origin=lab)
            page = context.new_page()
            page.goto(f"{lab}/{path}?token={TOKEN}")
            page.locator('.jp-LabShell [data-id="burla-panel"]').click(timeout=60_000)  # the sidebar tab
            yield page, page.locator("#burla-panel")
        finally:
            browser.close()


def test_start_and_stop_the_local_cluster_from_the_panel(lab_without_cluster):
    with panel_page(lab_without_cluster) as (page, panel):
        expect(panel.locator(".burla-cluster")).to_contain_text("not connected: no cluster", timeout=20_000)
        panel.locator(".burla-start").click()
        expect(panel.locator(".burla-cluster")).to_contain_text("connected to local cluster ipc://",
                                                                timeout=20_000)
        expect(panel.locator(".burla-worker")).to_contain_text("local", timeout=20_000)
        panel.locator(".burla-stop").click()
        expect(panel.locator(".burla-cluster")).to_contain_text("no cluster", timeout=20_000)
        expect(panel.locator(".burla-start")).to_be_visible()


def test_panel_keeps_up_with_a_big_job(lab, cluster):
    """A job of 100,000 calls that each print a line: the page keeps drawing (no long freeze of its main thread)
    and the panel ends at 100,000 done."""
    import threading

    from burla import remote_parallel_map

    with panel_page(lab) as (page, panel):
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
        # the tail is the last lines (they trail the counts on a loaded machine: the page draws them in batches)
        expect(panel.locator(".burla-log")).to_contain_text("99999", timeout=30_000)
        gap = page.evaluate("window.burlaGap")
        print(f"longest frame gap during the job: {gap:.0f} ms")
        # A frozen page stops drawing for as long as it chews (tens of seconds for 100,000 unthrottled lines);
        # the bound is loose because this 2-core machine also runs the cluster, JupyterLab and the browser.
        assert gap < 5000, f"the page stopped drawing for {gap:.0f} ms"
