"""The live view of a job in a notebook: progress (done/total, rate, ETA, failures), each worker's state, and the
calls' output grouped by worker, in the cell that started the job.

The kernel is busy running the job, so it cannot answer the frontend: everything here is pushed from the kernel
(widget state changes go out on IOPub at once), and choosing which worker's log to read is a Tab, which switches in
the browser alone. Updates are rendered at most every RENDER_INTERVAL seconds, so a job streaming thousands of lines
a second costs the page a few small messages a second.
"""

import collections
import html
import time

import ipywidgets as widgets
from IPython.display import display

RENDER_INTERVAL = 0.1
LOG_LINES = 400  # lines kept per log tab
MAX_WORKER_TABS = 24  # more workers than this share the "all" tab only

STATES = {  # job state -> (bar style, what the header says)
    "running": ("info", "running"),
    "done": ("success", "done"),
    "failed": ("danger", "failed"),
    "cancelled": ("warning", "cancelled"),
}


class Worker:
    __slots__ = ("done", "failed", "state", "log", "seen")

    def __init__(self):
        self.done = self.failed = 0
        self.state = "starting"
        self.log = collections.deque(maxlen=LOG_LINES)
        self.seen = time.monotonic()


class JobBox(widgets.VBox):
    def __repr__(self):  # what a frontend without widgets shows (nbconvert to text, a terminal console)
        return "burla job (live view: open in JupyterLab or Notebook to see progress and logs)"


class JobWidget:
    def __init__(self, total, title="burla"):
        self.total, self.done, self.failed = total, 0, 0
        self.state = "running"
        self.started = time.monotonic()
        self.workers = {}  # worker id -> Worker
        self.all_log = collections.deque(maxlen=LOG_LINES)
        self.rendered, self.dirty = 0.0, True
        self.logs_changed = set()  # workers whose log tab needs drawing again (None: the "all" tab)
        self.title = title
        self.id = None  # the job's id: burla.attach(id) picks it up again, after a kernel restart too
        self.away = False  # the broker does not answer: the job goes on, and we reconnect
        self.header = widgets.HTML()
        self.bar = widgets.IntProgress(min=0, max=max(total or 1, 1), value=0, bar_style="info",
                                       layout=widgets.Layout(width="100%"))
        self.counts = widgets.HTML()
        self.table = widgets.HTML()
        self.logs = widgets.Tab(children=[self.log_view()])
        self.logs.set_title(0, "all workers")
        self.log_views = {}  # worker id -> its HTML in the tab
        self.box = JobBox([self.header, self.bar, self.counts, self.table, self.logs])
        self.box.add_class("burla-job")
        self.render()
        display(self.box)

    @staticmethod
    def log_view():
        return widgets.HTML(layout=widgets.Layout(max_height="16em", overflow="auto"))

    def worker(self, slot):
        name = str(slot or "?").rpartition("/")[0] or str(slot or "?")
        if name not in self.workers:
            self.workers[name] = Worker()
            if len(self.workers) <= MAX_WORKER_TABS:
                view = self.log_view()
                self.log_views[name] = view
                self.logs.children = (*self.logs.children, view)
                self.logs.set_title(len(self.logs.children) - 1, name)
        w = self.workers[name]
        w.seen = time.monotonic()
        return name, w

    # ------------------------------------------------------------------ what the client reports
    def lines(self, slot, lines):
        name, w = self.worker(slot)
        w.state = "running"
        for _, stream, text in lines:
            w.log.append((stream, text))
            self.all_log.append((name, stream, text))
        self.logs_changed.update((name, None))
        self.changed()

    def advance(self, n, slot=None, failed=0):
        name, w = self.worker(slot)
        w.done += n
        w.failed += failed
        w.state = "running"
        self.done += n
        self.failed += failed
        self.changed()

    def env(self, header):
        _, w = self.worker(f"{header.get('w')}/")
        step = "environment ready" if header.get("st") == "ready" else f"preparing environment: {header.get('m')}"
        w.state = step
        self.all_log.append((header.get("w"), 2, f"[environment] {header.get('m')} ({header.get('t', 0):.1f} s)"))
        self.logs_changed.add(None)
        self.changed()

    def total_known(self, total):
        self.total = total
        self.changed()

    def job_id(self, job_id):
        self.id = job_id
        self.changed()

    def reconnecting(self, on):
        self.away = on
        self.render()

    def tick(self):
        if time.monotonic() - self.rendered >= 1.0:  # elapsed time and ETA move on even when nothing arrives
            self.dirty = True
        self.changed()

    def close(self, state="done"):
        self.state = state
        for w in self.workers.values():
            w.state = "idle" if state == "done" else state
        self.render()

    def changed(self):
        self.dirty = True
        if time.monotonic() - self.rendered >= RENDER_INTERVAL:
            self.render()

    # ------------------------------------------------------------------ drawing
    def render(self):
        self.rendered, self.dirty = time.monotonic(), False
        style, word = STATES[self.state]
        elapsed = time.monotonic() - self.started
        if self.away and self.state == "running":
            word = "reconnecting"
        job = f" &middot; job <code>{self.id}</code>" if self.id else ""
        self.header.value = f"<b>{html.escape(self.title)}</b> &middot; {word} &middot; {elapsed:.1f} s{job}"
        self.bar.bar_style = style
        self.bar.max = max(self.total or self.done or 1, 1)
        self.bar.value = min(self.done, self.bar.max)
        rate = self.done / elapsed if elapsed > 0 else 0.0
        parts = [f"{self.done:,} / {self.total:,} calls" if self.total is not None else f"{self.done:,} calls",
                 f"{rate:,.1f} calls/s"]
        if self.state == "running" and self.total and rate > 0:
            parts.append(f"ETA {max(self.total - self.done, 0) / rate:.1f} s")
        parts.append(f"{self.failed:,} failed")
        self.counts.value = " &middot; ".join(parts)
        rows = "".join(
            f"<tr><td>{html.escape(name)}</td><td>{w.done:,}</td><td>{w.failed:,}</td>"
            f"<td>{html.escape(w.state)}</td></tr>" for name, w in sorted(self.workers.items()))
        self.table.value = ("<table><tr><th>worker</th><th>calls done</th><th>failed</th><th>state</th></tr>"
                            f"{rows}</table>") if rows else ""
        if None in self.logs_changed:
            self.logs.children[0].value = pre((f"[{name}] {text}", stream) for name, stream, text in self.all_log)
        for name in self.logs_changed & self.log_views.keys():
            self.log_views[name].value = pre((text, stream) for stream, text in self.workers[name].log)
        self.logs_changed.clear()


def pre(lines):
    """Log lines as HTML, stderr in red."""
    body = "\n".join(f'<span style="color:#c00">{html.escape(t)}</span>' if s == 2 else html.escape(t)
                     for t, s in lines)
    return f'<pre style="margin:0">{body}</pre>'
