"""What job environments cost: pinning the client's environment, resolving packages=[...], building a worker's
venv cold (pip and uv), and running in it once it is cached.

    python benchmarks/envs.py [--package pandas==2.2.3] [--repeats 5]
    python benchmarks/envs.py --quick    # offline smoke run (tests/test_benchmarks.py): a tiny wheel, 1 repeat

Starts its own broker and worker (one per installer, each with an empty cache in a temporary folder) and uses the
package index the machine's pip (or uv) is configured with; --quick uses no index at all, only a wheel it writes
into a temporary folder. Prints a markdown table of medians.
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
from burla.bootstrap import write_wheel  # noqa: E402

QUICK_PACKAGE = "burla_bench_tiny==1.0"


def start(folder, installer):
    address = f"ipc://{folder}/broker"
    env = dict(os.environ, BURLA_INSTALLER=installer)
    broker = subprocess.Popen([sys.executable, "-m", "burla", "broker", "--bind", address], env=env)
    worker = subprocess.Popen([sys.executable, "-m", "burla", "worker", "--broker", address, "--slots", "2",
                               "--name", f"bench-{installer}", "--env-cache", f"{folder}/cache",
                               "--containers", "none"], env=env)
    return address, [broker, worker]


def offline_index(folder):
    """Write one tiny pure wheel into folder, and tell pip, pip-compile and uv (the client's and, through the
    environment they inherit, the worker's) to find packages there and nowhere else. Returns its requirement."""
    name, _, version = QUICK_PACKAGE.partition("==")
    write_wheel(os.path.join(folder, f"{name}-{version}-py3-none-any.whl"), name, version,
                {f"{name}/__init__.py": f"VERSION = {version!r}\n".encode()})
    # burla passes PIP_FIND_LINKS/PIP_NO_INDEX on as --find-links/--no-index to pip, pip-compile and uv; the
    # machine's pip configuration and uv's are left out, and UV_OFFLINE forbids uv the network in any case.
    # uv's cache is a throwaway one too: a cold build stays cold, and the machine's cache is left alone.
    os.environ.update(PIP_CONFIG_FILE=os.devnull, PIP_NO_INDEX="1", PIP_FIND_LINKS=folder, PIP_INDEX_URL="",
                      PIP_EXTRA_INDEX_URL="", UV_OFFLINE="1", UV_NO_CONFIG="1",
                      UV_CACHE_DIR=os.path.join(folder, "uv-cache"))
    return QUICK_PACKAGE


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
    parser.add_argument("--quick", action="store_true",
                        help=f"smoke run with no network: --package {QUICK_PACKAGE} from a local wheel, 1 repeat")
    args = parser.parse_args()
    if not args.quick:
        return measure(args)
    with tempfile.TemporaryDirectory(prefix="burla-bench-wheels-") as folder:
        args.package, args.repeats = offline_index(folder), 1
        measure(args)


def measure(args):
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
