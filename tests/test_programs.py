"""Whole programs in a fresh interpreter on the embedded cluster: __main__ functions, user modules that share our
module names, the progress line, flat memory over a million inputs."""

import os
import pty
import subprocess
import sys


def test_main_function_and_user_modules_named_like_ours(run_script, tmp_path):
    for name in ("worker", "broker", "protocol", "client", "executor"):
        (tmp_path / f"{name}.py").write_text(f"WHO = 'user {name}'\n")
    proc = run_script("""
        from burla import remote_parallel_map

        def who(name):
            import importlib
            return importlib.import_module(name).WHO

        print(remote_parallel_map(who, ["worker", "broker", "protocol", "client", "executor"], spinner=False))
    """)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "['user worker', 'user broker', 'user protocol', 'user client', 'user executor']"


def test_remote_traceback_shows_the_users_source_line(run_script):
    proc = run_script("""
        from burla import remote_parallel_map

        def divide(x):
            return 1 / x  # the failing line

        remote_parallel_map(divide, [1, 0, 2], spinner=False)
    """)
    assert proc.returncode == 1
    assert "ZeroDivisionError" in proc.stderr
    assert "return 1 / x  # the failing line" in proc.stderr
    assert "script.py" in proc.stderr and "input 1" in proc.stderr


def run_on_a_terminal(source, tmp_path):
    """Run a script with stderr on a pseudo-terminal (as in a shell) and return what the terminal showed."""
    path = tmp_path / "tty.py"
    path.write_text(source)
    leader, follower = pty.openpty()
    env = dict(os.environ, TMPDIR=str(tmp_path), COLUMNS="100")
    proc = subprocess.Popen([sys.executable, str(path)], stdout=subprocess.PIPE, stderr=follower, env=env,
                            cwd=tmp_path)
    os.close(follower)
    shown = b""
    while True:
        try:
            data = os.read(leader, 65536)
        except OSError:
            break
        if not data:
            break
        shown += data
    out, _ = proc.communicate(timeout=60)
    os.close(leader)
    return proc.returncode, out.decode(), shown.decode(errors="replace")


def test_spinner_shows_progress_on_a_terminal(tmp_path):
    code = ("import time\nfrom burla import remote_parallel_map\n"
            "print(remote_parallel_map(lambda x: time.sleep(0.05) or x, range(40), spinner={}) == list(range(40)))\n")
    rc, out, shown = run_on_a_terminal(code.format(True), tmp_path)
    assert rc == 0 and out.strip() == "True"
    assert "burla" in shown and "/40 [" in shown and "call/s" in shown
    rc, out, shown = run_on_a_terminal(code.format(False), tmp_path)
    assert rc == 0 and out.strip() == "True"
    assert "burla" not in shown


def test_a_million_inputs_with_flat_client_memory(run_script):
    proc = run_script("""
        import psutil, threading
        from burla import remote_parallel_map

        me = psutil.Process()
        remote_parallel_map(abs, range(10), spinner=False)  # warm: the cluster is not the client's memory
        base = me.memory_info().rss
        peak = base
        count = 0
        for value in remote_parallel_map(lambda x: x * 2, (i for i in range(1_000_000)), generator=True,
                                         spinner=False):
            count += 1
            if count % 10_000 == 0:
                peak = max(peak, me.memory_info().rss)
        print(count, (peak - base) >> 20)
    """, timeout=300)
    assert proc.returncode == 0, proc.stderr
    count, growth_mib = map(int, proc.stdout.split())
    assert count == 1_000_000
    assert growth_mib < 64
