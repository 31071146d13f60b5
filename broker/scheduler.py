"""The broker's scheduling and job state, driven by messages; no sockets.

It keeps each job's queue of input batches, hands batches to executor slots that have credit and whose worker has
room for the job's cpu/ram/gpu, puts results and log lines in the job's outbox for its client, re-queues the
batches of a slot that died, and ends the jobs whose client stayed away past their lease. It never runs user code
and never unpickles payloads. The socket loop (broker.py) hands it checked messages and gives it `send` (control
messages, never blocking) and `offer` (one outbox entry to a connection: "ok", "full" or "gone"); tests can drive
it with functions of their own.
"""

import bisect
import collections
import logging
import re
import time

import msgpack

from burla import env as E
from burla import protocol as P
from burla import security
from burla.broker.jobs import LOG_KEEP, OUTBOX_MEMORY, Batch, Cursor, Job, Outbox
from burla.broker.store import Full

log = logging.getLogger("burla.broker")

MAX_ATTEMPTS = 3  # executor deaths while one input runs before that input fails with WorkerDiedError
CALL_CANCELS = 1 << 16  # single-call cancels a job holds at once (each TASK of the job looks through them)
STOP_GRACE = 0.5  # seconds a cancelled call has to stop on SIGUSR1 before its executor is killed
ENV_RETRY_AFTER = 60.0  # seconds before a worker that failed to prepare an environment is asked again
# What one user may park in the broker: jobs at once, and inputs not yet answered over all of them (each job is
# also held to its own window); and one message (a batch of one huge input, a function with its packages).
JOBS_PER_OWNER = 256
OWNER_BYTES_MAX = 1 << 30
ONE_MESSAGE_MAX = 1 << 30
DETACHED_BATCHES = 1 << 20  # batches one detached job may spool
READERS_PER_JOB = 64  # connections reading one job's outbox at once
STATE_WORKERS = 1000  # workers listed in a STATUS or STATE (the busiest); the others are counted
ENDED_KEPT = 100_000  # ended jobs remembered (to tell a client that comes back how its job ended)
RETENTION = 7 * 86400.0


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
        self.py = header.get("py")  # its interpreter (None: an older worker, which says not)
        self.failed_envs = {}  # environment key -> (why this worker could not prepare it, when)
        # slot identity -> (cpu, ram, gpus: indices into self.gpus) its job holds; what is free is derived from these
        self.claims = {}
        self.slots = set()
        self.last_seen = time.monotonic()
        self.idle_since = self.last_seen  # none of its slots holds a job since then (None: some do)

    def free(self):
        """(cpu, ram, indices of the GPUs) not claimed by a slot's job: derived from the claims that exist, never
        a running sum, so no sequence of messages can make them drift. Indices, not names: names repeat ("T4,T4")
        and a call is given exactly its own GPUs (TASK's gpu)."""
        cpu, ram, gpus = self.cpu, self.ram, set(range(len(self.gpus)))
        for c, r, claimed in self.claims.values():
            cpu, ram = cpu - c, ram - r
            gpus.difference_update(claimed)  # (a worker may register again with fewer: those are ignored)
        return cpu, ram, sorted(gpus)

    def pick_gpus(self, job, free, prefer=()):
        """The indices among free that the job's calls get (those in prefer first: a slot keeps its GPUs from
        job to job, as a CUDA context made in its executor stays on them), or None if too few match."""
        kind, count = job.gpu
        fitting = [i for i in free if kind is None or gpu_is(self.gpus[i], kind)]
        fitting.sort(key=lambda i: i not in prefer)
        return fitting[:count] if len(fitting) >= count else None

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
        return self.same_python(job) and not self.env_failed(job.env_key)

    def same_python(self, job):
        """The job's function was pickled on this worker's interpreter (either side not saying: assumed so)."""
        return job.py is None or self.py is None or job.py == self.py

    def could_fit(self, job):
        return self.takes_env(job, confirmed=False) and \
            self.cpu >= job.cpu and self.ram >= job.ram and gpus_match(self.gpus, job.gpu)

    def fits(self, job):
        if not self.takes_env(job, confirmed=True):
            return False
        cpu, ram, gpus = self.free()
        return cpu >= job.cpu and ram >= job.ram and self.pick_gpus(job, gpus) is not None


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
        self.gpus = ()  # the GPU indices its last job with GPUs held here (see Worker.pick_gpus)

    def may_serve(self, job):
        return self.owner is None or self.owner == job.owner


def gpus_match(available, request):
    kind, count = request
    if kind is None:
        return len(available) >= count
    return sum(1 for g in available if gpu_is(g, kind)) >= count


def gpu_is(name, kind):
    """Whether a worker's GPU of this name is of the kind a job asks for: the name, or one of its words, so that
    "T4" is "nvidia-tesla-t4" (Compute Engine's) and "H100" is "NVIDIA H100 80GB HBM3" (nvidia-smi's)."""
    name, kind = name.lower(), kind.lower()
    return name == kind or kind in re.split(r"[\s_-]+", name)


UNKNOWN = "unknown"  # the owner of an executor whose past this broker does not know: it serves nobody


def covered(header):
    """The offsets of its batch that a RESULT gives outcomes for."""
    first = header.get("o", 0)
    if header.get("all"):
        return range(first, max(header.get("n", 0), first + 1))
    return range(first, first + header.get("k", 0) + len(header.get("e") or ()))


class Scheduler:
    def __init__(self, send, offer, keys=None, store=None, retention=RETENTION):
        self.send, self.offer = send, offer
        self.keys = keys
        self.store = store
        self.retention = retention
        self.workers = {}  # worker id -> Worker
        self.slots = {}  # slot's connection identity -> Slot
        self.slot_names = {}  # "worker id/index" -> connection identity
        self.jobs = {}  # job id -> Job, running
        self.finished = {}  # job id -> Job: detached jobs that ended, kept with their outbox for their retention
        self.ended = collections.OrderedDict()  # job id -> (owner, record, kind): how a job ended, for who asks
        self.clients = {}  # client id -> last seen (monotonic)
        self.order = collections.deque()  # job ids, rotated for fairness between jobs
        self.stopping = {}  # slot identity -> when to kill its executor if its cancelled call still runs
        self.watchers = {}  # connection identity -> (role, when its WATCH expires)
        self.recent = collections.deque(maxlen=20)  # attached jobs that ended, for dashboards
        self.slot_owners = {}  # slot name -> the role its current executor has served (see Slot.owner)
        self.behind = set()  # ids of jobs with a reader that could not take more (its queue was full)
        self.spooled = {}  # job id -> connection to tell (SPOOLED) once this turn's writes are committed
        self.scaling = None  # the autoscaler's last CAPACITY, with when it came (time.time())
        self.dirty = False
        self.messages = [0, 0]  # messages the broker has received and sent (counted by broker.Broker)
        self.accepting = []  # (id, connection) of jobs submitted since the last dispatch, to answer ACCEPTED after it
        self.next_sweep = 0.0
        self.handlers = {
            P.SUBMIT: self.on_submit, P.BATCH: self.on_batch, P.SEAL: self.on_seal, P.ACK: self.on_ack,
            P.ATTACH: self.on_attach, P.JOBS: self.on_jobs, P.END: self.on_end, P.CANCEL: self.on_cancel,
            P.STATUS: self.on_status, P.RESULT: self.on_result, P.LOG: self.on_log, P.READY: self.on_ready,
            P.REGISTER: self.on_register, P.SLOT_DIED: self.on_slot_died, P.HEARTBEAT: self.on_heartbeat,
            P.ENV: self.on_env, P.WATCH: self.on_watch, P.SLOT_KEY: self.on_slot_key,
            P.CAPACITY: self.on_capacity,
        }
        if store is not None:
            self.load()

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

    # ---------------------------------------------------------------- the store
    def load(self):
        """Pick up the jobs a previous broker on this state dir left: a detached job goes on where its stored
        outcomes end (what was running runs again); an attached one waits for its client to attach and resend
        its batches; an ended one is kept for its retention."""
        for row in self.store.jobs():
            try:
                job = Job(None, row["header"], self.store.function(row["id"]), row["owner"])
            except P.ProtocolError as e:  # (stored by a broker that did not check it): never a broker that
                log.warning("job %s dropped from the store: %s", row["id"].hex(), e)  # cannot start
                self.store.drop_job(row["id"])
                continue
            job.started, job.stored, job.client_id = row["created"], True, b""
            headers = self.store.entry_headers(job.id)
            last = headers[-1][0] if headers else 0
            job.outbox = Outbox(job.id, self.store, job.detached, last)
            job.outbox.acked = headers[0][0] - 1 if headers and not job.detached else 0
            seen = collections.defaultdict(set)  # batch start -> offsets with an outcome
            for _, command, h in headers:
                if command == P.RESULT:
                    offsets = covered(h)
                    seen[h["i"]].update(offsets)
                    job.failed += len(h.get("e") or ()) + (len(offsets) - 1 if h.get("all") else 0)
                    for error in h.get("e") or ():
                        job.failed_call(error)
            job.done = sum(len(s) for s in seen.values())
            if row["state"] != "running":
                job.state, job.reason, job.finished = row["state"], row["reason"], row["finished"]
                job.total, job.sealed = row["total"], True
                self.remember(job, None)
                if job.detached:
                    self.finished[job.id] = job
                continue
            if job.detached and not row["sealed"]:
                self.jobs[job.id] = job
                self.drop_job(job.id, "failed", "the broker restarted before all of the job's inputs were uploaded")
                continue
            self.jobs[job.id] = job
            self.order.append(job.id)
            if job.detached:
                job.sealed, job.total = True, row["total"]
                job.sent = job.total
                for start, header in self.store.inputs(job.id):
                    batch = Batch(header, None, 0)
                    done = seen.get(start, set()) & set(range(batch.n))
                    if len(done) >= batch.n:
                        self.store.drop_input(job.id, start)
                        continue
                    if done:
                        batch.skip = done
                        batch.isolate = batch.progress = min(set(range(batch.n)) - done)
                    job.queue.append(batch)
                    job.held.add(start)
                self.check_complete(job)
            else:
                job.away, job.outbox.spilling = time.monotonic(), True
            log.warning("resumed job %s (%s, %d outcomes stored)", job.id.hex(),
                        "detached" if job.detached else "waiting for its client", job.done)
        self.store.commit()
        self.dirty = True

    def persist(self, job):
        """Write the job's definition to the store once (Full if it does not fit)."""
        if not job.stored and self.store is not None:
            self.store.put_job(job.id, job.owner, job.detached, job.header, [*job.function, *(job.archive or [])],
                               job.started)
            job.stored = True

    def lost(self, job_ids, why):
        """The store refused this turn's writes: the jobs they were for end, with why (nothing silently lost)."""
        for job_id in job_ids:
            job = self.jobs.get(job_id)
            if job is not None and (job.detached or job.outbox.spilling):
                uploader = self.spooled.pop(job_id, None)
                message = f"the job was ended: what the head had to keep for it could not be written ({why})"
                if uploader is not None and job.client is None:  # (sealed this turn: its uploader still waits)
                    self.send(uploader, P.REJECTED, {"j": job.id, "t": "spool", "e": message}, keep=True)
                self.reject(job, "spool", message)

    def committed(self):
        """After the loop's commit: tell uploading clients how many inputs are safely on disk."""
        for job_id, ident in self.spooled.items():
            # (a detached job whose every outcome came before its SEAL ended at the SEAL: it is among the finished)
            job = self.jobs.get(job_id) or self.finished.get(job_id)
            if job is not None:
                self.send(ident, P.SPOOLED, {"j": job_id, "n": job.spooled, "sealed": int(job.sealed)}, keep=True)
        self.spooled.clear()

    # ---------------------------------------------------------------- outboxes
    def deliver(self, job, command, header, payload=()):
        """Put one entry in the job's outbox and pass it on to whoever reads it."""
        if command == P.LOG:
            if job.outbox.log_bytes > LOG_KEEP:
                job.dropped_lines += len(header["l"])
                return
            if job.dropped_lines:
                header = dict(header, x=job.dropped_lines)
                job.dropped_lines = 0
        try:
            job.outbox.append(command, header, payload)
            if job.outbox.mem_bytes > OUTBOX_MEMORY:  # its client is far behind
                self.persist(job)
                job.outbox.spill()
        except Full as e:
            self.reject(job, "spool", f"the job was ended: its results could not be kept for its client ({e})")
            return
        self.pump(job)

    def pump(self, job):
        """Send each reader of the job's outbox what it has not had, until its queue is full."""
        box = job.outbox
        for cursor in list(job.cursors):
            while cursor.next < box.next:
                entry = box.get(cursor.next)
                if entry is None or (cursor.logs_only and entry[0] != P.LOG):
                    cursor.next += 1
                    continue
                outcome = self.offer(cursor.ident, *entry)
                if outcome == "full":
                    self.behind.add(job.id)
                    break
                if outcome == "gone":
                    self.lose(job, cursor)
                    break
                cursor.next += 1
                if entry[0] == P.END and not cursor.reader:  # (a follower is done with the job at its end)
                    job.cursors.remove(cursor)
                    break
            else:
                if cursor.until is not None and cursor.next > cursor.until:
                    outcome = self.offer(cursor.ident, P.ATTACHED, cursor.marker, ())
                    if outcome == "full":
                        self.behind.add(job.id)
                    elif outcome == "gone" or cursor.reader:
                        self.lose(job, cursor)
                    else:
                        cursor.until = None

    def pump_behind(self):
        behind, self.behind = self.behind, set()
        for job_id in behind:
            job = self.jobs.get(job_id) or self.finished.get(job_id)
            if job is not None:
                self.pump(job)

    def lose(self, job, cursor):
        """A reader's connection is gone (or its read is over); the client's, until it attaches again."""
        if cursor in job.cursors:
            job.cursors.remove(cursor)
        if cursor.ident == job.client and not cursor.reader:
            job.client = None
            self.away(job)

    def away(self, job):
        """The job's client is away: from now on its entries wait on disk, for at most the job's lease."""
        if job.away is None and not job.detached and self.jobs.get(job.id) is job:
            job.away = time.monotonic()
            if self.store is not None:
                try:
                    self.persist(job)
                    job.outbox.spill()
                    job.outbox.spilling = True
                except Full as e:  # (then they wait in memory; OUTBOX_MEMORY still bounds them)
                    log.warning("job %s: its client is away, and its results stay in memory: %s", job.id.hex(), e)

    def back(self, job):
        if job.away is not None:
            job.away = None
            job.outbox.spilling = False

    # ---------------------------------------------------------------- clients
    def on_submit(self, ident, h, payload, role=None):
        job = Job(ident, h, payload, role)
        if job.id in self.jobs or job.id in self.finished or (job.id in self.ended and not h.get("re")):
            raise P.ProtocolError("SUBMIT of a job id already in use")
        if job.id in self.ended:  # the same job again, from a client that was away: it has ended meanwhile
            return self.tell_ended(ident, job.id, role)
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
        job.outbox = Outbox(job.id, self.store, job.detached)
        if job.detached:
            if self.store is None:
                raise P.ProtocolError("a detached job on a broker without a store")
            try:
                self.persist(job)
            except Full as e:
                self.send(ident, P.REJECTED, {"j": job.id, "t": "spool", "e": f"the job was refused: {e}"}, keep=True)
                return
        else:
            job.cursors.append(Cursor(ident, 0, None, None))
        job.told = min(h.get("sl", 0), 100_000)
        self.jobs[job.id] = job
        self.order.append(job.id)
        self.told(job)  # (its window holds from now)
        # ACCEPTED goes after this pass's dispatch: the job's first batches (right behind its SUBMIT) reach the
        # slots a message sooner.
        self.accepting.append((job.id, ident))
        self.dirty = True

    def send_accepted(self):
        for job_id, ident in self.accepting:
            job = self.jobs.get(job_id)
            if job is not None:  # (not one cancelled meanwhile)
                self.send(ident, P.ACCEPTED, {"j": job.id, "s": self.told(job)}, keep=True)
        self.accepting.clear()

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
        if not any(w.same_python(job) for w in self.workers.values()):
            mine, theirs = E.python_name(job.py), sorted({E.python_name(w.py) for w in self.workers.values()})
            return (f"no worker in this cluster runs {mine} (its workers run {', '.join(theirs)}), and a function "
                    f"pickled on one Python may not load on another: start workers on {mine}, or run this on "
                    f"{' or '.join(theirs)}")
        kind, count = job.gpu
        want = f"func_cpu={job.cpu:g}, func_ram={job.ram:g}" + (f", func_gpu={kind or ''}:{count}" if count else "")
        have = "; ".join(
            f"{w.host} has {w.cpu:g} cpu, {w.ram:g} GB ram, {len(w.gpus)} gpu{' ' + ','.join(w.gpus) if w.gpus else ''}"
            + ("" if w.same_python(job) else f" (and runs {E.python_name(w.py)})") for w in self.workers.values())
        return f"no worker in this cluster can ever run a call needing {want}: {have}"

    def fitting_slots(self, job):
        n = sum(len(w.slots) if w.could_fit(job) else 0 for w in self.workers.values())
        return min(n, job.par) if job.par else n

    def told(self, job):
        """The slots that fit the job, as the client is told: its window of batches follows, and is held to."""
        n = self.fitting_slots(job)
        job.told = max(job.told, n)
        return n

    def owned(self, h, role, ident=None):
        """The running job a message names, if the sender owns it (and, given ident, feeds it on ident)."""
        job = self.jobs.get(h["j"])
        if job is None or job.owner != role or (ident is not None and job.client != ident and not job.detached):
            return None
        return job

    def on_batch(self, ident, h, payload, role=None):
        job = self.owned(h, role, ident)
        if job is None or job.sealed:
            return  # cancelled or finished: the client will not wait for it
        batch = Batch(h, payload)
        if batch.start in job.held or batch.start < job.sent and job.detached:
            return  # (sent again by a client that could not know we had it)
        if job.detached:
            if len(job.held) >= DETACHED_BATCHES:
                return self.reject(job, "credit", f"the job was ended: a detached job may have {DETACHED_BATCHES} "
                                                  "batches")
            try:
                self.store.put_input(job.id, batch.start, h, payload)
            except Full as e:
                return self.reject(job, "spool", f"the job was ended: the head takes no more inputs for detached "
                                                 f"jobs now ({e})")
            batch.frames = None  # (read back when it is sent: a detached job's inputs need not fit in memory)
            job.spooled += batch.n
            self.spooled[job.id] = ident
        else:
            # The client's credit: at most its window of batches, and of bytes unless it has none out (one input
            # may be larger than the window). Past it, the job ends: an honest client never gets there.
            owners = sum(j.pending_bytes for j in self.jobs.values() if j.owner == role)
            if len(job.pending) >= P.window(job.told) or batch.size > ONE_MESSAGE_MAX or \
                    (job.pending and (job.pending_bytes >= P.MAX_OUTSTANDING_BYTES or owners >= OWNER_BYTES_MAX)):
                return self.reject(job, "credit", (
                    f"the client sent more than its window ({len(job.pending)} batches, {job.pending_bytes} bytes "
                    "without outcomes): the job was ended"))
            job.pending[batch.start] = batch.size
            job.pending_bytes += batch.size
        job.held.add(batch.start)
        job.queue.append(batch)
        job.sent = max(job.sent, batch.start + batch.n)
        self.dirty = True

    def on_seal(self, ident, h, payload, role=None):
        job = self.owned(h, role, ident)
        if job is None or job.sealed:
            return
        if h["n"] < job.sent:
            raise P.ProtocolError("SEAL of fewer inputs than were sent")
        job.sealed, job.total = True, h["n"]
        if job.detached:
            try:
                self.store.update_job(job.id, sealed=1, total=job.total)
            except Full as e:
                return self.reject(job, "spool", f"the job was ended: {e}")
            self.spooled[job.id] = ident
            job.client = None  # from now on it runs with nobody attached
        self.check_complete(job)

    def check_complete(self, job):
        """A job with every outcome in ends by itself when it is detached, or was taken over by another process
        (its own client says END when it has everything)."""
        if (job.detached or job.client_id != job.header.get("c")) and job.remaining() == 0 and \
                self.jobs.get(job.id) is job:
            self.drop_job(job.id, "done")

    def on_ack(self, ident, h, payload, role=None):
        job = self.jobs.get(h["j"]) or self.finished.get(h["j"])
        # (only the job's client lets entries go: a process that follows the job must not take them from it)
        if job is not None and job.owner == role and (job.detached or ident == job.client):
            job.outbox.ack(h["q"])

    def on_attach(self, ident, h, payload, role=None):
        """A client (after an outage, or a new process with the same key) picks its job up: the outbox entries
        after the one it holds, then ATTACHED with what the broker holds of the job."""
        job = self.jobs.get(h["j"]) or self.finished.get(h["j"])
        if job is None or job.owner != role:
            return self.tell_ended(ident, h["j"], role)
        marker = {"j": job.id, "st": job.state, "n": job.total, "sealed": int(job.sealed), "dt": int(job.detached),
                  "done": job.done, "failed": job.failed, "sent": job.sent, "have": sorted(job.held)[:20_000],
                  "s": self.told(job) if job.state == "running" else 0, "o": job.options, "started": job.started,
                  "e": job.reason}
        reader = bool(h.get("p") or h.get("lg")) or job.state != "running"  # (a read ends at its ATTACHED)
        if len(job.cursors) >= READERS_PER_JOB:
            self.send(ident, P.REJECTED, {"j": job.id, "t": "credit", "e": (
                f"the job has {READERS_PER_JOB} readers already: try again when one is done")}, keep=True)
            return
        cursor = Cursor(ident, min(h["q"], job.outbox.next - 1), job.outbox.next - 1, marker, bool(h.get("lg")),
                        reader)
        # The job's client again (after a break), or a process taking over a job whose client is away: it becomes
        # the job's client. Anyone else follows the job (a detached job's readers all do) without taking it.
        takeover = not reader and job.state == "running" and not job.detached and (
            job.client is None or job.away is not None or h.get("c") == job.client_id)
        if takeover:
            if h.get("c") != job.client_id and not job.sealed:  # its inputs will never come now
                job.sealed, job.total = True, job.sent
            job.cursors = [c for c in job.cursors if c.ident != job.client]
            job.cursors.insert(0, cursor)
            job.client, job.client_id = ident, h.get("c", job.client_id)
            job.told = max(job.told, min(h.get("sl", 0), 100_000))
            if job.client_id:
                self.clients[job.client_id] = time.monotonic()
            self.back(job)
            self.check_complete(job)
        else:
            job.cursors.append(cursor)
        self.pump(job)

    def tell_ended(self, ident, job_id, role):
        ended = self.ended.get(job_id)
        if ended is not None and ended[0] == role:
            _, record, kind = ended
            self.send(ident, P.REJECTED, {"j": job_id, "t": kind or record["state"], "e": record["reason"] or (
                f"the job ended ({record['state']})")}, keep=True)
        else:  # (another key's job looks exactly like no job)
            self.send(ident, P.REJECTED, {"j": job_id, "t": "unknown", "e": (
                f"the broker has no job {job_id.hex()} for this API key")}, keep=True)

    def on_jobs(self, ident, h, payload, role=None):
        records = {}
        for job_id, (owner, record, _) in self.ended.items():
            if owner == role:
                records[job_id] = record
        for job in [*self.finished.values(), *self.jobs.values()]:
            if job.owner == role:
                records[job.id] = job.record(full="j" in h)
        if "j" in h:
            records = {h["j"]: records[h["j"]]} if h["j"] in records else {}
        listed = sorted(records.values(), key=lambda r: -r["started"])[:1000]
        self.send(ident, P.JOBS, {"jobs": listed})

    def on_end(self, ident, h, payload, role=None):
        job = self.jobs.get(h["j"])
        if job is not None and job.owner == role:
            if job.detached:
                job.outbox.ack(job.outbox.next - 1)  # (kept on disk for its retention all the same)
            else:
                self.drop_job(job.id, "done")

    def on_cancel(self, ident, h, payload, role=None):
        """CANCEL may come from another connection of the same owner (a dashboard, `burla jobs cancel`): then the
        job's client is told."""
        job = self.jobs.get(h["j"])
        if job is not None and job.owner == role and "i" in h:
            return self.cancel_calls(job, h["i"])
        if job is not None and job.owner == role:
            if ident != job.client and job.client is not None:
                self.reject(job, "cancelled", "the job was cancelled from another connection (the JupyterLab "
                                              "panel, `burla jobs cancel`, or another process)", "cancelled")
            else:
                self.drop_job(job.id, "cancelled", "cancelled")

    def cancel_calls(self, job, indices):
        """Cancel single calls (option k): a batch still queued skips them when it runs (TASK's cc); a slot that
        holds one is told, and interrupts it if it is running. Each keeps an outcome (an error its client drops),
        so the batch completes as any other."""
        if not job.options.get("k") or len(job.call_cancels) >= CALL_CANCELS:
            return
        new = sorted({i for i in indices if i < job.sent} - job.call_cancels)
        job.call_cancels.update(new)
        for slot in list(job.slots):
            for (job_id, start), (_, batch) in slot.inflight.items():
                if job_id == job.id:  # (bisect: a flood of cancels costs the broker little per batch)
                    here = new[bisect.bisect_left(new, start):bisect.bisect_left(new, start + batch.n)]
                    worker = self.workers.get(slot.worker_id)
                    if here and worker is not None:  # (the running call is among the first: a few suffice)
                        self.send(worker.ident, P.KILL, {"s": slot.name, "j": job.id, "hard": 0, "i": here[:200]})

    def reject(self, job, kind, message, state="failed"):
        """End a job with an error its client is told: now, or when it attaches again."""
        if job.client is not None:
            self.send(job.client, P.REJECTED, {"j": job.id, "t": kind, "e": message}, keep=True)
        self.drop_job(job.id, state, message, kind)

    def drop_job(self, job_id, state="cancelled", reason=None, kind=None):
        """End a job: drop its queue and the batches waiting on executors, stop its running calls, and remember
        how it ended. A detached job's outbox ends with its END entry and is kept for its retention."""
        job = self.jobs.pop(job_id, None)
        if job is None:
            return
        if state == "cancelled" and job.failed and kind is None:
            state = "failed"
        job.state, job.reason, job.finished = state, reason, time.time()
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
        if not job.detached:  # (a detached one's uploader still hears how much is on disk: it waits for that)
            self.spooled.pop(job_id, None)
        self.remember(job, kind)
        if job.detached:
            try:
                job.outbox.append(P.END, {"j": job.id, "st": state, "e": reason})
            except Full as e:  # (an attach is told how it ended all the same: from self.ended, by ATTACHED)
                log.warning("job %s: its end could not be stored: %s", job.id.hex(), e)
            self.finished[job.id] = job
            self.pump(job)
        else:
            self.recent.appendleft(dict(job.record(full=True), owner=job.owner))
            for cursor in job.cursors:  # (followers, and a client that did not end it itself, hear how it ended)
                if state != "done" or cursor.ident != job.client or job.client_id != job.header.get("c"):
                    self.offer(cursor.ident, P.END, {"j": job.id, "st": state, "e": reason}, ())
        if job.stored:
            try:
                self.store.update_job(job.id, state=state, reason=reason, finished=job.finished,
                                      total=job.total, sealed=int(job.sealed))
                if not job.detached:
                    self.store.drop_entries(job.id, job.outbox.next)
                self.store.forget("inputs", "job = ?", (job.id,))
            except Full as e:
                log.warning("job %s: how it ended could not be stored: %s", job.id.hex(), e)

    def remember(self, job, kind):
        record = job.record()
        self.ended[job.id] = (job.owner, record, kind)
        while len(self.ended) > ENDED_KEPT:
            self.ended.popitem(last=False)
        return record

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
            mine = [j for j in self.jobs.values() if j.client_id == h["c"] and j.owner == role and not j.detached]
            for job in mine:
                self.back(job)
            # answered on the client's heartbeat connection, which no large message holds up: a client judges
            # the broker alive by it while a big result is still arriving on the job's connection
            self.send(ident, P.HEARTBEAT, {"jobs": [j.id for j in mine]})
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
        now = time.monotonic()
        workers = [{
            "id": w.id, "host": w.host, "pid": w.pid, "slots": len(w.slots), "of": w.nslots,
            "busy": sum(1 for s in w.slots if self.slots[s].job is not None),
            "cpu": w.cpu, "ram": w.ram, "gpu": w.gpus[:64],
            "preparing": sum(1 for s in w.slots if self.slots[s].preparing), "containers": w.runtime,
            "py": w.py, "idle": round(now - w.idle_since, 1) if w.idle_since is not None else 0.0,
        } for w in self.workers.values()]
        busy = sum(w["busy"] for w in workers)  # (before the list is cut)
        if len(workers) > STATE_WORKERS:  # (a message stays under a frame)
            workers.sort(key=lambda w: -w["busy"])
            del workers[STATE_WORKERS:]
        jobs = [j.record(full=True) for j in self.jobs.values() if role is None or j.owner == role]
        finished = sorted((j for j in self.finished.values() if role is None or j.owner == role),
                          key=lambda j: -j.finished)[:50]
        recent = [{k: v for k, v in r.items() if k != "owner"} for r in self.recent
                  if role is None or r["owner"] == role] + [j.record(full=True) for j in finished]
        return fit({"workers": workers, "jobs": jobs, "recent": recent, "nworkers": len(self.workers),
                    "nslots": len(self.slots), "nbusy": busy,
                    "msgs": self.messages, "demand": self.demand(), "scaling": self.scaling})

    def demand(self):
        """Every running job's appetite, whoever owns it (counts only): what an autoscaler sizes the cluster by.
        [want: slots it could use at once, cpu, gpu: per call, g: asked to grow, age: seconds it has run]."""
        now, rows = time.time(), []
        for job in self.jobs.values():
            left = job.remaining()
            left = sum(b.n for b in job.queue) + len(job.slots) if left is None else left
            want = min(left, job.par) if job.par else left
            if want > 0 and job.state == "running":
                rows.append([want, job.cpu, job.gpu[1], int(bool(job.options.get("g"))), round(now - job.started, 1)])
        rows.sort(key=lambda r: -r[0] * r[1])
        return rows[:1000]

    def on_capacity(self, ident, h, payload, role=None):
        """The autoscaler's news. Only the cluster's admin (its first API key) speaks for the cluster; the clients
        of jobs that asked to grow, or have no slot yet, and still wait hear how many VMs are on their way."""
        if role is not None and (self.keys is None or role != security.client_role(self.keys.api_keys[0])):
            raise P.ProtocolError("only the cluster's first API key may send CAPACITY")
        self.scaling = dict(h, at=time.time())
        for job in self.jobs.values():  # (those that asked to grow, and those with no slot at all)
            if (job.options.get("g") or not job.slots) and job.client is not None:
                note = f"waiting for {h['b']} VM{'s' if h['b'] != 1 else ''} to boot" if h["b"] and job.queue else ""
                if note != job.note:
                    job.note = note
                    self.send(job.client, P.NOTE, {"j": job.id, "m": note}, keep=True)

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
                self.reject(job, self.no_fit(job).get("t", "fit"), self.no_fit(job)["e"])
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
            if job.detached and self.jobs.get(job.id) is job:
                self.store.drop_input(job.id, batch.start)
            self.dirty = True
            if slot.job is not None and not slot.inflight and (slot.job.id not in self.jobs or not slot.job.queue):
                self.unbind(slot)  # a cancelled job's last call has stopped, or the job has nothing more for now
        if self.jobs.get(job.id) is job:
            offsets = covered(dict(h, n=batch.n))
            job.done += len(offsets)
            job.failed += len(errors) + (len(offsets) - 1 if h.get("all") else 0)
            for error in errors:
                job.failed_call(error)
            job.ran(slot.name, h.get("t", 0.0), len(offsets), len(errors))
            self.deliver(job, P.RESULT, dict(h, n=batch.n), payload)
            if errors and job.detached and not job.options.get("c"):
                self.drop_job(job.id, "failed", f"input {errors[0]['i']} raised {errors[0]['type']}")
            else:
                self.check_complete(job)

    def on_log(self, ident, h, payload, role=None):
        slot = self.slots.get(ident)
        job = self.jobs.get(h["j"])
        if job is None or slot is None or not (slot.job is job or any(k[0] == job.id for k in slot.inflight)):
            return  # lines of a job this slot does not serve (a thread a finished call left behind, say)
        for watcher, (watcher_role, _) in self.watchers.items():
            if watcher_role == job.owner and watcher != job.client:
                self.send(watcher, P.LOG, h, payload)
        self.deliver(job, P.LOG, h, payload)

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
        if culprit is not None and 0 <= culprit < batch.n and culprit not in batch.skip:
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
                job.failed_call(error)
                self.deliver(job, P.RESULT, {"j": job.id, "i": batch.start, "o": culprit, "k": 0, "e": [error],
                                             "f": 0, "n": batch.n})
                if self.jobs.get(job.id) is not job:
                    return
                if job.detached and not job.options.get("c"):
                    return self.drop_job(job.id, "failed", f"input {index} raised {error['type']}")
        if batch.skip.issuperset(range(batch.progress, batch.n)):
            job.complete(batch)
            if job.detached:
                self.store.drop_input(job.id, batch.start)
            self.check_complete(job)
            return  # nothing left to run
        if running:
            batch.isolate = batch.progress
        job.queue.appendleft(batch)

    # ---------------------------------------------------------------- scheduling
    def bind(self, slot, worker, job):
        gpus = worker.pick_gpus(job, worker.free()[2], slot.gpus) or []
        slot.gpus = gpus or slot.gpus
        worker.claims[slot.ident] = (job.cpu, job.ram, gpus)
        slot.job = job
        slot.owner = self.slot_owners[slot.name] = job.owner  # from now on this executor serves only this owner
        job.slots.add(slot)
        worker.idle_since = None

    def unbind(self, slot):
        job = slot.job
        if job is None:
            return
        job.slots.discard(slot)
        slot.job = None
        worker = self.workers.get(slot.worker_id)
        if worker is not None:
            worker.claims.pop(slot.ident, None)
            if not worker.claims:
                worker.idle_since = time.monotonic()

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
        slots holding nothing, then as a second batch to prefetch. Then answer the new jobs' SUBMITs."""
        try:
            self.give_batches()
        finally:
            self.send_accepted()

    def give_batches(self):
        self.dirty = False
        if not self.jobs:
            return
        most = 0
        # Each pass looks at every slot: it stops as soon as no job has a batch left to give, so that a few
        # batches among 10,000 idle slots cost a few slots' look, not three passes over all of them.
        while most <= P.PREFETCH and any(j.queue for j in self.jobs.values()):
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
                if not job.queue and not any(j.queue for j in self.jobs.values()):
                    break
            if not progress:
                most += 1
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
        for job in [j for j in self.jobs.values() if worker.target(j) == key and j.client is not None]:
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
                rejection = self.no_fit(job)
                self.reject(job, rejection.get("t", "fit"), rejection["e"])

    def send_task(self, slot, job, batch):
        header = dict(batch.header, d=job.digest)
        if job.options:
            header["o"] = job.options
        if batch.isolate is not None:
            header["x"] = batch.isolate
        if batch.skip:
            header["sk"] = sorted(batch.skip)
        worker = self.workers.get(slot.worker_id)
        if worker is not None and worker.gpus:  # the GPUs its calls may see: exactly those of the claim
            header["gpu"] = list(worker.claims.get(slot.ident, (0, 0, []))[2])
        if job.call_cancels:
            cancelled = [i - batch.start for i in job.call_cancels if batch.start <= i < batch.start + batch.n]
            if cancelled:
                header["cc"] = cancelled
        payload = batch.frames
        if payload is None:  # spooled: read back from the store
            payload = self.store.input(job.id, batch.start)
            if payload is None:
                if self.store.rolled_back:  # (this turn's writes met a full disk)
                    return self.reject(job, "spool", "the job was ended: the head's disk is full, and its inputs "
                                                     "could not be kept")
                log.warning("job %s: the inputs at %d are missing from the store", job.id.hex(), batch.start)
                return self.reject(job, "store", f"the inputs from {batch.start} on were lost from the head's store")
        if job.digest in slot.functions:
            slot.functions.move_to_end(job.digest)
        else:
            header["f"] = len(job.function)
            payload = [*job.function, *payload]
            if self.keys is not None and job.owner:  # nested calls go to this cluster as the same user
                header["ak"] = self.keys.api_key_of(job.owner)
            P.cache_function(slot.functions, job.digest, True)
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
                    self.away(job)  # (it keeps running; its client has its lease to come back)
        for job in list(self.jobs.values()):
            if job.away is not None and now - job.away > job.lease:
                log.warning("job %s cancelled: its client was away for longer than its lease", job.id.hex())
                self.drop_job(job.id, "cancelled", f"the job was cancelled: its client was away for longer than "
                                                   f"its lease ({job.lease:g} s, BURLA_JOB_LEASE)", "expired")
            elif job.client is not None and \
                    not self.send(job.client, P.HEARTBEAT, {"j": job.id, "s": self.told(job)}):
                self.lose(job, job.cursors[0] if job.cursors and not job.cursors[0].reader else
                          Cursor(job.client, 0, None, None))
        self.end_stuck_nested()
        if now >= self.next_sweep:
            self.sweep()
            self.next_sweep = now + min(10.0, self.retention / 4)
        if self.dirty:
            self.dispatch()

    def sweep(self):
        """Forget what has passed its retention: ended detached jobs (their outcomes on disk too), ended jobs."""
        old = time.time() - self.retention
        for job_id in [k for k, j in self.finished.items() if j.finished < old]:
            del self.finished[job_id]
            if self.store is not None:
                self.store.drop_job(job_id)
        while self.ended and next(iter(self.ended.values()))[1]["finished"] < old:
            job_id, _ = self.ended.popitem(last=False)
            if self.store is not None and job_id not in self.finished:
                self.store.drop_job(job_id)
        if self.store is not None:
            self.store.commit()
            self.store.checkpoint()

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
            workers = [w for w in self.workers.values() if w.could_fit(job)]
            fitting = [s for w in workers for s in map(self.slots.get, w.slots) if s is not None]
            # (a slot restarting, or switching environment, may be about to take it: not stuck yet)
            settling = any(len(w.slots) < w.nslots for w in workers) or any(s.preparing for s in fitting)
            job.stuck = job.stuck + 1 if fitting and not settling and all(s.name in waiting for s in fitting) else 0
            if job.stuck >= 2:
                self.reject(job, "nested", (
                    f"this nested remote_parallel_map can never start: all {len(fitting)} slots that could run it "
                    "are held by calls waiting for nested jobs. Give the outer job max_parallelism below the "
                    "cluster's slots, or add workers"))


def fit(state):
    """A STATE that packs into one frame: failures' tracebacks, then failures, then bars go while it does not;
    then, halving each list while it still does not, ended jobs, workers (the least busy first: nworkers still
    counts them all; a thousand 8-GPU workers alone fill a frame) and running jobs."""
    def fits():
        return len(msgpack.packb(state)) <= P.FRAME_MAX - 1024

    records = state["jobs"] + state["recent"]
    for strip in (("failures", "tb"), ("failures",), ("bars",)):
        if fits():
            return state
        for r in records:
            if len(strip) == 2:
                r[strip[0]] = [{k: v for k, v in f.items() if k != strip[1]} for f in r.get(strip[0], ())]
            else:
                r.pop(strip[0], None)
    state["workers"].sort(key=lambda w: -w["busy"])
    for key in ("recent", "workers", "jobs"):
        while state[key] and not fits():
            del state[key][len(state[key]) // 2:]
    return state


def describe_exit(code):
    import signal

    if code is None:
        return "an unknown status"
    if code < 0:
        try:
            return f"signal {signal.Signals(-code).name}"
        except ValueError:
            return f"signal {-code}"
    return f"exit code {code}"
