#!/usr/bin/env python3
"""Burla side by side with local peers (multiprocessing.Pool, ProcessPoolExecutor, loky, Dask, Ray).

    python benchmarks/bench.py [--workers N] [--repeats R] [--quick] [--out benchmarks/RESULTS.md]
    python benchmarks/bench.py --quick --peers burla,pool,ppe    # the smoke runs CI does (tests/test_benchmarks.py)
    python benchmarks/bench.py --quick --peers burla,loky,dask,ray --cases warm,tiny

Every (peer, case, repeat) runs in a fresh subprocess of this script (--peer NAME --case CASE), which prints one
JSON line: peers never share a machine state with one another, and cold start is a real cold start. The table
shows the median over repeats. A peer whose import fails shows "n/a". The exit status is 1 when a run of burla's
failed or timed out (another peer's failure only shows in the table).
"""

import argparse
import datetime
import faulthandler
import gc
import importlib.metadata
import importlib.util
import json
import os
import platform
import signal
import statistics
import subprocess
import shutil
import sys
import tempfile
import threading
import time


# The functions every peer maps. Top-level so that peers which pickle by reference can.
def double(x):
    return x * 2


def double_batch(xs):
    return [x * 2 for x in xs]


def sleep10(x):
    time.sleep(0.01)
    return x


def length(x):
    return len(x)


# ------------------------------------------------------------------------------------------------ peers
class Burla:
    def __init__(self, workers):
        os.environ["BURLA_LOCAL_SLOTS"] = str(workers)
        from burla import remote_parallel_map
        self.rpm = remote_parallel_map

    def start(self):
        pass  # the embedded cluster starts inside the first call; cold start counts it

    def map(self, f, items, chunksize=None):
        return self.rpm(f, items, spinner=False)

    def executor(self):
        import burla
        return burla.Executor(spinner=False)

    def close(self):
        from burla import local
        local.stop()


class Pool:
    def __init__(self, workers):
        import multiprocessing
        self.mp, self.workers = multiprocessing, workers

    def start(self):
        self.pool = self.mp.Pool(self.workers)

    def map(self, f, items, chunksize=None):
        return self.pool.map(f, items, chunksize)

    def close(self):
        self.pool.terminate()
        self.pool.join()


class PPE:
    def __init__(self, workers):
        import concurrent.futures
        self.cf, self.workers = concurrent.futures, workers

    def start(self):
        self.ex = self.cf.ProcessPoolExecutor(self.workers)

    def map(self, f, items, chunksize=None):
        return list(self.ex.map(f, items, chunksize=chunksize or 1))

    def executor(self):
        return self.ex

    def close(self):
        self.ex.shutdown(wait=True, cancel_futures=True)


class Loky(PPE):
    def __init__(self, workers):
        import loky
        self.loky, self.workers = loky, workers

    def start(self):
        self.ex = self.loky.get_reusable_executor(max_workers=self.workers)

    def close(self):
        self.ex.shutdown(wait=True, kill_workers=True)


class Dask:
    batched = True  # per-task overhead is ~1 ms: 100k one-item tasks would measure the scheduler, not the map

    def __init__(self, workers):
        from dask.distributed import Client, LocalCluster
        self.Client, self.LocalCluster, self.workers = Client, LocalCluster, workers

    def start(self):
        import logging
        self.cluster = self.LocalCluster(n_workers=self.workers, threads_per_worker=1, processes=True,
                                         dashboard_address=None, silence_logs=logging.ERROR)
        self.client = self.Client(self.cluster)

    def map(self, f, items, chunksize=None):
        # pure=False: identical inputs would otherwise hit Dask's result cache instead of running again.
        return self.client.gather(self.client.map(f, items, pure=False))

    def close(self):
        self.client.close()
        self.cluster.close()


class Ray:
    batched = True

    def __init__(self, workers):
        import ray
        self.ray, self.workers, self.remote = ray, workers, {}

    def start(self):
        self.ray.init(num_cpus=self.workers, include_dashboard=False, log_to_driver=False,
                      logging_level="ERROR")

    def map(self, f, items, chunksize=None):
        if f not in self.remote:
            self.remote[f] = self.ray.remote(f)
        return self.ray.get([self.remote[f].remote(x) for x in items])

    def close(self):
        self.ray.shutdown()


PEERS = {"burla": Burla, "pool": Pool, "ppe": PPE, "loky": Loky, "dask": Dask, "ray": Ray}
LABELS = {"burla": "burla", "pool": "mp.Pool", "ppe": "ProcessPoolExecutor", "loky": "loky",
          "dask": "Dask distributed", "ray": "Ray"}
DISTS = {"burla": "burla", "loky": "loky", "dask": "distributed", "ray": "ray"}  # for versions and n/a
MODULES = {"burla": "burla", "loky": "loky", "dask": "distributed", "ray": "ray"}
BATCH = 1000
POOL_CHUNKSIZES = [1000, 5000, 25000]


# ------------------------------------------------------------------------------------------------ cases
# Each takes a started-or-not peer and the sizes, and returns {"v": the lower-is-better number, ...}.
def sizes(quick):
    if quick:
        return dict(warm=10, tiny=10_000, sleep=200, big=100, memory=100_000)
    return dict(warm=50, tiny=100_000, sleep=2000, big=1000, memory=1_000_000)


def case_warm(p, n):
    p.start()
    p.map(double, [1, 2, 3])
    times = []
    for _ in range(n["warm"]):
        t = time.perf_counter()
        p.map(double, [1, 2, 3])
        times.append(time.perf_counter() - t)
    return {"v": statistics.median(times) * 1e3}


def case_cold(p, n):
    t = time.perf_counter()  # the library is already imported (the peer's constructor did it)
    p.start()
    assert p.map(double, [1, 2, 3]) == [2, 4, 6]
    return {"v": time.perf_counter() - t}


def case_tiny(p, n):
    items = list(range(n["tiny"]))
    p.start()
    p.map(double, items[:1000])  # warm-up: workers up, function loaded
    # Every peer has as many timed runs as Pool has chunksizes, and shows its best (Pool's best is of its third
    # run at 25000: one first run against another's third would measure warm-up, not the map).
    if getattr(p, "batched", False):
        chunks = [items[i:i + BATCH] for i in range(0, len(items), BATCH)]
        p.map(double_batch, chunks[:4])
        runs = [(lambda: [y for ys in p.map(double_batch, chunks) for y in ys], f"batches of {BATCH}")]
    elif isinstance(p, Pool):
        runs = [(lambda cs=cs: p.map(double, items, cs), f"chunksize={cs}") for cs in POOL_CHUNKSIZES]
    else:
        cs = None if isinstance(p, Burla) else 5000
        runs = [(lambda: p.map(double, items, cs), f"chunksize={cs}" if cs else "")]
    best = []
    for run, label in (runs * len(POOL_CHUNKSIZES))[:len(POOL_CHUNKSIZES)]:
        t = time.perf_counter()
        out = run()
        best.append((time.perf_counter() - t, label))
    v, label = min(best)
    assert out[-1] == 2 * items[-1] and len(out) == len(items)
    return {"v": v, "label": label}


def case_sleep(p, n):
    p.start()
    p.map(sleep10, list(range(4)))
    t = time.perf_counter()
    p.map(sleep10, list(range(n["sleep"])))
    return {"v": time.perf_counter() - t}


def case_big(p, n):
    # os.urandom of 1 GiB is slow; one random block with a distinct 4-byte prefix per item is as incompressible.
    block = os.urandom(1 << 20)
    items = [i.to_bytes(4, "little") + block[4:] for i in range(n["big"])]
    p.start()
    p.map(length, items[:2])
    t = time.perf_counter()
    assert p.map(length, items) == [1 << 20] * len(items)
    return {"v": time.perf_counter() - t}


def case_memory(p, n):
    import psutil

    proc = psutil.Process()
    p.start()
    p.map(double, [1, 2, 3])  # connection/cluster/pool up before the baseline: we measure the growth per input
    gc.collect()
    base = peak = proc.memory_info().rss
    done = threading.Event()

    def sample():
        nonlocal peak
        while not done.wait(0.01):
            peak = max(peak, proc.memory_info().rss)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    inputs = (i for i in range(n["memory"]))
    t = time.perf_counter()
    if isinstance(p, Burla):
        results = p.rpm(double, inputs, generator=True, spinner=False)
    else:
        results = p.pool.imap_unordered(double, inputs, chunksize=10_000)
    count = sum(1 for _ in results)
    elapsed = time.perf_counter() - t
    done.set()
    sampler.join()
    peak = max(peak, proc.memory_info().rss)
    assert count == n["memory"]
    return {"v": (peak - base) / 2**20, "s": elapsed}


def case_submit(p, n):
    """n["tiny"] calls one by one through concurrent.futures' submit(), until every future is done."""
    import concurrent.futures

    p.start()
    ex = p.executor()
    concurrent.futures.wait([ex.submit(double, i) for i in range(1000)])  # warm-up
    t = time.perf_counter()
    futures = [ex.submit(double, i) for i in range(n["tiny"])]
    concurrent.futures.wait(futures)
    v = time.perf_counter() - t
    assert futures[-1].result() == 2 * (n["tiny"] - 1)
    return {"v": v}


CASES = {"warm": case_warm, "cold": case_cold, "tiny": case_tiny, "sleep": case_sleep, "big": case_big,
         "memory": case_memory, "submit": case_submit}
ONLY = {"memory": ("burla", "pool"), "submit": ("burla", "ppe", "loky")}  # cases that not every peer runs


def child(args):
    # A hung run dumps its threads' stacks to stderr shortly before the parent kills it, to say where it hung.
    faulthandler.dump_traceback_later(max(args.timeout - 5, 1), exit=False)
    try:
        p = PEERS[args.peer](args.workers)
    except ImportError as e:
        print(json.dumps({"skip": str(e)}), flush=True)
        return
    try:
        result = CASES[args.case](p, sizes(args.quick))
        print(json.dumps(result), flush=True)  # before teardown, so a slow teardown cannot lose it
    finally:
        p.close()


# ------------------------------------------------------------------------------------------------ parent
def kill_group(pgid):
    # The child leads its own session, so its pool/cluster processes are in this group even once orphaned.
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def run_child(peer, case, args):
    cmd = [sys.executable, os.path.abspath(__file__), "--peer", peer, "--case", case,
           "--workers", str(args.workers), "--timeout", str(args.timeout)] + (["--quick"] if args.quick else [])
    # A private temporary folder per child, removed afterwards: what a killed child leaves (burla's ipc
    # folder, Ray's session, Dask's worker space) goes with it.
    scratch = tempfile.mkdtemp(prefix="bench-")
    # (Ray's session sockets take some 60 more characters, and a socket's path is at most 107: under a long
    # TMPDIR, such as a test's, Ray's session goes in a short folder of its own in /tmp)
    ray_dir = scratch if len(scratch) < 40 else tempfile.mkdtemp(prefix="bench-ray-", dir="/tmp")
    env = dict(os.environ, TMPDIR=scratch, RAY_TMPDIR=ray_dir)
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                            start_new_session=True)
    problem = None
    try:
        out, err = proc.communicate(timeout=args.timeout)
        if proc.returncode:
            problem = f"exit {proc.returncode}: {(err.strip().splitlines() or [''])[-1][:200]}"
    except subprocess.TimeoutExpired:
        kill_group(proc.pid)
        out, err = proc.communicate()
        problem = f"timeout after {args.timeout} s"
        print(f"    ({LABELS[peer]}, {case}: {problem}; its stderr ends with:)\n{err[-4000:]}", file=sys.stderr)
    finally:
        kill_group(proc.pid)
        for folder in {scratch, ray_dir}:
            shutil.rmtree(folder, ignore_errors=True)
    lines = [line for line in out.splitlines() if line.startswith("{")]
    if lines:
        result = json.loads(lines[-1])
        if problem:  # (a teardown that hung or crashed: the figure stands, but burla's counts as failed)
            print(f"    ({LABELS[peer]}, {case}: result kept, but {problem})", file=sys.stderr)
            result["problem"] = problem
        return result
    return {"error": problem or "no result printed"}


def installed(peer):
    return peer not in MODULES or importlib.util.find_spec(MODULES[peer]) is not None


def median_result(runs):
    ok = sorted((r for r in runs if "v" in r), key=lambda r: r["v"])
    if not ok:
        return runs[-1]
    mid = dict(ok[len(ok) // 2])  # its label/extra fields describe the middle run
    mid["v"] = statistics.median(r["v"] for r in ok)
    return mid


def cell(case, r, n, workers):
    if "skip" in r:
        return "n/a"
    if "error" in r:
        return "fail" if "timeout" not in r["error"] else "timeout"
    v, label = r["v"], r.get("label")
    if case == "warm":
        return f"{v:.2f} ms"
    if case == "cold":
        return f"{v:.2f} s"
    if case == "tiny":
        extra = f", {label}" if label else ""
        return f"{v:.3f} s ({n['tiny'] / v / 1e6:.2f}M/s{extra})"
    if case == "sleep":
        return f"{v:.2f} s ({100 * n['sleep'] * 0.01 / workers / v:.1f}%)"
    if case == "big":
        return f"{v:.2f} s"
    if case == "submit":
        return f"{v:.3f} s ({n['tiny'] / v / 1e3:.0f}k/s)"
    return f"{v:.1f} MiB ({r['s']:.2f} s)"


def goal(case, res, n, workers):
    """(goal text, met?) for burla's result; met is None when it cannot be judged."""
    b, pool = res["burla"].get("v"), res.get("pool", {}).get("v")
    vs_pool = pool / b if b and pool else None
    texts = {"warm": "<= 0.5 ms", "cold": "<= 0.3 s", "tiny": ">= 1.0x Pool best",
             "sleep": ">= 98% of ideal", "big": ">= 1.0x Pool", "memory": "RSS growth <= 30 MiB",
             "submit": "<= 3x burla's tiny (remote_parallel_map)"}
    if b is None:
        return texts[case], None
    tiny = res.get("tiny_burla")
    met = {"warm": b <= 0.5, "cold": b <= 0.3, "sleep": n["sleep"] * 0.01 / workers / b >= 0.98,
           "memory": b <= 30, "submit": None if not tiny else b <= 3 * tiny,
           "tiny": None if vs_pool is None else vs_pool >= 1.0,
           "big": None if vs_pool is None else vs_pool >= 1.0}[case]
    return texts[case], met


def parent(args):
    n = sizes(args.quick)
    peers = [p for p in PEERS if p in args.peers]
    titles = {"warm": "warm latency, map x*2 over 3 inputs",
              "cold": "cold start: import -> first result of [1,2,3]",
              "tiny": f"{n['tiny']:,} tiny calls (x*2)",
              "sleep": f"{n['sleep']:,} calls sleeping 10 ms (% of ideal)",
              "big": f"{n['big']:,} calls with 1 MiB inputs",
              "memory": f"client RSS growth over {n['memory']:,} inputs",
              "submit": f"{n['tiny']:,} submit() calls of x*2, until all are done"}
    started = time.time()
    results, burla_failed = {}, []
    for case in args.cases:
        for peer in peers:
            if peer not in ONLY.get(case, peers):
                results[case, peer] = {"none": True}
                continue
            if not installed(peer):
                results[case, peer] = {"skip": "not installed"}
                if peer == "burla":
                    burla_failed.append(f"{case}: burla is not installed")
                continue
            runs = []
            for k in range(args.repeats):
                r = run_child(peer, case, args)
                print(f"  {case:6} {LABELS[peer]:20} {k + 1}/{args.repeats}: {r}", file=sys.stderr, flush=True)
                runs.append(r)
                if peer == "burla" and ("error" in r or "problem" in r or "skip" in r):
                    burla_failed.append(f"{case}: {r.get('error') or r.get('problem') or r.get('skip')}")
                if "skip" in r:
                    break
            results[case, peer] = median_result(runs)
    elapsed = time.time() - started

    def version(p):
        try:
            return importlib.metadata.version(DISTS[p]) if p in DISTS else "stdlib"
        except importlib.metadata.PackageNotFoundError:
            return "not installed"

    lines = [
        "# Burla vs local peers",
        "",
        f"Date: {datetime.datetime.now().astimezone():%Y-%m-%d %H:%M %Z}  ",
        f"Machine: {os.cpu_count()} CPUs ({platform.machine()}), {platform.system()} {platform.release()}, "
        f"Python {platform.python_version()}  ",
        f"Workers: {args.workers} for every peer; median of {args.repeats} repeat(s), each in a fresh process"
        f"{'; --quick sizes' if args.quick else ''}; run took {elapsed / 60:.1f} min  ",
        "Versions: " + ", ".join(f"{LABELS[p]} {version(p)}" for p in peers),
        "",
        "| case | goal | " + " | ".join(LABELS[p] for p in peers)
        + " | burla vs best peer (peer/burla, >1 = burla better) | goal met |",
        "|" + "---|" * (len(peers) + 4),
    ]
    for case in args.cases:
        res = {p: results[case, p] for p in peers}
        res["tiny_burla"] = results.get(("tiny", "burla"), {}).get("v")
        cells = [("—" if "none" in res[p] else cell(case, res[p], n, args.workers)) for p in peers]
        others = [(res[p]["v"], p) for p in peers if p != "burla" and "v" in res[p]]
        b = res.get("burla", {}).get("v")
        ratio = "—"
        if b and others:
            best, who = min(others)
            ratio = f"{best / b:.2f}x (vs {LABELS[who]})"
        text, met = goal(case, res, n, args.workers) if "burla" in res else ("", None)
        mark = {True: "yes", False: "NO", None: "?"}[met]
        lines.append(f"| {titles[case]} | {text} | " + " | ".join(cells) + f" | {ratio} | {mark} |")
    lines += [
        "",
        "Notes:",
        "- Ratios compare times (or MiB for memory): best peer's value / burla's, so >1 means burla is faster "
        "(or leaner).",
        "- warm latency: median of per-call wall times after a warm-up call. cold start: from right after the "
        "library's import to the first result, including starting the pool/cluster.",
        f"- tiny calls: mp.Pool shows the best of chunksizes {POOL_CHUNKSIZES}; ProcessPoolExecutor and loky "
        f"use chunksize=5000; burla picks its own batch size; each of the others shows the best of as many "
        f"({len(POOL_CHUNKSIZES)}) timed runs. Dask and Ray map a function over batches of "
        f"{BATCH} items (one task per batch) because their per-task overhead makes 100k single-item tasks "
        "meaningless; the other cases use one task per input.",
        f"- sleep: ideal = calls x 10 ms / {args.workers} workers.",
        "- memory: only burla (generator in, generator=True out) and mp.Pool.imap_unordered(chunksize=10000); "
        "growth of the client's RSS from just before the map to its peak (sampled every 10 ms).",
        "- submit: ProcessPoolExecutor, loky and burla.Executor, one submit() per call in a loop, then "
        "concurrent.futures.wait on all; its goal compares burla.Executor with burla's own tiny case.",
        "- n/a = library not installed; fail/timeout = the run did not produce a result; — = not run.",
    ]
    table = "\n".join(lines) + "\n"
    print(table)
    if args.out:
        with open(args.out, "w") as f:
            f.write(table)
        print(f"written to {args.out}", file=sys.stderr)
    if burla_failed:  # after the table, so it still shows what did run
        print("burla's own runs failed: " + "; ".join(burla_failed), file=sys.stderr)
        sys.exit(1)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workers", type=int, default=os.cpu_count())
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--quick", action="store_true", help="smoke run: repeats=1 and smaller sizes")
    ap.add_argument("--out", help="also write the Markdown table to this file")
    ap.add_argument("--timeout", type=int, help="seconds allowed to each subprocess (300; 30 with --quick)")
    ap.add_argument("--peers", default=",".join(PEERS), help="comma-separated subset of " + ",".join(PEERS))
    ap.add_argument("--cases", default=",".join(CASES), help="comma-separated subset of " + ",".join(CASES))
    ap.add_argument("--peer", help=argparse.SUPPRESS)  # internal: run one case of one peer, print JSON
    ap.add_argument("--case", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.timeout is None:  # quick runs take a second or two each: a hang must not eat CI's minute
        args.timeout = 30 if args.quick else 300
    if args.peer:
        return child(args)
    if args.quick:
        args.repeats = 1
    args.peers = args.peers.split(",")
    args.cases = args.cases.split(",")
    for name, valid in (("peers", PEERS), ("cases", CASES)):
        bad = set(getattr(args, name)) - set(valid)
        if bad:
            ap.error(f"unknown {name}: {', '.join(sorted(bad))}")
    if "burla" not in args.peers:
        ap.error("burla must be among --peers: the table compares against it")
    parent(args)


if __name__ == "__main__":
    main()
