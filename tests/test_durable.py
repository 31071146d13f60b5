"""Durable jobs: detached jobs outlive their client, jobs outlive a SIGKILLed broker (restarted on the same state
dir), a client that is away past its lease is told, and the head's disk is bounded. Real brokers, workers and
clients; the network outages are in test_outages.py."""

import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
import threading
import time

import pytest

import burla
from burla import remote_parallel_map
from conftest import HERE, broker_only


def tenfold(x):
    print(f"call {x}")
    time.sleep(0.05)
    return x * 10


def slow(x):
    time.sleep(0.1)
    return x


def sleepy(x):
    time.sleep(x)
    return x


def wait_until(check, timeout=30, what="the condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(0.1)
    raise TimeoutError(f"{what} did not happen within {timeout} s")


def client(c, source, **env):
    """A client program in its own process (so that it can be killed)."""
    return subprocess.Popen([sys.executable, "-c", textwrap.dedent(source), c.address], env=dict(c.env, **env),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def restart_broker(c, *extra):
    old = c.procs.pop("broker")
    old.send_signal(signal.SIGKILL)
    old.wait()
    c.procs["broker"] = subprocess.Popen([sys.executable, "-m", "burla", "broker", "--bind", c.address, *extra],
                                         env=c.env)


def test_detached_job_outlives_its_client_and_another_process_attaches(new_cluster):
    c = new_cluster
    c.start_worker("w1", slots=2)
    c.wait_for(1)
    proc = client(c, """
        import sys, time
        from burla import remote_parallel_map
        from test_durable import tenfold
        job = remote_parallel_map(tenfold, range(60), detach=True, cluster=sys.argv[1])
        print(job.id, flush=True)
        time.sleep(120)
    """)
    try:
        job_id = proc.stdout.readline().strip()
        assert len(job_id) == 16, proc.stderr.read() if proc.poll() is not None else job_id
        proc.send_signal(signal.SIGKILL)  # the client is gone; the job is not
    finally:
        proc.kill()
        proc.wait()
    job = burla.attach(job_id, cluster=c.address)
    assert job.result(timeout=60, spinner=False) == [x * 10 for x in range(60)]
    status = job.status()
    assert (status.state, status.done, status.total, status.failed, status.detached) == ("done", 60, 60, 0, True)
    lines = sorted(line.text for line in job.logs())
    assert lines == sorted(f"call {x}" for x in range(60))
    assert job.result() == [x * 10 for x in range(60)]  # (again: kept on the head for its retention)
    assert burla.attach(job_id, cluster=c.address).result(spinner=False) == [x * 10 for x in range(60)]
    assert job_id in [j.id for j in burla.jobs(cluster=c.address)]
    with pytest.raises(burla.JobNotFoundError):
        burla.attach("0123456789abcdef", cluster=c.address)
    with pytest.raises(ValueError, match="16 hexadecimal"):
        burla.Job("not an id", cluster=c.address)


def test_detached_job_resumes_after_the_broker_is_killed(new_cluster):
    """SIGKILL of the broker mid-job, a new broker on the same state dir: the job goes on where its stored outcomes
    end, and every input ends in exactly one outcome."""
    c = new_cluster
    c.start_worker("w1", slots=2)
    c.wait_for(1)
    job = remote_parallel_map(slow, range(40), detach=True, cluster=c.address)
    wait_until(lambda: job.status().done >= 8, what="8 outcomes")
    restart_broker(c)
    c.wait_for(1)
    assert burla.attach(job.id, cluster=c.address).result(timeout=60, spinner=False) == list(range(40))
    status = job.status()
    assert (status.state, status.done, status.total) == ("done", 40, 40)


def test_attached_job_survives_the_broker_killed_and_down_for_a_while(new_cluster):
    """The client waits while the broker is down (it shows "reconnecting"), then submits the job again to the new
    broker, with the batches that have no outcome: every input ends in exactly one outcome."""
    c = new_cluster
    c.start_worker("w1", slots=2)
    c.wait_for(1)

    def outage():
        time.sleep(0.5)  # a third of the way through the job's 1.5 s of calls
        old = c.procs.pop("broker")
        old.send_signal(signal.SIGKILL)
        old.wait()
        time.sleep(3.0)
        c.start_broker()

    killer = threading.Thread(target=outage)
    killer.start()
    try:
        out = list(remote_parallel_map(slow, range(30), cluster=c.address, spinner=False, generator=True))
    finally:
        killer.join()
    assert sorted(out) == list(range(30))


def test_client_away_past_its_lease_is_told_its_job_was_cancelled(new_cluster):
    """A client stopped (SIGSTOP) for longer than its job's lease: the broker cancels the job, and the client,
    going on, raises JobExpiredError instead of waiting."""
    c = new_cluster
    c.start_worker("w1", slots=2)
    c.wait_for(1)
    proc = client(c, """
        import sys
        from burla import remote_parallel_map
        from test_durable import sleepy
        print("started", flush=True)
        try:
            remote_parallel_map(sleepy, [0.2] * 100, cluster=sys.argv[1], spinner=False)
        except Exception as e:
            print(type(e).__name__, e, flush=True)
    """, BURLA_JOB_LEASE="2")
    try:
        assert proc.stdout.readline().strip() == "started"
        wait_until(lambda: any(j["done"] for j in c.wait_for(1)["jobs"]), what="a call done")
        proc.send_signal(signal.SIGSTOP)
        wait_until(lambda: not c.wait_for(1)["jobs"], what="the job cancelled")
        proc.send_signal(signal.SIGCONT)
        out, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
        proc.wait()
    assert out.startswith("JobExpiredError") and "lease (2 s" in out, (out, err)


def test_cancel_of_a_detached_job(new_cluster):
    c = new_cluster
    c.start_worker("w1", slots=2)
    c.wait_for(1)
    job = remote_parallel_map(sleepy, [30] * 6, detach=True, cluster=c.address)
    wait_until(lambda: job.status().state == "running" and c.wait_for(1)["workers"][0]["busy"] == 2,
               what="both slots busy")
    job.cancel()
    assert job.status().state == "cancelled"
    with pytest.raises(burla.JobCancelledError):
        job.result(timeout=10, spinner=False)
    # the slots are free again at once (the running calls were stopped)
    assert remote_parallel_map(abs, [-1, -2], cluster=c.address, spinner=False) == [1, 2]


def test_retention_spool_limit_and_state_dir_errors(tmp_path):
    with broker_only() as c:
        restart_broker(c, "--retention", str(3 / 86400), "--spool-gb", str(1 / 1024))  # 3 s, 1 MiB
        c.start_worker("w1", slots=2)
        c.wait_for(1)
        # Past the spool limit, no more inputs for detached jobs (the client sees why); the broker goes on. (Inputs
        # of 400 kB: with 100 kB ones, a loaded machine's batches and their quick calls once kept the spool under
        # 1 MiB all along, and nothing was refused.)
        with pytest.raises(burla.BurlaError, match="spool is full"):
            remote_parallel_map(len, [os.urandom(400_000) for _ in range(30)], detach=True, cluster=c.address)
        job = remote_parallel_map(abs, [-1, -2, -3], detach=True, cluster=c.address)
        assert job.result(timeout=30, spinner=False) == [1, 2, 3]
        # Past its retention an ended job is gone, from memory and from disk.
        wait_until(lambda: job.id not in [j.id for j in burla.jobs(cluster=c.address)], timeout=30,
                   what="retention")
        with pytest.raises(burla.JobNotFoundError):
            burla.attach(job.id, cluster=c.address)
        db = sqlite3.connect(f"{c.dir}/broker.state/jobs/jobs.sqlite3")
        assert db.execute("SELECT COUNT(*) FROM jobs WHERE id = ?", (bytes.fromhex(job.id),)).fetchone()[0] == 0
        assert db.execute("SELECT COUNT(*) FROM outbox").fetchone()[0] == 0
        db.close()
        # A second broker on the same state dir refuses to start, clearly.
        other = subprocess.run([sys.executable, "-m", "burla", "broker", "--bind", f"ipc://{tmp_path}/other",
                                "--state-dir", f"{c.dir}/broker.state"], env=c.env, capture_output=True, text=True,
                               timeout=30)
        assert other.returncode == 2 and "another broker" in other.stderr, other.stderr
    # A corrupt state file: a clear error on start, nothing overwritten.
    state = tmp_path / "corrupt"
    (state / "jobs").mkdir(parents=True)
    (state / "jobs" / "jobs.sqlite3").write_bytes(b"not a database at all" * 100)
    bad = subprocess.run([sys.executable, "-m", "burla", "broker", "--bind", f"ipc://{tmp_path}/bad", "--state-dir",
                          str(state)], env=dict(os.environ, PYTHONPATH=HERE), capture_output=True, text=True,
                         timeout=30)
    assert bad.returncode == 2 and "corrupt" in bad.stderr, bad.stderr
    assert (state / "jobs" / "jobs.sqlite3").read_bytes() == b"not a database at all" * 100


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to mount a small tmpfs")
def test_a_full_disk_refuses_detached_inputs_clearly_and_the_broker_goes_on(tmp_path):
    state = tmp_path / "small"
    state.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=3m", "tmpfs", str(state)], capture_output=True,
                             timeout=10)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.decode().strip()}")
    try:
        with broker_only() as c:
            restart_broker(c, "--state-dir", str(state))
            c.start_worker("w1", slots=2)
            c.wait_for(1)
            with pytest.raises(burla.BurlaError, match="disk is (nearly )?full"):
                remote_parallel_map(len, [os.urandom(200_000) for _ in range(30)], detach=True,
                                    cluster=c.address)
            assert remote_parallel_map(abs, [-1], cluster=c.address, spinner=False) == [1]
            small = remote_parallel_map(abs, [-4, -5], detach=True, cluster=c.address)
            assert small.result(timeout=30, spinner=False) == [4, 5]
    finally:
        subprocess.run(["umount", "-l", str(state)], timeout=10)
