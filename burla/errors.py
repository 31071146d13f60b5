"""Exceptions a user of burla may catch."""

import sys
import types


class BurlaError(Exception):
    """Base of the errors burla itself raises."""


class RemoteError(BurlaError):
    """A remote call raised an exception whose type could not be rebuilt here; carries its name and message."""

    def __init__(self, type_name, message):
        super().__init__(f"{type_name}: {message}")
        self.type_name, self.message = type_name, message

    def __reduce__(self):
        return (type(self), (self.type_name, self.message))


class WorkerDiedError(BurlaError):
    """The worker process running these inputs died, every time they were tried."""


class CallTimeoutError(BurlaError, TimeoutError):
    """A call ran longer than the job's timeout= and was stopped."""


class NoCompatibleWorkerError(BurlaError):
    """No worker in the cluster could ever run the call's func_cpu / func_ram / func_gpu."""


class EnvironmentBuildError(BurlaError):
    """The job's Python environment could not be resolved or built; carries the installer's own message."""


class JobCancelledError(BurlaError):
    """The job was cancelled from elsewhere: the JupyterLab panel, or another connection with the same API key."""


class JobExpiredError(JobCancelledError):
    """The job was cancelled because its client was away for longer than the job's lease (BURLA_JOB_LEASE)."""


class JobNotFoundError(BurlaError, LookupError):
    """The broker has no job with that id for this API key (never, another key's, or past its retention)."""


class ClusterConnectionError(BurlaError, ConnectionError):
    """The broker could not be reached, or stopped answering during a job."""


class RemoteTraceback(Exception):
    """Carries the remote traceback text; set as the __cause__ of a re-raised remote exception."""

    def __init__(self, tb):
        super().__init__(tb)
        self.tb = tb

    def __str__(self):
        return self.tb


def shown(exc):
    """exc as the user should see it: a remote call's exception, or burla's own error, without the frames inside
    burla. Raised again, its traceback starts at the caller's line; IPython, which always shows the last frame
    (here burla's raise), draws it through _render_traceback_ (the hook ipyparallel's remote errors use), which
    leaves burla's frames out. Any other exception keeps its frames: it may be burla's bug."""
    if isinstance(exc, BurlaError) or hasattr(exc, "burla_input_index"):
        exc = exc.with_traceback(None)
        if "IPython" in sys.modules:
            try:
                exc._render_traceback_ = _UserFrames(exc)
            except (AttributeError, TypeError):  # (an exception type without a __dict__)
                pass
    return exc


class _UserFrames:
    def __init__(self, exc):
        self.exc = exc

    def __call__(self):
        exc = self.exc
        entries, tb = [], exc.__traceback__
        while tb is not None:
            frame = tb.tb_frame
            if not (frame.f_globals.get("__name__", "").startswith("burla") or frame.f_locals.get("__tracebackhide__")):
                entries.append(tb)
            tb = tb.tb_next
        tb = None
        for entry in reversed(entries):
            tb = types.TracebackType(tb, entry.tb_frame, entry.tb_lasti, entry.tb_lineno)
        from IPython import get_ipython

        shell = get_ipython()
        if shell is None:
            import traceback

            return "".join(traceback.format_exception(type(exc), exc, tb)).splitlines()
        return shell.InteractiveTB.structured_traceback(type(exc), exc, tb)
