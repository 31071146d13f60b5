"""Burla: run any Python function over many inputs on many machines at once.

    from burla import remote_parallel_map
    outputs = remote_parallel_map(my_function, my_inputs)
"""

import sys

from burla.errors import (BurlaError, CallTimeoutError, ClusterConnectionError, EnvironmentBuildError,
                          JobCancelledError, JobExpiredError, JobNotFoundError, NoCompatibleWorkerError, RemoteError,
                          WorkerDiedError)

__version__ = "0.5.0"
__all__ = ["remote_parallel_map", "Executor", "Job", "attach", "jobs", "BurlaError", "CallTimeoutError", "ClusterConnectionError",
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
    if name == "Executor":
        from burla.executor import Executor

        return Executor
    if name in ("Job", "attach", "jobs"):
        from burla import job

        return getattr(job, name)
    raise AttributeError(f"module 'burla' has no attribute {name!r}")


def _joblib_backend():
    from burla.joblib_backend import register

    register()


class _WhenJoblibLoads:
    """On sys.meta_path: once joblib.parallel is imported, joblib resolves backend="burla" on first use (through
    EXTERNAL_BACKENDS, as it does "dask"), so `import burla` stays fast and never imports joblib itself."""

    done = False

    def find_spec(self, name, path=None, target=None):
        if name != "joblib.parallel" or self.done:
            return None
        self.done = True  # (stays listed, a no-op: removing it could make a concurrent import skip a finder)
        import importlib.util

        spec = importlib.util.find_spec(name)
        if spec is None or not hasattr(spec.loader, "exec_module"):
            return spec
        exec_module = spec.loader.exec_module

        def exec_and_register(module):
            exec_module(module)
            module.EXTERNAL_BACKENDS.setdefault("burla", _joblib_backend)

        spec.loader.exec_module = exec_and_register
        return spec


if "joblib.parallel" in sys.modules:
    sys.modules["joblib.parallel"].EXTERNAL_BACKENDS.setdefault("burla", _joblib_backend)
else:
    sys.meta_path.insert(0, _WhenJoblibLoads())
