"""What job environments cost: pinning the client's environment, resolving packages=[...], building a worker's
venv cold (pip and uv), and running in it once it is cached.

    python benchmarks/envs.py [--package pandas==2.2.3] [--repeats 5]

Starts its own broker and worker (one per installer, each with an empty cache in a temporary folder) and uses the
package index the machine's pip (or uv) is configured with. Prints a markdown table of medians.
"""

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time


from burla import env as E  # noqa: E402
from burla import remote_parallel_map  # noqa: E402


def start(folder, installer):
    address = f"ipc://{folder}/broker"
    env = dict(os.environ, BURLA_INSTALLER=installer)
    broker = subprocess.Popen([sys.executable, "-m", "burla", "broker", "--bind", address], env=env)
    worker = subprocess.Popen([sys.executable, "-m", "burla", "worker", "--broker", address, "--slots", "2",
                               "--name", f"bench-{installer}", "--env-cache", f"{folder}/cache",
                               "--containers", "none"], env=env)
    return address, [broker, worker]


def job(address, packages, n=2):
    started = time.perf_counter()
    remote_parallel_map(abs, range(n), cluster=address, packages=packages, spinner=False)
    return time.perf_counter() - started


def timed(fn, repeats):
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        fn()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--package", default="pandas==2.2.3", help="a package the worker does not have")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    rows = []

    E._current.clear()
    rows.append(("pin the client's own environment (first call in a process)", timed(
        lambda: (E._current.clear(), E.current()), args.repeats)))
    rows.append(("pin it again (cached until site-packages changes)", timed(E.current, args.repeats * 100)))
    installers = ["pip"] + (["uv"] if E.uv() else [])
    for installer in installers:
        os.environ["BURLA_INSTALLER"] = installer
        E._resolved.clear()
        rows.append((f"resolve packages=[{args.package!r}] with {'pip-compile' if installer == 'pip' else 'uv'}",
                     timed(lambda: (E._resolved.clear(), E.resolve([args.package])), args.repeats)))
        with tempfile.TemporaryDirectory(prefix="burla-bench-") as folder:
            address, procs = start(folder, installer)
            try:
                job(address, [])  # the cluster is up and warm
                cold = job(address, [args.package])
                rows.append((f"{installer}: cold build of [{args.package!r}] + a 2-call job", cold))
                rows.append((f"{installer}: next job, same environment (slots already in it)",
                             statistics.median(job(address, [args.package]) for _ in range(args.repeats * 4))))
                rows.append((f"{installer}: 2-call job in the worker's own environment (baseline)",
                             statistics.median(job(address, []) for _ in range(args.repeats * 4))))
                switches = []
                for _ in range(args.repeats):  # each job must restart both slots in the other environment
                    switches.append(job(address, [args.package]))
                    job(address, [])
                rows.append((f"{installer}: job switching 2 slots into the cached venv", statistics.median(switches)))
            finally:
                for p in procs:
                    p.kill()
                    p.wait()
    print("| what | median |\n|---|---|")
    for what, seconds in rows:
        shown = f"{seconds * 1e6:.0f} µs" if seconds < 1e-3 else f"{seconds * 1e3:.1f} ms" if seconds < 1 else \
            f"{seconds:.2f} s"
        print(f"| {what} | {shown} |")


if __name__ == "__main__":
    main()
