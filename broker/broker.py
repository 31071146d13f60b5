"""The broker: one ROUTER socket between clients and workers.

It keeps each job's queue of input batches, hands batches to executor slots that have credit and whose worker has
room for the job's cpu/ram/gpu, forwards results and log lines to the job's client, re-queues the batches of a slot
that died, and drops the jobs of clients that went silent. It never runs user code and never unpickles payloads.
"""

import collections
import logging
import os
import signal
import socket as pysocket
import time

import msgpack
import zmq

from burla import protocol as P

log = logging.getLogger("burla.broker")

MAX_ATTEMPTS = 3  # executor deaths while one input runs before that input fails with WorkerDiedError
STOP_GRACE = 0.5  # seconds a cancelled call has to stop on SIGUSR1 before its executor is killed
ENV_RETRY_AFTER = 60.0  # seconds before a worker that failed to prepare an environment is asked again
# A client whose queue is full (it is not reading) gets what must reach it (results, logs, its job's end) from a
# backlog, in order; log lines past LOG_BACKLOG are dropped and counted, and a backlog past BACKLOG_MAX ends the
# client's jobs: the broker never blocks on a peer, and never holds without bound what a peer does not read.
LOG_BACKLOG = 16 << 20
BACKLOG_MAX = 256 << 20
# What one user may park in the broker: jobs at once, and inputs not yet answered over all of them (each job is
# also held to its own window); and one message (a batch of one huge input, a function with its packages).
JOBS_PER_OWNER = 256
OWNER_BYTES_MAX = 1 << 30
ONE_MESSAGE_MAX = 1 << 30
STATE_WORKERS = 1000  # workers listed in a STATUS or STATE (the busiest); the others are counted


class Batch:
    __slots__ = ("header", "frames", "start", "n", "size", "progress", "isolate", "deaths", "skip")

    def __init__(self, header, frames):
        if len(header["z"]) != len(frames):
            raise P.ProtocolError("BATCH whose frames do not match their flags")
        self.header, self.frames = header, frames
        self.start, self.n = header["i"], header["n"]
        self.size = sum(len(f) for f in frames)
        self.progress = 0  # inputs with an outcome so far
        self.isolate = None  # after a crash: run one input per RESULT from this offset, to learn who crashes
        self.deaths = {}  # offset -> executor deaths while the input at that offset was running
        self.skip = set()  # offsets that failed by crashing executors: never run again


class Job:
    def __init__(self, ident, header, payload, owner):
        """header has passed P.check."""
        functions = header.get("fn", 1)
        if len(payload) < functions:
            raise P.ProtocolError("SUBMIT without its function")
        self.id = header["j"]
        self.client = ident  # the client socket to send results to
        self.client_id = header.get("c", b"")
        self.owner = owner  # the submitter's role: only it may feed, end or cancel the job, or see it
        self.function, self.digest = list(payload[:functions]), header["d"]
        self.cpu = float(header.get("cpu", 1))
        self.ram = float(header.get("ram", 0))
        self.gpu = gpu_request(header.get("gpu"))
        self.par = header.get("par")
        self.total = header.get("n")  # inputs in all, if the client knows
        # r: retries, t: timeout, c: go on after a failed call
        self.options = header.get("o") or {}
        self.env = header.get("env")  # see burla.env; None: each worker's own
        self.env_key = self.env["k"] if self.env is not None else None
        self.archive = list(payload[functions:]) or None  # the job's local packages
        self.image = self.env.get("img") if self.env is not None else None
        self.parent = (header["pa"]["j"], header["pa"]["s"]) if "pa" in header else None  # a nested job's caller
        self.stuck = 0  # heartbeats for which this nested job could get no slot at all
        self.queue = collections.deque()
        self.pending = {}  # batch start -> bytes, for the batches the client sent that are not complete: its credit
        self.pending_bytes = 0
        self.told = 0  # the most slots the client was told fit (its window is P.window of that)
        self.slots = set()
        self.started = time.time()
        self.done = 0
        self.failed = 0  # calls that raised (or crashed, or timed out)
        self.sent = 0  # inputs the client has submitted so far
        self.dropped_lines = 0  # log lines its client was too far behind to take, not yet reported

    def complete(self, batch):
        size = self.pending.pop(batch.start, None)
        if size is not None:
            self.pending_bytes -= size


class Worker:
    def __init__(self, ident, header):
        """header has passed P.check."""
        self.ident = ident
        self.id = header["w"]
        self.host = header.get("host", "?")
        self.pid = header.get("pid")
        self.nslots = header["slots"]
        self.cpu = float(header.get("cpu", 1))
        self.ram = float(header.get("ram", 0))
        self.gpus = header.get("gpu", [])
        self.env = header.get("env")  # the key of the worker's own environment
        self.runtime = header.get("ctr")  # container runtime: None, "?" (not known yet), name
        self.failed_envs = {}  # environment key -> (why this worker could not prepare it, when)
        self.claims = {}  # slot identity -> (cpu, ram, gpus) its job holds; what is free is derived from these
        self.slots = set()
        self.last_seen = time.monotonic()

    def free(self):
        """(cpu, ram, gpus) not claimed by a slot's job: derived from the claims that exist, never a running sum,
        so no sequence of messages can make them drift."""
        cpu, ram, gpus = self.cpu, self.ram, list(self.gpus)
        for c, r, claimed in self.claims.values():
            cpu, ram = cpu - c, ram - r
            for g in claimed:
                if g in gpus:  # (a worker may register again with fewer)
                    gpus.remove(g)
        return cpu, ram, gpus

    def env_failed(self, key):
        """Why this worker could not prepare that environment lately (a minute: the cause may pass), or None."""
        failed = self.failed_envs.get(key)
        if failed is not None and time.monotonic() - failed[1] < ENV_RETRY_AFTER:
            return failed[0]
        return None

    def target(self, job):
        """The key of the environment the job's calls run in on this worker."""
        return job.env_key or self.env

    def takes_env(self, job, confirmed):
        """Whether the job's environment can run here: an image needs a container runtime (confirmed: one the
        worker has found, not "?" while it looks), and an environment it failed to prepare lately is not retried."""
        if job.image is not None and (not self.runtime or (confirmed and self.runtime == "?")):
            return False
        return not self.env_failed(job.env_key)

    def could_fit(self, job):
        return self.takes_env(job, confirmed=False) and \
            self.cpu >= job.cpu and self.ram >= job.ram and gpus_match(self.gpus, job.gpu)

    def fits(self, job):
        if not self.takes_env(job, confirmed=True):
            return False
        cpu, ram, gpus = self.free()
        return cpu >= job.cpu and ram >= job.ram and gpus_match(gpus, job.gpu)


class Slot:
    def __init__(self, ident, name, worker_id, pid, env=None):
        self.ident, self.name, self.worker_id, self.pid = ident, name, worker_id, pid
        self.env = env  # key of the environment its executor runs in
        self.preparing = None  # key of the environment its worker is switching it to (it takes nothing meanwhile)
        self.owner = None  # the role whose calls this executor has run: it never runs another's (None: fresh)
        self.job = None
        self.inflight = collections.OrderedDict()  # (job id, start) -> (Job, Batch)
        self.credit = P.PREFETCH
        self.functions = collections.OrderedDict()  # digests this slot has cached, in LRU order

    def may_serve(self, job):
        return self.owner is None or self.owner == job.owner


def message_size(header, payload):
    return len(msgpack.packb(header)) + sum(len(f) for f in payload)


def gpu_request(spec):
    """None | count | "A100" | "A100:2" (checked by P.check) -> (type or None, count)."""
    if spec in (None, 0, ""):
        return (None, 0)
    if isinstance(spec, int):
        return (None, spec)
    name, _, count = spec.partition(":")
    return (name or None, int(count or 1))


def gpus_match(available, request):
    kind, count = request
    if kind is None:
        return len(available) >= count
    return sum(1 for g in available if g.lower() == kind.lower()) >= count


UNKNOWN = "unknown"  # the owner of an executor whose past this broker does not know: it serves nobody


class Backlog:
    __slots__ = ("items", "bytes")

    def __init__(self):
        self.items, self.bytes = collections.deque(), 0


class Broker:
    def __init__(self, bind, parent_fd=None, keys=None):
        self.ctx = zmq.Context()
        self.sock = P.socket(self.ctx, zmq.ROUTER)
        self.keys = keys
        self.auth = keys.serve(self.ctx, self.sock) if keys is not None else None  # held: its thread serves ZAP
        self.sock.bind(bind)
        self.drops, self.drops_logged = 0, 0.0
        self.address = self.sock.getsockopt_string(zmq.LAST_ENDPOINT)
        self.parent_fd = parent_fd
        self.workers = {}  # worker id -> Worker
        self.slots = {}  # slot's connection identity -> Slot
        self.slot_names = {}  # "worker id/index" -> connection identity
        self.jobs = {}  # job id -> Job
        self.clients = {}  # client id -> last seen (monotonic)
        self.order = collections.deque()  # job ids, rotated for fairness between jobs
        self.stopping = {}  # slot identity -> when to kill its executor if its cancelled call still runs
        self.watchers = {}  # connection identity -> (role, when its WATCH expires)
        self.recent = collections.deque(maxlen=20)  # finished jobs, for dashboards
        self.backlogs = {}  # client connection -> Backlog of what its full queue could not take yet
        self.slot_owners = {}  # slot name -> the role its current executor has served (see Slot.owner)
        self.dirty = False
        self.handlers = {
            P.SUBMIT: self.on_submit, P.BATCH: self.on_batch, P.END: self.on_end, P.CANCEL: self.on_cancel,
            P.STATUS: self.on_status, P.RESULT: self.on_result, P.LOG: self.on_log, P.READY: self.on_ready,
            P.REGISTER: self.on_register, P.SLOT_DIED: self.on_slot_died, P.HEARTBEAT: self.on_heartbeat,
            P.ENV: self.on_env, P.WATCH: self.on_watch, P.SLOT_KEY: self.on_slot_key,
        }

    # ---------------------------------------------------------------- loop
    def run(self):
        poller = zmq.Poller()
        poller.register(self.sock, zmq.POLLIN)
        if self.parent_fd is not None:
            poller.register(self.parent_fd, zmq.POLLIN)
        next_beat = time.monotonic() + P.HEARTBEAT_INTERVAL
        next_push = time.monotonic()
        while True:
            wake = [next_beat, *self.stopping.values()] + ([next_push] if self.watchers else [])
            timeout = max(0.0, min(wake) - time.monotonic())
            if self.backlogs:
                timeout = min(timeout, 0.005)  # a full queue has no "writable" event per peer: look again soon
            events = dict(poller.poll(timeout * 1000))
            if self.parent_fd is not None and self.parent_fd in events:
                break  # the process that started us is gone (the pipe's write end closed)
            if self.sock in events:
                for _ in range(1000):  # drain, but let heartbeats through under a flood
                    try:
                        self.handle(*P.recv_routed(self.sock))
                    except P.VersionMismatch as e:
                        self.send_raw(e.ident, P.version_notice())
                        self.dropped(str(e))
                    except P.ProtocolError as e:
                        self.dropped(str(e))
                    except Exception:  # a bug in one handler must not take the cluster down: say it, go on
                        log.exception("a message failed to handle")
                    if not self.sock.poll(0):
                        break
            for step, due in ((self.flush_backlogs, self.backlogs), (self.check_stopping, self.stopping),
                              (self.dispatch, self.dirty)):
                if due:
                    self.guarded(step)
            if self.watchers and time.monotonic() >= next_push:
                self.guarded(self.push_state)
                next_push = time.monotonic() + P.WATCH_INTERVAL
            if time.monotonic() >= next_beat:
                self.guarded(self.beat)
                next_beat = time.monotonic() + P.HEARTBEAT_INTERVAL
        self.sock.close(0)

    def guarded(self, step):
        try:
            step()
        except Exception:
            log.exception("%s failed", step.__name__)

    def handle(self, ident, role, command, header, payload):
        """Check the message where it enters (its command is allowed for the sender's role, every field is of its
        type and range), then hand it to its handler, which can trust it."""
        handler = self.handlers.get(command)
        if handler is None:
            raise P.ProtocolError(f"unknown command {command!r}")
        if role is not None:
            kind, _, name = role.partition(":")
            allowed = {"worker": P.WORKER_COMMANDS, "slot": P.SLOT_COMMANDS, "client": P.CLIENT_COMMANDS}.get(kind)
            if not allowed or command not in allowed:
                raise P.ProtocolError(f"a {kind} may not send {P.NAMES.get(command, command)}")
            if kind == "slot":
                name, _, generation = name.partition("#")
                if not self.keys.current_slot_key(name, generation):
                    raise P.ProtocolError("a message with a slot's old key")  # (a process its executor left)
        P.check(command, header)
        if role is not None and kind == "slot" and command == P.READY and \
                (header["s"] != name or not name.startswith(header["w"] + "/")):
            raise P.ProtocolError("READY for another slot")
        handler(ident, header, payload, role)

    def dropped(self, why):
        """Count a dropped message; say so at most once a second, so a flood of junk cannot flood the log."""
        self.drops += 1
        now = time.monotonic()
        if now - self.drops_logged >= 1.0:
            log.warning("dropped %d malformed or forbidden message(s); latest: %s", self.drops, why)
            self.drops, self.drops_logged = 0, now

    def send(self, ident, command, header, payload=(), keep=False, strict=False):
        """Send without ever blocking; False only if the peer is gone (ROUTER_MANDATORY). A peer whose queue is
        full is behind: a message that must reach it (keep) waits in its backlog, in order; any other is dropped,
        unless strict, when a full queue counts as gone (an executor holds only its credit's worth)."""
        backlog = self.backlogs.get(ident)
        if backlog is not None and keep:
            return self.keep(ident, backlog, command, header, payload)
        try:
            P.send(self.sock, command, header, payload, ident=ident, flags=zmq.NOBLOCK)
            return True
        except zmq.Again:
            if keep:
                backlog = self.backlogs[ident] = Backlog()
                return self.keep(ident, backlog, command, header, payload)
            return not strict
        except zmq.ZMQError as e:
            if e.errno != zmq.EHOSTUNREACH:
                raise
            return False

    def send_raw(self, ident, frames):
        try:
            self.sock.send_multipart([ident, *frames], flags=zmq.NOBLOCK)
        except zmq.ZMQError:
            pass

    def keep(self, ident, backlog, command, header, payload):
        size = message_size(header, payload)
        job = self.jobs.get(header.get("j"))
        if command == P.LOG and backlog.bytes > LOG_BACKLOG:
            if job is not None:
                job.dropped_lines += len(header["l"])
            return True
        backlog.items.append((command, header, payload))
        backlog.bytes += size
        if backlog.bytes > BACKLOG_MAX:
            del self.backlogs[ident]
            for other in [j for j in self.jobs.values() if j.client == ident]:
                log.warning("job %s cancelled: its client stopped reading (%d MB waiting for it)",
                            other.id.hex(), backlog.bytes >> 20)
                self.send(ident, P.REJECTED, {"j": other.id, "t": "credit", "e": (
                    f"the job was ended: this program stopped reading its results ({backlog.bytes >> 20} MB "
                    "waited for it at the broker)")})
                self.drop_job(other.id, "failed")
        return True

    def flush_backlogs(self):
        for ident, backlog in list(self.backlogs.items()):
            while backlog.items:
                command, header, payload = backlog.items[0]
                try:
                    P.send(self.sock, command, header, payload, ident=ident, flags=zmq.NOBLOCK)
                except zmq.Again:
                    break
                except zmq.ZMQError:  # gone
                    backlog.items.clear()
                    break
                backlog.items.popleft()
                backlog.bytes -= message_size(header, payload)
            if not backlog.items:
                del self.backlogs[ident]

    # ---------------------------------------------------------------- clients
    def on_submit(self, ident, h, payload, role=None):
        job = Job(ident, h, payload, role)
        if job.id in self.jobs:
            raise P.ProtocolError("SUBMIT of a job id already in use")
        mine = [j for j in self.jobs.values() if j.owner == role]
        if sum(len(f) for f in payload) > ONE_MESSAGE_MAX or len(mine) >= JOBS_PER_OWNER:
            self.send(ident, P.REJECTED, {"j": job.id, "e": (
                f"refused: a user may have {JOBS_PER_OWNER} jobs at once, and a job's function and local packages "
                f"{ONE_MESSAGE_MAX >> 20} MB")}, keep=True)
            return
        self.clients[job.client_id] = time.monotonic()
        if self.workers and not any(w.could_fit(job) for w in self.workers.values()):
            self.send(ident, P.REJECTED, self.no_fit(job), keep=True)
            return
        self.jobs[job.id] = job
        self.order.append(job.id)
        self.send(ident, P.ACCEPTED, {"j": job.id, "s": self.told(job)}, keep=True)

    def no_fit(self, job):
        """The REJECTED for a job no worker can run: because of its environment, or of its needs."""
        for w in self.workers.values():
            why = w.env_failed(job.env_key)
            if why:
                return {"j": job.id, "t": "env", "e": f"worker {w.id} could not prepare the job's environment:\n{why}"}
        return {"j": job.id, "e": self.no_fit_message(job)}

    def no_fit_message(self, job):
        if job.image is not None and not any(w.runtime for w in self.workers.values()):
            return (f"image={job.image!r} needs a worker that can run containers, and none of the "
                    f"{len(self.workers)} workers of this cluster has a container runtime (docker or podman) that "
                    "answers: start workers on hosts with one, or leave image=/dockerfile= out to use packages")
        kind, count = job.gpu
        want = f"func_cpu={job.cpu:g}, func_ram={job.ram:g}" + (f", func_gpu={kind or ''}:{count}" if count else "")
        have = "; ".join(
            f"{w.host} has {w.cpu:g} cpu, {w.ram:g} GB ram, {len(w.gpus)} gpu{' ' + ','.join(w.gpus) if w.gpus else ''}"
            for w in self.workers.values())
        return f"no worker in this cluster can ever run a call needing {want}: {have}"

    def fitting_slots(self, job):
        n = sum(len(w.slots) if w.could_fit(job) else 0 for w in self.workers.values())
        return min(n, job.par) if job.par else n

    def told(self, job):
        """The slots that fit the job, as the client is told: its window of batches follows, and is held to."""
        n = self.fitting_slots(job)
        job.told = max(job.told, n)
        return n

    def on_batch(self, ident, h, payload, role=None):
        job = self.jobs.get(h["j"])
        if job is None or job.owner != role or job.client != ident:
            return  # cancelled or finished: the client will not wait for it
        batch = Batch(h, payload)
        if batch.start in job.pending:
            raise P.ProtocolError("BATCH of a range already sent")
        # The client's credit: at most its window of batches, and of bytes unless it has none out (one input may
        # be larger than the window). Past it, the job ends: an honest client never gets there.
        owners = sum(j.pending_bytes for j in self.jobs.values() if j.owner == role)
        if len(job.pending) >= P.window(job.told) or batch.size > ONE_MESSAGE_MAX or \
                (job.pending and (job.pending_bytes >= P.MAX_OUTSTANDING_BYTES or owners >= OWNER_BYTES_MAX)):
            self.send(ident, P.REJECTED, {"j": job.id, "t": "credit", "e": (
                f"the client sent more than its window ({len(job.pending)} batches, {job.pending_bytes} bytes "
                "without outcomes): the job was ended")}, keep=True)
            self.drop_job(job.id, "failed")
            return
        job.pending[batch.start] = batch.size
        job.pending_bytes += batch.size
        job.queue.append(batch)
        job.sent = max(job.sent, batch.start + batch.n)
        self.dirty = True

    def on_end(self, ident, h, payload, role=None):
        self.finish(ident, h, role, "done")

    def on_cancel(self, ident, h, payload, role=None):
        self.finish(ident, h, role, "cancelled")

    def finish(self, ident, h, role, state):
        """END (every outcome is in) and CANCEL alike: the job's owner is done with it. A CANCEL may come from
        another connection of the same owner (a dashboard): then the job's client is told."""
        job = self.jobs.get(h["j"])
        if job is not None and job.owner == role:
            if ident != job.client:
                self.send(job.client, P.REJECTED, {"j": job.id, "t": "cancelled", "e": "the job was cancelled "
                                                   "from another connection (the JupyterLab panel, say)"},
                          keep=True)
            self.drop_job(job.id, state)

    def drop_job(self, job_id, state="cancelled"):
        """Forget a job: drop its queue and the batches waiting on executors, and stop its running calls."""
        job = self.jobs.pop(job_id, None)
        if job is None:
            return
        if state == "cancelled" and job.failed:
            state = "failed"
        self.recent.appendleft(dict(self.job_state(job), state=state, owner=job.owner))
        job.queue.clear()
        for slot in list(job.slots):
            self.send(slot.ident, P.CANCEL, {"j": job.id})  # the executor drops the batches it has not started
            running = [k for k in slot.inflight if k[0] == job.id]
            for key in running[1:]:  # an executor runs its batches in order: only the oldest can be running
                del slot.inflight[key]
                slot.credit += 1
            if running:
                self.stop_call(slot)
            else:
                self.unbind(slot)
        self.dirty = True

    def stop_call(self, slot, hard=False):
        """Ask the slot's worker to interrupt the running call (SIGUSR1), or to kill the executor (SIGKILL)."""
        worker = self.workers.get(slot.worker_id)
        if worker is not None:
            self.send(worker.ident, P.KILL, {"s": slot.name, "j": slot.job.id if slot.job else b"", "hard": int(hard)})
        if not hard:
            self.stopping[slot.ident] = time.monotonic() + STOP_GRACE

    def check_stopping(self):
        now = time.monotonic()
        for ident, deadline in list(self.stopping.items()):
            slot = self.slots.get(ident)
            if slot is None or slot.job is None or slot.job.id in self.jobs:
                del self.stopping[ident]  # stopped (or gone)
            elif now >= deadline:
                del self.stopping[ident]
                self.stop_call(slot, hard=True)  # the call ignored the signal (C code, say)

    def on_heartbeat(self, ident, h, payload, role=None):
        if "c" in h:
            self.clients[h["c"]] = time.monotonic()
            # answered on the client's heartbeat connection, which no large message holds up: a client judges
            # the broker alive by it while a big result is still arriving on the job's connection
            self.send(ident, P.HEARTBEAT, {"jobs": [j.id for j in self.jobs.values() if j.client_id == h["c"]]})
        else:
            worker = self.worker_by_ident(ident, h)
            if worker is None:
                self.send(ident, P.RECONNECT, {})
            else:
                worker.last_seen = time.monotonic()

    def on_status(self, ident, h, payload, role=None):
        self.send(ident, P.STATUS, self.state(role))  # (dropped if the asker does not read its answers)

    def state(self, role=None):
        """Workers, and the jobs the asker may see: its own (everything, on an unauthenticated socket)."""
        workers = [{
            "id": w.id, "host": w.host, "pid": w.pid, "slots": len(w.slots),
            "busy": sum(1 for s in w.slots if self.slots[s].job is not None),
            "cpu": w.cpu, "ram": w.ram, "gpu": w.gpus[:64],
            "preparing": sum(1 for s in w.slots if self.slots[s].preparing), "containers": w.runtime,
        } for w in self.workers.values()]
        if len(workers) > STATE_WORKERS:  # (a message stays under a frame)
            workers.sort(key=lambda w: -w["busy"])
            del workers[STATE_WORKERS:]
        jobs = [self.job_state(j) for j in self.jobs.values() if role is None or j.owner == role]
        recent = [{k: v for k, v in r.items() if k != "owner"} for r in self.recent
                  if role is None or r["owner"] == role]
        return {"workers": workers, "jobs": jobs, "recent": recent, "nworkers": len(self.workers)}

    def job_state(self, j):
        return {"id": j.id.hex(), "done": j.done, "failed": j.failed, "submitted": j.sent, "total": j.total,
                "queued": sum(b.n for b in j.queue), "slots": len(j.slots), "started": j.started,
                "elapsed": time.time() - j.started, "state": "running",
                "workers": sorted({s.worker_id for s in j.slots})}

    def on_watch(self, ident, h, payload, role=None):
        new = ident not in self.watchers
        self.watchers[ident] = (role, time.monotonic() + P.WATCH_EXPIRY)
        if new:
            self.push_state([ident])

    def push_state(self, idents=None):
        """STATE to watchers; one that expired or is gone is dropped, one that is behind misses this push."""
        now, states = time.monotonic(), {}  # (one state per role: dashboards of one user share it)
        for ident in list(idents or self.watchers):
            role, expires = self.watchers[ident]
            if role not in states:
                states[role] = self.state(role)
            if expires < now or not self.send(ident, P.STATE, states[role]):
                del self.watchers[ident]

    # ---------------------------------------------------------------- workers
    def worker_by_ident(self, ident, h):
        worker = self.workers.get(h.get("w"))
        return worker if worker is not None and worker.ident == ident else None

    def on_register(self, ident, h, payload, role=None):
        worker = Worker(ident, h)
        old = self.workers.get(worker.id)
        if old is not None and old.ident != ident and \
                time.monotonic() - old.last_seen < P.HEARTBEAT_INTERVAL * P.HEARTBEAT_LIVENESS:
            # (a worker that restarts, or dials again, waits until its old connection is silent for long enough)
            raise P.ProtocolError(f"REGISTER of worker id {worker.id!r}, which a live connection holds")
        self.workers[worker.id] = worker
        # Keep the slots it had (or whose READY came first) and what they hold.
        for slot in self.slots.values():
            if slot.worker_id == worker.id:
                worker.slots.add(slot.ident)
                if old is not None and slot.ident in old.claims:
                    worker.claims[slot.ident] = old.claims[slot.ident]
        self.send(ident, P.HEARTBEAT, {})
        self.dirty = True
        for job in list(self.jobs.values()):  # jobs that came before any worker: can this cluster run them?
            if job.done == 0 and not any(w.could_fit(job) for w in self.workers.values()):
                self.send(job.client, P.REJECTED, self.no_fit(job), keep=True)
                self.drop_job(job.id)
        if old is None:
            log.info("worker %s joined from %s with %d slots", worker.id, worker.host, worker.nslots)

    def on_ready(self, ident, h, payload, role=None):
        """An executor holds nothing and can take k batches: at start, after a restart, or after a rejoin (maybe
        over a new connection). What the slot of that name held before runs again."""
        worker_id, name = h["w"], h["s"]
        if not name.startswith(worker_id + "/"):
            raise P.ProtocolError("READY for a slot of another worker")
        for old in {self.slots.get(ident), self.slots.get(self.slot_names.get(name))} - {None}:
            self.remove_slot(old, "restarted" if old.pid != h.get("pid") else "dropped its tasks")
        slot = Slot(ident, name, worker_id, h.get("pid"), h.get("env"))
        slot.credit = h.get("k", P.PREFETCH)
        # The executor's owner is tied to its process (its slot key), not to a READY, which its user code can
        # send: only a fresh SLOT_KEY (a new executor) makes a slot fresh again.
        slot.owner = self.slot_owners.get(name)
        self.slots[ident] = slot
        self.slot_names[name] = ident
        worker = self.workers.get(slot.worker_id)
        if worker is not None:
            worker.slots.add(ident)
        self.dirty = True

    def on_slot_key(self, ident, h, payload, role=None):
        """The key a slot's next executor connects with (over TCP): admitted as that slot, and only that slot; the
        key of its previous executor is no longer admitted."""
        if self.worker_by_ident(ident, h) is None or not h["s"].startswith(h["w"] + "/"):
            raise P.ProtocolError("SLOT_KEY for a slot of another worker")
        if self.keys is not None:
            if h.get("new"):
                self.slot_owners.pop(h["s"], None)  # a new executor: fresh
            elif h["p"] not in self.keys.slot_roles:  # re-announced to a broker that does not know whom it served
                self.slot_owners[h["s"]] = UNKNOWN
            self.keys.admit_slot(h["s"], h["p"])

    def on_slot_died(self, ident, h, payload, role=None):
        slot = self.slots.get(self.slot_names.get(h["s"]))
        if slot is not None and slot.worker_id == h["w"] and self.worker_by_ident(ident, h) is not None:
            at = h.get("at") or {}
            if h.get("timeout"):
                self.remove_slot(slot, "its call ran past the job's timeout and was killed", at, timed_out=True)
            else:
                self.remove_slot(slot, f"its process exited with {describe_exit(h.get('code'))}", at)

    def on_result(self, ident, h, payload, role=None):
        """Results of a batch the slot holds; anything else (late, forged, of another job) is dropped."""
        slot = self.slots.get(ident)
        if slot is None:
            self.send(ident, P.RECONNECT, {})
            return
        key = (h["j"], h["i"])
        entry = slot.inflight.get(key)
        if entry is None:
            return
        job, batch = entry
        errors = h.get("e") or ()
        end = h.get("o", 0) + h.get("k", 0) + len(errors)
        if end > batch.n or len(h.get("z") or ()) > len(payload) or \
                not all(batch.start <= e["i"] < batch.start + batch.n for e in errors):
            raise P.ProtocolError("RESULT outside its batch")
        batch.progress = max(batch.progress, end)
        if h.get("f"):
            del slot.inflight[key]
            slot.credit += 1
            job.complete(batch)
            self.dirty = True
            if slot.job is not None and slot.job.id not in self.jobs and not slot.inflight:
                self.unbind(slot)  # a cancelled job's last call has stopped
        if self.jobs.get(job.id) is job:
            job.done += h.get("k", 0) + len(errors)
            job.failed += len(errors)
            self.send(job.client, P.RESULT, h, payload, keep=True)

    def on_log(self, ident, h, payload, role=None):
        slot = self.slots.get(ident)
        job = self.jobs.get(h["j"])
        if job is None or slot is None or not (slot.job is job or any(k[0] == job.id for k in slot.inflight)):
            return  # lines of a job this slot does not serve (a thread a finished call left behind, say)
        if job.dropped_lines:
            h = dict(h, x=job.dropped_lines)
        backlog = self.backlogs.get(job.client)
        if backlog is None or backlog.bytes <= LOG_BACKLOG:
            job.dropped_lines = 0
        self.send(job.client, P.LOG, h, payload, keep=True)
        for watcher, (watcher_role, _) in self.watchers.items():
            if watcher_role == job.owner and watcher != job.client:
                self.send(watcher, P.LOG, h, payload)

    def remove_slot(self, slot, why, at=None, timed_out=False):
        """Forget a slot whose executor is gone, and run what it held again. at: the input its call was running,
        if its worker knows (see P.WHERE); otherwise the oldest batch is the one that was running."""
        self.slots.pop(slot.ident, None)
        if self.slot_names.get(slot.name) == slot.ident:
            del self.slot_names[slot.name]
        worker = self.workers.get(slot.worker_id)
        if worker is not None:
            worker.slots.discard(slot.ident)
        for k, (job, batch) in enumerate(slot.inflight.values()):
            if at:
                running = (at.get("j"), at.get("i")) == (job.id, batch.start)
                culprit = at.get("o") if running else None
            else:
                running = k == 0
                culprit = batch.progress if running and batch.n - batch.progress - len(batch.skip) == 1 else None
            self.requeue(job, batch, why, culprit if isinstance(culprit, int) else None, running, timed_out)
        slot.inflight.clear()
        self.unbind(slot)
        self.dirty = True

    def remove_worker(self, worker, why):
        self.workers.pop(worker.id, None)
        if self.keys is not None:
            self.keys.revoke_slots(worker.id + "/")
        for ident in list(worker.slots):
            slot = self.slots.get(ident)
            if slot is not None:
                self.remove_slot(slot, f"its worker {worker.id} {why}")
        log.warning("worker %s removed: %s", worker.id, why)

    def requeue(self, job, batch, why, culprit=None, running=True, timed_out=False):
        """Run a batch again after its executor died. The batch that was running is re-run in isolation (one
        input per RESULT, its position in the WHERE record) so that the input that crashes is known; an input that
        was running at MAX_ATTEMPTS deaths fails with WorkerDiedError and is skipped, the rest go on."""
        if self.jobs.get(job.id) is not job:
            return
        if culprit is not None and 0 <= culprit < batch.n:
            deaths = batch.deaths[culprit] = batch.deaths.get(culprit, 0) + 1
            if deaths >= MAX_ATTEMPTS or timed_out:
                index = batch.start + culprit
                error = P.error_record(index, "burla.WorkerDiedError",
                                       f"input {index} was running when its worker process died, {deaths} times "
                                       f"(last time {why})")
                if timed_out:
                    error.update(type="burla.CallTimeoutError", msg=f"input {index}: {why}")
                batch.skip.add(culprit)
                job.done += 1
                job.failed += 1
                self.send(job.client, P.RESULT, {"j": job.id, "i": batch.start, "o": culprit, "k": 0,
                                                 "e": [error], "f": 0}, keep=True)
        if batch.skip.issuperset(range(batch.progress, batch.n)):
            job.complete(batch)
            return  # nothing left to run
        if running:
            batch.isolate = batch.progress
        job.queue.appendleft(batch)

    # ---------------------------------------------------------------- scheduling
    def bind(self, slot, worker, job):
        kind, count = job.gpu
        gpus = [g for g in worker.free()[2] if kind is None or g.lower() == kind.lower()][:count]
        worker.claims[slot.ident] = (job.cpu, job.ram, gpus)
        slot.job = job
        slot.owner = self.slot_owners[slot.name] = job.owner  # from now on this executor serves only this owner
        job.slots.add(slot)

    def unbind(self, slot):
        job = slot.job
        if job is None:
            return
        job.slots.discard(slot)
        slot.job = None
        worker = self.workers.get(slot.worker_id)
        if worker is not None:
            worker.claims.pop(slot.ident, None)

    def pick_job(self, slot, worker):
        for _ in range(len(self.order)):
            job = self.jobs.get(self.order[0])
            if job is None:
                self.order.popleft()
                continue
            self.order.rotate(-1)
            if job.queue and (not job.par or len(job.slots) < job.par) and slot.may_serve(job) and \
                    slot.env == worker.target(job) and worker.fits(job):
                self.bind(slot, worker, job)
                return job
        return None

    def dispatch(self):
        """Give queued batches to slots with credit, one batch per slot per pass so that work spreads: first to
        slots holding nothing, then as a second batch to prefetch."""
        self.dirty = False
        if not self.jobs:
            return
        progress, most = True, 0
        while progress:
            progress = False
            for slot in list(self.slots.values()):
                if slot.credit <= 0 or len(slot.inflight) > most:
                    continue
                job = slot.job
                if job is not None and not job.queue and not slot.inflight:
                    self.unbind(slot)
                    job = None
                if job is None:
                    worker = self.workers.get(slot.worker_id)
                    if worker is None or slot.preparing:
                        continue
                    job = self.pick_job(slot, worker)
                if job is None or not job.queue:
                    continue
                self.send_task(slot, job, job.queue.popleft())
                progress = True
            if not progress and most < P.PREFETCH:
                progress, most = True, most + 1
        self.prepare_slots()

    def prepare_slots(self):
        """Work is waiting and no free slot has its environment: ask workers to switch idle slots over (building
        the environment first if they must). A slot in the environment of another job that runs or waits is left
        alone, so two jobs with different environments do not keep taking each other's slots (the cost: such a
        job waits for the other to finish, not for a share of the cluster)."""
        waiting = [j for j in self.jobs.values() if j.queue and (not j.par or len(j.slots) < j.par)]
        if not waiting:
            return
        idle = [s for s in self.slots.values() if s.job is None and not s.inflight and not s.preparing]
        if not idle:  # (the common case in a busy cluster: one pass over the slots, nothing more)
            return
        active = [j for j in self.jobs.values() if j.queue or j.slots]
        switching = collections.Counter(s.preparing for s in self.slots.values() if s.preparing)
        asks = {}  # (worker id, job id) -> slot names
        for job in waiting:
            want = min(len(job.queue), job.par - len(job.slots) if job.par else len(job.queue))
            want -= switching[job.env_key] if job.env_key else 0  # (slots already switching to it)
            for slot in list(idle):
                if want <= 0:
                    break
                worker = self.workers.get(slot.worker_id)
                # (a slot of another owner is restarted in place: an executor never serves two API keys)
                if worker is None or not worker.fits(job) or \
                        (slot.env == worker.target(job) and slot.may_serve(job)) or \
                        any(slot.env == worker.target(other) and slot.may_serve(other) and other.queue and
                            (not other.par or len(other.slots) < other.par) for other in active):
                    continue
                idle.remove(slot)
                slot.preparing = worker.target(job)
                asks.setdefault((worker.id, job.id), []).append(slot.name)
                want -= 1
        for (worker_id, job_id), names in asks.items():
            job, worker = self.jobs[job_id], self.workers[worker_id]
            spec = job.env if job.env is not None else {"k": worker.env, "own": 1}
            self.send(worker.ident, P.PREPARE, {"s": names, "e": spec}, job.archive or [])

    def on_env(self, ident, h, payload, role=None):
        """A worker's news about preparing an environment: pass it on to the jobs waiting for it; a failure ends
        them with the installer's message."""
        worker = self.worker_by_ident(ident, h)
        if worker is None:
            return
        key, state = h["k"], h["st"]
        for job in [j for j in self.jobs.values() if worker.target(j) == key]:
            self.send(job.client, P.ENV, dict(h, j=job.id), keep=True)
        if state == "failed":
            worker.failed_envs[key] = (h.get("m", ""), time.monotonic())  # not asked again; others may manage
            for name in worker.slots:
                slot = self.slots.get(name)
                if slot is not None and slot.preparing == key:
                    slot.preparing = None
            self.dirty = True
        for job in [j for j in self.jobs.values() if worker.target(j) == key]:
            if state == "failed" and not any(w.could_fit(job) for w in self.workers.values()):
                self.send(job.client, P.REJECTED, self.no_fit(job), keep=True)
                self.drop_job(job.id)

    def send_task(self, slot, job, batch):
        header = dict(batch.header, d=job.digest)
        if job.options:
            header["o"] = job.options
        if batch.isolate is not None:
            header["x"] = batch.isolate
        if batch.skip:
            header["sk"] = sorted(batch.skip)
        payload = batch.frames
        if job.digest in slot.functions:
            slot.functions.move_to_end(job.digest)
        else:
            header["f"] = len(job.function)
            payload = [*job.function, *payload]
            if self.keys is not None and job.owner:  # nested calls go to this cluster as the same user
                header["ak"] = self.keys.api_key_of(job.owner)
            slot.functions[job.digest] = True
            if len(slot.functions) > P.FUNCTION_CACHE:
                slot.functions.popitem(last=False)
        if not self.send(slot.ident, P.TASK, header, payload, strict=True):
            job.queue.appendleft(batch)
            self.remove_slot(slot, "unreachable")
            return
        slot.inflight[(job.id, batch.start)] = (job, batch)
        slot.credit -= 1

    # ---------------------------------------------------------------- liveness
    def beat(self):
        now = time.monotonic()
        deadline = now - P.HEARTBEAT_INTERVAL * P.HEARTBEAT_LIVENESS
        for worker in list(self.workers.values()):
            if worker.last_seen < deadline:
                self.remove_worker(worker, "stopped sending heartbeats")
            elif not self.send(worker.ident, P.HEARTBEAT, {}):
                self.remove_worker(worker, "disconnected")
        for client_id, seen in list(self.clients.items()):
            if seen < deadline:
                del self.clients[client_id]
                for job in [j for j in self.jobs.values() if j.client_id == client_id]:
                    log.warning("job %s cancelled: its client went silent", job.id.hex())
                    self.drop_job(job.id)
        for job in list(self.jobs.values()):
            if not self.send(job.client, P.HEARTBEAT, {"j": job.id, "s": self.told(job)}):
                self.drop_job(job.id)
        self.end_stuck_nested()
        if self.dirty:
            self.dispatch()

    def end_stuck_nested(self):
        """A nested job (submitted by a call) that no slot can ever take, because every slot that could run it
        holds a call waiting for a nested job, ends with a clear error instead of hanging its caller."""
        waiting = set()  # slots whose call waits for a nested job: only as its caller's job says, and truly
        for j in self.jobs.values():
            parent = self.jobs.get(j.parent[0]) if j.parent else None
            slot = self.slots.get(self.slot_names.get(j.parent[1])) if parent else None
            if slot is not None and parent.owner == j.owner and slot.job is parent:
                waiting.add(slot.name)
        for job in [j for j in self.jobs.values() if j.parent and j.queue and not j.slots]:
            fitting = [s for w in self.workers.values() if w.could_fit(job)
                       for s in map(self.slots.get, w.slots) if s is not None]
            job.stuck = job.stuck + 1 if fitting and all(s.name in waiting for s in fitting) else 0
            if job.stuck >= 2:
                self.send(job.client, P.REJECTED, {"j": job.id, "t": "nested", "e": (
                    f"this nested remote_parallel_map can never start: all {len(fitting)} slots that could run it "
                    "are held by calls waiting for nested jobs. Give the outer job max_parallelism below the "
                    "cluster's slots, or add workers")}, keep=True)
                self.drop_job(job.id, "failed")


def describe_exit(code):
    if code is None:
        return "an unknown status"
    if code < 0:
        try:
            return f"signal {signal.Signals(-code).name}"
        except ValueError:
            return f"signal {-code}"
    return f"exit code {code}"


def main(bind, parent_fd=None, keys=None):
    logging.basicConfig(level=logging.WARNING, format="burla broker: %(message)s")
    try:  # every worker and client connection is a file descriptor: allow as many as the system does
        import resource

        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    except (ImportError, ValueError, OSError):
        pass
    broker = Broker(bind, parent_fd, keys)
    host = pysocket.gethostname()
    log.info("listening on %s (%s, pid %d)", broker.address, host, os.getpid())
    try:
        broker.run()
    except KeyboardInterrupt:
        pass
