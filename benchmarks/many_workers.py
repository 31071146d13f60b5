#!/usr/bin/env python3
"""One real broker against many simulated slots: how far a single broker goes.

    python benchmarks/many_workers.py [--slots 1000,5000,10000] [--slots-per-worker 50] [--processes 4]
                                      [--inputs 1000] [--noop 1000000] [--repeats 3] [--quick] [--out FILE]

Each simulated worker is a DEALER that registers and heartbeats like a real one; each of its slots is a DEALER of
its own (as a real executor is) that runs its tasks with burla's own Executor code. They live in a few processes,
served from one poll loop each, so the simulation needs no core per slot. For every size it times:
- registration: from starting the simulators until the broker counts every slot;
- a job of --inputs calls that each print a line (every line streams back), median of --repeats after one that
  also ships the function to each slot: batched as the client chooses (these calls are tiny: a few batches), and
  forced to one call per batch, as calls of a second or more would go (spread over --inputs slots);
- a job of --noop no-op calls (the client sizes its batches, so the slots it uses depend on the per-call time);
- the broker's messages per second (its own counters) and CPU share during each job, and its resident memory.
The simulators share this machine's cores with the broker and client: the broker's CPU share says whether it, or
the simulation, was the limit.
"""

import argparse
import multiprocessing
import os
import select
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time

import psutil
import zmq


def simulate(address, workers, per_worker):
    """One process: for each worker name a worker socket and per_worker executor slots, one poll loop for all."""
    from burla import protocol as P
    from burla.worker.executor import Capture, Executor

    ctx = zmq.Context()
    ctx.max_sockets = 2 * len(workers) * (per_worker + 1) + 16
    heartbeats, executors = {}, {}
    for name, slots in workers:
        sock = P.socket(ctx, zmq.DEALER)
        sock.connect(address)
        P.send(sock, P.REGISTER, {"w": name, "host": "sim", "pid": os.getpid(), "slots": slots, "cpu": slots,
                                  "ram": 4 * slots})
        heartbeats[sock] = name
        for index in range(slots):
            ex = Executor(address, name, index)
            ex.sock = P.socket(ctx, zmq.DEALER)
            ex.sock.connect(address)
            ex.streams, ex.calling = (Capture(ex.sink, 1), Capture(ex.sink, 2)), False
            ex.ready_unlocked()
            executors[ex.sock] = ex
    # epoll over the sockets' ZMQ_FDs: a wait costs what is ready, not a pass over thousands of sockets (as
    # zmq.Poller would). Those descriptors only say "look at ZMQ_EVENTS": so every socket woken is drained, again
    # after sending on it (a send can take the notice of a message that came meanwhile), and all are looked at
    # now and then.
    socks = {sock.getsockopt(zmq.FD): sock for sock in [*heartbeats, *executors]}
    epoll = select.epoll()
    for fd in socks:
        epoll.register(fd, select.EPOLLIN)
    stdout = sys.stdout
    next_beat = next_sweep = time.monotonic()

    def serve(sock):
        if sock in heartbeats:
            while P.readable(sock):
                sock.recv_multipart()
            return
        ex = executors[sock]
        while P.readable(sock):
            while P.readable(sock):
                ex.handle(*P.recv(sock))
            while ex.tasks:
                ex.run_task(*ex.tasks.popleft())

    while True:
        for fd, _ in epoll.poll(0.2):
            serve(socks[fd])
        sys.stdout = stdout
        now = time.monotonic()
        if now >= next_sweep:
            for sock in socks.values():
                serve(sock)
            next_sweep = now + 0.5
        if now >= next_beat:
            for sock, name in heartbeats.items():
                P.send(sock, P.HEARTBEAT, {"w": name})
                serve(sock)
            next_beat = now + P.HEARTBEAT_INTERVAL


def print_one(x):
    print(f"input {x}")
    return x


def noop(x):
    return x


def print_job(address, n, spread):
    """Seconds a job of n print_one calls takes. spread: one call per batch, as the client would send calls that
    each take a second or more (these return at once, so the client itself would batch them)."""
    from burla import client, remote_parallel_map

    sized = client.Job.batch_size
    if spread:
        client.Job.batch_size = lambda job: 1
    real, sys.stdout = sys.stdout, open(os.devnull, "w")
    t = time.perf_counter()
    try:
        result = remote_parallel_map(print_one, range(n), cluster=address, spinner=False, packages=[])
    finally:
        client.Job.batch_size = sized
        sys.stdout.close()
        sys.stdout = real
    assert result == list(range(n))
    return time.perf_counter() - t


class Watch:
    """The broker's CPU share, peak memory and message counts over a stretch of time."""

    def __init__(self, proc, address, sims):
        self.proc, self.address = proc, address
        self.others = [psutil.Process(p.pid) for p in sims] + [psutil.Process()]  # simulators, this client
        self.peak, self.running = 0, True
        self.cpu0, self.t0, self.msgs0 = self.cpu(), time.perf_counter(), self.msgs()
        self.others0 = [self.cpu(p) for p in self.others]
        self.thread = threading.Thread(target=self.sample, daemon=True)
        self.thread.start()

    def cpu(self, proc=None):
        times = (proc or self.proc).cpu_times()
        return times.user + times.system

    def msgs(self):
        from burla.client import cluster_state

        return sum(cluster_state(self.address, timeout=10)["msgs"])

    def sample(self):
        while self.running:
            self.peak = max(self.peak, self.proc.memory_info().rss)
            time.sleep(0.02)

    def stop(self):
        self.running = False
        self.thread.join()
        wall = time.perf_counter() - self.t0
        others = [(self.cpu(p) - c) / wall for p, c in zip(self.others, self.others0)]
        return {"cpu": (self.cpu() - self.cpu0) / wall, "msgs": (self.msgs() - self.msgs0) / wall,
                "rss": self.peak / 2 ** 20, "sims": sum(others[:-1]), "client": others[-1]}


def run_size(total, args):
    """Start a broker and `total` simulated slots, time what the module says, and stop them."""
    from burla import remote_parallel_map
    from burla.client import cluster_state

    folder = tempfile.mkdtemp(prefix="burla-bench-")
    address = f"ipc://{folder}/broker"
    broker = subprocess.Popen([sys.executable, "-m", "burla", "broker", "--bind", address], stdout=subprocess.DEVNULL)
    bproc, sims, row = psutil.Process(broker.pid), [], {"slots": total}
    try:
        sizes = [min(args.slots_per_worker, total - k) for k in range(0, total, args.slots_per_worker)]
        workers = [(f"sim{k}", n) for k, n in enumerate(sizes)]
        row["workers"] = len(workers)
        processes = min(args.processes, len(workers))
        start = time.perf_counter()
        for p in range(processes):
            proc = multiprocessing.Process(target=simulate, args=(address, workers[p::processes],
                                                                  args.slots_per_worker), daemon=True)
            proc.start()
            sims.append(proc)
        deadline, slots = time.monotonic() + args.register_limit, 0
        while slots < total:
            if time.monotonic() > deadline:
                row["register"] = f"only {slots:,} of {total:,} after {args.register_limit:.0f} s"
                return row
            try:
                slots = cluster_state(address, timeout=5).get("nslots", 0)
            except TimeoutError:
                pass
            time.sleep(0.05)
        row["register"] = time.perf_counter() - start
        row["rss_idle"] = bproc.memory_info().rss / 2 ** 20

        for spread in (False, True):
            key = "spread" if spread else "print"
            times, watch = [], Watch(bproc, address, sims)
            for _ in range(args.repeats + 1):
                times.append(print_job(address, args.inputs, spread))
            row[key], row[key + "_first"] = statistics.median(times[1:]), times[0]
            row[key + "_broker"] = watch.stop()

        watch = Watch(bproc, address, sims)
        t = time.perf_counter()
        result = remote_parallel_map(noop, range(args.noop), cluster=address, spinner=False, packages=[])
        row["noop"] = time.perf_counter() - t
        row["noop_broker"] = watch.stop()
        assert len(result) == args.noop and result[-1] == args.noop - 1
        return row
    finally:
        broker.kill()  # (first: else it logs every simulated worker's departure)
        broker.wait()
        for proc in sims:
            proc.kill()
            proc.join(5)
        shutil.rmtree(folder, ignore_errors=True)


def table(rows, args):
    head = (f"| slots | workers | all registered | {args.inputs:,} prints, batched | {args.inputs:,} prints, one per "
            f"batch | broker msgs/s, CPU | {args.noop:,} no-op calls | broker msgs/s, CPU | broker memory (idle, peak) |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        if not isinstance(r.get("register"), float):
            lines.append(f"| {r['slots']:,} | {r.get('workers', '')} | {r.get('register', 'failed')} |" + " |" * 6)
            continue
        sb, nb = r["spread_broker"], r["noop_broker"]
        lines.append(
            f"| {r['slots']:,} | {r['workers']:,} | {r['register']:.2f} s | {r['print']:.3f} s | "
            f"{r['spread']:.3f} s (first {r['spread_first']:.3f} s) | {sb['msgs']:,.0f}, {100 * sb['cpu']:.0f}% | "
            f"{r['noop']:.2f} s ({args.noop / r['noop'] / 1e6:.2f}M/s) | {nb['msgs']:,.0f}, {100 * nb['cpu']:.0f}% | "
            f"{r['rss_idle']:.0f} MiB, {max(sb['rss'], nb['rss'], r['print_broker']['rss']):.0f} MiB |")
    return "\n".join(lines)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--slots", default="1000,5000,10000", help="comma-separated sizes to sweep")
    parser.add_argument("--slots-per-worker", type=int, default=50)
    parser.add_argument("--processes", type=int, default=4, help="simulator processes")
    parser.add_argument("--inputs", type=int, default=1000, help="calls in the print job")
    parser.add_argument("--noop", type=int, default=1_000_000, help="calls in the no-op job")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--register-limit", type=float, default=180.0, help="seconds to wait for registration")
    parser.add_argument("--quick", action="store_true", help="a smoke run for CI: 200 slots, small jobs")
    parser.add_argument("--out", help="also write the Markdown table to this file")
    args = parser.parse_args()
    if args.quick:
        args.slots, args.processes, args.inputs, args.noop, args.repeats = "200", 2, 200, 20_000, 1
    rows = []
    for total in [int(s) for s in args.slots.split(",")]:
        rows.append(run_size(total, args))
        print(f"{total:,} simulated slots: {rows[-1]}", file=sys.stderr, flush=True)
    text = table(rows, args)
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")
    return 0 if all(isinstance(r.get("register"), float) for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
