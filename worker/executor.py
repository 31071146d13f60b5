"""An executor: one slot of a worker, a process that runs the user's function on batches of inputs.

It talks to the broker directly (a DEALER socket of its own) so results take no extra hop through the worker.
stdout and stderr of the calls are captured line by line, tagged with the input index, and streamed: a background
thread sends lines while a long call runs, and the lines left at the end of a batch go out just before its
result on the same socket, so a client always sees a call's output before its result.
"""

import codecs
import collections
import fcntl
import io
import os
import reprlib
import select
import signal
import sys
import threading
import time
import traceback

import zmq

from burla import protocol as P
from burla import security
from burla import serialize

TIMEOUT_GRACE = 1.0  # seconds past a call's timeout before its worker kills the executor (SIGALRM came first)
LOG_LINGER = 0.02  # seconds a first pending line waits for company before it is sent
_repr = reprlib.Repr()
_repr.maxstring = _repr.maxother = 200


class Cancelled(BaseException):
    """Raised inside a running call when its job is cancelled (the worker signals SIGUSR1)."""


MAX_LINE = 64 << 10  # characters in one line (a quarter of that if not ASCII): a longer one is cut in pieces
LOG_TEXT = getattr(P, "LOG_BYTES", 64 << 10)  # about this many bytes of text in one LOG message
PIPE_SIZE = 1 << 20  # what fds 1 and 2 hold before a writer waits for the executor to read (where allowed)
READ_SIZE = 64 << 10  # one read of a pipe (under malloc's mmap threshold)
DRAIN_MAX = 2 * PIPE_SIZE  # most bytes one drain reads: a process that writes without end does not hold it


def clean(text):
    """text that UTF-8 can encode: a lone surrogate (a file name decoded with surrogateescape) becomes \\udcxx."""
    try:
        text.encode("utf-8")
        return text
    except UnicodeEncodeError:
        return text.encode("utf-8", "backslashreplace").decode("utf-8")


def latest(line):
    """What a terminal last shows of a line redrawn with carriage returns: its last non-empty segment."""
    for segment in reversed(line.split("\r")):
        if segment:
            return segment
    return ""


class Pending:
    """One source's unfinished line on one stream: its pieces (never holding "\\r") and their length; cr: a "\\r"
    came last (the next text replaces the line); split: part of the line already went out (it was too long)."""

    __slots__ = ("chunks", "size", "cr", "split")

    def __init__(self):
        self.chunks, self.size, self.cr, self.split = [], 0, False, False


class LogSink:
    """Collects complete lines written to stdout and stderr, tagged with the input that printed them: Python-level
    text (Capture) exactly, bytes written to fds 1 and 2 (FdCapture) with the input running when they are read.
    Each level keeps its own unfinished line, so text written at both levels interleaves at line boundaries.
    A "\\r" redraw keeps only the line's latest state, and a line longer than MAX_LINE goes out in pieces."""

    def __init__(self):
        self.lock = threading.RLock()  # reentrant: a finalizer that prints in the middle of a write cannot deadlock
        self.lines, self.size = [], 0  # complete lines not yet sent; about how many bytes they take in a message
        self.text = {1: Pending(), 2: Pending()}  # written by Python code
        self.raw = {1: Pending(), 2: Pending()}  # read from the fds
        self.wake = threading.Event()
        self.start, self.done = 0, []  # index of the batch's first input; results so far (len = calls done)
        self.fds = None  # the FdCapture reading fds 1 and 2, once they are pipes
        self.forked = False  # in a child a call forked: text goes straight to the fds, which the executor reads

    def write(self, stream, text):
        """Text written by Python code (that UTF-8 can encode)."""
        if self.forked:
            return write_all(stream, text.encode("utf-8", "backslashreplace"))
        with self.lock:
            if "\n" in text and self.fds is not None:
                self.fds.drain()  # what went to the fds before this line comes before it: one poll(0)
            self.feed(self.text[stream], stream, text)

    def feed(self, pending, stream, text):  # the lock held
        if "\n" not in text:
            self.add(pending, stream, text)
            return
        parts = text.split("\n")
        self.add(pending, stream, parts[0])
        first = "".join(pending.chunks)
        complete = [first] if first or not pending.split else []
        pending.chunks, pending.size, pending.cr, pending.split = [], 0, False, False
        if len(parts) > 2:
            complete.extend(latest(part) if "\r" in part else part for part in parts[1:-1])
        if complete:
            self.emit(stream, complete)
        if parts[-1]:
            self.add(pending, stream, parts[-1])

    def add(self, pending, stream, text):  # text without "\n"; O(len(text)) amortised
        if not text:
            return
        if "\r" in text:
            segments = text.split("\r")
            for k in range(len(segments) - 1, -1, -1):
                if segments[k]:
                    if k or pending.cr:  # after a "\r": it replaces the line so far
                        pending.chunks, pending.size = [segments[k]], len(segments[k])
                    else:
                        pending.chunks.append(segments[k])
                        pending.size += len(segments[k])
                    break
            pending.cr = not segments[-1]
        elif pending.cr:
            pending.chunks, pending.size, pending.cr = [text], len(text), False
        else:
            pending.chunks.append(text)
            pending.size += len(text)
        if pending.size > MAX_LINE:  # a line without end: out in pieces, so it cannot fill the memory
            line = "".join(pending.chunks)
            pending.chunks, pending.size, pending.split = [], 0, True
            self.emit(stream, [line])

    def emit(self, stream, lines):  # the lock held
        index = self.start + len(self.done)
        out = self.lines
        for line in lines:
            ascii = line.isascii()
            limit = MAX_LINE if ascii else MAX_LINE // 4
            if len(line) > limit:
                pieces = [line[k:k + limit] for k in range(0, len(line), limit)]
                out.extend([index, stream, piece] for piece in pieces)
                self.size += 8 * len(pieces)
            else:
                out.append([index, stream, line])
                self.size += 8
            self.size += len(line) if ascii else 4 * len(line)
        if not self.wake.is_set():
            self.wake.set()

    def finish_lines(self):
        """At the end of a run of calls: read what went to the fds, and end the unfinished lines."""
        with self.lock:
            if self.fds is not None:
                self.fds.drain()
            for pendings in (self.raw, self.text):
                for stream, pending in pendings.items():
                    if pending.chunks:
                        self.feed(pending, stream, "\n")
                    pending.cr = pending.split = False

    def take(self):
        with self.lock:
            lines, self.lines, self.size = self.lines, [], 0
        return lines

    def messages(self):
        """Take the lines collected so far, in groups of about LOG_TEXT bytes of text: one LOG message each."""
        with self.lock:
            lines, size = self.lines, self.size
            self.lines, self.size = [], 0
        if size <= LOG_TEXT:
            return [lines] if lines else []
        groups, group, size = [], [], 0
        for line in lines:
            text = line[2]
            n = (len(text) if text.isascii() else 4 * len(text)) + 8
            if group and size + n > LOG_TEXT:
                groups.append(group)
                group, size = [], 0
            group.append(line)
            size += n
        groups.append(group)
        return groups

    def after_fork(self):
        """In a child that a call forked (multiprocessing, os.fork): nobody here sends lines; the fds are read."""
        self.forked = True
        self.lock = threading.RLock()


def write_all(fd, data):
    while data:
        data = data[os.write(fd, data):]


class Capture(io.TextIOBase):
    """sys.stdout or sys.stderr in an executor: text goes to the sink, bytes (.buffer) too, decoded as UTF-8;
    fileno() is the real fd, a pipe the executor reads (FdCapture). close() holds for the rest of the batch."""

    def __init__(self, sink, stream):
        self.sink, self.stream = sink, stream
        self._buffer = None

    def write(self, text):
        if type(text) is not str:
            if not isinstance(text, str):
                raise TypeError(f"write() argument must be str, not {type(text).__name__}")
            text = str.__str__(text)
        if self.closed:
            raise ValueError("I/O operation on closed file.")
        if text:
            self.sink.write(self.stream, text if text.isascii() else clean(text))
        return len(text)

    @property
    def buffer(self):
        if self._buffer is None:
            self._buffer = CaptureBuffer(self.sink, self.stream)
        return self._buffer

    def fileno(self):
        return self.stream

    def isatty(self):
        return False

    def writable(self):
        return True

    def flush(self):
        if self.closed:
            raise ValueError("I/O operation on closed file.")

    def close(self):
        if self._buffer is not None:
            self._buffer.close()
        super().close()

    def reconfigure(self, **_):
        """Always UTF-8, line by line."""

    @property
    def encoding(self):
        return "utf-8"

    @property
    def errors(self):
        return "backslashreplace"

    @property
    def line_buffering(self):
        return True


class CaptureBuffer(io.BufferedIOBase):
    """Capture.buffer: bytes, decoded as UTF-8 (a character may span writes; bad bytes become U+FFFD)."""

    def __init__(self, sink, stream):
        self.sink, self.stream = sink, stream
        self.decoder = codecs.getincrementaldecoder("utf-8")("replace")

    def write(self, data):
        if self.closed:
            raise ValueError("I/O operation on closed file.")
        with memoryview(data) as view:
            n = view.nbytes
        if self.sink.forked:
            write_all(self.stream, bytes(data))
        else:
            text = self.decoder.decode(data)
            if text:
                self.sink.write(self.stream, text)
        return n

    def fileno(self):
        return self.stream

    def isatty(self):
        return False

    def writable(self):
        return True

    def flush(self):
        if self.closed:
            raise ValueError("I/O operation on closed file.")


class FdCapture:
    """fds 1 and 2 as pipes the executor reads, so that output below Python (os.write, subprocesses, C libraries,
    faulthandler) reaches the client like print()'s: a thread reads them while a call runs, and the main thread
    drains them (a poll(0)) before a Python line and at the end of a run of calls, so lines keep their order and
    come before the RESULT. Bytes are tagged with the input running when they are read, decoded as UTF-8."""

    def __init__(self, sink):
        self.sink = sink
        self.reads = {}  # read end -> stream
        self.spares = {}  # stream -> a write end of its pipe, to point the stream's fd at again
        self.ids = {}  # stream -> (st_dev, st_ino) of its pipe
        self.decoders = {s: codecs.getincrementaldecoder("utf-8")("replace") for s in (1, 2)}
        self.poller = select.poll()  # the draining threads' (used with the sink's lock held)
        self.log_fd = None  # the fd 2 this process started with (the worker's log), for the executor's own troubles

    @classmethod
    def install(cls, sink):
        """Make fds 1 and 2 pipes read into sink; None (and the fds as they were) where that fails."""
        self = cls(sink)
        for f in (sys.__stdout__, sys.__stderr__):
            try:
                f.flush()
            except Exception:
                pass
        saved = {}
        try:
            for stream in (1, 2):
                try:
                    saved[stream] = os.dup(stream)
                except OSError:
                    saved[stream] = None
            for stream in (1, 2):
                r, w = os.pipe()
                self.reads[r], self.spares[stream] = stream, w
                try:
                    fcntl.fcntl(w, getattr(fcntl, "F_SETPIPE_SZ", 1031), PIPE_SIZE)
                except OSError:
                    pass
                os.set_blocking(r, False)
                os.dup2(w, stream)
                st = os.fstat(stream)
                self.ids[stream] = (st.st_dev, st.st_ino)
                self.poller.register(r, select.POLLIN)
        except OSError:
            for stream, fd in saved.items():
                if fd is not None:
                    os.dup2(fd, stream)
                    os.close(fd)
            for fd in [*self.reads, *self.spares.values()]:
                os.close(fd)
            return None
        if saved[1] is not None:
            os.close(saved[1])
        self.log_fd = saved[2]
        line_buffer_c_stdout()
        for f in (sys.__stdout__, sys.__stderr__):  # whoever writes to these reaches the pipe at once
            try:
                f.reconfigure(line_buffering=True, write_through=True, errors="backslashreplace")
            except Exception:
                pass
        sink.fds = self
        os.register_at_fork(after_in_child=sink.after_fork)
        threading.Thread(target=self.read_loop, daemon=True, name="burla-output").start()
        return self

    def check(self):
        """Point fds 1 and 2 at the pipes again if a call closed or replaced them: two fstat calls."""
        for stream, expected in self.ids.items():
            try:
                st = os.fstat(stream)
                if (st.st_dev, st.st_ino) == expected:
                    continue
            except OSError:
                pass
            try:
                os.dup2(self.spares[stream], stream)
            except OSError as e:
                self.complain(f"fd {stream} could not be restored: {e}")

    def drain(self, ready=None):
        """Read what the pipes hold into the sink (its lock held); ready: poll()'s answer, else a poll(0)."""
        if ready is None:
            ready = self.poller.poll(0)
        for fd, _ in ready:
            stream = self.reads.get(fd)
            if stream is None:
                continue
            decoder, pending, total = self.decoders[stream], self.sink.raw[stream], 0
            while total < DRAIN_MAX:
                try:
                    data = os.read(fd, READ_SIZE)
                except BlockingIOError:
                    break
                except OSError as e:  # our read end closed by a call: nothing more to read there
                    self.forget(fd, e)
                    break
                if not data:
                    break
                total += len(data)
                text = decoder.decode(data)
                if text:
                    self.sink.feed(pending, stream, text)
                if len(data) < READ_SIZE:
                    break

    def forget(self, fd, why):
        self.reads.pop(fd, None)
        try:
            self.poller.unregister(fd)
        except (KeyError, ValueError):
            pass
        self.complain(f"stopped reading fd {fd}: {why}")

    def read_loop(self):
        """While a call runs: read the pipes as output arrives (poll releases the GIL until then)."""
        poller = select.poll()
        for fd in self.reads:
            poller.register(fd, select.POLLIN)
        while True:
            try:
                ready = poller.poll()
                for fd, events in ready:
                    if events & select.POLLNVAL or not events & select.POLLIN:  # closed, or no writer left
                        poller.unregister(fd)
                with self.sink.lock:
                    self.drain(ready)
            except Exception as e:
                self.complain(f"output reader: {e!r}")
                time.sleep(1)

    def complain(self, message):
        if self.log_fd is not None:
            try:
                os.write(self.log_fd, f"burla executor {os.getpid()}: {message}\n".encode(errors="replace"))
            except OSError:
                pass


def line_buffer_c_stdout():
    """C's stdout on a pipe is block-buffered: printf output would wait for 4 KiB or the process's exit."""
    try:
        import ctypes

        libc = ctypes.CDLL(None)
        libc.setvbuf(ctypes.c_void_p.in_dll(libc, "stdout"), None, 1, 0)  # _IOLBF
    except Exception:
        pass


class Executor:
    def __init__(self, broker, worker_id, slot, control_fd=None, token=None, where_fd=None, env=None):
        self.broker = broker
        self.env = env  # the key of the environment this process runs in (see burla.env)
        self.worker_id = worker_id
        self.name = P.slot_name(worker_id, slot)
        self.control_fd = control_fd  # from the worker: b"R" = say READY again; end of file = exit
        self.token = token
        self.where_fd = where_fd  # see P.WHERE
        self.functions = collections.OrderedDict()
        self.tasks = collections.deque()
        self.sink = LogSink()
        self.job = None
        self.compress = not P.is_local(broker)
        self.lock = threading.Lock()  # the socket is shared with the log thread; all use goes through it
        self.calling = False  # in a user call: only then may SIGUSR1 raise Cancelled
        self.started = 0.0  # perf_counter() when the calls now running began (see end_processes)
        self.cancelled = collections.deque(maxlen=64)  # ids of jobs cancelled lately
        self.control_buffer, self.reready = b"", False
        self.worker_pidfd = None  # in a container: readable once the worker has exited

    def run(self):
        self.ctx = zmq.Context()
        self.sock = self.refused = None
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
                poller = zmq.Poller()
                for fd in (self.sock, self.refused, self.control_fd, self.worker_pidfd):
                    if fd is not None:
                        poller.register(fd, zmq.POLLIN)
                events = dict(poller.poll(1000))
                if self.control_fd in events and not self.read_control():
                    return
                if self.worker_pidfd in events:
                    return  # the worker is gone
                if self.refused in events:  # dialled before the broker knew our key: ZeroMQ gives up, we do not
                    time.sleep(0.05)
                    with self.lock:
                        self.dial()
                        self.ready_unlocked()
            if self.reready:
                self.reready = False
                self.tasks.clear()
                self.ready()
            with self.lock:
                while self.sock.poll(0):
                    self.handle(*P.recv(self.sock))
            if self.tasks:
                self.run_task(*self.tasks.popleft())

    def dial(self):
        """(Re)connect with the slot's key. A broker that restarted learns the key again from the worker, maybe
        after we dialled: a refused handshake is not retried by ZeroMQ, so we watch for it and dial again."""
        for old in (self.sock, self.refused):
            if old is not None:
                old.close(0)
        self.sock = P.socket(self.ctx, zmq.DEALER, credential=self.token, role=security.SLOT)
        self.refused = self.sock.get_monitor_socket(zmq.EVENT_HANDSHAKE_FAILED_AUTH) if self.token else None
        self.sock.connect(self.broker)

    def on_cancel_signal(self, *_):
        self.read_control()
        # only ever a call of the cancelled job: never our own work between calls, never another job's call
        if self.calling and self.job in self.cancelled:
            raise Cancelled("the job was cancelled")

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
            else:
                self.reready = self.reready or buf[:1] == b"R"
                buf = buf[1:]
        self.control_buffer = buf
        return True

    def ready(self):
        with self.lock:
            self.ready_unlocked()

    def ready_unlocked(self):
        P.send(self.sock, P.READY, {"w": self.worker_id, "s": self.name, "k": P.PREFETCH, "pid": os.getpid(),
                                    "env": self.env})


    def handle(self, command, header, payload):
        if command == P.TASK:
            self.tasks.append((header, payload))
        elif command == P.CANCEL:
            self.cancelled.append(header["j"])
            self.tasks = collections.deque(t for t in self.tasks if t[0]["j"] != header["j"])
        elif command == P.RECONNECT:
            self.tasks.clear()
            self.ready_unlocked()

    def function(self, header, payload):
        digest, frames = header["d"], header.get("f", 0)
        if frames:
            if header.get("ak"):  # nested calls run as this job's owner; this executor serves no other
                from burla import config

                config.executor_api_key = header["ak"]  # (not in os.environ: children's environments are public)
            self.functions[digest] = serialize.loads_function(serialize.join(payload[:frames]))
            if len(self.functions) > P.FUNCTION_CACHE:
                self.functions.popitem(last=False)
            return self.functions[digest], payload[frames:]
        self.functions.move_to_end(digest)
        return self.functions[digest], payload

    def run_task(self, header, payload):
        """Run one batch. Results go back in one RESULT, or in several when calls fail and the job goes on, or one
        per input in isolation mode (a re-run after this batch crashed an executor: the broker learns which
        input was running when a process dies)."""
        job, start = header["j"], header["i"]
        if job in self.cancelled:  # told by signal before its CANCEL message came: free the slot, run nothing
            return self.reply({"j": job, "i": start, "o": 0, "k": 0, "f": 1}, [], [])
        options, isolate = header.get("o") or {}, header.get("x")
        self.job = job
        sys.stdout, sys.stderr = self.fresh_streams()  # again: a previous call may have replaced or closed them
        try:
            function, payload = self.function(header, payload)
            inputs = serialize.unpack_items(header.get("z"), payload)
            os.environ["BURLA_PARENT"] = f"{job.hex()}:{self.name}"  # (nested jobs name their caller)
            if any(type(x) is serialize.Unloadable for x in inputs):
                function = failing_unloadable(function)  # such an input fails alone, with its own index
        except BaseException as e:
            first = isolate or 0
            info = error_info(e, start + first, "<not loaded>", "loading the function or inputs")
            return self.reply({"j": job, "i": start, "o": first, "k": 0, "e": [info], "all": 1, "f": 1}, [], [e])
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
            except Cancelled:
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
        errors = []
        if error is not None:
            at = offset + len(done)
            errors.append((error_info(error, start + at, inputs[at]), error))
        try:
            flags, packed = serialize.pack_items(done, self.compress)
        except Exception:
            k = next(k for k, v in enumerate(done) if not picklable(v))
            bad = TypeError(f"the result of input {start + offset + k} could not be pickled: {_repr.repr(done[k])}")
            errors = [(error_info(bad, start + offset + k, inputs[offset + k]), bad)]
            done = done[:k]
            flags, packed = serialize.pack_items(done, self.compress)
            last = True
        size = sum(len(f) for f in packed)
        if size > P.MAX_BATCH_BYTES and len(done) > 1:  # results travel in messages of bounded size, as inputs do
            step = max(1, int(len(done) * P.MAX_BATCH_BYTES / size))
            for k in range(0, len(done) - step, step):
                part = serialize.pack_items(done[k:k + step], self.compress)
                self.reply({"j": job, "i": start, "o": offset + k, "k": step, "z": part[0], "e": [], "f": 0,
                            "t": elapsed * step / len(done), "w": self.name}, part[1], [])
            tail = (len(done) - 1) // step * step
            offset, done, elapsed = offset + tail, done[tail:], elapsed * (len(done) - tail) / len(done)
            flags, packed = serialize.pack_items(done, self.compress)
        reply = {"j": job, "i": start, "o": offset, "t": elapsed, "w": self.name, "k": len(done), "z": flags,
                 "e": [info for info, _ in errors], "f": int(last)}
        self.reply(reply, packed, [exc for _, exc in errors])

    def reply(self, header, frames, exceptions):
        header.setdefault("w", self.name)
        frames = list(frames) + [exception_frame(e) for e in exceptions]
        with self.lock:
            self.send_lines(header["j"], header["w"])  # the batch's output goes before its result
            P.send(self.sock, P.RESULT, header, frames)

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
                P.send(self.sock, P.LOG, {"j": job, "w": slot, "l": lines})
            except (TypeError, ValueError):  # text msgpack cannot encode (cleaned on the way in: never expected)
                for line in lines:
                    line[2] = clean(str(line[2]))
                P.send(self.sock, P.LOG, {"j": job, "w": slot, "l": lines})

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
    # Leave out the executor's own frames: the user's frames are the story.
    while tb is not None and tb.tb_frame.f_code.co_filename == __file__:
        tb = tb.tb_next
    text = "".join(traceback.format_exception(type(exc), exc, tb))
    if while_:
        text = f"while {while_}:\n{text}"
    kind = type(exc)
    try:
        message = str(exc)
    except Exception as e:  # a user's __str__ may itself fail
        message = f"<str() failed: {e!r}>"
    if len(text) > 100_000:  # (the broker refuses larger records; the end of a traceback is the news)
        text = "...\n" + text[-100_000:]
    return P.error_record(index, f"{kind.__module__}.{kind.__qualname__}"[:500], message[:60_000], text,
                          _repr.repr(value)[:4000])


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
        if isinstance(error, (Cancelled, CallTimeoutError)):
            return True
        if error is None:
            return False
        error = error.__cause__ or error.__context__
    return False


def process_table():
    """{pid: (state, parent pid, process group, start time in clock ticks since boot)} of every process, from
    /proc; None where there is none."""
    try:
        names = os.listdir("/proc")
    except OSError:
        return None
    table = {}
    for name in names:
        if name.isdigit():
            try:
                with open(f"/proc/{name}/stat", "rb") as f:
                    fields = f.read().rpartition(b")")[2].split()  # (the command name may hold spaces)
                table[int(name)] = fields[0], int(fields[1]), int(fields[2]), int(fields[19])
            except (OSError, ValueError, IndexError):
                pass  # gone meanwhile
    return table


def end_processes(since, bound=1.0):
    """SIGKILL the processes the calls begun at `since` (a perf_counter() value) started and left running, when
    they stopped for a timeout or a cancel: this process's descendants (start_new_session=True ones included)
    and the members of its process group (orphans of a double fork, `os.system("cmd &")`, adopted by init),
    started since then. Older ones (a pool or a server an earlier call left for later calls) are spared.

    A multiprocessing pool with workers among them is terminated first, as Pool.terminate() does (killing its
    workers under it would leave its queue's lock held: terminating it later would hang this process). The
    killed processes are not reaped: their exit statuses belong to the Popen and multiprocessing objects that
    started them (a reaped Pool worker leaves the pool's handler thread spinning on it), and init reaps orphans.
    Waits up to `bound` s for them to die. Nothing runs here when a call ends normally."""
    table = process_table()
    if table is None:
        return
    me, deadline = os.getpid(), time.monotonic() + bound
    own_group = os.getpgrp() == me  # (only a group of our own: never the worker's)
    # /proc counts start times in ticks of CLOCK_BOOTTIME; perf_counter() is CLOCK_MONOTONIC
    tick = os.sysconf("SC_CLK_TCK")
    first = (since + time.clock_gettime(time.CLOCK_BOOTTIME) - time.perf_counter()) * tick - 1  # (a tick's slack)
    pools_done = False
    while True:
        children = collections.defaultdict(list)
        for pid, (_, parent, _, _) in table.items():
            children[parent].append(pid)
        tree, todo = set(), [me]
        while todo:
            for pid in children.pop(todo.pop(), ()):
                tree.add(pid)
                todo.append(pid)
        if own_group:
            tree.update(pid for pid, (_, _, group, _) in table.items() if group == me)
        tree.discard(me)
        targets = {pid for pid in tree if table[pid][0] not in b"ZX" and table[pid][3] >= first}
        if not targets:
            return
        if not pools_done:
            pools_done = True
            if terminate_pools(targets, min(deadline, time.monotonic() + bound / 2)):
                table = process_table() or {}
                continue
        for pid in targets:
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass
        if time.monotonic() > deadline:
            return
        time.sleep(0.005)
        table = process_table() or {}


def terminate_pools(targets, deadline):
    """Terminate the multiprocessing pools with a worker among these pids (found through the finalizer every pool
    registers), waiting until the deadline at most. True if there were any."""
    pool, util = sys.modules.get("multiprocessing.pool"), sys.modules.get("multiprocessing.util")
    if pool is None or util is None:
        return False
    terminate = getattr(pool.Pool._terminate_pool, "__func__", None)
    finalizers = []
    for finalizer in list(getattr(util, "_finalizer_registry", {}).values()):
        args = getattr(finalizer, "_args", None) or ()
        if (getattr(getattr(finalizer, "_callback", None), "__func__", None) is terminate and len(args) > 3
                and any(getattr(worker, "pid", None) in targets for worker in args[3])):
            finalizers.append(finalizer)
    if not finalizers:
        return False
    # in a thread: a pool whose worker is stuck (it ignores SIGTERM) would hold up this one; the kill follows
    def stop():
        for finalizer in finalizers:
            owner = finalizer._weakref() if getattr(finalizer, "_weakref", None) else None
            owner.terminate() if owner is not None else finalizer()

    thread = threading.Thread(target=stop, daemon=True, name="burla-pools")
    thread.start()
    thread.join(max(deadline - time.monotonic(), 0))
    return True


def lead_process_group():
    """Lead a process group of our own: the calls' processes join it, and the worker kills the whole group when
    it kills this executor. SIGTERM as by default (a forked executor inherits the worker's handler), so that a
    call's multiprocessing pool, whose workers inherit ours, can terminate them when they run C code."""
    try:
        os.setpgid(0, 0)
    except OSError:
        pass  # a session leader (in a container, say) leads its group already
    signal.signal(signal.SIGTERM, signal.SIG_DFL)


def die_with_parent():
    """Have the kernel kill this process when its worker dies, even in the middle of a long call (Linux)."""
    parent = os.getppid()
    try:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, 9, 0, 0, 0)  # PR_SET_PDEATHSIG, SIGKILL
    except (OSError, AttributeError):
        return
    if os.getppid() != parent:  # the worker died before the request was in place
        os._exit(1)


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
            token = f.read().decode() or None
    if isinstance(control_fd, str):
        control_fd = os.open(control_fd, os.O_RDONLY | os.O_NONBLOCK)
    if isinstance(where_fd, str):
        where_fd = os.open(where_fd, os.O_RDWR)
    executor = Executor(broker, worker_id, slot, control_fd, token, where_fd, env)
    executor.worker_pidfd = watch
    executor.run()
