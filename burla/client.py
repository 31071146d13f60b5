"""remote_parallel_map: the client side of a job.

The function is pickled at most once per job (see serialize.dumps_function) and sent with the submission. Inputs are
pulled from the user's iterable lazily, in batches of consecutive indices, while the number of batches (and bytes)
not yet answered stays under a window: that window is the client's credit, so memory stays flat whatever the number
of inputs. Batch size adapts: one input per batch until the first results report how long a call takes (a few such
probes; the function's last job here gives a first guess), then as many as fill about TARGET_BATCH_SECONDS of work,
and never so many that the last batches leave slots idle, nor so few that the broker, not the slots, sets the pace.
"""

import itertools
import linecache
import math
import os
import re
import threading
import time
import warnings
import weakref

import zmq

from burla import calling, config, env, errors, protocol as P, security, serialize
from burla.progress import create as create_view

TARGET_BATCH_SECONDS = 0.1
# One broker hands out about 7,000 batches a second (benchmarks/many_workers.py, docs/scaling.md). On a cluster so
# big that batches of TARGET_BATCH_SECONDS would need more, they are made longer: the broker never paces the slots.
BROKER_BATCHES_PER_SECOND = 5000
SPLIT_MIN_SECONDS = 0.002  # work smaller than this is not worth a batch of its own (a round trip costs ~0.3 ms)
# Before anything says how long a call takes, a job sends at most PROBE_BATCHES batches (of one input, or sized by
# the function's last job), for up to PROBE_SECONDS: tiny calls answer by then and size the batches (no flood of
# small tasks over a big cluster); slow ones do not, and then every slot gets one at once (at once if the
# function's last job here found its calls slow).
PROBE_BATCHES, PROBE_SECONDS = 8, 0.02
SILENCE_LIMIT = P.HEARTBEAT_INTERVAL * (P.HEARTBEAT_LIVENESS + 1)  # a broker this quiet is gone

_connections = {}
_call_seconds = {}  # function digest -> seconds per call in its last job here: the next job's first batch sizes
_connections_lock = threading.Lock()


class Connection:
    """One per process and cluster: a ZeroMQ context, a pool of job sockets, and a heartbeat thread."""

    def __init__(self, address, api_key=None):
        self.address = address
        self.api_key = api_key
        self.ctx = zmq.Context()
        self.client_id = os.urandom(8)
        self.compress = not P.is_local(address)
        self.local = False  # the embedded cluster (it ends with this process)
        self.idle = []
        self.refused = None  # why the broker refused our credentials (or speaks another version), once it has
        self.heard = time.monotonic()  # the broker's last answer to our heartbeats
        self.answers, self.live = 0, set()  # answers so far; the job ids the latest one says the broker has
        self.slots = 0  # the slots the latest job here was told fit it (a hint for the next one's first batches)
        self.active = set()  # ids of the jobs streams of this process read
        self.monitors = {}  # job socket -> [its monitor socket, disconnected since the last look]
        self.lock = threading.Lock()
        threading.Thread(target=self.heartbeat, daemon=True, name="burla-heartbeat").start()

    def socket(self):
        with self.lock:
            if self.idle:
                return self.idle.pop()
        return self.new_socket()

    def new_socket(self):
        sock = P.socket(self.ctx, zmq.DEALER, credential=self.api_key, role=security.CLIENT)
        sock.sndtimeo = int(SILENCE_LIMIT * 1000)  # with no broker to talk to (or a refused key) a send would block
        sock.connect(self.address)
        return sock

    def release(self, sock):
        with self.lock:
            self.idle.append(sock)

    def monitor(self, sock):
        """Watch a job socket's connection: after it breaks and is made again (a new connection, as the broker
        sees it), the job must be attached again."""
        if sock not in self.monitors:
            self.monitors[sock] = [P.monitor(sock, zmq.EVENT_DISCONNECTED | zmq.EVENT_HANDSHAKE_SUCCEEDED),
                                   False]
        self.monitor_events(sock)  # (what happened while it was idle in the pool does not matter)
        return sock

    def monitor_events(self, sock):
        """True if the socket's connection was made again since the last look."""
        entry = self.monitors.get(sock)
        if entry is None:
            return False
        again = False
        while entry[0].poll(0):
            event = P.monitor_event(entry[0])
            if event == zmq.EVENT_DISCONNECTED:
                entry[1] = True
            elif event == zmq.EVENT_HANDSHAKE_SUCCEEDED and entry[1]:
                entry[1], again = False, True
        return again

    def heartbeat(self):
        """Say we are alive, and hear the broker answer (on a connection of its own, which no large message holds
        up, so a job is not judged abandoned while a big result is arriving). On a CURVE connection also watch the
        handshake, so that a refused API key is reported at once (self.refused) instead of as a silent broker."""
        sock = self.new_socket()
        monitor = P.monitor(sock, zmq.EVENT_HANDSHAKE_FAILED_AUTH) if self.api_key else None
        poller = zmq.Poller()
        poller.register(sock, zmq.POLLIN)
        if monitor is not None:
            poller.register(monitor, zmq.POLLIN)
        next_beat = 0.0
        while True:
            if time.monotonic() >= next_beat:
                try:
                    P.send(sock, P.HEARTBEAT, {"c": self.client_id}, flags=zmq.NOBLOCK)
                except zmq.Again:
                    pass
                next_beat = time.monotonic() + P.HEARTBEAT_INTERVAL
            events = dict(poller.poll(max(0.0, next_beat - time.monotonic()) * 1000))
            if sock in events:
                while P.readable(sock):
                    try:
                        _, header, _ = P.recv(sock)
                        self.heard = time.monotonic()
                        self.live = set(header.get("jobs") or ())
                        self.answers += 1
                        for job_id in self.live - self.active:  # ended here, and the END was lost on the way
                            P.send(sock, P.END, {"j": job_id}, flags=zmq.NOBLOCK)
                    except P.VersionMismatch as e:
                        self.refused = str(e)
                    except P.ProtocolError:
                        pass
            if monitor is not None and monitor in events:
                monitor.recv_multipart()
                self.refused = f"the burla broker at {self.address} refused this API key"


def connection(cluster=None, api_key=None):
    address = config.cluster_address(cluster)
    local_cluster = False
    if address == "local":
        from burla import local

        address, api_key = local.cluster().address, None
        local_cluster = True
    else:
        api_key = config.api_key(api_key) if address.startswith("tcp://") else None
        if api_key:
            security.parse(api_key, security.CLIENT)  # a malformed key fails here, clearly
    key = (os.getpid(), address, api_key)
    with _connections_lock:
        if key not in _connections:
            _connections[key] = Connection(address, api_key)
            _connections[key].local = local_cluster
        return _connections[key]


def job_lease():
    """Seconds a job waits for its client to come back (BURLA_JOB_LEASE, default 10 minutes)."""
    try:
        lease = float(os.environ.get("BURLA_JOB_LEASE", P.JOB_LEASE))
    except ValueError:
        raise ValueError(f"BURLA_JOB_LEASE must be a number of seconds, not {os.environ['BURLA_JOB_LEASE']!r}") \
            from None
    if not 1 <= lease <= 30 * 86400:
        raise ValueError(f"BURLA_JOB_LEASE must be between 1 second and 30 days, not {lease:g}")
    return lease


ACK_INTERVAL = 0.2  # seconds between acknowledgements of what arrived (also sent when much has arrived)
ACK_BYTES = 8 << 20
ACCEPT_LIMIT = 60.0  # seconds a broker that answers may take to accept a job before the client gives up
ATTACH_RETRY = 2.0  # seconds between ATTACHes while the broker does not answer one
LEASE_GRACE = max(10.0, 3 * SILENCE_LIMIT)  # past the lease, how long a client waits to hear it from the broker


class Stream:
    """One job's conversation with the broker, as its client or as a process attached to it. Every result and log
    line comes as a numbered entry of the job's outbox; the stream acknowledges them, and after any break (an
    outage, a broker restart, another process) attaches again from the last one it holds, so it sees each entry
    once and nothing is lost while the job's lease lasts."""

    def __init__(self, conn, job_id, view, return_exceptions=False):
        __tracebackhide__ = True
        self.conn, self.id, self.view = conn, job_id, view
        self.return_exceptions = return_exceptions
        self.lease = job_lease()
        self.sock = conn.socket()
        self.monitor = conn.monitor(self.sock)
        conn.active.add(job_id)
        self.heard = time.monotonic()
        self.closed = False
        self.q = 0  # the last outbox entry this stream holds
        self.acked, self.unacked_bytes, self.acked_at = 0, 0, time.monotonic()
        self.outstanding = {}  # first index of a batch -> Pending, until every input of it has an outcome
        self.outstanding_bytes = 0
        self.learns_batches = False  # a reader meets batches first in their results (it sent none)
        self.complete = set()  # batches that have every outcome (a reader learns of batches from their results)
        self.slots = 0
        self.total = None
        self.ended = None  # (state, why) once the job's END entry is in
        self.away_since = None  # when the broker stopped answering, while it does not
        self.attaching = None  # when the ATTACH that is not answered yet was sent
        self.per_call = self.result_bytes = None
        self.call_samples = []
        self.logs = None  # a list to keep the log lines in, for Job.logs()
        self.received = 0  # outcomes taken

    def send(self, command, header, payload=()):
        try:
            P.send(self.sock, command, header, payload)
        except zmq.Again:
            self.closed = True  # this socket is stuck: close it rather than pool it
            self.sock.close(0)
            raise errors.ClusterConnectionError(unreachable(self.conn.address, "could not reach")) from None

    def attach(self, reader=False, logs_only=False):
        """Ask for every outbox entry after the last one held, then ATTACHED."""
        header = {"j": self.id, "c": self.conn.client_id, "q": self.q, "sl": min(self.slots, 1 << 20)}
        if reader:
            header["p"] = 1
        if logs_only:
            header["lg"] = 1
        self.attaching = time.monotonic()
        P.send(self.sock, P.ATTACH, header, flags=zmq.NOBLOCK)

    def receive(self, wait=250):
        """Wait up to `wait` ms for messages (0: take what is there; an Executor's thread polls many jobs);
        yield (first index, values) runs of new outcomes."""
        __tracebackhide__ = True
        if not P.readable(self.sock, wait):
            if wait:
                self.idle()
            return
        while True:
            try:
                command, header, payload = P.recv(self.sock, zmq.NOBLOCK)
            except zmq.Again:
                break
            except P.VersionMismatch as e:
                raise errors.ClusterConnectionError(str(e)) from None
            self.heard = time.monotonic()
            if header.get("j") == self.id:
                q = header.get("q")
                if q is not None:  # an outbox entry: each is taken once, whatever is replayed
                    if q <= self.q:
                        continue
                    self.q = q
                    self.unacked_bytes += sum(len(f) for f in payload)
                yield from self.handle(command, header, payload)
            if not P.readable(self.sock):
                break
        self.acknowledge()

    def acknowledge(self, force=False):
        if self.q > self.acked and (force or self.unacked_bytes > ACK_BYTES or
                                    time.monotonic() - self.acked_at > ACK_INTERVAL):
            try:
                P.send(self.sock, P.ACK, {"j": self.id, "q": self.q}, flags=zmq.NOBLOCK)
            except zmq.Again:
                return
            self.acked, self.unacked_bytes, self.acked_at = self.q, 0, time.monotonic()

    def idle(self):
        """Nothing came: tell the view, and find out whether the broker is away, or back, or lost the job."""
        self.view.tick()
        self.acknowledge()
        if self.conn.refused:
            raise errors.ClusterConnectionError(self.conn.refused)
        now = time.monotonic()
        reconnected = self.conn.monitor_events(self.monitor)
        if now - max(self.heard, self.conn.heard) > SILENCE_LIMIT:
            if self.away_since is None:
                self.away_since = max(self.heard, self.conn.heard)
                self.view.reconnecting(True)
            if now - self.away_since > self.lease + LEASE_GRACE:  # (the broker would tell us, were it there)
                raise errors.ClusterConnectionError(
                    f"no word from the burla broker at {self.conn.address} for {now - self.away_since:.0f} s, "
                    f"longer than the job's lease ({self.lease:g} s, BURLA_JOB_LEASE): the job is cancelled")
            return
        if self.away_since is not None or reconnected:  # the broker is back (or our connection is new)
            self.away_since = None
            self.view.reconnecting(False)
            self.attach()
        elif self.attaching is not None and now - self.attaching > ATTACH_RETRY:
            self.attach()  # (that one was lost)
        elif self.lost():
            self.attach()

    def lost(self):
        return False

    def handle(self, command, header, payload):
        __tracebackhide__ = True
        if command == P.RESULT:
            return self.on_result(header, payload)
        if command == P.LOG:
            if header.get("x"):
                self.view.lines(header.get("w"), [[-1, 2, f"burla: {header['x']} log lines were dropped: this "
                                                          "program read them too slowly"]])
            if self.logs is not None:
                self.logs.extend((i, header.get("w"), stream, text) for i, stream, text in header["l"])
            self.view.lines(header.get("w"), header["l"])
        elif command in (P.ACCEPTED, P.HEARTBEAT):
            self.slots = header.get("s", self.slots)
            if command == P.ACCEPTED:
                self.conn.slots = self.slots
                self.on_accepted()
        elif command == P.ATTACHED:
            self.attaching = None
            self.slots = header.get("s") or self.slots
            self.on_attached(header)
        elif command == P.END:
            self.ended = (header.get("st", "done"), header.get("e"))
        elif command == P.ENV:
            self.view.env(header)
        elif command == P.NOTE:
            self.view.note(header.get("m", ""))
        elif command == P.REJECTED:
            self.attaching = None
            return self.on_rejected(header)
        return ()

    def on_accepted(self):
        pass

    def on_attached(self, header):
        if header.get("n") is not None and header.get("sealed"):
            self.total = header["n"]
            self.view.total_known(self.total)

    def on_rejected(self, header):
        __tracebackhide__ = True
        kind, message = header.get("t"), header["e"]
        if kind == "env":
            raise errors.EnvironmentBuildError(message)
        if kind == "expired":
            raise errors.JobExpiredError(message)
        if kind == "cancelled":
            raise errors.JobCancelledError(message)
        if kind == "unknown":
            raise errors.JobNotFoundError(message)
        if kind in ("credit", "spool", "store", "failed", "done", "sealed"):
            raise errors.BurlaError(message)
        raise errors.NoCompatibleWorkerError(message)

    def on_result(self, header, payload):
        """The outcomes in a RESULT as (first index, values) runs; raises a failed call's exception unless the job
        returns exceptions in place. Outcomes seen before (a batch re-run after its worker was presumed dead, or
        after a broker restart) are dropped, so every input ends in exactly one outcome."""
        __tracebackhide__ = True
        start = header["i"]
        pending = self.outstanding.get(start)
        if pending is None:
            if start in self.complete or not self.learns_batches:
                return []
            pending = self.outstanding[start] = Pending(header.get("n") or 1, 0)
        if header.get("t") and header.get("k"):
            call = header["t"] / header["k"]
            if len(self.call_samples) < 5:  # the median of the first few: one slow first call (an import, a
                self.call_samples.append(call)  # busy host) must not size thousands of batches
                self.per_call = sorted(self.call_samples)[len(self.call_samples) // 2]
            else:
                self.per_call = 0.5 * (self.per_call + call)
        flags = header.get("z") or []
        offset = header.get("o", 0)
        failures = header.get("e") or []
        failed = len(failures)
        values = serialize.unpack_items(flags, payload[:len(flags)]) if flags else []
        if values:
            size = sum(len(f) for f in payload[:len(flags)]) / len(values)
            self.result_bytes = size if self.result_bytes is None else 0.5 * (self.result_bytes + size)
        for k, value in enumerate(values) if serialize.per_item(flags) else ():
            if type(value) is serialize.Unloadable:  # that result alone failed to unpickle here
                values[k] = unloadable_result(start + offset + k, value.error)
                if not self.return_exceptions:
                    raise values[k]
        if failures:
            exceptions = [remote_exception(info, payload[len(flags) + k:len(flags) + k + 1])
                          for k, info in enumerate(failures)]
            self.failed_calls(exceptions)
            for info in failures:
                self.view.failure(info["i"], info["type"], info["msg"], with_source_lines(info.get("tb", "")),
                                  info.get("input", ""))
            if not self.return_exceptions:  # (the outcomes that came, the failed one too, as the broker counts)
                self.view.advance(len(values) + len(failures), header.get("w"), len(failures), header.get("t"))
                raise exceptions[0]
            values = values + exceptions
            if header.get("all"):  # one error for every input of the batch from the offset on
                extra = pending.n - offset - len(values)
                values += [exceptions[0]] * extra
                failed += max(extra, 0)
        runs = pending.take(offset, values)
        if pending.left == 0:
            del self.outstanding[start]
            self.outstanding_bytes -= pending.size
            self.complete.add(start)
        taken = sum(len(v) for _, v in runs)
        self.received += taken
        self.view.advance(taken, header.get("w"), failed, header.get("t"))
        return [(start + k, v) for k, v in runs]

    def failed_calls(self, exceptions):
        """The exceptions of a RESULT's failed calls (an Executor tells them from results by identity)."""

    def close(self, command, state="cancelled"):
        self.closed = True
        self.conn.active.discard(self.id)
        self.view.close(state)
        try:
            P.send(self.sock, command, {"j": self.id}, flags=zmq.NOBLOCK)
        except zmq.ZMQError:
            self.sock.close(0)
            return
        self.conn.release(self.sock)


class Job(Stream):
    """A job this process submits: it feeds the inputs under credit and collects the outcomes. It keeps what it
    would need to submit the job again (its function, the batches without every outcome), so a broker that lost
    the job (restarted) gets it again and no input is lost."""

    def __init__(self, conn, function_, inputs, cpu, ram, gpu, parallelism, spinner, options, environment=None,
                 detached=False, view=None, name=None):
        try:
            function_bytes, digest = serialize.dumps_function(function_)
        except Exception as e:
            raise TypeError(f"the function {getattr(function_, '__qualname__', function_)!r} could not be "
                            f"pickled: {e}") from e
        inputs_total = len(inputs) if hasattr(inputs, "__len__") else None
        view = view or create_view(spinner and not detached, inputs_total)
        super().__init__(conn, os.urandom(8), view, bool(options.get("c")))
        self.inputs = iter(inputs)
        self.listed = inputs if type(inputs) is list else None  # (sliced: a C copy, not an item-by-item islice)
        self.digest = digest
        self.total = inputs_total
        self.sent = 0  # inputs sent so far; also the index of the next one
        self.exhausted = False
        self.detached = detached
        self.item_bytes = None
        payload = serialize.split(function_bytes)
        header = {"j": self.id, "c": conn.client_id, "d": digest, "fn": len(payload), "n": self.total, "cpu": cpu,
                  "ram": ram, "gpu": gpu, "par": parallelism, "o": options, "ls": self.lease,
                  "py": env.python()}  # (only workers of this Python can load the pickled function)
        parent = os.environ.get("BURLA_PARENT", "")  # a call of another job (nested): its job and slot
        if re.fullmatch(r"[0-9a-f]{16}:\S+", parent):
            header["pa"] = {"j": bytes.fromhex(parent[:16]), "s": parent[17:]}
        if environment is not None:
            header["env"] = environment.header()
            if environment.archive:
                payload += serialize.split(environment.archive)
        if detached:
            header["dt"] = 1
        self.submission = (header, payload)
        self.accepted = None  # how many heartbeat answers the connection had when the job was accepted
        self.submitted_at = time.monotonic()
        self.spooled = 0  # a detached job's inputs the broker has on disk
        self.seal_sent = False
        self.view.job_id(self.id.hex())
        header["nm"] = name or job_name(function_)
        self.view.name(header["nm"])
        self.unsent = not detached  # an attached job's SUBMIT waits for its first batch, packed: they go together
        if detached:  # (a detached one's inputs wait for ACCEPTED)
            self.send(P.SUBMIT, header, payload)

    def submit(self):
        if self.unsent:
            self.unsent = False
            self.send(P.SUBMIT, *self.submission)

    def check_accepted(self):
        """A broker that answers heartbeats but never took the job (its SUBMIT lost, say) must not leave the
        client waiting for ever."""
        if self.accepted is None:
            if time.monotonic() - max(self.heard, self.conn.heard) > SILENCE_LIMIT:
                raise errors.ClusterConnectionError(unreachable(self.conn.address))
            if time.monotonic() - self.submitted_at > ACCEPT_LIMIT:
                raise errors.ClusterConnectionError(
                    f"the burla broker at {self.conn.address} answers, but did not take the job within "
                    f"{ACCEPT_LIMIT:.0f} s of its submission")

    # ---------------------------------------------------------------- sending
    def batch_size(self):
        if self.detached:  # no call has run yet: an eighth of a slot's share, within the size limits
            n = math.ceil(max(self.total or self.sent, 1) / (8 * max(self.slots, 1)))
        elif self.per_call is None and (self.total is None or self.digest not in _call_seconds):
            # Until a result says how long a call takes, spread calls one per slot; but a job of at most two calls
            # per slot (as the cluster's last answer counted them) goes as one batch per slot: in a small job the
            # messages are most of the time.
            slots = self.slots or self.conn.slots
            n = 1
            if self.total is not None and 0 < slots < self.total <= 2 * slots:
                n = math.ceil((self.total - self.sent) / slots)
        else:
            # Sized from how long calls take: this job's results so far, or, before any, the function's last job
            # here. That guess is trusted only as far as one batch per slot, so if this job's calls are slower
            # (other inputs), the slots still share the work as a static split would.
            per_call = max(self.per_call if self.per_call is not None else _call_seconds[self.digest], 1e-8)
            slots = max(self.slots or self.conn.slots, 1)
            n = max(TARGET_BATCH_SECONDS, slots / BROKER_BATCHES_PER_SECOND) / per_call
            if self.total is not None:  # leave several batches per slot for the end, so no slot idles long
                # ... but no batch so small that the broker's handing out takes longer than the work: B batches of
                # the job's W seconds of work take B / rate s to hand out and W / B to run; B = sqrt(W * rate).
                left = self.total - self.sent
                split = max(SPLIT_MIN_SECONDS, math.sqrt(left * per_call / BROKER_BATCHES_PER_SECOND))
                # ... and none so small that the rest of a small job waits for results to free the window: what is
                # left goes in the batches the window still allows (each still under TARGET_BATCH_SECONDS)
                fit = math.ceil(left / max(P.window(self.slots) - len(self.outstanding), 1))
                n = min(n, max(math.ceil(left / (2 * slots)), split / per_call, fit))
                if self.per_call is None:
                    n = min(n, math.ceil(left / slots))
        if self.item_bytes:
            n = min(n, P.MAX_BATCH_BYTES / self.item_bytes)
        else:  # the first batch: its inputs' size is not known yet, and they may be large (as much as 2 x one)
            n = min(n, 2)
        if self.result_bytes:
            n = min(n, P.MAX_BATCH_BYTES / self.result_bytes)
        return int(min(max(n, 1), P.MAX_BATCH_ITEMS))

    def fill(self):
        if self.accepted is None and self.detached:
            return  # (a detached job's inputs go to disk: they wait until the broker took the job)
        window = P.window(self.slots)  # the broker holds us to it
        if self.probing():
            window = min(window, PROBE_BATCHES)
        while not self.exhausted and self.away_since is None and self.attaching is None and \
                len(self.outstanding) < window and \
                (self.outstanding_bytes < P.MAX_OUTSTANDING_BYTES or not self.outstanding):
            if self.listed is not None:
                items = self.listed[self.sent:self.sent + self.batch_size()]
            else:
                items = list(itertools.islice(self.inputs, self.batch_size()))
            if not items:
                self.exhausted = True
                self.view.total_known(self.sent)
                break
            self.send_batch(items)
        self.submit()  # (if no batch did: a job of no inputs)
        if self.exhausted and (self.total != self.sent or self.detached) and not self.seal_sent:
            self.seal_sent = True
            self.send(P.SEAL, {"j": self.id, "n": self.sent})

    def probing(self):
        return self.per_call is None and _call_seconds.get(self.digest, 0.0) < PROBE_SECONDS and \
            time.monotonic() - self.submitted_at < PROBE_SECONDS

    def wait_ms(self):
        """How long to wait for messages: until the probing ends, if it has not."""
        if not self.probing():
            return 250
        return max(1, math.ceil((self.submitted_at + PROBE_SECONDS - time.monotonic()) * 1000))

    def send_batch(self, items, packed=None):
        try:
            flags, frames = packed or serialize.pack_items(items, self.conn.compress)
        except Exception:
            for k, item in enumerate(items):
                try:
                    serialize.pack_items([item])
                except Exception as e:
                    raise TypeError(f"input {self.sent + k} could not be pickled ({type(item).__name__}): {e}") \
                        from e
            raise
        header = {"j": self.id, "i": self.sent, "n": len(items), "z": flags}
        self.submit()
        self.send(P.BATCH, header, frames)
        size = sum(len(f) for f in frames)
        pending = self.outstanding[self.sent] = Pending(len(items), size)
        pending.batch = (header, frames)  # kept to send again to a broker that lost it
        self.outstanding_bytes += size
        item = size / len(items)
        self.item_bytes = item if self.item_bytes is None else 0.5 * (self.item_bytes + item)
        self.sent += len(items)

    # ---------------------------------------------------------------- picking the job up again
    def on_accepted(self):
        if self.accepted is not None:  # accepted again, by a broker that had lost the job: it holds nothing
            self.on_attached({"have": [], "sealed": 0})
        self.accepted = self.conn.answers

    def lost(self):
        """The broker's heartbeat answers have not listed this job twice since it took it."""
        return self.accepted is not None and self.conn.answers >= self.accepted + 2 and \
            self.id not in self.conn.live and not self.detached

    def on_attached(self, header):
        """The broker has what it listed: send again the batches it lacks (lost in a broken connection, or with a
        broker that restarted), and the end of the inputs."""
        have = set(header.get("have") or ())
        for start, pending in self.outstanding.items():
            if start not in have and pending.batch is not None:
                self.send(P.BATCH, *pending.batch)
        if self.seal_sent and not header.get("sealed"):
            self.send(P.SEAL, {"j": self.id, "n": self.sent})
        self.accepted = self.conn.answers

    def on_rejected(self, header):
        __tracebackhide__ = True
        if header.get("t") == "unknown" and self.accepted is not None:
            # The broker lost the job (it restarted without it): submit it again, with what is not done.
            done = self.sent - sum(p.left for p in self.outstanding.values())
            submit, payload = self.submission
            self.q = self.acked = 0
            self.send(P.SUBMIT, dict(submit, re=1, rs=max(done, 0), sl=min(self.slots, 1 << 20)), payload)
            return ()
        return super().on_rejected(header)

    def on_spooled(self, header):
        """Inputs up to n are on the head's disk: those batches need not be kept, or sent again."""
        self.spooled = max(self.spooled, header.get("n", 0))
        for start in [s for s, p in self.outstanding.items() if s + p.n <= self.spooled]:
            self.outstanding_bytes -= self.outstanding.pop(start).size

    def handle(self, command, header, payload):
        __tracebackhide__ = True
        if command == P.SPOOLED:
            self.on_spooled(header)
            if header.get("sealed"):
                self.ended = ("spooled", None)
            return ()
        return super().handle(command, header, payload)

    # ---------------------------------------------------------------- receiving
    def batches(self):
        """Yield (first index, results) for each batch as it completes; cancel the job if stopped early."""
        __tracebackhide__ = True  # IPython and pytest leave burla's own frames out of a remote error's traceback
        state = "cancelled"  # unless it ends otherwise: stopped by Ctrl-C, a kernel interrupt or the caller
        try:
            self.fill()
            while self.outstanding or not self.exhausted:
                self.check_accepted()
                for run in self.receive(self.wait_ms()):
                    yield run
                self.fill()
            self.close(P.END, "done")  # (which acknowledges everything)
            if self.per_call is not None:
                if len(_call_seconds) >= 256:
                    _call_seconds.clear()
                _call_seconds[self.digest] = self.per_call
        except errors.JobCancelledError:
            raise  # (cancelled elsewhere: the panel, another process of the same user)
        except Exception:
            state = "failed"
            raise
        finally:
            if not self.closed:
                self.close(P.CANCEL, state)

    def upload(self):
        """A detached job: send every input to the head's disk and the end of them; then the job runs alone."""
        __tracebackhide__ = True
        try:
            while self.ended is None:
                if time.monotonic() - max(self.heard, self.conn.heard) > SILENCE_LIMIT:
                    raise errors.ClusterConnectionError(
                        f"no word from the burla broker at {self.conn.address} for {SILENCE_LIMIT:.0f} s while "
                        "uploading the detached job's inputs")
                self.check_accepted()
                self.fill()
                for _ in self.receive():
                    pass
        except BaseException:
            self.close(P.CANCEL, "failed")
            raise
        self.closed = True
        self.conn.active.discard(self.id)
        self.conn.release(self.sock)

    def abandon(self):
        if not self.closed:
            self.close(P.CANCEL)


class Reader(Stream):
    """A process attached to a job it may not have started (burla.attach, Job.result): it reads the outbox from
    the start, and the job's END entry (or the job's own end) says when it has everything."""

    def __init__(self, conn, job_id, view, logs_only=False, reader=True, after=0):
        super().__init__(conn, job_id, view)
        self.logs_only, self.reader = logs_only, reader
        self.learns_batches = True
        self.q = after  # (entries up to this one are not wanted)
        self.view.job_id(job_id.hex())
        self.info = None  # the latest ATTACHED
        self.logs = []
        self.attach(reader, logs_only)

    def attach(self, reader=None, logs_only=None):
        super().attach(self.reader if reader is None else reader, self.logs_only if logs_only is None else logs_only)

    def on_attached(self, header):
        super().on_attached(header)
        self.info = header
        self.return_exceptions = bool((header.get("o") or {}).get("c"))
        if header.get("st") != "running" and self.ended is None:
            self.ended = (header["st"], header.get("e"))
        if self.reader and self.ended is None:
            self.ended = ("read", None)  # a read is over at its ATTACHED

    def leave(self):
        """Stop reading (the job goes on): the socket is closed, so the broker stops sending to it."""
        if not self.closed:
            self.closed = True
            self.conn.active.discard(self.id)
            self.view.close(self.final_state())
            entry = self.conn.monitors.pop(self.sock, None)
            if entry is not None:
                entry[0].close(0)
            self.sock.close(0)

    def runs(self, deadline=None):
        """(first index, values) runs until the job ends (TimeoutError past the deadline, a monotonic time)."""
        __tracebackhide__ = True
        while self.ended is None:
            if deadline is not None and time.monotonic() > deadline:
                raise TimeoutError("the job is still running (job.status() says how far it is)")
            yield from self.receive()
        self.acknowledge(force=True)
        self.closed = True
        self.conn.active.discard(self.id)
        if self.total is None and self.final_state() == "done" and self.received:
            # (the END entry can come before the ATTACHED that says how many inputs: a done job had this many)
            self.total = self.received
            self.view.total_known(self.received)
        self.view.close(self.final_state())
        self.conn.release(self.sock)

    def final_state(self):
        state = self.ended[0] if self.ended else "running"
        return state if state in ("done", "failed", "cancelled") else "running"

def unreachable(address, what="no word from"):
    """Why a job could not start: the broker did not answer. An ipc:// path with nothing there is said plainly
    (a cluster that was stopped, the JupyterLab panel's say); a TCP broker may be down, or refuse the key."""
    if address.startswith("ipc://") and not os.path.exists(address[len("ipc://"):]):
        return (f"no burla broker is listening at {address}: nothing is there (the cluster was stopped, or never "
                "started; in JupyterLab, start it from the burla panel, or unset BURLA_CLUSTER for a cluster of "
                "this process's own)")
    return (f"{what} the burla broker at {address} for {SILENCE_LIMIT:.0f} s (is it running, and is the API key "
            "right?)")


def job_name(function_):
    """What a job is called where it is shown: its function, and in a notebook the cell that started it."""
    if isinstance(function_, (calling.Star, calling.Call)):
        function_ = function_.function
    name = getattr(function_, "__qualname__", None) or type(function_).__qualname__
    from burla.progress import in_kernel

    if in_kernel():
        from IPython import get_ipython

        count = getattr(get_ipython(), "execution_count", None)  # (the next cell's, while a cell runs)
        if count and count > 1:
            name = f"{name} · cell [{count - 1}]"
    return name[:200]


class Pending:
    """A batch sent and not yet complete: which of its n inputs have an outcome."""

    __slots__ = ("n", "size", "left", "seen", "batch")

    def __init__(self, n, size):
        self.n, self.size, self.left, self.seen, self.batch = n, size, n, None, None

    def take(self, offset, values):
        """Record outcomes for inputs offset.. and return the new ones as (offset, values) runs."""
        if self.seen is None and offset == 0 and len(values) == self.n:
            self.left = 0  # the common case: the whole batch at once
            return [(0, values)]
        if self.seen is None:
            self.seen = bytearray(self.n)
        runs, run_start = [], None
        for k in range(len(values)):
            if self.seen[offset + k]:
                if run_start is not None:
                    runs.append((offset + run_start, values[run_start:k]))
                    run_start = None
                continue
            self.seen[offset + k] = 1
            self.left -= 1
            if run_start is None:
                run_start = k
        if run_start is not None:
            runs.append((offset + run_start, values[run_start:]))
        return runs


_FRAME_LINE = re.compile(r'^  File "(.+)", line (\d+), in ')


def with_source_lines(tb):
    """Fill in the source lines a remote worker could not show, from the files here (the user's own code)."""
    lines = tb.splitlines(keepends=True)
    out = []
    for k, line in enumerate(lines):
        out.append(line)
        match = _FRAME_LINE.match(line)
        if match and not (k + 1 < len(lines) and lines[k + 1].startswith("    ")):
            source = linecache.getline(match.group(1), int(match.group(2))).strip()
            if source:
                out.append(f"    {source}\n")
    return "".join(out)


def unloadable_result(index, error):
    exc = errors.RemoteError(type(error).__qualname__, f"the result could not be unpickled here: {error}")
    exc.__cause__ = error
    exc.burla_input_index = index
    exc.add_note(f"[burla] the result of input {index} could not be unpickled in this process")
    return exc


_BURLA_MADE = {"burla.WorkerDiedError": errors.WorkerDiedError, "burla.CallTimeoutError": errors.CallTimeoutError}


def remote_exception(info, frames):
    exc = None
    if frames:
        try:
            exc = serialize.unpack(None, frames[:1])
        except Exception:
            exc = None
    if info["type"] in _BURLA_MADE:  # decided by the broker (a process died): no exception object travels
        exc = _BURLA_MADE[info["type"]](info["msg"])
    elif not isinstance(exc, Exception):
        # Not rebuildable here, or a BaseException such as SystemExit that must not end this process.
        exc = errors.RemoteError(info["type"], info["msg"])
    if info.get("tb"):
        exc.__cause__ = errors.RemoteTraceback(with_source_lines(info["tb"]))
    try:
        exc.burla_input_index = info["i"]
        exc.add_note(f"[burla] raised by the call on input {info['i']}: {info.get('input', '?')}")
    except (AttributeError, TypeError):
        pass
    return exc


def job_settings(func_cpu=1, func_ram=4, func_gpu=None, max_parallelism=None, retries=0, timeout=None,
                 return_exceptions=False, packages=None, image=None, dockerfile=None, grow=False):
    """What a job asks of the cluster, checked: Job's keyword arguments (remote_parallel_map's and Executor's)."""
    for name, value, most in (("func_cpu", func_cpu, 1e6), ("func_ram", func_ram, 1e9)):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value <= most:
            raise ValueError(f"{name} must be a positive, finite number, not {value!r}")
    if func_gpu is not None and not (
            (isinstance(func_gpu, int) and not isinstance(func_gpu, bool) and 0 <= func_gpu <= 1024) or
            (isinstance(func_gpu, str) and re.fullmatch(r"[A-Za-z0-9._-]{1,64}(:[1-9][0-9]{0,3})?", func_gpu))):
        raise ValueError(f"func_gpu must be None, a count or a GPU type like 'A100' or 'A100:2', not {func_gpu!r}")
    if max_parallelism is not None and (not isinstance(max_parallelism, int) or isinstance(max_parallelism, bool)
                                        or not 1 <= max_parallelism < 2 ** 31):
        raise ValueError(f"max_parallelism must be a positive integer or None, not {max_parallelism!r}")
    if isinstance(retries, bool) or not isinstance(retries, int) or not 0 <= retries <= 1000:
        raise ValueError(f"retries must be a non-negative integer, not {retries!r}")
    if timeout is not None and (isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or
                                not 0 < timeout <= 1e9):
        raise ValueError(f"timeout must be a positive number of seconds or None, not {timeout!r}")
    if not isinstance(grow, bool):
        raise ValueError(f"grow must be True or False, not {grow!r}")
    options = {k: v for k, v in (("r", retries), ("t", timeout), ("c", int(bool(return_exceptions))),
                                 ("g", int(grow))) if v}
    if image is not None or dockerfile is not None:
        if packages is not None:
            raise ValueError("an image brings its own packages: give packages= or image=/dockerfile=, not both")
        environment = env.image(image, dockerfile)
    else:
        environment = env.for_job(packages)
    return {"cpu": func_cpu, "ram": func_ram, "gpu": func_gpu, "parallelism": max_parallelism, "options": options,
            "environment": environment}


def remote_parallel_map(function_, inputs, *, func_cpu=1, func_ram=4, func_gpu=None, max_parallelism=None,
                        generator=False, spinner=True, retries=0, timeout=None, return_exceptions=False,
                        packages=None, image=None, dockerfile=None, api_key=None, cluster=None, parallelism=None,
                        verbose=None, detach=False, grow=False):
    """Call function_(x) for every x in inputs, in parallel on the cluster's workers.

    Returns the results as a list in input order, or with generator=True an iterator yielding them as they
    complete. stdout/stderr of the calls stream here line by line. An exception in a call is re-raised here with
    its remote traceback and the failing input's index as exc.burla_input_index; the rest of the job stops.

    func_cpu / func_ram (GB) / func_gpu ("A100", "A100:2" or a count): what one call needs; calls only run
    where that fits. max_parallelism caps concurrent calls (parallelism=-1 is the older spelling of no cap).
    retries: run a call that raised up to this many more times. timeout: seconds a call may run before it is
    stopped and counts as failed (burla.CallTimeoutError). return_exceptions: failed inputs come back as their
    exception, in place, and the job goes on.
    packages: by default the calls run in a copy of this Python environment (every installed package at its
    version; workers build it once and cache it). A list of requirements ("pandas>=2", …) runs them with exactly
    those instead, resolved by pip-compile; [] runs them in each worker's own environment.
    image / dockerfile: run the calls in this container image (or one built from this Dockerfile) on workers with
    a container runtime.
    cluster: "tcp://HOST:PORT", "local", or None for $BURLA_CLUSTER / ~/.burla/config.toml / the embedded cluster.
    grow: on a cluster with an autoscaler (`burla cluster up --max-workers`), boot enough worker VMs for this job
    now (up to the maximum) instead of only once its work has waited; the progress line says how many it waits for.
    detach: upload every input to the cluster's head (its disk) and return a burla.Job at once; the job runs to
    its end with no client, and burla.attach(job.id) picks it up from any process with the same API key.
    A job that is not detached survives outages too: its client reconnects for up to $BURLA_JOB_LEASE seconds
    (10 minutes) and gets every result exactly once.
    """
    __tracebackhide__ = True
    if not callable(function_):
        raise TypeError(f"function_ must be callable, not {type(function_).__name__}")
    try:
        iter(inputs)
    except TypeError:
        raise TypeError(f"inputs must be an iterable, not {type(inputs).__name__}") from None
    if parallelism is not None:
        if max_parallelism is not None and parallelism != max_parallelism:
            raise ValueError("give max_parallelism or parallelism, not both")
        max_parallelism = None if parallelism == -1 else parallelism
    if verbose is not None:
        spinner = verbose
    settings = job_settings(func_cpu, func_ram, func_gpu, max_parallelism, retries, timeout, return_exceptions,
                            packages, image, dockerfile, grow)
    if calling.wants_unpacking(function_):  # f(a, b) over [(1, 2), ...]: each tuple is its arguments
        function_ = calling.Star(function_)

    if detach:
        if generator:
            raise ValueError("detach=True returns a burla.Job (its as_completed() is the generator): give one of them")
        conn = connection(cluster, api_key)
        if conn.local:
            warnings.warn("detach=True on the embedded cluster: it stops when this process ends, and its jobs with "
                          "it; point cluster= at a burla broker for jobs that outlive this process", stacklevel=2)
        job = Job(conn, function_, inputs, spinner=spinner, detached=True, **settings)
        job.upload()
        from burla.job import Job as Handle

        return Handle(job.id.hex(), conn=conn)
    job = Job(connection(cluster, api_key), function_, inputs, spinner=spinner, **settings)
    if generator:
        job.fill()  # work starts now, not at the first next()
        results = generate(job.batches())
        weakref.finalize(results, job.abandon)  # a generator dropped unfinished (or never started) cancels its job
        return results
    results = []
    try:
        for start, values in job.batches():
            if start == len(results):  # (in order, as most are)
                results += values
                continue
            end = start + len(values)
            if len(results) < end:
                results.extend([None] * (end - len(results)))
            results[start:end] = values
    except Exception as e:
        raise errors.shown(e)
    return results


def generate(batches):
    """The values of (start, values) runs, one by one; a remote error is raised from here, not from inside burla."""
    __tracebackhide__ = True
    try:
        for _, values in batches:
            yield from values
    except Exception as e:
        raise errors.shown(e)


def request(conn, command, header, timeout=None):
    """One question to the broker on a socket of its own; the answer's header. timeout: seconds, by default
    $BURLA_REQUEST_TIMEOUT or 5 (tests of a missing broker need not wait that long)."""
    if timeout is None:
        timeout = float(os.environ.get("BURLA_REQUEST_TIMEOUT", "5"))
    sock = conn.new_socket()
    try:
        P.send(sock, command, header)
        deadline = time.monotonic() + timeout
        while sock.poll(max(0.0, deadline - time.monotonic()) * 1000):
            answer, h, _ = P.recv(sock)
            if answer == command or answer == P.REJECTED:
                return answer, h
        if conn.refused:
            raise errors.ClusterConnectionError(conn.refused)
        raise errors.ClusterConnectionError(f"no answer from the burla broker at {conn.address} within {timeout:g} s")
    finally:
        sock.close(0)


def cluster_state(address, timeout=3.0, api_key=None, capacity=None):
    """The broker's view of its workers and the asker's jobs (what `burla status` prints). capacity: a CAPACITY
    header to send first (the cluster's autoscaler saying what it does)."""
    ctx = zmq.Context.instance()
    sock = P.socket(ctx, zmq.DEALER, credential=config.api_key(api_key) if address.startswith("tcp://") else None,
                    role=security.CLIENT)
    sock.connect(address)
    try:
        if capacity is not None:
            P.send(sock, P.CAPACITY, capacity)
        P.send(sock, P.STATUS, {})
        if not sock.poll(timeout * 1000):
            raise TimeoutError(f"no answer from a burla broker at {address} within {timeout:g} s")
        return P.recv(sock)[1]
    finally:
        sock.close(0)
