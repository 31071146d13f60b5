"""Burla: run any Python function over many inputs on many machines at once.

    from burla import remote_parallel_map
    outputs = remote_parallel_map(my_function, my_inputs)
"""

from burla.errors import (BurlaError, CallTimeoutError, ClusterConnectionError, EnvironmentBuildError,
                          JobCancelledError, JobExpiredError, JobNotFoundError, NoCompatibleWorkerError, RemoteError,
                          WorkerDiedError)

__version__ = "0.3.0"
__all__ = ["remote_parallel_map", "Job", "attach", "jobs", "BurlaError", "CallTimeoutError", "ClusterConnectionError",
           "EnvironmentBuildError", "JobCancelledError", "JobExpiredError", "JobNotFoundError", "NoCompatibleWorkerError",
           "RemoteError", "WorkerDiedError"]


def load_ipython_extension(ipython):
    """`%load_ext burla`: the %%burla and %burla magics (see burla_jupyter)."""
    from burla_jupyter import load_ipython_extension as load

    load(ipython)


def __getattr__(name):
    # The client is imported on first use: executors import this package too, and start faster without it.
    if name == "remote_parallel_map":
        from burla.client import remote_parallel_map

        return remote_parallel_map
    if name in ("Job", "attach", "jobs"):
        from burla import job

        return getattr(job, name)
    raise AttributeError(f"module 'burla' has no attribute {name!r}")
