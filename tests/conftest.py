import contextlib
import os
import signal
import subprocess
import sys
import tempfile
import textwrap
import time

import psutil
import pytest

from burla.client import cluster_state

HERE = os.path.dirname(os.path.abspath(__file__))
pytest_plugins = ["pytest_jupyter.jupyter_server"]  # jp_fetch and friends: a real Jupyter server (test_server.py)


class Cluster:
    """A real broker and real workers, each a process started by the `burla` command."""

    def __init__(self, directory):
        self.dir = directory
        self.address = f"ipc://{directory}/broker"
        self.procs = {}
        # Workers can import the test modules (functions defined at a module's top level travel by reference).
        self.env = dict(os.environ, BURLA_HEARTBEAT_INTERVAL="0.5", PYTHONPATH=HERE)

    def start_broker(self):
        self.procs["broker"] = subprocess.Popen(
            [sys.executable, "-m", "burla", "broker", "--bind", self.address], env=self.env)

    def start_worker(self, name, slots=2, *extra):
        # No container runtime unless a test asks (--containers podman): probing it costs each worker ~0.3 s of CPU.
        containers = () if "--containers" in extra else ("--containers", "none")
        self.procs[name] = subprocess.Popen(
            [sys.executable, "-m", "burla", "worker", "--broker", self.address, "--slots", str(slots),
             "--name", name, *containers, *extra], env=self.env)

    def wait_for(self, workers, slots=None, timeout=15):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                state = cluster_state(self.address, timeout=1)
            except TimeoutError:
                continue
            ws = state["workers"]
            if len(ws) == workers and (slots is None or sum(w["slots"] for w in ws) == slots):
                return state
            time.sleep(0.05)
        raise TimeoutError(f"cluster did not reach {workers} workers")

    def executor_pids(self, name):
        """The worker's executors: its children, and the children of its zygotes (which fork restarted ones)."""
        pids = []
        for child in psutil.Process(self.procs[name].pid).children():
            try:
                if "burla.worker.zygote" in " ".join(child.cmdline()):
                    pids += [c.pid for c in child.children()]
                else:
                    pids.append(child.pid)
            except psutil.NoSuchProcess:
                pass
        return pids

    def stop(self, name=None):
        names = [name] if name else list(self.procs)
        for n in names:
            proc = self.procs.pop(n)
            try:
                children = psutil.Process(proc.pid).children(recursive=True)
            except psutil.NoSuchProcess:
                children = []
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            for c in children:
                try:
                    c.kill()
                except psutil.NoSuchProcess:
                    pass


@contextlib.contextmanager
def broker_only():
    """A broker of our own in a private folder, no workers yet; every process it started stops at the end."""
    with tempfile.TemporaryDirectory(prefix="burla-test-") as d:
        c = Cluster(d)
        c.start_broker()
        try:
            yield c
        finally:
            c.stop()


@pytest.fixture(scope="module")
def cluster():
    """Shared by a test module: a broker and one worker "w1" with two slots."""
    with broker_only() as c:
        c.start_worker("w1", slots=2)
        c.wait_for(1, slots=2)
        yield c


@pytest.fixture
def new_cluster():
    """A test's own broker, for tests that kill or restart parts of the cluster; it adds its workers."""
    with broker_only() as c:
        yield c


@pytest.fixture
def run_script(tmp_path):
    """Run a Python script in a fresh interpreter (its own embedded cluster), return the CompletedProcess."""

    def run(source, timeout=60, env=None, **kwargs):
        path = tmp_path / "script.py"
        path.write_text(textwrap.dedent(source))
        full_env = dict(os.environ, TMPDIR=str(tmp_path), **(env or {}))
        return subprocess.run([sys.executable, str(path)], capture_output=True, text=True, timeout=timeout,
                              cwd=tmp_path, env=full_env, **kwargs)

    return run


def processes_mentioning(text):
    """Live processes whose command line contains text (to find what a test's cluster left behind)."""
    found = []
    for p in psutil.process_iter(["cmdline", "status"]):
        try:
            if p.info["status"] != psutil.STATUS_ZOMBIE and text in " ".join(p.info["cmdline"] or []):
                found.append(p)
        except psutil.NoSuchProcess:
            pass
    return found
