"""`burla jobs ...` against a real broker and a real worker: every command run as its own process."""

import json
import os
import pickle
import queue
import re
import signal
import subprocess
import sys
import threading
import time

import pytest

from burla import remote_parallel_map
from conftest import broker_only

JOB_ID = re.compile(r"\b[0-9a-f]{16}\b")
UNKNOWN = "0123456789abcdef"


# Run on the workers (functions at a module's top level travel by reference; the workers import this module).

def shout(x):
    print(f"out {x}", flush=True)
    print(f"err {x}", file=sys.stderr, flush=True)
    return x * 10


def gated(arg):
    """Print, then wait for the gate file to exist (the test decides when the job may end), then print again."""
    gate, i = arg
    print(f"before {i}", flush=True)
    while not os.path.exists(gate):
        time.sleep(0.05)
    print(f"after {i}", flush=True)
    return i


def fails_on_two(x):
    if x == 2:
        raise ZeroDivisionError(f"no good: {x}")
    return x


def as_set(x):
    return {x, -x}


@pytest.fixture
def c(new_cluster):
    """A broker of this test's own and one worker with two slots."""
    new_cluster.start_worker("w1", slots=2)
    new_cluster.wait_for(1, slots=2, timeout=60)
    return new_cluster


def jobs_cli(c, *args, timeout=120, env=None, cluster=True):
    command = [sys.executable, "-m", "burla", "jobs", *args] + (["--cluster", c.address] if cluster else [])
    return subprocess.run(command, env=env or c.env, capture_output=True, text=True, timeout=timeout)


def detach(c, function_, inputs):
    return remote_parallel_map(function_, inputs, detach=True, cluster=c.address, spinner=False)


def wait_ended(job, timeout=90):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        status = job.status()
        if status.state != "running":
            return status
        time.sleep(0.1)
    raise AssertionError(f"job {job.id} still running after {timeout} s: {job.status()}")


def wait_running(job, calls, timeout=90):
    """Until the job has `calls` calls under way (their "before" lines are in its logs)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if sum(line.text.startswith("before") for line in job.logs()) >= calls:
            return
        time.sleep(0.1)
    raise AssertionError(f"job {job.id}: {calls} calls did not start within {timeout} s")


class Live:
    """A `burla jobs ...` process still running: its stdout and stderr lines as they come."""

    def __init__(self, c, *args):
        self.proc = subprocess.Popen([sys.executable, "-m", "burla", "jobs", *args, "--cluster", c.address],
                                     env=c.env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        self.lines = {"stdout": [], "stderr": []}
        self.new = queue.Queue()
        self.threads = [threading.Thread(target=self._read, args=(name,), daemon=True) for name in self.lines]
        for t in self.threads:
            t.start()

    def _read(self, name):
        for line in getattr(self.proc, name):
            self.lines[name].append(line)
            self.new.put(None)

    def wait_for(self, name, text, timeout=90):
        deadline = time.monotonic() + timeout
        while not any(text in line for line in self.lines[name]):
            try:
                self.new.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                raise AssertionError(f"no {text!r} on {name} within {timeout} s: {self.lines}") from None

    def finish(self, timeout=90):
        rc = self.proc.wait(timeout=timeout)
        for t in self.threads:
            t.join(timeout=10)
        return rc, "".join(self.lines["stdout"]), "".join(self.lines["stderr"])

    def kill(self):
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=30)


def test_list_text_and_json(c):
    # No job yet; the cluster comes from $BURLA_CLUSTER here, as `burla status` takes it.
    env = dict(c.env, BURLA_CLUSTER=c.address)
    r = jobs_cli(c, "list", env=env, cluster=False)
    assert (r.returncode, r.stdout.strip()) == (0, "no jobs"), r
    r = jobs_cli(c, "list", "--json")
    assert (r.returncode, json.loads(r.stdout)) == (0, []), r

    first = detach(c, shout, range(3))
    wait_ended(first)
    second = detach(c, fails_on_two, range(4))
    wait_ended(second)

    r = jobs_cli(c, "list")
    assert r.returncode == 0, r
    header, *rows = r.stdout.splitlines()
    assert header.split() == ["ID", "STATE", "DONE/TOTAL", "FAILED", "ELAPSED", "DETACHED", "REASON"]
    assert [JOB_ID.search(row).group() for row in rows] == [second.id, first.id]  # newest first
    cells = rows[1].split()
    assert cells[0] == first.id and cells[1] == "done" and cells[2] == "3/3" and cells[3] == "0"
    assert cells[5] == "yes" and cells[6] == "-"
    cells = rows[0].split()
    assert cells[1] == "failed" and cells[3] == "1" and cells[5] == "yes"
    assert "ZeroDivisionError" in rows[0]  # (the reason)

    r = jobs_cli(c, "list", "--json")
    assert r.returncode == 0, r
    listed = json.loads(r.stdout)
    assert [j["id"] for j in listed] == [second.id, first.id]
    assert set(listed[1]) == {"id", "state", "done", "total", "failed", "started", "elapsed", "detached", "reason"}
    assert {k: listed[1][k] for k in ("state", "done", "total", "failed", "detached", "reason")} == \
        {"state": "done", "done": 3, "total": 3, "failed": 0, "detached": True, "reason": None}
    assert listed[0]["state"] == "failed" and listed[0]["failed"] == 1 and listed[0]["reason"]
    assert listed[0]["started"] >= listed[1]["started"] > 0


def test_show_logs_and_results(c, tmp_path):
    job = detach(c, shout, range(4))
    wait_ended(job)

    r = jobs_cli(c, "show", job.id)
    assert r.returncode == 0, r
    shown = dict(line.split(": ", 1) for line in r.stdout.splitlines())
    assert {k: shown[k] for k in ("id", "state", "done", "total", "failed", "detached", "reason")} == \
        {"id": job.id, "state": "done", "done": "4", "total": "4", "failed": "0", "detached": "yes", "reason": "-"}
    assert shown["elapsed"].endswith(" s") and shown["started"]
    r = jobs_cli(c, "show", job.id.upper(), "--json")  # (an id in capitals is the same id)
    assert r.returncode == 0, r
    assert json.loads(r.stdout) == dict(job.status()._asdict(), elapsed=json.loads(r.stdout)["elapsed"])

    r = jobs_cli(c, "logs", job.id)
    assert r.returncode == 0, r
    lines = r.stdout.splitlines()
    assert len(lines) == 8 and all(re.fullmatch(r"(! )?\[input \d\] \[w1/[01]\] (out|err) \d", l) for l in lines)
    assert {re.sub(r"\[w1/[01]\] ", "", line) for line in lines} == \
        {f"[input {x}] out {x}" for x in range(4)} | {f"! [input {x}] err {x}" for x in range(4)}
    r = jobs_cli(c, "logs", job.id, "--json")
    assert r.returncode == 0, r
    records = [json.loads(line) for line in r.stdout.splitlines()]
    assert sorted((d["input"], d["stream"], d["text"]) for d in records) == \
        sorted([(x, "stdout", f"out {x}") for x in range(4)] + [(x, "stderr", f"err {x}") for x in range(4)])
    assert all(re.fullmatch(r"w1/[01]", d["worker"]) for d in records)

    r = jobs_cli(c, "results", job.id)
    assert (r.returncode, r.stdout) == (0, "0\n10\n20\n30\n"), r
    assert "out 0" not in r.stdout + r.stderr  # (the calls' output is `logs`'s business)
    r = jobs_cli(c, "results", job.id, "--json")
    assert (r.returncode, json.loads(r.stdout)) == (0, [0, 10, 20, 30]), r
    out = tmp_path / "results.pkl"
    r = jobs_cli(c, "results", job.id, "--out", str(out))
    assert r.returncode == 0, r
    assert "4 results" in r.stdout and str(out) in r.stdout
    with open(out, "rb") as f:
        assert pickle.load(f) == [0, 10, 20, 30]


def test_results_that_json_cannot_hold(c, tmp_path):
    job = detach(c, as_set, [1, 2])
    wait_ended(job)
    r = jobs_cli(c, "results", job.id)
    assert (r.returncode, r.stdout) == (0, f"{ {1, -1} !r}\n{ {2, -2} !r}\n"), r
    r = jobs_cli(c, "results", job.id, "--json")
    assert r.returncode == 1 and r.stdout == "", r
    assert "input 0 is not JSON-serialisable" in r.stderr and "--out" in r.stderr
    assert "Traceback" not in r.stderr
    out = tmp_path / "sets.pkl"
    r = jobs_cli(c, "results", job.id, "--out", str(out), "--json")
    assert r.returncode == 0, r
    assert json.loads(r.stdout) == {"id": job.id, "written": 2, "out": str(out)}
    with open(out, "rb") as f:
        assert pickle.load(f) == [{1, -1}, {2, -2}]


def test_results_of_a_failed_job(c):
    job = detach(c, fails_on_two, range(4))
    wait_ended(job)
    r = jobs_cli(c, "results", job.id)
    assert r.returncode == 1 and r.stdout == "", r
    assert "input 2 raised ZeroDivisionError: no good: 2" in r.stderr
    assert 'raise ZeroDivisionError(f"no good: {x}")' in r.stderr  # (the remote traceback, with its source line)


def test_logs_follow_ends_when_the_job_ends(c, tmp_path):
    gate = tmp_path / "gate"
    job = detach(c, gated, [(str(gate), i) for i in range(2)])
    follow = Live(c, "logs", job.id, "--follow")
    try:
        follow.wait_for("stdout", "before 0")
        follow.wait_for("stdout", "before 1")
        assert job.status().state == "running"  # (held by the gate: it cannot end before the file exists)
        assert follow.proc.poll() is None  # following, not done
        gate.touch()
        rc, out, err = follow.finish()
    finally:
        follow.kill()
    assert rc == 0, (out, err)
    texts = [re.sub(r"^\[input \d\] \[w1/[01]\] ", "", line) for line in out.splitlines()]
    assert sorted(texts) == ["after 0", "after 1", "before 0", "before 1"]  # each line once
    assert wait_ended(job).state == "done"

    r = jobs_cli(c, "logs", job.id, "--follow", "--json")  # (an ended job: what it has, then the end)
    assert r.returncode == 0, r
    assert sorted(json.loads(line)["text"] for line in r.stdout.splitlines()) == sorted(texts)


def test_attach_a_job_until_it_finishes(c, tmp_path):
    gate = tmp_path / "gate"
    job = detach(c, gated, [(str(gate), i) for i in range(3)])
    attach = Live(c, "attach", job.id)
    try:
        attach.wait_for("stderr", f"attached to job {job.id}")
        attach.wait_for("stdout", "before 0")  # the calls' output, live
        assert attach.proc.poll() is None
        gate.touch()
        rc, out, err = attach.finish()
    finally:
        attach.kill()
    assert rc == 0, (out, err)
    lines = out.splitlines()
    assert sorted(lines[:-1]) == ["after 0", "after 1", "after 2", "before 0", "before 1", "before 2"]
    assert lines[-1].startswith(f"job {job.id} done: 3/3 done, 0 failed")
    assert "Traceback" not in err

    r = jobs_cli(c, "attach", job.id, "--json")  # (again, once it ended: the calls' output goes to stderr)
    assert r.returncode == 0, r
    summary = json.loads(r.stdout)
    assert (summary["id"], summary["state"], summary["done"], summary["ok"], summary["error"]) == \
        (job.id, "done", 3, True, None)
    assert "after 2" in r.stderr


def test_attach_a_job_that_fails(c):
    job = detach(c, fails_on_two, range(4))
    r = jobs_cli(c, "attach", job.id)
    assert r.returncode == 1, r
    assert re.search(rf"^job {job.id} failed: \d/4 done, 1 failed", r.stdout, re.M), r
    assert "error: the call on input 2 raised ZeroDivisionError: no good: 2" in r.stderr


def test_a_job_that_is_not_detached_stays_its_submitters(c, tmp_path):
    import burla

    gate = tmp_path / "gate"
    owner = subprocess.Popen(
        [sys.executable, "-c", f"import burla, test_jobs_cli as t; print(burla.remote_parallel_map(t.gated, "
                               f"[({str(gate)!r}, i) for i in range(2)], cluster={c.address!r}, spinner=False))"],
        env=c.env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    attach = None
    try:
        deadline = time.monotonic() + 90
        while not burla.jobs(c.address) and time.monotonic() < deadline:
            time.sleep(0.1)
        (listed,) = burla.jobs(c.address)
        assert not listed.detached
        job = burla.attach(listed.id, c.address)
        r = jobs_cli(c, "results", job.id)
        assert (r.returncode, r.stdout) == (1, ""), r
        assert "was not submitted with detach=True" in r.stderr
        attach = Live(c, "attach", job.id)
        attach.wait_for("stderr", f"attached to job {job.id} (running")
        assert job.status().state == "running" and attach.proc.poll() is None  # (held by the gate)
        gate.touch()
        rc, out, err = attach.finish()
        assert rc == 0, (out, err)
        assert out.splitlines()[-1].startswith(f"job {job.id} done: 2/2 done, 0 failed")
        out, err = owner.communicate(timeout=90)
        # The submitter got its results and its calls' output: attach took nothing from it.
        assert owner.returncode == 0 and out.splitlines()[-1] == "[0, 1]", (out, err)
        assert sorted(out.splitlines()[:-1]) == ["after 0", "after 1", "before 0", "before 1"]
    finally:
        for proc in (owner, attach and attach.proc):
            if proc is not None and proc.poll() is None:
                proc.kill()
                proc.wait(timeout=30)


def test_cancel_a_long_running_job(c, tmp_path):
    gate = tmp_path / "never"  # (never made: the calls would wait forever)
    job = detach(c, gated, [(str(gate), i) for i in range(5)])
    try:
        wait_running(job, 2)
        r = jobs_cli(c, "cancel", job.id)
        assert r.returncode == 0, r
        assert r.stdout.startswith(f"job {job.id} cancelled: 0/5 done"), r
        assert job.status().state == "cancelled"
        assert "cancelled" == json.loads(jobs_cli(c, "show", job.id, "--json").stdout)["state"]

        r = jobs_cli(c, "results", job.id)
        assert (r.returncode, r.stdout) == (1, ""), r
        assert f"job {job.id} has no complete results: the job was cancelled" in r.stderr
        assert "Traceback" not in r.stderr
        r = jobs_cli(c, "attach", job.id)
        assert r.returncode == 1 and "error: the job was cancelled" in r.stderr, r

        r = jobs_cli(c, "cancel", job.id, "--json")  # again: it has already ended
        assert r.returncode == 0, r
        again = json.loads(r.stdout)
        assert (again["state"], again["was_running"]) == ("cancelled", False)
    finally:
        if job.status().state == "running":
            job.cancel()
    # The worker's slots are free again: a new job runs.
    assert remote_parallel_map(abs, [-1, -2], cluster=c.address, spinner=False) == [1, 2]


def test_interrupted_follow_leaves_the_job_running(c, tmp_path):
    gate = tmp_path / "gate"
    job = detach(c, gated, [(str(gate), 0)])
    follow = Live(c, "logs", job.id, "-f")
    try:
        follow.wait_for("stdout", "before 0")
        follow.proc.send_signal(signal.SIGINT)
        rc, out, err = follow.finish()
    finally:
        follow.kill()
    assert rc == 130, (out, err)
    assert f"interrupted (job {job.id} goes on)" in err and "Traceback" not in err
    assert job.status().state == "running"
    gate.touch()
    assert wait_ended(job).state == "done"


@pytest.fixture(scope="module")
def bare():
    """A broker with no workers, shared: asking about ids needs no more."""
    with broker_only() as b:
        b.wait_for(0)
        yield b


@pytest.mark.parametrize("action", ["show", "logs", "attach", "results", "cancel"])
def test_bad_and_unknown_ids(bare, action):
    c = bare
    for bad in ("xyz", "0123", UNKNOWN + "0", "g123456789abcdef"):
        r = jobs_cli(c, action, bad)
        assert r.returncode == 2, r
        assert f"{bad!r} is not a job id (16 hexadecimal digits" in r.stderr and "Traceback" not in r.stderr
    r = jobs_cli(c, action, UNKNOWN)
    assert (r.returncode, r.stdout) == (1, ""), r
    assert r.stderr.strip() == f"burla jobs {action}: no job {UNKNOWN} for this API key"


def test_no_cluster_and_no_broker(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("BURLA_CLUSTER", "BURLA_API_KEY")}
    env["BURLA_CONFIG"] = str(tmp_path / "no-config.toml")
    base = [sys.executable, "-m", "burla", "jobs"]
    r = subprocess.run(base + ["list"], env=env, capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "no cluster configured" in r.stderr and "--cluster" in r.stderr, r

    nowhere = f"ipc://{tmp_path}/no-broker"
    for args in (["list"], ["show", UNKNOWN]):
        # (a 1 s wait for the answer, not the default 5 s: the message is the same)
        r = subprocess.run(base + args + ["--cluster", nowhere], env=dict(env, BURLA_REQUEST_TIMEOUT="1"),
                           capture_output=True, text=True, timeout=120)
        assert r.returncode == 1, r
        assert f"no answer from the burla broker at {nowhere}" in r.stderr and "Traceback" not in r.stderr

    r = subprocess.run(base + ["list", "--cluster", "http://example.com"], env=env, capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 2 and "expected 'local', 'tcp://HOST:PORT' or 'ipc://PATH'" in r.stderr, r
    r = subprocess.run(base + ["list", "--cluster", "tcp://127.0.0.1:9", "--api-key", "nonsense"], env=env,
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "--api-key" in r.stderr and "Traceback" not in r.stderr, r


def test_every_action_has_help():
    for action in ("list", "show", "logs", "attach", "results", "cancel"):
        r = subprocess.run([sys.executable, "-m", "burla", "jobs", action, "--help"], capture_output=True,
                           text=True, timeout=60)
        assert r.returncode == 0 and "--json" in r.stdout and "--cluster" in r.stdout, r
    r = subprocess.run([sys.executable, "-m", "burla", "jobs", "--help"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and all(a in r.stdout for a in ("list", "show", "logs", "attach", "results", "cancel"))
    assert "exit status" in r.stdout
