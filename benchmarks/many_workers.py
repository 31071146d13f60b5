#!/usr/bin/env python3
"""A real broker with many simulated workers: DEALER sockets in a few processes, each a registered, heartbeating
worker with one executor slot that runs its tasks with burla's own Executor code. Times a job of one print per
input across all of them.

    python benchmarks/many_workers.py [--workers 1000] [--processes 4] [--inputs 1000] [--repeats 5]
"""

import argparse
import io
import multiprocessing
import os
import statistics
import subprocess
import sys
import tempfile
import time

import zmq


def simulate(address, names, ready):
    """One process: a worker socket and an executor slot per name, all served from one poll loop."""
    from burla import protocol as P
    from burla.worker.executor import Capture, Executor

    ctx = zmq.Context()
    ctx.max_sockets = 4 * len(names) + 16
    workers, executors = {}, {}
    for name in names:
        sock = P.socket(ctx, zmq.DEALER)
        sock.connect(address)
        P.send(sock, P.REGISTER, {"w": name, "host": "sim", "pid": os.getpid(), "slots": 1, "cpu": 1, "ram": 4})
        workers[sock] = name
        ex = Executor(address, name, 0)
        ex.sock = P.socket(ctx, zmq.DEALER)
        ex.sock.connect(address)
        ex.streams, ex.calling = (Capture(ex.sink, 1), Capture(ex.sink, 2)), False
        ex.ready_unlocked()
        executors[ex.sock] = ex
    poller = zmq.Poller()
    for sock in [*workers, *executors]:
        poller.register(sock, zmq.POLLIN)
    ready.set()
    stdout = sys.stdout
    next_beat = time.monotonic()
    while True:
        for sock, _ in poller.poll(200):
            if sock in workers:
                sock.recv_multipart()
                continue
            ex = executors[sock]
            while sock.poll(0):
                ex.handle(*P.recv(sock))
            while ex.tasks:
                ex.run_task(*ex.tasks.popleft())
        sys.stdout = stdout
        if time.monotonic() >= next_beat:
            for sock, name in workers.items():
                P.send(sock, P.HEARTBEAT, {"w": name})
            next_beat = time.monotonic() + P.HEARTBEAT_INTERVAL


def print_one(x):
    print(f"input {x}")
    return x


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--workers", type=int, default=1000)
    parser.add_argument("--processes", type=int, default=4)
    parser.add_argument("--inputs", type=int, default=1000)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()

    from burla import remote_parallel_map
    from burla.client import cluster_state

    folder = tempfile.mkdtemp(prefix="burla-bench-")
    address = f"ipc://{folder}/broker"
    broker = subprocess.Popen([sys.executable, "-m", "burla", "broker", "--bind", address])
    procs = []
    try:
        names = [f"sim{k}" for k in range(args.workers)]
        start = time.perf_counter()
        for p in range(args.processes):
            ready = multiprocessing.Event()
            proc = multiprocessing.Process(target=simulate, args=(address, names[p::args.processes], ready),
                                           daemon=True)
            proc.start()
            procs.append(proc)
        deadline, slots = time.monotonic() + 120, 0
        while True:
            try:
                state = cluster_state(address, timeout=2)
                slots = sum(w["slots"] for w in state["workers"])
            except TimeoutError:
                pass
            if slots == args.workers:
                break
            if time.monotonic() > deadline:  # (past a few thousand here, heartbeats fall behind: say so, not hang)
                print(f"only {slots} of {args.workers} simulated workers were registered after 120 s",
                      file=sys.stderr)
                sys.exit(1)
            time.sleep(0.05)
        registered = time.perf_counter() - start
        times, lines = [], 0
        for _ in range(args.repeats + 1):
            out, real = io.StringIO(), sys.stdout
            sys.stdout = out
            t = time.perf_counter()
            try:
                result = remote_parallel_map(print_one, range(args.inputs), cluster=address, spinner=False, packages=[])
            finally:
                sys.stdout = real
            times.append(time.perf_counter() - t)
            assert result == list(range(args.inputs))
            lines = out.getvalue().count("\n")
        job = statistics.median(times[1:])  # the first run also ships the function to every slot
        print(f"{args.workers} simulated workers in {args.processes} processes: all registered after "
              f"{registered:.2f} s; job of {args.inputs} inputs printing one line each: median {job:.3f} s "
              f"(first {times[0]:.3f} s), {lines} lines streamed back")
    finally:
        for proc in procs:
            proc.kill()
        broker.kill()
        broker.wait()


if __name__ == "__main__":
    main()
