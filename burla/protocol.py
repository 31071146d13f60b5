"""The wire protocol between client, broker and worker: every command and its header, in one place.

On a DEALER socket a message is  [b"", VERSION, command, header, *payload]; the broker's ROUTER sees the
sender's identity in front. The header is a small msgpack dict with short keys; payload frames are opaque to the
broker and forwarded zero-copy. Inputs travel in batches of consecutive input indices, so a batch is named by the
index of its first input ("i") and its length ("n").
"""

import os
import struct

import msgpack
import zmq

VERSION = b"B1"

# client -> broker
SUBMIT = b"S"  # {j: job id, c: client id, d: function digest, n: inputs (if known), cpu, ram, gpu, par, o: options,
#                env?: {k: key, lock, py: interpreter} or {k: "img-...", img: container image, df?: Dockerfile}
#                (see burla.env; absent: each worker's own environment)
#                payload: [function, local packages zip (when the env key has an archive digest)]
# options: {r: retries per call, t: timeout per call in seconds, c: 1 = a failed call does not stop the job}
BATCH = b"B"  # {j, i, n, z: compressed flags}  payload: pickled inputs
END = b"E"  # {j}: the client has every outcome; the broker forgets the job
CANCEL = b"C"  # {j}
STATUS = b"?"  # {} -> STATUS {workers: [...], jobs: [...], recent: [...]}
WATCH = b"O"  # {}: push STATE every WATCH_INTERVAL, and a copy of the LOG lines of the watcher's jobs, for the
#               next WATCH_EXPIRY seconds (a dashboard renews it every second)
STATE = b"U"  # broker -> watcher: what STATUS answers
# broker -> client
ACCEPTED = b"A"  # {j, s: slots that fit the job}
REJECTED = b"X"  # {j, e: message, t?: "env" when the job's environment could not be built, "cancelled" when
#                  another connection of the same user cancelled it (a dashboard)}
RESULT = b"R"  # {j, i: batch, o: offset of the first result, k: results, e: [errors], f: 1 on a batch's last,
#                 t: seconds computing, w: slot, z}  payload: results, then one pickled exception per error
LOG = b"L"  # {j, w: slot, l: [[input index, stream (1 stdout, 2 stderr), text], ...]}
# worker (the supervisor of a host's executors) -> broker
REGISTER = b"W"  # {w: worker id, host, slots, cpu, ram, gpu: [gpu names], pid, env: its own environment's key,
#                  ctr: container runtime it can run images with, None, or "?" while it finds out}
ENV = b"V"  # {w, k: env key, st: "step" | "ready" | "failed", m: what is happening, t: seconds since it began}
#             the broker passes it on to the clients of the jobs with that environment, adding j
SLOT_DIED = b"D"  # {w, s: slot name, code: exit code or -signal, at?: {j, i, o}: the input its call was running,
#                    timeout?: 1 when the worker killed it for running past the call's deadline}
# broker -> worker
KILL = b"K"  # {s: slot name, j: job, hard: 0 = interrupt that job's running call (SIGUSR1), 1 = kill the executor}
PREPARE = b"P"  # {s: [slot names], e: the job's env header, or {k: the worker's own key, own: 1}}
#                 payload: [local packages zip] if any. Find or build that environment, then restart those (idle)
#                 slots' executors in it; they say READY with its key.
# executor (one slot) <-> broker
READY = b"Y"  # {w, s: slot name "worker id/index", k: batches it can hold, pid, env: key of its environment}
TASK = b"T"  # {j, i, n, d, z, f: function frame first, o: options, x: isolate from this offset, sk: offsets
#               to skip (inputs that already failed by crashing executors)}
#               payload: [function,] inputs
# broker -> anyone it does not know (it restarted, or declared the peer dead): register again
RECONNECT = b"Z"
# any direction; any message counts as a sign of life
HEARTBEAT = b"H"

# What each authenticated role may send: a worker cannot submit jobs, a client cannot post results or logs.
CLIENT_COMMANDS = {SUBMIT, BATCH, END, CANCEL, STATUS, WATCH, HEARTBEAT}
WORKER_COMMANDS = {REGISTER, READY, RESULT, LOG, SLOT_DIED, ENV, HEARTBEAT}

HEARTBEAT_INTERVAL = float(os.environ.get("BURLA_HEARTBEAT_INTERVAL", "1.0"))
HEARTBEAT_LIVENESS = 3  # intervals of silence before a peer is dead
WATCH_INTERVAL = 0.25  # seconds between STATE pushes to watchers
WATCH_EXPIRY = 10.0  # a watcher renews every second; a busy one (a Jupyter server under load) may be late

# An error in "e": {i: input index, type: "module.Name", msg, tb: remote traceback text, input: repr}; "all": 1
# when one error stands for every input of the batch from "o" on (the batch could not be loaded).


class ProtocolError(Exception):
    """A message that does not follow this protocol."""




def send(sock, command, header, payload=(), ident=None, flags=0):
    frames = [b"", VERSION, command, msgpack.packb(header), *payload]
    if ident is not None:
        frames.insert(0, ident)
    # copy=False: large payloads go out zero-copy; pyzmq still copies frames under its copy threshold.
    sock.send_multipart(frames, flags=flags, copy=False)


def recv(sock):
    """Read one message from a DEALER: (command, header dict, payload frames as zmq.Frame)."""
    return _parse(sock.recv_multipart(copy=False))


def recv_routed(sock):
    """Read one message from a ROUTER: (identity, role, command, header, payload). role is the User-Id the
    broker's authenticator gave the connection ("worker", "client:..."), or None on an unauthenticated socket."""
    frames = sock.recv_multipart(copy=False)
    try:
        role = frames[-1].get("User-Id")
    except zmq.ZMQError:
        role = None
    return (frames[0].bytes, role or None, *_parse(frames[1:]))


def _parse(frames):
    if len(frames) < 4 or frames[0].bytes != b"" or frames[1].bytes != VERSION:
        raise ProtocolError(f"not a burla {VERSION.decode()} message ({len(frames)} frames)")
    try:
        header = msgpack.unpackb(frames[3].bytes, raw=False)
    except Exception as e:
        raise ProtocolError(f"bad header: {e}") from None
    if not isinstance(header, dict):
        raise ProtocolError("header is not a map")
    return frames[2].bytes, header, frames[4:]


def socket(ctx, kind, credential=None, role=None):
    """A socket with our options; with a credential (API key or worker token), CURVE to the broker it names.
    Peers never choose their ZeroMQ identity: the broker's ROUTER assigns one per connection, so nobody can take
    over another peer's route; names travel in headers and are checked against the sender's role."""
    sock = ctx.socket(kind)
    if credential:
        from burla import security

        security.secure(sock, credential, role)
    sock.linger = 0
    # High water marks are only a backstop: credit keeps queues short.
    sock.sndhwm = sock.rcvhwm = 100_000
    # ZMTP heartbeats: a TCP connection silent for long (a cut link) is dropped, and dialled again. Generous: a
    # PONG can queue behind a large message, and liveness is judged by our own heartbeats anyway.
    sock.heartbeat_ivl = int(HEARTBEAT_INTERVAL * 1000)
    sock.heartbeat_timeout = int(max(10.0, 10 * HEARTBEAT_INTERVAL) * 1000)
    if kind == zmq.ROUTER:
        sock.router_mandatory = 1  # a send to a dead peer fails loudly instead of vanishing
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
