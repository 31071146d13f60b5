"""`burla cluster up/down/status` on Google Compute Engine (google-cloud-compute).

A cluster NAME is a head VM ({NAME}-head) running the broker and N worker VMs ({NAME}-worker-{i}) running one worker
each with a slot per core, every one labelled burla-cluster=NAME. Each VM starts its container from a startup
script (Container-Optimized OS has docker); the broker's keys and the workers' join token reach the VMs as instance
metadata, never on a command line. `up` writes the client's config so remote_parallel_map uses the new cluster.

Creating a VM is an insert and a wait on its zone operation, which is where capacity errors show up
(ZONE_RESOURCE_POOL_EXHAUSTED); with zone fallback the next zone of the region is tried. Quota errors are the
project's, not the zone's: they end the command with what to ask for. Transient errors (429, 5xx) are retried.
If anything fails, every VM this command created is deleted again.
"""

import base64
import io
import os
import tarfile
import time

from burla import config, security
from burla.errors import BurlaError

PORT = 5555
LABEL, ROLE = "burla-cluster", "burla-role"
OS_IMAGE = "projects/cos-cloud/global/images/family/cos-stable"  # Container-Optimized OS: docker included
REGISTRY = "ghcr.io/burla-cloud"  # where REGISTRY/burla-broker:VERSION and REGISTRY/burla-worker:VERSION are
#                                    pushed, built from broker/Dockerfile and worker/Dockerfile
CAPACITY = ("ZONE_RESOURCE_POOL_EXHAUSTED", "ZONE_RESOURCE_POOL_EXHAUSTED_WITH_DETAILS", "RESOURCE_AVAILABILITY",
            "UNSUPPORTED_OPERATION")
RETRIES = 5


class CloudError(BurlaError):
    """Compute Engine refused or failed a request; the message says what to do."""


class CapacityError(CloudError):
    """The zone has no room for this machine type now."""


class QuotaError(CloudError):
    """The project's quota is too small for what was asked."""


class Compute:
    """The Compute Engine calls burla makes. endpoint (tests, or BURLA_GCE_ENDPOINT): a fake of the REST API,
    reached with anonymous credentials; otherwise Google's, with Application Default Credentials. Every client is
    made with an explicit transport, operations clients too: the library's own operation polling would ignore a
    custom endpoint."""

    def __init__(self, project, endpoint=None):
        from google.cloud import compute_v1

        self.project, self.v1 = project, compute_v1
        endpoint = endpoint or os.environ.get("BURLA_GCE_ENDPOINT")

        def client(name):
            cls = getattr(compute_v1, name + "Client")
            if not endpoint:
                return cls()
            from google.auth.credentials import AnonymousCredentials

            scheme, _, host = endpoint.partition("://")
            transport = cls.get_transport_class("rest")(host=host, credentials=AnonymousCredentials(),
                                                        url_scheme=scheme)
            return cls(transport=transport)

        self.instances = client("Instances")
        self.zone_operations = client("ZoneOperations")
        self.global_operations = client("GlobalOperations")
        self.regions = client("Regions")
        self.firewalls = client("Firewalls")

    def call(self, fn, *args, **kwargs):
        """fn(...), retried with backoff on errors that pass (429, 5xx); a quota error becomes QuotaError."""
        from google.api_core import exceptions as gexc

        for attempt in range(RETRIES):
            try:
                return fn(*args, **kwargs)
            except (gexc.TooManyRequests, gexc.InternalServerError, gexc.ServiceUnavailable, gexc.BadGateway,
                    gexc.GatewayTimeout) as e:
                if attempt == RETRIES - 1:
                    raise CloudError(f"Compute Engine kept failing ({e.code}): {e.message}") from None
                time.sleep(min(0.2 * 2 ** attempt, 5))
            except gexc.Forbidden as e:
                if "quota" in str(e).lower():
                    raise QuotaError(f"{e.message} Ask for more quota (IAM & Admin > Quotas) or fewer/smaller "
                                     "workers.") from None
                raise CloudError(f"permission denied: {e.message}") from None
            except gexc.GoogleAPICallError as e:
                raise CloudError(f"{e.code}: {e.message}") from None

    def wait(self, operation, zone=None):
        """Wait for an operation to end; its error, if any, as CapacityError or CloudError."""
        while operation.status != self.v1.Operation.Status.DONE:
            if zone:
                operation = self.call(self.zone_operations.wait, project=self.project, zone=zone,
                                      operation=operation.name)
            else:
                operation = self.call(self.global_operations.wait, project=self.project, operation=operation.name)
        errors = list(operation.error.errors) if operation.error else []
        if errors:
            code, message = errors[0].code, errors[0].message
            if code in CAPACITY:
                raise CapacityError(f"{zone}: {code}: {message}")
            if "QUOTA" in code:
                raise QuotaError(f"{code}: {message}")
            raise CloudError(f"{code}: {message}")
        return operation

    def create(self, zone, instance):
        operation = self.call(self.instances.insert_unary, project=self.project, zone=zone,
                              instance_resource=instance)
        self.wait(operation, zone)
        return self.call(self.instances.get, project=self.project, zone=zone, instance=instance.name)

    def delete(self, zone, name):
        from google.api_core import exceptions as gexc

        def delete():
            try:
                return self.instances.delete_unary(project=self.project, zone=zone, instance=name)
            except gexc.NotFound:
                return None

        operation = self.call(delete)
        if operation is not None:
            self.wait(operation, zone)

    def cluster(self, name):
        """The cluster's VMs as (zone, instance), by label, in every zone."""
        request = self.v1.AggregatedListInstancesRequest(project=self.project, filter=f"labels.{LABEL}={name}")
        found = []
        for scope, listing in self.call(self.instances.aggregated_list, request=request):
            for instance in listing.instances:
                found.append((scope.rpartition("/")[2], instance))
        return sorted(found, key=lambda z_i: z_i[1].name)

    def zones(self, zone):
        """The zone, then the other zones of its region."""
        region = zone.rsplit("-", 1)[0]
        listed = self.call(self.regions.get, project=self.project, region=region).zones
        return [zone] + sorted(z.rpartition("/")[2] for z in listed if not z.endswith("/" + zone))

    def ensure_firewall(self, name):
        """Let clients reach the broker's port on VMs tagged burla (CURVE protects it)."""
        from google.api_core import exceptions as gexc

        try:
            self.firewalls.get(project=self.project, firewall=name)
            return
        except gexc.NotFound:
            pass
        rule = self.v1.Firewall(name=name, network="global/networks/default", direction="INGRESS",
                                source_ranges=["0.0.0.0/0"], target_tags=["burla"],
                                allowed=[self.v1.Allowed(I_p_protocol="tcp", ports=[str(PORT)])])
        self.wait(self.call(self.firewalls.insert_unary, project=self.project, firewall_resource=rule))


# ---------------------------------------------------------------------------------------------- what VMs run
def image_name(registry, role):
    from burla import __version__

    return f"{registry}/burla-{'broker' if role == 'head' else 'worker'}:{__version__}"


def startup_script(role, image, gpu=False, idle_minutes=None, name=None, project=None):
    """The VM's startup script: fetch its settings from the metadata server, start its container. (Not the
    gce-container-declaration metadata, which Google is retiring.)"""
    attr = "curl -sf -H 'Metadata-Flavor: Google' http://metadata.google.internal/computeMetadata/v1/instance/attributes/"
    lines = ["#!/bin/bash", "set -euo pipefail"]
    if role == "head":
        lines += ["mkdir -p /var/lib/burla && chmod 700 /var/lib/burla",
                  f"{attr}burla-broker-state | base64 -d | tar -xz -C /var/lib/burla",
                  f"docker run -d --restart=always --name burla-broker --network host -v /var/lib/burla:/state "
                  f"{image} broker --bind tcp://0.0.0.0:{PORT} --state-dir /state"]
        if idle_minutes:
            lines.append(f"docker run -d --restart=always --name burla-reaper --network host -v /var/lib/burla:/state "
                         f"{image} cluster reaper --name {name} --project {project} --idle-minutes {idle_minutes} "
                         "--state-dir /state")
    else:
        if gpu:
            lines.append("cos-extensions install gpu && mount --bind /var/lib/nvidia /var/lib/nvidia && "
                         "mount -o remount,exec /var/lib/nvidia")
        gpus = ("--volume /var/lib/nvidia/lib64:/usr/local/nvidia/lib64 --volume /var/lib/nvidia/bin:/usr/local/"
                "nvidia/bin --device /dev/nvidia0 --device /dev/nvidia-uvm --device /dev/nvidiactl ") if gpu else ""
        lines += ["mkdir -p /var/lib/burla-envs && chown 1000:1000 /var/lib/burla-envs",  # the image's user
                  f"export BURLA_WORKER_TOKEN=$({attr}burla-worker-token)",
                  f"BROKER=$({attr}burla-broker)",
                  f"GPUS=$({attr}burla-gpus || true)",
                  "docker run -d --restart=always --name burla-worker --network host -e BURLA_WORKER_TOKEN "
                  f"-v /var/lib/burla-envs:/envs {gpus}"
                  f"{image} worker --broker \"$BROKER\" --name \"$(hostname)\" ${{GPUS:+--gpus \"$GPUS\"}}"]
    return "\n".join(lines) + "\n"


def broker_state(folder):
    """The broker's state folder (keys, API keys, worker tokens) as base64 of a tar.gz, for instance metadata."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        for name in ("broker.secret", "api_keys", "worker_tokens"):
            tar.add(os.path.join(folder, name), arcname=name)
    return base64.b64encode(buffer.getvalue()).decode()


def vm(compute, name, cluster, role, zone, machine_type, disk_gb, metadata, spot=False, gpu=None):
    v1 = compute.v1
    instance = v1.Instance(
        name=name, machine_type=f"zones/{zone}/machineTypes/{machine_type}",
        labels={LABEL: cluster, ROLE: role}, tags=v1.Tags(items=["burla"]),
        disks=[v1.AttachedDisk(boot=True, auto_delete=True, initialize_params=v1.AttachedDiskInitializeParams(
            source_image=OS_IMAGE, disk_size_gb=disk_gb))],
        network_interfaces=[v1.NetworkInterface(network="global/networks/default", access_configs=[
            v1.AccessConfig(name="External NAT", type_="ONE_TO_ONE_NAT")])],
        metadata=v1.Metadata(items=[v1.Items(key=k, value=v) for k, v in metadata.items()]),
        service_accounts=[v1.ServiceAccount(email="default", scopes=[
            "https://www.googleapis.com/auth/cloud-platform" if role == "head" else
            "https://www.googleapis.com/auth/logging.write"])])
    scheduling = v1.Scheduling()
    if spot:  # a preempted worker is a lost worker: its batches run again elsewhere
        scheduling.provisioning_model = "SPOT"
        scheduling.instance_termination_action = "DELETE"
    if gpu:
        kind, _, count = gpu.partition(":")
        instance.guest_accelerators = [v1.AcceleratorConfig(
            accelerator_type=f"zones/{zone}/acceleratorTypes/{kind}", accelerator_count=int(count or 1))]
        scheduling.on_host_maintenance = "TERMINATE"  # GPUs cannot live-migrate
    instance.scheduling = scheduling
    return instance


def create_in_zones(compute, zones, make, say, created):
    """Create a VM in the first zone of zones that has room for it; (zone, instance). Each try is added to
    created before it is made, so that a failure (or Ctrl-C) part way deletes it too."""
    for k, zone in enumerate(zones):
        instance = make(zone)
        created.append((zone, instance.name))
        try:
            return zone, compute.create(zone, instance)
        except CapacityError as e:
            if k == len(zones) - 1:
                hint = "" if len(zones) > 1 else " (--zone-fallback tries the region's other zones)"
                raise CapacityError(f"no room for it: {e}{hint}") from None
            say(f"{zone} has no room ({e}); trying {zones[k + 1]}")
    raise CapacityError("no zone to try")


# ---------------------------------------------------------------------------------------------- commands
def up(project, zone, workers, machine_type="n2-standard-4", name="burla", spot=False, gpu=None, disk_gb=50,
       zone_fallback=False, idle_minutes=None, registry=REGISTRY, state_root=None, compute=None, say=print):
    """Create the cluster; write the client config; return its address."""
    compute = compute or Compute(project)
    if compute.cluster(name):
        raise CloudError(f"cluster {name!r} already has VMs in project {project}: `burla cluster down --name {name}` "
                         "first, or choose another --name")
    folder = os.path.join(os.path.expanduser(state_root or "~/.burla/clusters"), name)
    keys = security.BrokerKeys(folder)
    zones = compute.zones(zone) if zone_fallback else [zone]
    created = []
    try:
        compute.ensure_firewall("burla-broker")
        say(f"creating {name}-head in {zones[0]}")
        head_zone, head = create_in_zones(compute, zones, lambda z: vm(
            compute, f"{name}-head", name, "head", z, machine_type, disk_gb, {
                "startup-script": startup_script("head", image_name(registry, "head"), idle_minutes=idle_minutes,
                                                 name=name, project=project),
                "burla-broker-state": broker_state(keys.folder)}), say, created)
        nic = head.network_interfaces[0]
        internal, external = nic.network_i_p, nic.access_configs[0].nat_i_p
        for i in range(workers):
            worker_name = f"{name}-worker-{i}"
            say(f"creating {worker_name} ({machine_type}{', spot' if spot else ''}{', ' + gpu if gpu else ''})")
            metadata = {"startup-script": startup_script("worker", image_name(registry, "worker"), gpu=bool(gpu)),
                        "burla-broker": f"tcp://{internal}:{PORT}", "burla-worker-token": keys.worker_tokens[0]}
            if gpu:
                metadata["burla-gpus"] = gpu
            create_in_zones(compute, zones, lambda z: vm(
                compute, worker_name, name, "worker", z, machine_type, disk_gb, metadata, spot, gpu), say, created)
    except BaseException:
        say(f"cleaning up the {len({n for _, n in created})} VM(s) this command made or tried to make")
        for z, n in created:
            try:
                compute.delete(z, n)  # (one never made is not found: fine)
            except Exception as e:
                say(f"could not delete {n} in {z}: {e}; delete it by hand (burla cluster down)")
        raise
    address = f"tcp://{external}:{PORT}"
    config.save(cluster=address, api_key=keys.api_keys[0])
    say(f"cluster {name} is up: {address} (saved in {config.config_path()}); workers join as they boot")
    return address


def down(project, name="burla", compute=None, say=print):
    compute = compute or Compute(project)
    vms = compute.cluster(name)
    for zone, instance in vms:
        say(f"deleting {instance.name} in {zone}")
        compute.delete(zone, instance.name)
    return len(vms)


def status(project, name="burla", compute=None):
    """[(name, role, zone, status, internal ip, external ip)] of the cluster's VMs."""
    compute = compute or Compute(project)
    rows = []
    for zone, instance in compute.cluster(name):
        nic = instance.network_interfaces[0] if instance.network_interfaces else None
        external = nic.access_configs[0].nat_i_p if nic and nic.access_configs else ""
        rows.append((instance.name, instance.labels.get(ROLE, "?"), zone, instance.status,
                     nic.network_i_p if nic else "", external))
    return rows


def reap(project, name, idle_seconds, cluster_state, compute=None, idle_since=None, now=None):
    """One pass of the head's reaper: delete worker VMs whose worker has been idle (no busy slot) for
    idle_seconds. cluster_state() is the broker's state; idle_since carries over between passes."""
    compute = compute or Compute(project)
    idle_since = {} if idle_since is None else idle_since
    now = time.monotonic() if now is None else now
    state = cluster_state()
    busy = {w["id"]: w["busy"] or w.get("preparing", 0) for w in state["workers"]}  # (building an env is work)
    deleted = []
    for zone, instance in compute.cluster(name):
        if instance.labels.get(ROLE) != "worker" or instance.name not in busy:
            continue  # not joined yet (booting), or gone: not idle
        if busy[instance.name]:
            idle_since.pop(instance.name, None)
            continue
        since = idle_since.setdefault(instance.name, now)
        if now - since >= idle_seconds:
            compute.delete(zone, instance.name)
            idle_since.pop(instance.name, None)
            deleted.append(instance.name)
    return deleted
