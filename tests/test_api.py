"""remote_parallel_map against a real broker and a real worker (two executor slots), started by `burla`."""

import contextlib
import itertools
import math
import os
import subprocess
import sys
import threading
import time

import pytest

import burla
from burla import remote_parallel_map


@pytest.fixture
def rpm(cluster):
    def run(function_, inputs, **kwargs):
        return remote_parallel_map(function_, inputs, cluster=cluster.address, spinner=False, **kwargs)

    return run


def test_results_in_input_order(rpm):
    assert rpm(lambda x: x * x, range(1000)) == [x * x for x in range(1000)]


def test_generator_yields_every_result(rpm):
    out = rpm(lambda x: x + 1, list(range(500)), generator=True)
    assert not isinstance(out, list)
    assert sorted(out) == list(range(1, 501))


def test_generator_starts_at_once_and_cancels_when_dropped(rpm, cluster):
    from burla.client import cluster_state

    def jobs():
        return cluster_state(cluster.address)["jobs"]

    it = rpm(lambda x: time.sleep(0.2) or x, range(100), generator=True)
    deadline = time.monotonic() + 5
    while not (jobs() and jobs()[0]["submitted"]) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert jobs()[0]["submitted"] > 0  # inputs went out before the first next()
    del it
    deadline = time.monotonic() + 5
    while jobs() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert jobs() == []


def test_empty_inputs(rpm):
    assert rpm(abs, []) == []


def test_tuples_are_not_unpacked(rpm):
    assert rpm(lambda x: x, [(1, 2), (3, 4)]) == [(1, 2), (3, 4)]


def test_closures_and_local_classes(rpm):
    offset = 10

    class Point:
        def __init__(self, x):
            self.x = x

    out = rpm(lambda p: p.x + offset, [Point(1), Point(2)])
    assert out == [11, 12]


def test_a_function_is_pickled_again_whenever_what_it_uses_changed(rpm, tmp_path, monkeypatch):
    """A warm loop reuses a function's pickle (it is made once) only while nothing it reads can have changed: a
    global rebound or changed in place, a keyword default changed in place, a closure's cell all reach the calls."""
    from burla import serialize

    cell = {"__name__": "a_notebook_cell"}  # (not importable: pickled by value, as __main__'s functions are)
    exec("import math\nK = 3\nL = [1]\ndef f(x, *, k=0):\n    return math.floor(x) * K + k\n"
         "def g(x):\n    return x + L[0]\n", cell)
    f, g = cell["f"], cell["g"]
    assert serialize.dumps_function(f)[0] is serialize.dumps_function(f)[0]  # (reused: the same bytes object)
    assert rpm(f, [1, 2]) == [3, 6]
    cell["K"] = 4
    assert rpm(f, [1, 2]) == [4, 8]
    f.__kwdefaults__["k"] = 1
    assert rpm(f, [1, 2]) == [5, 9]
    cell["K"] = 2 ** 70  # (an int that is a new object on every rebinding, as most are)
    assert rpm(f, [1]) == [2 ** 70 + 1]
    assert rpm(g, [1]) == [2]
    cell["L"][0] = 10  # (a list global: never reused)
    assert rpm(g, [1]) == [11]

    # a module of the user's own travels by value: what changes in it reaches the calls too (the first pickle
    # of a function that uses it is where burla learns that it does)
    (tmp_path / "users_own_module.py").write_text("K = 1\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    exec("import users_own_module\ndef m(x):\n    return x + getattr(users_own_module, 'K', 100)\n", cell)
    assert rpm(cell["m"], [1]) == [2] and rpm(cell["m"], [1]) == [2]
    sys.modules["users_own_module"].K = 5
    assert rpm(cell["m"], [1]) == [6]
    cell["users_own_module"] = math  # (an installed module: from now on its pickle may be reused)
    assert rpm(cell["m"], [1]) == [101] and rpm(cell["m"], [1]) == [101]

    def adder(k):
        return lambda x: x + k

    h = adder(1)
    assert rpm(h, [1]) == [2]
    h.__closure__[0].cell_contents = 5
    assert rpm(h, [1]) == [6]


def test_unknown_length_input_is_consumed_lazily(rpm):
    pulled = itertools.count()

    def gen():
        for i in range(200_000):
            next(pulled)
            yield i

    it = rpm(lambda x: x, gen(), generator=True)
    next(it)
    in_flight = next(pulled)
    assert in_flight < 100_000, f"{in_flight} inputs pulled before the first result"
    assert sum(1 for _ in it) == 200_000 - 1


def test_stdout_and_stderr_stream_while_calls_run(rpm, capsys):
    arrivals = []

    class Recorder:
        def write(self, text):
            arrivals.append((time.monotonic(), text))

        def flush(self):
            pass

    def noisy(x):
        print(f"out {x}")
        print(f"err {x}", file=sys.stderr)
        time.sleep(1.5)
        return x

    real = sys.stdout
    sys.stdout = Recorder()
    try:
        assert rpm(noisy, [7]) == [7]
        finished = time.monotonic()
    finally:
        sys.stdout = real
    (when, text), = [a for a in arrivals if "out 7" in a[1]]
    assert when < finished - 0.8, "the line only arrived with the result"
    assert "err 7" in capsys.readouterr().err


def test_many_log_lines_all_arrive(rpm, capsys):
    rpm(lambda x: print("\n".join(f"line {x} {k}" for k in range(100))), range(20))
    out = capsys.readouterr().out.splitlines()
    assert sorted(out) == sorted(f"line {x} {k}" for x in range(20) for k in range(100))


def test_exception_reraised_with_remote_traceback_and_index(rpm):
    def fails_on_three(x):
        if x == 3:
            raise KeyError(f"bad {x}")
        return x

    with pytest.raises(KeyError) as info:
        rpm(fails_on_three, range(10))
    exc = info.value
    assert exc.burla_input_index == 3
    assert isinstance(exc.__cause__, burla.errors.RemoteTraceback)
    assert "fails_on_three" in str(exc.__cause__) and "raise KeyError" in str(exc.__cause__)
    assert any("input 3" in note for note in exc.__notes__)


def test_unrebuildable_exception_becomes_remote_error(rpm):
    class Picky(Exception):
        def __init__(self, a, b):
            super().__init__(a)

    def fails(x):
        raise Picky("first", "second")

    with pytest.raises(burla.RemoteError) as info:
        rpm(fails, [1])
    assert "Picky" in str(info.value) and info.value.burla_input_index == 0


def test_system_exit_does_not_exit_the_client(rpm):
    with pytest.raises(burla.RemoteError, match="SystemExit"):
        rpm(lambda x: sys.exit(3), [1])


def test_error_stops_the_rest_of_the_job_and_cluster_stays_usable(rpm):
    def slow_unless_zero(x):
        if x == 0:
            raise ValueError("zero")
        time.sleep(0.1)
        return x

    start = time.monotonic()
    with pytest.raises(ValueError):
        rpm(slow_unless_zero, range(200))  # 10 s of work on two slots
    assert time.monotonic() - start < 5
    assert rpm(abs, [-1, -2, -3]) == [1, 2, 3]


def test_unpicklable_function_input_and_result_fail_clearly(rpm):
    lock = threading.Lock()
    with pytest.raises(TypeError, match="could not be pickled"):
        rpm(lambda x: lock, [1])
    with pytest.raises(TypeError, match="input 1 could not be pickled"):
        rpm(lambda x: x, [1, threading.Lock(), 3])
    with pytest.raises(TypeError) as info:
        rpm(lambda x: threading.Lock() if x == 2 else x, [0, 1, 2, 3])
    assert info.value.burla_input_index == 2


def test_bad_arguments(rpm):
    with pytest.raises(TypeError, match="callable"):
        rpm(5, [1])
    with pytest.raises(TypeError, match="iterable"):
        rpm(abs, 5)
    with pytest.raises(ValueError, match="func_cpu"):
        rpm(abs, [1], func_cpu=0)
    with pytest.raises(ValueError, match="max_parallelism"):
        rpm(abs, [1], max_parallelism=0)
    with pytest.raises(ValueError, match="cluster"):
        remote_parallel_map(abs, [1], cluster="http://nowhere")


def test_request_no_worker_can_fit_fails_fast(rpm):
    start = time.monotonic()
    with pytest.raises(burla.NoCompatibleWorkerError, match=r"func_cpu=64.*has 2 cpu"):
        rpm(abs, [1], func_cpu=64)
    with pytest.raises(burla.NoCompatibleWorkerError, match="func_ram=100000"):
        rpm(abs, [1], func_ram=100000)
    with pytest.raises(burla.NoCompatibleWorkerError, match="gpu"):
        rpm(abs, [1], func_gpu="A100")
    assert time.monotonic() - start < 3


def spans(rpm, **kwargs):
    def timed(x):
        start = time.monotonic()
        time.sleep(0.2)
        return start, time.monotonic()

    return sorted(rpm(timed, range(6), **kwargs))


def overlapping(intervals):
    return any(b[0] < a[1] for a, b in zip(intervals, intervals[1:]))


def test_max_parallelism_caps_concurrent_calls(rpm):
    assert overlapping(spans(rpm))  # two slots: calls do overlap by default
    assert not overlapping(spans(rpm, max_parallelism=1))
    assert not overlapping(spans(rpm, parallelism=1))


def test_func_cpu_packs_calls_onto_cpus(rpm):
    assert not overlapping(spans(rpm, func_cpu=2))  # the worker has 2 cpus: one such call at a time


def test_large_inputs(rpm):
    big = b"x" * (200 << 20)
    assert rpm(len, [big]) == [200 << 20]
    del big
    total = rpm(len, (os.urandom(16) * 65536 for _ in range(120)))  # 120 MiB in all, from a generator
    assert total == [1 << 20] * 120


def test_numpy_like_buffers_travel_out_of_band(rpm):
    data = [bytearray(b"a" * 1_000_000), bytearray(b"b" * 10)]
    assert rpm(lambda b: bytes(b[:2]), data) == [b"aa", b"bb"]


def test_gpu_calls_run_only_where_gpus_are(cluster):
    cluster.start_worker("gpu-host", 1, "--gpus", "A100:1")
    try:
        cluster.wait_for(2)
        gpu_pid = cluster.procs["gpu-host"].pid
        parents = remote_parallel_map(lambda x: os.getppid(), range(4), func_gpu="A100",
                                      cluster=cluster.address, spinner=False)
        assert set(parents) == {gpu_pid}
    finally:
        cluster.stop("gpu-host")


def test_compression_round_trip_only_where_it_pays():
    from burla import serialize

    zeros, noise = bytes(1 << 20), os.urandom(1 << 20)
    flags, frames = serialize.pack([zeros, bytearray(noise)], compress=True)
    assert flags[0] == 1 and sum(len(f) for f in frames) < 1.2 * len(noise)  # zeros shrank, noise stayed raw
    assert serialize.unpack(flags, frames) == [zeros, bytearray(noise)]


def test_job_waiting_for_workers_is_rejected_when_the_first_worker_cannot_fit_it(new_cluster):
    failure = []

    def submit():
        try:
            remote_parallel_map(abs, [1], func_cpu=64, cluster=new_cluster.address, spinner=False)
        except Exception as e:
            failure.append(e)

    client = threading.Thread(target=submit)
    client.start()
    time.sleep(0.5)  # the job waits: no worker yet
    assert client.is_alive()
    new_cluster.start_worker("small", 1)
    client.join(10)
    assert not client.is_alive() and isinstance(failure[0], burla.NoCompatibleWorkerError)


def stamp(x):
    started = time.time()
    time.sleep(0.6)
    return started, time.time()


def test_tiny_calls_are_not_flooded_over_many_slots_and_slow_ones_spread_at_once(new_cluster, monkeypatch):
    """Before a result says how long calls take, a job sends a few probe batches; tiny calls answer within the
    probing and size the rest (no flood of one-input tasks, as many as two per slot); slow ones then get every
    slot at once. STATUS counts the broker's messages."""
    from burla import client
    from burla.client import cluster_state

    new_cluster.start_worker("wide", 24, "--cpu", "24")  # (each call asks for a cpu)
    new_cluster.wait_for(1, slots=24)
    address = new_cluster.address
    state = cluster_state(address)
    assert (state["nslots"], state["nworkers"]) == (24, 1)
    remote_parallel_map(abs, [1], cluster=address, spinner=False, func_ram=0.1)  # (the slots up and warm)
    client._call_seconds.clear()
    monkeypatch.setattr(client, "PROBE_SECONDS", 30.0)  # (however loaded this machine is, the probes answer)
    before = cluster_state(address)["msgs"][0]
    assert remote_parallel_map(abs, range(-20_000, 0), cluster=address, spinner=False, func_ram=0.1)[:2] == \
        [20_000, 19_999]
    received = cluster_state(address)["msgs"][0] - before
    # A BATCH and a RESULT per batch, and a few more: 8 probes, then at most 2 batches a slot (48). One-input
    # batches for every slot and its prefetch first (50), then the same 48, would be 196 or more.
    assert received < 150, received
    monkeypatch.setattr(client, "PROBE_SECONDS", 0.05)
    spans = remote_parallel_map(stamp, range(24), cluster=address, spinner=False, func_ram=0.1)
    first_end = min(end for _, end in spans)
    assert sum(start < first_end for start, _ in spans) > 16  # more than the probes ran at once


@contextlib.contextmanager
def filled_job(cluster, function, inputs, per_call=None):
    """A job whose client has filled its window once, before any result came (per_call: as if one said so)."""
    from burla import client

    job = client.Job(client.connection(cluster.address), function, inputs, 1, 4, None, None, False, {})
    try:
        if per_call is not None:
            job.per_call = per_call
        job.fill()
        yield job
    finally:
        job.abandon()


def test_a_first_batch_sized_from_the_last_job_holds_at_most_two_inputs_of_unknown_size(rpm, cluster):
    """The function's last job here had tiny inputs, so its calls look fast; this job's inputs are 1 MiB each. Until
    one batch says how big they are, a batch holds at most two (never hundreds of MiB in one message)."""
    rpm(len, [b"x"] * 50)  # (a per-call time for len)
    with filled_job(cluster, len, [bytes([k]) * (1 << 20) for k in range(40)]) as job:
        sizes = [p.n for p in job.outstanding.values()]
        assert sizes[0] <= 2 and sum(sizes) <= 2 + 4 * 4, sizes  # then 4 MiB batches (P.MAX_BATCH_BYTES)
        assert all(p.size <= (4 << 20) + 4096 for p in job.outstanding.values())


def test_a_small_job_of_tiny_calls_leaves_at_once(cluster):
    """Calls known to be tiny, in a job small enough: all of its inputs leave in the batches the client's window
    allows, none waiting for a result to free the window (which left one slot idle at the end of 100,000 tiny
    calls)."""
    from burla import protocol as P

    with filled_job(cluster, abs, list(range(-60_000, 0)), per_call=1e-6) as job:  # (60 ms of work in all)
        sizes = [p.n for p in job.outstanding.values()]
        assert sum(sizes) == 60_000 and len(sizes) <= P.window(job.slots), sizes


MAPPED_BLOCKS = """
import ctypes, os, sys, zmq
from burla import protocol as P

class Info(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                                      "fsmblks", "uordblks", "fordblks", "keepcost")]

libc = ctypes.CDLL(None)
if not hasattr(libc, "mallinfo2"):
    print("no mallinfo2"); sys.exit(0)
libc.mallinfo2.restype = Info
P.socket(zmq.Context.instance(), zmq.DEALER).close()  # (what every process of burla's does first)
before = libc.mallinfo2().hblks
buffers = [bytearray(3 << 20) for _ in range(2)]  # a batch's worth
print(libc.mallinfo2().hblks - before)
"""


@pytest.mark.parametrize("own_setting", [False, True])
def test_batch_sized_buffers_stay_on_the_heap(own_setting):
    """A process that opens a burla socket keeps MiB-sized buffers on malloc's heap (reused from batch to batch)
    instead of mapping and page-faulting through each; unless the user tuned malloc themselves."""
    env = dict(os.environ)
    env.pop("GLIBC_TUNABLES", None)
    for k in [k for k in env if k.startswith("MALLOC_")]:
        del env[k]
    if own_setting:
        env["MALLOC_ARENA_MAX"] = "4"
    out = subprocess.run([sys.executable, "-c", MAPPED_BLOCKS], env=env, capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 0, out.stderr
    if out.stdout.strip() == "no mallinfo2":
        pytest.skip("this C library has no mallinfo2")
    assert int(out.stdout) == (2 if own_setting else 0), out.stdout
