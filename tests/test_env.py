"""Job environments: a worker without the client's packages builds the client's environment from a local
wheelhouse (no index), caches it by hash, shares it between workers of a host, and evicts it past a budget."""

import contextlib
import hashlib
import json
import os
import re
import subprocess
import sys
import time

import pytest

import wheels
from conftest import broker_only

from burla import env as E

CLIENT = """
import json, os, sys, time
from burla import remote_parallel_map

def f(x):
    import sys
    found = {}
    for name in ("burlatest_a", "burlatest_b", "burlatest_local"):
        try:
            found[name] = __import__(name).VERSION
        except ImportError:
            found[name] = None
    print(f"call {x}")
    time.sleep(SLEEP)
    return found, sys.prefix, os.getppid()

packages = json.loads(sys.argv[2])
out = remote_parallel_map(f, range(6), cluster=sys.argv[1], spinner=False, packages=packages)
print(json.dumps(out))
"""

INSTALLERS = ["pip"] + (["uv"] if E.uv() else [])  # uv comes with the test extras; where it is, both are tested
FAST = INSTALLERS[-1]  # for the tests not about the installer: uv where there is one (pip takes seconds a build)
EVERYTHING = {"burlatest_a": "1.0", "burlatest_b": "2.0", "burlatest_local": "0.1"}
NOTHING = dict.fromkeys(EVERYTHING)


class House:
    """A wheelhouse, and a client site-packages folder with packages from it and one installed from a local folder
    (which no index has: it travels with the job)."""

    def __init__(self, root):
        self.wheels = root / "wheelhouse"
        self.wheels.mkdir()
        wheels.make_wheel(self.wheels, "burlatest_a", "1.0", requires=["burlatest_b"])
        for version in ("2.0", "3.0"):
            wheels.make_wheel(self.wheels, "burlatest_b", version)
        # a "msgpack" that cannot be imported: pinning it breaks what burla's executors run on
        wheels.make_wheel(self.wheels, "msgpack", "0.0.1", code="raise ImportError('this msgpack is broken')\n")
        elsewhere = root / "elsewhere"
        elsewhere.mkdir()
        self.site = root / "client-site"
        wheels.install(self.wheels / "burlatest_a-1.0-py3-none-any.whl", self.site)
        wheels.install(self.wheels / "burlatest_b-2.0-py3-none-any.whl", self.site)
        wheels.install(wheels.make_wheel(elsewhere, "burlatest_local", "0.1"), self.site, local_from=elsewhere)
        # a client with a package that is on no index the workers can reach
        self.bad_site = root / "bad-site"
        wheels.install(wheels.make_wheel(elsewhere, "burlatest_c", "1.0"), self.bad_site)
        # pip, pip-compile: this wheelhouse only, and no pip configuration of the machine's
        self.pip_env = {"PIP_CONFIG_FILE": os.devnull, "PIP_FIND_LINKS": str(self.wheels), "PIP_NO_INDEX": "1",
                        "PIP_INDEX_URL": "", "PIP_EXTRA_INDEX_URL": ""}
        self.script = root / "client.py"

    def run(self, address, packages=None, sleep=0.0, site=None, timeout=90, installer=None):
        self.script.write_text(CLIENT.replace("SLEEP", repr(sleep)))
        env = dict(os.environ, **self.pip_env, PYTHONPATH=":".join(map(str, site or [self.site])),
                   BURLA_INSTALLER=installer or FAST)
        return subprocess.run([sys.executable, str(self.script), address, json.dumps(packages)],
                              capture_output=True, text=True, timeout=timeout, env=env)


@pytest.fixture(scope="module")
def house(tmp_path_factory):
    return House(tmp_path_factory.mktemp("house"))


@contextlib.contextmanager
def env_cluster(house, cache, workers=(("w1", 2),), budget=None, installer=None):
    """A broker and workers that share one environment cache and install from the wheelhouse."""
    with broker_only() as c:
        c.env.update(house.pip_env, BURLA_INSTALLER=installer or FAST)
        extra = ["--env-cache", str(cache)] + (["--env-cache-gb", str(budget)] if budget is not None else [])
        for name, slots in workers:
            c.start_worker(name, slots, *extra)
        c.wait_for(len(workers), slots=sum(s for _, s in workers))
        yield c


def outputs(done):
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])


def venvs(cache):
    return sorted(p.name for p in cache.iterdir() if re.fullmatch(r"[0-9a-f]{16}", p.name))


@pytest.mark.parametrize("installer", INSTALLERS)
def test_client_environment_is_built_once_then_cached(house, tmp_path, installer):
    cache = tmp_path / "cache"
    with env_cluster(house, cache, installer=installer) as c:
        first = house.run(c.address, installer=installer)
        results = outputs(first)
        assert all(found == EVERYTHING for found, _, _ in results)  # the worker alone has none of them
        assert all(prefix.startswith(str(cache)) for _, prefix, _ in results)
        assert f"installing 2 packages with {installer}: burlatest-a==1.0, burlatest-b==2.0" in first.stderr
        assert re.search(r"worker w1: environment [0-9a-f]{8}: ready: built \([\d.]+ s\)", first.stderr)
        assert [p.name for p in cache.iterdir() if p.name.startswith(".build-")] == []
        assert len(venvs(cache)) == 1 and len(list(cache.glob("local-*"))) == 1

        # same environment, executors already in it: nothing to prepare
        second = house.run(c.address, installer=installer)
        assert outputs(second) == results or all(r[0] == EVERYTHING for r in outputs(second))
        assert "environment" not in second.stderr

        own = outputs(house.run(c.address, packages=[], installer=installer))  # the worker's own environment
        assert all(found == NOTHING and not prefix.startswith(str(cache)) for found, prefix, _ in own)

        back = house.run(c.address, installer=installer)  # switching back: the worker knows the venv
        assert all(found == EVERYTHING for found, _, _ in outputs(back)) and "installing" not in back.stderr

        c.stop("w1")  # a new worker process finds it in the cache folder
        c.start_worker("w2", 2, "--env-cache", str(cache))
        c.wait_for(1, slots=2)
        fresh = house.run(c.address, installer=installer)
        assert all(found == EVERYTHING for found, _, _ in outputs(fresh))
        assert "ready: found in the cache" in fresh.stderr and "installing" not in fresh.stderr


def test_packages_list_is_resolved_and_old_environments_are_evicted(house, tmp_path):
    cache = tmp_path / "cache"
    with env_cluster(house, cache, budget=0) as c:  # keep only what executors run in
        pinned = outputs(house.run(c.address, packages=["burlatest_b==2.0"]))
        assert all(found == dict(NOTHING, burlatest_b="2.0") for found, _, _ in pinned)
        first = venvs(cache)
        assert len(first) == 1

        latest = outputs(house.run(c.address, packages=["burlatest_b"]))  # resolved to the newest: 3.0
        assert all(found == dict(NOTHING, burlatest_b="3.0") for found, _, _ in latest)
        deadline = time.monotonic() + 10
        while first[0] in venvs(cache) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert len(venvs(cache)) == 1 and first[0] not in venvs(cache)


def test_two_workers_build_the_same_environment_once(house, tmp_path):
    cache = tmp_path / "cache"
    with env_cluster(house, cache, workers=(("w1", 1), ("w2", 1))) as c:
        done = house.run(c.address, sleep=0.3)
        results = outputs(done)
        assert all(found == EVERYTHING for found, _, _ in results)
        assert len({ppid for _, _, ppid in results}) == 2  # both workers ran calls in it
        assert done.stderr.count("installing 2 packages") == 1, done.stderr
        assert "built by another worker on this host" in done.stderr
        assert len(venvs(cache)) == 1


NOT_FOUND = r"(No matching distribution found for|Could not find a version that satisfies the requirement|" \
            r"Because) {}.*(\n.*not found in the provided package locations)?"


@pytest.mark.parametrize("installer", INSTALLERS)
def test_bad_requirements_fail_with_the_installers_message(house, tmp_path, installer):
    cache = tmp_path / "cache"
    with env_cluster(house, cache, installer=installer) as c:
        # resolving fails on the client, before anything runs
        unknown = house.run(c.address, packages=["burlatest-nosuch==1.0"], installer=installer)
        assert unknown.returncode != 0 and "call " not in unknown.stdout
        assert "EnvironmentBuildError: could not resolve packages=['burlatest-nosuch==1.0']" in unknown.stderr
        assert re.search(NOT_FOUND.format("burlatest-nosuch"), unknown.stderr), unknown.stderr

        # installed on the client, on no index the worker can reach: the worker's installer fails, the job ends
        missing = house.run(c.address, site=[house.site, house.bad_site], installer=installer)
        assert missing.returncode != 0 and "call " not in missing.stdout
        assert "EnvironmentBuildError: worker w1 could not prepare the job's environment" in missing.stderr
        assert f"{installer} could not install the job's packages" in missing.stderr
        assert re.search(NOT_FOUND.format("burlatest-c"), missing.stderr), missing.stderr
        assert [p.name for p in cache.iterdir() if p.name.startswith(".build-")] == []

        assert all(found == EVERYTHING for found, _, _ in outputs(house.run(c.address, installer=installer)))


def test_lock_pins_exact_versions_and_ships_local_packages(house):
    probe = ("import json; from burla import env; e = env.current(); "
             "import zipfile, io; names = zipfile.ZipFile(io.BytesIO(e.archive)).namelist(); "
             "print(json.dumps([e.key, e.lock, names]))")
    run = lambda: json.loads(subprocess.run(  # noqa: E731
        [sys.executable, "-c", probe], capture_output=True, text=True, timeout=30, check=True,
        env=dict(os.environ, PYTHONPATH=str(house.site))).stdout)
    key, lock, names = run()
    assert "burlatest-a==1.0\n" in lock and "burlatest-b==2.0\n" in lock
    assert "burlatest-local" not in lock and names == ["burlatest_local/__init__.py"]
    assert not re.search(r"^(pip|burla)[=@ ]", lock, re.M)
    assert run()[0] == key  # the same files name the same environment
    assert E.make(["b==1", "a==2"]).key == E.make(["a==2", "b==1"]).key
    with pytest.raises(TypeError):
        E.for_job("numpy")


def test_worker_refuses_a_lock_for_another_python(tmp_path):
    from burla.errors import EnvironmentBuildError
    from burla.worker.envs import EnvCache

    lock, py = "six==1.16.0\n", "cpython-312-linux-x86-64"
    key = hashlib.sha256(f"{py}\n{lock}".encode()).hexdigest()[:16]
    cache = EnvCache(tmp_path / "cache")
    with pytest.raises(EnvironmentBuildError, match="same Python version"):
        cache.prepare({"k": key, "lock": lock, "py": py}, b"", print)
    with pytest.raises(EnvironmentBuildError, match="does not match its lock"):  # a key must name its lock
        cache.prepare({"k": key, "lock": "six==1.17.0\n", "py": py}, b"", print)
    assert list((tmp_path / "cache").iterdir()) == []


def test_executors_that_cannot_start_fail_the_job(house, tmp_path):
    with env_cluster(house, tmp_path / "cache") as c:
        broken = house.run(c.address, packages=["msgpack==0.0.1"])
        assert broken.returncode != 0 and "call " not in broken.stdout
        assert "EnvironmentBuildError" in broken.stderr
        assert "executors could not start in this environment" in broken.stderr
        # the slots went back to the worker's own environment, and the next job runs
        assert all(found == NOTHING for found, _, _ in outputs(house.run(c.address, packages=[])))


def test_packages_installed_on_the_worker_while_it_runs_become_its_own(house, tmp_path):
    """The embedded cluster's case: a `pip install` in the notebook changes the worker's own environment too."""
    site = tmp_path / "shared-site"
    site.mkdir()
    with broker_only() as c:
        c.env.update(house.pip_env, PYTHONPATH=f"{c.env['PYTHONPATH']}:{site}")
        c.start_worker("w1", 2, "--env-cache", str(tmp_path / "cache"), "--containers", "none")
        c.wait_for(1, slots=2)
        wheels.install(house.wheels / "burlatest_b-2.0-py3-none-any.whl", site)  # after the worker started
        done = house.run(c.address, site=[site])
        results = outputs(done)
        assert all(found == dict(NOTHING, burlatest_b="2.0") for found, _, _ in results)
        assert not any(prefix.startswith(str(tmp_path / "cache")) for _, prefix, _ in results)  # nothing built
        assert "environment" not in done.stderr
        # and the broker knows: a job in "the worker's own environment" runs there, not in a loop of restarts
        assert all(found == dict(NOTHING, burlatest_b="2.0") for found, _, _ in
                   outputs(house.run(c.address, packages=[], site=[site], timeout=30)))
