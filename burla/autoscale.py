"""The head's autoscaler: worker VMs follow the work, between the cluster's --min-workers and --max-workers.

Every few seconds it reads the broker's state (every job's appetite, "demand"; every worker's busy slots and idle
time) and the cluster's VMs, and decides (plan(), a pure function the tests drive):
- grow: boot enough VMs for the work that could run at once. A job that asked to grow (grow=True) counts at once;
  any other once it has run GROW_AFTER seconds, so that a short job does not boot VMs that would only idle.
- replace: a VM that is gone (a preempted spot VM is deleted) is simply missing, and booted again while work
  remains or the cluster is below its minimum; one stopped or terminated is deleted first.
- shrink: delete workers idle past --idle-minutes, never below the minimum or below what the work needs.
- give up on a VM that never joined within BOOT_LIMIT (its boot failed: it would cost money for nothing).
It tells the broker what it is doing (CAPACITY): `burla status` shows it, and jobs that asked to grow say on their
progress line how many VMs they wait for.
"""

import json
import math
import os
import sys
import time

GROW_AFTER = 20.0
BOOT_LIMIT = 15 * 60.0
GONE = {"STOPPING", "STOPPED", "TERMINATED", "SUSPENDING", "SUSPENDED"}


def per_vm(settings, cpu, gpus):
    """Calls of a job needing cpu (and gpus) that one worker VM runs at once."""
    kind, _, count = (settings.get("gpu") or "").partition(":")
    vm_gpus = int(count or 1) if kind else 0
    fit = int(settings["vcpus"] // cpu) if cpu > 0 else settings["vcpus"]
    if gpus:
        fit = min(fit, vm_gpus // gpus)
    return max(fit, 0)


def plan(state, vms, settings, now):
    """(how many VMs to create, [(zone, name, why)] to delete, VMs booting now) for one pass. vms: the cluster's
    worker VMs as (zone, name, status, created: epoch seconds)."""
    workers = {w["id"]: w for w in state.get("workers", ())}
    # (a STATE lists the busiest 1,000 workers: past that, one not listed may have joined all the same)
    listed_all = state.get("nworkers", len(workers)) <= len(workers)
    delete, live, booting = [], [], 0
    for zone, name, status, created in vms:
        if status in GONE:
            delete.append((zone, name, f"it is {status.lower()} (preempted?)"))
        elif name not in workers and listed_all and now - created > BOOT_LIMIT:
            delete.append((zone, name, f"it did not join within {BOOT_LIMIT / 60:g} minutes"))
        else:
            live.append((zone, name))
            booting += name not in workers and listed_all
    need = 0.0
    for want, cpu, gpus, grow, age in state.get("demand", ()):
        fit = per_vm(settings, cpu, gpus)
        if fit and (grow or age >= GROW_AFTER):
            need += want / fit
    target = min(settings["max"], max(settings["min"], math.ceil(need - 1e-9)))
    create = max(0, target - len(live))
    idle_minutes = settings.get("idle_minutes")
    if create == 0 and idle_minutes is not None:
        floor = max(settings["min"], math.ceil(need - 1e-9))
        idle = sorted(((workers[n].get("idle", 0), z, n) for z, n in live if n in workers and not
                       workers[n]["busy"] and not workers[n].get("preparing")), reverse=True)
        remaining = len(live)
        for seconds, zone, name in idle:  # (the longest idle first)
            if remaining <= floor or seconds < idle_minutes * 60:
                break
            delete.append((zone, name, f"idle for {seconds / 60:.1f} minutes"))
            remaining -= 1
    return create, delete, booting


def run(state_dir, wheel_path, interval=None, say=None):
    """The autoscaler's loop, on the head (`burla cluster autoscale`)."""
    from burla import gce
    from burla.client import cluster_state
    from burla.security import BrokerKeys

    say = say or (lambda text: print(f"autoscaler: {text}", file=sys.stderr, flush=True))
    with open(os.path.join(state_dir, "cluster.json")) as fh:
        settings = json.load(fh)
    with open(os.path.join(state_dir, "address")) as fh:
        settings["broker"] = f"tcp://{fh.read().strip()}:{gce.PORT}"
    url = None
    if os.path.exists(os.path.join(state_dir, "wheel-url")):  # (too big for metadata: new VMs read the bucket)
        with open(os.path.join(state_dir, "wheel-url")) as fh:
            url = fh.read().strip() or None
    with open(wheel_path, "rb") as fh:
        wheel_items = gce.bootstrap.wheel_metadata(os.path.basename(wheel_path), fh.read(), url)
    keys = BrokerKeys(state_dir)
    compute = gce.Compute(settings["project"])
    interval = interval or settings.get("interval") or 5.0
    address, report, paused_until = f"tcp://127.0.0.1:{gce.PORT}", None, 0.0
    while True:
        try:
            state = cluster_state(address, timeout=5.0, api_key=keys.api_keys[0], capacity=report)
            vms = [(zone, i.name, i.status, gce._timestamp(i.creation_timestamp) if i.creation_timestamp else
                    time.time()) for zone, i in compute.cluster(settings["name"]) if i.labels.get(gce.ROLE) == "worker"]
            create, delete, booting = plan(state, vms, settings, time.time())
            if time.time() < paused_until:
                create = 0
            report = {"b": booting + create, "n": len(vms), "mx": settings["max"]}
            for zone, name, why in delete:
                say(f"deleting {name}: {why}")
                compute.delete(zone, name)
            if create:
                cluster_state(address, timeout=5.0, api_key=keys.api_keys[0], capacity=report)  # (said first)
                say(f"creating {create} worker VM(s)")
                try:
                    gce.add_workers(compute, settings, create, keys.worker_tokens[0], wheel_items, say, [],
                                    taken={name for _, name, _, _ in vms})
                except (gce.QuotaError, gce.CapacityError) as e:
                    say(f"cannot grow now: {e}; trying again in 5 minutes")
                    paused_until = time.time() + 300
        except (gce.CloudError, TimeoutError, OSError) as e:
            say(str(e))
        time.sleep(interval)
