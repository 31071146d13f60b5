"""Take the pictures of the notebook's job view in docs/: run one notebook job in a real JupyterLab, in headless
Chromium (Debian's) driven by Playwright, on a cluster of 2 workers with 3 slots each, and save

    docs/widget-live.png      the live view while the job runs (its task stream tab)
    docs/widget-charts.png    what the cell keeps once the job ended: name, counts, the charts
    docs/widget-failures.png  its failures, one opened with its traceback and lines

On the way it checks what only a browser can: the log shows its newest lines; the search box filters them while
the kernel is busy running the job, typing in it runs no notebook shortcut, and it works in the static summary
too; and the notebook, saved and opened again without its kernel, shows that summary rather than "Error
displaying widget: model not found". Run from the repository root:

    .venv/bin/python docs/screenshots.py [OUTPUT_FOLDER]

It reuses the tests' pieces: tests/conftest.py's cluster and tests/test_ui.py's JupyterLab.
"""

import json
import os
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import nbformat

DOCS = Path(__file__).resolve().parent
sys.path.insert(0, str(DOCS.parent / "tests"))

from conftest import broker_only  # noqa: E402
from test_ui import CHROMIUM, TOKEN, start_lab  # noqa: E402

CELL = """from burla import remote_parallel_map
import random, time

def simulate(seed):
    rng = random.Random(seed)
    time.sleep(rng.uniform(0.05, 0.6))
    print(f"sample {seed}: loss {rng.random():.4f}")
    if seed % 53 == 7:
        raise ValueError(f"sample {seed} has no label")
    return seed

results = remote_parallel_map(simulate, range(400), return_exceptions=True)
"""

# The log lines the search leaves visible, and whether each matches (run in the page).
VISIBLE = """(root) => [...root.querySelectorAll('.bl')].filter(e => e.offsetParent !== null)
                                               .map(e => e.textContent)"""
# Whether the newest line of the visible log box is in view (the box follows the tail).
TAIL_IN_VIEW = """(root) => { const lines = [...root.querySelectorAll('.bl')].filter(e => e.offsetParent !== null);
    const last = lines[lines.length - 1], box = last.closest('.widget-html');
    const a = last.getBoundingClientRect(), b = box.getBoundingClientRect();
    return lines.length > 10 && a.bottom <= b.bottom + 1 && a.top >= b.top - 1; }"""


def main(out):
    from playwright.sync_api import expect, sync_playwright

    with tempfile.TemporaryDirectory(prefix="burla-shots-") as tmp, broker_only() as cluster:
        tmp = Path(tmp)
        for name in ("w1", "w2"):
            cluster.start_worker(name, slots=3)
        cluster.wait_for(2, slots=6)
        lab = start_lab(tmp, {"BURLA_CLUSTER": cluster.address})
        url = next(lab)
        try:
            nb = nbformat.v4.new_notebook()
            nb.cells = [nbformat.v4.new_code_cell(CELL)]
            nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
            nbformat.write(nb, tmp / "notebooks" / "simulate.ipynb")
            with sync_playwright() as p:
                browser = p.chromium.launch(executable_path=CHROMIUM, args=[
                    "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking"])
                page = browser.new_page(viewport={"width": 1100, "height": 1300})
                page.goto(f"{url}/lab/tree/simulate.ipynb?token={TOKEN}")
                page.locator(".jp-Notebook .jp-Cell .cm-content").first.click(timeout=60_000)
                opened = page.locator(".jp-SideBar.jp-mod-left .lm-TabBar-tab.lm-mod-current")
                if opened.count():  # fold the file browser away: the notebook gets the width
                    opened.first.click()
                page.locator(".jp-Notebook .jp-Cell .cm-content").first.click()
                page.keyboard.press("Shift+Enter")

                live = page.locator(".jp-OutputArea .burla-job")
                expect(live).to_be_visible(timeout=60_000)
                expect(live.locator(".burla-v-title")).to_contain_text("simulate", timeout=30_000)
                expect(live.locator(".bl").first).to_be_attached(timeout=30_000)
                time.sleep(3)  # some lines, some progress
                box = live.element_handle()
                assert page.evaluate(TAIL_IN_VIEW, box), "the log does not show its newest lines"
                search = live.locator(".burla-v-search")
                cells = page.locator(".jp-Notebook .jp-Cell").count()  # (Shift+Enter added one below)
                # Typed key by key (the kernel is busy with the job: this is the browser alone); "a", "b", "o"
                # and "l" are notebook shortcuts too, which must not act while the box has the focus.
                search.press_sequentially("ab")
                search.fill("")
                search.press_sequentially("loss 0.1", delay=30)
                assert search.input_value() == "loss 0.1"
                assert page.locator(".jp-Notebook .jp-Cell").count() == cells, "typing in the box ran shortcuts"
                time.sleep(1)  # (lines drawn after the search are filtered too)
                shown = page.evaluate(VISIBLE, box)
                assert shown and all("loss 0.1" in t for t in shown), shown
                search.fill("")
                assert len(page.evaluate(VISIBLE, box)) > len(shown)
                live.locator(".lm-TabBar-tab", has_text="timeline").click()
                time.sleep(2)
                live.screenshot(path=str(out / "widget-live.png"))
                print("live view: the tail shows, and the search filters while the kernel is busy")

                summary = page.locator(".jp-OutputArea .burla-summary")
                expect(summary).to_be_visible(timeout=120_000)  # the job ended: the static summary took its place
                assert live.count() == 0
                expect(summary).to_contain_text("400 / 400 calls")
                summary.locator(".burla-v-search").fill("sample 399:")
                shown = page.evaluate(VISIBLE, summary.element_handle())
                assert shown and all("sample 399:" in t for t in shown), shown
                summary.locator(".burla-v-search").fill("")
                charts = summary.locator("details").first
                top, bottom = summary.bounding_box(), charts.bounding_box()
                page.screenshot(path=str(out / "widget-charts.png"), clip={  # the header and the charts
                    "x": top["x"] - 4, "y": top["y"] - 4, "width": top["width"] + 8,
                    "height": bottom["y"] + bottom["height"] - top["y"] + 8})
                failure = summary.locator(".burla-v-failure").first
                failure.locator("summary").click()
                summary.locator(".burla-v-failures").screenshot(path=str(out / "widget-failures.png"))
                assert charts.locator("svg").count() == 4
                print("static summary: charts, failures and a working search")

                # Saved, its kernel gone, opened again: the summary shows (no "Error displaying widget").
                page.keyboard.press("Escape")
                page.keyboard.press("Control+s")
                expect(page.locator(".jp-mod-dirty")).to_have_count(0, timeout=10_000)
                for kernel in json.load(urllib.request.urlopen(f"{url}/api/kernels?token={TOKEN}")):
                    urllib.request.urlopen(urllib.request.Request(
                        f"{url}/api/kernels/{kernel['id']}?token={TOKEN}", method="DELETE"))
                page.reload()
                expect(page.locator(".jp-OutputArea .burla-summary")).to_contain_text("400 / 400 calls",
                                                                                     timeout=60_000)
                time.sleep(2)  # (a widget view would have said its error by now)
                assert "Error displaying widget" not in page.locator(".jp-Notebook").inner_text()
                assert page.locator(".jp-OutputArea .burla-summary svg").count() == 4
                print("saved and reopened without its kernel: the summary shows")
                browser.close()
        finally:
            lab.close()  # (stops JupyterLab and its kernels)
    for name in ("widget-live.png", "widget-charts.png", "widget-failures.png"):
        print(out / name, os.path.getsize(out / name), "bytes")


if __name__ == "__main__":
    main(Path(sys.argv[1]) if len(sys.argv) > 1 else DOCS)
