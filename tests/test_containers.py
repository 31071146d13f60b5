"""image= and dockerfile=: calls run inside a container image on a worker with podman. The image is made here from
this machine's own Python (no registry is reachable), so the test needs podman that can run a container."""

import os
import shutil
import site
import subprocess
import time
import uuid

import pytest

import images
from conftest import broker_only

from burla import env as E
from burla import remote_parallel_map

NAME = f"localhost/burla-test-python:{uuid.uuid4().hex[:8]}"
# Some hosts (cgroups v1 in hybrid mode, no permission to set rlimits) need these to run any container at all.
FALLBACK_CONF = """
[containers]
default_ulimits = []
[engine]
runtime = "runc"
"""


def podman(*args, env=None, check=True, timeout=120, **kwargs):
    return subprocess.run(["podman", *args], capture_output=True, text=True, env=env, timeout=timeout, check=check,
                          **kwargs)


@pytest.fixture(scope="module")
def runtime(tmp_path_factory):
    """podman with an image of this Python, and the environment that makes `podman run` work here."""
    if shutil.which("podman") is None:
        pytest.skip("podman is not installed")
    folder = tmp_path_factory.mktemp("image")
    tar = folder / "rootfs.tar"
    images.python_rootfs(tar, images.native_modules(site.getsitepackages()[0]))
    env = dict(os.environ)
    podman("import", str(tar), NAME, env=env)
    try:
        if podman("run", "--rm", NAME, "python3", "-c", "pass", env=env, check=False).returncode != 0:
            (folder / "containers.conf").write_text(FALLBACK_CONF)
            env["CONTAINERS_CONF"] = str(folder / "containers.conf")
            probe = podman("run", "--rm", NAME, "python3", "-c", "pass", env=env, check=False)
            if probe.returncode != 0:
                pytest.skip(f"podman cannot run a container here: {probe.stderr.strip()[-300:]}")
        yield env
    finally:
        podman("rmi", "-f", NAME, env=env, check=False)


def test_calls_run_in_the_image(runtime, tmp_path, capfd):
    def in_container(x):  # (nested: it travels by value; the image has no test modules)
        import os
        import sys

        with open("/etc/burla-test-image") as fh:  # only the image has it
            marker = fh.read().strip()
        print(f"call {x} in {marker}")
        return x * 2, marker, os.environ.get("FROM_DOCKERFILE"), os.path.exists(sys.prefix + "/pyvenv.cfg")

    # a container left by an earlier life of worker w1 (created, never started): the new w1 removes it
    podman("create", "--name", "burla-w1-stale", "--label", "burla.worker=w1", NAME, "python3", "-c", "pass",
           env=runtime)
    with broker_only() as c:
        c.env.update(runtime)
        c.start_worker("w1", 2, "--containers", "podman", "--env-cache", str(tmp_path / "cache"))
        c.wait_for(1, slots=2)
        deadline = time.monotonic() + 15  # the worker asks podman whether it answers
        while c.wait_for(1)["workers"][0]["containers"] != "podman" and time.monotonic() < deadline:
            time.sleep(0.1)
        assert "burla-w1-stale" not in podman("ps", "-a", "--format", "{{.Names}}", env=runtime).stdout

        out = remote_parallel_map(in_container, range(4), image=NAME, cluster=c.address, spinner=False)
        assert out == [(x * 2, "burla test image", None, False) for x in range(4)]
        printed = capfd.readouterr()
        assert "call 3 in burla test image" in printed.out, printed
        assert "worker w1: environment img-" in printed.err, printed

        dockerfile = tmp_path / "Dockerfile"
        dockerfile.write_text(f"FROM {NAME}\nENV FROM_DOCKERFILE=yes\n")
        built = remote_parallel_map(in_container, range(3), dockerfile=dockerfile, cluster=c.address, spinner=False)
        assert built == [(x * 2, "burla test image", "yes", False) for x in range(3)]
        printed = capfd.readouterr()
        assert "building image localhost/burla-job:" in printed.err, printed

        # a crash inside the container is found like any other: the input fails alone after three tries
        crash = remote_parallel_map(lambda x: os._exit(3) if x == 1 else x, range(3), image=NAME, cluster=c.address,
                                    spinner=False, return_exceptions=True)
        assert crash[0] == 0 and crash[2] == 2 and "exit code 3" in str(crash[1]), (crash, capfd.readouterr())
        # the worker alone is killed (as the OOM killer would): each executor sees its pid go, and its container
        # ends; runtime clients that were starting a container finish, and that one ends at once
        worker = c.procs.pop("w1")
        worker.kill()
        worker.wait()
        deadline = time.monotonic() + 60
        while "burla-w1-" in (listed := podman("ps", "-a", "--format", "{{.Names}} {{.Status}}", env=runtime).stdout):
            assert time.monotonic() < deadline, f"executor containers outlived their worker: {listed}"
            time.sleep(0.2)
    podman("rmi", "-f", E.image(dockerfile=dockerfile).image, env=runtime, check=False)


def test_image_needs_a_container_runtime(tmp_path):
    with broker_only() as c:
        c.start_worker("w1", 1, "--containers", "none")
        c.wait_for(1, slots=1)
        with pytest.raises(Exception, match="container runtime") as info:
            remote_parallel_map(print, [1], image="python:3.11-slim", cluster=c.address, spinner=False)
        assert type(info.value).__name__ == "NoCompatibleWorkerError"
    with pytest.raises(ValueError, match="path of a Dockerfile"):
        remote_parallel_map(print, [1], dockerfile="/no/such/Dockerfile", cluster="local", spinner=False)
    with pytest.raises(ValueError, match="not both"):
        remote_parallel_map(print, [1], image="a", packages=["b"], spinner=False)

