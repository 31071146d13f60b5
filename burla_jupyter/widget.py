"""The live view of a job in a notebook: its name, progress (done/total, rate, ETA, failures), charts (calls done
and calls per second over time, busy slots per worker, a task stream of calls per slot), each worker's state, the
calls' output (searchable), and the failed inputs with their tracebacks and lines, in the cell that started it.

The kernel is busy running the job, so it cannot answer the frontend: everything here is pushed from the kernel
(widget state changes go out on IOPub at once), and what the reader chooses happens in the browser alone: tabs
switch there, and the log's search box is an <input> whose inline handler writes one CSS rule that hides the lines
(each carries its text in a data-t attribute) without the match; ipywidgets' HTML runs no <script>, but it sets
innerHTML, whose inline event handlers do run, and the rule holds for lines drawn after it too.

Updates are drawn at most every RENDER_INTERVAL seconds and the charts every CHART_INTERVAL, from bounded data
(charts.Buckets, charts.Timeline), so a job of 100,000 calls and thousands of results costs the page a few small
messages a second.

When the job ends the view is replaced by a static summary in plain HTML (same name, counts, charts, last lines and
failures) and the widgets are closed: a saved notebook then shows the summary without a kernel, rather than
"Error displaying widget: model not found".
"""

import collections
import html
import secrets
import time

import ipywidgets as widgets
from IPython.display import display

from burla_jupyter import charts

RENDER_INTERVAL = 0.2
CHART_INTERVAL = 1.0
LOG_LINES = 400  # lines kept per log tab
SUMMARY_LINES = 200  # of them, in the static summary
LINE_CHARS = 2000  # a longer line is cut
MAX_WORKER_TABS = 24  # more workers than this share the "all" tab only
MAX_BUSY_ROWS = 8  # workers drawn apart in the busy-slots chart; the rest are "others"
INPUT_LINES, INPUTS_KEPT = 50, 256  # lines kept per input, for that many recent inputs (a failure takes its own)
MAX_FAILURES = 100  # failures kept in detail (all are counted)
TB_CHARS, MESSAGE_CHARS, REPR_CHARS = 8000, 1000, 300

STATES = {  # job state -> (bar style, what the header says, colour)
    "running": ("info", "running", "var(--jp-brand-color1, #1976d2)"),
    "done": ("success", "done", "var(--jp-success-color1, #388e3c)"),
    "failed": ("danger", "failed", "var(--jp-error-color1, #d32f2f)"),
    "cancelled": ("warning", "cancelled", "var(--jp-warn-color1, #f57c00)"),
}
TABS = ("log", "progress", "slots", "timeline", "workers", "failures")


class Worker:
    __slots__ = ("done", "failed", "state", "log", "seen")

    def __init__(self):
        self.done = self.failed = 0
        self.state = "starting"
        self.log = collections.deque(maxlen=LOG_LINES)
        self.seen = time.monotonic()


class Slot:
    __slots__ = ("last", "since")

    def __init__(self):
        self.last = None  # when its latest result came (seconds since the job's start)
        self.since = None  # since when it is thought busy (None: idle)


class JobBox(widgets.VBox):
    def __repr__(self):  # what a frontend without widgets shows (nbconvert to text, a terminal console)
        return "burla job (live view: open in JupyterLab or Notebook to see progress and logs)"


class JobWidget:
    def __init__(self, total, title="burla", name=None):
        self.total, self.done, self.failed = total, 0, 0
        self.state = "running"
        self.closed = False
        self.started = time.monotonic()
        self.ended = None
        self.workers = {}  # worker id -> Worker
        self.slots = {}  # slot -> Slot
        self.in_flight = 0  # slots thought busy
        self.all_log = collections.deque(maxlen=LOG_LINES)
        self.input_lines = collections.OrderedDict()  # input index -> deque of (stream, text), recent inputs
        self.failures = []  # dicts: index, type, message, tb, input, lines
        self.failure_at = {}  # input index -> its dict in failures (lines after the failure join it)
        self.failures_seen = 0
        self.counts_over_time = charts.Buckets()  # rows "ok", "failed": calls that ended in each bucket
        self.busy = charts.Buckets()  # a row per worker (MAX_BUSY_ROWS, then "others"): busy slot-seconds
        self.busy_names = []
        self.timeline = charts.Timeline()
        self.rendered = self.charted = 0.0
        self.dirty = True
        self.logs_changed = set()  # workers whose log tab needs drawing again (None: the "all" tab)
        self.failures_changed = False
        self.title = name or title
        self.id = None  # the job's id: burla.attach(id) picks it up again, after a kernel restart too
        self.away = False  # the broker does not answer: the job goes on, and we reconnect
        self.waiting = ""  # the cluster is booting VMs for the job (NOTE)
        # A class of this job's own, for its search rule. (The view's other classes are burla-v-*: the panel's
        # stylesheet styles its own burla-* classes on the whole page.)
        self.key = f"burla-k{secrets.token_hex(4)}"
        self.header = widgets.HTML()
        self.bar = widgets.IntProgress(min=0, max=max(total or 1, 1), value=0, bar_style="info",
                                       layout=widgets.Layout(width="100%"))
        self.counts = widgets.HTML()
        self.search = widgets.HTML(search_box(self.key))  # never redrawn: what is typed stays
        self.logs = widgets.Tab(children=[self.log_view()])
        self.logs.set_title(0, "all workers")
        self.log_views = {}  # worker id -> its HTML in the tab
        self.progress_chart, self.slots_chart, self.timeline_chart = widgets.HTML(), widgets.HTML(), widgets.HTML()
        self.table, self.failure_list = widgets.HTML(), widgets.HTML("<i>no failures</i>")
        self.tabs = widgets.Tab(children=[widgets.VBox([self.search, self.logs]), self.progress_chart,
                                          self.slots_chart, self.timeline_chart, self.table, self.failure_list])
        for i, title_ in enumerate(TABS):
            self.tabs.set_title(i, title_)
        self.box = JobBox([self.header, self.bar, self.counts, self.tabs])
        self.box.add_class("burla-job")
        self.box.add_class(self.key)
        self.render()
        self.handle = display(self.box, display_id=True)

    @staticmethod
    def log_view():
        # column-reverse: the box starts scrolled to its bottom and stays there as lines come (the tail shows)
        return widgets.HTML(layout=widgets.Layout(max_height="16em", overflow="auto", display="flex",
                                                  flex_flow="column-reverse"))

    def now(self):
        return time.monotonic() - self.started

    def worker(self, slot):
        name = worker_of(slot)
        if name not in self.workers:
            self.workers[name] = Worker()
            if len(self.workers) <= MAX_WORKER_TABS:
                view = self.log_view()
                self.log_views[name] = view
                self.logs.children = (*self.logs.children, view)
                self.logs.set_title(len(self.logs.children) - 1, name)
            if len(self.busy_names) < MAX_BUSY_ROWS:
                self.busy_names.append(name)
            elif "others" not in self.busy_names:
                self.busy_names.append("others")
        w = self.workers[name]
        w.seen = time.monotonic()
        return name, w

    def slot(self, slot):
        s = self.slots.get(slot)
        if s is None:
            s = self.slots[slot] = Slot()
        return s

    def busy_row(self, name):
        return name if name in self.busy_names else "others"

    def set_busy(self, s, since):
        self.in_flight += (since is not None) - (s.since is not None)
        s.since = since

    # ------------------------------------------------------------------ what the client reports
    def lines(self, slot, lines):
        name, w = self.worker(slot)
        w.state = "running"
        if is_slot(slot):
            s = self.slot(slot)
            if s.since is None and not self.closed:  # it is running a call: since its last result, or now
                self.set_busy(s, s.last if s.last is not None else self.now())
        for index, stream, text in lines:
            text = text if len(text) <= LINE_CHARS else text[:LINE_CHARS] + " [...]"
            w.log.append((stream, text))
            self.all_log.append((name, stream, text))
            if index is None or index < 0:
                continue
            failure = self.failure_at.get(index)
            if failure is not None:
                if len(failure["lines"]) < INPUT_LINES:
                    failure["lines"].append((stream, text))
                    self.failures_changed = True
                continue
            kept = self.input_lines.get(index)
            if kept is None:
                kept = self.input_lines[index] = collections.deque(maxlen=INPUT_LINES)
                if len(self.input_lines) > INPUTS_KEPT:
                    self.input_lines.popitem(last=False)
            kept.append((stream, text))
        self.logs_changed.update((name, None))
        self.changed()

    def advance(self, n, slot=None, failed=0, seconds=None):
        name, w = self.worker(slot)
        w.done += n
        w.failed += failed
        w.state = "running"
        self.done += n
        self.failed += failed
        now = self.now()
        self.counts_over_time.add("ok", now, max(n - failed, 0))
        if failed:
            self.counts_over_time.add("failed", now, failed)
        if is_slot(slot):
            s = self.slot(slot)
            if seconds is not None:
                start = now - seconds
            else:  # (a client that does not say) since it was last seen busy
                start = s.since if s.since is not None else s.last if s.last is not None else now
            start = min(max(start, 0.0), now)
            self.busy.add_span(self.busy_row(name), start, now)
            ok = max(n - failed, 0)
            split = start + (now - start) * ok / max(ok + failed, 1)  # the batch's ok part, then its failed part
            if ok:
                self.timeline.add(slot, start, split, "ok", ok)
            if failed:
                self.timeline.add(slot, split, now, "failed", failed)
            s.last = now
            # Another call follows on this slot unless the calls left are fewer than the other busy slots.
            left = None if self.total is None else self.total - self.done
            others = self.in_flight - (s.since is not None)
            self.set_busy(s, now if not self.closed and (left is None or left > others) else None)
        self.changed()

    def failure(self, index, type_name, message="", tb="", input_repr=""):
        """One failed input: its exception, remote traceback, a short repr of it, and the lines it printed."""
        self.failures_seen += 1
        if len(self.failures) < MAX_FAILURES:
            kind = str(type_name)
            kind = kind[len("builtins."):] if kind.startswith("builtins.") else kind
            record = {"index": index, "type": kind, "message": cut(str(message or ""), MESSAGE_CHARS),
                      "tb": str(tb or "")[-TB_CHARS:], "input": cut(str(input_repr or ""), REPR_CHARS),
                      "lines": list(self.input_lines.pop(index, ()))}
            self.failures.append(record)
            if index is not None:
                self.failure_at[index] = record
        self.failures_changed = True
        self.changed()

    def name(self, text):
        self.title = str(text)
        self.changed()

    def env(self, header):
        _, w = self.worker(f"{header.get('w')}/")
        step = "environment ready" if header.get("st") == "ready" else f"preparing environment: {header.get('m')}"
        w.state = step
        self.all_log.append((header.get("w"), 2, f"[environment] {header.get('m')} ({header.get('t', 0):.1f} s)"))
        self.logs_changed.add(None)
        self.changed()

    def note(self, text):
        self.waiting = str(text)
        if text:
            self.all_log.append((None, 2, f"[cluster] {text}"))
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
        if not self.closed:
            self.render()

    def tick(self):
        if self.closed:
            return
        if time.monotonic() - self.rendered >= 1.0:  # elapsed time, ETA and the charts move on when nothing comes
            self.dirty = True
        if self.dirty and time.monotonic() - self.rendered >= RENDER_INTERVAL:
            self.render()

    def close(self, state="done"):
        """The job ended (done, failed, cancelled) or this view stopped following it (running). The first end
        is the one shown: a cancelled job stays cancelled whatever is reported after."""
        if self.closed:
            return
        self.closed, self.ended = True, self.now()
        self.state = state if state in STATES else "failed"
        for s in self.slots.values():
            s.since = None
        self.in_flight = 0
        for w in self.workers.values():
            w.state = "idle" if state in ("done", "running") else state
        self.render_status()
        try:
            summary = self.summary()
        except Exception as e:  # (never fail the job's cell for its picture)
            summary = {"text/plain": f"burla job {self.title}: {self.state} ({type(e).__name__}: {e})"}
            summary["text/html"] = f"<pre>{html.escape(summary['text/plain'])}</pre>"
        try:
            if self.handle is not None:  # (None: no IPython display, nothing is shown)
                self.handle.update(summary, raw=True)  # the live view's place: plain HTML, shown without a kernel
            for w in self.all_widgets():
                w.close()
        except Exception:  # (the kernel going away, say: the live view stays as it was; the job's error matters)
            pass

    def all_widgets(self):
        found, todo = [], [self.box]
        while todo:
            w = todo.pop()
            found.append(w)
            todo.extend(getattr(w, "children", ()))
            todo.extend(x for x in (getattr(w, "layout", None), getattr(w, "style", None)) if x is not None)
        return found

    def changed(self):
        self.dirty = True
        if time.monotonic() - self.rendered >= RENDER_INTERVAL and not self.closed:
            self.render()

    # ------------------------------------------------------------------ drawing
    def elapsed(self):
        return self.ended if self.ended is not None else self.now()

    def word(self):
        word = STATES[self.state][1]
        if self.state == "running":
            word = "stopped watching (the job goes on)" if self.closed else "reconnecting" if self.away else \
                self.waiting or word
        return word

    def header_html(self):
        color = STATES[self.state][2]
        job = (f' <small style="opacity:.6">job <code title="burla.attach(id) picks the job up again">'
               f'{html.escape(self.id)}</code></small>') if self.id else ""
        return (f'<span class="burla-v-title"><b>{html.escape(self.title)}</b></span> &middot; '
                f'<span class="burla-v-state" style="color:{color};font-weight:bold">{html.escape(self.word())}</span>'
                f' &middot; {self.elapsed():.1f} s{job}')

    def counts_text(self):
        elapsed = self.elapsed()
        rate = self.done / elapsed if elapsed > 0 else 0.0
        parts = [f"{self.done:,} / {self.total:,} calls" if self.total is not None else f"{self.done:,} calls",
                 f"{rate:,.1f} calls/s"]
        if self.state == "running" and not self.closed and self.total and rate > 0:
            parts.append(f"ETA {max(self.total - self.done, 0) / rate:.1f} s")
        parts.append(f"{self.failed_count():,} failed")
        return " &middot; ".join(parts)

    def failed_count(self):
        return max(self.failed, self.failures_seen)

    def render_status(self):
        self.rendered, self.dirty = time.monotonic(), False
        self.header.value = self.header_html()
        self.bar.bar_style = STATES[self.state][0]
        self.bar.max = max(self.total or self.done or 1, 1)
        self.bar.value = min(self.done, self.bar.max)
        self.counts.value = self.counts_text()

    def render(self):
        self.render_status()
        if None in self.logs_changed:
            self.logs.children[0].value = log_html(self.all_log, tagged=True)
        for name in self.logs_changed & self.log_views.keys():
            self.log_views[name].value = log_html(self.workers[name].log)
        self.logs_changed.clear()
        title = f"failures ({self.failed_count():,})" if self.failed_count() else "failures"
        if self.failures_changed or self.tabs.titles[5] != title:  # (counted failures may come without details)
            self.failures_changed = False
            self.failure_list.value = self.failures_html()
            self.tabs.set_title(5, title)
        if time.monotonic() - self.charted >= CHART_INTERVAL:
            self.charted = time.monotonic()
            progress, rate, busy, stream = self.charts()
            self.progress_chart.value = f'<div style="display:flex;flex-wrap:wrap;gap:8px">{progress}{rate}</div>'
            self.slots_chart.value = busy
            self.timeline_chart.value = stream
            self.table.value = self.table_html()

    def charts(self):
        now = max(self.elapsed(), 1e-3)
        running = [(slot, s.since) for slot, s in self.slots.items() if s.since is not None]
        busy = self.busy
        if running:  # the calls running now count as busy too (until their result says how long they took)
            busy = busy.copy()
            for slot, since in running:
                busy.add_span(self.busy_row(worker_of(slot)), since, now)
        return (charts.progress_svg(self.counts_over_time, now, self.total),
                charts.rate_svg(self.counts_over_time, now),
                charts.busy_svg(busy, now, self.busy_names),
                charts.timeline_svg(self.timeline, now, running))

    def table_html(self):
        rows = "".join(
            f"<tr><td>{html.escape(name)}</td><td>{w.done:,}</td><td>{w.failed:,}</td>"
            f"<td>{html.escape(w.state)}</td></tr>" for name, w in sorted(self.workers.items()))
        return ("<table><tr><th>worker</th><th>calls done</th><th>failed</th><th>state</th></tr>"
                f"{rows}</table>") if rows else "<i>no workers yet</i>"

    def failures_html(self):
        if not self.failed_count():
            return "<i>no failures</i>"
        items = []
        for f in sorted(self.failures, key=lambda f: (f["index"] is None, f["index"] or 0)):  # in input order
            what = f"{f['type']}: {f['message']}" if f["message"] else f["type"]
            parts = [f'<summary><b>input {f["index"]}</b> &middot; {html.escape(what)}</summary>']
            if f["input"]:
                parts.append(f"<div>input: <code>{html.escape(f['input'])}</code></div>")
            if f["tb"]:
                parts.append(f'<pre style="margin:2px 0;font-size:90%;overflow-x:auto">{html.escape(f["tb"])}</pre>')
            if f["lines"]:
                parts.append(f"<div>its lines:</div>{log_html(f['lines'])}")
            items.append(f'<details class="burla-v-failure">{parts[0]}<div style="margin:0 0 6px 1.2em">'
                         f'{"".join(parts[1:])}</div></details>')
        more = self.failed_count() - len(self.failures)
        if more > 0:
            items.append(f"<i>{more:,} more failed" + (" (the first ones are listed)" if self.failures else
                                                       ": their details are not reported") + "</i>")
        return f'<div style="max-height:20em;overflow:auto">{"".join(items)}</div>'

    def summary(self):
        """What the cell keeps once the job ended: plain HTML (and text), the same pictures and facts."""
        color = STATES[self.state][2]
        fraction = min(self.done / max(self.total or self.done or 1, 1), 1.0)
        bar = (f'<div style="background-color:#e0e0e0;height:6px;margin:3px 0;border-radius:3px">'
               f'<div style="background-color:{color};width:{100 * fraction:.1f}%;height:6px;border-radius:3px">'
               "</div></div>")
        progress, rate, busy, stream = self.charts()
        sections = [f'<details open><summary>charts</summary><div style="display:flex;flex-wrap:wrap;gap:8px">'
                    f"{progress}{rate}{busy}{stream}</div></details>"]
        if self.failed_count():
            sections.append(f'<details open class="burla-v-failures"><summary>failures '
                            f"({self.failed_count():,})</summary>{self.failures_html()}</details>")
        lines = list(self.all_log)[-SUMMARY_LINES:]
        if lines:
            sections.append(
                f"<details open><summary>log: the last {len(lines):,} lines</summary>{search_box(self.key)}"
                '<div style="max-height:16em;overflow:auto;display:flex;flex-direction:column-reverse">'
                f"{log_html(lines, tagged=True)}</div></details>")
        sections.append(f"<details><summary>workers ({len(self.workers)})</summary>{self.table_html()}</details>")
        text = (f"burla job {self.title}: {self.word()}, {self.counts_text().replace(' &middot; ', ', ')}, "
                f"{self.elapsed():.1f} s" + (f" (job {self.id})" if self.id else ""))
        body = (f'<div class="burla-summary {self.key}" data-state="{self.state}">'
                f"<div>{self.header_html()}</div>{bar}<div>{self.counts_text()}</div>{''.join(sections)}</div>")
        return {"text/html": body, "text/plain": text}


def worker_of(slot):
    return str(slot or "?").rpartition("/")[0] or str(slot or "?")


def is_slot(slot):
    """A real slot ("worker/index"), not a worker alone (environment messages) or nothing."""
    return isinstance(slot, str) and "/" in slot and not slot.endswith("/")


def cut(text, limit):
    return text if len(text) <= limit else text[:limit] + " [...]"


def search_box(key):
    """A search box that filters this job's log lines in the browser: its handler writes a CSS rule hiding the
    lines whose data-t lacks the text (case-insensitive) into the <style> beside it; it needs no kernel."""
    js = ("var v=this.value.replace(/[\"\\\\]/g,'\\\\$&');this.nextElementSibling.textContent=v?"
          f"'.{key} .bl:not([data-t*=\"'+v+'\" i]){{display:none}}':''")
    return (f'<input type="search" class="burla-v-search" placeholder="search the log" '
            f'style="width:16em;margin:2px 0" oninput="{html.escape(js, quote=True)}"><style></style>')


def log_html(lines, tagged=False):
    """Log lines as HTML, stderr in red; each line a span carrying its text in data-t (what the search matches).
    tagged: the lines are (worker, stream, text), shown with their worker."""
    out = []
    for line in lines:
        if tagged:
            name, stream, text = line
            text = f"[{name}] {text}"
        else:
            stream, text = line
        t = html.escape(text)
        red = ' style="color:var(--jp-error-color1, #c00)"' if stream == 2 else ""
        out.append(f'<span class="bl" data-t="{t}"{red}>{t}\n</span>')
    return f'<pre style="margin:0">{"".join(out)}</pre>'
