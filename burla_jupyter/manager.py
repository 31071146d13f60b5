"""What the JupyterLab panel shows, kept up to date by a thread that watches the broker (WATCH: the broker pushes
its state four times a second and a copy of the log lines of this user's jobs). HTTP handlers (routes.py) only
read it and subscribe to it.

Which cluster: the configured one ($BURLA_CLUSTER, ~/.burla/config.toml), or the embedded cluster this server
started from the panel. A kernel runs its own embedded cluster, which nothing outside it can see, so "start" starts
one in the server and sets BURLA_CLUSTER for the kernels started after it.
"""

import collections
import json
import logging
import os
import threading
import time

import zmq

from burla import config, protocol as P, security

log = logging.getLogger("burla.panel")
LOG_TAIL = 2000  # lines kept per job, for a panel that opens a job late
PUSH_INTERVAL = 0.1  # seconds between the batches of log lines sent to browsers
MAX_PUSH_LINES = 1000  # lines per job per batch, the newest; the rest are counted, not sent (a page must not drown)


class Manager:
    def __init__(self):
        self.lock = threading.Lock()
        self.listeners = set()  # callables taking a JSON-ready dict; called from the watch thread
        self.address, self.api_key, self.embedded = None, None, False
        self.state, self.heard = None, 0.0
        self.logs = collections.OrderedDict()  # job id (hex) -> deque of [worker, stream, text]
        self.pending = []  # (job, lines) not yet sent to the pages
        self.wake = threading.Event()
        self.outbox = collections.deque()  # commands for the broker, sent by the watch thread (it owns the socket)
        self.stopped = False
        self.resolve()
        self.thread = threading.Thread(target=self.watch, daemon=True, name="burla-panel")
        self.thread.start()

    # ------------------------------------------------------------------ what handlers call
    def snapshot(self):
        with self.lock:
            return {"type": "state", "cluster": self.cluster(), "state": self.state}

    def job_logs(self, job_id):
        with self.lock:
            return list(self.logs.get(job_id, ()))

    def subscribe(self, listener):
        self.listeners.add(listener)

    def unsubscribe(self, listener):
        self.listeners.discard(listener)

    def start_embedded(self):
        from burla import local

        address = local.cluster().address
        os.environ["BURLA_CLUSTER"] = address  # for the kernels started from now on
        with self.lock:
            self.address, self.api_key, self.embedded = address, None, True
            self.state = None
        self.wake.set()
        return self.cluster()

    def stop_embedded(self):
        from burla import local

        if not self.embedded:
            raise ValueError("the panel did not start this cluster")
        local.stop()
        if os.environ.get("BURLA_CLUSTER") == self.address:
            del os.environ["BURLA_CLUSTER"]
        with self.lock:
            self.address, self.embedded, self.state = None, False, None
        self.wake.set()
        return self.cluster()

    def cancel(self, job_id):
        """CANCEL from this connection: the broker accepts it from any connection of the job's owner."""
        try:
            job = bytes.fromhex(job_id)
        except ValueError:
            raise ValueError(f"not a job id: {job_id!r}") from None
        with self.lock:
            known = self.state and any(j["id"] == job_id for j in self.state.get("jobs", ()))
        if not known:
            raise KeyError(job_id)
        self.outbox.append((P.CANCEL, {"j": job}))
        self.wake.set()

    def cluster(self):
        connected = self.state is not None and time.monotonic() - self.heard < 3.0  # (pushes come 4x a second)
        return {"address": self.address, "embedded": self.embedded, "connected": connected}

    def close(self):
        self.stopped = True
        self.wake.set()

    # ------------------------------------------------------------------ the watch thread
    def resolve(self):
        """The configured cluster; None where that is the (not yet started) embedded one."""
        address = config.cluster_address(None)
        if address == "local":
            self.address, self.api_key = None, None
        else:
            self.address = address
            self.api_key = config.api_key(None) if address.startswith("tcp://") else None

    def watch(self):
        """The thread: one pass at a time; a pass that fails (a bad address or key, a broken message) is logged
        and the connection made again, so the panel never goes dead for good."""
        self.sock, self.target, self.renew, self.flushed = None, None, 0.0, 0.0
        while not self.stopped:
            try:
                self.watch_once()
            except Exception as e:
                log.warning("burla panel: %s: %s", type(e).__name__, e)
                if self.sock is not None:
                    self.sock.close(0)
                self.sock, self.target = None, None
                self.wake.wait(2.0)
                self.wake.clear()
        if self.sock is not None:
            self.sock.close(0)

    def watch_once(self):
        with self.lock:
            wanted = (self.address, self.api_key)
        if wanted != self.target:
            if self.sock is not None:
                self.sock.close(0)
            self.sock, self.target = None, wanted
            if wanted[0]:
                self.sock = P.socket(zmq.Context.instance(), zmq.DEALER, credential=wanted[1], role=security.CLIENT)
                self.sock.connect(wanted[0])
                self.renew = 0.0
            self.emit(self.snapshot())
        sock, now = self.sock, time.monotonic()
        if sock is not None:
            if now >= self.renew:
                P.send(sock, P.WATCH, {}, flags=zmq.NOBLOCK)
                self.renew = now + 1.0
            while self.outbox:
                command, header = self.outbox.popleft()
                P.send(sock, command, header, flags=zmq.NOBLOCK)
            if sock.poll(50):
                for _ in range(200):  # a bounded drain: under a flood of log lines, still renew and flush
                    self.receive(*P.recv(sock))
                    if not sock.poll(0):
                        break
        else:
            self.wake.wait(0.5)
            self.wake.clear()
        if time.monotonic() - self.flushed >= PUSH_INTERVAL:
            self.flushed = time.monotonic()
            self.flush()

    def receive(self, command, header, payload):
        if command == P.STATE:
            with self.lock:
                self.state, self.heard = header, time.monotonic()
                live = {j["id"] for j in header.get("jobs", ())} | {j["id"] for j in header.get("recent", ())}
                for old in [j for j in self.logs if j not in live]:
                    del self.logs[old]
            self.emit(self.snapshot())
        elif command == P.LOG:
            job = header.get("j", b"").hex()
            worker = str(header.get("w", "?")).rpartition("/")[0]
            lines = [[worker, stream, text] for _, stream, text in header.get("l", ())]
            with self.lock:
                self.logs.setdefault(job, collections.deque(maxlen=LOG_TAIL)).extend(lines)
                self.pending.append((job, lines))

    def flush(self):
        """Send the log lines gathered since the last flush: the newest MAX_PUSH_LINES of each job (the page shows
        a tail; the rest are counted, and the server keeps the last LOG_TAIL for a job opened later)."""
        with self.lock:
            pending, self.pending = self.pending, []
        if not pending:
            return
        batches = collections.defaultdict(list)
        for job, lines in pending:
            batches[job].extend(lines)
        for job, lines in batches.items():
            skipped = max(0, len(lines) - MAX_PUSH_LINES)
            self.emit({"type": "logs", "job": job, "lines": lines[skipped:], "skipped": skipped})

    def emit(self, message):
        text = json.dumps(message)
        for listener in list(self.listeners):
            try:
                listener(text)
            except Exception:  # a closed page must not stop the others
                self.listeners.discard(listener)
