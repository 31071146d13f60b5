"""broker/Dockerfile and worker/Dockerfile: both images build, with podman, from a base made here (this machine's
Python and the few tools the Dockerfiles run, imported without a registry), burla's own wheel and a wheelhouse of
its requirements (--no-index: nothing is downloaded), and a job runs in a broker container and a worker
container that talk over loopback."""

import io
import os
import shutil
import site
import socket
import subprocess
import tarfile
import time
import uuid
import zipfile

import pytest

import images
import wheels
from test_containers import FALLBACK_CONF

from burla import remote_parallel_map
from burla.bootstrap import write_package
from burla.client import cluster_state

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TAG = uuid.uuid4().hex[:8]
# What the Dockerfiles' RUN lines call, beside python3 and uv: a Debian slim base has them all.
TOOLS = ["/usr/bin/dash", "/usr/bin/rm", "/usr/bin/mkdir", "/usr/bin/chown", "/usr/sbin/useradd"]


def podman(*args, env, check=True, timeout=120):
    done = subprocess.run(["podman", *args], capture_output=True, text=True, env=env, timeout=timeout)
    if check and done.returncode != 0:
        raise AssertionError(f"podman {' '.join(args[:2])} failed: {done.stderr.strip()[-2000:]}")
    return done


def requirements(wheel):
    """The Requires-Dist lines of a wheel, but for extras (the head's google-cloud-compute)."""
    with zipfile.ZipFile(wheel) as z:
        meta = next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))
        lines = z.read(meta).decode().splitlines()
    return [line.split(":", 1)[1].strip() for line in lines
            if line.startswith("Requires-Dist:") and "extra ==" not in line]


def compiled_modules(folder):
    """The installed files of the compiled modules in the wheelhouse (the base needs the libraries they load)."""
    where = site.getsitepackages()[0]
    found = []
    for name in os.listdir(folder):
        with zipfile.ZipFile(os.path.join(folder, name)) as z:
            found += [os.path.join(where, n) for n in z.namelist() if n.endswith(".so") or ".so." in n]
    return [p for p in found if os.path.isfile(p)]


def base_rootfs(tar_path, uv, libraries_for):
    """images.python_rootfs, plus TOOLS, /bin/sh, a root user and the libraries uv and libraries_for load."""
    images.python_rootfs(tar_path, [*libraries_for, *TOOLS, uv])
    with tarfile.open(tar_path, "a") as tar:
        names = set(tar.getnames())

        def entry(name, kind=tarfile.REGTYPE, data=b"", link="", mode=0o644):
            info = tarfile.TarInfo(name)
            info.type, info.linkname, info.mode, info.size = kind, link, mode, len(data)
            tar.addfile(info, io.BytesIO(data))

        for tool in TOOLS:
            tar.add(tool, arcname=tool.lstrip("/"))
        entry("usr/bin/sh", tarfile.SYMTYPE, link="dash")
        for folder in ("bin", "sbin"):  # (merged /usr, as on Debian)
            if folder not in names:
                entry(folder, tarfile.SYMTYPE, link=f"usr/{folder}")
        entry("home", tarfile.DIRTYPE, mode=0o755)
        entry("etc/passwd", data=b"root:x:0:0:root:/root:/bin/sh\n")
        entry("etc/group", data=b"root:x:0:\n")
        entry("etc/login.defs", data=b"USERGROUPS_ENAB yes\n")  # (useradd: a group of the user's own, as Debian's)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """The broker and worker images, built from a local base: {"broker": name, "worker": name, "env": env}."""
    if shutil.which("podman") is None:
        pytest.skip("podman is not installed")
    if os.geteuid() != 0:
        pytest.skip("needs root: rootless podman cannot import this machine's Python as an image")
    try:
        from uv import find_uv_bin  # (the test extra's uv: its binary goes into the images)

        uv = find_uv_bin()
    except (ImportError, FileNotFoundError):
        pytest.skip("uv (the test extra) is not installed")
    folder = tmp_path_factory.mktemp("images")
    context = folder / "context"  # what the builder puts in dist/: burla's wheel and, here, its requirements
    dist = str(context / "dist")
    wheelhouse = wheels.wheelhouse(dist, requirements(write_package(dist)))
    base_rootfs(folder / "base.tar", uv, compiled_modules(wheelhouse))
    with tarfile.open(folder / "uv.tar", "w") as tar:  # what ghcr.io/astral-sh/uv holds: /uv
        tar.add(uv, arcname="uv")
    names = {role: f"localhost/burla-test-{role}:{TAG}" for role in ("base", "uv", "broker", "worker")}
    env = dict(os.environ)
    try:
        podman("import", str(folder / "base.tar"), names["base"], env=env)
        podman("import", str(folder / "uv.tar"), names["uv"], env=env)
        if podman("run", "--rm", names["base"], "python3", "-c", "pass", env=env, check=False).returncode != 0:
            (folder / "containers.conf").write_text(FALLBACK_CONF)
            env["CONTAINERS_CONF"] = str(folder / "containers.conf")
            probe = podman("run", "--rm", names["base"], "python3", "-c", "pass", env=env, check=False)
            if probe.returncode != 0:
                pytest.skip(f"podman cannot run a container here: {probe.stderr.strip()[-300:]}")
        # --pull=never and no network: the build uses only what is here. --layers=false: one layer per image
        # (nothing to reuse within a test); the worker's image reuses the broker's, which it is built FROM.
        # --force-rm: a failed step leaves no build container behind.
        build = ["build", "--pull=never", "--network=none", "--layers=false", "--force-rm", "-q"]
        podman(*build, "-f", os.path.join(ROOT, "broker", "Dockerfile"), "-t", names["broker"],
               "--build-arg", f"BASE={names['base']}", "--build-arg", f"UV={names['uv']}",
               "--build-arg", "PIP_ARGS=--no-index --find-links /wheels", str(context), env=env, timeout=150)
        podman(*build, "-f", os.path.join(ROOT, "worker", "Dockerfile"), "-t", names["worker"],
               "--build-arg", f"BROKER={names['broker']}", "--build-arg", "APT_PACKAGES=", str(context),
               env=env, timeout=60)
        yield dict(names, env=env)
    finally:
        podman("rmi", "-f", names["worker"], names["broker"], names["uv"], names["base"], env=env, check=False)


@pytest.mark.timeout(300)  # (above the podman calls' own limits, so that the cleanup runs after any of them)
def test_a_job_runs_in_the_broker_and_worker_images(built, tmp_path):
    def in_image(x):  # (nested: it travels by value; the image has no test modules)
        import os
        import shutil
        import subprocess

        with open("/etc/burla-test-image") as fh:  # only the image has it
            marker = fh.read().strip()
        uv = subprocess.run([shutil.which("uv"), "--version"], capture_output=True, text=True).stdout.split()[0]
        return x * 2, marker, os.getuid(), os.environ.get("BURLA_ENV_CACHE"), uv

    env = built["env"]
    address = f"tcp://127.0.0.1:{free_port()}"
    state = tmp_path / "state"
    state.mkdir()
    broker, worker = f"burla-test-broker-{TAG}", f"burla-test-worker-{TAG}"
    try:
        podman("run", "-d", "--name", broker, "--network=host", "-v", f"{state}:/state", built["broker"],
               "broker", "--bind", address, "--state-dir", "/state", env=env)
        deadline = time.monotonic() + 30
        while not (state / "client.toml").exists():  # written once the keys are, just before it serves
            assert time.monotonic() < deadline, podman("logs", broker, env=env, check=False).stderr
            time.sleep(0.1)
        api_key = (state / "api_keys").read_text().split()[0]
        token = (state / "worker_tokens").read_text().split()[0]
        podman("run", "-d", "--name", worker, "--network=host", "-e", f"BURLA_WORKER_TOKEN={token}",
               built["worker"], "worker", "--broker", address, "--slots", "2", "--name", "img-w1",
               "--containers", "none", env=env)
        deadline = time.monotonic() + 30
        while True:
            try:
                workers = cluster_state(address, 1, api_key)["workers"]
            except TimeoutError:
                workers = []
            if workers:
                break
            logs = podman("logs", worker, env=env, check=False)
            assert time.monotonic() < deadline, f"the worker did not join: {logs.stdout} {logs.stderr}"
            time.sleep(0.2)

        out = remote_parallel_map(in_image, range(4), packages=[], cluster=address, api_key=api_key,
                                  spinner=False, timeout=60)
        assert out == [(x * 2, "burla test image", 1000, "/envs", "uv") for x in range(4)]
        assert not os.path.exists("/etc/burla-test-image")  # (so the calls did not run here)
    finally:
        podman("rm", "-f", "-t", "0", worker, broker, env=env, check=False, timeout=60)
