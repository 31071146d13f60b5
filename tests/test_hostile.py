"""What careless and hostile users tried against a cluster, each break as it was reported, with real processes:
none of it may stop, starve or spy on the cluster or another user's job."""

import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time

import psutil
import pytest
import zmq

import burla
from burla import protocol as P, remote_parallel_map, security, serialize
from burla.client import cluster_state
from conftest import processes_mentioning
from test_security import SecureCluster, burla_command

pytestmark = pytest.mark.timeout(90)


@pytest.fixture(scope="module")
def secure(tmp_path_factory):
    c = SecureCluster(tmp_path_factory.mktemp("hostile"))
    c.other_key = subprocess.run([sys.executable, "-m", "burla", "broker", "--bind", c.address, "--state-dir",
                                  str(c.state), "--new-api-key"], capture_output=True, text=True,
                                 check=True).stdout.strip()
    yield c
    c.stop()


def run(secure, function_, inputs, key=None, **kwargs):
    return remote_parallel_map(function_, inputs, cluster=secure.address, api_key=key or secure.api_key,
                               spinner=False, **kwargs)


def dealer(secure, credential=None, kind=security.CLIENT, **options):
    sock = P.socket(zmq.Context.instance(), zmq.DEALER, credential=credential or secure.api_key, role=kind)
    for name, value in options.items():
        setattr(sock, name, value)
    sock.connect(secure.address)
    return sock


def submit(sock, job, **fields):
    function, digest = serialize.dumps_function(lambda x: x)
    header = {"j": job, "c": b"hostile", "d": digest, "cpu": 1, "ram": 0, **fields}
    P.send(sock, P.SUBMIT, header, serialize.split(function))


def batch(sock, job, start=0, items=(1,)):
    flags, frames = serialize.pack_items(list(items))
    P.send(sock, P.BATCH, {"j": job, "i": start, "n": len(items), "z": flags}, frames)


def idle(secure):
    """The broker still answers, every slot is free, and an honest job runs."""
    assert secure.broker.poll() is None, "the broker died"
    assert run(secure, lambda x: x * 2, range(40)) == [x * 2 for x in range(40)]
    deadline = time.monotonic() + 5
    while sum(w["busy"] for w in cluster_state(secure.address, 2, secure.api_key)["workers"]):
        assert time.monotonic() < deadline, "slots stayed busy"
        time.sleep(0.05)


# 1. a SUBMIT whose digest is a list or a map, then a BATCH, took the broker down (TypeError outside the try)
def test_a_malformed_submit_then_a_batch_cannot_crash_the_broker(secure):
    sock = dealer(secure)
    for digest in ([1, 2], {"a": 1}, None, 7):
        job = os.urandom(8)
        submit(sock, job, d=digest)
        batch(sock, job)
    time.sleep(0.3)
    idle(secure)
    sock.close(0)


# 5. cpu=-inf ran, left the worker's free cpu NaN, and every later job hung while status showed nothing busy
def test_impossible_resources_are_refused_and_cannot_poison_a_worker(secure):
    for kwargs in ({"func_cpu": float("-inf")}, {"func_cpu": float("nan")}, {"func_ram": -1},
                   {"func_ram": float("inf")}, {"func_gpu": -2}, {"func_gpu": "A100:-1"}):
        with pytest.raises(ValueError):
            run(secure, abs, [1], **kwargs)
    sock = dealer(secure)  # and sent to the broker anyway, by hand
    for cpu, ram, gpu in ((float("-inf"), 0, None), (float("nan"), 0, None), (-1e17, 0, None),
                          (1, float("-inf"), None), (1, 0, -5), (1e300, 0, None)):
        job = os.urandom(8)
        submit(sock, job, cpu=cpu, ram=ram, gpu=gpu)
        batch(sock, job, items=range(4))
    time.sleep(0.5)
    idle(secure)
    # both slots still run calls at once (a worker whose free cpu drifted would run one, or none)
    (a0, a1), (b0, b1) = run(secure, lambda x: (time.monotonic(), time.sleep(1), time.monotonic())[::2], range(2))
    assert a0 < b1 and b0 < a1  # the two calls overlapped
    sock.close(0)


# 4. user A's call monkeypatched burla.serialize in an executor that then served user B: A read B's inputs,
# replaced B's results, read the worker token, and planted a pickle that ran code in B's client
def test_an_executor_never_serves_two_api_keys(secure, tmp_path, capfd):
    spy = tmp_path / "spied"

    def snoop(x):
        from burla import serialize as s

        with open(str(spy) + ".pids", "a") as f:
            f.write(f"{os.getpid()}\n")
        if getattr(s, "snooped", False):
            return x
        s.snooped = True
        unpack, pack = s.unpack_items, s.pack

        def record(*args):
            items = unpack(*args)
            with open(spy, "a") as f:
                f.write(repr(items) + "\n")
            return items

        s.unpack_items = record
        s.pack_items = lambda items, compress=False: pack(["forged"] * len(items))

        def chatter():
            while True:
                print("A-LEFTOVER", flush=True)
                time.sleep(0.01)

        threading.Thread(target=chatter, daemon=True).start()
        return x

    run(secure, snoop, range(4))
    pids_a = {int(line) for line in open(str(spy) + ".pids")}
    capfd.readouterr()
    out_b = run(secure, lambda x: (os.getpid(), x * 3), range(30), key=secure.other_key)
    assert [v for _, v in out_b] == [x * 3 for x in range(30)]  # not forged
    assert not pids_a & {pid for pid, _ in out_b}  # fresh executors
    assert not spy.exists() or "27" not in spy.read_text()  # nothing of B's was seen
    assert "A-LEFTOVER" not in capfd.readouterr().out  # A's leftover thread does not print into B's job
    # and A's own next job still runs (in fresh executors too: B had them last)
    assert run(secure, lambda x: x + 1, range(4)) == [1, 2, 3, 4]


def look_for_credentials(_):
    """Everything this call can read that might hold a worker token or another slot's key: every process's
    environment and command line it may open (as root: all of them), its own environment and objects."""
    found = []
    for pid in psutil.pids():
        for name in ("environ", "cmdline"):
            try:
                with open(f"/proc/{pid}/{name}", "rb") as f:
                    data = f.read()
            except OSError:
                continue
            found += [f"{pid}/{name}"] if (b"bw1-" in data or b"bs1-" in data) and \
                (name == "cmdline" or os.getuid() != 0) else []
    found += [k for k, v in os.environ.items() if "bw1-" in v or "bs1-" in v]
    import gc

    found += ["memory" for o in gc.get_objects() if isinstance(o, str) and o.startswith("bw1-")][:1]
    return found


def runs_as_nobody():
    try:
        return subprocess.run([sys.executable, "-c", "import burla"], user=65534, group=65534, extra_groups=[],
                              cwd="/", capture_output=True, timeout=30).returncode == 0
    except (OSError, subprocess.SubprocessError):
        return False


# 4 and 13. the worker token was in every process's command line, executors included, and in their memory
def test_user_code_cannot_reach_the_worker_token(tmp_path):
    """As another Unix user than root (when this interpreter can run as one), a call cannot read the worker's
    environment or memory either; as root it can read anything, so workers should not run as root."""
    home = tempfile.mkdtemp(prefix="burla-nobody-")
    os.chown(home, 65534, 65534)
    secure = SecureCluster.__new__(SecureCluster)
    try:
        SecureCluster.__init__(secure, tmp_path, worker_user=(65534, home) if runs_as_nobody() else None)
        assert run(secure, look_for_credentials, range(4)) == [[]] * 4
        worker = [p for p in processes_mentioning("--name w") if p.info["cmdline"][-1] == "w"]
        assert worker and all(secure.token not in " ".join(p.cmdline()) for p in worker)
    finally:
        secure.stop()
        shutil.rmtree(home, ignore_errors=True)


# 13. a worker with a wrong token retried silently forever
def test_a_worker_with_a_wrong_token_says_so_and_stops(secure):
    stranger = security.new_credential(security.WORKER, security.BrokerKeys(secure.state).public)
    proc = subprocess.run([sys.executable, "-m", "burla", "worker", "--broker", secure.address, "--name", "x"],
                          env=dict(secure.env, BURLA_WORKER_TOKEN=stranger), capture_output=True, text=True,
                          timeout=30)
    assert proc.returncode == 2 and "refused this worker token" in proc.stderr


def test_a_worker_refused_before_it_registers_says_so_too(secure):
    """Its REGISTER sent only after the refusal (on a loaded machine): ZeroMQ then has no connection to queue it
    on, and a blocking send hung the worker, silent, instead of it saying why and stopping."""
    stranger = security.new_credential(security.WORKER, security.BrokerKeys(secure.state).public)
    prelude = ("import time, burla.worker.worker as w\n"
               "register = w.Worker.register\n"
               "def late(self):\n"
               "    time.sleep(1.0)\n"
               "    register(self)\n"
               "w.Worker.register = late")
    proc = subprocess.run(burla_command(["worker", "--broker", secure.address, "--name", "x", "--slots", "1"],
                                        prelude), env=dict(secure.env, BURLA_WORKER_TOKEN=stranger),
                          capture_output=True, text=True, timeout=30)
    assert proc.returncode == 2 and "refused this worker token" in proc.stderr


def test_the_token_flag_warns_that_it_is_visible(secure, tmp_path):
    proc = subprocess.Popen([sys.executable, "-m", "burla", "worker", "--broker", secure.address, "--token",
                             secure.token, "--name", "flagged", "--slots", "1"], env=secure.env,
                            stderr=subprocess.PIPE, text=True)
    try:
        line = proc.stderr.readline()
        assert "command line" in line and "BURLA_WORKER_TOKEN" in line
    finally:
        proc.kill()
        proc.wait()


# 9. one input that could not be unpickled on the worker failed 294 of 300 inputs, with wrong indices; a result
# that could not be unpickled on the client aborted the job with a bare ValueError
class LoadsOnlyInTheClient:
    def __reduce__(self):
        return (rebuild_outside_executors, (5,))


class LoadsOnlyInExecutors:
    def __reduce__(self):
        return (rebuild_inside_executors, (7,))


def rebuild_outside_executors(value):
    if "BURLA_PARENT" in os.environ:  # set in executors only
        raise RuntimeError("this cannot be rebuilt on a worker")
    return value


def rebuild_inside_executors(value):
    if "BURLA_PARENT" not in os.environ:
        raise RuntimeError("this cannot be rebuilt in the client")
    return value


def test_one_bad_input_or_result_fails_alone(cluster):
    inputs = list(range(300))
    inputs[123] = LoadsOnlyInTheClient()
    out = remote_parallel_map(lambda x: x, inputs, cluster=cluster.address, spinner=False, return_exceptions=True)
    assert out[:123] == list(range(123)) and out[124:] == list(range(124, 300))
    assert isinstance(out[123], RuntimeError) and out[123].burla_input_index == 123
    with pytest.raises(RuntimeError, match="cannot be rebuilt on a worker") as info:
        remote_parallel_map(lambda x: x, inputs, cluster=cluster.address, spinner=False)
    assert info.value.burla_input_index == 123

    def result_of(x):
        return LoadsOnlyInExecutors() if x == 77 else (x, [x])

    out = remote_parallel_map(result_of, range(200), cluster=cluster.address, spinner=False,
                              return_exceptions=True)
    assert isinstance(out[77], burla.RemoteError) and out[77].burla_input_index == 77
    assert out[:77] == [(x, [x]) for x in range(77)] and out[78:] == [(x, [x]) for x in range(78, 200)]
    with pytest.raises(burla.RemoteError, match="could not be unpickled"):
        remote_parallel_map(result_of, range(200), cluster=cluster.address, spinner=False)


# 7. 6,000 results of 1 MiB made single RESULT messages of 1 GiB (broker at 3.2 GB)
def test_big_results_travel_in_bounded_messages(cluster):
    broker = psutil.Process(cluster.procs["broker"].pid)
    peak, done = [0], threading.Event()

    def watch():
        while not done.is_set():
            peak[0] = max(peak[0], broker.memory_info().rss)
            time.sleep(0.01)

    threading.Thread(target=watch, daemon=True).start()
    try:
        out = remote_parallel_map(lambda x: bytes([x % 256]) * (1 << 20), range(600), cluster=cluster.address,
                                  spinner=False, generator=True)
        assert sum(len(v) for v in out) == 600 << 20
    finally:
        done.set()
    print(f"broker peak RSS for 600 MiB of results: {peak[0] >> 20} MiB")
    assert peak[0] < 300 << 20


# 12. a nested call started a private embedded cluster in each executor (left running), or hung for good once
# the outer calls held every slot
def command_line(process):
    """Its command line, or none if it has exited (or become a zombie) since it was listed."""
    try:
        return process.cmdline()
    except psutil.Error:
        return []


def test_nested_calls_use_the_callers_cluster_and_never_hang(cluster):
    def outer(x):
        return sum(remote_parallel_map(lambda y: y * 10, range(x), spinner=False))

    assert remote_parallel_map(outer, [3], cluster=cluster.address, spinner=False) == [30]
    below = psutil.Process(cluster.procs["w1"].pid).children(recursive=True)
    assert not [p for p in below if "burla broker" in " ".join(command_line(p))]  # no private cluster in an executor
    deadline = time.monotonic() + 10  # both slots idle first: else one outer call may finish before the other starts
    while time.monotonic() < deadline and not all(
            w["busy"] == 0 and w["preparing"] == 0 for w in cluster_state(cluster.address)["workers"]):
        time.sleep(0.05)
    start = time.monotonic()
    with pytest.raises(burla.NoCompatibleWorkerError, match="nested"):  # both slots wait on nested jobs
        remote_parallel_map(outer, [3, 4], cluster=cluster.address, spinner=False)
    assert time.monotonic() - start < 20
    assert remote_parallel_map(outer, [3, 4], cluster=cluster.address, spinner=False, max_parallelism=1) == [30, 60]


def test_nested_calls_run_as_the_same_user(secure):
    def outer(x):
        return remote_parallel_map(lambda y: y + 1, [x], spinner=False)

    assert run(secure, outer, [1]) == [[2]]


# 14. a client and a broker of different protocol versions: the client waited for a silent broker
def test_a_client_of_another_version_is_told_at_once(secure, run_script):
    proc = run_script(f"""
        import time
        from burla import protocol
        protocol.VERSION = b"B9"
        from burla import remote_parallel_map
        start = time.monotonic()
        try:
            remote_parallel_map(abs, [1], cluster={secure.address!r}, api_key={secure.api_key!r}, spinner=False)
        except Exception as e:
            print(type(e).__name__, e)
        print(round(time.monotonic() - start, 1))
    """, env=dict(secure.env))
    out = proc.stdout
    assert "ClusterConnectionError" in out and P.VERSION.decode() in out and "pip install 'burla==" in out, proc.stderr
    assert float(out.split()[-1]) < 3


def test_executors_rejoin_a_restarted_secure_broker(tmp_path):
    """Slot keys live in the broker's memory: a broker started again on the same state dir learns them anew
    from the workers that rejoin, and their executors connect again."""
    secure = SecureCluster(tmp_path)
    try:
        assert run(secure, lambda x: x + 1, range(4)) == [1, 2, 3, 4]
        secure.broker.kill()
        secure.broker.wait()
        secure.broker = secure.start("broker", "--bind", secure.address, "--state-dir", str(secure.state),
                                     stdout=subprocess.DEVNULL)
        deadline = time.monotonic() + 20
        while True:
            try:
                state = cluster_state(secure.address, 1, secure.api_key)
                if state["workers"] and state["workers"][0]["slots"] == 2:
                    break
            except TimeoutError:
                pass
            assert time.monotonic() < deadline, "the worker's executors did not rejoin"
            time.sleep(0.1)
        assert run(secure, lambda x: x * 5, range(6)) == [0, 5, 10, 15, 20, 25]
    finally:
        secure.stop()


# found in review: user code could send READY for its own slot, which made the broker think the executor fresh
def test_a_ready_from_user_code_does_not_make_an_executor_fresh(secure, tmp_path):
    pids = tmp_path / "pids"

    def trick(x):
        import gc

        with open(pids, "a") as f:
            f.write(f"{os.getpid()}\n")
        executor = next(o for o in gc.get_objects() if type(o).__name__ == "Executor" and hasattr(o, "ready"))

        def later():
            time.sleep(0.3)
            executor.ready()

        threading.Thread(target=later, daemon=True).start()
        return x

    run(secure, trick, range(4))
    time.sleep(0.8)
    theirs = run(secure, lambda x: os.getpid(), range(20), key=secure.other_key)
    assert not {int(p) for p in pids.read_text().split()} & set(theirs)


def test_huge_error_messages_and_many_small_buffers_do_not_hang(cluster):
    import numpy

    def fail(x):
        raise ValueError("中" * 50_000)  # 150 KB of UTF-8 in the message, and again in the traceback

    with pytest.raises(ValueError, match="中"):
        remote_parallel_map(fail, [1], cluster=cluster.address, spinner=False)
    inputs = ([numpy.array([i]) for i in range(100)] for _ in range(3000))  # 300,000 small arrays
    assert remote_parallel_map(len, inputs, cluster=cluster.address, spinner=False) == [100] * 3000


def test_an_unpicklable_result_fails_alone(cluster):
    def result_of(x):
        return threading.Lock() if x == 1500 else x

    out = remote_parallel_map(result_of, range(3000), cluster=cluster.address, spinner=False,
                              return_exceptions=True)
    assert isinstance(out[1500], TypeError) and out[1500].burla_input_index == 1500
    assert out[:1500] == list(range(1500)) and out[1501:] == list(range(1501, 3000))


def test_a_job_limited_to_one_slot_leaves_the_others_to_other_users(secure):
    done = []
    thread = threading.Thread(target=lambda: done.append(
        run(secure, lambda x: time.sleep(0.3) or x, range(12), max_parallelism=1)))
    run(secure, abs, range(8))  # (this user's first job used both slots: they are its executors now)
    thread.start()
    time.sleep(0.8)
    start = time.monotonic()
    assert run(secure, lambda x: x, range(4), key=secure.other_key) == [0, 1, 2, 3]
    assert time.monotonic() - start < 2.5  # not after the other user's 3.6 s job
    thread.join(30)
    assert done == [list(range(12))]


# 19. another user's key asks for a detached job: to it the job does not exist, and it can neither read, follow,
# list nor cancel it; a flood of readers on one job is bounded
def test_another_key_cannot_see_attach_to_or_cancel_a_detached_job(secure):
    job = remote_parallel_map(time.sleep, [0.5] * 4, cluster=secure.address, api_key=secure.api_key,
                              detach=True)
    mine = dict(cluster=secure.address, api_key=secure.api_key)
    theirs = dict(cluster=secure.address, api_key=secure.other_key)
    with pytest.raises(burla.JobNotFoundError):
        burla.attach(job.id, **theirs)
    intruder = burla.Job(job.id, **theirs)
    with pytest.raises(burla.JobNotFoundError):
        intruder.result(timeout=10, spinner=False)
    with pytest.raises(burla.JobNotFoundError):
        intruder.logs()
    assert job.id not in [j.id for j in burla.jobs(**theirs)]
    sock = dealer(secure, secure.other_key)
    P.send(sock, P.CANCEL, {"j": bytes.fromhex(job.id)})
    sock.close(linger=1000)
    readers = [dealer(secure, secure.api_key) for _ in range(3)]
    for r in readers:
        for _ in range(100):  # (each ATTACH with p=1 is a reader; past the cap, refused)
            P.send(r, P.ATTACH, {"j": bytes.fromhex(job.id), "q": 0, "p": 1})
    assert burla.attach(job.id, **mine).result(timeout=30, spinner=False) == [None] * 4
    assert burla.attach(job.id, **mine).status().state == "done"
    for r in readers:
        r.close(0)
