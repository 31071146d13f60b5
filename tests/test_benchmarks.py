"""Each script in benchmarks/ in its quick mode, so that a benchmark that breaks fails here instead of rotting.
Figures are printed (see them with `pytest -s`), never asserted: only that the script ran and printed its table."""

import os
import signal
import subprocess
import sys
import uuid

import psutil

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TIMEOUT = 100  # under pytest-timeout's 120 s, so a hung script is killed here, and its output shown


def left_behind(marker):
    """Live processes whose environment carries marker: everything a script started, even the ones that left its
    process group (bench.py gives each run a session of its own) or lost their parent."""
    found = []
    for p in psutil.process_iter():
        try:
            if p.environ().get("BURLA_BENCH_TEST") == marker and p.status() != psutil.STATUS_ZOMBIE:
                found.append(p)
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            pass
    return found


def kill_everything(proc, marker):
    """SIGKILL the script's process group, then every process left that carries marker."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)  # (a script that exited may have left its group running)
    except (ProcessLookupError, PermissionError):
        pass
    for _ in range(5):  # then what left the group; again, in case one forked while the last pass looked
        # (never the script itself: psutil would reap it, and Popen would then report it exited 0)
        procs = [p for p in left_behind(marker) if p.pid != proc.pid]
        if not procs:
            break
        for p in procs:
            try:
                p.kill()
            except psutil.NoSuchProcess:
                pass
        psutil.wait_procs(procs, timeout=5)  # (a killed process lingers a moment before it is gone)


def run_benchmark(tmp_path, *args, timeout=TIMEOUT):
    """Run a benchmark script, print what it printed, return (returncode, stdout + stderr). Whatever the outcome,
    every process it started is killed before this returns."""
    marker = uuid.uuid4().hex
    # TMPDIR: the scripts' ipc sockets, environment caches and scratch folders go in the test's own folder.
    env = dict(os.environ, BURLA_BENCH_TEST=marker, TMPDIR=str(tmp_path))
    # (not subprocess.run: on a timeout it kills the script alone, and what the script started runs on)
    proc = subprocess.Popen([sys.executable, *args], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        kill_everything(proc, marker)  # all of it, before reading on: a survivor could hold the pipe open
        out, _ = proc.communicate()
        out += f"\n(killed after {timeout} s)"
    finally:
        kill_everything(proc, marker)
    print(out)
    return proc.returncode, out


def assert_table(rc, out, header, rows):
    """The script succeeded and printed its table: the header and a row starting with each of rows."""
    assert rc == 0, out
    assert header in out
    for row in rows:
        assert row in out


def test_bench_quick(tmp_path):
    # burla against the stdlib pools only: they are on every machine, so CI's figures mean the same everywhere.
    assert_table(*run_benchmark(tmp_path, "benchmarks/bench.py", "--quick", "--peers", "burla,pool,ppe"),
                 "| case | goal | burla | mp.Pool | ProcessPoolExecutor |",
                 ("| warm latency", "| cold start", "| 10,000 tiny calls", "| 200 calls sleeping", "| 100 calls with",
                  "| client RSS growth", "| 10,000 submit() calls"))


def test_bench_quick_against_loky_and_dask(tmp_path):
    """The third-party peers' paths in bench.py (start, map, close), which would otherwise rot unseen. Not Ray:
    it starts a cluster for every case, in some 7 s alone and 30 to 100 s beside the other tests, which CI's
    15 minutes cannot spare; full runs (RESULTS.md) cover it. A peer that fails shows "fail", not an error: none
    may here."""
    rc, out = run_benchmark(tmp_path, "benchmarks/bench.py", "--quick", "--peers", "burla,loky,dask",
                            "--cases", "tiny", "--timeout", "60")
    assert_table(rc, out, "| case | goal | burla | loky | Dask distributed |", ("| 10,000 tiny calls",))
    rows = [line for line in out.splitlines() if line.startswith("| 10,000 tiny calls")]
    assert not any(cell.strip() in ("fail", "timeout", "n/a") for row in rows for cell in row.split("|")), rows


def test_envs_quick(tmp_path):
    assert_table(*run_benchmark(tmp_path, "benchmarks/envs.py", "--quick"), "| what | median |",
                 ("| pin the client's own environment", "| resolve packages=['burla_bench_tiny==1.0'] with pip-compile",
                  "| pip: cold build of", "| pip: job switching 2 slots into the cached venv"))


def test_many_workers_quick(tmp_path):
    rc, out = run_benchmark(tmp_path, "benchmarks/many_workers.py", "--quick")
    assert rc == 0, out
    assert "simulated" in out
