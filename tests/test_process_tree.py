"""A call's child processes end with it: when it times out, when its job is cancelled, and when its executor is
killed (a call stuck past its timeout). Each call starts processes of every kind a call can leave behind and
records their pids; none may outlive the call."""

import gc
import json
import os
import signal
import subprocess
import time

import psutil
import pytest

import burla
from burla import remote_parallel_map


@pytest.fixture
def rpm(cluster):
    def run(function_, inputs, **kwargs):
        return remote_parallel_map(function_, inputs, cluster=cluster.address, spinner=False, **kwargs)

    return run


def spin():
    while True:
        pass


def nap(_):
    time.sleep(300)


def start_children(folder):
    """Start a call's usual kinds of child processes, and record (pid, start time) of each in folder/pids.json."""
    import multiprocessing

    popens = [subprocess.Popen(["sleep", "300"]),  # a child
              subprocess.Popen(["sleep", "300"], start_new_session=True)]  # a child that left the process group
    pids = [p.pid for p in popens]
    background = os.path.join(folder, "background")
    os.system(f"sleep 300 & echo $! > {background}")  # a double fork: the shell exits, init adopts the sleep
    with open(background) as f:
        pids.append(int(f.read()))
    spinner = multiprocessing.Process(target=spin, daemon=True)  # a process at 100% CPU
    spinner.start()
    pids.append(spinner.pid)
    pool = multiprocessing.Pool(2)  # a pool left open (no `with`), its workers busy
    pool.map_async(nap, range(2))
    pids += [worker.pid for worker in pool._pool]

    def stamp(pid):
        return [pid, psutil.Process(pid).create_time()]

    record = {"executor": stamp(os.getpid()), "children": [stamp(pid) for pid in pids]}
    with open(os.path.join(folder, "pids.tmp"), "w") as f:
        json.dump(record, f)
    os.rename(os.path.join(folder, "pids.tmp"), os.path.join(folder, "pids.json"))
    return popens, spinner, pool  # (still referenced while the call runs)


def times_out(folder):
    children = start_children(folder)
    time.sleep(60)
    return children


def waits_to_be_cancelled(folder):
    children = start_children(folder)
    time.sleep(60)
    return children


def stuck_past_its_timeout(folder):
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGALRM})  # deaf to the timeout: its executor is killed
    children = start_children(folder)
    time.sleep(60)
    return children


def read_record(folder, timeout=15):
    path = os.path.join(folder, "pids.json")
    deadline = time.monotonic() + timeout
    while not os.path.exists(path):
        assert time.monotonic() < deadline, "the call did not start its processes"
        time.sleep(0.02)
    with open(path) as f:
        return json.load(f)


def running(pid, started):
    """Is this process (not a later one with its pid) still there, and not a zombie?"""
    try:
        proc = psutil.Process(pid)
        return abs(proc.create_time() - started) < 0.01 and proc.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def still_running(record, wait=5.0):
    deadline = time.monotonic() + wait
    while True:
        left = [pid for pid, started in record["children"] if running(pid, started)]
        if not left or time.monotonic() > deadline:
            return left
        time.sleep(0.05)


@pytest.fixture
def recorded(tmp_path):
    """The folder a call records its processes in; whatever of them is left is killed at the end."""
    yield str(tmp_path)
    path = tmp_path / "pids.json"
    if path.exists():
        for pid, started in json.loads(path.read_text())["children"]:
            if running(pid, started):
                psutil.Process(pid).kill()


def test_a_timed_out_call_takes_its_processes_with_it(rpm, recorded):
    with pytest.raises(burla.CallTimeoutError):
        rpm(times_out, [recorded], timeout=2)
    record = read_record(recorded)
    assert still_running(record) == []
    assert running(*record["executor"])  # the call was stopped by its timeout, its executor lives on
    # and it still runs calls (it was not left stuck terminating the call's pool)
    assert rpm(abs, range(-20, 0)) == list(range(20, 0, -1))


def test_a_cancelled_call_takes_its_processes_with_it(rpm, recorded):
    it = rpm(waits_to_be_cancelled, [recorded], generator=True)
    record = read_record(recorded)
    del it  # dropping the generator cancels the job
    gc.collect()
    assert still_running(record) == []
    assert running(*record["executor"])  # the call was interrupted, its executor was not killed
    assert rpm(abs, range(-20, 0)) == list(range(20, 0, -1))


def test_a_killed_executor_takes_its_calls_processes_with_it(rpm, recorded):
    start = time.monotonic()
    with pytest.raises(burla.CallTimeoutError):
        rpm(stuck_past_its_timeout, [recorded], timeout=2)
    assert time.monotonic() - start < 15
    record = read_record(recorded)
    assert not running(*record["executor"])  # killed by its worker, 1 s past the call's deadline
    assert still_running(record) == []
    assert rpm(abs, range(-20, 0)) == list(range(20, 0, -1))
