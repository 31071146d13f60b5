"""Workers that die mid-job lose nothing: their batches run again elsewhere, every input gets one outcome."""

import os
import signal
import subprocess
import sys
import threading
import time

import psutil
import pytest

import burla
from burla import remote_parallel_map


def slow_identity(x):
    time.sleep(0.1)
    return x


def kill_later(delay, pids):
    def run():
        time.sleep(delay)
        for pid in pids:
            os.kill(pid, signal.SIGKILL)

    thread = threading.Thread(target=run)
    thread.start()
    return thread


def test_killed_executor_loses_nothing(cluster):
    victims = cluster.executor_pids("w1")[:1]
    killer = kill_later(0.5, victims)
    out = remote_parallel_map(slow_identity, range(40), cluster=cluster.address, spinner=False)
    killer.join()
    assert out == list(range(40))
    # the worker started a new executor in its place, and the cluster still works
    deadline = time.monotonic() + 10
    while len(cluster.executor_pids("w1")) < 2 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert len(cluster.executor_pids("w1")) == 2 and victims[0] not in cluster.executor_pids("w1")
    assert remote_parallel_map(abs, [-1] * 10, cluster=cluster.address, spinner=False) == [1] * 10


def test_killed_worker_host_loses_nothing(new_cluster):
    c = new_cluster
    c.start_worker("stays", 2)
    c.start_worker("dies", 2)
    c.wait_for(2, slots=4)
    # the whole worker goes: its process and, with it, its executors
    killer = kill_later(0.5, [c.procs["dies"].pid])
    start = time.monotonic()
    out = remote_parallel_map(slow_identity, range(30), cluster=c.address, spinner=False)
    killer.join()
    assert sorted(out) == out == list(range(30))
    assert time.monotonic() - start < 15
    state = c.wait_for(1)
    assert [w["id"] for w in state["workers"]] == ["stays"]


def test_call_that_kills_its_executor_fails_with_worker_died(cluster):
    def crash_on_five(x):
        if x == 5:
            os._exit(13)
        return x

    with pytest.raises(burla.WorkerDiedError, match="exit code 13") as info:
        remote_parallel_map(crash_on_five, range(10), cluster=cluster.address, spinner=False)
    assert info.value.burla_input_index <= 5
    assert remote_parallel_map(abs, [-3], cluster=cluster.address, spinner=False) == [3]


def test_broker_gone_past_the_lease_raises_instead_of_hanging_and_workers_rejoin_a_new_one(new_cluster, monkeypatch):
    """A client waits for a lost broker for the job's lease (BURLA_JOB_LEASE), then raises."""
    c = new_cluster
    c.start_worker("w", 2)
    c.wait_for(1)
    monkeypatch.setenv("BURLA_JOB_LEASE", "2")
    # the client's waits, read when they are used: silence (4 s) and grace past the lease (12 s) cut to seconds
    monkeypatch.setattr("burla.client.SILENCE_LIMIT", 2.0)
    monkeypatch.setattr("burla.client.LEASE_GRACE", 1.0)
    killer = kill_later(0.5, [c.procs["broker"].pid])
    start = time.monotonic()
    with pytest.raises(burla.ClusterConnectionError, match="longer than the job's lease"):
        remote_parallel_map(slow_identity, range(100), cluster=c.address, spinner=False)
    assert time.monotonic() - start < 25  # (the lease, and a grace to hear from a broker that comes back)
    print(f"broker killed: the client raised after {time.monotonic() - start - 0.5:.2f} s")
    killer.join()
    c.procs.pop("broker").wait()
    c.start_broker()  # a new broker on the same address: the worker finds it and registers again
    c.wait_for(1, slots=2)
    assert remote_parallel_map(abs, [-1, -2], cluster=c.address, spinner=False) == [1, 2]


def alive(pid):
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def test_executors_die_with_their_worker_even_mid_call(new_cluster):
    c = new_cluster
    c.start_worker("w", 2)
    c.wait_for(1)
    executors = c.executor_pids("w")
    client = subprocess.Popen([sys.executable, "-c", "import time; from burla import remote_parallel_map; "
                               f"remote_parallel_map(time.sleep, [60, 60], cluster={c.address!r})"])
    try:
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and not all(w["busy"] for w in c.wait_for(1)["workers"]):
            time.sleep(0.05)
        os.kill(c.procs["w"].pid, signal.SIGKILL)
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline and any(alive(p) for p in executors):
            time.sleep(0.05)
        assert not any(alive(p) for p in executors)
    finally:
        client.kill()
        client.wait()


def test_a_job_the_restarted_broker_does_not_have_is_submitted_again(new_cluster):
    """A broker restarted at once answers heartbeats again, so silence is never seen; its heartbeat answers list
    the client's jobs, and the client submits a job missing from them again, with the batches that have no
    outcome: the job ends with every result, once each."""
    c = new_cluster
    c.start_worker("w", 2)
    c.wait_for(1)

    def restart():
        time.sleep(1.0)
        c.procs.pop("broker").kill()
        c.start_broker()

    restarter = threading.Thread(target=restart)
    restarter.start()
    start = time.monotonic()
    assert remote_parallel_map(slow_identity, range(50), cluster=c.address, spinner=False) == list(range(50))
    restarter.join()
    assert time.monotonic() - start < 30
