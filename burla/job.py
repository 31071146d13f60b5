"""burla.Job: a handle on a job by its id, from any process with the job's API key.

    job = remote_parallel_map(f, inputs, detach=True)   # returns once the inputs are on the head's disk
    job.id                                              # keep it: burla.attach(job.id) works from anywhere
    job.status()  job.result(timeout=None)  job.as_completed()  job.logs()  job.cancel()

A detached job's outcomes stay on the head until its retention ends (7 days after the job does, by default), so
result() can be called again, from other processes too. Only the API key that submitted a job sees it.
"""

import re
import time
import typing

from burla import errors, protocol as P
from burla.progress import create as create_view


class JobStatus(typing.NamedTuple):
    id: str
    state: str  # "running", "done", "failed", "cancelled"
    done: int
    total: typing.Optional[int]  # None until every input is in
    failed: int
    started: float  # time.time() of its submission
    elapsed: float  # seconds, to now or to its end
    detached: bool
    reason: typing.Optional[str]  # why it ended, when not "done"


class LogLine(typing.NamedTuple):
    input: int  # the index of the input whose call printed it (-1: not one call's)
    worker: str  # the slot, "worker id/index"
    stream: str  # "stdout" or "stderr"
    text: str


def status_of(record):
    return JobStatus(record["id"], record["state"], record["done"], record.get("total"), record["failed"],
                     record["started"], record["elapsed"], bool(record.get("detached")), record.get("reason"))


class Job:
    def __init__(self, job_id, cluster=None, api_key=None, conn=None):
        from burla import client

        if not isinstance(job_id, str) or not re.fullmatch(r"[0-9a-f]{16}", job_id):
            raise ValueError(f"a job id is 16 hexadecimal digits (as job.id and `burla jobs list` show), not "
                             f"{job_id!r}")
        self.id = job_id
        self._conn = conn or client.connection(cluster, api_key)
        self._results = None

    def __repr__(self):
        return f"<burla.Job {self.id}>"

    def status(self):
        from burla import client

        answer, header = client.request(self._conn, P.JOBS, {"j": bytes.fromhex(self.id)})
        if not header.get("jobs"):
            raise errors.JobNotFoundError(f"the broker has no job {self.id} for this API key")
        return status_of(header["jobs"][0])

    def _stream(self, spinner=False, total=None):
        from burla import client

        return client.Reader(self._conn, bytes.fromhex(self.id), create_view(spinner, total), reader=False)

    @property
    def cluster(self):
        return self._conn.address

    def as_completed(self, spinner=False):
        """The results as they complete (a detached job's from the start, then the rest as they come); a failed
        call raises here as in remote_parallel_map, unless the job was submitted with return_exceptions."""
        __tracebackhide__ = True
        stream = self._stream(spinner)
        try:
            for _, values in stream.runs():
                yield from values
        except Exception as e:
            raise errors.shown(e)
        finally:
            stream.leave()
        state, why = stream.ended
        if state not in ("done", "read"):
            raise (errors.JobCancelledError if state == "cancelled" else errors.BurlaError)(
                why or f"the job ended {state}")

    def result(self, timeout=None, spinner=True):
        """The results in input order once every input has its outcome; TimeoutError after timeout seconds (the
        job goes on). Raises a failed call's exception as remote_parallel_map would."""
        __tracebackhide__ = True
        if self._results is not None:
            return list(self._results)
        deadline = None if timeout is None else time.monotonic() + timeout
        stream = self._stream(spinner)
        results, filled = {}, 0
        try:
            for start, values in stream.runs(deadline):
                for k, value in enumerate(values):
                    results[start + k] = value
                filled += len(values)
        except Exception as e:
            raise errors.shown(e)
        finally:
            stream.leave()
        state, why = stream.ended
        if state == "cancelled":
            raise errors.JobCancelledError(why or "the job was cancelled")
        if state == "failed" and why:
            raise errors.BurlaError(why)
        total = stream.total if stream.total is not None else len(results)
        missing = [i for i in range(total) if i not in results]
        if missing:
            raise errors.BurlaError(
                f"{len(missing)} of the job's {total} outcomes are not on the head (first: input {missing[0]}): the "
                "process that submitted it without detach=True received them")
        self._results = [results[i] for i in range(total)]
        return list(self._results)

    def logs(self, follow=False):
        """Every log line the head keeps for the job: LogLine(input, worker, stream, text), in order. With
        follow=True, a generator of them that goes on until the job ends."""
        if follow:
            return self._follow()
        return self._read_logs(0)[0]

    def _read_logs(self, after):
        from burla import client

        stream = client.Reader(self._conn, bytes.fromhex(self.id), create_view(None, None), logs_only=True,
                               after=after)
        for _ in stream.runs():
            pass
        names = {1: "stdout", 2: "stderr"}
        state = stream.info["st"] if stream.info else stream.ended[0]
        return [LogLine(i, w, names.get(s, str(s)), text) for i, w, s, text in stream.logs], stream.q, state

    def _follow(self, interval=0.5):
        after = 0
        while True:
            lines, after, state = self._read_logs(after)
            yield from lines
            if state != "running":
                return
            time.sleep(interval)

    def cancel(self):
        """Stop the job: queued inputs are dropped and running calls stopped. Its outcomes so far stay readable."""
        sock = self._conn.new_socket()
        try:
            P.send(sock, P.CANCEL, {"j": bytes.fromhex(self.id)})
        finally:
            sock.close(linger=1000)
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            if self.status().state != "running":
                return
            time.sleep(0.05)
        raise errors.BurlaError(f"job {self.id} did not stop within 5 s of its cancel")

    def _ipython_display_(self):
        """In a notebook, a job as a cell's value shows its live widget and streams what is left."""
        from IPython.display import display

        try:
            results = self.result(spinner=True)
        except Exception as e:  # (shown, not raised: a display hook must not fail the cell)
            display(f"burla job {self.id}: {type(e).__name__}: {e}")
            return
        display(f"burla job {self.id}: {len(results)} results (job.result() returns them)")


def attach(job_id, cluster=None, api_key=None):
    """The burla.Job with that id, if the broker has it for this API key (JobNotFoundError if not)."""
    job = Job(job_id, cluster, api_key)
    job.status()
    return job


def jobs(cluster=None, api_key=None):
    """This API key's jobs on the cluster (running, detached, recently ended) as JobStatus, newest first."""
    from burla import client

    conn = client.connection(cluster, api_key)
    _, header = client.request(conn, P.JOBS, {})
    return [status_of(r) for r in header.get("jobs") or ()]
