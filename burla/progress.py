"""What a running job shows. In a terminal or a plain script: the calls' output on stdout and stderr as it arrives,
and a tqdm progress line (done/total, rate) on stderr when it is a terminal. In a Jupyter kernel with spinner on:
the live widget of burla_jupyter.widget. Both take the same calls from the client:

    lines(slot, lines)  advance(n, slot, failed)  env(header)  total_known(total)  tick()  close(state)
    job_id(hex)  reconnecting(bool)
"""

import os
import sys


def create(spinner, total):
    if spinner is None:
        return Silent()
    if spinner and in_kernel():
        try:
            from burla_jupyter.widget import JobWidget
        except ImportError:  # no ipywidgets: still show the output
            pass
        else:
            return JobWidget(total)
    return TerminalView(total, bar=spinner and hasattr(sys.stderr, "isatty") and sys.stderr.isatty())


def in_kernel():
    """True inside a Jupyter kernel (not a terminal IPython): there the widget can show."""
    if "IPython" not in sys.modules:
        return False
    from IPython import get_ipython

    return getattr(get_ipython(), "kernel", None) is not None


class TerminalView:
    def __init__(self, total, bar):
        self.bar = None
        if bar:
            from tqdm import tqdm

            try:
                width = os.get_terminal_size(sys.stderr.fileno()).columns
            except (OSError, ValueError, AttributeError):
                width = 0
            # A terminal that reports no width (some CI and pty setups) would get no bar at all: assume 80x24.
            size = {"dynamic_ncols": True} if width else {"ncols": 80, "nrows": 24}
            self.bar = tqdm(total=total, unit="call", desc="burla", file=sys.stderr, leave=False, mininterval=0.1,
                            **size)

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

    def advance(self, n, slot=None, failed=0):
        if self.bar is not None:
            self.bar.update(n)

    def total_known(self, total):
        if self.bar is not None and self.bar.total != total:
            self.bar.total = total
            self.bar.refresh()

    def tick(self):
        pass

    def job_id(self, job_id):
        self.id = job_id

    def reconnecting(self, on):
        """The broker stopped answering (on), or answers again: said once each way, the job waits meanwhile."""
        if on:
            self.write("", f"burla: lost the broker; reconnecting (job {getattr(self, 'id', '?')} keeps running)\n")
        else:
            self.write("", "burla: reconnected\n")

    def close(self, state="done"):
        if self.bar is not None:
            self.bar.close()


class Silent:
    """Shows nothing (reading a job's logs, say)."""

    def __getattr__(self, name):
        return lambda *args, **kwargs: None
