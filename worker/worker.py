"""The worker: one per host (or container). It announces the host's slots and resources to the broker, keeps one
executor process per slot alive, reports an executor's death at once so its batches run again elsewhere, and
heartbeats. It runs no user code itself, so a call that crashes takes down one slot, never the worker.
"""

import logging
import os
import signal
import socket as pysocket
import sys
import tempfile
import time
import traceback

import zmq

from burla import protocol as P
from burla import security

log = logging.getLogger("burla.worker")


class Slot:
    def __init__(self, index):
        self.index = index
        self.pid = None
        self.popen = None  # set when started by exec rather than fork
        self.control = None  # write end of the executor's control pipe; closing it tells the executor to exit
        self.pidfd = None
        self.started = 0.0
        self.timed_out = False  # killed for running past a call's deadline
        self.where = tempfile.TemporaryFile()  # the executor's P.WHERE record, read when it dies
        self.clear_where()

    def read_where(self):
        """(job id, batch start, offset or -1, deadline or 0) of the call the executor is running."""
        return P.WHERE.unpack(os.pread(self.where.fileno(), P.WHERE.size, 0))

    def clear_where(self):
        os.pwrite(self.where.fileno(), P.NOWHERE, 0)

    def kill(self, signum):
        try:
            os.kill(self.pid, signum)
        except (ProcessLookupError, TypeError):
            pass


def host_resources():
    """(cpus this process may use, GB of RAM)."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:
        cpus = os.cpu_count() or 1
    try:
        ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        import psutil

        ram = psutil.virtual_memory().total
    return cpus, ram / 1e9


class Worker:
    def __init__(self, broker, slots=None, cpu=None, ram=None, gpus=(), name=None, parent_fd=None, token=None):
        host_cpu, host_ram = host_resources()
        self.broker = broker
        self.nslots = slots or host_cpu
        self.cpu = cpu if cpu is not None else host_cpu
        self.ram = ram if ram is not None else host_ram
        self.gpus = list(gpus)
        self.host = pysocket.gethostname()
        self.id = name or f"{self.host}-{os.getpid()}"
        self.parent_fd = parent_fd
        self.token = token  # the broker's worker token (CURVE over TCP); None on an ipc or insecure broker
        self.slots = [Slot(k) for k in range(self.nslots)]

    # ---------------------------------------------------------------- executors
    def start_slot(self, slot, fork):
        read, write = os.pipe()
        if fork:
            pid = os.fork()
            if pid == 0:  # the executor
                code = 0
                try:
                    os.close(write)
                    for other in self.slots:
                        if other.control is not None:
                            os.close(other.control)
                    from burla.worker import executor

                    executor.main(self.broker, self.id, slot.index, read, self.token, slot.where.fileno())
                except BaseException:
                    traceback.print_exc()
                    code = 1
                finally:
                    os._exit(code)
            slot.popen = None
        else:
            where = slot.where.fileno()
            code = ("import os; from burla.worker.executor import main; "
                    f"main({self.broker!r}, {self.id!r}, {slot.index}, {read}, "
                    f"os.environ.pop('BURLA_WORKER_TOKEN', None), {where})")
            env = dict(os.environ, BURLA_WORKER_TOKEN=self.token) if self.token else None  # not on a command line
            slot.popen = __import__("subprocess").Popen([sys.executable, "-c", code], pass_fds=(read, where), env=env)
            pid = slot.popen.pid
        os.close(read)
        slot.pid, slot.control, slot.started = pid, write, time.monotonic()
        try:
            slot.pidfd = os.pidfd_open(pid)
        except (AttributeError, OSError):
            slot.pidfd = None

    def exit_code(self, slot):
        """The executor's exit status if it has ended (negative: killed by that signal), else None."""
        if slot.popen is not None:
            return slot.popen.poll()
        try:
            pid, status = os.waitpid(slot.pid, os.WNOHANG)
        except ChildProcessError:
            return -1
        if pid == 0:
            return None
        return os.waitstatus_to_exitcode(status)

    def reap(self):
        for slot in self.slots:
            code = self.exit_code(slot)
            if code is None:
                continue
            self.forget(slot)
            died = {"w": self.id, "s": f"{self.id}/{slot.index}", "code": code}
            job, start, offset, _ = slot.read_where()
            if offset >= 0:
                died["at"] = {"j": job, "i": start, "o": offset}
            if slot.timed_out:
                died["timeout"], slot.timed_out = 1, False
            slot.clear_where()
            P.send(self.sock, P.SLOT_DIED, died)
            log.warning("executor %d exited with %s; restarting it", slot.index, code)
            if time.monotonic() - slot.started < 1.0:
                time.sleep(0.5)  # do not spin on an executor that cannot start
            self.start_slot(slot, fork=False)

    def kill_overdue(self):
        """Kill an executor whose call ran past its timeout without noticing (stuck in C code)."""
        now = time.monotonic()
        for slot in self.slots:
            _, _, offset, deadline = slot.read_where()
            if offset >= 0 and 0 < deadline < now and not slot.timed_out:
                slot.timed_out = True
                slot.kill(signal.SIGKILL)

    def forget(self, slot):
        if slot.control is not None:
            os.close(slot.control)
        if slot.pidfd is not None:
            os.close(slot.pidfd)
        slot.control = slot.pidfd = None

    def tell_executors(self, byte):
        for slot in self.slots:
            try:
                os.write(slot.control, byte)
            except OSError:
                pass

    def stop_executors(self):
        for slot in self.slots:
            self.forget(slot)  # closing the control pipe asks the executor to exit
            slot.kill(signal.SIGKILL)
        for slot in self.slots:
            if slot.pid:
                try:
                    os.waitpid(slot.pid, 0)
                except ChildProcessError:
                    pass

    # ---------------------------------------------------------------- loop
    def register(self):
        P.send(self.sock, P.REGISTER, {
            "w": self.id, "host": self.host, "pid": os.getpid(), "slots": self.nslots,
            "cpu": self.cpu, "ram": self.ram, "gpu": self.gpus,
        })

    def run(self):
        # Fork the first executors before this process has a ZeroMQ context (a context does not survive fork):
        # a forked executor is ready in a millisecond, a fresh interpreter takes ~60 ms.
        for slot in self.slots:
            self.start_slot(slot, fork=hasattr(os, "fork"))
        self.ctx = zmq.Context()
        self.sock = P.socket(self.ctx, zmq.DEALER, credential=self.token, role=security.WORKER)
        self.sock.connect(self.broker)
        self.register()
        heard = time.monotonic()
        next_beat = heard + P.HEARTBEAT_INTERVAL
        try:
            while True:
                poller = zmq.Poller()
                poller.register(self.sock, zmq.POLLIN)
                if self.parent_fd is not None:
                    poller.register(self.parent_fd, zmq.POLLIN)
                pidfds = [s.pidfd for s in self.slots if s.pidfd is not None]
                for fd in pidfds:
                    poller.register(fd, zmq.POLLIN)
                timeout = min(max(0.0, next_beat - time.monotonic()), 0.25)  # also look for overdue calls
                events = dict(poller.poll(timeout * 1000))
                if self.parent_fd is not None and self.parent_fd in events:
                    return
                self.kill_overdue()
                self.reap()
                while self.sock.poll(0):
                    command, header, _ = P.recv(self.sock)
                    heard = time.monotonic()
                    if command == P.RECONNECT:
                        self.rejoin()
                    elif command == P.KILL:
                        self.signal_slot(header.get("s"), header.get("j"), bool(header.get("hard")))
                now = time.monotonic()
                if now - heard > P.HEARTBEAT_INTERVAL * P.HEARTBEAT_LIVENESS:
                    log.warning("no word from the broker for %.1f s; registering again", now - heard)
                    self.rejoin()
                    heard = now
                if now >= next_beat:
                    P.send(self.sock, P.HEARTBEAT, {"w": self.id})
                    next_beat = now + P.HEARTBEAT_INTERVAL
        finally:
            self.stop_executors()
            self.sock.close(0)

    def signal_slot(self, name, job, hard):
        """Kill a slot's executor, or interrupt its call if (and only if) that call is the given job's: the job
        id goes down the control pipe first, and the executor's SIGUSR1 handler reads it."""
        prefix, _, index = str(name).rpartition("/")
        if prefix != self.id or not index.isdigit() or int(index) >= len(self.slots):
            return
        slot = self.slots[int(index)]
        if not hard:
            if not (isinstance(job, bytes) and len(job) == 8) or slot.control is None:
                return
            try:
                os.write(slot.control, b"C" + job)
            except OSError:
                return
        slot.kill(signal.SIGKILL if hard else signal.SIGUSR1)

    def rejoin(self):
        self.register()
        self.tell_executors(b"R")


def main(broker, slots=None, cpu=None, ram=None, gpus=(), name=None, parent_fd=None, token=None):
    logging.basicConfig(level=logging.WARNING, format="burla worker: %(message)s")

    def terminate(*_):
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # once: never again inside the cleanup below
        raise SystemExit(0)

    signal.signal(signal.SIGTERM, terminate)
    worker = Worker(broker, slots, cpu, ram, gpus, name, parent_fd, token)
    try:
        worker.run()
    except KeyboardInterrupt:
        pass
