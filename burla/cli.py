"""The burla command: burla broker | worker | login | status | jobs list/show/logs/attach/results/cancel |
cluster up/down/status."""

import argparse
import re
import sys


def parse_gpus(spec):
    """"A100:4" -> 4 x A100; "2" -> 2 unnamed; "A100,T4" -> one of each."""
    gpus = []
    for part in filter(None, (spec or "").split(",")):
        name, _, count = part.partition(":")
        if name.isdigit() and not count:
            gpus += ["gpu"] * int(name)
        else:
            gpus += [name] * int(count or 1)
    return gpus


def detect_gpus(timeout=10.0):
    """This host's GPUs by name, as nvidia-smi lists them (PCI bus order, the order CUDA_VISIBLE_DEVICES's
    indices follow on our executors); only those CUDA_VISIBLE_DEVICES leaves visible, if it is set. No nvidia-smi,
    or one that fails or hangs: no GPUs."""
    import os
    import shutil
    import subprocess

    if not shutil.which("nvidia-smi"):
        return []
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=index,uuid,name", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=timeout, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return []
    rows = [[field.strip() for field in line.split(",", 2)] for line in out.splitlines() if line.count(",") >= 2]
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is None:
        return [name for _, _, name in rows]
    # (the executors index into the worker's visible GPUs: see burla.worker.executor.visible_devices)
    return [name for v in visible.split(",") for index, uuid, name in rows if v.strip() in (index, uuid)]


def main(argv=None):
    parser = argparse.ArgumentParser(prog="burla", description="Run Python functions on many machines at once.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("broker", help="run a broker (the head of a cluster)")
    p.add_argument("--bind", default="tcp://0.0.0.0:5555", help="address to listen on (default %(default)s)")
    p.add_argument("--state-dir",
                   help="private folder for the broker's keys, API keys, worker tokens and jobs (default "
                        "~/.burla/broker; for an ipc:// broker, beside its socket)")
    p.add_argument("--spool-gb", type=float, default=20.0,
                   help="disk the jobs' spooled inputs and kept results may use (default %(default)s)")
    p.add_argument("--retention", type=float, default=7.0,
                   help="days an ended detached job's results are kept (default %(default)s)")
    p.add_argument("--new-api-key", action="store_true", help="issue one more API key (a new client), print it, exit")
    p.add_argument("--insecure", action="store_true",
                   help="TCP without encryption or authentication (only on a network you fully trust)")
    p.add_argument("--parent-fd", type=int, help=argparse.SUPPRESS)

    p = sub.add_parser("worker", help="run a worker that joins a broker")
    p.add_argument("--broker", required=True, help="the broker's address, e.g. tcp://HOST:5555 (or HOST:5555)")
    p.add_argument("--slots", type=int, help="calls run at once (default: cpu count)")
    p.add_argument("--cpu", type=float, help="cpus to advertise (default: this host's)")
    p.add_argument("--ram", type=float, help="GB of RAM to advertise (default: this host's)")
    p.add_argument("--gpus", help="GPUs to advertise: 'A100:4', '2' or 'A100,T4'; '0' for none (default: those "
                                  "nvidia-smi lists, if it is installed)")
    p.add_argument("--name", help="worker id (default: HOST-PID)")
    p.add_argument("--token-file", help="a file (mode 0600) holding the broker's worker token, bw1-... (default: "
                                        "$BURLA_WORKER_TOKEN)")
    p.add_argument("--token", help=argparse.SUPPRESS)  # (puts the token in every process's command line)
    p.add_argument("--env-cache", help="folder of the jobs' virtual environments, shared by the workers of a host "
                                       "(default: $BURLA_ENV_CACHE or ~/.cache/burla/envs)")
    p.add_argument("--env-cache-gb", type=float, default=20.0,
                   help="evict the least recently used environments past this size (default %(default)s)")
    p.add_argument("--containers", choices=["auto", "none", "docker", "podman"], default="auto",
                   help="container runtime for jobs with image= or dockerfile= (default: docker or podman, if one "
                        "answers)")
    p.add_argument("--parent-fd", type=int, help=argparse.SUPPRESS)

    p = sub.add_parser("login", help="save a cluster's address and API key in ~/.burla/config.toml, then check "
                                     "that its broker answers")
    p.add_argument("cluster", help="the broker's address, tcp://HOST:PORT (or HOST:PORT)")
    p.add_argument("--api-key", required=True, help="an API key printed by `burla broker` (bk1-...)")

    p = sub.add_parser("status", help="list a cluster's workers and jobs")
    p.add_argument("--cluster", help="broker address (default: $BURLA_CLUSTER or ~/.burla/config.toml)")
    p.add_argument("--api-key", help="API key (default: $BURLA_API_KEY or ~/.burla/config.toml)")
    p.add_argument("--json", action="store_true", help="print the raw state as JSON")
    p.add_argument("-w", "--watch", action="store_true",
                   help="a live view of the workers and jobs, refreshed until Ctrl-C")
    p.add_argument("--interval", type=float, default=0.5, help="seconds between refreshes with --watch "
                                                               "(default %(default)s)")

    add_jobs_parser(sub)

    p = sub.add_parser("cluster", help="a cluster of VMs on Google Compute Engine")
    csub = p.add_subparsers(dest="action", required=True)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--provider", choices=["gce"], default="gce")
    common.add_argument("--project", required=True, help="the Google Cloud project")
    common.add_argument("--name", default="burla", help="the cluster's name: its VMs' label (default %(default)s)")
    c = csub.add_parser("up", parents=[common], help="create a head VM (broker, autoscaler) and worker VMs")
    c.add_argument("--zone", required=True, help="e.g. us-central1-a")
    c.add_argument("--workers", type=int, required=True, help="worker VMs to start with (each runs a slot per core)")
    c.add_argument("--min-workers", type=int, help="the autoscaler keeps at least this many (default: --workers)")
    c.add_argument("--max-workers", type=int, help="the autoscaler boots at most this many (default: --workers)")
    c.add_argument("--idle-minutes", type=float,
                   help="delete worker VMs idle this long, down to --min-workers (default: never)")
    c.add_argument("--machine-type", default="n2-standard-4", help="the workers' (default %(default)s)")
    c.add_argument("--head-machine-type", default="e2-standard-2", help="the head's (default %(default)s)")
    c.add_argument("--spot", action="store_true", help="spot VMs (a preempted worker's work runs again elsewhere, "
                                                       "and the autoscaler boots another)")
    c.add_argument("--gpu", help="accelerators per worker, TYPE:COUNT, e.g. nvidia-tesla-t4:1")
    c.add_argument("--disk-gb", type=int, default=50)
    c.add_argument("--zone-fallback", action="store_true", help="if a zone has no room, try the region's others")
    c.add_argument("--python", help="the VMs' Python, 3.11 to 3.13 (default: this one's, %s)" % (
        f"{sys.version_info.major}.{sys.version_info.minor}"))
    c.add_argument("--pip-args", default="", help="options for installing burla's packages on the VMs, e.g. "
                                                  "'--index-url https://mirror/simple' (default: PyPI)")
    c.add_argument("--wait-minutes", type=float, default=10.0,
                   help="wait this long for the workers to join (default %(default)s; 0: do not wait)")
    csub.add_parser("down", parents=[common], help="delete every VM of the cluster")
    c = csub.add_parser("status", parents=[common], help="the cluster's VMs: state, slots, busy, idle, cost so far")
    c.add_argument("--json", action="store_true", help="print them as JSON")
    c = csub.add_parser("autoscale", help=argparse.SUPPRESS)  # runs on the head VM
    c.add_argument("--state-dir", required=True)
    c.add_argument("--wheel", required=True)
    c.add_argument("--interval", type=float)

    args = parser.parse_args(argv)
    if args.command == "broker":
        return broker(args)
    elif args.command == "worker":
        import os

        from burla import config, security
        from burla.worker.worker import main as worker_main

        if args.slots is not None and not 1 <= args.slots <= 100_000:
            parser.error("--slots must be between 1 and 100000")
        from burla import protocol

        if args.name is not None and not protocol.NAME.fullmatch(args.name):
            parser.error("--name: letters, digits and ._:@+- only (at most 128, starting with a letter or digit)")
        try:
            args.broker = config.normalize_address(args.broker, "--broker ")
        except ValueError as e:
            parser.error(str(e))
        token = os.environ.pop("BURLA_WORKER_TOKEN", None)
        if args.token_file:
            try:
                with open(args.token_file) as f:
                    token = next((line.strip() for line in f if line.strip()), "")
            except OSError as e:
                parser.error(f"--token-file: {e}")
        elif args.token:
            token = args.token
            print("burla worker: --token shows the token to every process on this host (in its command line): "
                  "use $BURLA_WORKER_TOKEN or --token-file", file=sys.stderr)
        if token:
            security.hide_process()
        if args.broker.startswith("tcp://") and token:
            try:
                security.parse(token, security.WORKER)
            except ValueError as e:
                parser.error(f"worker token: {e}")
        gpus = parse_gpus(args.gpus) if args.gpus is not None else detect_gpus()
        worker_main(args.broker, args.slots, args.cpu, args.ram, gpus, args.name, args.parent_fd,
                    token if args.broker.startswith("tcp://") else None, args.env_cache, args.env_cache_gb,
                    args.containers)
    elif args.command == "login":
        return login(args, parser)
    elif args.command == "status":
        return status(args)
    elif args.command == "jobs":
        return jobs(args)
    elif args.command == "cluster":
        return cluster(args, parser)


def broker(args):
    import os

    from burla.broker.broker import main as broker_main
    from burla.config import normalize_address

    try:
        args.bind = normalize_address(args.bind, "--bind ", bind=True)
    except ValueError as e:
        print(f"burla broker: {e}", file=sys.stderr)
        return 2
    keys = None
    if args.bind.startswith("tcp://") and not args.insecure:
        from burla.security import BrokerKeys

        keys = BrokerKeys(args.state_dir or "~/.burla/broker")
        if args.new_api_key:
            print(keys.add_api_key())
            return 0
        host = args.bind.split("//", 1)[1].rsplit(":", 1)
        address = f"tcp://{'HOST' if host[0] in ('0.0.0.0', '*') else host[0]}:{host[1]}"
        (keys.folder / "client.toml").write_text(f'cluster = "{address}"\napi_key = "{keys.api_keys[0]}"\n')
        os.chmod(keys.folder / "client.toml", 0o600)
        print(f"burla broker on {args.bind}, CURVE-encrypted; keys in {keys.folder}\n"
              f"  clients: burla login {address} --api-key {keys.api_keys[0]}\n"
              f"  workers: BURLA_WORKER_TOKEN={keys.worker_tokens[0]} burla worker --broker {address}\n"
              f"           (or --token-file {keys.folder / 'worker_tokens'})", flush=True)
    elif args.new_api_key:
        print("--new-api-key needs a tcp:// broker without --insecure", file=sys.stderr)
        return 2
    if not args.spool_gb > 0 or not args.retention > 0:
        print("--spool-gb and --retention must be positive", file=sys.stderr)
        return 2
    return broker_main(args.bind, args.parent_fd, keys, args.state_dir, args.spool_gb, args.retention * 86400)


def plural(n, word):
    """ "1 worker", "2 workers": a count and its noun, which agree."""
    return f"{n:,} {word}{'' if n == 1 else 's'}"


def login(args, parser):
    """Save the address and key, then ask the broker for its status: a wrong address or key shows now, not at the
    first job (saved either way: the broker may simply not be up yet)."""
    from burla import config, security
    from burla.client import cluster_state

    try:
        address = config.normalize_address(args.cluster, "")
    except ValueError as e:
        parser.error(str(e))
    try:
        security.parse(args.api_key, security.CLIENT)
    except ValueError as e:
        parser.error(f"--api-key: {e}")
    print(f"saved to {config.save(cluster=address, api_key=args.api_key)}")
    try:
        state = cluster_state(address, timeout=3.0, api_key=args.api_key)
    except TimeoutError:
        print(f"burla login: warning: no answer from a burla broker at {address} within 3 s: the address or the "
              "API key may be wrong, or the broker is not running (saved anyway)", file=sys.stderr)
        return 0
    except Exception as e:  # (another burla version, say): still saved
        print(f"burla login: warning: the broker at {address} did not answer as expected: {e} (saved anyway)",
              file=sys.stderr)
        return 0
    workers = state.get("workers") or []
    count = state.get("nworkers", len(workers))
    print(f"the broker at {address} answered: {plural(count, 'worker')}, "
          f"{plural(sum(w.get('slots', 0) for w in workers), 'slot')}")
    return 0


def _status_address(args):
    """(address, None), or (None, exit status) after saying what is wrong: no cluster, a malformed address or key."""
    from burla import config, security

    try:
        address = config.cluster_address(args.cluster)
        if address == "local":
            print("burla status: no cluster configured (the embedded cluster lives only inside a running program); "
                  "pass --cluster tcp://HOST:PORT or set BURLA_CLUSTER", file=sys.stderr)
            return None, 2
        key = config.api_key(args.api_key)
        if address.startswith("tcp://") and key:
            security.parse(key, security.CLIENT)
    except ValueError as e:
        print(f"burla status: {e}", file=sys.stderr)
        return None, 2
    return address, None


def status(args):
    import json

    from burla.client import cluster_state
    from burla.env import python_name

    address, code = _status_address(args)
    if address is None:
        return code
    if args.watch:
        if not 0.05 <= args.interval <= 3600:
            print("burla status: --interval must be between 0.05 and 3600 seconds", file=sys.stderr)
            return 2
        return status_watch(address, args.api_key, args.interval)
    try:
        state = cluster_state(address, api_key=args.api_key)
    except TimeoutError as e:
        print(e, file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(state, indent=2))
        return 0
    workers = state["workers"]
    slots = state.get("nslots", sum(w["slots"] for w in workers))  # (workers past 1,000 are not listed)
    print(f"cluster {address}: {plural(state.get('nworkers', len(workers)), 'worker')}, "
          f"{plural(slots, 'slot')}, {plural(len(state['jobs']), 'job')}")
    for w in workers:
        gpus = ",".join(w["gpu"]) or "-"
        py = f"  {python_name(w['py'])}" if w.get("py") else ""  # (an older broker or worker does not say)
        print(f"  worker {w['id']:<24} host {w['host']:<16} slots {w['busy']}/{w['slots']} busy  "
              f"cpu {w['cpu']:g}  ram {w['ram']:.1f} GB  gpu {gpus}{py}")
    for j in state["jobs"]:
        name = f"  {j['name']}" if j.get("name") else ""
        print(f"  job {j['id']}{name}  done {_progress(j)}  failed {j.get('failed', 0)}  queued {j['queued']}  "
              f"slots {j['slots']}  {j['elapsed']:.1f} s")
    return 0


def _progress(j):
    """done/total of a job record; while its inputs still arrive (total unknown), how many came so far."""
    if j.get("total") is not None:
        return f"{j['done']:,}/{j['total']:,}"
    return f"{j['done']:,}/? ({j.get('submitted', 0):,} sent so far)"


def status_watch(address, api_key, interval):
    """`burla status --watch`: ask the broker every interval and redraw; a broker that stops answering is said in
    the view (with what it last said) while we go on asking. Ctrl-C ends it: exit 0."""
    import time

    from burla.client import cluster_state

    try:
        from rich.console import Console
        from rich.live import Live

        state, error, heard = None, None, None
        with Live(console=Console(), auto_refresh=False, transient=False) as live:
            live.update(watch_view(address, None, None, None, interval), refresh=True)
            while True:
                asked = time.monotonic()
                try:
                    state, error, heard = cluster_state(address, timeout=max(2.0, interval), api_key=api_key), \
                        None, time.time()
                except TimeoutError:
                    error = f"no answer from the broker at {address} (retrying)"
                except Exception as e:  # (a broker of another burla version, say): said, and asked again
                    error = f"the broker at {address}: {type(e).__name__}: {e} (retrying)"
                live.update(watch_view(address, state, error, heard, interval), refresh=True)
                time.sleep(max(0.0, interval - (time.monotonic() - asked)))
    except KeyboardInterrupt:
        return 0


WATCH_ROWS = 40  # at most this many workers and jobs each in the live view (the rest are counted)


def watch_view(address, state, error, heard, interval):
    """The live view of `burla status --watch`, a rich renderable: a headline, the workers, the jobs (running,
    then the latest ended)."""
    import time

    from rich.console import Group
    from rich.text import Text

    parts = []
    if state is None:
        parts.append(Text(f"burla cluster {address}: asking the broker...", style="bold"))
    if error:
        when = f", what it said at {time.strftime('%H:%M:%S', time.localtime(heard))} below" if heard else ""
        parts.append(Text(error + when, style="bold red"))
    if state is not None:
        workers = state.get("workers") or []
        nworkers = state.get("nworkers", len(workers))
        running = state.get("jobs") or []
        ended = sorted(state.get("recent") or [], key=lambda j: -(j.get("finished") or 0))
        slots = state.get("nslots", sum(w.get("slots", 0) for w in workers))  # (workers past 1,000 are not listed)
        busy = state.get("nbusy", sum(w.get("busy", 0) for w in workers))
        parts.insert(0, Text(f"burla cluster {address}: {plural(nworkers, 'worker')}, {plural(slots, 'slot')} "
                             f"({busy:,} busy), {plural(len(running), 'job')} running", style="bold"))

        table = _table("workers", "ID", "HOST", ">SLOTS BUSY", ">CPU", ">RAM", "GPU", ">PREPARING")
        for w in workers[:WATCH_ROWS]:
            table.add_row(*map(Text, (str(w.get("id")), str(w.get("host")), f"{w.get('busy', 0)}/{w.get('slots', 0)}",
                                      f"{w.get('cpu', 0):g}", f"{w.get('ram', 0):.1f} GB",
                                      ",".join(w.get("gpu") or ()) or "-", str(w.get("preparing", 0)))))
        if nworkers > min(len(workers), WATCH_ROWS):
            table.add_row(Text(f"... and {plural(nworkers - min(len(workers), WATCH_ROWS), 'more worker')}"))
        parts.append(table)

        table = _table("jobs", "ID", "NAME", "STATE", ">DONE/TOTAL", ">FAILED", ">ELAPSED", ">RATE")
        colours = {"running": "cyan", "done": "green", "failed": "red", "cancelled": "yellow"}
        shown = (running + ended[:max(0, min(10, WATCH_ROWS - len(running)))])[:WATCH_ROWS]
        for j in shown:
            elapsed, done = j.get("elapsed") or 0.0, j.get("done", 0)
            rate = done / elapsed if elapsed > 0 else 0.0
            table.add_row(Text(str(j.get("id"))), Text(str(j.get("name") or "-")[:40]),
                          Text(str(j.get("state", "?")), style=colours.get(j.get("state"), "")),
                          Text(_progress(j) if j.get("total") is not None else f"{done:,}/?"),
                          Text(f"{j.get('failed', 0):,}", style="red" if j.get("failed") else ""),
                          Text(_seconds(elapsed)), Text(f"{rate:,.0f}/s" if rate >= 10 else f"{rate:.1f}/s"))
        if not shown:
            table.add_row(Text("no jobs", style="dim"))
        parts.append(table)
    parts.append(Text(f"every {interval:g} s; Ctrl-C to quit", style="dim"))
    return Group(*parts)


def _table(title, *columns):
    """A rich table with these column headings (">NAME": right-aligned, for numbers)."""
    from rich import box
    from rich.table import Table

    table = Table(box=box.SIMPLE_HEAD, title=title, title_justify="left", show_edge=False)
    for column in columns:
        table.add_column(column.lstrip(">"), justify="right" if column.startswith(">") else "left")
    return table


JOBS_EXIT = """\
exit status: 0 success; 1 the job failed or was cancelled, no such job for this API key, or the broker could not
be reached; 2 a usage error (a malformed id, no cluster configured); 130 interrupted (the job goes on)."""

JOBS_HELP = """\
A job's id is the 16 hexadecimal digits that job.id, `burla jobs list` and `burla status` show. Only the API key
that submitted a job sees it. A detached job (remote_parallel_map(..., detach=True)) runs with no client, and its
results and log lines stay on the cluster's head until its retention ends, so any process with the key can
follow it, fetch its results or cancel it.

""" + JOBS_EXIT

JOB_ID = re.compile(r"[0-9a-f]{16}")


def add_jobs_parser(sub):
    """`burla jobs ACTION ...`: the command-line face of burla.jobs / burla.Job."""
    raw = argparse.RawDescriptionHelpFormatter
    p = sub.add_parser("jobs", help="list, follow, fetch the results of and cancel this API key's jobs",
                       description="List, follow, fetch the results of and cancel this API key's jobs.\n\n" + JOBS_HELP,
                       formatter_class=raw)
    jsub = p.add_subparsers(dest="jobs_action", required=True, metavar="ACTION")
    where = argparse.ArgumentParser(add_help=False)
    where.add_argument("--cluster", help="broker address (default: $BURLA_CLUSTER or ~/.burla/config.toml)")
    where.add_argument("--api-key", help="API key (default: $BURLA_API_KEY or ~/.burla/config.toml)")

    def action(name, help, description, json_help, with_id=True):
        a = jsub.add_parser(name, parents=[where], help=help, description=description + "\n\n" + JOBS_EXIT,
                            formatter_class=raw)
        if with_id:
            a.add_argument("id", metavar="ID", help="the job's id (16 hexadecimal digits)")
        a.add_argument("--json", action="store_true", help=" ".join(json_help.split()))
        return a

    action("list", "this API key's jobs: running, detached, recently ended (newest first)",
           "A table of this API key's jobs, newest first: id, state (running, done, failed, cancelled), calls done\n"
           "of the inputs (? while inputs still arrive), calls failed, time since it started (to its end, once it\n"
           "ended), whether it is detached, and why it ended when not done.",
           "a JSON list of objects with the fields id, state, done, total, failed, started (Unix time), elapsed\n"
           "(seconds), detached and reason", with_id=False)
    action("show", "one job's status",
           "One job's status as `key: value` lines.",
           "a JSON object with the fields id, state, done, total, failed, started, elapsed, detached, reason")
    a = action("logs", "the lines a job's calls printed",
               "The lines the job's calls printed, in the order the head received them, all on stdout as\n"
               "    [input N] [WORKER/SLOT] TEXT\n"
               "A line the call wrote to its stderr starts with '! ' (so `grep -v '^!'` keeps its stdout only);\n"
               "a line of no one call's shows [job] in place of [input N].",
               "one JSON object a line, with the fields input (-1: no one call's), worker, stream (stdout or\n"
               "stderr) and text")
    a.add_argument("-f", "--follow", action="store_true", help="go on printing new lines until the job ends")
    action("attach", "follow a job live until it ends, then summarize it",
           "Follow the job live: the output of its calls streams to stdout and stderr as they print it (from its\n"
           "start), with a progress bar on stderr when that is a terminal. When the job ends, a summary line;\n"
           "if the job failed or was cancelled, its error on stderr. Exits 0 if the job ended done, 1 if not.\n"
           "Ctrl-C stops following; the job goes on. A job not submitted with detach=True sends its results and\n"
           "its calls' output to the process that submitted it: attach then shows its progress and its end.",
           "the calls' stdout goes to stderr, and the end prints one JSON object: the job's status fields, ok\n"
           "(true if it ended done) and error (null or the error's text)")
    a = action("results", "wait for a job's results and print them",
               "Wait until every input of the job has its outcome, then print the results in input order, one\n"
               "repr() a line. Exits 1, with the error on stderr, if a call raised (as remote_parallel_map would\n"
               "raise it), or the job failed or was cancelled. The calls' output is not shown (see `logs`).\n"
               "Only a detached job (detach=True) keeps its results on the head.",
               "print the results as one JSON list (fails if a result is not JSON-serialisable: use --out)")
    a.add_argument("--out", metavar="FILE",
                   help="write the list of results to FILE as a pickle (cloudpickle; read it with pickle.load) and "
                        "print how many were written")
    action("cancel", "cancel a job: queued inputs are dropped, running calls stopped",
           "Cancel the job: its queued inputs are dropped and its running calls stopped; the outcomes it has so\n"
           "far stay readable. Prints the job's state after it (a job that had already ended is left as it is).",
           "print the job's status after the cancel as a JSON object (plus was_running: whether it was running)")


def jobs(args):
    import os

    from burla import client, config, errors

    def fail(message, code=1):
        print(f"burla jobs {args.jobs_action}: {message}", file=sys.stderr)
        return code

    try:
        address = config.cluster_address(args.cluster)
    except ValueError as e:
        return fail(e, 2)
    if address == "local":
        return fail("no cluster configured (the embedded cluster lives only inside a running program); pass "
                    "--cluster tcp://HOST:PORT or set BURLA_CLUSTER", 2)
    job_id = getattr(args, "id", None)
    if job_id is not None:
        job_id = job_id.strip().lower()
        if not JOB_ID.fullmatch(job_id):
            return fail(f"{args.id!r} is not a job id (16 hexadecimal digits, as `burla jobs list` shows)", 2)
    try:
        client.connection(address, args.api_key)  # a malformed API key fails here
    except ValueError as e:
        return fail(f"--api-key: {e}" if args.api_key else e, 2)
    try:
        try:
            return JOB_ACTIONS[args.jobs_action](args, address, job_id)
        except errors.JobNotFoundError:
            return fail(f"no job {job_id} for this API key")
        except errors.ClusterConnectionError as e:
            return fail(e)
        except KeyboardInterrupt:
            return fail(f"interrupted{f' (job {job_id} goes on)' if job_id else ''}", 130)
        finally:
            sys.stdout.flush()
    except BrokenPipeError:  # (`burla jobs logs ID | head`): stop quietly
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1


def _handle(job_id, address, api_key):
    import burla

    return burla.attach(job_id, address, api_key)  # (JobNotFoundError if the broker has no such job for this key)


def _seconds(s):
    from burla.progress import _duration

    return _duration(s, unit="s")


def _done_of(st):
    return f"{st.done}/{'?' if st.total is None else st.total}"


def _status_json(st, **extra):
    return dict(st._asdict(), **extra)


def jobs_list(args, address, _):
    import json

    import burla

    rows = burla.jobs(address, args.api_key)
    if args.json:
        print(json.dumps([_status_json(st) for st in rows], indent=2))
        return 0
    if not rows:
        print("no jobs")
        return 0
    table = [("ID", "STATE", "DONE/TOTAL", "FAILED", "ELAPSED", "DETACHED", "REASON")]
    for st in rows:
        reason = " ".join((st.reason or "-").split())
        table.append((st.id, st.state, _done_of(st), str(st.failed), _seconds(st.elapsed),
                      "yes" if st.detached else "no", reason if len(reason) <= 50 else reason[:49] + "…"))
    widths = [max(len(row[k]) for row in table) for k in range(len(table[0]) - 1)]
    for row in table:
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths)) + "  " + row[-1])
    return 0


def jobs_show(args, address, job_id):
    import json
    import time

    st = _handle(job_id, address, args.api_key).status()
    if args.json:
        print(json.dumps(_status_json(st), indent=2))
        return 0
    started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(st.started))
    for key, value in (("id", st.id), ("state", st.state), ("done", st.done),
                       ("total", "? (inputs still arriving)" if st.total is None else st.total),
                       ("failed", st.failed), ("started", started), ("elapsed", f"{st.elapsed:.1f} s"),
                       ("detached", "yes" if st.detached else "no"), ("reason", st.reason or "-")):
        print(f"{key}: {value}")
    return 0


def jobs_logs(args, address, job_id):
    import json

    job = _handle(job_id, address, args.api_key)
    for line in job.logs(follow=args.follow):
        if args.json:
            print(json.dumps(line._asdict()), flush=args.follow)
        else:
            where = "[job]" if line.input < 0 else f"[input {line.input}]"
            mark = "! " if line.stream == "stderr" else ""
            print(f"{mark}{where} [{line.worker}] {line.text}", flush=args.follow)
    return 0


def _job_error(e):
    """A failed result()'s error as text: the remote call's exception with its traceback, or burla's message."""
    from burla import errors

    if isinstance(e, errors.JobCancelledError) and str(e) in ("", "cancelled", "the job was cancelled"):
        return "the job was cancelled"
    text = f"{type(e).__name__}: {e}"
    index = getattr(e, "burla_input_index", None)
    if index is not None:
        text = f"the call on input {index} raised {text}"
        cause = e.__cause__
        if isinstance(cause, errors.RemoteTraceback):
            text += "\n" + str(cause).rstrip("\n")
    return text


def jobs_attach(args, address, job_id):
    import contextlib
    import json
    import time

    from burla import errors

    job = _handle(job_id, address, args.api_key)
    st = job.status()
    print(f"burla: attached to job {job_id} ({st.state}, {_done_of(st)} done, {st.failed} failed)", file=sys.stderr,
          flush=True)
    error = None
    with contextlib.redirect_stdout(sys.stderr) if args.json else contextlib.nullcontext():
        if st.detached:
            try:
                job.result(spinner=True)
            except (errors.ClusterConnectionError, errors.JobNotFoundError):
                raise
            except Exception as e:  # a call's own exception, or the job's end (failed, cancelled)
                error = _job_error(e)
        else:
            _watch(job, st)
        sys.stdout.flush()
    st = job.status()
    deadline = time.monotonic() + 5
    while error is not None and st.state == "running" and time.monotonic() < deadline:
        time.sleep(0.1)  # (a failed call ends its job: the broker may not have said so yet)
        st = job.status()
    ok = error is None and st.state == "done"
    if error is None and not ok:
        error = st.reason or f"the job ended {st.state}"
    if args.json:
        print(json.dumps(_status_json(st, ok=ok, error=error), indent=2))
    else:
        print(f"job {job_id} {st.state}: {_done_of(st)} done, {st.failed} failed, {_seconds(st.elapsed)}")
        if error:
            print(f"error: {error}", file=sys.stderr)
    return 0 if ok else 1


def _watch(job, st):
    """A job that is not detached sends its results and its calls' output to the process that submitted it (the
    head does not keep them): only watch its progress until it ends; reading its results here would take the job
    over from that process."""
    import time

    from burla.progress import create

    view = create(True, st.total, summary=False)  # (attach prints its own summary)
    shown = 0
    try:
        while True:
            if st.total is not None:
                view.total_known(st.total)
            if st.done > shown:
                view.advance(st.done - shown)
                shown = st.done
            if st.state != "running":
                return
            time.sleep(0.5)
            st = job.status()
    finally:
        view.close(st.state)


def jobs_results(args, address, job_id):
    import contextlib
    import json
    import os

    from burla import errors

    job = _handle(job_id, address, args.api_key)
    if not job.status().detached:
        print(f"burla jobs results: job {job_id} was not submitted with detach=True: its results go to the process "
              "that submitted it, not to the head (`burla jobs attach` follows it)", file=sys.stderr)
        return 1
    try:
        with open(os.devnull, "w") as devnull, contextlib.redirect_stdout(devnull), \
                contextlib.redirect_stderr(devnull):  # (the calls' output, replayed: `logs` shows it)
            results = job.result(spinner=None)
    except (errors.ClusterConnectionError, errors.JobNotFoundError):
        raise
    except Exception as e:
        print(f"burla jobs results: job {job_id} has no complete results: {_job_error(e)}", file=sys.stderr)
        return 1
    if args.out:
        try:
            import cloudpickle as pickler
        except ImportError:
            import pickle as pickler
        try:
            with open(args.out, "wb") as f:
                pickler.dump(results, f)
        except (OSError, pickler.PicklingError, TypeError, AttributeError) as e:
            print(f"burla jobs results: could not write {args.out}: {e}", file=sys.stderr)
            return 1
        if args.json:
            print(json.dumps({"id": job_id, "written": len(results), "out": args.out}))
        else:
            print(f"wrote {plural(len(results), 'result')} of job {job_id} to {args.out}")
        return 0
    if args.json:
        for k, value in enumerate(results):
            try:
                json.dumps(value)
            except (TypeError, ValueError) as e:
                print(f"burla jobs results: the result of input {k} is not JSON-serialisable ({e}); "
                      f"use --out FILE for a pickle", file=sys.stderr)
                return 1
        print(json.dumps(results))
        return 0
    for value in results:
        print(repr(value))
    return 0


def jobs_cancel(args, address, job_id):
    import json

    from burla import errors

    job = _handle(job_id, address, args.api_key)
    was_running = job.status().state == "running"
    if was_running:
        try:
            job.cancel()
        except (errors.ClusterConnectionError, errors.JobNotFoundError):
            raise
        except Exception as e:  # (BurlaError: it did not stop in time)
            print(f"burla jobs cancel: {e}", file=sys.stderr)
            return 1
    st = job.status()
    if args.json:
        print(json.dumps(_status_json(st, was_running=was_running), indent=2))
    else:
        already = "" if was_running else " (it had already ended)"
        print(f"job {job_id} {st.state}{already}: {_done_of(st)} done, {st.failed} failed")
    return 0


JOB_ACTIONS = {"list": jobs_list, "show": jobs_show, "logs": jobs_logs, "attach": jobs_attach,
               "results": jobs_results, "cancel": jobs_cancel}


def cluster(args, parser):
    from burla import gce

    try:
        if args.action == "up":
            if args.workers < 0:
                parser.error("--workers must be 0 or more")
            gce.up(args.project, args.zone, args.workers, args.machine_type, args.name, args.spot, args.gpu,
                   args.disk_gb, args.zone_fallback, args.idle_minutes, min_workers=args.min_workers,
                   max_workers=args.max_workers, head_machine_type=args.head_machine_type, python=args.python,
                   pip_args=args.pip_args, wait_minutes=args.wait_minutes)
        elif args.action == "down":
            print(f"deleted {gce.down(args.project, args.name)} VM(s) of cluster {args.name}")
        elif args.action == "status":
            return cluster_status(args, gce)
        elif args.action == "autoscale":
            from burla import autoscale

            autoscale.run(args.state_dir, args.wheel, args.interval)
    except gce.CloudError as e:
        print(f"burla cluster {args.action}: {e}", file=sys.stderr)
        return 1
    return 0


def cluster_status(args, gce):
    """The VMs, with what the cluster's broker says of their workers when it answers."""
    import json
    import os

    from burla import config, errors
    from burla.client import cluster_state

    rows, state = gce.status(args.project, args.name), None
    head = next((r for r in rows if r["role"] == "head" and r["external_ip"]), None)
    if head:  # (its API key is the one `up` kept, else the configured one)
        keys = os.path.join(os.path.expanduser("~/.burla/clusters"), args.name, "api_keys")
        try:
            with open(keys) as fh:
                key = fh.readline().strip() or None
        except OSError:
            key = None
        try:
            state = cluster_state(f"tcp://{head['external_ip']}:{gce.PORT}", timeout=3.0,
                                  api_key=key or config.api_key())
            rows = gce.status(args.project, args.name, state=state)
        except (TimeoutError, OSError, ValueError, errors.BurlaError):
            state = None
    if args.json:
        print(json.dumps(rows, indent=1))
        return 0
    if not rows:
        print(f"cluster {args.name}: no VMs in project {args.project}")
        return 0
    print(f"{'NAME':<24} {'ROLE':<7} {'ZONE':<15} {'STATE':<11} {'SLOTS':>5} {'BUSY':>4} {'IDLE':>7} "
          f"{'UP':>7} {'COST':>8}  ADDRESS")
    for r in rows:
        slots = "-" if r["slots"] is None else r["slots"]
        busy = "-" if r["busy"] is None else r["busy"]
        idle = "-" if not r["idle"] else _seconds(r["idle"])
        cost = "?" if r["cost"] is None else f"${r['cost']:.2f}"
        print(f"{r['name']:<24} {r['role']:<7} {r['zone']:<15} {r['status']:<11} {slots:>5} {busy:>4} {idle:>7} "
              f"{_seconds(r['age']):>7} {cost:>8}  {r['external_ip'] or r['internal_ip']}")
    known = [r["cost"] for r in rows if r["cost"] is not None]
    print(f"{len(rows)} VM(s); cost so far about ${sum(known):.2f} at list price"
          + ("" if state else " (the broker did not answer: no slots shown)"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
