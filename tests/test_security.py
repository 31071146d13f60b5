"""A TCP broker is CURVE-encrypted and admits only the credentials it issued, each held to its role."""

import contextlib
import os
import re
import socket
import subprocess
import sys
import threading
import time

import msgpack
import pytest
import zmq

import burla
from burla import protocol as P, security
from burla import remote_parallel_map
from burla.client import cluster_state
from conftest import HERE


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def burla_command(args, prelude=None):
    """`python -m burla ARGS`, or, with a prelude (Python that breaks one of its parts), that run after it."""
    if not prelude:
        return [sys.executable, "-m", "burla", *args]
    return [sys.executable, "-c", f"{prelude}\nimport sys; from burla.cli import main; sys.exit(main({list(args)!r}))"]


@contextlib.contextmanager
def dialled_executor(address, credential):
    """An Executor in this process that has dialled the broker at address with credential (and nothing more)."""
    from burla.worker.executor import Executor

    executor = Executor(address, "in-test", 0, token=credential)
    executor.ctx, executor.sock, executor.handshakes = zmq.Context(), None, None
    try:
        executor.dial()
        yield executor
    finally:
        executor.sock.close(0)
        executor.handshakes.close(0)
        executor.ctx.term()


class SecureCluster:
    def __init__(self, tmp_path, worker_user=None, worker_prelude=None):
        """worker_user: (uid, home) to run the worker as that unprivileged user; worker_prelude: Python the worker
        process runs first (to break one of its parts)."""
        self.worker_prelude = worker_prelude
        self.state = tmp_path / "state"
        self.address = f"tcp://127.0.0.1:{free_port()}"
        self.env = dict(os.environ, PYTHONPATH=HERE, BURLA_HEARTBEAT_INTERVAL="0.5")
        self.procs = []
        try:
            self.come_up(worker_user)
        except BaseException:  # (a test whose cluster never came up leaves nothing running)
            self.stop()
            raise

    def come_up(self, worker_user):
        self.broker = self.start("broker", "--bind", self.address, "--state-dir", str(self.state),
                                 stdout=subprocess.PIPE, text=True)
        banner = [self.broker.stdout.readline() for _ in range(3)]
        self.api_key = re.search(r"--api-key (\S+)", banner[1]).group(1)
        self.token = re.search(r"BURLA_WORKER_TOKEN=(\S+)", banner[2]).group(1)
        worker_env, extra = dict(self.env, BURLA_WORKER_TOKEN=self.token), {}
        if worker_user:
            uid, home = worker_user
            worker_env.update(HOME=home, TMPDIR=home, BURLA_ENV_CACHE=os.path.join(home, "envs"))
            extra = {"user": uid, "group": uid, "extra_groups": [], "cwd": home}
        self.start("worker", "--broker", self.address, "--slots", "2", "--name", "w", env=worker_env, **extra)
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            try:
                workers = cluster_state(self.address, 1, self.api_key)["workers"]
                if len(workers) == 1 and workers[0]["slots"] == 2:  # (both executors ready, not only the worker)
                    return
            except TimeoutError:
                pass
        raise TimeoutError("secure cluster did not come up")

    def start(self, *args, env=None, **kwargs):
        command = burla_command(args, self.worker_prelude if args[0] == "worker" else None)
        proc = subprocess.Popen(command, env=env or self.env, **kwargs)
        self.procs.append(proc)
        return proc

    def stop(self):
        for proc in self.procs:
            proc.kill()
            proc.wait()


@pytest.fixture(scope="module")
def secure(tmp_path_factory):
    c = SecureCluster(tmp_path_factory.mktemp("secure"))
    yield c
    c.stop()


def test_jobs_run_with_the_api_key_and_keys_are_private(secure):
    assert remote_parallel_map(lambda x: x + 1, range(10), cluster=secure.address, api_key=secure.api_key,
                               spinner=False) == list(range(1, 11))
    assert oct(secure.state.stat().st_mode & 0o777) == "0o700"
    for path in secure.state.rglob("*"):  # keys, and the jobs' store
        assert oct(path.stat().st_mode & 0o777) == ("0o700" if path.is_dir() else "0o600"), path


def test_wrong_or_missing_key_is_refused_without_hanging(secure):
    public = zmq.curve_public(zmq.curve_keypair()[1])
    stranger = security.new_credential(security.CLIENT, security.BrokerKeys(secure.state).public)
    for key in (stranger, security.new_credential(security.CLIENT, public)):
        start = time.monotonic()
        with pytest.raises(burla.ClusterConnectionError, match="API key"):
            remote_parallel_map(abs, [1], cluster=secure.address, api_key=key, spinner=False)
        assert time.monotonic() - start < 8
    start = time.monotonic()  # a key for this broker that it never issued is refused outright, and said so
    with pytest.raises(burla.ClusterConnectionError, match="refused this API key"):
        remote_parallel_map(abs, [1], cluster=secure.address, api_key=stranger, spinner=False)
    assert time.monotonic() - start < 3
    with pytest.raises(ValueError, match="not a burla credential"):
        remote_parallel_map(abs, [1], cluster=secure.address, api_key="hunter2", spinner=False)
    with pytest.raises(ValueError, match="not an API key"):  # a worker token is not an API key
        remote_parallel_map(abs, [1], cluster=secure.address, api_key=secure.token, spinner=False)


def raw(secure, credential, kind):
    ctx = zmq.Context.instance()
    sock = P.socket(ctx, zmq.DEALER, credential=credential, role=kind)
    sock.connect(secure.address)
    return sock


def test_roles_are_enforced(secure):
    # a worker cannot submit jobs
    as_worker = raw(secure, secure.token, security.WORKER)
    P.send(as_worker, P.SUBMIT, {"j": b"12345678", "c": b"x", "d": b"d", "cpu": 1}, [b"f"])
    assert not as_worker.poll(1000)
    # a client cannot register as a worker or post results
    as_client = raw(secure, secure.api_key, security.CLIENT)
    P.send(as_client, P.REGISTER, {"w": "fake", "slots": 100, "cpu": 100, "ram": 100})
    P.send(as_client, P.READY, {"w": "w", "k": 2, "pid": 1})
    P.send(as_client, P.RESULT, {"j": b"12345678", "i": 0, "k": 1, "f": 1})
    time.sleep(0.5)
    state = cluster_state(secure.address, 2, secure.api_key)
    assert [w["id"] for w in state["workers"]] == ["w"] and state["workers"][0]["slots"] == 2
    as_worker.close(0)
    as_client.close(0)


def test_clients_cannot_see_or_cancel_each_others_jobs(secure):
    other_key = subprocess.run([sys.executable, "-m", "burla", "broker", "--bind", secure.address, "--state-dir",
                                str(secure.state), "--new-api-key"], capture_output=True, text=True,
                               check=True).stdout.strip()
    outcome = []

    def long_job():
        outcome.append(remote_parallel_map(lambda x: time.sleep(0.5) or x, range(8), cluster=secure.address,
                                           api_key=secure.api_key, spinner=False))

    thread = threading.Thread(target=long_job)
    thread.start()
    deadline = time.monotonic() + 5
    mine = []
    while not mine and time.monotonic() < deadline:
        mine = cluster_state(secure.address, 2, secure.api_key)["jobs"]
    assert len(mine) == 1
    theirs = cluster_state(secure.address, 2, other_key)
    assert theirs["jobs"] == [] and len(theirs["workers"]) == 1  # sees the cluster, not the other's job
    intruder = raw(secure, other_key, security.CLIENT)
    P.send(intruder, P.CANCEL, {"j": bytes.fromhex(mine[0]["id"])})
    thread.join(30)
    assert outcome == [list(range(8))]  # the job was not cancelled
    intruder.close(0)


def test_broker_survives_ten_thousand_malformed_frames(secure):
    import random

    rng = random.Random(1)
    senders = [raw(secure, secure.api_key, security.CLIENT), raw(secure, secure.token, security.WORKER)]
    commands = [P.SUBMIT, P.BATCH, P.END, P.CANCEL, P.RESULT, P.LOG, P.READY, P.REGISTER, P.HEARTBEAT, b"?", b"Q"]
    for n in range(10_000):
        sock = senders[n % 2]
        kind = n % 4
        if kind == 0:  # random frames
            frames = [rng.randbytes(rng.randint(0, 40)) for _ in range(rng.randint(1, 6))]
        elif kind == 1:  # our envelope, random header bytes
            frames = [b"", P.VERSION, rng.choice(commands), rng.randbytes(rng.randint(0, 30))]
        else:  # our envelope, a well-formed header with wrong or missing values
            header = {rng.choice("jicdknwszoef"): rng.choice([None, -1, "x", b"\0" * 8, [1], {"a": 1}, 1e300])
                      for _ in range(rng.randint(0, 5))}
            frames = [b"", P.VERSION, rng.choice(commands), msgpack.packb(header), rng.randbytes(8)]
        sock.send_multipart(frames)
    for sock in senders:
        sock.close(0)
    out = remote_parallel_map(lambda x: x * 2, range(50), cluster=secure.address, api_key=secure.api_key,
                              spinner=False)
    assert out == [x * 2 for x in range(50)]
    assert secure.broker.poll() is None


def test_login_writes_a_private_config(tmp_path, secure):
    env = dict(os.environ, BURLA_CONFIG=str(tmp_path / "cfg" / "config.toml"))
    subprocess.run([sys.executable, "-m", "burla", "login", secure.address, "--api-key", secure.api_key],
                   check=True, env=env, capture_output=True)
    status = subprocess.run([sys.executable, "-m", "burla", "status"], env=env, capture_output=True, text=True,
                            timeout=20)
    assert status.returncode == 0 and "worker w " in status.stdout
    assert oct((tmp_path / "cfg" / "config.toml").stat().st_mode & 0o777) == "0o600"


def test_embedded_cluster_listens_on_no_network_port(run_script):
    proc = run_script("""
        import psutil
        from burla import remote_parallel_map, local
        remote_parallel_map(abs, [-1], spinner=False)
        pids = local.cluster().pids()
        procs = [psutil.Process(p) for p in pids]
        procs += [c for p in procs for c in p.children(recursive=True)]
        inet = []
        for p in procs:
            try:
                inet += p.net_connections(kind="inet")
            except psutil.NoSuchProcess:
                pass  # a short-lived helper (the worker asking podman whether it answers)
        print(local.cluster().address.split(":")[0], len(inet))
    """)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["ipc", "0"]


def test_only_the_clusters_admin_speaks_for_its_autoscaler(secure):
    """CAPACITY (what the autoscaler is booting, which growing jobs are told) is taken from the cluster's first
    API key only: another user's key cannot make other users' progress lines say VMs are coming."""
    other_key = subprocess.run([sys.executable, "-m", "burla", "broker", "--bind", secure.address, "--state-dir",
                                str(secure.state), "--new-api-key"], capture_output=True, text=True,
                               check=True).stdout.strip()
    assert cluster_state(secure.address, 2, other_key)["workers"]  # (the key is admitted)
    try:
        cluster_state(secure.address, 2, other_key, capacity={"b": 99, "n": 0, "mx": 99})
    except TimeoutError:
        pass  # (refused: the broker may not answer that connection at all)
    assert cluster_state(secure.address, 2, secure.api_key)["scaling"] is None
    state = cluster_state(secure.address, 2, secure.api_key, capacity={"b": 2, "n": 1, "mx": 4})
    assert {k: state["scaling"][k] for k in "bn"} == {"b": 2, "n": 1}


@pytest.mark.timeout(30)
def test_an_executor_whose_handshake_is_never_answered_dials_again(tmp_path):
    """ZeroMQ does not retry a CURVE handshake that failed, and waits 30 s for one that gets no answer: an executor
    left like that never says READY, and its slot never joins. It dials again after HANDSHAKE_WAIT (set to 1 s
    here) without an answer, and says so on its worker's log."""
    listener = socket.create_server(("127.0.0.1", 0))  # accepts, and never speaks CURVE (nor anything)
    listener.settimeout(8)
    credential = security.new_credential(security.SLOT, zmq.curve_keypair()[0])
    token = tmp_path / "key"
    token.write_text(credential)
    code = ("import burla.worker.executor as e; e.HANDSHAKE_WAIT = 1.0; "
            f"e.main('tcp://127.0.0.1:{listener.getsockname()[1]}', 'w', 0, token=open({str(token)!r}).read())")
    executor = subprocess.Popen([sys.executable, "-c", code], env=dict(os.environ, PYTHONPATH=HERE),
                                stderr=subprocess.PIPE, text=True)
    held = []
    try:
        for _ in range(3):  # the first dial, then two more, each after a second with no answer
            held.append(listener.accept()[0])
    finally:
        executor.kill()
        _, err = executor.communicate(timeout=10)
        for conn in held:
            conn.close()
        listener.close()
    assert len(held) == 3
    assert "handshake with the broker" in err and "no answer" in err and "dialling again" in err, err


def test_a_slot_whose_zygote_failed_after_forking_still_joins(tmp_path):
    """A zygote that forks an executor but answers too late (a first boot importing on a loaded VM): the worker
    gives up on it and starts a fresh interpreter instead, which must not get the key the first executor already
    read from their shared pipe (it would dial with no key and never join); it gets a fresh one."""
    prelude = ("import time, burla.worker.zygote as z\n"
               "fork = z.Zygote.fork\n"
               "def late(self, *args):\n"
               "    fork(self, *args)\n"
               "    time.sleep(1.0)\n"  # (its executor has read its key by now)
               "    raise OSError('no message')\n"
               "z.Zygote.fork = late")
    cluster = SecureCluster(tmp_path, worker_prelude=prelude)  # (it waits for both slots, or raises)
    try:
        assert remote_parallel_map(lambda x: os.getpid(), range(20), cluster=cluster.address,
                                   api_key=cluster.api_key, spinner=False)
    finally:
        cluster.stop()


def test_an_executor_refused_before_its_first_ready_dials_again(secure):
    """An executor that dials before its worker announced its key is refused, and ZeroMQ then has no connection
    left on that socket, and dials no more: a READY sent after that (a blocking send) waited forever, and the slot
    never joined (seen on a replacement VM, one time in four under load). Here the refusal always comes first: the
    executor waits 2 s after dialling, the key is announced after 0.5 s."""
    credential, public = security.slot_credential(secure.token)
    key = secure.state / "late-key"
    security.write_private(key, credential)
    dialled = secure.state / "late-dialled"
    code = ("import time, burla.worker.executor as e\n"
            "dial = e.Executor.dial\n"
            "def late(self):\n"
            "    dial(self)\n"
            f"    open({str(dialled)!r}, 'a').close()\n"
            "    time.sleep(2.0)\n"
            "e.Executor.dial = late\n"
            f"e.main({secure.address!r}, 'late', 0, token=open({str(key)!r}).read())")
    executor = subprocess.Popen([sys.executable, "-c", code], env=dict(secure.env))
    ctx = zmq.Context()
    worker = P.socket(ctx, zmq.DEALER, credential=secure.token, role=security.WORKER)
    try:
        worker.connect(secure.address)
        deadline = time.monotonic() + 15
        while not dialled.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(0.5)  # (its handshake is refused meanwhile: its key is not announced yet)
        P.send(worker, P.REGISTER, {"w": "late", "host": "late", "slots": 1, "cpu": 1, "ram": 1})
        P.send(worker, P.SLOT_KEY, {"w": "late", "s": "late/0", "p": public, "new": 1})
        deadline, slots = time.monotonic() + 10, None
        while time.monotonic() < deadline and slots != 1:
            P.send(worker, P.HEARTBEAT, {"w": "late"})
            while worker.poll(0):
                worker.recv_multipart()
            late = [w for w in cluster_state(secure.address, 2, secure.api_key)["workers"] if w["id"] == "late"]
            slots = late[0]["slots"] if late else None
            time.sleep(0.2)
        assert slots == 1, "the executor's READY never came"
    finally:
        executor.kill()
        executor.wait()
        worker.close(0)
        ctx.term()


def test_ready_after_a_refused_handshake_does_not_block(secure):
    """The cause of the above, deterministically: after a refusal a blocking send on that socket never returns
    (an executor's READY, or the RESULT of a call that ran while the broker restarted, which refuses its key until
    its worker tells it again)."""
    credential, _ = security.slot_credential(secure.token)  # (never announced: refused)
    with dialled_executor(secure.address, credential) as executor:
        assert executor.handshakes.poll(5000), "no handshake event"
        time.sleep(0.1)
        for what, send in (("READY", executor.ready_unlocked),  # (and a batch's result, after a broker restart)
                           ("RESULT", lambda: executor.reply({"j": b"j" * 8, "i": 0}, [b"x"], []))):
            sent = threading.Thread(target=send, daemon=True)
            sent.start()
            sent.join(3)
            assert not sent.is_alive(), f"{what} blocked on a socket whose handshake was refused"
        assert executor.handshake(), "the refusal did not make it dial again"


def test_a_full_queue_holds_an_executors_sends_back_and_loses_none(monkeypatch):
    """The other side of never blocking on a refused socket: a broker that reads slowly (a flood of output) must
    still hold the executor back, not make it drop what it sends."""
    small = P.socket

    def socket(*args, **kwargs):  # (a short queue, to fill it fast)
        sock = small(*args, **kwargs)
        sock.sndhwm = 4
        return sock
    monkeypatch.setattr(P, "socket", socket)
    ctx = zmq.Context()
    public, secret = zmq.curve_keypair()
    router = ctx.socket(zmq.ROUTER)  # a CURVE server admitting any key (no ZAP handler), that does not read yet
    router.curve_secretkey, router.curve_publickey, router.curve_server, router.rcvhwm = secret, public, True, 4
    port = router.bind_to_random_port("tcp://127.0.0.1")
    try:
        with dialled_executor(f"tcp://127.0.0.1:{port}", security.new_credential(security.SLOT, public)) as executor:
            assert executor.handshakes.poll(5000), "no handshake event"
            sent = threading.Thread(daemon=True, target=lambda: [
                executor.send(P.LOG, {"k": k}, [b"x" * 65536]) for k in range(200)])
            sent.start()
            sent.join(1.5)
            assert sent.is_alive(), "200 messages of 64 KiB did not fill the queue"
            got = 0
            deadline = time.monotonic() + 20
            while got < 200 and time.monotonic() < deadline:
                if router.poll(500):
                    router.recv_multipart()
                    got += 1
            sent.join(5)
            assert got == 200 and not sent.is_alive(), f"{got} of 200 arrived"
    finally:
        router.close(0)
        ctx.term()
