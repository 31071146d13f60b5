"""What a running job shows. In a terminal or a plain script: the calls' output on stdout and stderr as it arrives,
a tqdm progress line on stderr when it is a terminal (done/total, rate, calls failed, the workers much slower than
the rest), and one summary line on stderr when the job ends. In a Jupyter kernel with spinner on: the live widget
of burla_jupyter.widget. Both take the same calls from the client:

    lines(slot, lines)  advance(n, slot, failed, seconds)  failure(index, type_name, message, tb, input_repr)
    env(header)  total_known(total)  tick()  close(state)  job_id(hex)  reconnecting(bool)  name(text)

(slot is "worker id/index"; seconds is the compute time of the n outcomes of one RESULT, None if unknown.)
"""

import os
import statistics
import sys
import time


def create(spinner, total, summary=True):
    """summary=False: no summary line at the end (a caller that prints its own)."""
    if spinner is None:
        return Silent()
    if spinner and in_kernel():
        try:
            from burla_jupyter.widget import JobWidget
        except ImportError:  # no ipywidgets: still show the output
            pass
        else:
            return JobWidget(total)
    return TerminalView(total, bar=spinner and hasattr(sys.stderr, "isatty") and sys.stderr.isatty(),
                        summary=bool(spinner) and summary)


def in_kernel():
    """True inside a Jupyter kernel (not a terminal IPython): there the widget can show."""
    if "IPython" not in sys.modules:
        return False
    from IPython import get_ipython

    return getattr(get_ipython(), "kernel", None) is not None


SLOWER = 1.5  # a worker counts as slow past this many times the typical worker's seconds per call
SLOWER_BY = 0.01  # ...and this many seconds more (a few milliseconds apart is noise, not a slow machine)
KNOWN = "{l_bar}{bar}| {n_fmt}/{total_fmt} [{elapsed}<{remaining}, {rate_fmt}]{extra}"
UNKNOWN = "{desc}: {n_fmt} [{elapsed}, {rate_fmt}]{extra}"


def _bar(**kwargs):
    """A tqdm bar whose format has one more field, {extra}: what burla adds after the rate."""
    from tqdm import tqdm

    class Bar(tqdm):
        extra = ""

        @property
        def format_dict(self):
            return dict(super().format_dict, extra=self.extra)

    return Bar(**kwargs)


class TerminalView:
    """The calls' output as it comes; with bar, a progress line on stderr; with summary, one line at the end on
    stderr (a script's log keeps what the vanished bar showed), except inside a call (a nested job: its summary
    would be a log line of the outer job for every call)."""

    def __init__(self, total, bar, summary=False):
        self.total, self.done, self.failed, self.failures = total, 0, 0, 0
        self.first_failure = None  # (input index, exception type) of the first failed call reported
        self.per_worker = {}  # worker id -> [compute seconds, calls], from the RESULTs that said their seconds
        self.title = ""
        self.started = time.monotonic()
        self.summary = summary and "BURLA_PARENT" not in os.environ
        self.closed = False
        self.extra_at = 0.0  # when the bar's extra text was last worked out
        self.bar = None
        if bar:
            try:
                width = os.get_terminal_size(sys.stderr.fileno()).columns
            except (OSError, ValueError, AttributeError):
                width = 0
            # A terminal that reports no width (some CI and pty setups) would get no bar at all: assume 80x24.
            size = {"dynamic_ncols": True} if width else {"ncols": 80, "nrows": 24}
            self.bar = _bar(total=total, unit="call", desc="burla", file=sys.stderr, leave=False, mininterval=0.1,
                            bar_format=UNKNOWN if total is None else KNOWN, **size)

    def lines(self, slot, lines):
        out = "".join(text + "\n" for _, stream, text in lines if stream == 1)
        err = "".join(text + "\n" for _, stream, text in lines if stream == 2)
        self.write(out, err)

    def env(self, header):
        """A worker preparing the job's environment says what it is doing (a failure comes as the job's error)."""
        if header.get("st") == "failed":
            return
        ready = "ready: " if header.get("st") == "ready" else ""
        self.write("", f"burla: worker {header.get('w')}: environment {str(header.get('k'))[:8]}: {ready}"
                       f"{header.get('m')} ({header.get('t', 0):.1f} s)\n")

    def note(self, text):
        """News about the job's wait (the cluster booting VMs for it); "" when it is over."""
        if text:
            self.write("", f"burla: {text}\n")

    def write(self, out, err):
        if self.bar is not None:
            self.bar.clear()
        if out:
            sys.stdout.write(out)
            sys.stdout.flush()
        if err:
            sys.stderr.write(err)
            sys.stderr.flush()
        if self.bar is not None:
            self.bar.refresh()

    def name(self, text):
        """The job's name (its function's): shown in front of the bar and in the summary."""
        self.title = "".join(c if c.isprintable() else "?" for c in str(text or ""))[:40]
        if self.bar is not None:
            self.bar.set_description(f"burla {self.title}" if self.title else "burla", refresh=False)

    def advance(self, n, slot=None, failed=0, seconds=None):
        """n outcomes came from slot, failed of them failures; seconds: the time they took computing."""
        self.done += n
        self.failed += failed or 0
        calls = max(n, failed or 0)
        if seconds is not None and calls and isinstance(slot, str):
            entry = self.per_worker.setdefault(slot.partition("/")[0], [0.0, 0])
            entry[0] += seconds
            entry[1] += calls
        if self.bar is not None:
            self.update_extra()
            self.bar.update(n)

    def failure(self, index, type_name, message="", tb="", input_repr=""):
        """One failed input (its outcome still comes through advance)."""
        self.failures += 1
        if self.first_failure is None:
            self.first_failure = (index, type_name)

    def slowest(self):
        """The one or two workers meaningfully slower per call than the typical one (the lower median, so that
        of two workers the slow one stands out), slowest first; none with fewer than two workers."""
        averages = {w: s / n for w, (s, n) in self.per_worker.items() if n}
        if len(averages) < 2:
            return []
        typical = statistics.median_low(averages.values())
        slow = [(a, w) for w, a in averages.items() if a > SLOWER * typical and a - typical > SLOWER_BY]
        return [(w, a) for a, w in sorted(slow, reverse=True)[:2]]

    def update_extra(self, force=False):
        now = time.monotonic()
        if not force and now - self.extra_at < 0.25:  # (a RESULT can come a thousand times a second)
            return
        self.extra_at = now
        failed = max(self.failed, self.failures)
        extra = f"  {failed:,} failed" if failed else ""
        slow = self.slowest()
        if slow:
            extra += "  slowest: " + ", ".join(f"{w} ({_per_call(a)})" for w, a in slow)
        self.bar.extra = extra

    def total_known(self, total):
        if self.bar is not None and self.bar.total != total:
            self.bar.total = total
            self.bar.bar_format = UNKNOWN if total is None else KNOWN
            self.bar.refresh()
        self.total = total

    def tick(self):
        if self.bar is not None:  # (elapsed and rate go on while no result comes)
            self.update_extra()
            self.bar.refresh()

    def job_id(self, job_id):
        self.id = job_id

    def reconnecting(self, on):
        """The broker stopped answering (on), or answers again: said once each way, the job waits meanwhile."""
        if on:
            self.write("", f"burla: lost the broker; reconnecting (job {getattr(self, 'id', '?')} keeps running)\n")
        else:
            self.write("", "burla: reconnected\n")

    def summary_line(self, state):
        """The line left when the job ends: "done", "failed" or "cancelled" (another state, none)."""
        took = _duration(time.monotonic() - self.started)
        failed = max(self.failed, self.failures)
        if state == "done":
            text = f"{_calls(self.done)} in {took}, {failed:,} failed"
            if failed and self.first_failure is not None:
                text += f" (the first: {self.first_failure[1]} on input {self.first_failure[0]})"
        elif state in ("failed", "cancelled"):
            of = _calls(self.done) if self.total is None else f"{self.done:,} of {_calls(self.total)}"
            text = f"{state} after {of}" + (f", {failed:,} failed" if failed else "") + f" ({took})"
        else:
            return None
        return f"burla: {self.title + ': ' if self.title else ''}{text}"

    def close(self, state="done"):
        if self.closed:
            return
        self.closed = True
        if self.bar is not None:
            self.bar.close()
        line = self.summary_line(state) if self.summary else None
        if line:
            try:
                sys.stderr.write(line + "\n")
                sys.stderr.flush()
            except (OSError, ValueError):  # (stderr closed: at interpreter exit, a dropped generator's job)
                pass


def _calls(n):
    return f"{n:,} call{'' if n == 1 else 's'}"


def _duration(seconds, unit=" s"):
    """4.9 s, 2m05s, 1h07m (unit: how seconds are written, "s" in the CLI's tables)."""
    if seconds < 60:
        return f"{seconds:.1f}{unit}"
    if seconds < 3600:
        return f"{int(seconds // 60)}m{int(seconds % 60):02d}s"
    return f"{int(seconds // 3600)}h{int(seconds % 3600 // 60):02d}m"


def _per_call(seconds):
    return f"{seconds:.1f} s/call" if seconds >= 0.1 else f"{seconds * 1000:.0f} ms/call"


class Silent:
    """Shows nothing (reading a job's logs, say)."""

    def __getattr__(self, name):
        return lambda *args, **kwargs: None
