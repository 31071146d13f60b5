"""The processes a call starts: an executor leads a process group of its own, and a call that is timed out or
cancelled takes the processes it started with it."""

import collections
import os
import signal
import sys
import threading
import time

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
