"""A call sees exactly the GPUs its job's claim holds (CUDA_VISIBLE_DEVICES), and a job runs only on workers of
its client's Python: the scheduler driven with messages, then a real broker and real workers."""

import glob
import itertools
import os
import shutil
import subprocess
import sys
import time

import pytest

import burla
from burla import env as E
from burla import protocol as P
from burla.broker.scheduler import Scheduler, gpu_is
from burla.cli import detect_gpus, parse_gpus
from test_scheduler import DIGEST, Wire

CLIENT = b"client"
OTHER_PY = "cpython-399"  # no interpreter has it: a job or worker "of another Python"


# ---------------------------------------------------------------------------------------------------- scheduler

def scheduler(**workers):
    """A scheduler with these workers: name -> (slots, REGISTER fields); slot i of worker w is b"w/i"."""
    wire = Wire()
    s = Scheduler(wire.send, wire.offer)
    for name, (slots, fields) in workers.items():
        s.handle(name.encode(), None, P.REGISTER, {"w": name, "slots": slots, "cpu": 8, "ram": 64, **fields}, [])
        for i in range(slots):
            s.handle(f"{name}/{i}".encode(), None, P.READY, {"w": name, "s": f"{name}/{i}", "k": 1}, [])
    return s, wire


ids = (bytes([k]) * 8 for k in itertools.count(1))


def submit(s, n, **extra):
    job = next(ids)
    s.handle(CLIENT, None, P.SUBMIT, {"j": job, "c": b"c1", "d": DIGEST, "fn": 1, "n": n, "cpu": 1, "ram": 1,
                                      **extra}, [b"function"])
    for i in range(n):
        s.handle(CLIENT, None, P.BATCH, {"j": job, "i": i, "n": 1, "z": [0]}, [b"input"])
    return job


def tasks(s, wire):
    s.dispatch()
    return {m[0].decode(): m[2] for m in wire.take(command=P.TASK)}


def test_claims_hold_gpu_indices_and_tasks_say_them():
    s, wire = scheduler(g=(3, {"gpu": ["T4", "T4"]}), c=(1, {}))
    job = submit(s, 3, gpu=1)
    got = tasks(s, wire)
    # two calls at once, one GPU each (the names repeat; the indices do not); no third GPU for the third slot
    assert sorted(h["gpu"] for h in got.values() if h["j"] == job) == [[0], [1]]
    assert all(name.startswith("g/") for name in got)
    cpu_job = submit(s, 2)  # no GPUs: the free slot of the GPU worker runs it and sees none, the other worker's
    got = tasks(s, wire)    # calls have no GPU field at all (they leave CUDA_VISIBLE_DEVICES as it is)
    assert got["g/2"]["j"] == cpu_job and got["g/2"]["gpu"] == []
    assert got["c/0"]["j"] == cpu_job and "gpu" not in got["c/0"]


def test_a_job_of_two_gpus_gets_both_and_kinds_match_by_word():
    s, wire = scheduler(g=(2, {"gpu": parse_gpus("nvidia-tesla-t4:2")}))
    submit(s, 2, gpu="T4:2")  # Compute Engine's name, a user's kind
    got = tasks(s, wire)
    assert [h["gpu"] for h in got.values()] == [[0, 1]]  # one call at a time: it holds both
    assert parse_gpus("A100:2,T4") == ["A100", "A100", "T4"] and parse_gpus("2") == ["gpu", "gpu"]
    assert parse_gpus("0") == []
    assert gpu_is("NVIDIA H100 80GB HBM3", "h100") and gpu_is("A100", "a100") and not gpu_is("A100-80GB", "A10")


def test_a_job_runs_only_on_workers_of_its_python_and_older_workers_match():
    s, wire = scheduler(old=(1, {}), same=(1, {"py": E.python()}), other=(1, {"py": OTHER_PY}))
    job = submit(s, 6, py=E.python())
    for k in range(3):
        got = tasks(s, wire)
        if k == 0:  # (ACCEPTED follows the first dispatch)
            (_, _, accepted, _), = wire.take(CLIENT, P.ACCEPTED)
            assert accepted["s"] == 2  # the window the client is told counts only the slots that can run it
        assert set(got) == {"old/0", "same/0"} and all(h["j"] == job for h in got.values())
        for name, h in got.items():
            s.handle(name.encode(), None, P.RESULT, {"j": job, "i": h["i"], "o": 0, "k": 1, "f": 1, "z": [0]}, [b"r"])
    assert s.jobs[job].done == 6
    state = s.state()
    assert {w["id"]: w["py"] for w in state["workers"]} == {"old": None, "same": E.python(), "other": OTHER_PY}


def test_a_job_no_worker_can_run_for_its_python_is_refused_saying_the_versions():
    s, wire = scheduler(w=(1, {"py": "cpython-311"}))
    job = submit(s, 1, py="cpython-312")
    (_, _, rejected, _), = wire.take(CLIENT, P.REJECTED)
    assert rejected["j"] == job and job not in s.jobs
    assert "no worker in this cluster runs Python 3.12 (its workers run Python 3.11)" in rejected["e"]
    assert "start workers on Python 3.12, or run this on Python 3.11" in rejected["e"]
    # a job that waits for workers is refused once the only one there runs another Python
    s2, wire2 = scheduler()
    job = submit(s2, 1, py="cpython-312")
    s2.dispatch()
    assert wire2.take(CLIENT, P.ACCEPTED)
    s2.handle(b"w", None, P.REGISTER, {"w": "w", "slots": 1, "py": "cpython-313"}, [])
    (_, _, rejected, _), = wire2.take(CLIENT, P.REJECTED)
    assert "runs Python 3.12 (its workers run Python 3.13)" in rejected["e"]
    with pytest.raises(P.ProtocolError):
        P.check(P.REGISTER, {"w": "w", "slots": 1, "py": 311})


def test_a_worker_without_gpus_named_finds_them_with_nvidia_smi(tmp_path, monkeypatch):
    smi = tmp_path / "nvidia-smi"
    smi.write_text("#!/bin/sh\necho '0, GPU-aa, NVIDIA H100 80GB HBM3'\necho '1, GPU-bb, Tesla T4'\n")
    smi.chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}:{os.environ['PATH']}")
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    assert detect_gpus() == ["NVIDIA H100 80GB HBM3", "Tesla T4"]
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "GPU-bb")  # only those the worker may use, in that order
    assert detect_gpus() == ["Tesla T4"]
    smi.write_text("#!/bin/sh\nexec sleep 5\n")  # hung: no GPUs, soon
    assert detect_gpus(timeout=0.2) == []
    smi.write_text("#!/bin/sh\nexit 9\n")
    assert detect_gpus() == []


# ---------------------------------------------------------------------------------------------------- real cluster

def visible(x):
    """A call that says which GPUs it sees, and when it ran."""
    start = time.time()
    time.sleep(0.3)
    return os.environ.get("CUDA_VISIBLE_DEVICES"), start, time.time()


def gpu_worker(c, *gpus, visible_devices=None, name="g"):
    c.env = {k: v for k, v in c.env.items() if k != "CUDA_VISIBLE_DEVICES"}
    if visible_devices is not None:
        c.env["CUDA_VISIBLE_DEVICES"] = visible_devices
    c.start_worker(name, 2, "--cpu", "8", "--ram", "64", *gpus)
    c.wait_for(1, slots=2)


def run(c, **kwargs):
    return burla.remote_parallel_map(visible, range(kwargs.pop("n", 6)), cluster=c.address, spinner=False, **kwargs)


@pytest.mark.timeout(20)
def test_calls_see_the_gpus_their_claim_holds(new_cluster):
    gpu_worker(new_cluster, "--gpus", "T4,T4")
    outcomes = run(new_cluster, func_gpu=1)
    assert {seen for seen, _, _ in outcomes} <= {"0", "1"}
    overlapping = [(a, b) for a, b in itertools.combinations(outcomes, 2) if a[1] < b[2] and b[1] < a[2]]
    assert overlapping, "the two slots never ran calls at the same time"
    assert all(a[0] != b[0] for a, b in overlapping)  # calls at the same time never share a GPU
    assert {seen for seen, _, _ in run(new_cluster, func_gpu="T4:2", n=2)} == {"0,1"}
    assert {seen for seen, _, _ in run(new_cluster, n=4)} == {""}  # a CPU job takes no GPU


@pytest.mark.timeout(20)
def test_indices_follow_the_gpus_the_worker_was_given_and_a_worker_without_gpus_leaves_them(new_cluster):
    gpu_worker(new_cluster, "--gpus", "2", visible_devices="3,5")
    assert {seen for seen, _, _ in run(new_cluster, func_gpu=1)} <= {"3", "5"}
    new_cluster.stop("g")
    gpu_worker(new_cluster, "--gpus", "0", visible_devices="7", name="c")
    assert {seen for seen, _, _ in run(new_cluster, n=2)} == {"7"}


@pytest.mark.timeout(20)
def test_a_job_from_another_python_is_refused_by_a_cluster_of_workers_on_this_one(new_cluster, monkeypatch):
    new_cluster.start_worker("w1", 1)
    state = new_cluster.wait_for(1, slots=1)
    assert state["workers"][0]["py"] == E.python()
    monkeypatch.setattr(E, "python", lambda: OTHER_PY)  # the header a client on Python 3.99 sends
    mine = E.python_name(sys.implementation.cache_tag)
    with pytest.raises(burla.NoCompatibleWorkerError, match=rf"runs Python 3\.99 \(its workers run {mine}\)"):
        run(new_cluster, n=2)
    monkeypatch.undo()
    assert [seen for seen, _, _ in run(new_cluster, n=1)] == [None]  # this Python's job runs there


def other_python():
    """(path, tag) of another interpreter on this machine that has burla (and so its dependencies) installed, or
    None."""
    mine = sys.implementation.cache_tag
    candidates = [os.environ.get("BURLA_TEST_OTHER_PYTHON", ""), *glob.glob("/usr/bin/python3.*[0-9]"), *glob.glob("/usr/local/bin/python3.*[0-9]"),
                  *glob.glob(os.path.expanduser("~/.pyenv/versions/3.*/bin/python3"))]
    uv = shutil.which("uv") or shutil.which("uv", path=os.path.dirname(sys.executable))
    for minor in set(range(9, 15)) - {sys.version_info.minor} if uv else ():
        found = subprocess.run([uv, "python", "find", "--no-python-downloads", f"3.{minor}"], capture_output=True,
                               text=True, timeout=10)
        candidates.append(found.stdout.strip() if found.returncode == 0 else "")
    for path in filter(os.path.isfile, dict.fromkeys(candidates)):
        probe = subprocess.run([path, "-c", "import sys, burla.worker.worker; print(sys.implementation.cache_tag)"],
                               capture_output=True, text=True, timeout=30, cwd="/")  # (not this checkout's burla)
        if probe.returncode == 0 and probe.stdout.strip() != mine:
            return path, probe.stdout.strip()
    return None


def python_of_worker(x):
    return sys.implementation.cache_tag


CLIENT_SCRIPT = """
import sys
import burla

def python_of_worker(x):
    return sys.implementation.cache_tag

print(",".join(burla.remote_parallel_map(python_of_worker, range(4), cluster=sys.argv[1], spinner=False)))
"""


@pytest.mark.timeout(20)
def test_each_python_s_jobs_are_served_by_workers_of_that_python(new_cluster):
    found = other_python()
    if found is None:
        pytest.skip(f"no Python other than {E.python_name(E.python())} with burla installed on this machine (looked "
                    "at $BURLA_TEST_OTHER_PYTHON, in /usr/bin, /usr/local/bin, ~/.pyenv and `uv python find`): a "
                    "worker or client on another Python needs burla's dependencies installed there")
    path, tag = found
    new_cluster.procs["other"] = subprocess.Popen(
        [path, "-m", "burla", "worker", "--broker", new_cluster.address, "--slots", "1", "--name", "other"],
        env=new_cluster.env, cwd=new_cluster.dir)  # (its own burla, not this checkout's folder)
    state = new_cluster.wait_for(1, slots=1)
    assert state["workers"][0]["py"] == tag
    with pytest.raises(burla.NoCompatibleWorkerError, match=f"its workers run {E.python_name(tag)}"):
        run(new_cluster, n=1)
    new_cluster.start_worker("w1", 1)
    new_cluster.wait_for(2, slots=2)
    mine = burla.remote_parallel_map(python_of_worker, range(4), cluster=new_cluster.address, spinner=False)
    assert mine == [E.python()] * 4
    theirs = subprocess.run([path, "-c", CLIENT_SCRIPT, new_cluster.address], capture_output=True, text=True,
                            timeout=20, cwd=new_cluster.dir, env=new_cluster.env)
    assert theirs.returncode == 0, theirs.stderr
    assert theirs.stdout.split() == [",".join([tag] * 4)]
