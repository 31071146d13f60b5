"""joblib (and so scikit-learn) on a Burla cluster.

    import burla, joblib
    with joblib.parallel_config(backend="burla"):   # keyword arguments here go to burla.Executor
        joblib.Parallel(n_jobs=-1)(joblib.delayed(f)(x) for x in xs)

joblib cuts the calls into batches (BatchedCalls objects) and hands each to submit(); each is one call on a
burla.Executor, which lives for one Parallel call (or one `with Parallel(...)` block). A failed call comes back as
its own exception type (the Executor rebuilds it), so joblib and scikit-learn handle it as they would a local one.
`import burla` tells joblib about the name lazily, without importing joblib; register() does it explicitly.
"""

import threading
import time

from joblib._parallel_backends import AutoBatchingMixin, ParallelBackendBase, SequentialBackend, ThreadingBackend
from joblib.parallel import BatchedCalls, register_parallel_backend

# What Parallel passes to every backend's configure(): settings of joblib's local pools, none of them burla's.
JOBLIB_SETTINGS = {"prefer", "require", "max_nbytes", "temp_folder", "mmap_mode", "verbose", "context",
                   "idle_worker_timeout"}
SLOTS_WAIT = 10.0  # seconds effective_n_jobs() waits to hear the cluster's slots (none yet: it counts on two)


def register():
    """Make `joblib.parallel_config(backend="burla")` and `Parallel(backend="burla")` mean the Burla cluster."""
    register_parallel_backend("burla", BurlaBackend)


def new_executor(**kwargs):
    from burla.executor import Executor

    return Executor(**kwargs)


class BurlaBackend(AutoBatchingMixin, ParallelBackendBase):
    """A joblib backend whose workers are the cluster's slots. Keyword arguments are burla.Executor's (cluster=,
    func_cpu=, func_ram=, func_gpu=, max_parallelism=, retries=, timeout=, packages=, image=, spinner=, ...)."""

    supports_retrieve_callback = True  # results arrive through future callbacks: also timeout= and generators
    supports_timeout = True
    supports_return_generator = True
    supports_sharedmem = False  # require="sharedmem" falls back to joblib's threads, as it must
    uses_threads = False
    default_n_jobs = -1  # no n_jobs given (scikit-learn's n_jobs=None): the whole cluster

    def __init__(self, nesting_level=None, inner_max_num_threads=None, **executor_kwargs):
        super().__init__(nesting_level=nesting_level, inner_max_num_threads=inner_max_num_threads)
        self.executor_kwargs = executor_kwargs
        self.call_kwargs = dict(executor_kwargs)  # for the current Parallel call: with its own arguments
        self.executor = None
        self.futures = set()  # not done yet: cancelled when joblib aborts
        self.lock = threading.Lock()  # submit runs in joblib's callback threads too

    # ------------------------------------------------------------------ sizing
    def configure(self, n_jobs=1, parallel=None, prefer=None, require=None, **backend_kwargs):
        self.parallel = parallel
        self.call_kwargs = {**self.executor_kwargs,
                            **{k: v for k, v in backend_kwargs.items() if k not in JOBLIB_SETTINGS}}
        if n_jobs == 1:
            return 1  # (joblib then runs the calls here, one by one, as with every backend)
        if n_jobs is not None and n_jobs > 1:
            self.call_kwargs.setdefault("max_parallelism", n_jobs)  # n_jobs=4 means four calls at once, as locally
        self.get_executor()  # the call's, for its batches
        return self.effective_n_jobs(n_jobs)

    def effective_n_jobs(self, n_jobs):
        if n_jobs == 0:
            raise ValueError("n_jobs == 0 in Parallel has no meaning")
        if n_jobs == 1:
            return 1
        if n_jobs is None:
            n_jobs = self.default_n_jobs
        slots = self.slots()
        n = max(slots + 1 + n_jobs, 1) if n_jobs < 0 else min(n_jobs, slots or n_jobs)
        # 1 would make joblib run everything in this process: on a one-slot (or still empty) cluster, keep to it
        return max(n, 2)

    def slots(self):
        """The cluster's slots for these calls: the current call's executor's, or outside a call (scikit-learn
        asks joblib.effective_n_jobs() to split work) those of an executor made only to ask."""
        if self.executor is not None:
            return slots_of(self.executor)
        executor = new_executor(**dict(self.call_kwargs, spinner=False))
        try:
            return slots_of(executor)
        finally:
            executor.shutdown(wait=True)  # (its one call is a batch of none: over in a moment)

    # ------------------------------------------------------------------ running
    def get_executor(self):
        with self.lock:
            if self.executor is None:
                self.executor = new_executor(**self.call_kwargs)
            return self.executor

    def submit(self, func, callback=None):
        future = self.get_executor().submit(func)
        self.futures.add(future)
        future.add_done_callback(self.futures.discard)
        if callback is not None:
            future.add_done_callback(callback)
        return future

    apply_async = submit  # the name joblib < 1.5 calls

    def retrieve_result_callback(self, future):
        return future.result()

    def abort_everything(self, ensure_ready=True):
        # joblib reads none of the outstanding results: cancel them, which also stops the calls running on
        # workers (within a second), so the cluster is free when the error is raised. (ensure_ready: the next
        # submit starts a new executor.)
        for future in list(self.futures):
            future.cancel()
        self.close()

    def terminate(self):
        self.close()
        self.reset_batch_stats()

    def close(self):
        with self.lock:
            executor, self.executor = self.executor, None
        if executor is not None:
            executor.shutdown(wait=True, cancel_futures=True)

    # ------------------------------------------------------------------ nesting
    def get_nested_backend(self):
        # A Parallel inside a call stays in that call's slot, as with joblib's other distributed backends: threads
        # for a job that gave each call several CPUs, else one by one.
        level = (self.nesting_level or 0) + 1
        cpus = self.call_kwargs.get("func_cpu", 1)
        if level == 1 and isinstance(cpus, (int, float)) and cpus >= 2:
            return ThreadingBackend(nesting_level=level), int(cpus)
        return SequentialBackend(nesting_level=level), None


def slots_of(executor):
    """An executor learns its slots when the cluster accepts its first call: send one that does nothing (a batch
    of no calls, so it goes in the job joblib's batches use) and wait for them."""
    if not executor.slots:
        probe = executor.submit(BatchedCalls([], (SequentialBackend(), None)))
        deadline = time.monotonic() + SLOTS_WAIT
        while not executor.slots and not probe.done() and time.monotonic() < deadline:
            time.sleep(0.005)
        if probe.done() and probe.exception() is not None:
            raise probe.exception()  # (no worker can ever run such calls, the cluster is not there, ...)
    return executor.slots
