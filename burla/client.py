"""remote_parallel_map: the client side of a job.

The function is pickled once per job and sent with the submission. Inputs are pulled from the user's iterable
lazily, in batches of consecutive indices, while the number of batches (and bytes) not yet answered stays under a
window: that window is the client's credit, so memory stays flat whatever the number of inputs. Batch size adapts:
one input per batch until the first results report how long a call takes, then as many as fill about
TARGET_BATCH_SECONDS of work, and never so many that the last batches leave slots idle.
"""

import itertools
import linecache
import math
import os
import re
import threading
import time
import weakref

import zmq

from burla import config, env, errors, protocol as P, security, serialize
from burla.progress import create as create_view

TARGET_BATCH_SECONDS = 0.1
SPLIT_MIN_SECONDS = 0.002  # work smaller than this is not worth a batch of its own (a round trip costs ~0.3 ms)
SILENCE_LIMIT = P.HEARTBEAT_INTERVAL * (P.HEARTBEAT_LIVENESS + 1)  # a broker this quiet is gone

_connections = {}
_connections_lock = threading.Lock()


class Connection:
    """One per process and cluster: a ZeroMQ context, a pool of job sockets, and a heartbeat thread."""

    def __init__(self, address, api_key=None):
        self.address = address
        self.api_key = api_key
        self.ctx = zmq.Context()
        self.client_id = os.urandom(8)
        self.compress = not P.is_local(address)
        self.idle = []
        self.refused = None  # why the broker refused our credentials (or speaks another version), once it has
        self.heard = time.monotonic()  # the broker's last answer to our heartbeats
        self.answers, self.live = 0, set()  # answers so far; the job ids the latest one says the broker has
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

    def heartbeat(self):
        """Say we are alive, and hear the broker answer (on a connection of its own, which no large message holds
        up, so a job is not judged abandoned while a big result is arriving). On a CURVE connection also watch the
        handshake, so that a refused API key is reported at once (self.refused) instead of as a silent broker."""
        sock = self.new_socket()
        monitor = sock.get_monitor_socket(zmq.EVENT_HANDSHAKE_FAILED_AUTH) if self.api_key else None
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
                while sock.poll(0):
                    try:
                        _, header, _ = P.recv(sock)
                        self.heard = time.monotonic()
                        self.live = set(header.get("jobs") or ())
                        self.answers += 1
                    except P.VersionMismatch as e:
                        self.refused = str(e)
                    except P.ProtocolError:
                        pass
            if monitor is not None and monitor in events:
                monitor.recv_multipart()
                self.refused = f"the burla broker at {self.address} refused this API key"


def connection(cluster=None, api_key=None):
    address = config.cluster_address(cluster)
    if address == "local":
        from burla import local

        address, api_key = local.cluster().address, None
    else:
        api_key = config.api_key(api_key) if address.startswith("tcp://") else None
        if api_key:
            security.parse(api_key, security.CLIENT)  # a malformed key fails here, clearly
    key = (os.getpid(), address, api_key)
    with _connections_lock:
        if key not in _connections:
            _connections[key] = Connection(address, api_key)
        return _connections[key]


class Job:
    def __init__(self, conn, function_, inputs, cpu, ram, gpu, parallelism, spinner, options, environment=None):
        try:
            function_bytes, digest = serialize.dumps_function(function_)
        except Exception as e:
            raise TypeError(f"the function {getattr(function_, '__qualname__', function_)!r} could not be "
                            f"pickled: {e}") from e
        self.conn = conn
        self.id = os.urandom(8)
        self.inputs = iter(inputs)
        self.total = len(inputs) if hasattr(inputs, "__len__") else None
        self.sent = 0  # inputs sent so far; also the index of the next one
        self.exhausted = False
        self.outstanding = {}  # first index of a batch -> Pending, until every input of it has an outcome
        self.outstanding_bytes = 0
        self.slots = 0
        self.per_call = None  # seconds one call takes, as measured by the workers
        self.item_bytes = None
        self.result_bytes = None  # bytes of one result: batches are bounded by the size of their results too
        self.view = create_view(spinner, self.total)  # what the user sees: terminal output, or a notebook widget
        self.return_exceptions = bool(options.get("c"))
        self.sock = conn.socket()
        self.heard = time.monotonic()
        payload = serialize.split(function_bytes)
        header = {"j": self.id, "c": conn.client_id, "d": digest, "fn": len(payload), "n": self.total, "cpu": cpu,
                  "ram": ram, "gpu": gpu, "par": parallelism, "o": options}
        parent = os.environ.get("BURLA_PARENT", "")  # a call of another job (nested): its job and slot
        if re.fullmatch(r"[0-9a-f]{16}:\S+", parent):
            header["pa"] = {"j": bytes.fromhex(parent[:16]), "s": parent[17:]}
        if environment is not None:
            header["env"] = environment.header()
            if environment.archive:
                payload += serialize.split(environment.archive)
        self.closed = False
        self.accepted = None  # how many heartbeat answers the connection had when the job was accepted
        self.send(P.SUBMIT, header, payload)

    def send(self, command, header, payload=()):
        try:
            P.send(self.sock, command, header, payload)
        except zmq.Again:
            self.closed = True  # this socket is stuck: close it rather than pool it
            self.sock.close(0)
            raise errors.ClusterConnectionError(
                f"could not reach the burla broker at {self.conn.address} for {SILENCE_LIMIT:.0f} s "
                "(is it running, and is the API key right?)") from None

    # ---------------------------------------------------------------- sending
    def batch_size(self):
        if self.per_call is None:
            return 1  # until a result says how long a call takes, spread calls one per slot
        per_call = max(self.per_call, 1e-8)
        n = TARGET_BATCH_SECONDS / per_call
        if self.total is not None:  # leave several batches per slot for the end, so no slot idles long
            n = min(n, max(math.ceil((self.total - self.sent) / (2 * max(self.slots, 1))),
                           SPLIT_MIN_SECONDS / per_call))
        if self.item_bytes:
            n = min(n, P.MAX_BATCH_BYTES / self.item_bytes)
        if self.result_bytes:
            n = min(n, P.MAX_BATCH_BYTES / self.result_bytes)
        return int(min(max(n, 1), P.MAX_BATCH_ITEMS))

    def fill(self):
        window = P.window(self.slots)  # the broker holds us to it
        while (not self.exhausted and len(self.outstanding) < window
               and (self.outstanding_bytes < P.MAX_OUTSTANDING_BYTES or not self.outstanding)):
            items = list(itertools.islice(self.inputs, self.batch_size()))
            if not items:
                self.exhausted = True
                self.view.total_known(self.sent)
                break
            self.send_batch(items)

    def send_batch(self, items):
        try:
            flags, frames = serialize.pack_items(items, self.conn.compress)
        except Exception:
            for k, item in enumerate(items):
                try:
                    serialize.pack_items([item])
                except Exception as e:
                    raise TypeError(f"input {self.sent + k} could not be pickled ({type(item).__name__}): {e}") \
                        from e
            raise
        size = sum(len(f) for f in frames)
        self.send(P.BATCH, {"j": self.id, "i": self.sent, "n": len(items), "z": flags}, frames)
        self.outstanding[self.sent] = Pending(len(items), size)
        self.outstanding_bytes += size
        item = size / len(items)
        self.item_bytes = item if self.item_bytes is None else 0.5 * (self.item_bytes + item)
        self.sent += len(items)

    # ---------------------------------------------------------------- receiving
    def batches(self):
        """Yield (first index, results) for each batch as it completes; cancel the job if stopped early."""
        __tracebackhide__ = True  # IPython and pytest leave burla's own frames out of a remote error's traceback
        state = "cancelled"  # unless it ends otherwise: stopped by Ctrl-C, a kernel interrupt or the caller
        try:
            self.fill()
            while self.outstanding or not self.exhausted:
                if not self.sock.poll(250):
                    self.view.tick()
                    if self.conn.refused:
                        raise errors.ClusterConnectionError(self.conn.refused)
                    if self.accepted is not None and self.conn.answers >= self.accepted + 2 and \
                            self.id not in self.conn.live:  # (the first answer after ACCEPTED may predate it)
                        raise errors.ClusterConnectionError(
                            f"the burla broker at {self.conn.address} no longer has this job (it restarted, or "
                            "lost this connection)")
                    if time.monotonic() - max(self.heard, self.conn.heard) > SILENCE_LIMIT:
                        raise errors.ClusterConnectionError(
                            f"no word from the burla broker at {self.conn.address} for {SILENCE_LIMIT:.0f} s "
                            "(is it running, and is the API key right?)")
                    continue
                while True:
                    try:
                        command, header, payload = P.recv(self.sock)
                    except zmq.Again:
                        break
                    except P.VersionMismatch as e:
                        raise errors.ClusterConnectionError(str(e)) from None
                    self.heard = time.monotonic()
                    if header.get("j") != self.id:
                        continue  # left over from an earlier job on this socket
                    for run in self.handle(command, header, payload):
                        yield run
                    if not self.sock.poll(0):
                        break
                self.fill()
            self.close(P.END, "done")
        except Exception:
            state = "failed"
            raise
        finally:
            if not self.closed:
                self.close(P.CANCEL, state)

    def handle(self, command, header, payload):
        __tracebackhide__ = True
        if command == P.RESULT:
            return self.on_result(header, payload)
        if command == P.LOG:
            if header.get("x"):
                self.view.lines(header.get("w"), [[-1, 2, f"burla: {header['x']} log lines were dropped: this "
                                                          "program read them too slowly"]])
            self.view.lines(header.get("w"), header["l"])
        elif command in (P.ACCEPTED, P.HEARTBEAT):
            self.slots = header.get("s", self.slots)
            if command == P.ACCEPTED:
                self.accepted = self.conn.answers
        elif command == P.ENV:
            self.view.env(header)
        elif command == P.REJECTED:
            if header.get("t") == "env":
                raise errors.EnvironmentBuildError(header["e"])
            if header.get("t") == "cancelled":
                raise errors.JobCancelledError(header["e"])
            if header.get("t") == "credit":
                raise errors.BurlaError(header["e"])
            raise errors.NoCompatibleWorkerError(header["e"])
        return ()

    def on_result(self, header, payload):
        """The outcomes in a RESULT as (first index, values) runs; raises a failed call's exception unless the job
        returns exceptions in place. Outcomes seen before (a batch re-run after its worker was presumed dead) are
        dropped, so every input ends in exactly one outcome."""
        __tracebackhide__ = True
        start = header["i"]
        pending = self.outstanding.get(start)
        if pending is None:
            return []
        if header.get("t") and header.get("k"):
            call = header["t"] / header["k"]
            self.per_call = call if self.per_call is None else 0.5 * (self.per_call + call)
        flags = header.get("z") or []
        offset = header.get("o", 0)
        failures = header.get("e") or []
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
            if not self.return_exceptions:
                self.view.advance(0, header.get("w"), 1)
                raise exceptions[0]
            values = values + exceptions
            if header.get("all"):  # one error for every input of the batch from the offset on
                values += [exceptions[0]] * (pending.n - offset - len(values))
        runs = pending.take(offset, values)
        if pending.left == 0:
            del self.outstanding[start]
            self.outstanding_bytes -= pending.size
        self.view.advance(sum(len(v) for _, v in runs), header.get("w"), len(failures))
        return [(start + k, v) for k, v in runs]

    def abandon(self):
        if not self.closed:
            self.close(P.CANCEL)

    def close(self, command, state="cancelled"):
        self.closed = True
        self.view.close(state)
        try:
            P.send(self.sock, command, {"j": self.id}, flags=zmq.NOBLOCK)
        except zmq.ZMQError:
            self.sock.close(0)
            return
        self.conn.release(self.sock)


class Pending:
    """A batch sent and not yet complete: which of its n inputs have an outcome."""

    __slots__ = ("n", "size", "left", "seen")

    def __init__(self, n, size):
        self.n, self.size, self.left, self.seen = n, size, n, None

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


def remote_parallel_map(function_, inputs, *, func_cpu=1, func_ram=4, func_gpu=None, max_parallelism=None,
                        generator=False, spinner=True, retries=0, timeout=None, return_exceptions=False,
                        packages=None, image=None, dockerfile=None, api_key=None, cluster=None, parallelism=None,
                        verbose=None):
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
    """
    __tracebackhide__ = True
    if not callable(function_):
        raise TypeError(f"function_ must be callable, not {type(function_).__name__}")
    try:
        iter(inputs)
    except TypeError:
        raise TypeError(f"inputs must be an iterable, not {type(inputs).__name__}") from None
    for name, value, most in (("func_cpu", func_cpu, 1e6), ("func_ram", func_ram, 1e9)):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value <= most:
            raise ValueError(f"{name} must be a positive, finite number, not {value!r}")
    if func_gpu is not None and not (
            (isinstance(func_gpu, int) and not isinstance(func_gpu, bool) and 0 <= func_gpu <= 1024) or
            (isinstance(func_gpu, str) and re.fullmatch(r"[A-Za-z0-9._-]{1,64}(:[1-9][0-9]{0,3})?", func_gpu))):
        raise ValueError(f"func_gpu must be None, a count or a GPU type like 'A100' or 'A100:2', not {func_gpu!r}")
    if parallelism is not None:
        if max_parallelism is not None and parallelism != max_parallelism:
            raise ValueError("give max_parallelism or parallelism, not both")
        max_parallelism = None if parallelism == -1 else parallelism
    if max_parallelism is not None and (not isinstance(max_parallelism, int) or isinstance(max_parallelism, bool)
                                        or not 1 <= max_parallelism < 2 ** 31):
        raise ValueError(f"max_parallelism must be a positive integer or None, not {max_parallelism!r}")
    if verbose is not None:
        spinner = verbose
    if isinstance(retries, bool) or not isinstance(retries, int) or not 0 <= retries <= 1000:
        raise ValueError(f"retries must be a non-negative integer, not {retries!r}")
    if timeout is not None and (isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or
                                not 0 < timeout <= 1e9):
        raise ValueError(f"timeout must be a positive number of seconds or None, not {timeout!r}")
    options = {k: v for k, v in (("r", retries), ("t", timeout), ("c", int(bool(return_exceptions)))) if v}
    if image is not None or dockerfile is not None:
        if packages is not None:
            raise ValueError("an image brings its own packages: give packages= or image=/dockerfile=, not both")
        environment = env.image(image, dockerfile)
    else:
        environment = env.for_job(packages)

    job = Job(connection(cluster, api_key), function_, inputs, func_cpu, func_ram, func_gpu, max_parallelism, spinner,
              options, environment)
    if generator:
        job.fill()  # work starts now, not at the first next()
        results = (value for _, values in job.batches() for value in values)
        weakref.finalize(results, job.abandon)  # a generator dropped unfinished (or never started) cancels its job
        return results
    results = []
    for start, values in job.batches():
        end = start + len(values)
        if len(results) < end:
            results.extend([None] * (end - len(results)))
        results[start:end] = values
    return results


def cluster_state(address, timeout=3.0, api_key=None):
    """The broker's view of its workers and the asker's jobs (what `burla status` prints)."""
    ctx = zmq.Context.instance()
    sock = P.socket(ctx, zmq.DEALER, credential=config.api_key(api_key) if address.startswith("tcp://") else None,
                    role=security.CLIENT)
    sock.connect(address)
    try:
        P.send(sock, P.STATUS, {})
        if not sock.poll(timeout * 1000):
            raise TimeoutError(f"no answer from a burla broker at {address} within {timeout:g} s")
        return P.recv(sock)[1]
    finally:
        sock.close(0)
