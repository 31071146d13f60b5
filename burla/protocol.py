"""The wire protocol between client, broker and worker: every command and its header, in one place.

On a DEALER socket a message is  [b"", VERSION, command, header, *payload]; the broker's ROUTER sees the
sender's identity in front. The header is a small msgpack dict with short keys; payload frames are opaque to the
broker and forwarded zero-copy. Inputs travel in batches of consecutive input indices, so a batch is named by the
index of its first input ("i") and its length ("n").
"""

import hashlib
import itertools
import math
import os
import re
import struct

import msgpack
import zmq

VERSION = b"B5"  # bumped whenever the wire changes: a peer of another version is told at once (VERSION_NOTICE)
# Sent back to a peer whose message carries another protocol version: [b"", VERSION_NOTICE, {v, burla}], a form
# every version after B1 understands, so a client or worker can say which versions meet and what to install.
VERSION_NOTICE = b"burla-version"

# client -> broker
SUBMIT = b"S"  # {j: job id, c: client id, d: function_digest(its frames), fn: frames of the function, n: inputs,
#                cpu, ram, gpu, par, o: options, pa?: {j, s}: the job and slot of the call that submits it (nested),
#                env?: {k: key, lock, py: interpreter} or {k: "img-...", img: container image, df?: Dockerfile}
#                (see burla.env; absent: each worker's own environment)
#                dt?: 1 = detached (the inputs are spooled on the head's disk and the job needs no client),
#                ls?: the job's lease, seconds its client may be away before the job is cancelled,
#                re?: 1 = the same job again, to a broker that lost it (restarted), rs: outcomes the client has,
#                sl?: the slots the client was told (its window of batches in flight, which it resends),
#                nm?: what dashboards call the job (its function's name, and the notebook cell that started it)
#                py?: the client's interpreter, sys.implementation.cache_tag ("cpython-311"): only workers of the
#                same run it (its pickled function may not load on another); absent: any worker
#                payload: [function frames, then the local packages zip's frames (when the env key has an archive)]
# options: {r: retries per call, t: timeout per call in seconds, c: 1 = a failed call does not stop the job,
#           k: 1 = its calls may be cancelled one by one (burla.Executor), g: 1 = grow the cluster for this job now
#           (an autoscaler boots VMs for it at once, not only once its work has waited; see burla.autoscale)}
BATCH = b"B"  # {j, i, n, z: frame flags (see burla.serialize)}  payload: pickled inputs
SEAL = b"N"  # {j, n}: the client has sent all n inputs (a detached job, or an attached one, is complete once every
#              one has an outcome)
ACK = b"a"  # {j, q}: the client holds every entry of the job's outbox up to q; the broker may let them go
ATTACH = b"G"  # {j, c: client id, q: the last entry the client holds (0: none), sl?, p?: 1 = only read (do not
#                become the job's client), lg?: 1 = only log lines}: the broker sends the entries after q, then
#                ATTACHED. How a client picks its job up again: after an outage, a broker restart, or from another
#                process (burla.attach)
JOBS = b"J"  # {j?: one job} -> JOBS {jobs: [job records, see broker.scheduler.Scheduler.record]}
END = b"E"  # client -> broker {j}: the client has every outcome; the broker forgets the job (a detached one is kept
#             until its retention ends). broker -> client, the last entry of a detached job's outbox:
#             {j, q, st: "done" | "failed" | "cancelled", e?: why}
CANCEL = b"C"  # {j, i?: [input indices]}: the job, or only the calls on these inputs (a job with option k: a
#               queued one is skipped, a running one interrupted; each still has an outcome, which its client drops)
STATUS = b"?"  # {} -> STATUS {workers: [the busiest 1,000], jobs: [...], recent: [...], nworkers, nslots, nbusy,
#               msgs: [messages the broker received, sent] since it started}
WATCH = b"O"  # {}: push STATE every WATCH_INTERVAL, and a copy of the LOG lines of the watcher's jobs, for the
#               next WATCH_EXPIRY seconds (a dashboard renews it every second)
STATE = b"U"  # broker -> watcher: what STATUS answers (with demand: every job's unmet work, for an autoscaler)
CAPACITY = b"M"  # {b: VMs booting, n: worker VMs, mx: the most there may be}: the cluster's autoscaler says what
#                  it is doing (only a cluster's admin, its first API key, may); STATE shows it as "scaling", and
#                  the clients of jobs that asked to grow are told (NOTE) while they wait for VMs
# broker -> client
ACCEPTED = b"A"  # {j, s: slots that fit the job}
REJECTED = b"X"  # {j, e: message, t?: "env" when the job's environment could not be built, "cancelled" when
#                  another connection of the same user cancelled it (a dashboard), "nested" when a nested job can
#                  never get a slot, "credit" when the client sent past its window}
ATTACHED = b"g"  # {j, st: state, n: inputs (when known), sealed, dt, done, failed, sent, have: [starts of the
#                  batches the broker holds: the client resends its others], s: slots, o: options, started}
NOTE = b"n"  # {j, m: text}: news about the job's wait for the progress line ("waiting for 12 VMs"); m "" clears it
SPOOLED = b"s"  # {j, n: inputs of a detached job safely on the head's disk, sealed?: 1 once all are}
RESULT = b"R"  # {j, i: batch, o: offset of the first result, k: results, e: [errors], f: 1 on a batch's last,
#                 t: seconds computing, w: slot, z}  payload: results, then one pickled exception per error
#                 To a client the broker adds q: the entry's number in the job's outbox, n: the batch's inputs
LOG = b"L"  # {j, w: slot, l: [[input index, stream (1 stdout, 2 stderr), text], ...], x?: lines dropped before these}
#             (q to a client)
# worker (the supervisor of a host's executors) -> broker
REGISTER = b"W"  # {w: worker id, host, slots, cpu, ram, gpu: [gpu names], pid, env: its own environment's key,
#                  ctr: container runtime it can run images with, None, or "?" while it finds out,
#                  py?: its interpreter, sys.implementation.cache_tag (absent, from an older worker: takes any job)}
SLOT_KEY = b"Q"  # {w, s: slot name, p: CURVE public key (z85), new: 1 for a new executor's key (0: announced
#                  again, to a broker that restarted)}: the key the slot's executor connects with; it replaces the
#                  slot's previous key. Executors never hold the worker token.
ENV = b"V"  # {w, k: env key, st: "step" | "ready" | "failed", m: what is happening, t: seconds since it began}
#             the broker passes it on to the clients of the jobs with that environment, adding j
SLOT_DIED = b"D"  # {w, s: slot name, code: exit code or -signal, at?: {j, i, o}: the input its call was running,
#                    timeout?: 1 when the worker killed it for running past the call's deadline}
# broker -> worker
KILL = b"K"  # {s: slot name, j: job, hard: 0 = interrupt that job's running call (SIGUSR1), 1 = kill the executor,
#              i?: [input indices]: interrupt the call only if it is on one of these (and skip them if still to run)}
PREPARE = b"P"  # {s: [slot names], e: the job's env header, or {k: the worker's own key, own: 1}}
#                 payload: [local packages zip frames] if any. Find or build that environment, then restart those
#                 (idle) slots' executors in it; they say READY with its key. Also how a slot that changes owner
#                 gets a fresh executor: an executor never serves two API keys.
# executor (one slot) <-> broker
READY = b"Y"  # {w, s: slot name "worker id/index", k: batches it can hold, pid, env: key of its environment}
TASK = b"T"  # {j, i, n, d, z, f: frames of the function in front (first TASK of a job on a slot), o: options,
#               cc?: offsets of inputs whose calls were cancelled (option k): they fail without running,
#               x: isolate from this offset, sk: offsets to skip (inputs that already failed by crashing
#               executors), ak?: the owner's API key (for nested calls), with f,
#               gpu?: [indices into the worker's GPUs] the job's claim on this slot holds, sent only by a worker
#               with GPUs: the executor sets CUDA_VISIBLE_DEVICES to them ("" for none)}
#               payload: [function frames,] inputs
# broker -> anyone it does not know (it restarted, or declared the peer dead): register again
RECONNECT = b"Z"
# any direction; any message counts as a sign of life; the broker answers a client's with {jobs: the ids of that
# client's jobs it has}, on the client's heartbeat connection
HEARTBEAT = b"H"

NAMES = {v: k for k, v in dict(globals()).items() if isinstance(v, bytes) and len(v) == 1}

# What each authenticated role may send: a worker cannot submit jobs, a client cannot post results or logs, an
# executor ("slot:<its name>") speaks only for its own slot.
CLIENT_COMMANDS = {SUBMIT, BATCH, SEAL, ACK, ATTACH, JOBS, END, CANCEL, STATUS, WATCH, CAPACITY, HEARTBEAT}
WORKER_COMMANDS = {REGISTER, SLOT_KEY, SLOT_DIED, ENV, HEARTBEAT}
SLOT_COMMANDS = {READY, RESULT, LOG, HEARTBEAT}

HEARTBEAT_INTERVAL = float(os.environ.get("BURLA_HEARTBEAT_INTERVAL", "1.0"))
HEARTBEAT_LIVENESS = 3  # intervals of silence before a peer is dead
JOB_LEASE = 600.0  # seconds a job's client may be away (an outage, a closed lid) before its job is cancelled
WATCH_INTERVAL = 0.25  # seconds between STATE pushes to watchers
WATCH_EXPIRY = 10.0  # a watcher renews every second; a busy one (a Jupyter server under load) may be late

# Sizes both ends hold to.
FRAME_MAX = 256 << 10  # no frame is larger (ZMQ_MAXMSGSIZE on every socket): before authentication a peer can
#                        make the broker buffer at most this much; payloads travel as several frames
PREFETCH = 2  # batches a slot may hold: one running, one waiting, so a slot never idles on a round trip
FUNCTION_CACHE = 32  # functions a slot keeps, in LRU order: the broker knows which it need not send again
MAX_BATCH_ITEMS = 65536
MAX_BATCH_BYTES = 4 << 20  # a batch's inputs, and a RESULT's results, are about this size at most (unless one
#                            input or result alone is bigger)
MAX_OUTSTANDING_BYTES = 64 << 20  # a client's inputs not yet answered, unless a single batch is bigger
LOG_BYTES = 64 << 10  # text in one LOG message
ENV_KEY = re.compile(r"[0-9a-f]{16}(-[0-9a-f]{12})?|img-[0-9a-f]{16}")
NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:@+-]{0,127}")  # a worker id


def window(slots):
    """Batches a client may have without all their outcomes: enough to keep every slot's prefetch full."""
    return max(4, PREFETCH * slots + 2)


def function_digest(frames):
    """A function's name in the slots' caches (SUBMIT's d): BLAKE2b-128 of its pickle, whatever frames carry it.
    The broker checks it: a SUBMIT whose bytes are not its digest's would make slots run them for every later
    job of that digest (a fuzzed SUBMIT made a real job's calls all fail with 'Ran out of input')."""
    digest = hashlib.blake2b(digest_size=16)
    for frame in frames:
        digest.update(frame)
    return digest.digest()


def cache_function(functions, digest, value):
    """Both ends of a slot keep its functions alike (an OrderedDict, the newest last): the broker sends a function
    only when this says the slot lacks it, so the two must add, renew and drop in the same order."""
    functions[digest] = value
    functions.move_to_end(digest)  # (sent again, as after a READY: the newest)
    if len(functions) > FUNCTION_CACHE:
        functions.popitem(last=False)


def slot_name(worker_id, index):
    return f"{worker_id}/{index}"


def error_record(index, type_name, message, tb="", value=""):
    """How a failed call travels (in RESULT's e): the client rebuilds the exception from it, or from the pickled
    exception frame that comes with it. "all": 1 is added when one error stands for every input of the batch from
    the RESULT's offset on (the batch could not be loaded at all)."""
    return {"i": index, "type": type_name, "msg": message, "tb": tb, "input": value}


class ProtocolError(Exception):
    """A message that does not follow this protocol."""


class VersionMismatch(ProtocolError):
    """The peer speaks another version of this protocol."""


# ---------------------------------------------------------------------------------------------------- checking
# Every field of every message the broker receives is checked here, where it enters, before any handler runs: a
# handler can then trust types and ranges, and a malformed message changes nothing.

def _is_int(v):
    return isinstance(v, int) and not isinstance(v, bool)


def _is_num(v):
    return (isinstance(v, float) or _is_int(v)) and math.isfinite(v)


def integer(lo=0, hi=2 ** 53):
    return lambda v: _is_int(v) and lo <= v <= hi


def number(lo=0.0, hi=1e15, above=False):
    return lambda v: _is_num(v) and (v > lo if above else v >= lo) and v <= hi


def binary(size=None, most=64):
    return lambda v: isinstance(v, bytes) and (len(v) == size if size is not None else len(v) <= most)


def text(most=256, pattern=None):
    return lambda v: isinstance(v, str) and len(v) <= most and (pattern is None or pattern.fullmatch(v) is not None)


def optional(check):
    return lambda v: v is None or check(v)


def one_of(*values):
    return lambda v: type(v) in (int, str) and v in values


def list_of(check, most):
    return lambda v: isinstance(v, list) and len(v) <= most and all(map(check, v))


def record(fields, required=()):
    """A map with only these keys (each checked), the required ones present."""
    def check(v):
        return (isinstance(v, dict) and all(k in v for k in required) and
                all(k in fields and fields[k](x) for k, x in v.items()))
    return check


JOB_ID = binary(8)
CURVE_KEY = lambda v: isinstance(v, bytes) and re.fullmatch(rb"[0-9a-zA-Z.:+=^!/*?&<>()\[\]{}@%$#-]{40}", v) is not None
FLAG = one_of(0, 1)
FLAGS = list_of(integer(0, 7), 1 << 16)
INDEX = integer()
SLOT = text(140)
GPU = lambda v: v is None or (_is_int(v) and 0 <= v <= 1024) or \
    (isinstance(v, str) and re.fullmatch(r"[A-Za-z0-9._-]{0,64}(:[0-9]{1,4})?", v) is not None)
ERROR = record({"i": INDEX, "type": text(512), "msg": text(1 << 16), "tb": text(1 << 17), "input": text(4096),
                "all": FLAG}, ("i", "type", "msg"))
LINE = lambda v: isinstance(v, list) and len(v) == 3 and _is_int(v[0]) and v[1] in (1, 2) and \
    isinstance(v[2], str) and len(v[2]) <= LOG_BYTES

SCHEMAS = {  # command -> (fields, required)
    SUBMIT: ({"j": JOB_ID, "c": binary(most=16), "d": binary(16), "fn": integer(1, 1 << 16), "n": optional(INDEX),
              "cpu": number(0, 1e6, above=True), "ram": number(0, 1e9), "gpu": GPU,
              "par": optional(integer(1, 1 << 31)),
              "o": optional(record({"r": integer(0, 1000), "t": number(0, 1e9, above=True), "c": FLAG, "k": FLAG,
                                      "g": FLAG})),
              "pa": record({"j": JOB_ID, "s": SLOT}, ("j", "s")),
              "env": optional(record({"k": text(64, ENV_KEY), "lock": text(1 << 20), "py": text(256),
                                      "img": text(1024), "df": text(1 << 18)}, ("k",))),
              "dt": FLAG, "ls": number(1, 30 * 86400), "re": FLAG, "rs": INDEX, "sl": integer(0, 1 << 20),
              "nm": text(200), "py": text(32)},
             ("j", "d")),
    BATCH: ({"j": JOB_ID, "i": INDEX, "n": integer(1, MAX_BATCH_ITEMS), "z": FLAGS}, ("j", "i", "n", "z")),
    SEAL: ({"j": JOB_ID, "n": INDEX}, ("j", "n")),
    ACK: ({"j": JOB_ID, "q": INDEX}, ("j", "q")),
    ATTACH: ({"j": JOB_ID, "c": binary(most=16), "q": INDEX, "sl": integer(0, 1 << 20), "p": FLAG, "lg": FLAG},
             ("j", "q")),
    JOBS: ({"j": JOB_ID}, ()),
    END: ({"j": JOB_ID}, ("j",)),
    CANCEL: ({"j": JOB_ID, "i": list_of(INDEX, 1 << 16)}, ("j",)),
    STATUS: ({}, ()),
    WATCH: ({}, ()),
    CAPACITY: ({"b": integer(0, 1 << 20), "n": integer(0, 1 << 20), "mx": integer(0, 1 << 20)}, ("b", "n", "mx")),
    HEARTBEAT: ({"c": binary(most=16), "w": text(128), "j": JOB_ID}, ()),
    REGISTER: ({"w": text(128, NAME), "host": text(256), "pid": optional(integer(0, 1 << 31)),
                "slots": integer(1, 100_000), "cpu": number(0, 1e6), "ram": number(0, 1e9),
                "gpu": list_of(text(64), 1024), "env": optional(text(64, ENV_KEY)), "ctr": optional(text(16)),
                "py": text(32)},
               ("w", "slots")),
    SLOT_KEY: ({"w": text(128), "s": SLOT, "p": CURVE_KEY, "new": FLAG}, ("w", "s", "p")),
    READY: ({"w": text(128), "s": SLOT, "k": integer(1, PREFETCH), "pid": optional(integer(0, 1 << 31)),
             "env": optional(text(64, ENV_KEY))}, ("w", "s")),
    RESULT: ({"j": JOB_ID, "i": INDEX, "o": INDEX, "k": integer(0, MAX_BATCH_ITEMS), "e": list_of(ERROR, 1024),
              "f": FLAG, "t": number(0, 1e9), "w": SLOT, "z": FLAGS, "all": FLAG}, ("j", "i")),
    LOG: ({"j": JOB_ID, "w": SLOT, "l": list_of(LINE, 1 << 16), "x": INDEX}, ("j", "l")),
    SLOT_DIED: ({"w": text(128), "s": SLOT, "code": optional(integer(-256, 1 << 16)),
                 "at": record({"j": binary(8), "i": INDEX, "o": integer(-1)}, ("j", "i", "o")), "timeout": FLAG},
                ("w", "s")),
    ENV: ({"w": text(128), "k": text(64, ENV_KEY), "st": one_of("step", "ready", "failed"), "m": text(1 << 17),
           "t": number(0, 1e9)}, ("w", "k", "st")),
}


def check(command, header):
    """ProtocolError unless header is a valid header for command (see SCHEMAS)."""
    schema = SCHEMAS.get(command)
    if schema is None:
        raise ProtocolError(f"unknown command {command!r}")
    fields, required = schema
    for key in required:
        if key not in header:
            raise ProtocolError(f"{NAMES[command]} without {key!r}")
    for key, value in header.items():
        test = fields.get(key)
        if test is None or not test(value):
            raise ProtocolError(f"{NAMES[command]} with a bad {key!r}" if test else
                                f"{NAMES[command]} with an unknown field {key!r}")


# Frames go through pyzmq's Cython socket methods with plain int flags: its Python wrappers (send_multipart,
# recv_multipart) do enum arithmetic and a type scan per frame, which was a fifth of the broker's time per message.
_send_frame, _recv_frame, _get_option = zmq.backend.Socket.send, zmq.backend.Socket.recv, zmq.backend.Socket.get
_SNDMORE, _RCVMORE, _EVENTS, _POLLIN = int(zmq.SNDMORE), int(zmq.RCVMORE), int(zmq.EVENTS), int(zmq.POLLIN)
_COPY_BELOW = 1 << 16  # payload frames under this are copied (cheaper than a zero-copy Frame's bookkeeping)


def send(sock, command, header, payload=(), ident=None, flags=0):
    packed = msgpack.packb(header)
    if len(packed) > FRAME_MAX:  # the peer would drop the connection: say it here instead
        raise ProtocolError(f"a {NAMES.get(command, command)} header of {len(packed)} bytes (at most {FRAME_MAX})")
    flags = int(flags)
    more = flags | _SNDMORE
    if ident is not None:
        _send_frame(sock, ident, more)  # (the only frame that can fail: the rest of a message always follows)
    _send_frame(sock, b"", more)
    _send_frame(sock, VERSION, more)
    _send_frame(sock, command, more)
    if not payload:
        _send_frame(sock, packed, flags)
        return
    _send_frame(sock, packed, more)
    last = len(payload) - 1
    for k, frame in enumerate(payload):
        # Large payloads go out zero-copy (a zmq.Frame is never copied: the broker forwards what it received).
        copy = type(frame) is bytes and len(frame) < _COPY_BELOW
        _send_frame(sock, frame, more if k < last else flags, copy)


_monitors = itertools.count()


def monitor(sock, events):
    """A PAIR socket reporting these events of sock. On an address of its own: pyzmq's default names it after
    the socket's file descriptor, which a socket made just after one was closed gets again while the old address
    is still bound, and the call then fails (an executor dialling again after a refused handshake, say)."""
    return sock.get_monitor_socket(events, addr=f"inproc://burla-monitor-{os.getpid()}-{next(_monitors)}")


def monitor_event(monitor):
    """The number of the next event on a socket's monitor (frame 0 starts with it, a native uint16; reading it
    here spares zmq.utils.monitor, which imports asyncio)."""
    return struct.unpack("=H", monitor.recv_multipart()[0][:2])[0]


def readable(sock, timeout=0):
    """Whether a message waits on sock, or comes within timeout ms: Socket.poll without the Poller it builds."""
    if _get_option(sock, _EVENTS) & _POLLIN:
        return True
    return bool(timeout) and bool(zmq.backend.zmq_poll([(sock, _POLLIN)], int(timeout)))


def _recv_frames(sock, flags, head):
    """One message's frames: the first `head` (identity, delimiter, version, command, header) as bytes, the rest
    (payload) as zmq.Frame, zero-copy."""
    frames = []
    while True:
        frames.append(_recv_frame(sock, flags, len(frames) < head))
        if not _get_option(sock, _RCVMORE):
            return frames


def recv(sock, flags=0):
    """Read one message from a DEALER: (command, header dict, payload frames as zmq.Frame)."""
    return _parse(_recv_frames(sock, int(flags), 4))


def recv_routed(sock, authenticated=True):
    """Read one message from a ROUTER: (identity, role, command, header, payload). role is the User-Id the
    broker's authenticator gave the connection ("worker", "slot:...", "client:..."), or None on an
    unauthenticated socket (authenticated=False: not even asked, which costs a raised ZMQError a message). A
    VersionMismatch carries the sender's identity, to answer with VERSION_NOTICE."""
    if not authenticated:
        frames = _recv_frames(sock, 0, 5)
        role = None
    else:  # (the User-Id is a property of a received zmq.Frame: every frame is one)
        frames = _recv_frames(sock, 0, 0)
        try:
            role = frames[-1].get("User-Id")
        except zmq.ZMQError:
            role = None
        frames = [f.bytes for f in frames[:5]] + frames[5:]
    try:
        return (frames[0], role or None, *_parse(frames[1:]))
    except VersionMismatch as e:
        e.ident = frames[0]
        raise


def version_notice():
    from burla import __version__

    return [b"", VERSION_NOTICE, msgpack.packb({"v": VERSION.decode(), "burla": __version__})]


def _parse(frames):
    if len(frames) >= 2 and frames[0] == b"" and frames[1] != VERSION:
        theirs = frames[1]
        if theirs == VERSION_NOTICE and len(frames) == 3:
            from burla import __version__

            try:
                info = msgpack.unpackb(frames[2])
                version, release = str(info["v"]), str(info["burla"])
            except Exception:
                raise ProtocolError("a malformed version notice") from None
            raise VersionMismatch(
                f"the burla broker speaks protocol {version} (burla {release}) and this side speaks "
                f"{VERSION.decode()} (burla {__version__}): install the broker's release here, "
                f"pip install 'burla=={release}'")
        if re.fullmatch(rb"B[0-9]{1,4}", theirs):
            raise VersionMismatch(f"a peer speaks protocol {theirs.decode()}, not {VERSION.decode()}")
    if len(frames) < 4 or frames[0] != b"" or frames[1] != VERSION:
        raise ProtocolError(f"not a burla {VERSION.decode()} message ({len(frames)} frames)")
    try:
        header = msgpack.unpackb(frames[3], raw=False)
    except Exception as e:
        raise ProtocolError(f"bad header: {e}") from None
    if not isinstance(header, dict):
        raise ProtocolError("header is not a map")
    return frames[2], header, frames[4:]


_allocator_tuned = False


def tune_allocator():
    """Once per process: keep buffers of a few batches on glibc's heap. By default malloc maps every buffer over
    128 KiB (or its latest freed size) on its own and unmaps the heap's top once that much is free, so a process
    that moves MiB-sized batches page-faults through each of them again: that was a third of the time of 1,000
    calls with 1 MiB inputs. Settings of the user's own (MALLOC_*_ or GLIBC_TUNABLES) are left alone."""
    global _allocator_tuned
    if _allocator_tuned:
        return
    _allocator_tuned = True
    if "GLIBC_TUNABLES" in os.environ or any(k.startswith("MALLOC_") for k in os.environ):
        return
    try:
        import ctypes

        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):  # (not glibc: nothing to tune)
        return
    mallopt(-3, 2 * MAX_BATCH_BYTES)  # M_MMAP_THRESHOLD: smaller buffers come from the heap
    mallopt(-1, 4 * MAX_BATCH_BYTES)  # M_TRIM_THRESHOLD: this much free heap stays for the next batches


def socket(ctx, kind, credential=None, role=None):
    """A socket with our options; with a credential (API key, worker token or slot key), CURVE to the broker it
    names. Peers never choose their ZeroMQ identity: the broker's ROUTER assigns one per connection, so nobody can
    take over another peer's route; names travel in headers and are checked against the sender's role."""
    tune_allocator()  # (every process that moves batches opens a socket here first)
    sock = ctx.socket(kind)
    if credential:
        from burla import security

        security.secure(sock, credential, role)
    sock.linger = 0
    sock.maxmsgsize = FRAME_MAX + 1024  # a larger frame drops the connection (before authentication too)
    # High water marks are only a backstop: credit keeps queues short.
    sock.sndhwm = sock.rcvhwm = 100_000
    if kind != zmq.ROUTER:
        # ZMTP heartbeats: a TCP connection silent for long (a cut link) is dropped, and dialled again. Generous:
        # a PONG can queue behind a large message, and liveness is judged by our own heartbeats anyway. Not on the
        # broker's ROUTER: there libzmq 4.3 aborts the process when a heartbeat times out on a connection whose
        # peer stopped reading (zeromq/libzmq#3937, #4364), which any client could make happen.
        sock.heartbeat_ivl = int(HEARTBEAT_INTERVAL * 1000)
        sock.heartbeat_timeout = int(max(10.0, 10 * HEARTBEAT_INTERVAL) * 1000)
    if kind == zmq.ROUTER:
        sock.router_mandatory = 1  # a send to a dead peer fails loudly instead of vanishing
        # Per peer: the broker reads fast and never waits on a peer (a peer that does not read fills its queue,
        # then sends to it fail at once), so short queues bound what a flood can park in the broker.
        sock.sndhwm = sock.rcvhwm = 1000
    else:
        # Retry soon (a broker started alongside may be milliseconds from binding), then back off to 1 s.
        sock.reconnect_ivl = 10
        sock.reconnect_ivl_max = 1000
    return sock


def is_local(address):
    return address.startswith(("ipc://", "inproc://")) or "//127." in address or "//localhost" in address


# Where an executor is: before each call of a re-run batch (or of a job with a timeout) it writes (job id, batch
# start, offset, deadline) to a small file, and offset -1 after. The worker reads it when the executor dies, so the
# broker learns the culprit even when the executor's last messages were lost with it; and it kills an executor
# whose call is past its deadline (a timeout that the call, stuck in C code, did not notice).
WHERE = struct.Struct("<8sqqd")
NOWHERE = WHERE.pack(bytes(8), 0, -1, 0.0)
