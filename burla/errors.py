"""Exceptions a user of burla may catch."""


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
