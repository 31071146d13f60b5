"""How an executor captures what calls print: fds 1 and 2 are pipes it reads, and sys.stdout/sys.stderr are
Capture objects, so print() is tagged exactly with the input that printed it and C-level, os.write and child
process output arrives too, in order within a call; lines are bounded, \r progress keeps its latest state, and
LOG messages stay small."""

import codecs
import fcntl
import io
import os
import select
import sys
import threading
import time

from burla import protocol as P

MAX_LINE = 64 << 10  # characters in one line (a quarter of that if not ASCII): a longer one is cut in pieces
LOG_TEXT = P.LOG_BYTES  # about this many bytes of text in one LOG message
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


class _CapturedStream:
    """What Capture and its .buffer share: the real fd (a pipe the executor reads), never a terminal."""

    def fileno(self):
        return self.stream

    def isatty(self):
        return False

    def writable(self):
        return True

    def flush(self):
        if self.closed:
            raise ValueError("I/O operation on closed file.")


class Capture(_CapturedStream, io.TextIOBase):
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


class CaptureBuffer(_CapturedStream, io.BufferedIOBase):
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
