"""The burla command: burla broker | worker | login | status | cluster up/down/status."""

import argparse
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
    p.add_argument("--broker", required=True, help="the broker's address, e.g. tcp://HOST:5555")
    p.add_argument("--slots", type=int, help="calls run at once (default: cpu count)")
    p.add_argument("--cpu", type=float, help="cpus to advertise (default: this host's)")
    p.add_argument("--ram", type=float, help="GB of RAM to advertise (default: this host's)")
    p.add_argument("--gpus", default="", help="GPUs to advertise: 'A100:4', '2' or 'A100,T4'")
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

    p = sub.add_parser("login", help="save a cluster's address and API key in ~/.burla/config.toml")
    p.add_argument("cluster", help="the broker's address, tcp://HOST:PORT")
    p.add_argument("--api-key", required=True, help="an API key printed by `burla broker` (bk1-...)")

    p = sub.add_parser("status", help="list a cluster's workers and jobs")
    p.add_argument("--cluster", help="broker address (default: $BURLA_CLUSTER or ~/.burla/config.toml)")
    p.add_argument("--api-key", help="API key (default: $BURLA_API_KEY or ~/.burla/config.toml)")
    p.add_argument("--json", action="store_true", help="print the raw state as JSON")

    p = sub.add_parser("cluster", help="a cluster of VMs on Google Compute Engine")
    csub = p.add_subparsers(dest="action", required=True)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--provider", choices=["gce"], default="gce")
    common.add_argument("--project", required=True, help="the Google Cloud project")
    common.add_argument("--name", default="burla", help="the cluster's name: its VMs' label (default %(default)s)")
    c = csub.add_parser("up", parents=[common], help="create a head VM (broker) and worker VMs")
    c.add_argument("--zone", required=True, help="e.g. us-central1-a")
    c.add_argument("--workers", type=int, required=True, help="worker VMs (each runs a slot per core)")
    c.add_argument("--machine-type", default="n2-standard-4")
    c.add_argument("--spot", action="store_true", help="spot VMs (a preempted worker's work runs again elsewhere)")
    c.add_argument("--gpu", help="accelerators per worker, TYPE:COUNT, e.g. nvidia-tesla-t4:1")
    c.add_argument("--disk-gb", type=int, default=50)
    c.add_argument("--zone-fallback", action="store_true", help="if a zone has no room, try the region's others")
    c.add_argument("--idle-minutes", type=float, help="delete worker VMs idle this long (a reaper on the head)")
    c.add_argument("--registry", default=None,
                   help="where REGISTRY/burla-broker:VERSION and REGISTRY/burla-worker:VERSION are (built from "
                        "broker/Dockerfile and worker/Dockerfile; default: burla's releases)")
    csub.add_parser("down", parents=[common], help="delete every VM of the cluster")
    csub.add_parser("status", parents=[common], help="list the cluster's VMs and their state")
    c = csub.add_parser("reaper", parents=[common], help=argparse.SUPPRESS)  # runs on the head VM
    c.add_argument("--idle-minutes", type=float, required=True)
    c.add_argument("--state-dir", default="/state")

    args = parser.parse_args(argv)
    if args.command == "broker":
        return broker(args)
    elif args.command == "worker":
        import os

        from burla import security
        from burla.worker.worker import main as worker_main

        if args.slots is not None and not 1 <= args.slots <= 100_000:
            parser.error("--slots must be between 1 and 100000")
        from burla import protocol

        if args.name is not None and not protocol.NAME.fullmatch(args.name):
            parser.error("--name: letters, digits and ._:@+- only (at most 128, starting with a letter or digit)")
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
        worker_main(args.broker, args.slots, args.cpu, args.ram, parse_gpus(args.gpus), args.name, args.parent_fd,
                    token if args.broker.startswith("tcp://") else None, args.env_cache, args.env_cache_gb,
                    args.containers)
    elif args.command == "login":
        from burla import config, security

        try:
            security.parse(args.api_key, security.CLIENT)
        except ValueError as e:
            parser.error(f"--api-key: {e}")
        print(f"saved to {config.save(cluster=args.cluster, api_key=args.api_key)}")
    elif args.command == "status":
        return status(args)
    elif args.command == "cluster":
        return cluster(args, parser)


def broker(args):
    import os

    from burla.broker.broker import main as broker_main

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


def status(args):
    import json

    from burla.client import cluster_state
    from burla.config import cluster_address

    address = cluster_address(args.cluster)
    if address == "local":
        print("no cluster configured (the embedded cluster lives only inside a running program); "
              "pass --cluster tcp://HOST:PORT or set BURLA_CLUSTER", file=sys.stderr)
        return 2
    try:
        state = cluster_state(address, api_key=args.api_key)
    except TimeoutError as e:
        print(e, file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(state, indent=2))
        return 0
    print(f"cluster {address}: {len(state['workers'])} workers, "
          f"{sum(w['slots'] for w in state['workers'])} slots, {len(state['jobs'])} jobs")
    for w in state["workers"]:
        gpus = ",".join(w["gpu"]) or "-"
        print(f"  worker {w['id']:<24} host {w['host']:<16} slots {w['busy']}/{w['slots']} busy  "
              f"cpu {w['cpu']:g}  ram {w['ram']:.1f} GB  gpu {gpus}")
    for j in state["jobs"]:
        print(f"  job {j['id']}  done {j['done']}/{j['submitted']}  queued {j['queued']}  "
              f"slots {j['slots']}  {j['elapsed']:.1f} s")
    return 0


def cluster(args, parser):
    from burla import gce

    try:
        if args.action == "up":
            if args.workers < 0:
                parser.error("--workers must be 0 or more")
            gce.up(args.project, args.zone, args.workers, args.machine_type, args.name, args.spot, args.gpu,
                   args.disk_gb, args.zone_fallback, args.idle_minutes, args.registry or gce.REGISTRY)
        elif args.action == "down":
            print(f"deleted {gce.down(args.project, args.name)} VM(s) of cluster {args.name}")
        elif args.action == "status":
            rows = gce.status(args.project, args.name)
            if not rows:
                print(f"cluster {args.name}: no VMs in project {args.project}")
            for name, role, zone, state, internal, external in rows:
                print(f"{name:<24} {role:<7} {zone:<16} {state:<12} {internal:<15} {external}")
        elif args.action == "reaper":
            return reaper(args)
    except gce.CloudError as e:
        print(f"burla cluster {args.action}: {e}", file=sys.stderr)
        return 1
    return 0


def reaper(args):
    """On the head VM: delete worker VMs idle for --idle-minutes (checked every 30 s)."""
    import time

    from burla import gce
    from burla.client import cluster_state
    from burla.security import BrokerKeys

    key = BrokerKeys(args.state_dir).api_keys[0]
    idle_since = {}
    while True:
        try:
            for name in gce.reap(args.project, args.name, args.idle_minutes * 60,
                                 lambda: cluster_state(f"tcp://127.0.0.1:{gce.PORT}", api_key=key),
                                 idle_since=idle_since):
                print(f"deleted idle worker VM {name}", flush=True)
        except (gce.CloudError, TimeoutError) as e:
            print(f"reaper: {e}", file=sys.stderr, flush=True)
        time.sleep(30)


if __name__ == "__main__":
    sys.exit(main())
