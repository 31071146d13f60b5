"""The embedded local cluster: started on first use, reused, gone when the program ends however it ends."""

import os
import signal
import subprocess
import sys
import time

from conftest import HERE, processes_mentioning


def wait_gone(tag, timeout=5):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        left = processes_mentioning(tag)
        if not left:
            return []
        time.sleep(0.1)
    return processes_mentioning(tag)


def test_quickstart_runs_verbatim(tmp_path):
    env = dict(os.environ, TMPDIR=str(tmp_path))
    proc = subprocess.run([sys.executable, os.path.join(HERE, "..", "examples", "quickstart.py")],
                          capture_output=True, text=True, timeout=60, env=env, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert sorted(lines[:3]) == ["1", "2", "3"]  # the remote prints, streamed before the result
    assert lines[3] == "[2, 4, 6]"
    assert wait_gone(str(tmp_path)) == []


def test_a_deep_temporary_folder_still_gets_a_cluster(tmp_path):
    """A Unix socket's path holds at most 107 bytes: under a TMPDIR that deep (a test runner's, a batch system's)
    the embedded cluster could not bind its socket and every call failed with "File name too long"."""
    deep = tmp_path / ("d" * 60) / ("e" * 60)
    deep.mkdir(parents=True)
    env = dict(os.environ, TMPDIR=str(deep))
    proc = subprocess.run([sys.executable, "-c", "from burla import remote_parallel_map as m; "
                           "print(m(abs, [-1, -2], spinner=False))"], capture_output=True, text=True, timeout=60,
                          env=env)
    assert proc.returncode == 0 and proc.stdout.splitlines()[-1] == "[1, 2]", proc.stderr


def test_cluster_reused_and_stopped_at_exit(run_script, tmp_path):
    proc = run_script("""
        import os
        from burla import remote_parallel_map, local
        print(remote_parallel_map(abs, [-1, -2], spinner=False) and "ok")
        first = local.cluster().pids()
        remote_parallel_map(abs, [-1], spinner=False)
        print("same" if local.cluster().pids() == first else "restarted")
        print(*first)
    """)
    assert proc.returncode == 0, proc.stderr
    ok, same, pids = proc.stdout.splitlines()
    assert same == "same"
    assert wait_gone(str(tmp_path)) == []
    for pid in map(int, pids.split()):
        assert not os.path.exists(f"/proc/{pid}") or open(f"/proc/{pid}/stat").read().split()[2] == "Z"


def test_no_process_left_after_sigkill(tmp_path):
    script = tmp_path / "victim.py"
    script.write_text("import time\nfrom burla import remote_parallel_map\n"
                      "print(remote_parallel_map(abs, [-1, -2], spinner=False), flush=True)\n"
                      "time.sleep(60)\n")
    env = dict(os.environ, TMPDIR=str(tmp_path))
    proc = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True, env=env, cwd=tmp_path)
    try:
        assert proc.stdout.readline().strip() == "[1, 2]"
        assert len(processes_mentioning(str(tmp_path))) >= 3  # broker, worker, executors
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
        assert wait_gone(str(tmp_path)) == []
    finally:
        if proc.poll() is None:
            proc.kill()
        for p in processes_mentioning(str(tmp_path)):
            p.kill()
