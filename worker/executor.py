"""An executor: one slot of a worker, a process that runs the user's function on batches of inputs.

It talks to the broker directly (a DEALER socket of its own) so results take no extra hop through the worker.
stdout and stderr of the calls are captured line by line (output.py), tagged with the input index, and streamed: a
background thread sends lines while a long call runs, and the lines left at the end of a batch go out just before
its result on the same socket, so a client always sees a call's output before its result. A call that is timed
out or cancelled takes the processes it started with it (processes.py).
"""

import collections
import os
import reprlib
import signal
import sys
import threading
import time
import traceback

import zmq

from burla import calling
from burla import protocol as P
from burla import security
from burla import serialize
from burla.worker.output import Capture, FdCapture, LogSink, clean
from burla.worker.processes import die_with_parent, end_processes, lead_process_group

TIMEOUT_GRACE = 1.0  # seconds past a call's timeout before its worker kills the executor (SIGALRM came first)
LOG_LINGER = 0.02  # seconds a first pending line waits for company before it is sent
HANDSHAKE_WAIT = 10.0  # seconds a CURVE handshake with the broker may take before the executor dials again
HANDSHAKE_EVENTS = (zmq.EVENT_HANDSHAKE_SUCCEEDED | zmq.EVENT_HANDSHAKE_FAILED_AUTH |
                    zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL | zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL)
_repr = reprlib.Repr()
_repr.maxstring = _repr.maxother = 200


class Cancelled(BaseException):
    """Raised inside a running call when its job is cancelled (the worker signals SIGUSR1)."""


class CallCancelled(BaseException):
    """Raised inside a running call when that call alone is cancelled (a burla.Executor future's cancel()); the
    batch goes on. Its outcome is dropped by the client."""


class Executor:
    def __init__(self, broker, worker_id, slot, control_fd=None, token=None, where_fd=None, env=None):
        self.broker = broker
        self.env = env  # the key of the environment this process runs in (see burla.env)
        self.worker_id = worker_id
        self.name = P.slot_name(worker_id, slot)
        self.control_fd = control_fd  # from the worker: b"R" = say READY again; end of file = exit
        self.token = token
        self.where_fd = where_fd  # see P.WHERE
        # digest -> the function, or its pickle's frames (a list) until a task first runs it; kept as the broker
        # keeps Slot.functions (P.cache_function), which counts a function as this slot's from the TASK that carried it
        self.functions = collections.OrderedDict()
        self.tasks = collections.deque()
        self.sink = LogSink()
        self.job = None
        self.compress = not P.is_local(broker)
        self.lock = threading.Lock()  # the socket is shared with the log thread; all use goes through it
        self.calling = False  # in a user call: only then may SIGUSR1 raise Cancelled
        self.started = 0.0  # perf_counter() when the calls now running began (see end_processes)
        self.cancelled = collections.deque(maxlen=64)  # ids of jobs cancelled lately
        self.call_cancels = set()  # (job, input index) of calls cancelled one by one
        self.control_buffer, self.reready = b"", False
        self.worker_pidfd = None  # in a container: readable once the worker has exited
        self.said_redial = False
        # The GPUs the worker was started with visible (None: all of the host's); TASK's gpu indexes into them.
        self.host_gpus = os.environ.get("CUDA_VISIBLE_DEVICES")

    def run(self):
        self.ctx = zmq.Context()
        self.sock = self.handshakes = None
        self.dial()
        # A call that calls remote_parallel_map reaches this cluster (as the job's owner: see TASK's ak)
        os.environ["BURLA_CLUSTER"] = self.broker
        self.capture_output()
        if self.control_fd is not None:
            os.set_blocking(self.control_fd, False)
        signal.signal(signal.SIGUSR1, self.on_cancel_signal)
        signal.signal(signal.SIGALRM, on_timeout)
        threading.Thread(target=self.log_loop, daemon=True, name="burla-logs").start()
        self.ready()
        while True:
            if not self.tasks:
                if self.poller is None:  # (again after each dial)
                    self.poller = zmq.Poller()
                    for fd in (self.sock, self.handshakes, self.control_fd, self.worker_pidfd):
                        if fd is not None:
                            self.poller.register(fd, zmq.POLLIN)
                events = dict(self.poller.poll(1000))
                if self.control_fd in events and not self.read_control():
                    return
                if self.worker_pidfd in events:
                    return  # the worker is gone
                if self.handshakes is not None and (self.handshakes in events or not self.shaken):
                    with self.lock:  # (send() looks at the monitor too, from the log thread)
                        again = self.handshake()
                    if again:
                        time.sleep(0.05)
                        with self.lock:
                            self.dial()
                            self.ready_unlocked()
            if self.reready:
                self.reready = False
                self.tasks.clear()
                self.ready()
            with self.lock:
                while P.readable(self.sock):
                    self.handle(*P.recv(self.sock))
            if self.tasks:
                self.run_task(*self.tasks.popleft())

    def dial(self):
        """(Re)connect with the slot's key. A broker that restarted learns the key again from the worker, maybe
        after we dialled: ZeroMQ retries no failed handshake, so we watch them (see handshake())."""
        for old in (self.sock, self.handshakes):
            if old is not None:
                old.close(0)
        self.sock, self.poller = P.socket(self.ctx, zmq.DEALER, credential=self.token, role=security.SLOT), None
        self.handshakes = P.monitor(self.sock, HANDSHAKE_EVENTS) if self.token else None
        self.dialled, self.shaken, self.failed = time.monotonic(), False, None
        self.sock.connect(self.broker)

    def handshake(self):
        """Whether to dial again: the CURVE handshake failed, or has not succeeded within HANDSHAKE_WAIT. ZeroMQ
        does not retry a handshake that failed, so a socket left like that would never carry our READY. (A refused
        key is the usual case: we dialled before the worker told the broker our key.)"""
        self.watch()
        failed = self.failed
        if failed is None and not self.shaken and time.monotonic() - self.dialled > HANDSHAKE_WAIT:
            failed = "timeout"
        if failed not in (None, zmq.EVENT_HANDSHAKE_FAILED_AUTH) and self.sink.fds is not None and \
                not self.said_redial:  # (once: a broker that is down would make it every HANDSHAKE_WAIT)
            self.said_redial = True
            why = "no answer" if failed == "timeout" else zmq.Event(failed).name
            self.sink.fds.complain(f"the handshake with the broker at {self.broker} failed ({why}); dialling again")
        return failed is not None

    def watch(self):
        """Read the handshake events so far (the lock held): self.shaken, and self.failed if the last one failed."""
        while self.handshakes.poll(0):
            event = P.monitor_event(self.handshakes)
            self.shaken = event == zmq.EVENT_HANDSHAKE_SUCCEEDED
            self.failed = None if self.shaken else event

    def on_cancel_signal(self, *_):
        self.read_control()
        # only ever a call of the cancelled job: never our own work between calls, never another job's call
        if self.calling and self.job in self.cancelled:
            raise Cancelled("the job was cancelled")
        if self.calling and (self.job, self.sink.start + len(self.sink.done)) in self.call_cancels:
            raise CallCancelled("the call was cancelled")

    def read_control(self):
        """Read what the worker wrote: b"R" = say READY again; b"C" + job id = that job is cancelled.
        False at end of file (the worker is gone)."""
        if self.control_fd is None:
            return True
        try:
            data = os.read(self.control_fd, 4096)
        except BlockingIOError:
            return True
        if not data:
            return False
        buf = self.control_buffer + data
        while buf:
            if buf[:1] == b"C":
                if len(buf) < 9:
                    break
                self.cancelled.append(buf[1:9])
                buf = buf[9:]
            elif buf[:1] == b"I":  # one call: job id, input index
                if len(buf) < 17:
                    break
                self.cancel_call(buf[1:9], int.from_bytes(buf[9:17], "little", signed=True))
                buf = buf[17:]
            else:
                self.reready = self.reready or buf[:1] == b"R"
                buf = buf[1:]
        self.control_buffer = buf
        return True

    def cancel_call(self, job, index):
        if len(self.call_cancels) > 100_000:  # (kept for batches still to run; a bound, not a ledger)
            self.call_cancels.clear()
        self.call_cancels.add((job, index))

    def ready(self):
        with self.lock:
            self.ready_unlocked()

    def ready_unlocked(self):
        self.send(P.READY, {"w": self.worker_id, "s": self.name, "k": P.PREFETCH, "pid": os.getpid(), "env": self.env})

    def send(self, command, header, frames=()):
        """Every send of ours (the socket lock held). A full queue waits, as a blocking send would: that is the
        broker holding back a flood. But once a handshake is refused (we dialled before the worker announced our
        key, or a broker that restarted does not know it yet) ZeroMQ has no queue left and dials no more, and a
        blocking send would wait forever. Then the message is dropped: the refusal makes us dial again and say
        READY, and the broker runs again what we held."""
        while True:
            try:
                P.send(self.sock, command, header, frames, flags=zmq.NOBLOCK)
                return
            except zmq.Again:
                if self.sock.poll(50, zmq.POLLOUT) or self.handshakes is None:
                    continue
                self.watch()
                if self.failed is not None:
                    return


    def handle(self, command, header, payload):
        if command == P.TASK:
            self.tasks.append((header, self.keep_function(header, payload)))
        elif command == P.CANCEL:
            self.cancelled.append(header["j"])
            self.tasks = collections.deque(t for t in self.tasks if t[0]["j"] != header["j"])
        elif command == P.RECONNECT:
            self.tasks.clear()
            self.ready_unlocked()

    def keep_function(self, header, payload):
        """Cache a TASK's function as it arrives, not when the task runs: the task may never run (its job cancelled
        meanwhile), and the broker sends the function to this slot only once. The task's inputs."""
        digest, frames = header["d"], header.pop("f", 0)
        if frames:
            if header.get("ak"):  # nested calls run as this job's owner; this executor serves no other
                from burla import config

                config.executor_api_key = header["ak"]  # (not in os.environ: children's environments are public)
            P.cache_function(self.functions, digest, list(payload[:frames]))
            return payload[frames:]
        if digest in self.functions:
            self.functions.move_to_end(digest)
        return payload

    def function(self, digest):
        function = self.functions.get(digest)
        if function is None:
            raise RuntimeError(f"this executor was never sent the job's function ({digest.hex()[:16]})")
        if type(function) is list:  # (a function is never a plain list: see keep_function)
            function = self.functions[digest] = serialize.loads_function(serialize.join(function))
        return function

    def run_task(self, header, payload):
        """Run one batch. Results go back in one RESULT, or in several when calls fail and the job goes on, or one
        per input in isolation mode (a re-run after this batch crashed an executor: the broker learns which
        input was running when a process dies)."""
        job, start = header["j"], header["i"]
        if job in self.cancelled:  # told by signal before its CANCEL message came: free the slot, run nothing
            return self.reply({"j": job, "i": start, "o": 0, "k": 0, "f": 1}, [], [])
        options, isolate = header.get("o") or {}, header.get("x")
        self.job = job
        if "gpu" in header:  # (only a worker with GPUs says: elsewhere the variable is left as it is)
            os.environ["CUDA_DEVICE_ORDER"] = os.environ.get("CUDA_DEVICE_ORDER") or "PCI_BUS_ID"  # nvidia-smi's
            os.environ["CUDA_VISIBLE_DEVICES"] = visible_devices(header["gpu"], self.host_gpus)
        sys.stdout, sys.stderr = self.fresh_streams()  # again: a previous call may have replaced or closed them
        try:
            function = self.function(header["d"])
            inputs = serialize.unpack_items(header.get("z"), payload)
            parent = f"{job.hex()}:{self.name}"  # (nested jobs name their caller)
            if os.environ.get("BURLA_PARENT") != parent:
                os.environ["BURLA_PARENT"] = parent
            if serialize.per_item(header.get("z")) and any(type(x) is serialize.Unloadable for x in inputs):
                function = failing_unloadable(function)  # such an input fails alone, with its own index
        except BaseException as e:
            first = isolate or 0
            info = error_info(e, start + first, "<not loaded>", "loading the function or inputs")
            return self.reply({"j": job, "i": start, "o": first, "k": 0, "e": [info], "all": 1, "f": 1}, [], [e])
        if options.get("k"):  # calls that may be cancelled one by one: each is checked before it begins
            for offset in header.get("cc") or ():
                self.cancel_call(job, start + offset)
            function = self.skipping_cancelled(function, job)
        if isolate is not None:
            return self.run_isolated(job, start, function, inputs, isolate, set(header.get("sk") or ()), options)
        one_by_one = options.get("r") or options.get("t")

        def calls(done, k):
            if one_by_one:  # retries or a timeout: each call on its own, its place in the WHERE record
                for value in inputs[k:] if k else inputs:
                    self.where(job, start, k + len(done), call_budget(options))
                    done.append(self.call(function, value, options))
            else:
                # extend() keeps what map() produced before an exception: len(done) names the failing input
                done.extend(map(function, inputs[k:] if k else inputs))

        k = 0
        while k < len(inputs):
            done, error, elapsed, stop = self.calls(job, start, k, calls, options, one_by_one)
            end = k + len(done) + (error is not None)
            self.send_result(job, start, k, done, error, inputs, elapsed, stop or end >= len(inputs))
            k = end
            if stop:
                break

    def skipping_cancelled(self, function, job):
        sink, cancels = self.sink, self.call_cancels

        def call(value):
            if cancels and (job, sink.start + len(sink.done)) in cancels:
                raise CallCancelled("the call was cancelled")
            return function(value)
        return call

    def run_isolated(self, job, start, function, inputs, first, skip, options):
        """After this batch crashed an executor: one input at a time, each announced in the WHERE record and
        answered in a RESULT of its own, leaving out the inputs that already failed by crashing."""
        todo = [k for k in range(first, len(inputs)) if k not in skip]
        if not todo:
            return self.reply({"j": job, "i": start, "o": len(inputs), "k": 0, "f": 1}, [], [])

        def call(done, k):
            self.where(job, start, k, call_budget(options))
            done.append(self.call(function, inputs[k], options))

        for k in todo:
            done, error, elapsed, stop = self.calls(job, start, k, call, options, tracked=True)
            self.send_result(job, start, k, done, error, inputs, elapsed, stop or k == todo[-1])
            if stop:
                return

    def calls(self, job, start, k, run, options, tracked):
        """Run run(done, k), which appends the results of inputs k, k+1, ... to done, with their output captured
        and SIGUSR1 allowed to cancel them. Returns (done, the exception that stopped it, seconds, stop the batch?)."""
        done, error = [], None
        self.sink.start, self.sink.done = start + k, done
        t0 = self.started = time.perf_counter()
        self.calling = True
        try:
            run(done, k)
        except BaseException as e:
            error = e
        finally:
            self.calling = False
            if tracked:
                self.where(job, start, -1)
        elapsed = time.perf_counter() - t0
        if error is not None and stopped_by_us(error):
            end_processes(t0)  # (where is -1 by now: the worker does not kill this process meanwhile)
        self.sink.finish_lines()
        stop = error is not None and (isinstance(error, Cancelled) or not options.get("c"))
        return done, error, elapsed, stop

    def where(self, job, start, offset, timeout=None):
        if self.where_fd is not None:
            deadline = time.monotonic() + timeout + TIMEOUT_GRACE if timeout else 0.0
            os.pwrite(self.where_fd, P.WHERE.pack(job, start, offset, deadline), 0)

    def call(self, function, value, options):
        """One call with the job's retries and per-call timeout."""
        timeout, retries = options.get("t"), int(options.get("r") or 0)
        for attempt in range(retries + 1):
            if timeout:
                signal.setitimer(signal.ITIMER_REAL, timeout)
            try:
                return function(value)
            except (Cancelled, CallCancelled):
                raise
            except BaseException as e:
                if attempt == retries:
                    raise
                if stopped_by_us(e):  # a timed-out attempt's processes do not run on beside the next one
                    end_processes(self.started)
            finally:
                if timeout:
                    signal.setitimer(signal.ITIMER_REAL, 0)

    def send_result(self, job, start, offset, done, error, inputs, elapsed, last):
        """RESULTs for the calls on inputs offset..: done holds their results, error the exception that ended the
        run after them. A result that cannot be pickled is its input's error, alone; results go in messages of
        about P.MAX_BATCH_BYTES at most; the last says whether the batch is over."""
        per_call = elapsed / max(len(done), 1)
        parts = []  # [offset, results, flags, frames, [(error record, exception)]]
        for k, values, packed in self.packed_runs(done):
            if packed is None:
                at = offset + k
                bad = TypeError(f"the result of input {start + at} could not be pickled: {_repr.repr(values[0])}")
                parts.append([at, [], [], [], [(error_info(bad, start + at, inputs[at]), bad)]])
            else:
                parts.append([offset + k, values, *packed, []])
        if error is not None:
            at = offset + len(done)
            failure = (error_info(error, start + at, inputs[at]), error)
            if parts:
                parts[-1][4].append(failure)  # (errors follow a message's results, in index order)
            else:
                parts.append([at, [], [], [], [failure]])
        for n, (at, values, flags, frames, failures) in enumerate(parts or [[offset, [], [], [], []]]):
            self.reply({"j": job, "i": start, "o": at, "t": per_call * len(values), "w": self.name,
                        "k": len(values), "z": flags, "e": [info for info, _ in failures],
                        "f": int(last and n >= len(parts) - 1)}, frames, [exc for _, exc in failures])

    def packed_runs(self, done):
        """[(offset, results, (flags, frames), or None for one result that cannot be pickled)], in runs of about
        P.MAX_BATCH_BYTES at most."""
        try:
            runs = [(0, done, serialize.pack_items(done, self.compress))]
        except Exception:
            runs, k = [], 0
            for j in range(len(done) + 1):
                if j == len(done) or not picklable(done[j]):
                    if j > k:
                        runs.append((k, done[k:j], serialize.pack_items(done[k:j], self.compress)))
                    if j < len(done):
                        runs.append((j, done[j:j + 1], None))
                    k = j + 1
        out = []
        for k, values, packed in runs:
            size = sum(len(f) for f in packed[1]) if packed else 0
            if size <= P.MAX_BATCH_BYTES or len(values) == 1:
                out.append((k, values, packed))
                continue
            step = max(1, int(len(values) * P.MAX_BATCH_BYTES / size))
            out += [(k + j, values[j:j + step], serialize.pack_items(values[j:j + step], self.compress))
                    for j in range(0, len(values), step)]
        return out

    def reply(self, header, frames, exceptions):
        header.setdefault("w", self.name)
        frames = list(frames) + [exception_frame(e) for e in exceptions]
        with self.lock:
            self.send_lines(header["j"], header["w"])  # the batch's output goes before its result
            self.send(P.RESULT, header, frames)

    def log_loop(self):
        while True:
            self.sink.wake.wait()
            time.sleep(LOG_LINGER)
            self.sink.wake.clear()
            try:
                with self.lock:
                    if self.job is not None:
                        self.send_lines(self.job, self.name)
                    else:
                        self.sink.take()  # before any job: nobody to show it to
            except Exception as e:  # this thread must go on
                if self.sink.fds is not None:
                    self.sink.fds.complain(f"sending output: {e!r}")

    def send_lines(self, job, slot):
        """Send the lines collected so far (the socket lock held), in LOG messages of about LOG_TEXT bytes."""
        for lines in self.sink.messages():
            try:
                self.send(P.LOG, {"j": job, "w": slot, "l": lines})
            except (TypeError, ValueError):  # text msgpack cannot encode (cleaned on the way in: never expected)
                for line in lines:
                    line[2] = clean(str(line[2]))
                self.send(P.LOG, {"j": job, "w": slot, "l": lines})

    def capture_output(self):
        """sys.stdout and sys.stderr as Captures, and fds 1 and 2 pipes read into the same sink."""
        self.streams = Capture(self.sink, 1), Capture(self.sink, 2)
        FdCapture.install(self.sink)
        sys.stdout, sys.stderr = self.streams

    def fresh_streams(self):
        """At the start of a batch: whole streams again, and fds 1 and 2 the pipes again, whatever calls did."""
        if self.sink.fds is not None:
            self.sink.fds.check()
        streams = []
        for stream, capture in zip((1, 2), self.streams):
            if capture.closed:
                capture = Capture(self.sink, stream)
            elif capture._buffer is not None and capture._buffer.closed:
                capture._buffer = None
            streams.append(capture)
        self.streams = tuple(streams)
        return self.streams


def visible_devices(indices, host_gpus):
    """CUDA_VISIBLE_DEVICES for a claim's indices into the worker's GPUs: those of the host, or the ones the
    worker itself was restricted to; "" for none, so that a job without GPUs does not take any."""
    if host_gpus:
        visible = host_gpus.split(",")
        return ",".join(visible[i] for i in indices if 0 <= i < len(visible))
    return ",".join(str(i) for i in indices)


def call_budget(options):
    """Seconds a call may take with all its attempts (each gets the timeout), or None: the WHERE deadline."""
    timeout = options.get("t")
    return timeout * (1 + int(options.get("r") or 0)) if timeout else None


def failing_unloadable(function):
    def call(value):
        if type(value) is serialize.Unloadable:
            raise value.error  # this input could not be unpickled here
        return function(value)

    return call


def on_timeout(*_):
    from burla.errors import CallTimeoutError

    raise CallTimeoutError("the call ran past the job's timeout")


def error_info(exc, index, value, while_=None):
    tb = exc.__traceback__
    # Leave out the executor's own frames, and burla.calling's wrappers: the user's frames are the story.
    while tb is not None and tb.tb_frame.f_code.co_filename in (__file__, calling.__file__):
        tb = tb.tb_next
    text = "".join(traceback.format_exception(type(exc), exc, tb))
    if while_:
        text = f"while {while_}:\n{text}"
    kind = type(exc)
    try:
        message = str(exc)
    except Exception as e:  # a user's __str__ may itself fail
        message = f"<str() failed: {e!r}>"
    # (a record stays far under a frame, in UTF-8 bytes, whatever the script; a traceback's end is the news)
    return P.error_record(index, clip(f"{kind.__module__}.{kind.__qualname__}", 500), clip(message, 16_000),
                          clip(text, 96_000, tail=True), clip(_repr.repr(value), 4000))


def clip(text, most, tail=False):
    """text in at most `most` bytes of UTF-8 (lone surrogates escaped), its start or (tail) its end kept."""
    data = text.encode("utf-8", "backslashreplace")
    if len(data) <= most:
        return data.decode("utf-8")
    return ("..." + data[-most:].decode("utf-8", "ignore")) if tail else data[:most].decode("utf-8", "ignore") + "..."


def exception_frame(exc):
    return serialize.serialize_exception(exc)  # b"": the client raises burla.RemoteError instead


def picklable(value):
    try:
        serialize.pack_items([value])
        return True
    except Exception:
        return False


def stopped_by_us(error):
    """Did a call end because of its timeout or a cancel (also when the call's code raised another exception
    while handling ours)?"""
    from burla.errors import CallTimeoutError

    for _ in range(8):
        if isinstance(error, (Cancelled, CallCancelled, CallTimeoutError)):
            return True
        if error is None:
            return False
        error = error.__cause__ or error.__context__
    return False


def main(broker, worker_id, slot, control_fd=None, token=None, where_fd=None, env=None, worker_pid=None):
    """control_fd and where_fd are inherited descriptors, or (in a container, which inherits none) the paths of
    the worker's control FIFO and WHERE file in a folder shared with it; there the worker's death is seen through
    its pid (the container shares the host's pids): the FIFO tells nothing to a reader that came after it."""
    lead_process_group()
    die_with_parent()
    watch = None
    if worker_pid is not None:
        try:
            watch = os.pidfd_open(worker_pid)
        except ProcessLookupError:
            return
    from burla import security

    security.hide_process()  # other processes of this user (another owner's executors) cannot read our memory
    if isinstance(token, int):  # a pipe holding the slot's key
        with os.fdopen(token, "rb") as f:
            token = f.read().decode()
        if not token:  # read already (by an executor its zygote forked too late): without a key we would wait
            raise SystemExit("burla executor: its slot key pipe was empty")  # forever; the worker starts another
    if isinstance(control_fd, str):
        control_fd = os.open(control_fd, os.O_RDONLY | os.O_NONBLOCK)
    if isinstance(where_fd, str):
        where_fd = os.open(where_fd, os.O_RDWR)
    executor = Executor(broker, worker_id, slot, control_fd, token, where_fd, env)
    executor.worker_pidfd = watch
    executor.run()
