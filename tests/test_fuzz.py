"""Structure-aware fuzzing of a real CURVE broker over TCP, from every kind of peer it admits and from one it does
not: tens of thousands of messages generated from protocol.SCHEMAS (wrong types, out of range, missing and extra
fields, nested junk, ids of jobs and batches that exist), random commands, versions and frame counts; raw TCP
peers sending ZMTP greetings and junk. After each flood the broker must be alive, must have logged no handler
failure (every message is checked where it enters, so no handler may ever raise), and must still run an honest
job, with its worker in place."""

import collections
import math
import os
import pickletools
import socket
import struct
import time

import msgpack
import psutil
import pytest
import zmq
from hypothesis import HealthCheck, Phase, given, settings, strategies as st

from burla import env as E, protocol as P, security, serialize
from burla import remote_parallel_map
from burla.client import cluster_state
from test_security import SecureCluster

TARGET = 6_000  # messages per role, at least
PER_EXAMPLE = (25, 40)  # messages drawn per hypothesis example
# Generation only: a failure is reported as found (shrinking it would replay examples against a broker whose state
# has moved on), and no example database is written. Each flood sizes max_examples to what is left of its TARGET
# (see examples_for): drawing is what a flood spends its time on.
SETTINGS = settings(max_examples=400, deadline=None, database=None, phases=[Phase.generate],
                    suppress_health_check=list(HealthCheck), print_blob=False)


def examples_for(left, sent, examples):
    """max_examples for the next call of a flood that has sent `sent` messages (or chunks) in `examples` examples
    so far and has `left` to go: about enough to make it up, so that no flood draws twice its TARGET (the count is
    only looked at between calls). The first call guesses 30 an example."""
    rate = sent / examples if examples and sent else 30
    return max(5, math.ceil(left / max(rate, 1)))


# ------------------------------------------------------------------------------------------------ the cluster
class WatchedCluster(SecureCluster):
    """SecureCluster with each process's stderr in a file (the broker's log is read for handler failures) and a
    stop that also ends the worker's executors and zygotes, and that runs when starting fails half way."""

    def __init__(self, tmp_path):
        self.logs = tmp_path
        self.procs = []
        # the broker and the worker stop when this process ends, however it ends (a timeout's os._exit too)
        self.lifeline, self.lifeline_w = os.pipe()
        try:
            super().__init__(tmp_path)
        except BaseException:
            self.stop()
            raise

    def start(self, *args, env=None, **kwargs):
        with open(self.logs / f"{args[0]}-{len(self.procs)}.log", "w") as log:
            kwargs.setdefault("stderr", log)
            return super().start(*args, "--parent-fd", str(self.lifeline), env=env, pass_fds=(self.lifeline,),
                                 **kwargs)

    @property
    def broker_process(self):
        return psutil.Process(self.broker.pid)

    def broker_log(self, since=0):
        with open(self.logs / "broker-0.log", "rb") as f:
            f.seek(since)
            return f.read().decode(errors="replace")

    def log_size(self):
        return (self.logs / "broker-0.log").stat().st_size

    def handler_failures(self, since=0):
        """What the broker logged with a traceback since that offset in its log: a message (or a step of its loop)
        that failed, a bug, as every message is checked before any handler runs."""
        return [block for block in self.broker_log(since).split("burla broker: ")[1:] if "Traceback" in block]

    def stop(self):
        for proc in self.procs:
            try:
                children = psutil.Process(proc.pid).children(recursive=True)
            except psutil.NoSuchProcess:
                children = []
            proc.kill()
            proc.wait()
            for child in children:
                try:
                    child.kill()
                except psutil.NoSuchProcess:
                    pass
            psutil.wait_procs(children, timeout=5)
        self.procs = []
        for fd in (self.lifeline, self.lifeline_w):
            if fd is not None:
                os.close(fd)
        self.lifeline = self.lifeline_w = None


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    c = WatchedCluster(tmp_path_factory.mktemp("fuzz"))
    yield c
    c.stop()


def honest_job(c, n=200):
    out = remote_parallel_map(lambda x: x * 2, range(n), cluster=c.address, api_key=c.api_key, spinner=False)
    assert out == [x * 2 for x in range(n)]


def settle(c, timeout=20):
    """Wait until the cluster is back to its one worker "w" with its two slots and no job of ours: whatever a
    flood registered has expired (it sends no heartbeats), and the jobs it left running are cancelled. Those do not
    expire in time: a job outlives its vanished client by its lease, 600 s unless its SUBMIT said otherwise (up to
    30 days), and a detached one runs until it is complete (see test_a_vanished_clients_job_lasts_its_lease)."""
    deadline = time.monotonic() + timeout
    state = None
    cancelled = set()
    sock = dealer(c, c.api_key, security.CLIENT)  # (the floods' jobs are this key's: it may cancel them)
    try:
        while time.monotonic() < deadline:
            assert c.broker.poll() is None, "the broker died"
            try:
                state = cluster_state(c.address, 2, c.api_key)
            except TimeoutError:
                continue
            if [(w["id"], w["slots"]) for w in state["workers"]] == [("w", 2)] and not state["jobs"]:
                if cancelled:
                    print(f"  cancelled {len(cancelled)} jobs left running")
                return state
            for job in state["jobs"]:  # (again on each round: a CANCEL the broker had no job for yet is dropped)
                P.send(sock, P.CANCEL, {"j": bytes.fromhex(job["id"])})
                cancelled.add(job["id"])
            drain(sock, Pools())
            time.sleep(0.2)
    finally:
        sock.close(0)
    raise AssertionError(f"the cluster did not settle back to worker w with 2 slots: {state}")


def wait_idle(c, timeout=15):
    """Wait until the broker has worked through what was sent to it (its CPU use falls), so a crash a late message
    causes shows up here."""
    proc = c.broker_process
    deadline = time.monotonic() + timeout
    quiet = 0
    last = sum(proc.cpu_times()[:2])
    while time.monotonic() < deadline and quiet < 3:
        time.sleep(0.1)
        now = sum(proc.cpu_times()[:2])
        quiet = quiet + 1 if now - last < 0.02 else 0
        last = now


def check_after_flood(c, sent, role, since):
    """since: where the broker's log was when the flood began."""
    began = time.monotonic()
    wait_idle(c)
    assert sent >= TARGET, f"only {sent} messages sent as {role}"
    assert c.broker.poll() is None, f"the broker died during the {role} flood"
    failures = c.handler_failures(since)
    assert not failures, f"the broker's handlers failed on {role} messages:\n" + "\n".join(failures[:3])
    settle(c)
    honest_job(c)
    state = cluster_state(c.address, 3, c.api_key)
    assert [(w["id"], w["slots"]) for w in state["workers"]] == [("w", 2)]
    assert not c.handler_failures(since)
    print(f"  checked in {time.monotonic() - began:.1f} s")


# ------------------------------------------------------------------------------------------------ values
class Ref:
    """A value chosen when the message is sent, from what exists by then (jobs, batches, tasks)."""
    __slots__ = ("pool", "k", "part")

    def __init__(self, pool, k, part=None):
        self.pool, self.k, self.part = pool, k, part

    def __repr__(self):
        return f"Ref({self.pool}, {self.k}, {self.part})"


class Pools:
    def __init__(self):
        self.jobs = collections.deque(maxlen=64)  # ids of jobs that exist (or did)
        self.starts = collections.deque([0], maxlen=64)  # batch starts seen
        self.tasks = collections.deque(maxlen=64)  # (job id, start, n) of TASKs a slot of ours holds
        self.unanswered = collections.deque()  # (when, job id, start, n) of those TASKs
        self.task_count = 0

    def resolve(self, value, depth=0):
        """Refs are header values, values of a map in the header ("pa", "at") or of a record in a list ("e")."""
        if isinstance(value, Ref):
            pool = getattr(self, value.pool)
            if not pool:
                return os.urandom(8) if value.pool == "jobs" else 0
            item = pool[-1 - value.k % len(pool)]  # (small k, which hypothesis favours: the latest)
            return item if value.part is None else item[value.part]
        if isinstance(value, dict) and depth < 3:
            return {k: self.resolve(v, depth + 1) for k, v in value.items()}
        if isinstance(value, list) and depth < 2 and len(value) <= 8:  # (error records in a RESULT)
            return [self.resolve(v, depth + 1) for v in value]
        return value

    def harvest(self, frames):
        """Learn job ids and batches from what the broker sends us."""
        if len(frames) < 4:
            return
        try:
            header = msgpack.unpackb(frames[3], raw=False)
        except Exception:
            return
        if not isinstance(header, dict):
            return
        j = header.get("j")
        if isinstance(j, bytes) and len(j) == 8:
            if j not in self.jobs:
                self.jobs.append(j)
            i = header.get("i")
            if isinstance(i, int):
                self.starts.append(i)
                if frames[2] == P.TASK:
                    self.tasks.append((j, i, header.get("n", 1)))
                    self.unanswered.append((time.monotonic(), j, i, header.get("n", 1)))
                    self.task_count += 1


# bytes that are no pickle opcode: junk made of them fails to unpickle at its first byte, wherever it is cut, so the
# executors that receive a fuzzed job fail fast instead of interpreting random opcodes
NOT_PICKLE = bytes(sorted(set(range(256)) - {ord(o.code) for o in pickletools.opcodes}))
junk_bytes = st.binary(max_size=16).map(lambda b: bytes(NOT_PICKLE[x % len(NOT_PICKLE)] for x in b))


def _nested(depth, make):
    value = None
    for _ in range(depth):
        value = make(value)
    return value


# Wrong values of every kind, each one draw away (hypothesis draws are what this test spends its time on): wrong
# types, the edges of each range and just past them, NaN and infinities, lengths one past each limit, huge strings
# (still under FRAME_MAX), deep nesting, maps with keys that are no strings, msgpack extension types.
BAD_VALUES = [
    None, True, False, 0, 1, -1, 2, 3, 7, 8, 1024, 1025, 65536, 65537, 100_001, 2 ** 31, 2 ** 31 + 1, -2 ** 31 - 1,
    2 ** 53, 2 ** 53 + 1, 2 ** 63 - 1, -2 ** 63, 2 ** 64 - 1, -257,
    math.nan, -math.nan, math.inf, -math.inf, -0.0, 0.0, 0.5, -1.5, 1e300, -1e300, 5e-324, 1e6 + 1, 1e9 + 1, 1e15 + 1,
    "", "x", "12345678", "w", "w/0", "fs/0", "step", "A100:99999", "0123456789abcdef\n", "\0", "\u00e9" * 129,
    "x" * 129, "x" * 257, "x" * 1025, "x" * 4097, "x" * 65537, "x" * (1 << 17), "\u00e9" * 100_000, "x" * 200_000,
    b"", b"\0" * 7, b"\0" * 9, b"\0" * 15, b"\0" * 16, b"\0" * 17, b"\0" * 39, b"\0" * 41, b"\xff" * 8, b"\0" * 200_000,
    [], [None], [[]], [1, 2], [-1], [8], [1.5], ["a"], list(range(1025)), [0] * 65537, [7] * 3, [True],
    {}, {"j": 1}, {"": None}, {"a": {"b": {"c": []}}}, {1: 2}, {b"j": b"12345678"}, {None: 1}, {"j": b"\0" * 8},
    {"j": b"\0" * 8, "s": "w/0"}, {"j": b"\0" * 8, "i": 0, "o": -2}, {"r": -1}, {"t": 0}, {"t": math.nan},
    {"c": 2}, {"k": "0123456789abcdef", "img": 5}, {"k": "0123456789abcdef", "zz": 1},
    {"i": 0, "type": "x", "msg": "y", "zz": 1}, {"i": -1, "type": "x", "msg": "y"}, {"i": 0, "type": 1, "msg": "y"},
    [{"i": 0, "type": "x"}], [[1, 1, "x"]] * 2, [[1, 3, "x"]], [[1.5, 1, "x"]], [["1", 1, "x"]], [[1, 1]],
    [[1, 1, "x" * ((64 << 10) + 1)]], [[True, 1, "x"]],
    _nested(100, lambda v: [v]), _nested(100, lambda v: {"j": v}), _nested(20, lambda v: {"a": v, "b": [v]}),
    msgpack.ExtType(1, b"x"), msgpack.ExtType(127, b""), msgpack.ExtType(5, b"\0" * 100),
    msgpack.Timestamp(0, 0), msgpack.Timestamp(2 ** 33, 999_999_999),
]
junk = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(-2 ** 63, 2 ** 64 - 1), st.floats(), st.text(max_size=8),
              st.binary(max_size=8)),
    lambda inner: st.one_of(st.lists(inner, max_size=3),
                            st.dictionaries(st.one_of(st.text(max_size=3), st.integers(-3, 3)), inner, max_size=3)),
    max_leaves=4)
bad = st.one_of(*[st.sampled_from(BAD_VALUES)] * 4, st.integers(-2 ** 63, 2 ** 64 - 1),
                st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=8), st.binary(max_size=12), junk)

JOB_REFS = [Ref("jobs", k) for k in range(16)]
job_id = st.one_of(st.sampled_from(JOB_REFS), st.binary(min_size=8, max_size=8))
start = st.one_of(st.sampled_from([Ref("starts", k) for k in range(16)]), st.integers(0, 100),
                  st.sampled_from([2 ** 53, 2 ** 32]))
worker_ids = ["w", "fz", "fs", "ghost", "a" * 128]
worker_id = st.one_of(st.sampled_from(worker_ids), st.text("abcxyz019._:@+-/", min_size=1, max_size=12))
slot_name = st.one_of(st.sampled_from([f"{w}/{k}" for w in worker_ids for k in range(3)]), st.text(max_size=12))
env_key = st.sampled_from(["0123456789abcdef", "0123456789abcdef-0123456789ab", "img-0123456789abcdef",
                           "0123456789ABCDEF", "../../etc", ""])
flags = st.lists(st.integers(0, 7), max_size=4)
error_record = st.fixed_dictionaries({"i": start, "type": st.sampled_from(["ValueError", "burla.WorkerDiedError"]),
                                      "msg": st.text(max_size=8)},
                                     optional={"tb": st.text(max_size=8), "all": st.integers(0, 1)})
log_line = st.tuples(st.integers(-5, 10 ** 6), st.sampled_from([1, 2, 0, 3]), st.text(max_size=12)).map(list)
FUNCTION_BYTES, FUNCTION_DIGEST = serialize.dumps_function(abs)
CLIENT_IDS = [b"fuzz-client-1", b"fuzz-client-2", b""]

GOOD = {  # command -> field -> plausible values (most pass P.check)
    P.SUBMIT: {"j": st.one_of(st.binary(min_size=8, max_size=8), job_id), "c": st.sampled_from(CLIENT_IDS),
               "d": st.sampled_from([FUNCTION_DIGEST, b"d" * 16]), "fn": st.integers(1, 3),
               "n": st.one_of(st.none(), st.integers(0, 99)), "cpu": st.floats(0.01, 3), "ram": st.floats(0, 4),
               "gpu": st.sampled_from([None, 0, 1, "A100", "x:2"]), "par": st.one_of(st.none(), st.integers(1, 3)),
               "o": st.one_of(st.none(), st.fixed_dictionaries({}, optional={
                   "r": st.integers(0, 2), "t": st.floats(0.5, 5), "c": st.integers(0, 1)})),
               "pa": st.fixed_dictionaries({"j": job_id, "s": slot_name}),
               # (an env that passes would make the worker build an environment: minutes, not a fuzz case)
               "env": st.one_of(st.none(), st.just({"k": "not-a-key"})),
               "py": st.sampled_from([E.python(), "cpython-399"])},
    P.BATCH: {"j": job_id, "i": start, "n": st.integers(1, 3), "z": flags},
    P.END: {"j": job_id},
    P.CANCEL: {"j": job_id},
    P.HEARTBEAT: {"c": st.sampled_from(CLIENT_IDS), "w": worker_id, "j": job_id},
    P.REGISTER: {"w": worker_id, "host": st.text(max_size=8), "pid": st.one_of(st.none(), st.integers(0, 2 ** 31)),
                 "slots": st.integers(1, 100_000), "cpu": st.floats(0, 1e6), "ram": st.floats(0, 1e9),
                 "gpu": st.lists(st.sampled_from(["A100", "T4", ""]), max_size=3),
                 "env": st.one_of(st.none(), env_key), "ctr": st.sampled_from([None, "?", "podman"]),
                 "py": st.sampled_from([E.python(), "cpython-399"])},
    P.SLOT_KEY: {"w": worker_id, "s": slot_name, "p": st.binary(min_size=40, max_size=40), "new": st.integers(0, 1)},
    P.SLOT_DIED: {"w": worker_id, "s": slot_name, "code": st.one_of(st.none(), st.integers(-256, 1 << 16)),
                  "at": st.fixed_dictionaries({"j": job_id, "i": start, "o": st.integers(-1, 4)}),
                  "timeout": st.integers(0, 1)},
    P.ENV: {"w": worker_id, "k": env_key, "st": st.sampled_from(["step", "ready", "failed"]),
            "m": st.text(max_size=12), "t": st.floats(0, 1e9)},
    P.READY: {"w": st.sampled_from(["fs", "w", "fz"]), "s": st.sampled_from(["fs/0", "fs/1", "w/0"]),
              "k": st.integers(1, P.PREFETCH), "pid": st.one_of(st.none(), st.integers(0, 2 ** 31)),
              "env": st.one_of(st.none(), env_key)},
    P.RESULT: {"j": job_id, "i": start, "o": st.integers(0, 4), "k": st.integers(0, 4),
               "e": st.lists(error_record, max_size=2), "f": st.integers(0, 1), "t": st.floats(0, 10),
               "w": slot_name, "z": flags, "all": st.integers(0, 1)},
    P.LOG: {"j": job_id, "w": slot_name, "l": st.lists(log_line, max_size=3), "x": st.integers(0, 10)},
}
ALL_COMMANDS = sorted(set(P.NAMES) | {P.VERSION_NOTICE, b"", b"SS", b"\xff"})
ROLE_COMMANDS = {"client": sorted(P.CLIENT_COMMANDS), "worker": sorted(P.WORKER_COMMANDS),
                 "slot": sorted(P.SLOT_COMMANDS)}
SCHEMA_COMMANDS = sorted(P.SCHEMAS)
BAD_HEADERS = [b"", b"\xc1", b"\x91" * 5000, b"\xdf\xff\xff\xff\xff", b"\xdd\xff\xff\xff\xff",
               b"\xc6\x7f\xff\xff\xff", b"\x81\xa1j", msgpack.packb(["j", b"12345678"]), msgpack.packb(1),
               msgpack.packb(None), msgpack.packb({1: 1}), msgpack.packb({"j": 1}) + b"trailing",
               b"\x81\xa1j\xc7\x03\xff\0\0\0"]  # (a timestamp of a length none has)
BAD_VERSIONS = [b"B1", b"B3", b"B9999", b"B10000", b"", b"B", b"b2", P.VERSION + b"\0", P.VERSION_NOTICE]


def good(command, key):
    return GOOD.get(command, {}).get(key, junk)


def fields(build):
    return {command: st.fixed_dictionaries({k: build(command, k) for k in required},
                                           optional={k: build(command, k) for k in fields if k not in required})
            for command, (fields, required) in P.SCHEMAS.items()}


GOOD_HEADERS = fields(good)  # every field plausible
ANY_HEADERS = fields(lambda command, key: st.one_of(good(command, key), bad))  # any field may be wrong
KEYS = {command: st.sampled_from(sorted(fields)) for command, (fields, _) in P.SCHEMAS.items() if fields}
# (hypothesis favours the first choices: a header with no fault first, so that many reach their handler)
MUTATIONS = st.sampled_from(["none", "bad field", "none", "bad field", "none", "two bad fields", "missing",
                             "extra", "anything"])


@st.composite
def header(draw, command):
    """A header for command: valid, or with one or two fields of the wrong type or out of range, a field missing,
    keys it does not have, or anything in any field."""
    mutation = draw(MUTATIONS)
    base = draw((ANY_HEADERS if mutation == "anything" else GOOD_HEADERS).get(command, st.just({})))
    if mutation in ("bad field", "two bad fields") and command in KEYS:
        for _ in range(1 if mutation == "bad field" else 2):
            base[draw(KEYS[command])] = draw(bad)
    elif mutation == "missing" and base:
        keys = sorted(base)
        del base[keys[draw(st.integers(0, len(keys) - 1))]]
    elif mutation == "extra":  # extra keys, nested junk
        base[draw(st.sampled_from(["all", "f", "zz", "", "J", "jj"]))] = draw(bad)
    if command == P.RESULT and draw(st.booleans()):  # the job and batch of a TASK a slot of ours holds
        k = draw(st.integers(0, 63))
        base.update(j=Ref("tasks", k, 0), i=Ref("tasks", k, 1))
    return base


BATCHES = [serialize.pack_items(items) for items in ([1], [-1, 2], [3, "x"], [None] * 3)]
BATCHES = [(flags_, [bytes(f) for f in frames]) for flags_, frames in BATCHES]


@st.composite
def payload(draw, command, head):
    if command not in (P.SUBMIT, P.BATCH, P.RESULT):
        return draw(st.lists(junk_bytes, max_size=2))
    kind = draw(st.sampled_from([2, 1, 0, 3]))
    if command == P.SUBMIT and kind:
        return [FUNCTION_BYTES] * kind  # a real function (abs), in 1 to 3 frames (fn says how many it is in)
    if kind:
        flags_, frames = draw(st.sampled_from(BATCHES))
        if kind > 1:
            head["z"] = flags_  # frames that match their flags
        return frames
    frames = draw(st.lists(junk_bytes, max_size=4))
    if isinstance(head.get("z"), list) and len(head["z"]) <= 8 and frames:
        frames = (frames + [b""] * len(head["z"]))[:len(head["z"])]  # as many frames as flags
    return frames


# mostly what the role may send, often what another role may, sometimes any command or random bytes (one_of
# favours its first branches: a sampled list, whose weights hold)
COMMANDS = {role: st.sampled_from(ROLE_COMMANDS[role] * 12 + SCHEMA_COMMANDS * 2 + ALL_COMMANDS + [None] * 3)
            for role in ROLE_COMMANDS}
SHAPES = st.sampled_from(["ok"] * 14 + ["version", "raw header", "cut", "no delimiter", "extra"])


@st.composite
def message(draw, role):
    """One message: the pieces of a list of frames (Refs inside, resolved when sent)."""
    command = draw(COMMANDS[role])
    if command is None:
        command = draw(st.binary(min_size=1, max_size=3))
    msg = {"command": command, "header": draw(header(command)), "version": P.VERSION, "raw_header": None,
           "shape": draw(SHAPES)}
    msg["payload"] = draw(payload(command, msg["header"]))
    if msg["shape"] == "version":  # another protocol version
        msg["version"] = draw(st.one_of(st.sampled_from(BAD_VERSIONS), st.binary(max_size=6)))
    elif msg["shape"] == "raw header":  # a header that is no msgpack map
        msg["raw_header"] = draw(st.one_of(st.sampled_from(BAD_HEADERS), st.binary(max_size=20)))
    elif msg["shape"] == "cut":  # too few frames
        msg["cut"] = draw(st.integers(0, 4))
    elif msg["shape"] == "extra":  # frames in front of the delimiter
        msg["extra"] = draw(st.lists(junk_bytes, min_size=1, max_size=2))
    return msg


def frames_of(msg, pools):
    """The frames to send, or None if one would be over FRAME_MAX (that drops the connection: flood (c) in
    test_floods.py)."""
    head = msg["raw_header"]
    if head is None:
        try:
            head = msgpack.packb(pools.resolve(msg["header"]))
        except (OverflowError, ValueError, TypeError):
            head = msgpack.packb(repr(msg["header"])[:100])
    frames = [b"", msg["version"], msg["command"], head, *msg["payload"]]
    shape = msg["shape"]
    if shape == "cut":
        frames = frames[:msg["cut"]]
    elif shape == "no delimiter":
        frames = frames[1:]
    elif shape == "extra":
        frames = [*msg["extra"], *frames]
    if not frames or any(len(f) > P.FRAME_MAX for f in frames):
        return None
    return frames


def messages(role):
    return st.lists(message(role), min_size=PER_EXAMPLE[0], max_size=PER_EXAMPLE[1])


# ------------------------------------------------------------------------------------------------ sending
def drain(sock, pools):
    while True:
        try:
            pools.harvest(sock.recv_multipart(zmq.NOBLOCK))
        except zmq.Again:
            return


class Flood:
    """Sends generated messages on one socket, counting them."""

    def __init__(self, cluster, sock, pools, service=None):
        self.cluster, self.sock, self.pools, self.service = cluster, sock, pools, service
        self.sent = 0
        self.recent = collections.deque(maxlen=40)

    def send(self, batch):
        for msg in batch:
            frames = frames_of(msg, self.pools)
            if frames is None:
                continue
            try:
                self.sock.send_multipart(frames, flags=zmq.NOBLOCK)
            except zmq.Again:
                continue
            self.sent += 1
            self.recent.append(frames)
        drain(self.sock, self.pools)
        if self.service is not None:
            self.service()
        assert self.cluster.broker.poll() is None, \
            "the broker died; the last messages:\n" + "\n".join(repr([f[:80] for f in m]) for m in self.recent)

    def run(self, role):
        examples = [0]

        def flood(batch):
            examples[0] += 1
            self.send(batch)

        began = time.monotonic()
        while self.sent < TARGET and time.monotonic() < began + 60:
            n = examples_for(TARGET - self.sent, self.sent, examples[0])
            settings(SETTINGS, max_examples=n)(given(messages(role))(flood))()
        self.seconds = time.monotonic() - began
        return self.sent


def slot_key(worker_id, name, public):
    """The SLOT_KEY a worker sends for a new executor's key."""
    header = {"w": worker_id, "s": name, "p": public}
    if "new" in P.SCHEMAS[P.SLOT_KEY][0]:
        header["new"] = 1  # (a fresh executor, which may serve anyone)
    return header


def dealer(c, credential, kind):
    sock = P.socket(zmq.Context.instance(), zmq.DEALER, credential=credential, role=kind)
    sock.connect(c.address)
    return sock


SLEEP_BYTES, SLEEP_DIGEST = serialize.dumps_function(time.sleep)


def submit_real_job(sock, pools, client_id, n_batches):
    """A real job, fed by hand, of calls that take a while (time.sleep(0.02)), so that batches wait in its queue
    for a slot: its id and batch starts join the pools."""
    job = os.urandom(8)
    P.send(sock, P.SUBMIT, {"j": job, "c": client_id, "d": SLEEP_DIGEST, "fn": 1, "n": 2 * n_batches, "cpu": 0.1,
                            "ram": 0, "gpu": None, "par": None, "o": {"c": 1}}, [SLEEP_BYTES])
    for k in range(n_batches):
        z, frames = serialize.pack_items([0.02, 0.02])
        P.send(sock, P.BATCH, {"j": job, "i": 2 * k, "n": 2, "z": z}, frames)
        pools.starts.append(2 * k)
    pools.jobs.append(job)
    return job


# ------------------------------------------------------------------------------------------------ the tests
@pytest.mark.timeout(150, method="thread")  # (a signal can land in hypothesis' gc hook, which swallows it)
def test_fuzzed_client_messages(cluster):
    since = cluster.log_size()
    pools = Pools()
    sock = dealer(cluster, cluster.api_key, security.CLIENT)
    try:
        beat = [0.0]

        def service():  # keep a few jobs alive (their client id heartbeats) so batches and ENDs hit real jobs
            if time.monotonic() > beat[0]:
                P.send(sock, P.HEARTBEAT, {"c": b"fuzz-client-1"})
                beat[0] = time.monotonic() + 0.3
                if len(pools.jobs) < 8:
                    submit_real_job(sock, pools, b"fuzz-client-1", 2)

        flood = Flood(cluster, sock, pools, service)
        sent = flood.run("client")
    finally:
        sock.close(0)
    print(f"client flood: {sent} messages in {flood.seconds:.1f} s")
    check_after_flood(cluster, sent, "client", since)


@pytest.mark.timeout(150, method="thread")  # (a signal can land in hypothesis' gc hook, which swallows it)
def test_fuzzed_worker_messages(cluster):
    since = cluster.log_size()
    pools = Pools()
    sock = dealer(cluster, cluster.token, security.WORKER)
    try:
        P.send(sock, P.REGISTER, {"w": "fz", "host": "fuzz", "slots": 1, "cpu": 2, "ram": 4})
        assert sock.poll(5000), "the broker did not answer a REGISTER"
        flood = Flood(cluster, sock, pools)
        sent = flood.run("worker")
    finally:
        sock.close(0)
    print(f"worker flood: {sent} messages in {flood.seconds:.1f} s")
    check_after_flood(cluster, sent, "worker", since)


@pytest.mark.timeout(150, method="thread")  # (a signal can land in hypothesis' gc hook, which swallows it)
def test_fuzzed_executor_messages(cluster):
    """As the executor of a slot "fs/0" of a worker "fs" we register: with a real job running on the cluster, so
    RESULTs and LOGs name batches this slot really holds."""
    since = cluster.log_size()
    pools = Pools()
    worker = dealer(cluster, cluster.token, security.WORKER)
    driver = dealer(cluster, cluster.api_key, security.CLIENT)
    slot = None
    try:
        P.send(worker, P.REGISTER, {"w": "fs", "host": "fuzz", "slots": 1, "cpu": 2, "ram": 4})
        assert worker.poll(5000)
        credential, public = security.slot_credential(cluster.token)
        P.send(worker, P.SLOT_KEY, slot_key("fs", "fs/0", public))
        time.sleep(0.3)
        slot = dealer(cluster, credential, security.SLOT)
        P.send(slot, P.READY, {"w": "fs", "s": "fs/0", "k": P.PREFETCH, "pid": 1})
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:  # the slot's key was admitted, and its READY taken
            P.send(worker, P.HEARTBEAT, {"w": "fs"})
            drain(worker, pools)
            try:
                workers = cluster_state(cluster.address, 1, cluster.api_key)["workers"]
            except TimeoutError:
                continue
            if ("fs", 1) in [(w["id"], w["slots"]) for w in workers]:
                break
            time.sleep(0.1)
        else:
            raise AssertionError("the slot key was not admitted")
        beat = [0.0]
        real = []

        def service():
            drain(driver, pools)
            drain(worker, pools)
            # a half-honest executor: a batch the flood has not answered within 0.2 s gets its results, so the
            # slot has credit again and keeps being handed real batches to send fuzzed RESULTs and LOGs about
            while pools.unanswered and pools.unanswered[0][0] < time.monotonic() - 0.2:
                _, job, first, n = pools.unanswered.popleft()
                z, frames = serialize.pack_items([None] * n)
                P.send(slot, P.RESULT, {"j": job, "i": first, "o": 0, "k": n, "e": [], "f": 1, "t": 0.02,
                                        "w": "fs/0", "z": z}, frames)
            if time.monotonic() > beat[0]:
                P.send(worker, P.HEARTBEAT, {"w": "fs"})
                P.send(driver, P.HEARTBEAT, {"c": b"fuzz-driver"})
                beat[0] = time.monotonic() + 0.3
                if not real or real[-1][1] < time.monotonic():
                    real.append((submit_real_job(driver, pools, b"fuzz-driver", 8), time.monotonic() + 0.25))

        flood = Flood(cluster, slot, pools, service)
        sent = flood.run("slot")
        tasks = pools.task_count
        for job, _ in real:
            P.send(driver, P.CANCEL, {"j": job})
        time.sleep(0.2)
    finally:
        for sock in (slot, worker, driver):
            if sock is not None:
                sock.close(0)
    print(f"executor flood: {sent} messages in {flood.seconds:.1f} s, {tasks} tasks received")
    assert tasks > 0, "the fuzzed slot never held a batch"
    check_after_flood(cluster, sent, "slot", since)


GREETING_SIGNATURE = b"\xff" + bytes(8) + b"\x7f"


def greeting(major=3, minor=0, mechanism=b"CURVE", as_server=0, filler=bytes(31), signature=GREETING_SIGNATURE):
    return signature + bytes([major, minor]) + mechanism.ljust(20, b"\0")[:20] + bytes([as_server]) + filler


def frame(flag, body, size=None):
    size = len(body) if size is None else size
    if flag & 0x02:
        return bytes([flag]) + struct.pack(">Q", size) + body
    return bytes([flag, min(size, 255)]) + body


raw_greeting = st.one_of(
    st.builds(greeting, st.integers(0, 255), st.integers(0, 255),
              st.sampled_from([b"CURVE", b"NULL", b"PLAIN", b"GSSAPI", b"curve", b""]) | st.binary(max_size=20),
              st.integers(0, 255), st.binary(min_size=31, max_size=31)),
    st.just(greeting()), st.just(greeting(mechanism=b"NULL")),
    st.builds(lambda g, k: g[:k], st.just(greeting()), st.integers(0, 63)),  # cut short
    st.binary(max_size=64), st.just(b"\xff" + bytes(8) + b"\x01"),  # ZMTP 1.0-ish
)
raw_chunk = st.one_of(
    st.builds(frame, st.sampled_from([0x00, 0x01, 0x02, 0x03, 0x04, 0x06, 0x07, 0xff]), st.binary(max_size=64)),
    st.builds(frame, st.sampled_from([0x02, 0x06]), st.binary(max_size=16),
              st.sampled_from([2 ** 31, 2 ** 63 - 1, 2 ** 64 - 1, P.FRAME_MAX + 1, 0])),
    st.builds(lambda name, body: frame(0x04, bytes([len(name)]) + name + body),
              st.sampled_from([b"HELLO", b"INITIATE", b"READY", b"ERROR", b"MESSAGE", b"PING"]),
              st.one_of(st.binary(max_size=64), st.binary(min_size=194, max_size=260))),
    st.binary(min_size=1, max_size=128),
)
raw_connection = st.tuples(raw_greeting, st.lists(raw_chunk, min_size=1, max_size=10), st.booleans())


@pytest.mark.timeout(150, method="thread")  # (a signal can land in hypothesis' gc hook, which swallows it)
def test_fuzzed_raw_tcp_peers(cluster):
    """Peers without credentials: random bytes, ZMTP greetings (right, wrong, cut short), then junk frames and
    handshake commands. None may change anything; their connections must not pile up in the broker."""
    since = cluster.log_size()
    host, port = cluster.address[len("tcp://"):].rsplit(":", 1)
    fds_before = cluster.broker_process.num_fds()
    sent = [0, 0, 0]  # chunks (greetings counted) written, connections, examples

    def flood(connections):
        sent[2] += 1
        for hello, chunks, reset in connections:
            try:
                conn = socket.create_connection((host, int(port)), timeout=1)
            except OSError:
                continue
            sent[1] += 1
            try:
                conn.settimeout(0.2)
                for chunk in [hello, *chunks]:
                    if chunk:
                        conn.sendall(chunk)
                        sent[0] += 1
            except OSError:  # the broker hung up on us: expected
                pass
            finally:
                if reset:
                    conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                conn.close()
        assert cluster.broker.poll() is None, f"the broker died after {connections!r}"

    deadline = time.monotonic() + 60
    while sent[0] < TARGET and time.monotonic() < deadline:
        n = examples_for(TARGET - sent[0], sent[0], sent[2])
        settings(SETTINGS, max_examples=n)(given(st.lists(raw_connection, min_size=3, max_size=6))(flood))()
    print(f"raw TCP flood: {sent[0]} chunks over {sent[1]} connections")
    check_after_flood(cluster, sent[0], "raw TCP peer", since)
    deadline = time.monotonic() + 10
    while cluster.broker_process.num_fds() > fds_before + 5 and time.monotonic() < deadline:
        time.sleep(0.2)
    assert cluster.broker_process.num_fds() <= fds_before + 5, "the broker holds on to dropped connections"


@pytest.mark.timeout(60, method="thread")
def test_a_vanished_clients_job_lasts_its_lease(cluster):
    """What a client flood once left behind, from three messages: a job that said it had 4 inputs (SUBMIT's n,
    which only SEAL makes its total) and was sent 5, the last at 2**53, without a lease (600 s), whose client went
    away. Its accounting holds (5 inputs in, 5 outcomes), and it waits out its lease: the floods' settle has to
    cancel such jobs. The same job with a lease of 1 s is cancelled by the broker once its client is gone."""
    sock = dealer(cluster, cluster.api_key, security.CLIENT)
    jobs = {}
    try:
        for lease in (None, 1):
            job = os.urandom(8)
            header = {"j": job, "c": b"lease-test", "d": FUNCTION_DIGEST, "fn": 1, "n": 4}
            if lease is not None:
                header["ls"] = lease
            P.send(sock, P.SUBMIT, header, [FUNCTION_BYTES])
            for first, n in ((0, 2), (2, 2), (2 ** 53, 1)):
                z, frames = serialize.pack_items(list(range(first, first + n)))
                P.send(sock, P.BATCH, {"j": job, "i": first, "n": n, "z": z}, frames)
            jobs[lease] = job.hex()
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:  # both run all five inputs, their client still there
            P.send(sock, P.HEARTBEAT, {"c": b"lease-test"})
            records = {j["id"]: j for j in cluster_state(cluster.address, 2, cluster.api_key)["jobs"]}
            if all(records.get(j, {}).get("done") == 5 for j in jobs.values()):
                break
            time.sleep(0.1)
    finally:
        sock.close(0)  # the client goes, without END, SEAL or another heartbeat
    for job in jobs.values():
        assert job in records, records
        record = records[job]
        assert (record["state"], record["done"], record["submitted"], record["total"], record["failed"]) == \
            ("running", 5, 2 ** 53 + 1, 4, 0), record
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        state = cluster_state(cluster.address, 2, cluster.api_key)
        if jobs[1] not in {j["id"] for j in state["jobs"]}:
            break
        time.sleep(0.2)
    ended = {r["id"]: r for r in state["recent"]}
    assert jobs[1] in ended and ended[jobs[1]]["state"] == "cancelled" and "lease" in ended[jobs[1]]["reason"], \
        state
    left = {j["id"]: j for j in state["jobs"]}
    assert jobs[None] in left and left[jobs[None]]["attached"] == 0, state  # away, for its 600 s
    settle(cluster)
    assert jobs[None] in {r["id"] for r in cluster_state(cluster.address, 2, cluster.api_key)["recent"]}
