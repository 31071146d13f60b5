"""The standard interfaces on a real cluster: burla.Executor (concurrent.futures), tuple inputs unpacked as
upstream Burla does, and remote tracebacks without burla's own frames."""

import concurrent.futures as cf
import functools
import itertools
import operator
import time

import pytest

import burla
from burla import remote_parallel_map


@pytest.fixture
def executor(cluster):
    with burla.Executor(cluster=cluster.address, spinner=False) as ex:
        yield ex


def square(x):
    return x * x


def fail_on(x, bad=3):
    if x == bad:
        raise KeyError(x)
    return x


def sleep_then(x, path=None):
    time.sleep(x)
    if path:
        open(path, "a").write("ran\n")
    return x


def test_submit_map_and_the_futures_api(executor):
    futures = [executor.submit(square, i) for i in range(50)]
    assert [f.result(timeout=30) for f in futures] == [i * i for i in range(50)]
    assert list(executor.map(square, range(20))) == [i * i for i in range(20)]
    assert list(executor.map(operator.add, range(5), range(10, 15), chunksize=7)) == [10, 12, 14, 16, 18]
    assert executor.submit(fail_on, 1, bad=1).exception(timeout=30).args == (1,)  # keyword arguments travel
    done, pending = cf.wait([executor.submit(square, i) for i in range(10)], timeout=30)
    assert len(done) == 10 and not pending
    assert sorted(f.result() for f in cf.as_completed([executor.submit(square, i) for i in range(10)],
                                                       timeout=30)) == [i * i for i in range(10)]
    # any callable: a partial, a callable object, a lambda (each its own job or the job for any callable)
    assert executor.submit(functools.partial(operator.mul, 3), 4).result(timeout=30) == 12
    assert executor.submit(lambda: "no arguments").result(timeout=30) == "no arguments"
    with pytest.raises(TypeError):
        executor.submit(42)


def test_a_failed_call_fails_its_future_only(executor):
    futures = [executor.submit(fail_on, i) for i in range(8)]
    with pytest.raises(KeyError) as info:
        futures[3].result(timeout=30)
    assert "fail_on" in str(info.value.__cause__)  # the remote traceback, the user's frame in it
    assert info.value.burla_input_index is not None
    assert [f.result(timeout=30) for i, f in enumerate(futures) if i != 3] == [0, 1, 2, 4, 5, 6, 7]
    # arguments that cannot be pickled fail that call alone, at once
    import threading

    bad, good = executor.submit(square, threading.Lock()), executor.submit(square, 5)
    with pytest.raises(TypeError, match="pickled"):
        bad.result(timeout=30)
    assert good.result(timeout=30) == 25


def test_map_is_lazy_and_times_out(executor):
    # an endless iterable: map reads it a bounded distance ahead of what is consumed
    assert list(itertools.islice(executor.map(square, itertools.count()), 5)) == [0, 1, 4, 9, 16]
    results = executor.map(sleep_then, [0, 10], timeout=2)
    assert next(results) == 0
    started = time.monotonic()
    with pytest.raises(TimeoutError):
        next(results)
    assert time.monotonic() - started < 5


def test_cancel_a_queued_and_a_running_call(executor, tmp_path):
    marker = tmp_path / "ran"
    running = [executor.submit(sleep_then, 60, str(marker)) for _ in range(2)]  # both slots
    queued = executor.submit(sleep_then, 0, str(marker))
    deadline = time.monotonic() + 20
    while not all(f.running() for f in running) and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(0.5)  # (the calls begin)
    assert queued.cancel() and queued.cancelled()
    assert all(f.cancel() for f in running)
    # the slots are free again at once: the running calls were interrupted, not waited for
    started = time.monotonic()
    assert executor.submit(square, 9).result(timeout=20) == 81
    assert time.monotonic() - started < 10
    with pytest.raises(cf.CancelledError):
        running[0].result()
    time.sleep(0.5)
    assert not marker.exists()  # neither the queued call nor the interrupted ones finished


def test_shutdown_cancels_what_is_queued(cluster):
    ex = burla.Executor(cluster=cluster.address, spinner=False)
    futures = [ex.submit(sleep_then, 0.5) for _ in range(20)]
    ex.shutdown(wait=True, cancel_futures=True)
    assert all(f.done() for f in futures)
    assert any(f.cancelled() for f in futures)
    with pytest.raises(RuntimeError):
        ex.submit(square, 1)


def test_many_submits_leave_no_state_behind(executor):
    n = 100_000
    futures = [executor.submit(square, i) for i in range(n)]
    done, _ = cf.wait(futures, timeout=100)
    assert len(done) == n and futures[-1].result() == (n - 1) ** 2
    # the executor keeps nothing per finished call (memory stays flat however many there are)
    assert not executor._calls
    assert executor._thread.is_alive()


def test_bad_settings_are_refused_at_once():
    with pytest.raises(ValueError, match="func_cpu"):
        burla.Executor(func_cpu=-1)
    with pytest.raises(ValueError, match="retries"):
        burla.Executor(retries="3")


# ------------------------------------------------------------------ tuple inputs

def add(a, b):
    return a + b


def whole(pair):
    return pair


def with_default(a, b=10):
    return (a, b)


def test_tuples_are_unpacked_only_for_functions_that_need_it(cluster):
    def rpm(f, inputs):
        return remote_parallel_map(f, inputs, cluster=cluster.address, spinner=False)

    assert rpm(add, [(1, 2), (3, 4)]) == [3, 7]
    assert rpm(whole, [(1, 2), (3, 4)]) == [(1, 2), (3, 4)]
    assert rpm(with_default, [(1, 2)]) == [((1, 2), 10)]  # one argument suffices: the tuple is it
    assert rpm(max, [(1, 5)]) == [5]  # no signature to read: whole
    assert rpm(operator.add, [(1, 2)]) == [3]
    assert rpm(lambda *args: args, [(1, 2)]) == [((1, 2),)]
    with pytest.raises(TypeError):  # a list is not unpacked
        rpm(add, [[1, 2]])


# ------------------------------------------------------------------ tracebacks

def test_a_script_sees_its_own_line_not_burla_frames(cluster, run_script):
    result = run_script(f"""
        from burla import remote_parallel_map

        def divide(x):
            return 1 / x

        remote_parallel_map(divide, [1, 0], cluster={cluster.address!r}, spinner=False)
    """)
    assert result.returncode == 1
    err = result.stderr
    assert "return 1 / x" in err and "ZeroDivisionError" in err and "input 1" in err
    assert "remote_parallel_map(divide" in err  # the caller's line
    for inside in ("on_result", "raise exceptions[0]", "batches", "receive"):
        assert inside not in err, err


def test_a_notebook_sees_its_cell_not_burla_frames(cluster):
    import nbformat
    from test_notebook import run_notebook, text

    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_code_cell(
        "from burla import remote_parallel_map\n"
        "def divide(x):\n    return 1 / x\n"
        "remote_parallel_map(divide, [1, 0], spinner=False)")]
    run_notebook(nb, env={"BURLA_CLUSTER": cluster.address}, allow_errors=True)
    error = nb.cells[0].outputs[-1]
    assert error.output_type == "error" and error.ename == "ZeroDivisionError"
    tb = text(nb.cells[0])
    assert "return 1 / x" in tb and "input 1" in tb
    for inside in ("client.py", "on_result", "raise exceptions[0]"):
        assert inside not in tb, tb


def test_no_broker_fails_the_futures_instead_of_hanging(tmp_path):
    ex = burla.Executor(cluster=f"ipc://{tmp_path}/nobody", spinner=False)
    started = time.monotonic()
    with pytest.raises(burla.ClusterConnectionError):
        ex.submit(square, 2).result(timeout=30)
    assert time.monotonic() - started < 20
    ex.shutdown(wait=False)


def test_a_job_cancelled_elsewhere_ends_cancelled_not_failed(cluster):
    from burla import client

    closed = []

    class Recorder:
        def close(self, state="done"):
            closed.append(state)

        def __getattr__(self, name):
            return lambda *args, **kwargs: None

    conn = client.connection(cluster.address)
    job = client.Job(conn, sleep_then, [30] * 4, spinner=False, view=Recorder(), **client.job_settings())
    runs = job.batches()

    def cancel_soon():
        time.sleep(1.5)
        burla.Job(job.id.hex(), cluster=cluster.address).cancel()

    import threading

    canceller = threading.Thread(target=cancel_soon, daemon=True)
    canceller.start()
    with pytest.raises(burla.JobCancelledError):
        list(runs)
    canceller.join(10)  # (its cancel() waits to see the job stop: not past this test's cluster)
    assert closed == ["cancelled"]


def test_a_broker_that_answers_but_never_takes_the_job_is_an_error_not_a_hang(tmp_path, monkeypatch):
    import threading

    import msgpack
    import zmq

    from burla import client, protocol as P

    monkeypatch.setattr(client, "ACCEPT_LIMIT", 2.0)
    address = f"ipc://{tmp_path}/deaf"
    ctx = zmq.Context.instance()
    router = ctx.socket(zmq.ROUTER)
    router.bind(address)
    stop = threading.Event()

    def deaf_broker():  # answers heartbeats, drops everything else
        while not stop.is_set():
            if router.poll(100):
                frames = router.recv_multipart()
                if frames[3:4] == [P.HEARTBEAT]:
                    router.send_multipart([frames[0], b"", P.VERSION, P.HEARTBEAT, msgpack.packb({"jobs": []})])

    thread = threading.Thread(target=deaf_broker, daemon=True)
    thread.start()
    try:
        started = time.monotonic()
        with pytest.raises(burla.ClusterConnectionError, match="did not take the job"):
            remote_parallel_map(square, range(3), cluster=address, spinner=False)
        with pytest.raises(burla.ClusterConnectionError, match="did not take the job"):
            remote_parallel_map(square, range(3), cluster=address, spinner=False, detach=True)
        assert time.monotonic() - started < 30
    finally:
        stop.set()
        thread.join(5)
        router.close(0)


def test_unpacking_is_decided_again_when_a_function_changes():
    """wants_unpacking is remembered per function (inspect.signature is slow), but not past a change."""
    from burla.calling import wants_unpacking

    def add(a, b):
        return a + b

    assert wants_unpacking(add) and wants_unpacking(add)
    add.__defaults__ = (1,)  # now add(a) works: each input whole
    assert not wants_unpacking(add)
    add.__code__ = (lambda a, b, c: 0).__code__
    add.__defaults__ = None
    assert wants_unpacking(add)
    assert not wants_unpacking(max) and not wants_unpacking(functools.partial(add, 1, 2))


def test_the_users_modules_a_function_uses_travel_with_it_even_wrapped(tmp_path, monkeypatch):
    """Modules of the user's own (beside a script, not installed) go by value: a worker elsewhere has no copy.
    They are found from the names the function's code uses, through the tuple-unpacking wrapper and partial."""
    import subprocess
    import sys

    from burla import calling, serialize

    (tmp_path / "own_helpers_a.py").write_text("def double(x):\n    return 2 * x\n")
    (tmp_path / "own_helpers_b.py").write_text("K = 3\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    import own_helpers_a
    import own_helpers_b

    scope = {"__name__": "__main__", "double": own_helpers_a.double, "own_helpers_b": own_helpers_b}
    for k in range(200):  # (a notebook's many globals, which the function does not use)
        scope[f"unused{k}"] = k
    exec("def f(x, y, z=0):\n    def inner():\n        return own_helpers_b.K * y\n    return double(x) + inner() + z\n",
         scope)
    for wrapped, expected in ((calling.Star(scope["f"]), 8), (functools.partial(scope["f"], z=1), None)):
        data, _ = serialize.dumps_function(wrapped)
        elsewhere = tmp_path / "elsewhere"
        elsewhere.mkdir(exist_ok=True)
        call = "f((1, 2))" if expected else "f(1, 2)"
        proc = subprocess.run([sys.executable, "-c", f"import cloudpickle, sys; f = cloudpickle.loads("
                               f"sys.stdin.buffer.read()); print({call})"], input=data, capture_output=True,
                              cwd=elsewhere, env={"PATH": "/usr/bin:/bin"}, timeout=60)
        assert proc.returncode == 0, proc.stderr.decode()
        assert proc.stdout.decode().strip() == str(expected or 9)
