"""The broker: one ROUTER socket between clients and workers, driving the scheduler (scheduler.py).

This is the socket loop: it reads and checks messages, hands them to the scheduler, and sends what the scheduler
asks without ever blocking on a peer. Control messages that must reach a client whose queue is full wait in a
backlog, in order; results and log lines wait in their job's outbox (jobs.py) instead. Once per turn it commits the
store, so a turn's writes land together.
"""

import collections
import logging
import os
import socket as pysocket
import sys
import time

import msgpack
import zmq

from burla import protocol as P
from burla.broker.scheduler import RETENTION, Scheduler
from burla.broker.store import Full, Store, StoreError

log = logging.getLogger("burla.broker")

# A client whose queue is full (it is not reading) gets the control messages that must reach it from a backlog, in
# order; a backlog past BACKLOG_MAX ends the client's jobs: the broker never blocks on a peer, and never holds
# without bound what a peer does not read.
BACKLOG_MAX = 64 << 20
SPOOL_GB = 20.0


def message_size(header, payload):
    return len(msgpack.packb(header)) + sum(len(f) for f in payload)


class Backlog:
    __slots__ = ("items", "bytes")

    def __init__(self):
        self.items, self.bytes = collections.deque(), 0


class Broker:
    def __init__(self, bind, parent_fd=None, keys=None, state_dir=None, spool_gb=SPOOL_GB, retention=RETENTION):
        self.store = Store(state_dir, int(spool_gb * (1 << 30))) if state_dir else None
        self.ctx = zmq.Context()
        self.sock = P.socket(self.ctx, zmq.ROUTER)
        self.keys = keys
        self.auth = keys.serve(self.ctx, self.sock) if keys is not None else None  # held: its thread serves ZAP
        self.sock.bind(bind)
        self.drops, self.drops_logged = 0, 0.0
        self.address = self.sock.getsockopt_string(zmq.LAST_ENDPOINT)
        self.parent_fd = parent_fd
        self.backlogs = {}  # client connection -> Backlog of what its full queue could not take yet
        self.scheduler = Scheduler(self.send, self.offer, keys, self.store, retention)

    def run(self):
        s = self.scheduler
        poller = zmq.Poller()
        poller.register(self.sock, zmq.POLLIN)
        if self.parent_fd is not None:
            poller.register(self.parent_fd, zmq.POLLIN)
        next_beat = time.monotonic() + P.HEARTBEAT_INTERVAL
        next_push = time.monotonic()
        while True:
            wake = [next_beat, *s.stopping.values()] + ([next_push] if s.watchers else [])
            timeout = max(0.0, min(wake) - time.monotonic())
            if self.backlogs or s.behind:
                timeout = min(timeout, 0.005)  # a full queue has no "writable" event per peer: look again soon
            events = dict(poller.poll(timeout * 1000))
            if self.parent_fd is not None and self.parent_fd in events:
                break  # the process that started us is gone (the pipe's write end closed)
            if self.sock in events:
                for _ in range(1000):  # drain, but let heartbeats through under a flood
                    s.messages[0] += 1
                    try:
                        s.handle(*P.recv_routed(self.sock, self.keys is not None))
                    except P.VersionMismatch as e:
                        self.send_raw(e.ident, P.version_notice())
                        self.dropped(str(e))
                    except P.ProtocolError as e:
                        self.dropped(str(e))
                    except Exception:  # a bug in one handler must not take the cluster down: say it, go on
                        log.exception("a message failed to handle")
                    if not P.readable(self.sock):
                        break
            for step, due in ((self.flush_backlogs, self.backlogs), (s.pump_behind, s.behind),
                              (s.check_stopping, s.stopping), (s.dispatch, s.dirty)):
                if due:
                    self.guarded(step)
            if s.watchers and time.monotonic() >= next_push:
                self.guarded(s.push_state)
                next_push = time.monotonic() + P.WATCH_INTERVAL
            if time.monotonic() >= next_beat:
                self.guarded(s.beat)
                next_beat = time.monotonic() + P.HEARTBEAT_INTERVAL
            if self.store is not None:
                self.guarded(self.commit)
        self.sock.close(0)
        if self.store is not None:
            self.store.close()

    def commit(self):
        touched, self.store.touched = self.store.touched, set()
        try:
            self.store.commit()
        except Full as e:
            log.error("what this turn wrote to the store was lost: %s", e)
            self.scheduler.lost(touched, str(e))
            try:
                self.store.commit()  # (what ending those jobs wrote)
            except Full as again:  # the disk is still full: they end in memory; the checkpoint must still run,
                log.error("how those jobs ended could not be stored either: %s", again)  # or it stays full
            self.store.checkpoint()
        self.scheduler.committed()

    def guarded(self, step):
        try:
            step()
        except Exception:
            log.exception("%s failed", step.__name__)

    def dropped(self, why):
        """Count a dropped message; say so at most once a second, so a flood of junk cannot flood the log."""
        self.drops += 1
        now = time.monotonic()
        if now - self.drops_logged >= 1.0:
            log.warning("dropped %d malformed or forbidden message(s); latest: %s", self.drops, why)
            self.drops, self.drops_logged = 0, now

    # ---------------------------------------------------------------- sending
    def send(self, ident, command, header, payload=(), keep=False, strict=False):
        """Send without ever blocking; False only if the peer is gone (ROUTER_MANDATORY). A peer whose queue is
        full is behind: a message that must reach it (keep) waits in its backlog, in order; any other is dropped,
        unless strict, when a full queue counts as gone (an executor holds only its credit's worth)."""
        backlog = self.backlogs.get(ident)
        if backlog is not None and keep:
            return self.keep(ident, backlog, command, header, payload)
        outcome = self.offer(ident, command, header, payload)
        if outcome == "full":
            if keep:
                backlog = self.backlogs[ident] = Backlog()
                return self.keep(ident, backlog, command, header, payload)
            return not strict
        return outcome == "ok"

    def offer(self, ident, command, header, payload=()):
        """One message, now or not at all: "ok", "full" (the peer's queue is), or "gone"."""
        try:
            P.send(self.sock, command, header, payload, ident=ident, flags=zmq.NOBLOCK)
            self.scheduler.messages[1] += 1
            return "ok"
        except zmq.Again:
            return "full"
        except zmq.ZMQError as e:
            if e.errno != zmq.EHOSTUNREACH:
                raise
            return "gone"

    def send_raw(self, ident, frames):
        try:
            self.sock.send_multipart([ident, *frames], flags=zmq.NOBLOCK)
        except zmq.ZMQError:
            pass

    def keep(self, ident, backlog, command, header, payload):
        backlog.items.append((command, header, payload))
        backlog.bytes += message_size(header, payload)
        if backlog.bytes > BACKLOG_MAX:
            del self.backlogs[ident]
            s = self.scheduler
            for job in [j for j in s.jobs.values() if j.client == ident]:
                log.warning("job %s ended: its client stopped reading (%d MB waiting for it)", job.id.hex(),
                            backlog.bytes >> 20)
                s.drop_job(job.id, "failed", f"the job was ended: its client stopped reading "
                                             f"({backlog.bytes >> 20} MB of messages waited for it)", "credit")
        return True

    def flush_backlogs(self):
        for ident, backlog in list(self.backlogs.items()):
            while backlog.items:
                command, header, payload = backlog.items[0]
                outcome = self.offer(ident, command, header, payload)
                if outcome == "full":
                    break
                if outcome == "gone":
                    backlog.items.clear()
                    break
                backlog.items.popleft()
                backlog.bytes -= message_size(header, payload)
            if not backlog.items:
                del self.backlogs[ident]


def default_state_dir(bind):
    """Where a broker keeps its jobs when not told: beside an ipc:// socket (the embedded cluster's private
    folder, a test's), else ~/.burla/broker."""
    if bind.startswith("ipc://"):
        return bind[len("ipc://"):] + ".state"
    return "~/.burla/broker"


def main(bind, parent_fd=None, keys=None, state_dir=None, spool_gb=SPOOL_GB, retention=RETENTION):
    logging.basicConfig(level=logging.WARNING, format="burla broker: %(message)s")
    try:  # every worker and client connection is a file descriptor: allow as many as the system does
        import resource

        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    except (ImportError, ValueError, OSError):
        pass
    try:
        broker = Broker(bind, parent_fd, keys, os.path.join(state_dir or default_state_dir(bind), "jobs"),
                        spool_gb, retention)
    except StoreError as e:
        print(f"burla broker: {e}", file=sys.stderr)
        return 2
    host = pysocket.gethostname()
    log.info("listening on %s (%s, pid %d)", broker.address, host, os.getpid())
    try:
        broker.run()
    except KeyboardInterrupt:
        pass
