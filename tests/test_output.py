"""What calls print reaches the client: every kind of text, at every level (Python, file descriptor, C, child
processes), in order, bounded in time and size, and never at the cost of the executor."""

import os
import sys

import pytest

from burla import remote_parallel_map
from burla import progress

pytestmark = pytest.mark.timeout(90)


@pytest.fixture
def rpm(cluster):
    def run(function_, inputs, **kwargs):
        return remote_parallel_map(function_, inputs, cluster=cluster.address, spinner=False, **kwargs)

    return run


@pytest.fixture
def messages(monkeypatch):
    """The LOG messages the client shows, each as its list of [index, stream, text] lines."""
    seen = []
    original = progress.TerminalView.lines

    def lines(self, slot, lines):
        seen.append(lines)
        return original(self, slot, lines)

    monkeypatch.setattr(progress.TerminalView, "lines", lines)
    return seen


def test_lone_surrogate_arrives_and_the_call_succeeds(rpm, capfd):
    def name(x):
        print("file", b"caf\xe9".decode("utf-8", "surrogateescape"), x)
        print("err", "\ud800", file=sys.stderr)
        return x * 2

    assert rpm(name, [1, 2]) == [2, 4]
    out, err = capfd.readouterr()
    lines = [line for line in out.splitlines() if line.startswith("file caf")]
    assert len(lines) == 2
    assert all(line.endswith(("\\udce9 1", "\\udce9 2", "\ufffd 1", "\ufffd 2")) for line in lines), lines
    assert "err" in err


def test_fd_level_subprocess_and_c_output_arrive(rpm, capfd):
    def low_level(x):
        import ctypes
        import subprocess

        os.write(1, b"fd out\n")
        os.write(2, b"fd err\n")
        subprocess.run(["echo", "subprocess out"], check=True)
        os.system("echo system out")
        libc = ctypes.CDLL(None)
        libc.printf(b"c printf %d\n", 42)
        libc.fflush(None)
        return x

    assert rpm(low_level, [0]) == [0]
    out, err = capfd.readouterr()
    for line in ("fd out", "subprocess out", "system out", "c printf 42"):
        assert line in out.splitlines(), (line, out)
    assert "fd err" in err.splitlines()


def test_print_and_fd_output_keep_their_order(rpm, capfd):
    def mixed(x):
        import subprocess

        print("one")
        os.write(1, b"two\n")
        print("three")
        subprocess.run(["echo", "four"], check=True)
        print("five")
        os.write(1, b"six\n")
        return x

    rpm(mixed, [0])
    out = capfd.readouterr().out.splitlines()
    assert [line for line in out if line in ("one", "two", "three", "four", "five", "six")] == \
        ["one", "two", "three", "four", "five", "six"]


def test_buffer_fileno_and_faulthandler(rpm, capfd):
    def binary(x):
        import faulthandler
        import time

        sys.stdout.buffer.write(b"bytes out\n")
        sys.stdout.buffer.write(b"caf\xc3")  # a character split across writes and across reads of the pipe
        sys.stdout.buffer.write(b"\xa9 buffered\n")
        os.write(1, b"caf\xc3")
        time.sleep(0.2)
        os.write(1, b"\xa9 piped\n")
        sys.stderr.buffer.write(b"bad \xff byte\n")
        sys.stdout.flush()
        faulthandler.enable()
        faulthandler.dump_traceback(all_threads=False)
        faulthandler.disable()
        return (sys.stdout.fileno(), sys.stderr.fileno(), sys.stdout.isatty(), sys.stdout.encoding,
                isinstance(sys.stdout.errors, str))

    assert rpm(binary, [0]) == [(1, 2, False, "utf-8", True)]
    out, err = capfd.readouterr()
    assert {"bytes out", "caf\u00e9 buffered", "caf\u00e9 piped"} <= set(out.splitlines()), out
    assert "bad \ufffd byte" in err.splitlines()
    assert "most recent call first" in err and "binary" in err


@pytest.mark.timeout(60)
def test_carriage_return_progress_is_linear(rpm, capfd):
    def progress_bar(x):
        for k in range(100_000):
            sys.stdout.write(f"\rprogress {k}")
        sys.stdout.write("\n")
        print("line\r")
        sys.stdout.write("a\rb\rlast state\r\nnext\n")
        return x

    assert rpm(progress_bar, [0]) == [0]
    out = capfd.readouterr().out.splitlines()
    assert out[-4:] == ["progress 99999", "line", "last state", "next"]


def test_long_lines_are_split_and_messages_stay_small(rpm, capfd, messages):
    def flood(x):
        sys.stdout.write("x" * 300_000)  # no newline
        sys.stdout.write("\n")
        print("\n".join("y" * 100 for _ in range(20_000)))  # 2 MB in one write
        return x

    assert rpm(flood, [0]) == [0]
    out = capfd.readouterr().out.splitlines()
    xs = [line for line in out if line.startswith("x")]
    assert "".join(xs) == "x" * 300_000 and len(xs) > 1 and max(map(len, xs)) <= 64 << 10
    assert out.count("y" * 100) == 20_000
    sizes = [sum(len(text) for _, _, text in lines) for lines in messages]
    assert len(sizes) > 10 and max(sizes) <= 64 << 10, sizes


def test_closed_streams_and_fds_are_whole_again_in_the_next_job(rpm, cluster, capfd):
    def breaker(x):
        import time

        time.sleep(0.1)
        sys.stdout.close()
        sys.stderr.close()
        try:
            os.close(1)
        except OSError:
            pass
        null = os.open(os.devnull, os.O_WRONLY)
        os.dup2(null, 2)
        os.close(null)
        return os.getpid()

    def printer(x):
        import subprocess
        import time

        time.sleep(0.1)
        print(f"again {x}", flush=True)
        sys.stdout.flush()
        sys.stderr.write(f"again err {x}\n")
        os.write(1, f"fd again {x}\n".encode())
        subprocess.run(["echo", f"echo again {x}"], check=True)
        return os.getpid()

    executors, broken = set(cluster.executor_pids("w1")), set()
    for _ in range(20):  # until every executor has run the breaker
        broken.update(rpm(breaker, range(4)))
        if broken >= executors:
            break
    assert broken >= executors
    capfd.readouterr()
    pids = rpm(printer, range(8))
    assert set(pids) <= broken  # the same executors
    out, err = capfd.readouterr()
    for x in range(8):
        assert {f"again {x}", f"fd again {x}", f"echo again {x}"} <= set(out.splitlines()), out
        assert f"again err {x}" in err.splitlines()


def test_forked_child_output_arrives(rpm, capfd):
    def forks(x):
        pid = os.fork()
        if pid == 0:
            print(f"child {x}")
            os._exit(0)
        os.waitpid(pid, 0)
        print(f"parent {x}")
        return x

    assert rpm(forks, [0]) == [0]
    out = capfd.readouterr().out.splitlines()
    assert "child 0" in out and "parent 0" in out
