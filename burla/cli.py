"""The burla command: burla broker | worker | status."""

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
    p.add_argument("--state-dir", default="~/.burla/broker",
                   help="private folder for the broker's keys, API keys and worker tokens (default %(default)s)")
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
    p.add_argument("--token", help="the broker's worker token, bw1-... (default: $BURLA_WORKER_TOKEN)")
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

    args = parser.parse_args(argv)
    if args.command == "broker":
        return broker(args)
    elif args.command == "worker":
        import os

        from burla import security
        from burla.worker.worker import main as worker_main

        if args.slots is not None and args.slots < 1:
            parser.error("--slots must be at least 1")
        token = args.token or os.environ.pop("BURLA_WORKER_TOKEN", None)
        if args.broker.startswith("tcp://") and token:
            try:
                security.parse(token, security.WORKER)
            except ValueError as e:
                parser.error(f"--token: {e}")
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


def broker(args):
    import os

    from burla.broker.broker import main as broker_main

    keys = None
    if args.bind.startswith("tcp://") and not args.insecure:
        from burla.security import BrokerKeys

        keys = BrokerKeys(args.state_dir)
        if args.new_api_key:
            print(keys.add_api_key())
            return 0
        host = args.bind.split("//", 1)[1].rsplit(":", 1)
        address = f"tcp://{'HOST' if host[0] in ('0.0.0.0', '*') else host[0]}:{host[1]}"
        (keys.folder / "client.toml").write_text(f'cluster = "{address}"\napi_key = "{keys.api_keys[0]}"\n')
        os.chmod(keys.folder / "client.toml", 0o600)
        print(f"burla broker on {args.bind}, CURVE-encrypted; keys in {keys.folder}\n"
              f"  clients: burla login {address} --api-key {keys.api_keys[0]}\n"
              f"  workers: burla worker --broker {address} --token {keys.worker_tokens[0]}", flush=True)
    elif args.new_api_key:
        print("--new-api-key needs a tcp:// broker without --insecure", file=sys.stderr)
        return 2
    broker_main(args.bind, args.parent_fd, keys)


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


if __name__ == "__main__":
    sys.exit(main())
