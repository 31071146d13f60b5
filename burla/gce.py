"""`burla cluster up/down/status` on Google Compute Engine (google-cloud-compute).

A cluster NAME is a head VM ({NAME}-head) running the broker and the autoscaler, and worker VMs ({NAME}-worker-{i})
running one worker each with a slot per core, every one labelled burla-cluster=NAME. The VMs boot a public Debian
image; their startup script (burla.bootstrap) installs the client's own burla, which travels in their metadata, into
a Python of the client's version. The broker's keys and the workers' join token reach the VMs as instance metadata,
never on a command line. `up` waits for the workers to join, then writes the client's config so that
remote_parallel_map uses the new cluster. The autoscaler (burla.autoscale) then grows and shrinks it.

Creating a VM is an insert and a wait on its zone operation, which is where capacity errors show up
(ZONE_RESOURCE_POOL_EXHAUSTED); with zone fallback the next zone of the region is tried. Quota errors are the
project's, not the zone's: they end the command with what to ask for. Transient errors (429, 5xx) are retried.
If anything fails, every VM this command created is deleted again.
"""

import base64
import hashlib
import io
import json
import os
import tarfile
import time

from burla import bootstrap, config, security
from burla.errors import BurlaError

PORT = 5555
LABEL, ROLE = "burla-cluster", "burla-role"
OS_IMAGE = "projects/debian-cloud/global/images/family/debian-12"  # public: nothing to build or push
GPU_IMAGE = "projects/deeplearning-platform-release/global/images/family/common-cu124-debian-11"  # NVIDIA drivers
PYTHONS = ("3.11", "3.12", "3.13")  # what burla runs on (requires-python), which uv brings onto a VM
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
        endpoint = self.endpoint = endpoint or os.environ.get("BURLA_GCE_ENDPOINT")
        self.session = None  # Cloud Storage's, made when first needed

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
        self.machine_types = client("MachineTypes")
        self.types = {}  # (zone, machine type) -> (vcpus, memory GB)

    def call(self, fn, *args, **kwargs):
        """fn(...), retried with backoff on errors that pass (429, 5xx); a quota error becomes QuotaError."""
        import requests
        from google.api_core import exceptions as gexc

        for attempt in range(RETRIES):
            try:
                return fn(*args, **kwargs)
            except (gexc.TooManyRequests, gexc.InternalServerError, gexc.ServiceUnavailable, gexc.BadGateway,
                    gexc.GatewayTimeout) as e:
                if attempt == RETRIES - 1:
                    raise CloudError(f"Compute Engine kept failing ({e.code}): {e.message}") from None
                time.sleep(min(0.2 * 2 ** attempt, 5))
            except requests.ConnectionError as e:  # (a connection reset: many requests at once, a flaky link)
                if attempt == RETRIES - 1:
                    raise CloudError(f"Compute Engine could not be reached: {e}") from None
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
        from google.api_core import exceptions as gexc

        def insert():
            try:
                return self.instances.insert_unary(project=self.project, zone=zone, instance_resource=instance)
            except gexc.Conflict:
                return None  # an insert sent again after a lost answer: the first one made it (names are ours)

        operation = self.call(insert)
        if operation is not None:
            self.wait(operation, zone)
        return self.call(self.instances.get, project=self.project, zone=zone, instance=instance.name)

    def machine_type(self, zone, name):
        """(vcpus, memory GB) of a machine type in a zone; CloudError if the zone has no such type."""
        if (zone, name) not in self.types:
            t = self.call(self.machine_types.get, project=self.project, zone=zone, machine_type=name)
            self.types[zone, name] = (t.guest_cpus, round(t.memory_mb / 1024, 2))
        return self.types[zone, name]

    # -------------------------------------------------------------- Cloud Storage (a wheel too big for metadata)
    def storage(self, method, path, **kwargs):
        """A Cloud Storage JSON API request (path after the host); the answer, None for a 404."""
        if self.session is None:
            import requests

            if self.endpoint:
                self.session, self.storage_url = requests.Session(), self.endpoint
            else:
                import google.auth
                from google.auth.transport.requests import AuthorizedSession

                credentials, _ = google.auth.default(scopes=["https://www.googleapis.com/auth/devstorage.read_write"])
                self.session, self.storage_url = AuthorizedSession(credentials), "https://storage.googleapis.com"
        for attempt in range(RETRIES):
            answer = self.session.request(method, self.storage_url + path, timeout=60, **kwargs)
            if answer.status_code not in (429, 500, 502, 503, 504) or attempt == RETRIES - 1:
                break
            time.sleep(min(0.2 * 2 ** attempt, 5))
        if answer.status_code == 404:
            return None
        if answer.status_code >= 400 and answer.status_code != 409:
            raise CloudError(f"Cloud Storage {method} {path.split('?')[0]}: {answer.status_code} {answer.text[:300]}")
        return answer

    def put_object(self, bucket, name, data):
        """Upload data as gs://bucket/name, making the bucket (in the project) first if need be."""
        self.storage("POST", f"/storage/v1/b?project={self.project}", json={"name": bucket})
        if self.storage("POST", f"/upload/storage/v1/b/{bucket}/o", params={"uploadType": "media", "name": name},
                        data=data, headers={"Content-Type": "application/octet-stream"}) is None:
            raise CloudError(f"bucket {bucket} could not be made")

    def delete_bucket(self, bucket):
        """Delete the bucket and what is in it; False if there was none."""
        from urllib.parse import quote

        listing = self.storage("GET", f"/storage/v1/b/{bucket}/o")
        if listing is None:
            return False
        for item in listing.json().get("items", []):
            self.storage("DELETE", f"/storage/v1/b/{bucket}/o/{quote(item['name'], safe='')}")
        self.storage("DELETE", f"/storage/v1/b/{bucket}")
        return True

    def serial_output(self, zone, name, lines=20):
        """The last lines a VM wrote to its serial console (where its startup script's output goes), or ""."""
        try:
            out = self.call(self.instances.get_serial_port_output, project=self.project, zone=zone, instance=name)
        except CloudError:
            return ""
        return "\n".join(out.contents.splitlines()[-lines:])

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


# ---------------------------------------------------------------------------------------------- what VMs are
def broker_state(folder):
    """The broker's state folder (keys, API keys, worker tokens) as base64 of a tar.gz, for instance metadata."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        for name in ("broker.secret", "api_keys", "worker_tokens"):
            tar.add(os.path.join(folder, name), arcname=name)
    return base64.b64encode(buffer.getvalue()).decode()


def vm(compute, name, cluster, role, zone, machine_type, disk_gb, metadata, spot=False, gpu=None):
    v1 = compute.v1
    if gpu:
        metadata = dict(metadata, **{"install-nvidia-driver": "True"})  # (the image's own first-boot step)
    instance = v1.Instance(
        name=name, machine_type=f"zones/{zone}/machineTypes/{machine_type}",
        labels={LABEL: cluster, ROLE: role}, tags=v1.Tags(items=["burla"]),
        disks=[v1.AttachedDisk(boot=True, auto_delete=True, initialize_params=v1.AttachedDiskInitializeParams(
            source_image=GPU_IMAGE if gpu else OS_IMAGE, disk_size_gb=disk_gb))],
        network_interfaces=[v1.NetworkInterface(network="global/networks/default", access_configs=[
            v1.AccessConfig(name="External NAT", type_="ONE_TO_ONE_NAT")])],
        metadata=v1.Metadata(items=[v1.Items(key=k, value=v) for k, v in metadata.items()]),
        service_accounts=[v1.ServiceAccount(email="default", scopes=[
            "https://www.googleapis.com/auth/cloud-platform"] if role == "head" else [
            "https://www.googleapis.com/auth/logging.write",
            "https://www.googleapis.com/auth/devstorage.read_only"])])  # (the wheel, when it is in a bucket)
    scheduling = v1.Scheduling()
    if spot:  # a preempted worker is a lost worker: its batches run again elsewhere, and the autoscaler replaces it
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


def worker_names(taken, count, cluster):
    """count names {cluster}-worker-{i} not in taken, lowest first."""
    names, i = [], 0
    while len(names) < count:
        name = f"{cluster}-worker-{i}"
        if name not in taken:
            names.append(name)
        i += 1
    return names


def add_workers(compute, settings, count, token, wheel_items, say, created, taken=()):
    """Create count worker VMs at once (a thread each, up to 32): the cluster grows in the time of one insert, not
    count of them. Returns their names; the first error is raised once all have ended."""
    import concurrent.futures

    metadata = {"startup-script": bootstrap.startup_script(PORT), "burla-role": "worker",
                "burla-python": settings["python"], "burla-broker": settings["broker"], "burla-worker-token": token,
                **wheel_items}
    if settings.get("gpu"):
        metadata["burla-gpus"] = settings["gpu"]
    if settings.get("pip_args"):
        metadata["burla-pip-args"] = settings["pip_args"]
    names = worker_names(set(taken), count, settings["name"])

    def make(name):
        say(f"creating {name} ({settings['machine_type']}{', spot' if settings.get('spot') else ''}"
            f"{', ' + settings['gpu'] if settings.get('gpu') else ''})")
        return create_in_zones(compute, settings["zones"], lambda z: vm(
            compute, name, settings["name"], "worker", z, settings["machine_type"], settings["disk_gb"], metadata,
            settings.get("spot"), settings.get("gpu")), say, created)

    if not names:
        return []
    with concurrent.futures.ThreadPoolExecutor(min(32, len(names))) as pool:
        futures = [pool.submit(make, n) for n in names]
        errors = [f.exception() for f in futures if f.exception() is not None]
    if errors:
        raise errors[0]
    return names


# ---------------------------------------------------------------------------------------------- what it costs
# List prices in us-central1, USD per hour (late 2026): per vCPU and per GB of memory by machine family, and per
# GPU. Other regions cost up to ~30% more; spot VMs 60-91% less, and their price moves, so it is not shown.
FAMILY_PRICES = {"e2": (0.021811, 0.002923), "n2": (0.031611, 0.004237), "n2d": (0.027502, 0.003686),
                 "n1": (0.031611, 0.004237), "c2": (0.03398, 0.00455), "c2d": (0.029563, 0.003959),
                 "c3": (0.03465, 0.003938), "c3d": (0.029563, 0.003959), "n4": (0.030143, 0.003855),
                 "t2d": (0.027502, 0.003686), "g2": (0.0, 0.0), "a2": (0.0, 0.0)}
GPU_PRICES = {"nvidia-tesla-t4": 0.35, "nvidia-l4": 0.56, "nvidia-tesla-v100": 2.48, "nvidia-tesla-p100": 1.46,
              "nvidia-tesla-a100": 2.93, "nvidia-a100-80gb": 3.93, "nvidia-h100-80gb": 11.06}
WHOLE_PRICES = {"g2-standard-4": 0.7068, "g2-standard-8": 0.8536, "a2-highgpu-1g": 3.6731}  # (GPU included)


def hourly(machine_type, vcpus, memory_gb, gpu=None):
    """The list price of one VM per hour, or None for a machine type this table does not know."""
    if machine_type in WHOLE_PRICES:
        return WHOLE_PRICES[machine_type]
    rates = FAMILY_PRICES.get(machine_type.split("-")[0])
    if rates is None or not rates[0]:
        return None
    price = vcpus * rates[0] + memory_gb * rates[1]
    if gpu:
        kind, _, count = gpu.partition(":")
        if kind not in GPU_PRICES:
            return None
        price += GPU_PRICES[kind] * int(count or 1)
    return price


def dollars(price):
    return "an unknown price (not in burla's table)" if price is None else f"${price:.2f}"


# ---------------------------------------------------------------------------------------------- commands
def up(project, zone, workers, machine_type="n2-standard-4", name="burla", spot=False, gpu=None, disk_gb=50,
       zone_fallback=False, idle_minutes=None, state_root=None, compute=None, say=print, min_workers=None,
       max_workers=None, head_machine_type="e2-standard-2", python=None, pip_args="", wait_minutes=10.0,
       autoscale_interval=5.0):
    """Create the cluster, wait until its workers have joined (wait_minutes; 0: do not wait), write the client
    config; return its address. min/max_workers (default: workers) bound the head's autoscaler."""
    min_workers = workers if min_workers is None else min_workers
    max_workers = max(workers, min_workers) if max_workers is None else max_workers
    if not 0 <= min_workers <= workers <= max_workers:
        raise CloudError(f"the worker counts must be 0 <= --min-workers ({min_workers}) <= --workers ({workers}) "
                         f"<= --max-workers ({max_workers})")
    python = python or bootstrap.python_version()
    if python not in PYTHONS:
        raise CloudError(f"the VMs can run Python {', '.join(PYTHONS)}, not {python}")
    compute = compute or Compute(project)
    if compute.cluster(name):
        raise CloudError(f"cluster {name!r} already has VMs in project {project}: `burla cluster down --name {name}` "
                         "first, or choose another --name")
    vcpus, memory_gb = compute.machine_type(zone, machine_type)
    wheel_file, wheel = bootstrap.package()
    folder = os.path.join(os.path.expanduser(state_root or "~/.burla/clusters"), name)
    keys = security.BrokerKeys(folder)
    zones = compute.zones(zone) if zone_fallback else [zone]
    settings = {"name": name, "project": project, "zones": zones, "machine_type": machine_type, "vcpus": vcpus,
                "memory_gb": memory_gb, "spot": bool(spot), "gpu": gpu or "", "disk_gb": disk_gb,
                "min": min_workers, "max": max_workers, "idle_minutes": idle_minutes, "python": python,
                "pip_args": pip_args or "", "interval": autoscale_interval}
    created, bucket = [], None
    try:
        try:
            wheel_items = bootstrap.wheel_metadata(wheel_file, wheel)
        except ValueError as e:  # (local changes made it big): it travels in a bucket `down` deletes
            bucket = bucket_name(project, name)
            digest = hashlib.sha256(wheel).hexdigest()
            say(f"{e}: it goes in gs://{bucket}")
            compute.put_object(bucket, f"{digest[:16]}/{wheel_file}", wheel)
            wheel_items = bootstrap.wheel_metadata(wheel_file, wheel, url=f"gs://{bucket}/{digest[:16]}/{wheel_file}")
        compute.ensure_firewall("burla-broker")
        say(f"creating {name}-head ({head_machine_type}) in {zones[0]}")
        settings["broker"] = ""  # (the head's own address: its autoscaler reads it from the metadata server)
        head_metadata = {"startup-script": bootstrap.startup_script(PORT), "burla-role": "head",
                         "burla-python": python, "burla-broker-state": broker_state(keys.folder),
                         "burla-cluster": json.dumps(settings), **wheel_items}
        if pip_args:
            head_metadata["burla-pip-args"] = pip_args
        head_zone, head = create_in_zones(compute, zones, lambda z: vm(
            compute, f"{name}-head", name, "head", z, head_machine_type, disk_gb, head_metadata), say, created)
        nic = head.network_interfaces[0]
        internal, external = nic.network_i_p, nic.access_configs[0].nat_i_p
        settings["broker"] = f"tcp://{internal}:{PORT}"
        add_workers(compute, settings, workers, keys.worker_tokens[0], wheel_items, say, created)
    except BaseException:
        say(f"cleaning up the {len({n for _, n in created})} VM(s) this command made or tried to make")
        for z, n in created:
            try:
                compute.delete(z, n)  # (one never made is not found: fine)
            except Exception as e:
                say(f"could not delete {n} in {z}: {e}; delete it by hand (burla cluster down)")
        if bucket:
            compute.delete_bucket(bucket)
        raise
    address = f"tcp://{external}:{PORT}"
    config.save(cluster=address, api_key=keys.api_keys[0])
    price = hourly(machine_type, vcpus, memory_gb, gpu)
    head_price = hourly(head_machine_type, *compute.machine_type(head_zone, head_machine_type))

    def cost(n):
        return None if price is None or head_price is None else head_price + n * price

    text = (f"cost: about {dollars(cost(workers))} per hour (list price{', spot workers less' if spot else ''}) "
            f"for the head and {workers} x {machine_type}{' + ' + gpu if gpu else ''}")
    if max_workers > workers:
        text += f"; up to {dollars(cost(max_workers))} at --max-workers {max_workers}"
    say(text)
    if wait_minutes:
        wait_until_joined(compute, name, address, keys.api_keys[0], workers, wait_minutes * 60, say)
    say(f"cluster {name} is up: {address} (saved in {config.config_path()})"
        + ("" if wait_minutes else "; workers join as they boot"))
    return address


def wait_until_joined(compute, name, address, api_key, workers, seconds, say):
    """Show VMs created, booted (RUNNING) and joined (their worker registered, and all its slots: they dial one by
    one) until all workers have joined: a progress bar on a terminal, a line per change otherwise."""
    import sys

    from burla.client import cluster_state

    bar = None
    if say is print and sys.stderr.isatty():
        from tqdm import tqdm

        bar = tqdm(total=workers, unit="worker", desc="joined", file=sys.stderr, leave=True)
    deadline, last = time.monotonic() + seconds, None
    try:
        while True:
            vms = [i for _, i in compute.cluster(name) if i.labels.get(ROLE) == "worker"]
            running = sum(1 for i in vms if i.status == "RUNNING")
            try:
                state = cluster_state(address, timeout=3.0, api_key=api_key)
                listed = {w["id"]: w for w in state.get("workers", ()) if w["id"].startswith(f"{name}-worker-")}
                short = [w for w in listed.values() if w["slots"] < w.get("of", 0)]
                joined, broker = len(listed) - len(short), "answers"
            except (TimeoutError, OSError):
                listed, short, joined, broker = {}, [], 0, "not answering yet"
            now = (len(vms), running, joined, broker)
            if now != last:
                text = f"worker VMs: {len(vms)} created, {running} booted, {joined}/{workers} joined; broker {broker}"
                if bar is not None:
                    bar.n = joined
                    bar.set_postfix_str(text.split("; ", 1)[0].replace(f"{joined}/{workers} joined", "")
                                        .rstrip(", ") + f"; broker {broker}")
                else:
                    say(text)
                last = now
            if joined >= workers:
                return
            if time.monotonic() > deadline:
                # the VM to show: the head if its broker does not answer, else a worker not (or not all) there
                role = "worker" if broker == "answers" else "head"
                vms, partial = compute.cluster(name), {w["id"] for w in short}
                late = [(z, i.name) for z, i in vms if i.labels.get(ROLE) == role and i.name not in listed] + \
                    [(z, i.name) for z, i in vms if i.name in partial]
                tail = compute.serial_output(*late[0]) if late else ""
                slots = "".join(f" ({w['id']} has {w['slots']} of its {w['of']} slots)" for w in short[:3])
                raise CloudError(
                    f"only {joined} of {workers} workers joined within {seconds / 60:g} minutes{slots}. The VMs are "
                    f"up (and cost money): `burla cluster down --name {name}` deletes them."
                    + (f" The end of {late[0][1]}'s boot (`gcloud compute instances get-serial-port-output "
                       f"{late[0][1]} --zone {late[0][0]}`):\n{tail}" if tail else ""))
            time.sleep(2.0)
    finally:
        if bar is not None:
            bar.close()


def down(project, name="burla", compute=None, say=print):
    import concurrent.futures

    compute = compute or Compute(project)
    vms = compute.cluster(name)
    for zone, instance in vms:
        say(f"deleting {instance.name} in {zone}")
    with concurrent.futures.ThreadPoolExecutor(max(1, min(32, len(vms)))) as pool:
        for f in [pool.submit(compute.delete, zone, instance.name) for zone, instance in vms]:
            f.result()
    if compute.delete_bucket(bucket_name(project, name)):
        say(f"deleted gs://{bucket_name(project, name)}")
    return len(vms)


def bucket_name(project, cluster):
    """The cluster's bucket (bucket names are global: the project's name in it keeps it apart)."""
    return f"burla-{hashlib.sha256(f'{project}/{cluster}'.encode()).hexdigest()[:12]}-{cluster}"[:63].rstrip("-")


def status(project, name="burla", compute=None, state=None):
    """The cluster's VMs as dicts: name, role, zone, status, internal and external ip, age (seconds), and from
    the broker's state (if given) their worker's slots, busy slots and idle seconds; cost so far at list price."""
    compute = compute or Compute(project)
    workers = {w["id"]: w for w in (state or {}).get("workers", ())}
    rows, now, types = [], time.time(), {}
    for zone, instance in compute.cluster(name):
        nic = instance.network_interfaces[0] if instance.network_interfaces else None
        external = nic.access_configs[0].nat_i_p if nic and nic.access_configs else ""
        kind = instance.machine_type.rpartition("/")[2]
        if (zone, kind) not in types:
            try:
                types[zone, kind] = compute.machine_type(zone, kind)
            except CloudError:
                types[zone, kind] = (0, 0.0)
        gpu = ",".join(f"{a.accelerator_type.rpartition('/')[2]}:{a.accelerator_count}"
                       for a in instance.guest_accelerators)
        age = max(0.0, now - _timestamp(instance.creation_timestamp)) if instance.creation_timestamp else 0.0
        price = hourly(kind, *types[zone, kind], gpu or None)
        w = workers.get(instance.name)
        rows.append({"name": instance.name, "role": instance.labels.get(ROLE, "?"), "zone": zone,
                     "status": instance.status, "machine_type": kind, "internal_ip": nic.network_i_p if nic else "",
                     "external_ip": external, "age": round(age), "joined": w is not None,
                     "slots": w["slots"] if w else None, "busy": w["busy"] if w else None,
                     "idle": w.get("idle") if w else None,
                     "cost": None if price is None else round(price * age / 3600, 4)})
    return rows


def _timestamp(text):
    import datetime

    return datetime.datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()
