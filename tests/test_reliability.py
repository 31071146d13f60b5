"""retries, timeout, return_exceptions; calls that crash their executor; cancel that really stops running calls."""

import functools
import operator
import os
import random
import signal
import subprocess
import sys
import time

import psutil
import pytest

import burla
from burla import protocol as P
from burla import remote_parallel_map, serialize


@pytest.fixture
def rpm(cluster):
    def run(function_, inputs, **kwargs):
        return remote_parallel_map(function_, inputs, cluster=cluster.address, spinner=False, **kwargs)

    return run


def flaky(x, _tries={}):
    """Fails the first two times it sees each input (state lives in the executor that runs it)."""
    _tries[x] = _tries.get(x, 0) + 1
    if _tries[x] < 3:
        raise ValueError(f"attempt {_tries[x]} on {x}")
    return x


def test_retries_rerun_failed_calls(rpm):
    assert rpm(flaky, range(20), retries=2) == list(range(20))
    with pytest.raises(ValueError, match="attempt 2"):
        rpm(flaky, range(100, 110), retries=1)


def test_return_exceptions_puts_failures_in_place(rpm):
    def odd_only(x):
        if x % 2 == 0:
            raise KeyError(x)
        return x

    out = rpm(odd_only, range(200), return_exceptions=True)
    assert [v for v in out[1::2]] == list(range(1, 200, 2))
    assert all(isinstance(e, KeyError) and e.burla_input_index == i for i, e in zip(range(0, 200, 2), out[0::2]))


def test_timeout_stops_a_long_call(rpm):
    def slow_on_one(x):
        if x == 1:
            time.sleep(30)
        return x

    start = time.monotonic()
    out = rpm(slow_on_one, range(4), timeout=0.5, return_exceptions=True)
    assert time.monotonic() - start < 10
    assert out[0] == 0 and out[2:] == [2, 3]
    assert isinstance(out[1], burla.CallTimeoutError) and out[1].burla_input_index == 1
    with pytest.raises(TimeoutError):
        rpm(slow_on_one, [1], timeout=0.2)


def test_timeout_stops_a_call_stuck_in_c_code(rpm):
    def stuck_on_two(x):
        if x == 2:
            import hashlib

            hashlib.pbkdf2_hmac("sha256", b"k", b"s", 2**31 - 1)  # minutes in C code that never looks at signals
        return x

    start = time.monotonic()
    out = rpm(stuck_on_two, range(5), timeout=0.5, return_exceptions=True)
    assert time.monotonic() - start < 6  # 0.5 s timeout + 1 s grace, then the worker kills the executor
    assert [out[i] for i in (0, 1, 3, 4)] == [0, 1, 3, 4]
    assert isinstance(out[2], burla.CallTimeoutError) and out[2].burla_input_index == 2


def crash(x):
    if x == 7:
        os._exit(13)
    if x == 11:
        import ctypes

        ctypes.string_at(0)  # segmentation fault
    if x == 13:
        os.kill(os.getpid(), signal.SIGKILL)  # what the kernel's OOM killer does to a memory blow-up
    if x == 17:
        import resource

        resource.setrlimit(resource.RLIMIT_AS, (1 << 30, resource.RLIM_INFINITY))
        try:
            bytearray(4 << 30)  # a blow-up the interpreter survives: MemoryError, for this input only
        finally:
            resource.setrlimit(resource.RLIMIT_AS, (resource.RLIM_INFINITY, resource.RLIM_INFINITY))
    return x


def test_inputs_that_crash_the_interpreter_fail_alone(rpm):
    bad = (7, 11, 13, 17)
    out = rpm(crash, range(40), return_exceptions=True)
    assert [out[i] for i in range(40) if i not in bad] == [i for i in range(40) if i not in bad]
    assert isinstance(out[7], burla.WorkerDiedError) and "exit code 13" in str(out[7])
    assert isinstance(out[11], burla.WorkerDiedError) and "SIGSEGV" in str(out[11])
    assert isinstance(out[13], burla.WorkerDiedError) and "SIGKILL" in str(out[13])
    assert isinstance(out[17], MemoryError)
    assert [out[i].burla_input_index for i in bad] == list(bad)


def test_executors_killed_at_random_twenty_times(cluster, rpm):
    rng = random.Random(7)

    def noisy(x):
        print(f"line {x}")
        time.sleep(0.004)
        return x * 3

    for round_ in range(20):
        victim = rng.choice(cluster.executor_pids("w1"))
        delay = rng.uniform(0.0, 0.3)
        proc = subprocess.Popen(["sh", "-c", f"sleep {delay:.3f}; kill -9 {victim}"])
        out = rpm(noisy, range(150))
        proc.wait()
        assert out == [x * 3 for x in range(150)], f"round {round_}"
        deadline = time.monotonic() + 5  # the worker restarts the executor before the next round
        while len(cluster.executor_pids("w1")) < 2 and time.monotonic() < deadline:
            time.sleep(0.02)


def busy_slots(cluster):
    return sum(w["busy"] for w in cluster.wait_for(1)["workers"])


CLIENT = """
import sys, time, hashlib
from burla import remote_parallel_map
def long_call(x):
    if x == 0:
        hashlib.pbkdf2_hmac("sha256", b"k", b"s", 2**31 - 1)  # minutes in C code that never looks at signals
    time.sleep(60)
print("submitting", flush=True)
remote_parallel_map(long_call, range(8), cluster=sys.argv[1], spinner=False)
"""


@pytest.mark.parametrize("how", [signal.SIGINT, signal.SIGKILL], ids=["ctrl-c", "client-killed"])
def test_cancel_stops_running_calls(cluster, tmp_path, how):
    """Ctrl-C cancels at once; a killed client's job is cancelled when its lease ends (here 2 s)."""
    script = tmp_path / "client.py"
    script.write_text(CLIENT)
    env = dict(os.environ, BURLA_HEARTBEAT_INTERVAL="0.5", BURLA_JOB_LEASE="2")
    client = subprocess.Popen([sys.executable, str(script), cluster.address], stdout=subprocess.PIPE, env=env)
    try:
        client.stdout.readline()
        deadline = time.monotonic() + 10
        while busy_slots(cluster) < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert busy_slots(cluster) == 2
        client.send_signal(how)
        start = time.monotonic()
        while busy_slots(cluster) and time.monotonic() - start < 10:
            time.sleep(0.05)
        freed = time.monotonic() - start
        print(f"{signal.Signals(how).name} to the client: slots free after {freed:.2f} s")
        assert busy_slots(cluster) == 0
        assert freed < (2.0 if how == signal.SIGINT else 9.0)  # (silence seen in 1.5 s, then the lease)
    finally:
        client.kill()
        client.wait()
    assert remote_parallel_map(abs, [-1, -2], cluster=cluster.address, spinner=False) == [1, 2]


def test_a_killed_zygote_is_replaced(cluster, rpm):
    """Restarted executors are forked by a zygote; killing it (and so its executors) loses nothing."""
    def zygotes():
        return [c for c in psutil.Process(cluster.procs["w1"].pid).children()
                if "burla.worker.zygote" in " ".join(c.cmdline())]

    os.kill(cluster.executor_pids("w1")[0], signal.SIGKILL)  # its replacement comes from a zygote
    deadline = time.monotonic() + 10
    while not zygotes() or len(cluster.executor_pids("w1")) < 2:
        assert time.monotonic() < deadline, "no zygote after a restart"
        time.sleep(0.02)
    zygote = zygotes()[0]
    killer = subprocess.Popen(["sh", "-c", f"sleep 0.2; kill -9 {zygote.pid}"])

    def slow(x):
        time.sleep(0.02)
        return x + 1

    assert rpm(slow, range(100)) == [x + 1 for x in range(100)]
    killer.wait()
    deadline = time.monotonic() + 10
    while len(cluster.executor_pids("w1")) < 2 or zygote.pid in [z.pid for z in zygotes()]:
        assert time.monotonic() < deadline, "the zygote's executors were not replaced"
        time.sleep(0.02)
    assert rpm(slow, range(10)) == list(range(1, 11))


def slow_then_quick(x, _tries={}):
    """The first attempt runs past the timeout; the second takes most of one."""
    _tries[x] = _tries.get(x, 0) + 1
    time.sleep(10 if _tries[x] == 1 else 1.2)
    return x


def test_each_retry_gets_the_whole_timeout(rpm):
    # the deadline the worker enforces (for calls stuck in C code) covers every attempt, not only the first
    assert rpm(slow_then_quick, [7], timeout=1.5, retries=1) == [7]


def sleep_then_double(x):
    time.sleep(x)
    return x * 2


def triple(x):
    return x * 3


class ExecutorUnderTest:
    """A real executor process, and the test as its broker: TASKs in, RESULTs out."""

    def __init__(self):
        import zmq

        self.ctx = zmq.Context()
        self.router = self.ctx.socket(zmq.ROUTER)
        self.router.setsockopt(zmq.RCVTIMEO, 15_000)
        port = self.router.bind_to_random_port("tcp://127.0.0.1")
        code = f"import burla.worker.executor as e; e.main('tcp://127.0.0.1:{port}', 'w', 0)"
        self.proc = subprocess.Popen([sys.executable, "-c", code], env=dict(os.environ, PYTHONPATH=os.path.dirname(
            __file__)), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self.ident, _, command, _, _ = P.recv_routed(self.router, False)
        assert command == P.READY

    def task(self, job, function, values, carry):
        """carry: the function goes with it (the broker's first TASK of that function to this slot)."""
        data, digest = serialize.dumps_function(function)
        z, frames = serialize.pack_items(values)
        header = {"j": job, "i": 0, "n": len(values), "d": digest, "z": z}
        if carry:
            header["f"] = 1
        P.send(self.router, P.TASK, header, [data] * carry + frames, ident=self.ident)

    def result(self, job):
        while True:
            _, _, command, header, payload = P.recv_routed(self.router, False)
            if command == P.RESULT and header["j"] == job:
                assert not header.get("e"), header  # (the bugs below said KeyError)
                return serialize.unpack_items(header.get("z"), payload[:header["k"]])

    def close(self):
        self.proc.kill()
        self.proc.wait(10)
        self.router.close(0)
        self.ctx.term()


@pytest.fixture
def executor():
    e = ExecutorUnderTest()
    yield e
    e.close()


@pytest.mark.timeout(30)
def test_a_function_whose_first_task_never_ran_still_serves_the_next_job(executor):
    """The broker sends a slot each function once, with the first TASK that needs it. That task may never run:
    its job is cancelled while it waits behind another. The slot must keep the function all the same: a later
    job of the same function is sent without it (this once failed every call with a KeyError)."""
    busy, cancelled, again = b"busy0000", b"cancel00", b"again000"
    executor.task(busy, sleep_then_double, [0.5], carry=True)  # the executor is busy for half a second...
    executor.task(cancelled, triple, [1, 2], carry=True)  # ...while triple's first task waits, and is cancelled
    P.send(executor.router, P.CANCEL, {"j": cancelled}, ident=executor.ident)
    assert executor.result(busy) == [1.0]
    executor.task(again, triple, [3, 4], carry=False)  # the same function, not sent again
    assert executor.result(again) == [9, 12]


@pytest.mark.timeout(30)
def test_an_executor_keeps_the_functions_the_broker_counts_as_sent(executor):
    """Both ends keep the last P.FUNCTION_CACHE functions in the order the broker sent them. A function sent again
    (as after a READY, when the broker starts its count anew) is the newest at both ends; the executor once kept
    it where it was, dropped it first, and its next task failed."""
    functions = [functools.partial(operator.add, k) for k in range(P.FUNCTION_CACHE + 1)]
    for k, f in enumerate(functions[:-1]):
        executor.task(b"job%05d" % k, f, [1], carry=True)
    executor.task(b"again-0", functions[0], [1], carry=True)  # sent again: the newest
    executor.task(b"newest0", functions[-1], [1], carry=True)  # the broker now drops functions[1], the oldest
    executor.task(b"first-0", functions[0], [10], carry=False)
    assert executor.result(b"first-0") == [10]
