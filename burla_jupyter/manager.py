"""What the JupyterLab panel shows, kept up to date by a thread that watches the broker (WATCH: the broker pushes
its state four times a second and a copy of the log lines of this user's jobs). HTTP handlers (routes.py) only
read it and subscribe to it.

It also keeps, per job, what the panel draws (History): progress and busy slots over time, the task timeline's bars
and the failed inputs with their log lines; bounded, so a page opened late or reloaded still sees a job's history.

Which cluster: the configured one ($BURLA_CLUSTER, ~/.burla/config.toml), or the embedded cluster this server
started from the panel. A kernel runs its own embedded cluster, which nothing outside it can see, so "start" starts
one in the server and sets BURLA_CLUSTER for the kernels started after it. That cluster listens on the same ipc://
path every time this server starts it, so kernels that got the address keep working after Stop and Start.
"""

import atexit
import collections
import json
import logging
import os
import shutil
import tempfile
import threading
import time

import zmq

from burla import config, protocol as P, security

log = logging.getLogger("burla.panel")
LOG_TAIL = 2000  # lines kept per job, for a panel that opens a job late
PUSH_INTERVAL = 0.1  # seconds between the batches of log lines sent to browsers
MAX_PUSH_LINES = 1000  # lines per job per batch, the newest; the rest are counted, not sent (a page must not drown)
HISTORY_JOBS = 60  # jobs whose history is kept (the broker lists at most ~70, running and ended)
SERIES_STEP = 0.5  # seconds per bucket of a job's time series at first; doubled each time it has too many
SERIES_POINTS = 300  # buckets of a series at most: then pairs merge (so 300 cover any job, ever coarser)
SERIES_WORKERS = 12  # workers a series keeps apart; the busy slots of any more are summed as "other"
MAX_BARS = 1500  # bars of a job's task timeline; past that, a slot's bars merge on an ever coarser time grid
MAX_FAILURES = 50  # failed inputs kept per job (the broker lists 20)
INPUT_LINES = 20  # log lines kept per input, for a failed input's tab
INPUTS_KEPT = 2000  # inputs whose lines are kept until we learn whether they failed (the latest to print)


class Manager:
    def __init__(self):
        self.lock = threading.Lock()
        self.listeners = set()  # callables taking a JSON-ready dict; called from the watch thread
        self.address, self.api_key, self.embedded = None, None, False
        self.state, self.heard = None, 0.0
        self.logs = collections.OrderedDict()  # job id (hex) -> deque of [worker, stream, text]
        self.totals = {}  # job id (hex) -> lines of the job received so far (a page that has fewer missed some)
        self.histories = collections.OrderedDict()  # job id (hex) -> History
        self.home = None  # the private folder of this server's embedded cluster (its ipc:// path stays the same)
        self.pending = []  # (job, lines) not yet sent to the pages
        self.wake = threading.Event()
        self.outbox = collections.deque()  # commands for the broker, sent by the watch thread (it owns the socket)
        self.stopped = False
        self.resolve()
        self.thread = threading.Thread(target=self.watch, daemon=True, name="burla-panel")
        self.thread.start()

    # ------------------------------------------------------------------ what handlers call
    def snapshot(self):
        """The state pages get; "lines" counts each job's lines, every one of them pushed before this state (see
        receive), so a page that has fewer lost some on the way (a reconnect): it fetches the tail again."""
        with self.lock:
            return {"type": "state", "cluster": self.cluster(), "state": self.state, "lines": dict(self.totals)}

    def job_logs(self, job_id):
        """The kept tail of a job's lines, and how many lines it had in all."""
        with self.lock:
            return {"lines": list(self.logs.get(job_id, ())), "total": self.totals.get(job_id, 0)}

    def job_history(self, job_id):
        """What the panel draws of a job: {series, bars, failures, ...}; empty where it was never seen."""
        with self.lock:
            history = self.histories.get(job_id)
            return history.to_json() if history else History(None).to_json()

    def subscribe(self, listener):
        self.listeners.add(listener)

    def unsubscribe(self, listener):
        self.listeners.discard(listener)

    def start_embedded(self):
        from burla import local

        if self.home is None:
            self.home = tempfile.mkdtemp(prefix="burla-jupyter-")  # private (0700), ours for the server's life
            atexit.register(shutil.rmtree, self.home, True)
        address = local.cluster(directory=self.home).address
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
        hint = None
        if self.embedded:
            hint = "Kernels started while it runs use it, after a Stop and Start too (the address stays)."
        elif self.home is not None and self.address is None:
            hint = "Kernels started while it ran still point at it: their jobs fail until it starts again."
        return {"address": self.address, "embedded": self.embedded, "connected": connected, "hint": hint}

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
                self.heard = time.monotonic()
                self.state = self.record_history(header)
                live = {j["id"] for j in header.get("jobs", ())} | {j["id"] for j in header.get("recent", ())}
                for old in [j for j in self.logs if j not in live]:
                    del self.logs[old]
                    self.totals.pop(old, None)
                for old in [j for j in self.histories if j not in live]:
                    del self.histories[old]
            self.flush()  # (the lines this state counts go first)
            self.emit(self.snapshot())
        elif command == P.LOG:
            job = header.get("j", b"").hex()
            worker = str(header.get("w", "?")).rpartition("/")[0]
            raw = header.get("l", ())
            lines = [[worker, stream, text] for _, stream, text in raw]
            with self.lock:
                self.logs.setdefault(job, collections.deque(maxlen=LOG_TAIL)).extend(lines)
                self.totals[job] = self.totals.get(job, 0) + len(lines)
                self.pending.append((job, lines))
                self.history(job).add_lines(worker, raw)  # (lines can come before the STATE that lists the job)

    def history(self, job):
        history = self.histories.get(job)
        if history is None:
            history = self.histories[job] = History(None)
            while len(self.histories) > HISTORY_JOBS:  # the oldest ended job goes first, else the oldest
                old = next((j for j, h in self.histories.items() if h.ended), next(iter(self.histories)))
                del self.histories[old]
        return history

    def record_history(self, state):
        """Feed each job's history from a STATE; the state the pages get, without the bars and failures (the
        panel fetches those for the job it shows: they would make every push, 4 a second, heavy)."""
        busy = {w.get("id"): w.get("busy", 0) for w in state.get("workers", ())}
        running = {j.get("id") for j in state.get("jobs", ())}
        light = dict(state)
        for key in ("jobs", "recent"):
            records = []
            for record in state.get(key, ()):
                job = record.get("id")
                seen = job in self.histories or key == "jobs" or record.get("failures")
                if seen and (key == "jobs" or job not in running):  # (an ended job never seen running: nothing
                    self.history(job).sample(record, busy, key == "jobs")  # to draw; one listed twice runs)
                records.append({k: v for k, v in record.items() if k not in ("bars", "failures")})
            light[key] = records
        return light

    def flush(self):
        """Send the log lines gathered since the last flush: the newest MAX_PUSH_LINES of each job (the page shows
        a tail; the rest are counted, and the server keeps the last LOG_TAIL for a job opened later). Each batch
        says the job's total after it, so a page can tell a batch it already has (from a fetched tail) or a gap."""
        with self.lock:
            pending, self.pending = self.pending, []
            totals = {job: self.totals.get(job, 0) for job, _ in pending}
        if not pending:
            return
        batches = collections.defaultdict(list)
        for job, lines in pending:
            batches[job].extend(lines)
        for job, lines in batches.items():
            skipped = max(0, len(lines) - MAX_PUSH_LINES)
            self.emit({"type": "logs", "job": job, "lines": lines[skipped:], "skipped": skipped,
                       "total": totals[job]})

    def emit(self, message):
        text = json.dumps(message)
        for listener in list(self.listeners):
            try:
                listener(text)
            except Exception:  # a closed page must not stop the others
                self.listeners.discard(listener)


class History:
    """What the panel draws of one job, bounded whatever its size.

    series: buckets of SERIES_STEP seconds (doubled, merging pairs, whenever there are more than SERIES_POINTS),
    each [t, done, failed, slots, busy of each worker]: done and failed as the last STATE of the bucket said (they
    only grow, so coarser buckets lose no calls), slots and busy averaged over its STATEs. Times are the broker's
    (started + elapsed), the clock the timeline's bars use.
    bars: [slot, t0, t1, calls, failed, results] per RESULT of the job, merged by seq from the broker's latest 64;
    past MAX_BARS, a slot's bars that start in one cell of a time grid merge, the grid ever coarser (so the timeline
    keeps the job's whole span at an even resolution).
    failures: the broker's failed inputs, each with the log lines its input printed.
    """

    def __init__(self, started):
        self.started = started
        self.step = SERIES_STEP
        self.buckets = []  # [index, t, done, failed, slots sum, samples, {worker: busy sum}]
        self.workers = []  # the series' workers, in the order they first ran the job
        self.bars, self.bar_seq, self.missed = [], 0, 0
        self.bar_step = 0.0  # seconds of a timeline cell once bars merge (0: not yet)
        self.last_bar = {}  # slot -> its latest bar, which the next may merge into
        self.failures = collections.OrderedDict()  # input index -> {i, type, msg, tb, lines}
        self.lines = collections.OrderedDict()  # input index -> deque of [worker, stream, text], latest inputs
        self.ended = False

    def sample(self, record, busy, running):
        if self.ended:
            return
        if self.started is None:
            self.started = record.get("started")
        started = self.started or 0.0
        t = started + float(record.get("elapsed") or 0.0)
        if not running:  # its last record: the series ends where it ended
            t = float(record.get("finished") or t)
        if not self.buckets and t - started < 2.0:
            self.add_point(started, 0, 0, 0, {})  # seen from its start: the first rate is right
        workers = {}
        if running:
            for w in record.get("workers") or ():
                name = w if w in self.workers or len(self.workers) < SERIES_WORKERS else "other"
                if name not in self.workers:
                    self.workers.append(name)
                workers[name] = workers.get(name, 0) + busy.get(w, 0)
        self.add_point(t, record.get("done", 0), record.get("failed", 0),
                       record.get("slots", 0) if running else 0, workers)
        self.add_bars(record.get("bars") or ())
        self.add_failures(record.get("failures") or ())
        if not running:
            self.ended = True
            self.lines.clear()  # every failure is in: no more lines to match

    def add_point(self, t, done, failed, slots, workers):
        index = int(max(t - (self.started or 0.0), 0.0) // self.step)
        if self.buckets and self.buckets[-1][0] >= index:
            bucket = self.buckets[-1]
            bucket[1:4] = [t, done, failed]
            bucket[4] += slots
            bucket[5] += 1
            for w, n in workers.items():
                bucket[6][w] = bucket[6].get(w, 0) + n
        else:
            self.buckets.append([index, t, done, failed, slots, 1, dict(workers)])
        if len(self.buckets) > SERIES_POINTS:
            self.step *= 2
            merged = []
            for bucket in self.buckets:
                index = bucket[0] // 2
                if merged and merged[-1][0] == index:
                    last = merged[-1]
                    last[1:4] = bucket[1:4]
                    last[4] += bucket[4]
                    last[5] += bucket[5]
                    for w, n in bucket[6].items():
                        last[6][w] = last[6].get(w, 0) + n
                else:
                    merged.append([index, *bucket[1:6], dict(bucket[6])])
            self.buckets = merged

    def add_bars(self, bars):
        new = [b for b in bars if isinstance(b, (list, tuple)) and len(b) >= 6 and b[0] > self.bar_seq]
        if not new:
            return
        new.sort(key=lambda b: b[0])
        self.missed += max(new[0][0] - self.bar_seq - 1, 0)  # results that came and went between two STATEs
        self.bar_seq = new[-1][0]
        for _, slot, t0, t1, n, failed, *_ in new:
            self.put_bar([str(slot), t0, t1, n, failed, 1])
        while len(self.bars) > MAX_BARS:
            span = max(b[2] for b in self.bars) - min(b[1] for b in self.bars)
            if self.bar_step > 2 * span:  # (more slots than bars allowed: keep the latest)
                self.bars = sorted(self.bars, key=lambda b: b[2])[-MAX_BARS:]
                break
            self.bar_step = self.bar_step * 2 if self.bar_step else max(span / 256, 0.01)
            bars, self.bars, self.last_bar = self.bars, [], {}
            for bar in sorted(bars, key=lambda b: b[1]):
                self.put_bar(bar)

    def put_bar(self, bar):
        """Append a bar; once coarsened, a slot's bars that start in one cell of bar_step seconds are one bar."""
        last = self.last_bar.get(bar[0])
        if last is not None and self.bar_step and int(last[1] // self.bar_step) == int(bar[1] // self.bar_step):
            last[1], last[2] = min(last[1], bar[1]), max(last[2], bar[2])
            last[3], last[4], last[5] = last[3] + bar[3], last[4] + bar[4], last[5] + bar[5]
        else:
            self.bars.append(bar)
            self.last_bar[bar[0]] = bar

    def add_failures(self, failures):
        for f in failures:
            i = f.get("i")
            if not isinstance(i, int):
                continue
            kept = self.failures.get(i)
            if kept is None:
                if len(self.failures) >= MAX_FAILURES:
                    continue
                lines = self.lines.pop(i, collections.deque(maxlen=INPUT_LINES))
                kept = self.failures[i] = {"i": i, "lines": lines}
            for key in ("type", "msg", "tb"):
                if f.get(key) or key not in kept:
                    kept[key] = f.get(key) or ""

    def add_lines(self, worker, lines):
        if self.ended:
            return
        for line in lines:
            i, stream, text = line[0], line[1], line[2]
            failed = self.failures.get(i)
            if failed is not None:
                failed["lines"].append([worker, stream, text])
                continue
            kept = self.lines.get(i)
            if kept is None:
                kept = self.lines[i] = collections.deque(maxlen=INPUT_LINES)
                if len(self.lines) > INPUTS_KEPT:
                    self.lines.popitem(last=False)
            kept.append([worker, stream, text])

    def to_json(self):
        points = []
        for _, t, done, failed, slots, samples, busy in self.buckets:
            points.append([round(t, 3), done, failed, round(slots / samples, 2)] +
                          [round(busy.get(w, 0) / samples, 2) for w in self.workers])
        failures = [{**f, "lines": list(f["lines"])} for f in self.failures.values()]
        # (copies: the handler serializes them after the lock is let go, while the watch thread goes on)
        return {"started": self.started, "step": self.step, "workers": list(self.workers), "points": points,
                "bars": [list(b) for b in self.bars], "missed": self.missed, "failures": failures,
                "ended": self.ended}
