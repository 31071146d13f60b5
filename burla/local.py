"""The embedded cluster: a broker and one worker with a slot per core, started on this machine on first use.

It listens on an ipc:// path inside a private (0700) temporary folder, never on a network interface: a new one
each time, or one the caller made and keeps (the Jupyter server's, so that a cluster started again has the address
its kernels already hold). Both processes hold the read end of a pipe whose write end only this process has: when
this process ends, however it ends (SIGKILL included), the pipe closes and they exit, and the worker takes its
executors down with it.
"""

import atexit
import os
import shutil
import subprocess
import sys
import tempfile
import threading

_lock = threading.Lock()
_cluster = None


SOCKET_PATH_MAX = 107  # bytes in a Unix socket's path (sun_path, less its NUL)


def private_folder():
    """A new 0700 folder for the cluster's socket, in the temporary folder unless that is so deep that the socket's
    path would be too long for Unix (a test's, a job scheduler's TMPDIR): then in /tmp."""
    folder = tempfile.mkdtemp(prefix="burla-")
    if len(os.fsencode(folder)) + len("/broker") <= SOCKET_PATH_MAX:
        return folder
    os.rmdir(folder)
    return tempfile.mkdtemp(prefix="burla-", dir="/tmp")


class LocalCluster:
    def __init__(self, slots=None, directory=None):
        from burla.worker.worker import host_resources

        cpus, ram = host_resources()
        self.slots = slots or cpus
        # Memory is not reserved per call on one's own machine (as with any local pool): advertise enough
        # for every slot at the default func_ram=4.
        self.ram = max(ram, 4.0 * self.slots)
        self.owns_dir = directory is None
        self.dir = directory or private_folder()
        self.address = f"ipc://{self.dir}/broker"
        read, self._pipe = os.pipe()
        # Workers import the client's modules by name (functions cloudpickle sends by reference), so they get
        # the client's working directory and import path.
        path = [os.path.abspath(p or ".") for p in sys.path]
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(path))
        run = [sys.executable, "-m", "burla"]
        common = dict(pass_fds=(read,), env=env, stdin=subprocess.DEVNULL, cwd=os.getcwd())
        self.procs = [
            subprocess.Popen([*run, "broker", "--bind", self.address, "--parent-fd", str(read)], **common),
            subprocess.Popen([*run, "worker", "--broker", self.address, "--slots", str(self.slots),
                              "--ram", f"{self.ram:.1f}", "--name", "local", "--parent-fd", str(read)], **common),
        ]
        os.close(read)
        self.pid = os.getpid()

    def stop(self):
        if self.pid != os.getpid():
            return  # a forked child does not own the cluster
        if self._pipe is not None:
            os.close(self._pipe)  # they see the pipe close and exit on their own
            self._pipe = None
        for proc in self.procs:
            for stop in (None, proc.terminate, proc.kill):  # signals only for the stubborn
                if stop is not None:
                    stop()
                try:
                    proc.wait(timeout=1)
                    break
                except subprocess.TimeoutExpired:
                    pass
        if self.owns_dir:
            shutil.rmtree(self.dir, ignore_errors=True)
        else:  # the caller's folder stays; the socket goes, so nothing dials a dead broker's file
            try:
                os.unlink(self.address[len("ipc://"):])
            except OSError:
                pass

    def pids(self):
        return [p.pid for p in self.procs]


def cluster(directory=None):
    """The running embedded cluster of this process, started if need be (in directory: a private folder the caller
    keeps, for the same address each time)."""
    global _cluster
    with _lock:
        if _cluster is None or _cluster.pid != os.getpid() or any(p.poll() is not None for p in _cluster.procs):
            if _cluster is not None and _cluster.pid == os.getpid():
                _cluster.stop()
            _cluster = LocalCluster(int(os.environ["BURLA_LOCAL_SLOTS"]) if os.environ.get("BURLA_LOCAL_SLOTS")
                                    else None, directory)
            atexit.register(_cluster.stop)
        return _cluster


def stop():
    """Stop the embedded cluster now (it stops by itself when this process exits)."""
    global _cluster
    with _lock:
        if _cluster is not None:
            _cluster.stop()
            _cluster = None
