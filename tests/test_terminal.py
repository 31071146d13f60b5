"""What a terminal user sees: the progress line and its summary, `burla status` (one-shot and --watch), and the
CLI's messages about addresses, API keys, `burla login` and a worker joining its broker."""

import io
import os
import pty
import re
import select
import signal
import subprocess
import sys
import tempfile
import threading
import time

import pytest

from burla import config, progress, security
from burla.cli import watch_view
from conftest import Cluster, broker_only
from test_security import SecureCluster, free_port

BURLA = [sys.executable, "-m", "burla"]
ANSI = re.compile(r"\x1b(\[[0-9;?]*[A-Za-z]|[()][A-Z0-9]|[=>])")


class Tty(io.StringIO):
    """A stderr that says it is a terminal (of no known width: the view assumes 80 columns)."""

    def isatty(self):
        return True

    def fileno(self):
        raise OSError("no file")


def tty_stderr(monkeypatch):
    """(Set in the test itself: pytest's capture sets sys.stderr again between a fixture and its test.)"""
    err = Tty()
    monkeypatch.setattr(sys, "stderr", err)
    monkeypatch.delenv("BURLA_PARENT", raising=False)
    return err


def line_of(view, width=200):
    """The progress line as a terminal this wide would show it."""
    return view.bar.format_meter(**dict(view.bar.format_dict, ncols=width))


def burla(*args, env=None, timeout=60):
    return subprocess.run(BURLA + list(args), capture_output=True, text=True, timeout=timeout,
                          env=dict(os.environ, **(env or {})))


# ---------------------------------------------------------------- the progress line and its summary

def test_progress_line_shows_failures_and_the_slowest_worker(monkeypatch):
    err = tty_stderr(monkeypatch)
    view = progress.create(True, 2000)
    view.name("my_function")
    view.advance(600, "w1/0", 0, 60.0)  # 0.1 s a call
    view.advance(600, "w2/1", 3, 66.0)
    view.advance(34, "w3/0", 0, 71.4)  # 2.1 s a call: much slower than the others
    view.update_extra(force=True)
    shown = line_of(view)
    assert shown.startswith("burla my_function:") and "1234/2000 [" in shown and "call/s]" in shown, shown
    assert shown.endswith("  3 failed  slowest: w3 (2.1 s/call)"), shown
    view.close("done")
    assert re.search(r"\rburla: my_function: 1,234 calls in [\d.]+ s, 3 failed\n$", err.getvalue())


def test_no_slowest_with_one_worker_or_workers_alike(monkeypatch):
    err = tty_stderr(monkeypatch)
    view = progress.create(True, None)
    view.advance(10, "w1/0", 0, 50.0)
    view.advance(10, "w1/1", 0, 1.0)  # (one worker's slots: one worker)
    assert view.slowest() == []
    view.advance(10, "w2/0", 0, 3.0)  # 0.3 s a call against w1's 2.55: w1 is the slow one
    assert [w for w, _ in view.slowest()] == ["w1"]
    view.advance(10, "w3/0", 0, 30.0)
    view.advance(10, "w4/0", 0, 28.0)  # the typical worker is now as slow: nobody stands out
    assert view.slowest() == []
    view.advance(5, "w5/0", 0, None)  # (seconds unknown: counted, not timed)
    view.update_extra(force=True)
    assert "slowest" not in line_of(view) and "55 [" in line_of(view)
    assert view.slowest() == []
    view.close("cancelled")
    assert re.search(r"burla: cancelled after 55 calls \([\d.]+ s\)\n$", err.getvalue())


def test_the_summary_says_how_the_job_ended(monkeypatch):
    err = tty_stderr(monkeypatch)
    view = progress.create(True, 2000)
    view.advance(812, "w1/0")
    view.advance(0, "w1/0", 1, 0.5)
    view.failure(812, "ZeroDivisionError", "division by zero", "", "0")
    view.close("failed")
    view.close("failed")  # (once only)
    assert re.fullmatch(r"(?s).*\rburla: failed after 812 of 2,000 calls, 1 failed \([\d.]+ s\)\n",
                        err.getvalue())

    view = progress.create(True, 1)
    view.close("cancelled")
    assert re.search(r"burla: cancelled after 0 of 1 call \([\d.]+ s\)\n$", err.getvalue())

    view = progress.create(True, 3)  # return_exceptions: done, with a failure, and which was first
    view.advance(3, "w1/0", 1)
    view.failure(1, "ValueError", "no", "", "1")
    view.close("done")
    assert re.search(r"burla: 3 calls in [\d.]+ s, 1 failed \(the first: ValueError on input 1\)\n$",
                     err.getvalue())


def test_a_summary_in_scripts_but_not_when_silent_unasked_or_nested(monkeypatch):
    monkeypatch.delenv("BURLA_PARENT", raising=False)
    err = io.StringIO()  # not a terminal: no bar, still the summary
    monkeypatch.setattr(sys, "stderr", err)
    view = progress.create(True, None)
    assert view.bar is None
    view.tick()
    view.advance(2, "w1/0", 0, 0.1)
    view.close("done")
    assert re.fullmatch(r"burla: 2 calls in [\d.]+ s, 0 failed\n", err.getvalue())
    for spinner in (None, False):  # Silent, and spinner=False
        view = progress.create(spinner, 5)
        view.advance(5, "w1/0", 0, 1.0)
        view.failure(0, "E", "m", "", "")
        view.name("f")
        view.close("done")
    monkeypatch.setenv("BURLA_PARENT", "0123456789abcdef:w1/0")  # inside a call
    progress.create(True, 1).close("done")
    progress.create(True, 1, summary=False).close("done")
    progress.create(True, 1).close("running")  # (stopped following a job that goes on: nothing to sum up)
    assert err.getvalue().count("\n") == 1


def run_on_a_terminal(source, tmp_path, interrupt_after=None):
    """Run a script with stderr on a pseudo-terminal; with interrupt_after, SIGINT once that text showed."""
    path = tmp_path / "tty.py"
    path.write_text(source)
    leader, follower = pty.openpty()
    proc = subprocess.Popen([sys.executable, str(path)], stdout=subprocess.PIPE, stderr=follower, cwd=tmp_path,
                            env=dict(os.environ, TMPDIR=str(tmp_path), COLUMNS="120"))
    os.close(follower)
    shown, deadline = b"", time.monotonic() + 90
    try:
        while time.monotonic() < deadline:
            if select.select([leader], [], [], 0.2)[0]:
                try:
                    data = os.read(leader, 65536)
                except OSError:
                    break
                if not data:
                    break
                shown += data
            if interrupt_after and interrupt_after in shown.decode(errors="replace"):
                proc.send_signal(signal.SIGINT)
                interrupt_after = None
        out, _ = proc.communicate(timeout=60)
    finally:
        proc.kill()
        proc.wait()
        os.close(leader)
    return proc.returncode, out.decode(), shown.decode(errors="replace")


def test_a_terminal_keeps_a_summary_line_when_the_bar_goes(tmp_path):
    rc, out, shown = run_on_a_terminal(
        "import time\nfrom burla import remote_parallel_map\n"
        "print(len(remote_parallel_map(lambda x: time.sleep(0.02) or x, range(30))))\n", tmp_path)
    assert rc == 0 and out.strip() == "30", shown
    assert "/30 [" in shown  # the bar showed, then the summary stayed
    assert re.search(r"burla: (\S+: )?30 calls in [\d.]+ s, 0 failed\r?\n", shown), shown


def test_ctrl_c_leaves_a_cancelled_summary(tmp_path):
    rc, out, shown = run_on_a_terminal(
        "import sys, time\nfrom burla import remote_parallel_map\n"
        "remote_parallel_map(lambda x: print('ran', x, file=sys.stderr) or time.sleep(0.5), range(200))\n",
        tmp_path, interrupt_after="ran ")
    assert rc != 0 and "KeyboardInterrupt" in shown
    assert re.search(r"burla: (\S+: )?cancelled after \d+ of 200 calls \([\d.]+ s\)", shown), shown


# ---------------------------------------------------------------- addresses and keys

def test_one_spelling_of_an_address():
    n = config.normalize_address
    assert n("127.0.0.1:5555") == n("tcp://127.0.0.1:5555") == "tcp://127.0.0.1:5555"
    assert n(" host:5555 ") == "tcp://host:5555" and n("[::1]:7") == "tcp://[::1]:7"
    assert n("ipc:///tmp/x/broker") == "ipc:///tmp/x/broker"
    assert n("*:5555", bind=True) == "tcp://*:5555"
    for bad in ("http://example.com:80", "example.com", "tcp://host", "host:0", "host:70000", "*:5555", "ipc://",
                "", "a b:1"):
        with pytest.raises(ValueError, match=r"expected 'tcp://HOST:PORT' or 'ipc://PATH' \(or HOST:PORT"):
            n(bad)
    assert config.cluster_address("h:1") == "tcp://h:1" and config.cluster_address("local") == "local"


def test_bad_addresses_are_refused_plainly_everywhere(tmp_path):
    env = {"BURLA_CONFIG": str(tmp_path / "config.toml")}
    for args in (["worker", "--broker", "nowhere"], ["status", "--cluster", "http://x:1"],
                 ["login", "ftp://x:1", "--api-key", "x"], ["broker", "--bind", "tcp://:5555"]):
        r = burla(*args, env=env)
        assert r.returncode == 2 and "tcp://HOST:PORT" in r.stderr and "Traceback" not in r.stderr, (args, r)
    assert not (tmp_path / "config.toml").exists()


def test_a_malformed_api_key_says_what_a_key_looks_like(tmp_path):
    secret = "f" * 63 + "z"
    r = burla("login", "127.0.0.1:9", "--api-key", "bk1-a-b", env={"BURLA_CONFIG": str(tmp_path / "c.toml")})
    assert r.returncode == 2 and "Traceback" not in r.stderr, r
    assert "bk1-<key id>-<secret>" in r.stderr and "burla broker" in r.stderr and "has 1 character, not 64" in r.stderr
    for key, said in ((f"bk1-{'a' * 64}-{secret}", "secret is not all hexadecimal"),
                      (f"bw1-{'a' * 64}-{'b' * 64}", "this is a worker token"),
                      (f"bk1-{secret}", "2 parts")):
        with pytest.raises(ValueError, match=said) as e:
            security.parse(key, security.CLIENT)
        assert "bk1-<key id>-<secret>" in str(e.value) and secret not in str(e.value)


# ---------------------------------------------------------------- login, status and workers over TCP

@pytest.fixture(scope="module")
def secure(tmp_path_factory):
    c = SecureCluster(tmp_path_factory.mktemp("secure"))
    yield c
    c.stop()


def test_login_with_host_port_saves_tcp_and_checks_the_broker(secure, tmp_path):
    env = {"BURLA_CONFIG": str(tmp_path / "config.toml")}
    host_port = secure.address.removeprefix("tcp://")
    r = burla("login", host_port, "--api-key", secure.api_key, env=env)
    assert r.returncode == 0, r
    assert f"the broker at {secure.address} answered: 1 worker, 2 slots" in r.stdout, r
    assert f'cluster = "{secure.address}"' in (tmp_path / "config.toml").read_text()

    r = burla("status", env=env)  # (what login saved works as it is)
    assert r.returncode == 0 and f"cluster {secure.address}: 1 worker, 2 slots, 0 jobs" in r.stdout, r
    r = burla("status", "--cluster", host_port, "--api-key", secure.api_key)
    assert r.returncode == 0 and "1 worker, 2 slots" in r.stdout, r

    nowhere = f"127.0.0.1:{free_port()}"
    start = time.monotonic()
    r = burla("login", nowhere, "--api-key", secure.api_key, env=env)
    assert r.returncode == 0 and "saved to" in r.stdout and time.monotonic() - start < 20, r
    assert f"no answer from a burla broker at tcp://{nowhere} within 3 s" in r.stderr and "API key" in r.stderr
    assert f'cluster = "tcp://{nowhere}"' in (tmp_path / "config.toml").read_text()


def read_lines(stream, into):
    for line in iter(stream.readline, ""):
        into.append(line)


def wait_for_line(lines, text, timeout=30):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if any(text in line for line in lines):
            return
        time.sleep(0.05)
    raise AssertionError(f"never saw {text!r} in {lines}")


def test_a_worker_with_host_port_joins_and_says_so(secure):
    worker = subprocess.Popen(BURLA + ["worker", "--broker", secure.address.removeprefix("tcp://"), "--slots", "1",
                                       "--name", "w2"], env=dict(secure.env, BURLA_WORKER_TOKEN=secure.token),
                              stderr=subprocess.PIPE, text=True)
    lines = []
    try:
        threading.Thread(target=read_lines, args=(worker.stderr, lines), daemon=True).start()
        wait_for_line(lines, f"burla worker: joined the broker at {secure.address} as w2 with 1 slot")
    finally:
        worker.kill()
        worker.wait()
    assert not any("Traceback" in line for line in lines), lines


def test_a_worker_names_the_broker_it_cannot_reach_once_then_joins():
    with tempfile.TemporaryDirectory(prefix="burla-test-") as d:
        c = Cluster(d)
        try:
            c.procs["w1"] = worker = subprocess.Popen(
                BURLA + ["worker", "--broker", c.address, "--slots", "1", "--name", "w1"],
                env=dict(c.env, BURLA_HEARTBEAT_INTERVAL="0.2"), stderr=subprocess.PIPE, text=True)
            lines = []
            threading.Thread(target=read_lines, args=(worker.stderr, lines), daemon=True).start()
            wait_for_line(lines, f"no answer from the broker at {c.address}")
            time.sleep(3)  # five more attempts (every 0.6 s): not five more lines
            assert sum("registering again" in line for line in lines) == 1, lines
            c.start_broker()
            wait_for_line(lines, f"burla worker: joined the broker at {c.address} as w1 with 1 slot")
            c.wait_for(1, slots=1)
        finally:
            c.stop()


# ---------------------------------------------------------------- burla status

def sleepy(x):
    time.sleep(0.2)
    return x


def test_status_shows_done_of_total_and_singular_counts(cluster):
    job = threading.Thread(target=lambda: __import__("burla").remote_parallel_map(
        sleepy, range(30), cluster=cluster.address, spinner=False))
    job.start()
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            r = burla("status", "--cluster", cluster.address)
            assert r.returncode == 0, r
            job_lines = [line for line in r.stdout.splitlines() if line.strip().startswith("job ")]
            if job_lines and "/30" in job_lines[0]:
                break
            time.sleep(0.2)
        else:
            raise AssertionError(r.stdout)
        assert r.stdout.startswith(f"cluster {cluster.address}: 1 worker, 2 slots, 1 job\n"), r.stdout
        assert re.search(r"done \d+/30  failed 0", job_lines[0]) and "sleepy" in job_lines[0], job_lines
    finally:
        job.join(60)


def rendered(view, width=160):
    from rich.console import Console

    console = Console(file=io.StringIO(), width=width, color_system=None)
    console.print(view)
    return console.file.getvalue()


def test_the_watch_view_renders_workers_and_jobs():
    state = {"nworkers": 1,
             "workers": [{"id": "w1", "host": "hostA", "slots": 4, "busy": 3, "cpu": 4, "ram": 15.5, "gpu": ["T4"],
                          "preparing": 1}],
             "jobs": [{"id": "a" * 16, "name": "f · cell [3]", "state": "running", "done": 24, "total": 100,
                       "submitted": 30, "failed": 2, "elapsed": 2.0, "failures": [{"i": 1}], "bars": [[1]]},
                      {"id": "b" * 16, "state": "running", "done": 5, "total": None, "submitted": 9, "failed": 0,
                       "elapsed": 10.0}],
             "recent": [{"id": "c" * 16, "name": "g", "state": "done", "done": 7, "total": 7, "failed": 0,
                         "elapsed": 1.0, "finished": 1.0}]}
    text = rendered(watch_view("ipc:///x", state, None, time.time(), 0.5))
    assert "burla cluster ipc:///x: 1 worker, 4 slots (3 busy), 2 jobs running" in text
    assert re.search(r"w1\s+hostA\s+3/4\s+4\s+15.5 GB\s+T4\s+1", text), text
    assert re.search(r"a{16}\s+f · cell \[3\]\s+running\s+24/100\s+2\s+2.0s\s+12/s", text), text
    assert re.search(r"b{16}\s+-\s+running\s+5/\?\s+0\s+10.0s\s+0.5/s", text), text
    assert re.search(r"c{16}\s+g\s+done\s+7/7", text), text
    text = rendered(watch_view("ipc:///x", state, "no answer from the broker at ipc:///x (retrying)", time.time(),
                               0.5))
    assert "no answer from the broker at ipc:///x (retrying)" in text and "w1" in text
    assert "asking the broker" in rendered(watch_view("ipc:///x", None, None, None, 0.5))


def test_status_watch_lives_through_a_lost_broker_and_ends_on_ctrl_c():
    with broker_only() as c:
        c.start_worker("w1", slots=1)
        c.wait_for(1, slots=1, timeout=60)
        leader, follower = pty.openpty()
        watch = subprocess.Popen(BURLA + ["status", "--watch", "--interval", "0.2", "--cluster", c.address],
                                 stdin=follower, stdout=follower, stderr=follower,
                                 env=dict(os.environ, COLUMNS="150", LINES="40"))
        os.close(follower)
        shown = []

        def seen(text, timeout=30):
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline:
                if select.select([leader], [], [], 0.1)[0]:
                    try:
                        shown.append(os.read(leader, 65536).decode(errors="replace"))
                    except OSError:
                        return False
                if text in ANSI.sub("", "".join(shown)):
                    return True
            return False

        try:
            assert seen(f"burla cluster {c.address}: 1 worker, 1 slot"), shown
            assert seen("w1")
            c.stop("broker")
            assert seen(f"no answer from the broker at {c.address} (retrying)"), ANSI.sub("", "".join(shown))[-2000:]
            assert watch.poll() is None  # still watching
            watch.send_signal(signal.SIGINT)
            assert watch.wait(10) == 0
            seen("\0", timeout=0.5)  # (the rest of what it wrote)
            assert "Traceback" not in "".join(shown)
        finally:
            watch.kill()
            watch.wait()
            os.close(leader)
