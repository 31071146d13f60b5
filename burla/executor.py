"""burla.Executor: the cluster behind the standard concurrent.futures interface.

    with burla.Executor(func_cpu=2) as ex:
        futures = [ex.submit(f, x) for x in inputs]

submit() only queues the call: a thread of the executor's own owns the broker connection and sends queued calls
in batches, as remote_parallel_map does, so a loop of many submits costs little more than one job. Calls of one
plain function share one job (its function travels once); any other callable (joblib's batches, each new) travels
with its arguments in a job for such calls. A failed call is its future's exception and the rest go on.
"""

import collections
import concurrent.futures
import itertools
import os
import threading
import time
import types
import weakref

import zmq

from burla import calling, client, errors, protocol as P, serialize
from burla.progress import create as create_view

FUNCTION_JOBS = 16  # plain functions with a job of their own; calls of more go in the job for any callable
PLAIN = (types.FunctionType, types.BuiltinFunctionType, types.MethodType)


class Executor(concurrent.futures.Executor):
    def __init__(self, cluster=None, *, func_cpu=1, func_ram=4, func_gpu=None, max_parallelism=None, retries=0,
                 timeout=None, packages=None, image=None, dockerfile=None, api_key=None, spinner=True):
        self._settings = client.job_settings(func_cpu, func_ram, func_gpu, max_parallelism, retries, timeout,
                                             True, packages, image, dockerfile)
        self._settings["options"]["k"] = 1  # calls may be cancelled one by one
        self._conn = client.connection(cluster, api_key)
        self._spinner = spinner
        self._calls = collections.deque()  # (future, function, args, kwargs) from submit(), for the loop thread
        self._cancels = collections.deque()  # futures cancelled after their call was sent
        self._lock = threading.Lock()
        self._condition = threading.Condition()  # shared by the executor's futures (see Future)
        self._shutdown = False
        self._thread = None
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_r, False)
        os.set_blocking(self._wake_w, False)
        self._woken = False
        self._slots = 0
        self._error = None  # what stopped the loop thread, for later submits
        self._cancel_queued = False  # shutdown(cancel_futures=True): the calls not sent yet are cancelled
        # (the loop thread closes the wake pipe when it ends; this, for an executor that never started one)
        self._pipe_closer = weakref.finalize(self, _close_pipe, self._wake_r, self._wake_w)
        self._pipe_closer.atexit = False

    # ------------------------------------------------------------------ concurrent.futures.Executor
    def submit(self, fn, /, *args, **kwargs):
        if not callable(fn):
            raise TypeError(f"fn must be callable, not {type(fn).__name__}")
        future = Future(self)
        with self._lock:
            if self._shutdown:
                raise RuntimeError("cannot schedule new futures after shutdown")
            if self._error is not None:
                raise self._error
            self._calls.append((future, fn, args, kwargs or None))
            if self._thread is None:
                self._thread = threading.Thread(target=self._loop, daemon=True, name="burla-executor")
                self._thread.start()
        self._wake()
        return future

    def map(self, fn, *iterables, timeout=None, chunksize=1):
        """fn over zip(*iterables), results in order, like the builtin map. Lazy: inputs are read as the results
        are consumed, a bounded distance ahead, so an endless iterable works. timeout: seconds from this call
        until each result is due (TimeoutError). chunksize is accepted and ignored: batches size themselves."""
        end = None if timeout is None else time.monotonic() + timeout
        calls = zip(*iterables)
        ahead = collections.deque()

        def results():
            try:
                while True:
                    while len(ahead) < self._lookahead():
                        args = next(calls, None)
                        if args is None:
                            break
                        ahead.append(self.submit(fn, *args))
                    if not ahead:
                        return
                    future = ahead.popleft()
                    try:
                        result = future.result(None if end is None else max(0.0, end - time.monotonic()))
                    finally:
                        future.cancel()  # (a no-op once done; a call past the timeout is stopped, as the stdlib does)
                    yield result
            finally:
                for future in ahead:
                    future.cancel()

        return results()

    def shutdown(self, wait=True, *, cancel_futures=False):
        with self._lock:
            self._shutdown = True
            if cancel_futures:
                self._cancel_queued = True
                while self._calls:
                    self._calls.popleft()[0].cancel()
            thread = self._thread
        self._wake()
        if wait and thread is not None and thread is not threading.current_thread():
            thread.join()

    # ------------------------------------------------------------------
    @property
    def slots(self):
        """The slots the cluster has for this executor's calls (0 until a job was accepted)."""
        return self._slots

    def _lookahead(self):
        return max(1000, 64 * self._slots)

    def _wake(self):
        if not self._woken:  # one byte wakes the loop; the many submits of a loop write nothing more
            self._woken = True
            with self._lock:  # (never after the loop closed the pipe: its number may be another file's by then)
                if self._pipe_closer.alive:
                    try:
                        os.write(self._wake_w, b"x")
                    except BlockingIOError:
                        pass

    def _cancel_sent(self, future):
        self._cancels.append(future)
        self._wake()

    def _loop(self):
        view = create_view(self._spinner, None)
        jobs = {}  # function (or None, for any callable) -> _Feed
        poller = zmq.Poller()
        poller.register(self._wake_r, zmq.POLLIN)
        submitted = 0
        last_idle = time.monotonic()
        try:
            while True:
                self._woken = False
                try:
                    os.read(self._wake_r, 4096)
                except BlockingIOError:
                    pass
                calls, job = self._calls, None
                while calls:
                    future, fn, args, kwargs = calls.popleft()
                    if job is None or fn is not job.key:
                        key = fn if type(fn) in PLAIN and (fn in jobs or len(jobs) - (None in jobs) < FUNCTION_JOBS) \
                            else None
                        job = jobs.get(key)
                        if job is None:
                            job = jobs[key] = _Feed(self._conn, key, view, self._settings, self._condition)
                            poller.register(job.sock, zmq.POLLIN)
                    job.feed.append((future, (args, kwargs) if job.key is not None else (fn, args, kwargs)))
                    submitted += 1
                cancels = collections.defaultdict(list)
                while self._cancels:
                    future = self._cancels.popleft()
                    cancels[future._job].append(future._index)
                for job, indices in cancels.items():
                    if not job.closed and job in jobs.values():
                        job.cancel_calls(indices)
                if self._cancel_queued:
                    for job in jobs.values():
                        for future, _ in job.feed:
                            future.cancel()
                view.total_known(submitted)
                for key, job in list(jobs.items()):
                    try:
                        job.fill()
                    except Exception as e:
                        self._fail_job(jobs, key, poller, e)
                self._slots = max([job.slots for job in jobs.values()] + [0])
                if self._shutdown and not self._calls and not any(j.busy() for j in jobs.values()):
                    break
                events = dict(poller.poll(250))
                now = time.monotonic()
                for key, job in list(jobs.items()):
                    try:
                        if job.sock in events:
                            job.drain()
                        if now - last_idle >= 0.25:
                            job.idle()
                    except Exception as e:
                        self._fail_job(jobs, key, poller, e)
                if now - last_idle >= 0.25:
                    last_idle = now
        except BaseException as e:  # (burla's own bug: every waiting future hears of it, nothing hangs)
            with self._lock:
                self._error = errors.BurlaError(f"the executor stopped: {type(e).__name__}: {e}")
            for key in list(jobs):
                self._fail_job(jobs, key, poller, self._error)
            while self._calls:
                _settle(self._calls.popleft()[0], exception=self._error)
            raise
        finally:
            for job in jobs.values():
                if not job.closed:
                    job.close(P.END, "done")
            view.close("done" if self._error is None else "failed")
            with self._lock:
                self._pipe_closer()

    def _fail_job(self, jobs, key, poller, error):
        """A job that cannot go on (its environment failed, the broker is gone): its calls fail with why."""
        job = jobs.pop(key)
        try:
            poller.unregister(job.sock)
        except KeyError:
            pass
        if not job.closed:
            job.close(P.CANCEL, "failed")
        for future, _ in job.feed:
            _settle(future, exception=error)
        for future in job.futures.values():
            _settle(future, exception=error)


class Future(concurrent.futures.Future):
    """A call's future. It stays pending until its outcome arrives, so cancel() works on a call that is queued
    or already running on a worker (which stops it); running() is True once its call was sent.

    Futures of one executor share one Condition: a threading.Condition costs more to make than a whole call
    costs burla to run, and a loop of 100,000 submits must stay cheap. A shared condition wakes every waiter at
    each outcome, so result() and exception() wait in a loop until their own future is settled."""

    def __init__(self, executor):  # (what Future.__init__ sets, but the condition)
        self._condition = executor._condition
        self._state, self._result, self._exception = "PENDING", None, None
        self._waiters, self._done_callbacks = [], []
        self._executor, self._job, self._index = executor, None, None

    def running(self):
        with self._condition:
            return self._job is not None and self._state == "PENDING"

    def cancel(self):
        cancelled = super().cancel()
        if cancelled and self._job is not None:
            self._executor._cancel_sent(self)
        return cancelled

    def result(self, timeout=None):
        self._wait(timeout)
        return super().result(0)

    def exception(self, timeout=None):
        self._wait(timeout)
        return super().exception(0)

    def _wait(self, timeout):
        end = None if timeout is None else time.monotonic() + timeout
        with self._condition:
            while self._state in ("PENDING", "RUNNING"):
                left = None if end is None else end - time.monotonic()
                if left is not None and left <= 0:
                    return
                self._condition.wait(left)


def _settle(future, result=None, exception=None):
    if future.set_running_or_notify_cancel():  # (False: it was cancelled; its outcome is dropped)
        if exception is not None:
            future.set_exception(exception)
        else:
            future.set_result(result)


def _settle_many(condition, outcomes):
    """Settle (future, value, failed) outcomes under one hold of the shared condition and one notify, as
    Future.set_result / set_exception would one by one; a cancelled future only tells its waiters."""
    called = []
    with condition:
        for future, value, failed in outcomes:
            state = future._state
            if state == "PENDING":
                future._state = "FINISHED"
                if failed:
                    future._exception = value
                else:
                    future._result = value
                for waiter in future._waiters:
                    (waiter.add_exception if failed else waiter.add_result)(future)
            elif state == "CANCELLED":
                future._state = "CANCELLED_AND_NOTIFIED"
                for waiter in future._waiters:
                    waiter.add_cancelled(future)
            else:
                continue
            if future._done_callbacks:
                called.append(future)
        condition.notify_all()
    for future in called:
        future._invoke_callbacks()


def _close_pipe(*fds):
    for fd in fds:
        try:
            os.close(fd)
        except OSError:
            pass


class _Feed(client.Job):
    """One of an executor's jobs: its inputs are the calls queued for it, sent while credit allows; it is never
    complete before the executor shuts down."""

    def __init__(self, conn, function_, view, settings, condition):
        self.key = function_  # (None: the job for any callable)
        self.feed = collections.deque()  # (future, input) not sent yet
        self.futures = {}  # input index -> future, for calls sent and not answered
        self.condition = condition
        wrapped = calling.Call(function_) if function_ is not None else calling.call_any
        name = client.job_name(function_) if function_ is not None else "Executor calls"
        super().__init__(conn, wrapped, iter(()), spinner=False, view=_Shared(view), name=name, **settings)
        self.total = None
        self.exceptions = ()

    def busy(self):
        return bool(self.feed or self.outstanding)

    def idle(self):
        self.check_accepted()
        super().idle()

    def fill(self):
        window = P.window(self.slots)
        while self.feed and self.away_since is None and self.attaching is None and len(self.outstanding) < window \
                and (self.outstanding_bytes < P.MAX_OUTSTANDING_BYTES or not self.outstanding):
            calls = list(itertools.islice(_live(self.feed), self.batch_size()))
            try:
                packed = serialize.pack_items([value for _, value in calls], self.conn.compress)
            except Exception:  # a call whose arguments cannot be pickled fails alone
                calls = [c for c in calls if _picklable(*c)]
                packed = serialize.pack_items([value for _, value in calls], self.conn.compress) if calls else None
            if packed is None:
                continue
            for k, (future, _) in enumerate(calls):
                future._job, future._index = self, self.sent + k
                self.futures[self.sent + k] = future
            self.send_batch(calls, packed)

    def cancel_calls(self, indices):
        for k in range(0, len(indices), 1 << 16):
            self.send(P.CANCEL, {"j": self.id, "i": indices[k:k + (1 << 16)]})

    def drain(self):
        """Take what arrived, without waiting; settle the futures of the outcomes."""
        for start, values in self.receive(wait=0):
            failed, pop = {id(e) for e in self.exceptions}, self.futures.pop
            outcomes = [(pop(start + k), value, id(value) in failed) for k, value in enumerate(values)
                        if start + k in self.futures]
            _settle_many(self.condition, [(f, _for_future(v) if bad else v, bad) for f, v, bad in outcomes])

    def on_result(self, header, payload):
        self.exceptions = ()
        return super().on_result(header, payload)

    def failed_calls(self, exceptions):
        self.exceptions = exceptions


def _for_future(exc):
    """A failed call's exception as its future holds it: the note names no input index (an executor's calls are
    numbered inside burla only), and no burla frame is shown."""
    notes = getattr(exc, "__notes__", None)
    if notes:
        exc.__notes__ = [n if not n.startswith("[burla] raised by the call on input") else
                         "[burla] raised by a call submitted to burla.Executor" for n in notes]
    return errors.shown(exc)


class _Shared:
    """The executor's one view, as each of its jobs sees it: a job that ends does not close it (the executor
    does, at its shutdown)."""

    def __init__(self, view):
        self.view = view

    def __getattr__(self, name):
        return getattr(self.view, name)

    def close(self, state="done"):
        pass


def _picklable(future, value):
    try:
        serialize.pack_items([value])
        return True
    except Exception as e:
        _settle(future, exception=TypeError(f"the call's arguments could not be pickled: {e}"))
        return False


def _live(feed):
    """The queued calls whose futures are not cancelled, taken from the feed (a cancelled one is settled)."""
    while feed:
        future, value = feed.popleft()
        if future._state == "PENDING":
            yield future, value
        else:
            future.set_running_or_notify_cancel()
