"""The worker: one per host (or container). It announces the host's slots and resources to the broker, keeps one
executor process per slot alive, reports an executor's death at once so its batches run again elsewhere, and
heartbeats. It runs no user code itself, so a call that crashes takes down one slot, never the worker.

Each slot's executor runs in an environment: the worker's own, a job's venv (envs.py, built in a thread while the
loop goes on), or a job's container image. Restarted executors are forked by a zygote per environment (zygote.py).
"""

import collections
import logging
import os
import queue
import select
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
import traceback

import zmq

from burla import env as E
from burla import protocol as P
from burla import security, serialize
from burla.errors import EnvironmentBuildError
from burla.worker.zygote import Zygote

log = logging.getLogger("burla.worker")
MAX_ZYGOTES = 4  # environments whose zygote is kept (an idle one is a ~30 MB process)
SILENCE_NOTICE = 30.0  # seconds between the worker's lines about a broker that does not answer
CALLS_TOLD = 200  # single-call cancels passed to an executor at once: 17 bytes each, one atomic pipe write


class Slot:
    def __init__(self, index, folder):
        self.index = index
        self.folder = folder  # the worker's private folder: this slot's WHERE file (and control FIFO, in a container)
        self.container = None  # the container's name while the executor runs in one
        self.pid = None
        self.popen = None  # set when started by exec rather than fork
        self.control = None  # write end of the executor's control pipe; closing it tells the executor to exit
        self.pidfd = None
        self.started = 0.0
        self.timed_out = False  # killed for running past a call's deadline
        self.where_path = os.path.join(folder, f"slot-{index}.where")
        self.where = open(self.where_path, "w+b")  # the executor's P.WHERE record, read when it dies
        self.env = None  # the envs.Prepared environment its executor runs in; None: the worker's own
        self.zygote = None  # the Zygote that forked its executor, if one did
        self.early_deaths = 0  # executor deaths within a second of starting, in a row
        self.clear_where()

    def read_where(self):
        """(job id, batch start, offset or -1, deadline or 0) of the call the executor is running."""
        return P.WHERE.unpack(os.pread(self.where.fileno(), P.WHERE.size, 0))

    def clear_where(self):
        os.pwrite(self.where.fileno(), P.NOWHERE, 0)

    def kill(self, signum):
        if self.container and signum == signal.SIGKILL:  # the runtime's client cannot pass SIGKILL on
            subprocess.Popen([*self.container, "kill", self.container_name], stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL)
            return
        if signum == signal.SIGKILL:
            kill_trees([self.pid])
            return
        try:
            os.kill(self.pid, signum)  # in a container: its runtime's client passes the signal on (SIGUSR1: only
        except (ProcessLookupError, TypeError):  # the executor, never its calls' processes)
            pass


def kill_trees(pids):
    """SIGKILL executors and every process their calls started: each one's process group (which those join, the
    orphans of a double fork included) and its descendants that left the group (start_new_session=True). One
    look at the process table for them all. A process that left the group and lost its parent (a daemon)
    escapes."""
    pids = [pid for pid in pids if pid]
    descendants = []
    try:
        import psutil

        children = collections.defaultdict(list)
        for proc in psutil.process_iter(["ppid"]):
            children[proc.info["ppid"]].append(proc)
        todo = list(pids)
        while todo:
            for proc in children.pop(todo.pop(), ()):
                descendants.append(proc)
                todo.append(proc.pid)
    except Exception:  # (no /proc to read: the process groups still go)
        log.debug("could not list executors' descendants", exc_info=True)
    for pid in pids:
        try:
            os.killpg(pid, signal.SIGKILL)
        except OSError:  # not (yet) the leader of a group of its own
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass
    for proc in descendants:
        try:
            proc.kill()  # (psutil checks the pid was not reused meanwhile)
        except Exception:
            pass


def own_key():
    """The key of the worker's own environment (see burla.env). Local packages too big to ship only leave the
    archive out: a worker must start whatever it has installed."""
    try:
        return E.current().key
    except EnvironmentBuildError:
        return E.make(E.pins_and_local()[0]).key


def readable(fd):
    poller = select.poll()  # (not select.select: descriptors past 1023 are fine here)
    poller.register(fd, select.POLLIN)
    return bool(poller.poll(0))


RUNTIME_PROBE_DELAY = 2.0  # seconds after start before asking docker/podman: not while the first job runs


def quietly(command, timeout):
    """Run a command at the lowest CPU priority (asking a container engine costs ~0.3 s of CPU)."""
    return subprocess.run(command, capture_output=True, text=True, timeout=timeout, preexec_fn=lambda: os.nice(19))


def container_runtime(choice="auto"):
    """"docker" or "podman" if one is installed (or the one chosen) and its engine answers, else None."""
    if choice == "none":
        return None
    for name in ("docker", "podman") if choice == "auto" else (choice,):
        if shutil.which(name):
            try:
                if quietly([name, "info"], timeout=10).returncode == 0:
                    return name
            except (OSError, subprocess.TimeoutExpired):
                pass
    return None


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
    def __init__(self, broker, slots=None, cpu=None, ram=None, gpus=(), name=None, parent_fd=None, token=None,
                 env_cache=None, env_cache_gb=20.0, containers="auto"):
        host_cpu, host_ram = host_resources()
        self.containers = containers  # "auto", "none", "docker" or "podman"
        self.containers_started = 0
        self.broker = broker
        self.nslots = slots or host_cpu
        self.cpu = cpu if cpu is not None else host_cpu
        self.ram = ram if ram is not None else host_ram
        self.gpus = list(gpus)
        self.host = socket.gethostname()
        self.id = name or f"{self.host}-{os.getpid()}"
        self.parent_fd = parent_fd
        self.token = token  # the broker's worker token (CURVE over TCP); None on an ipc or insecure broker
        self.sock = None
        self.slot_keys = {}  # slot index -> the public key its executor connects with
        self.announce = []  # slots whose key the broker has not been sent (executors started before the socket)
        self.folder = tempfile.mkdtemp(prefix="burla-worker-")  # 0700
        self.slots = [Slot(k, self.folder) for k in range(self.nslots)]
        self.env_cache, self.env_cache_gb, self.envs = env_cache, env_cache_gb, None  # envs.EnvCache, made on use
        self.envs_lock = threading.Lock()
        self.own_env = own_key()
        # a container runtime: "?" while a thread asks docker or podman whether they answer (that takes a while)
        self.runtime = None if containers == "none" else "?"
        self.prepared = {}  # env key -> envs.Prepared
        self.zygotes = collections.OrderedDict()  # env key -> Zygote, least recently used first
        self.building = {}  # env key -> slots to restart in it once it is ready
        self.events = queue.SimpleQueue()  # from the threads that build environments
        self.wake_read, self.wake_write = os.pipe()

    # ---------------------------------------------------------------- executors
    def slot_credential(self, slot):
        """A fresh key for the slot's next executor, announced to the broker before the executor dials: user code
        in an executor never holds the worker token, and its key speaks only for its own slot (None: no CURVE)."""
        if not self.token:
            return None
        credential, public = security.slot_credential(self.token)
        self.slot_keys[slot.index] = public
        self.announce.append((slot.index, 1))
        if self.sock is not None:
            self.send_announcements()
        return credential

    @staticmethod
    def credential_fd(credential):
        """The slot key as the read end of a pipe for the executor alone: not in an environment or a command line
        other processes could read, and never in a zygote's memory, which every executor it forks inherits."""
        if credential is None:
            return None
        read, write = os.pipe()
        os.write(write, credential.encode())
        os.close(write)
        return read

    def send_announcements(self):
        while self.announce:
            index, new = self.announce.pop(0)  # new: a new executor's key (not one announced before)
            self.send(P.SLOT_KEY, {"w": self.id, "s": P.slot_name(self.id, index), "p": self.slot_keys[index],
                                   "new": new})

    def start_slot(self, slot, fork, zygote=True):
        slot.container = slot.zygote = None
        credential = self.slot_credential(slot)
        if slot.env is not None and slot.env.image:
            pid, write = self.start_container(slot, credential)
            self.record_start(slot, pid, write)
            return
        read, write = os.pipe()
        key = slot.env.key if slot.env else self.own_env
        secret = self.credential_fd(credential)
        fds = [read, slot.where.fileno()] + ([secret] if secret is not None else [])
        if not fork and zygote:  # a restart, or another environment: forked by that environment's zygote
            try:
                zygote = self.zygote(slot.env)
                pid = zygote.fork({"slot": slot.index, "broker": self.broker, "worker": self.id, "key": key}, fds)
                slot.popen, slot.zygote = None, zygote
                os.close(read)
                if secret is not None:
                    os.close(secret)
                self.record_start(slot, pid, write)
                return
            except OSError as e:  # it could not start: a fresh interpreter, with a fresh key (the zygote may
                log.warning("zygote for environment %s failed (%s)", key, e)  # have forked one that read this one)
                broken = self.zygotes.pop(key, None)
                if broken is not None:
                    broken.close()
                for fd in (read, write, secret):
                    if fd is not None:
                        os.close(fd)
                return self.start_slot(slot, fork=False, zygote=False)
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

                    executor.main(self.broker, self.id, slot.index, read, secret, slot.where.fileno(),
                                  self.own_env)
                except BaseException:
                    traceback.print_exc()
                    code = 1
                finally:
                    os._exit(code)
            slot.popen = None
        else:
            where = slot.where.fileno()
            code = ("import os; from burla.worker.executor import main; "
                    f"main({self.broker!r}, {self.id!r}, {slot.index}, {read}, {secret}, {where}, {key!r})")
            env = dict(os.environ)
            env.pop("BURLA_WORKER_TOKEN", None)
            python = sys.executable
            if slot.env is not None:  # the job's venv, with its local packages first
                python = slot.env.python
                env.pop("PYTHONPATH", None)
                if slot.env.path:
                    env["PYTHONPATH"] = slot.env.path
            slot.popen = subprocess.Popen([python, "-c", code], pass_fds=fds, env=env)
            pid = slot.popen.pid
        os.close(read)
        if secret is not None:
            os.close(secret)
        self.record_start(slot, pid, write)

    def record_start(self, slot, pid, control):
        slot.pid, slot.control, slot.started = pid, control, time.monotonic()
        if control is not None:
            os.set_blocking(control, False)  # an executor stuck in C code, not reading, never blocks the worker
        try:
            slot.pidfd = os.pidfd_open(pid)
        except (AttributeError, OSError):
            slot.pidfd = None

    def start_container(self, slot, credential):
        """Start a slot's executor in its job's image: host network and process ids (it dials the broker and
        says its pid like any executor), this worker's folder for its WHERE file and control FIFO (a container
        inherits no descriptors), and burla with the packages it runs on mounted read-only from the worker."""
        prepared, tool = slot.env, self.runtime
        fifo = os.path.join(self.folder, f"slot-{slot.index}.control")
        if not os.path.exists(fifo):
            os.mkfifo(fifo, 0o600)
        write = os.open(fifo, os.O_RDWR)  # held by the worker: once it closes, the executor reads end of file
        slot.container = [tool]
        self.containers_started += 1  # a name never reused: the last container of the slot may still be going
        slot.container_name = f"burla-{self.id}-{slot.index}-{os.getpid()}-{self.containers_started}".replace("/", "-")
        import burla
        from burla import worker as worker_package

        shared = {prepared.runtime, *burla.__path__, *worker_package.__path__}
        if self.broker.startswith("ipc://"):
            shared.add(os.path.dirname(self.broker[len("ipc://"):]))
        mounts = [f"--volume={path}:{path}:ro" for path in sorted(shared) if os.path.isdir(path)]
        code = (f"import os, site; site.addsitedir({prepared.runtime!r}); from burla.worker.executor import main; "
                f"main({self.broker!r}, {self.id!r}, {slot.index}, {fifo!r}, "
                f"os.environ.pop('BURLA_WORKER_TOKEN', None), {slot.where_path!r}, {prepared.key!r}, {os.getpid()})")
        env = dict(os.environ, BURLA_WORKER_TOKEN=credential or "")  # the slot's key
        slot.popen = subprocess.Popen(
            [tool, "run", "--rm", "--name", slot.container_name, f"--label=burla.worker={self.id}",
             "--network=host", "--pid=host",
             "--env=BURLA_WORKER_TOKEN", f"--volume={self.folder}:{self.folder}", *mounts,
             prepared.image, "python3", "-c", code], env=env, stdin=subprocess.DEVNULL)
        return slot.popen.pid, write

    def zygote(self, prepared):
        """The zygote of an environment (None: the worker's own), started if need be; the least recently used
        beyond MAX_ZYGOTES that no slot uses are stopped."""
        key = prepared.key if prepared is not None else self.own_env
        if key in self.zygotes and not self.zygotes[key].alive():  # killed: its executors went with it
            self.zygotes.pop(key).close()
        if key not in self.zygotes:
            self.zygotes[key] = Zygote(prepared)
        self.zygotes.move_to_end(key)
        in_use = {s.zygote for s in self.slots}
        for old in list(self.zygotes)[:-MAX_ZYGOTES]:
            if self.zygotes[old] not in in_use:
                self.zygotes.pop(old).close()
        return self.zygotes[key]

    def exit_code(self, slot):
        """The executor's exit status if it has ended (negative: killed by that signal), else None."""
        if slot.zygote is not None:  # not our child: its zygote reports how it ended
            code = slot.zygote.exit_code(slot.pid)
            if code is None and slot.pidfd is not None and readable(slot.pidfd):  # gone; the report is coming
                code = slot.zygote.exit_code(slot.pid, wait=2.0)
                return -1 if code is None else code
            return code
        if slot.popen is not None:
            code = slot.popen.poll()
            if slot.container and code is not None and code > 128:  # the runtime says 128 + signal
                code = 128 - code
            return code
        try:
            pid, status = os.waitpid(slot.pid, os.WNOHANG)
        except ChildProcessError:
            return -1
        if pid == 0:
            return None
        return os.waitstatus_to_exitcode(status)

    def reap(self):
        respawn, failed = [], set()
        for slot in self.slots:
            code = self.exit_code(slot)
            if code is None:
                continue
            self.forget(slot)
            if not slot.container:  # what its calls started goes with it (it led their process group)
                try:
                    os.killpg(slot.pid, signal.SIGKILL)
                except OSError:
                    pass
            died = {"w": self.id, "s": P.slot_name(self.id, slot.index), "code": code}
            job, start, offset, _ = slot.read_where()
            if offset >= 0:
                died["at"] = {"j": job, "i": start, "o": offset}
            if slot.timed_out:
                died["timeout"], slot.timed_out = 1, False
            slot.clear_where()
            self.send(P.SLOT_DIED, died)
            log.warning("executor %d exited with %s; restarting it", slot.index, code)
            early = time.monotonic() - slot.started < 1.0
            slot.early_deaths = slot.early_deaths + 1 if early else 0
            if early and slot.env is not None and slot.early_deaths >= 3 and slot.env.key in self.prepared:
                # it cannot start there (an image without a usable Python, a pin that breaks burla): say so, so
                # the jobs waiting for that environment end, and go back to the worker's own
                del self.prepared[slot.env.key]
                failed.add(slot.env.key)
                self.send(P.ENV, {"w": self.id, "k": slot.env.key, "st": "failed", "t": 0.0, "m": (
                    f"executors could not start in this environment (exit code {code}, 3 times in a row); "
                    "the worker's log says why")})
            respawn.append(slot)
        for slot in self.slots:
            if slot.env is not None and slot.env.key in failed:
                slot.env, slot.early_deaths = None, 0
                if slot not in respawn:
                    self.restart_slot(slot, None)
        if any(slot.early_deaths for slot in respawn):
            time.sleep(0.5)  # do not spin on an executor that cannot start
        for slot in respawn:
            self.start_again(slot)

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
            if slot.container:
                slot.kill(signal.SIGKILL)
        kill_trees([slot.pid for slot in self.slots if not slot.container])
        for zygote in self.zygotes.values():
            zygote.close()
        for slot in self.slots:
            if slot.container and slot.popen is not None:
                try:
                    slot.popen.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    slot.popen.kill()
        for slot in self.slots:
            if slot.pid:
                try:
                    os.waitpid(slot.pid, 0)
                except ChildProcessError:
                    pass

    # ---------------------------------------------------------------- loop
    def send(self, command, header):
        """Never blocking: a refused handshake (a token of another broker) leaves ZeroMQ no connection to queue on,
        and a blocking send would wait forever instead of the loop saying why and exiting. (A broker that is down
        or restarting keeps the queue, of 100,000 messages: a worker's few a second are dropped only past that.)"""
        try:
            P.send(self.sock, command, header, flags=zmq.NOBLOCK)
        except zmq.Again:
            pass

    def register(self):
        self.send(P.REGISTER, {
            "w": self.id, "host": self.host, "pid": os.getpid(), "slots": self.nslots,
            "cpu": self.cpu, "ram": self.ram, "gpu": self.gpus, "env": self.own_env, "ctr": self.runtime,
            "py": E.python(),
        })

    # ---------------------------------------------------------------- environments
    def on_prepare(self, header, payload):
        """Restart idle slots in a job's environment, building it first (in a thread) if need be."""
        spec = header.get("e") if isinstance(header.get("e"), dict) else {}
        key = spec.get("k")
        slots = [s for s in map(self.slot_named, header.get("s") or ()) if s is not None]
        current = own_key()
        if spec.get("own") or key == self.own_env or key == current:
            if current != self.own_env:  # packages installed since the worker started count as its own
                self.own_env = current
                self.register()  # the broker must match jobs against the new key, or it asks again forever
            self.switch(slots, None)
            return
        prepared = self.prepared.get(key)
        if prepared is not None and (prepared.image or self.envs.hold(prepared)):  # (not evicted since)
            self.switch(slots, prepared)
            return
        if key not in self.building:
            self.building[key] = set()
            archive = bytes(serialize.join(payload)) if payload else b""
            threading.Thread(target=self.build, args=(spec, archive), daemon=True, name="burla-env").start()
        self.building[key].update(slots)

    def build(self, spec, archive):
        """Thread: find or build an environment, saying each step to the main loop (which owns the socket)."""
        from burla.worker import envs

        key, started = spec.get("k"), time.monotonic()

        def say(state, message):
            self.tell_loop({"w": self.id, "k": key, "st": state, "m": message, "t": time.monotonic() - started})

        try:
            with self.envs_lock:  # builds of different environments run in threads of their own
                if self.envs is None:
                    self.envs = envs.EnvCache(self.env_cache, self.env_cache_gb)
            if spec.get("img"):
                if self.runtime in (None, "?"):
                    raise EnvironmentBuildError("this worker has no container runtime")
                prepared = self.envs.prepare_image(spec, self.runtime, lambda text: say("step", text))
            else:
                prepared = self.envs.prepare(spec, archive, lambda text: say("step", text))
            self.prepared[key] = prepared
            say("ready", "found in the cache" if prepared.hit else "built")
        except EnvironmentBuildError as e:
            say("failed", str(e))
        except Exception as e:  # a bug or an OS error: still the job's answer, not a silent hang
            log.exception("preparing environment %s failed", key)
            say("failed", f"{type(e).__name__}: {e}")

    def tell_loop(self, event):
        self.events.put(event)
        os.write(self.wake_write, b".")

    def find_runtime(self):
        """Thread: is there a container runtime? Until it says, image jobs wait ("?"); others are not slowed."""
        time.sleep(RUNTIME_PROBE_DELAY)
        runtime = container_runtime(self.containers)
        if runtime:  # containers of this worker's last life (killed while one was starting, say) go now
            try:
                stale = quietly([runtime, "ps", "-aq", "--filter", f"label=burla.worker={self.id}"], 60).stdout
                if stale.split():
                    quietly([runtime, "rm", "-f", *stale.split()], 120)
            except (OSError, subprocess.TimeoutExpired):
                pass
        self.tell_loop({"runtime": runtime})

    def on_events(self):
        while True:
            try:
                event = self.events.get_nowait()
            except queue.Empty:
                return
            if "runtime" in event:
                self.runtime = event["runtime"]
                self.register()  # the broker learns whether it can send image jobs here
                continue
            if len(event["m"]) > 16_000:  # (a header stays well under a frame, in any script; the end is the news)
                event["m"] = "...\n" + event["m"][-16_000:]
            self.send(P.ENV, event)
            slots = self.building.pop(event["k"], ()) if event["st"] in ("ready", "failed") else ()
            if event["st"] == "ready":
                self.switch(slots, self.prepared[event["k"]])

    def restart_slot(self, slot, prepared):
        """Replace a slot's (idle) executor by one in another environment."""
        slot.env = prepared
        self.forget(slot)
        slot.kill(signal.SIGKILL)
        if slot.zygote is not None:
            slot.zygote.exit_code(slot.pid, wait=0.5)
        elif slot.container:
            pass  # its runtime's client ends when the container does; the loop must not wait on it
        elif slot.popen is not None:
            slot.popen.wait()
        elif slot.pid:
            try:
                os.waitpid(slot.pid, 0)
            except ChildProcessError:
                pass
        slot.clear_where()
        self.start_again(slot)

    def start_again(self, slot):
        try:
            self.start_slot(slot, fork=False)
        except OSError as e:  # its environment vanished (evicted by hand, a disk error): the worker's own
            log.warning("could not start executor %d in environment %s: %s", slot.index, slot.env.key, e)
            slot.env = None
            self.start_slot(slot, fork=False)

    def switch(self, slots, prepared):
        """Restart slots in an environment; then the cache may evict the ones no executor uses any more."""
        for slot in slots:
            self.restart_slot(slot, prepared)
        if self.envs is not None:
            used = {s.env.key.partition("-")[0] for s in self.slots if s.env is not None and not s.env.image}
            # (releases the holds on environments now unused; only then, or after a build, can eviction help)
            if self.envs.use(used):
                threading.Thread(target=self.envs.evict, args=(used,), daemon=True, name="burla-evict").start()

    def slot_named(self, name):
        prefix, _, index = str(name).rpartition("/")
        if prefix != self.id or not index.isdigit() or int(index) >= len(self.slots):
            return None
        return self.slots[int(index)]

    def run(self):
        # Fork the first executors before this process has a ZeroMQ context (a context does not survive fork):
        # a forked executor is ready in a millisecond, a fresh interpreter takes ~60 ms. Not a worker that holds
        # a token: an executor forked from it would inherit the token in its memory; its zygote forks them.
        for slot in self.slots:
            self.start_slot(slot, fork=hasattr(os, "fork") and not self.token)
        self.ctx = zmq.Context()
        self.sock = P.socket(self.ctx, zmq.DEALER, credential=self.token, role=security.WORKER)
        refused = P.monitor(self.sock, zmq.EVENT_HANDSHAKE_FAILED_AUTH) if self.token else None
        self.sock.connect(self.broker)
        self.register()
        self.joined = None  # True once the broker answered a REGISTER; False while we register again; None: never
        self.silence = None  # while it does not answer: [since when, REGISTERs sent again, when we last said so]
        self.send_announcements()
        if self.runtime == "?":
            threading.Thread(target=self.find_runtime, daemon=True, name="burla-runtime").start()
        heard = time.monotonic()
        next_beat = heard + P.HEARTBEAT_INTERVAL
        try:
            while True:
                poller = zmq.Poller()
                poller.register(self.sock, zmq.POLLIN)
                poller.register(self.wake_read, zmq.POLLIN)
                if self.parent_fd is not None:
                    poller.register(self.parent_fd, zmq.POLLIN)
                for fd in [s.pidfd for s in self.slots if s.pidfd is not None] + list(self.zygotes.values()):
                    poller.register(fd, zmq.POLLIN)  # (a zygote: its reports of executors' exits)
                if refused is not None:
                    poller.register(refused, zmq.POLLIN)
                timeout = min(max(0.0, next_beat - time.monotonic()), 0.25)  # also look for overdue calls
                events = dict(poller.poll(timeout * 1000))
                if self.parent_fd is not None and self.parent_fd in events:
                    return
                if refused is not None and refused in events:
                    log.error("the broker at %s refused this worker token: give the token `burla broker` printed "
                              "for it ($BURLA_WORKER_TOKEN or --token-file)", self.broker)
                    raise SystemExit(2)
                if self.wake_read in events:
                    os.read(self.wake_read, 4096)
                    self.on_events()
                self.kill_overdue()
                self.reap()
                while P.readable(self.sock):
                    try:
                        command, header, payload = P.recv(self.sock)
                    except P.VersionMismatch as e:
                        log.error("%s", e)
                        raise SystemExit(2)
                    heard = time.monotonic()
                    if command != P.RECONNECT and not self.joined:
                        self.on_joined()
                    if command == P.RECONNECT:
                        self.rejoin()
                    elif command == P.KILL:
                        self.signal_slot(header.get("s"), header.get("j"), bool(header.get("hard")), header.get("i"))
                    elif command == P.PREPARE:
                        self.on_prepare(header, payload)
                now = time.monotonic()
                if now - heard > P.HEARTBEAT_INTERVAL * P.HEARTBEAT_LIVENESS:
                    self.say_silent(heard, now)
                    self.rejoin()
                    heard = now
                if now >= next_beat:
                    self.send(P.HEARTBEAT, {"w": self.id})
                    next_beat = now + P.HEARTBEAT_INTERVAL
        finally:
            self.stop_executors()
            self.sock.close(0)
            shutil.rmtree(self.folder, ignore_errors=True)

    def signal_slot(self, name, job, hard, calls=None):
        """Kill a slot's executor, or interrupt its call if (and only if) that call is the given job's (calls:
        only if it is the call on one of these inputs): the job id (and inputs) go down the control pipe first,
        and the executor's SIGUSR1 handler reads them."""
        slot = self.slot_named(name)
        if slot is None:
            return
        if not hard:
            if not (isinstance(job, bytes) and len(job) == 8) or slot.control is None:
                return
            try:
                if calls:
                    os.write(slot.control, b"".join(b"I" + job + struct.pack("<q", i) for i in calls[:CALLS_TOLD]))
                else:
                    os.write(slot.control, b"C" + job)
            except OSError:  # (BlockingIOError: its pipe is full, it reads nothing: the signal would find nothing)
                return
        slot.kill(signal.SIGKILL if hard else signal.SIGUSR1)

    def on_joined(self):
        """The broker answered our REGISTER: say so once (and again after a silence, or its restart). Not the
        embedded cluster's worker, whose stderr is its program's."""
        again = "" if self.joined is None else " again"
        after = ""
        if self.silence:
            waited = time.monotonic() - self.silence[0]
            after = f" (after {waited:.0f} s {'without word' if again else 'of trying'})"
        self.joined, self.silence = True, None
        if self.parent_fd is None:
            print(f"burla worker: joined the broker at {self.broker}{again} as {self.id} with {self.nslots} "
                  f"slot{'' if self.nslots == 1 else 's'}{after}", file=sys.stderr, flush=True)

    def say_silent(self, heard, now):
        """The broker has been silent too long and we register again: say where it should be, once and then
        every SILENCE_NOTICE seconds with the count, not at every attempt."""
        if self.silence is None:
            self.silence = [heard, 0, now]
            every = P.HEARTBEAT_INTERVAL * P.HEARTBEAT_LIVENESS
            if self.joined is not None:
                log.warning("no word from the broker at %s for %.1f s; registering again every %g s", self.broker,
                            now - heard, every)
            else:
                log.warning("no answer from the broker at %s (is it running, and is that its address?); "
                            "registering again every %g s", self.broker, every)
        self.silence[1] += 1
        if now - self.silence[2] >= SILENCE_NOTICE:
            self.silence[2] = now
            log.warning("still no word from the broker at %s after %.0f s (%d attempts); registering again",
                        self.broker, now - self.silence[0], self.silence[1])

    def rejoin(self):
        if self.joined:
            self.joined = False
        self.register()
        self.announce = [(index, 0) for index in self.slot_keys]  # a restarted broker knows no slot keys
        self.send_announcements()
        self.tell_executors(b"R")
        for slots in self.building.values():  # the broker no longer holds those slots for the environment: they
            slots.clear()                      # may be busy by the time it is ready


def main(broker, slots=None, cpu=None, ram=None, gpus=(), name=None, parent_fd=None, token=None, env_cache=None,
         env_cache_gb=20.0, containers="auto"):
    logging.basicConfig(level=logging.WARNING, format="burla worker: %(message)s")

    def terminate(*_):
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # once: never again inside the cleanup below
        raise SystemExit(0)

    signal.signal(signal.SIGTERM, terminate)
    worker = Worker(broker, slots, cpu, ram, gpus, name, parent_fd, token, env_cache, env_cache_gb, containers)
    try:
        worker.run()
    except KeyboardInterrupt:
        pass
