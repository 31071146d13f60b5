"""A job's state in the broker: its queue of input batches, and its outbox of what its client must get.

The outbox numbers every result, log line and (for a detached job) the job's end. An entry stays until the client
acknowledges it (ACK), so a client that lost its connection, or a new process that attaches, gets every outcome it
does not hold, in order; the client drops what it has seen, so each input ends in exactly one outcome there. While
the client keeps up the entries stay in memory; they spill to the store when it is away or far behind, and a
detached job's are written there as they come (and kept for its retention).
"""

import collections
import time

from burla import protocol as P

OUTBOX_MEMORY = 256 << 20  # a job's unacknowledged entries held in memory before they spill to disk
LOG_KEEP = 64 << 20  # log text a job keeps for a client that is behind, away or detached; more is counted, dropped
FAILURES_KEPT = 20  # failed inputs a job's record lists
FAILURE_TEXT = 2000  # characters of a failure's message, and of its traceback's end, in a record
BARS_KEPT = 64  # a running job's latest RESULTs in its record (a dashboard polling 4x a second merges them by seq)


class Batch:
    __slots__ = ("header", "frames", "start", "n", "size", "progress", "isolate", "deaths", "skip")

    def __init__(self, header, frames, size=None):
        if frames is not None and len(header["z"]) != len(frames):
            raise P.ProtocolError("BATCH whose frames do not match their flags")
        self.header, self.frames = header, frames  # frames None: on disk (a detached job's), read when sent
        self.start, self.n = header["i"], header["n"]
        self.size = sum(len(f) for f in frames) if size is None else size
        self.progress = 0  # inputs with an outcome so far
        self.isolate = None  # after a crash: run one input per RESULT from this offset, to learn who crashes
        self.deaths = {}  # offset -> executor deaths while the input at that offset was running
        self.skip = set()  # offsets that need no run: failed by crashing executors, or done before a restart


class Cursor:
    """Where a connection is in reading a job's outbox. The job's client has one; a reader (burla.Job.logs, a
    second process looking in) has its own, which ends with the ATTACHED marker."""

    __slots__ = ("ident", "next", "until", "marker", "logs_only", "reader")

    def __init__(self, ident, after, until, marker, logs_only=False, reader=False):
        self.ident, self.next, self.until, self.marker = ident, after + 1, until, marker
        self.logs_only, self.reader = logs_only, reader


class Outbox:
    def __init__(self, job_id, store, durable, last=0):
        self.job_id, self.store, self.durable = job_id, store, durable
        self.mem = collections.deque()  # [seq, command, header, payload, size]: entries not on disk, in order
        self.mem_bytes = 0
        self.next = last + 1  # number of the next entry
        self.acked = 0  # the client holds every entry up to this one
        self.disk_hi = last  # entries acked+1 .. disk_hi are in the store (all of them, when durable)
        self.spilling = False  # the client is away: entries go to disk as they come
        self.log_bytes = 0  # log text among the unacknowledged entries
        self.cache = {}  # entries read from disk ahead of a cursor

    def append(self, command, header, payload=()):
        seq = self.next
        self.next += 1
        header = dict(header, q=seq)
        size = sum(len(f) for f in payload)
        if command == P.LOG:
            self.log_bytes += size + sum(len(line[2]) for line in header["l"])
        if self.durable or self.spilling:
            self.store.put_entry(self.job_id, seq, command, header, payload)
            self.disk_hi = seq
        else:
            self.mem.append((seq, command, header, payload, size))
            self.mem_bytes += size
        return seq

    def spill(self):
        """Move what is in memory to the store (Full if it does not fit: then nothing moved)."""
        for seq, command, header, payload, _ in self.mem:
            try:
                self.store.put_entry(self.job_id, seq, command, header, payload)
            except Exception:
                # (the ones this spill wrote go again: they stay in memory)
                self.store.forget("outbox", "job = ? AND seq > ? AND seq <= ?", (self.job_id, self.disk_hi, seq))
                raise
        if self.mem:
            self.disk_hi = self.mem[-1][0]
        self.mem.clear()
        self.mem_bytes = 0

    def get(self, seq):
        """(command, header, payload) of entry seq, or None if it was acknowledged (and let go)."""
        if seq <= self.acked and not self.durable:
            return None
        if seq <= self.disk_hi:
            entry = self.cache.pop(seq, None)
            if entry is None:
                self.cache = {s: (c, h, f) for s, c, h, f in
                              self.store.entries(self.job_id, seq, self.disk_hi)}
                entry = self.cache.pop(seq, None)
            return entry
        if not self.mem or seq < self.mem[0][0]:
            return None
        _, command, header, payload, _ = self.mem[seq - self.mem[0][0]]
        return command, header, payload

    def ack(self, q):
        q = min(q, self.next - 1)
        if q <= self.acked:
            return
        before, self.acked = self.acked, q
        while self.mem and self.mem[0][0] <= q:
            self.mem_bytes -= self.mem.popleft()[4]
        if self.durable:
            return  # kept for the job's retention
        if before < self.disk_hi:
            self.store.drop_entries(self.job_id, min(q, self.disk_hi))
        if q == self.next - 1:
            self.log_bytes = 0  # (log text is counted while unacknowledged; exactly, once all are)


class Job:
    def __init__(self, ident, header, payload, owner):
        """header has passed P.check."""
        functions = header.get("fn", 1)
        if len(payload) < functions:
            raise P.ProtocolError("SUBMIT without its function")
        self.id = header["j"]
        self.header = header
        self.client = ident  # the connection results go to (None: the client is away)
        self.client_id = header.get("c", b"")
        self.owner = owner  # the submitter's role: only it may feed, end, attach to or cancel the job, or see it
        self.function, self.digest = list(payload[:functions]), header["d"]
        if P.function_digest(self.function) != self.digest:
            raise P.ProtocolError("SUBMIT whose function is not its digest's")
        self.cpu = float(header.get("cpu", 1))
        self.ram = float(header.get("ram", 0))
        self.gpu = gpu_request(header.get("gpu"))
        self.py = header.get("py")  # the client's interpreter: only workers of the same run its calls (None: any)
        self.par = header.get("par")
        self.total = header.get("n")  # inputs in all, if the client knows
        # r: retries, t: timeout, c: go on after a failed call
        self.options = header.get("o") or {}
        self.env = header.get("env")  # see burla.env; None: each worker's own
        self.env_key = self.env["k"] if self.env is not None else None
        self.archive = list(payload[functions:]) or None  # the job's local packages
        self.image = self.env.get("img") if self.env is not None else None
        self.parent = (header["pa"]["j"], header["pa"]["s"]) if "pa" in header else None  # a nested job's caller
        self.detached = bool(header.get("dt"))
        self.lease = float(header.get("ls") or P.JOB_LEASE)
        self.stuck = 0  # heartbeats for which this nested job could get no slot at all
        self.queue = collections.deque()
        self.pending = {}  # batch start -> bytes, for the batches the client sent that are not complete: its credit
        self.pending_bytes = 0
        self.held = set()  # starts of the batches received and not complete (ATTACHED tells the client)
        self.told = 0  # the most slots the client was told fit (its window is P.window of that)
        self.slots = set()
        self.started = time.time()
        self.done = header.get("rs", 0)
        self.failed = 0  # calls that raised (or crashed, or timed out)
        self.sent = 0  # inputs the client has submitted so far
        self.sealed = False  # every input is in (SEAL)
        self.dropped_lines = 0  # log lines its client was too far behind to take, not yet reported
        self.state, self.reason, self.finished = "running", None, None
        self.away = None  # monotonic time since when its client is away
        self.stored = False  # its definition is in the store (detached, or spilled, or loaded from there)
        self.outbox = None  # set by the scheduler
        self.name = header.get("nm")  # what dashboards call it (its function, and its notebook cell)
        self.failures = []  # the first FAILURES_KEPT failed inputs, for dashboards: {i, type, msg, tb}
        self.bars = collections.deque(maxlen=BARS_KEPT)  # the latest RESULTs: [seq, slot, t0, t1, calls, failed]
        self.bar_seq = 0
        self.call_cancels = set()  # inputs whose calls alone were cancelled (option k), until their batch is done
        self.cursors = []  # of connections reading the outbox; the job's client's is cursors[0] when attached
        self.spooled = 0  # a detached job's inputs in the store (told to its client in SPOOLED)
        self.note = ""  # what its client was last told of its wait for VMs (NOTE)

    def complete(self, batch):
        if self.call_cancels:
            self.call_cancels.difference_update(range(batch.start, batch.start + batch.n))
        size = self.pending.pop(batch.start, None)
        if size is not None:
            self.pending_bytes -= size
        self.held.discard(batch.start)

    def remaining(self):
        """Inputs without an outcome, if all are in."""
        return self.total - self.done if self.sealed and self.total is not None else None

    def failed_call(self, error):
        """Keep what a dashboard shows of a failed input (the first few, cut short: records travel in STATE)."""
        if len(self.failures) < FAILURES_KEPT:
            self.failures.append({"i": error["i"], "type": error["type"][:200], "msg": error["msg"][:FAILURE_TEXT],
                                  "tb": error.get("tb", "")[-FAILURE_TEXT:]})

    def ran(self, slot, seconds, calls, failed):
        """A RESULT came: a bar of the task timeline, from about when its calls began to now."""
        now = time.time()
        self.bar_seq += 1
        self.bars.append([self.bar_seq, slot, round(now - seconds, 3), round(now, 3), calls, failed])

    def record(self, full=False):
        """The job as JOBS and STATUS describe it (its owner sees it); full: with its failures and the latest bars
        of its timeline (what a dashboard draws)."""
        now = time.time()
        extra = {}
        if full:  # (an ended job's too: the bars of its last moments reach a dashboard that polls)
            extra["failures"] = self.failures
            extra["bars"] = list(self.bars)
        return {"id": self.id.hex(), "name": self.name, **extra, "state": self.state, "done": self.done, "failed": self.failed,
                "submitted": self.sent, "total": self.total if self.sealed or self.total else None,
                "queued": sum(b.n for b in self.queue), "slots": len(self.slots), "started": self.started,
                "elapsed": (self.finished or now) - self.started, "finished": self.finished,
                "detached": int(self.detached), "attached": int(self.client is not None or any(not c.reader for c in self.cursors)), "reason": self.reason,
                "workers": sorted({s.worker_id for s in self.slots})}


def gpu_request(spec):
    """None | count | "A100" | "A100:2" (checked by P.check) -> (type or None, count)."""
    if spec in (None, 0, ""):
        return (None, 0)
    if isinstance(spec, int):
        return (None, spec)
    name, _, count = spec.partition(":")
    return (name or None, int(count or 1))
