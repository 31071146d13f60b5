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
    p.add_argument("--parent-fd", type=int, help=argparse.SUPPRESS)

    p = sub.add_parser("worker", help="run a worker that joins a broker")
    p.add_argument("--broker", required=True, help="the broker's address, e.g. tcp://HOST:5555")
    p.add_argument("--slots", type=int, help="calls run at once (default: cpu count)")
    p.add_argument("--cpu", type=float, help="cpus to advertise (default: this host's)")
    p.add_argument("--ram", type=float, help="GB of RAM to advertise (default: this host's)")
    p.add_argument("--gpus", default="", help="GPUs to advertise: 'A100:4', '2' or 'A100,T4'")
    p.add_argument("--name", help="worker id (default: HOST-PID)")
    p.add_argument("--parent-fd", type=int, help=argparse.SUPPRESS)

    p = sub.add_parser("status", help="list a cluster's workers and jobs")
    p.add_argument("--cluster", help="broker address (default: $BURLA_CLUSTER or ~/.burla/config.toml)")
    p.add_argument("--json", action="store_true", help="print the raw state as JSON")

    args = parser.parse_args(argv)
    if args.command == "broker":
        from burla.broker.broker import main as broker_main

        broker_main(args.bind, args.parent_fd)
    elif args.command == "worker":
        from burla.worker.worker import main as worker_main

        if args.slots is not None and args.slots < 1:
            parser.error("--slots must be at least 1")
        worker_main(args.broker, args.slots, args.cpu, args.ram, parse_gpus(args.gpus), args.name, args.parent_fd)
    elif args.command == "status":
        return status(args)


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
        state = cluster_state(address)
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
