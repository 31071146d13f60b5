"""`burla cluster up/down/status` against a local fake of the Compute Engine REST API (tests/fake_gce.py), with
google-cloud-compute pointed at it and anonymous credentials. No test touches Google Cloud."""

import base64
import hashlib
import io
import os
import subprocess
import sys
import tarfile
import threading
import time
import types
import zipfile

import pytest

from fake_gce import FakeCompute

from burla import autoscale, config, gce
from burla.client import cluster_state
from burla.security import BrokerKeys


@pytest.fixture
def fake():
    fake = FakeCompute()
    yield fake
    fake.close()


@pytest.fixture
def compute(fake):
    return gce.Compute("proj", endpoint=fake.endpoint)


@pytest.fixture(autouse=True)
def private_config(tmp_path, monkeypatch):
    monkeypatch.setenv("BURLA_CONFIG", str(tmp_path / "config.toml"))


def metadata(instance):
    return {i["key"]: i["value"] for i in instance["metadata"]["items"]}


def up(compute, tmp_path, **kwargs):
    options = dict(project="proj", zone="us-central1-a", workers=2, name="t1", state_root=str(tmp_path / "state"),
                   compute=compute, say=lambda text: None, wait_minutes=0)
    options.update(kwargs)
    return gce.up(**options)


def test_up_status_down(fake, compute, tmp_path):
    address = up(compute, tmp_path, machine_type="n2-standard-8", spot=True, gpu="nvidia-tesla-t4:2", disk_gb=100)
    head, *workers = fake.vms()
    assert [v["name"] for v in fake.vms()] == ["t1-head", "t1-worker-0", "t1-worker-1"]
    assert all(v["labels"] == {"burla-cluster": "t1", "burla-role": r} for v, r in
               zip(fake.vms(), ["head", "worker", "worker"]))
    assert workers[0]["machineType"].endswith("/machineTypes/n2-standard-8")
    assert workers[0]["scheduling"]["provisioningModel"] == "SPOT"
    assert workers[0]["guestAccelerators"][0]["acceleratorCount"] == 2
    assert workers[0]["disks"][0]["initializeParams"]["diskSizeGb"] == "100"
    assert "burla" in fake.firewalls["burla-broker"]["targetTags"]

    # the keys reach the VMs as metadata, and nowhere else (not the startup script, which anyone may read)
    keys = BrokerKeys(tmp_path / "state" / "t1")
    worker_md = metadata(workers[0])
    assert worker_md["burla-worker-token"] == keys.worker_tokens[0]
    assert worker_md["burla-broker"] == f"tcp://{head['networkInterfaces'][0]['networkIP']}:5555"
    assert keys.worker_tokens[0] not in worker_md["startup-script"]
    assert worker_md["burla-role"] == "worker" and worker_md["burla-python"] == "%d.%d" % sys.version_info[:2]
    assert "debian-cloud" not in workers[0]["disks"][0]["initializeParams"]["sourceImage"]  # (a GPU image)
    assert "debian-cloud" in head["disks"][0]["initializeParams"]["sourceImage"]
    # the client's own burla travels with them: a wheel, whole, in parts
    wheel = base64.b64decode("".join(worker_md[f"burla-wheel-{k}"] for k in range(int(worker_md["burla-wheel-parts"]))))
    assert hashlib.sha256(wheel).hexdigest() == worker_md["burla-wheel-sha256"] == metadata(head)["burla-wheel-sha256"]
    with zipfile.ZipFile(io.BytesIO(wheel)) as z:
        names = z.namelist()
        assert "burla/client.py" in names and "burla/worker/worker.py" in names and "burla/broker/broker.py" in names
        assert not any(n.startswith("burla_jupyter") for n in names)
        requires = z.read(next(n for n in names if n.endswith("/METADATA"))).decode()
        assert "Requires-Dist: pyzmq" in requires and "google-cloud-compute>=1.14; extra == 'head'" in requires
        assert "ipywidgets" not in requires
    with tarfile.open(fileobj=io.BytesIO(base64.b64decode(metadata(head)["burla-broker-state"]))) as tar:
        assert sorted(tar.getnames()) == ["api_keys", "broker.secret", "worker_tokens"]

    # the client now uses the cluster
    assert address == f"tcp://{head['networkInterfaces'][0]['accessConfigs'][0]['natIP']}:5555"
    assert address.startswith("tcp://127.0.1.")
    assert config.cluster_address() == address and config.api_key() == keys.api_keys[0]

    rows = gce.status("proj", "t1", compute=compute)
    assert [(r["name"], r["role"], r["status"]) for r in rows] == [
        ("t1-head", "head", "RUNNING"), ("t1-worker-0", "worker", "RUNNING"), ("t1-worker-1", "worker", "RUNNING")]
    assert rows[1]["machine_type"] == "n2-standard-8" and rows[1]["joined"] is False and rows[1]["cost"] >= 0
    with pytest.raises(gce.CloudError, match="already has VMs"):
        up(compute, tmp_path)
    assert gce.down("proj", "t1", compute=compute) == 3
    assert fake.vms() == [] and gce.status("proj", "t1", compute=compute) == []


def test_zone_without_room(fake, compute, tmp_path):
    fake.exhausted.add("us-central1-a")
    with pytest.raises(gce.CapacityError, match="ZONE_RESOURCE_POOL_EXHAUSTED.*--zone-fallback"):
        up(compute, tmp_path)
    assert fake.vms() == []

    said = []
    up(compute, tmp_path, zone_fallback=True, say=said.append)
    assert {v["zone"].rsplit("/", 1)[1] for v in fake.vms()} == {"us-central1-b"}
    assert any("us-central1-a has no room" in s and "trying us-central1-b" in s for s in said)


def test_quota_error_cleans_up_what_was_created(fake, compute, tmp_path):
    fake.quota_after = 2  # the head and one worker fit
    said = []
    with pytest.raises(gce.QuotaError, match="Quota 'CPUS' exceeded.*more quota"):
        up(compute, tmp_path, workers=3, say=said.append)
    assert fake.vms() == []  # both deleted again
    # (the workers are made at once: all three were tried, and the refused one is not found: fine)
    assert "cleaning up the 4 VM(s) this command made or tried to make" in said
    deletes = [p for m, p in fake.requests if m == "DELETE"]
    assert sorted(p.rsplit("/", 1)[1] for p in deletes) == ["t1-head", "t1-worker-0", "t1-worker-1", "t1-worker-2"]


def test_interrupted_up_deletes_the_vm_it_was_making(fake, compute, tmp_path, monkeypatch):
    """Ctrl-C while a VM's insert is in flight: that VM is deleted too."""
    real, interrupts = compute.wait, [KeyboardInterrupt()]

    def interrupted(operation, zone=None):
        if zone and interrupts and any(v["name"] == "t1-worker-0" for v in fake.vms()):
            raise interrupts.pop()  # once: the user pressed Ctrl-C while worker-0 was being made
        return real(operation, zone)

    monkeypatch.setattr(compute, "wait", interrupted)
    with pytest.raises(KeyboardInterrupt):
        up(compute, tmp_path)
    monkeypatch.setattr(compute, "wait", real)
    assert fake.vms() == []


def test_transient_errors_are_retried(fake, compute, tmp_path):
    fake.transient = 3
    up(compute, tmp_path, workers=1)
    assert len(fake.vms()) == 2
    fake.lost_inserts = 2  # made, the answer lost: sent again (409, it exists), and one VM made of each
    up(compute, tmp_path, workers=1, name="t2")
    assert sorted(v["name"] for v in fake.vms())[2:] == ["t2-head", "t2-worker-0"]


def test_many_workers_are_made_at_once(fake, compute, tmp_path):
    start = time.monotonic()
    up(compute, tmp_path, workers=60)
    assert len(fake.vms()) == 61
    assert sum(1 for m, p in fake.requests if m == "POST" and p.endswith("/instances")) == 61  # once each
    print(f"60 workers made in {time.monotonic() - start:.1f} s")


def cli(*args):
    """`burla cluster ARGS --project proj`, in this process (one test runs the real entry point)."""
    from burla.cli import main

    return main(["cluster", *args, "--project", "proj"])


@pytest.fixture
def cli_env(fake, tmp_path, monkeypatch):
    monkeypatch.setenv("BURLA_GCE_ENDPOINT", fake.endpoint)
    monkeypatch.setenv("HOME", str(tmp_path))
    return dict(os.environ)


def test_cli_against_the_fake(fake, tmp_path, cli_env, capsys):
    fake.exhausted.add("us-central1-a")
    failed = subprocess.run([sys.executable, "-m", "burla", "cluster", "up", "--zone", "us-central1-a", "--workers",
                             "1", "--wait-minutes", "0", "--project", "proj"], capture_output=True, text=True,
                            env=cli_env, timeout=60)
    assert failed.returncode == 1 and "burla cluster up: no room for it" in failed.stderr
    assert cli("up", "--zone", "us-central1-a", "--workers", "1", "--zone-fallback", "--wait-minutes", "0") == 0
    out = capsys.readouterr().out
    assert "cluster burla is up: tcp://127.0.1." in out
    assert "cost: about $0.26 per hour (list price) for the head and 1 x n2-standard-4" in out
    assert cli("status") == 0
    status = capsys.readouterr().out
    assert "burla-head" in status and "burla-worker-0" in status and "RUNNING" in status
    assert cli("down") == 0 and capsys.readouterr().out.strip().endswith("deleted 2 VM(s) of cluster burla")
    assert cli("status") == 0 and "no VMs" in capsys.readouterr().out


SETTINGS = {"name": "t1", "vcpus": 4, "min": 1, "max": 5, "idle_minutes": 10, "gpu": ""}


def vm_rows(*names, status="RUNNING", created=0.0):
    return [("us-central1-a", n, status, created) for n in names]


def worker(name, busy=0, idle=0.0, slots=4):
    return {"id": name, "busy": busy, "idle": idle, "slots": slots, "preparing": 0}


def test_autoscaler_grows_for_work_that_waits_or_asked():
    """plan(): a job that asked to grow counts at once, any other once it has waited; never past the maximum."""
    state = {"workers": [worker("t1-worker-0", busy=4)], "demand": [[40, 1.0, 0, 0, 5.0]]}
    vms = vm_rows("t1-worker-0")
    assert autoscale.plan(state, vms, SETTINGS, now=100.0) == (0, [], 0)  # young, and it did not ask
    state["demand"][0][4] = autoscale.GROW_AFTER
    assert autoscale.plan(state, vms, SETTINGS, now=100.0) == (4, [], 0)  # 40 calls / 4 slots = 10 VMs; max 5
    state["demand"] = [[10, 1.0, 0, 1, 0.5]]  # asked (grow=True): 10 calls at once need 3 VMs
    assert autoscale.plan(state, vms, SETTINGS, now=100.0) == (2, [], 0)
    state["demand"] = [[10, 2.0, 0, 1, 0.5]]  # 2 cpus a call: 2 a VM, 5 VMs
    assert autoscale.plan(state, vms, SETTINGS, now=100.0) == (4, [], 0)
    # VMs still booting count as on their way: no more are made for the same work
    assert autoscale.plan(state, vms + vm_rows("t1-worker-1", "t1-worker-2", created=90.0), SETTINGS, 100.0) == \
        (2, [], 2)
    state["demand"] = [[10, 1.0, 1, 1, 0.5]]  # needs a GPU: these VMs have none, so none is made for it
    assert autoscale.plan(state, vms, SETTINGS, now=100.0) == (0, [], 0)
    assert autoscale.plan(state, vms, dict(SETTINGS, gpu="nvidia-l4:2"), now=100.0) == (4, [], 0)  # 2 a VM


def test_autoscaler_replaces_lost_vms_and_gives_up_on_broken_ones():
    state = {"workers": [worker("t1-worker-1")], "demand": []}
    # below the minimum (worker-0 was preempted and deleted): one more
    assert autoscale.plan(state, [], SETTINGS, now=100.0) == (1, [], 0)
    # one stopped (preempted without delete) goes, and another comes
    create, delete, _ = autoscale.plan(state, vm_rows("t1-worker-1", status="TERMINATED"), SETTINGS, now=100.0)
    assert create == 1 and [d[1] for d in delete] == ["t1-worker-1"]
    # one that never joined is given up on after BOOT_LIMIT
    late = autoscale.BOOT_LIMIT + 1
    create, delete, booting = autoscale.plan(state, vm_rows("t1-worker-0", created=0.0), SETTINGS, now=late)
    assert create == 1 and delete == [("us-central1-a", "t1-worker-0", "it did not join within 15 minutes")]


def test_autoscaler_past_the_workers_a_state_lists():
    """A STATE names the busiest 1,000 workers: a VM it does not name is not taken for one that never joined."""
    state = {"workers": [worker("t1-worker-0", busy=4)], "nworkers": 1500, "demand": []}
    late = autoscale.BOOT_LIMIT + 1
    assert autoscale.plan(state, vm_rows("t1-worker-0", "t1-worker-1"), SETTINGS, now=late) == (0, [], 0)


def test_autoscaler_shrinks_idle_workers_to_what_is_needed():
    settings = dict(SETTINGS, min=1, idle_minutes=1)
    names = ["t1-worker-0", "t1-worker-1", "t1-worker-2"]
    state = {"workers": [worker(names[0], idle=300), worker(names[1], idle=30), worker(names[2], idle=90)],
             "demand": []}
    create, delete, _ = autoscale.plan(state, vm_rows(*names), settings, now=100.0)
    assert create == 0 and [d[1] for d in delete] == [names[0], names[2]]  # idle > 1 minute, longest first
    assert delete[0][2] == "idle for 5.0 minutes"
    state["workers"][1]["idle"] = 120  # all idle: the minimum stays
    assert len(autoscale.plan(state, vm_rows(*names), settings, now=100.0)[1]) == 2
    state["workers"][0]["busy"] = 1  # busy ones stay
    assert [d[1] for d in autoscale.plan(state, vm_rows(*names), settings, now=100.0)[1]] == [names[1], names[2]][:2]
    state["demand"] = [[8, 1.0, 0, 1, 1.0]]  # work that needs 2 VMs keeps 2
    assert [d[1] for d in autoscale.plan(state, vm_rows(*names), settings, now=100.0)[1]] == [names[1]]
    assert autoscale.plan(state, vm_rows(*names), dict(settings, idle_minutes=None), now=100.0)[1] == []


def test_broker_reports_demand_and_tells_growing_jobs(new_cluster, capfd):
    """STATE carries every job's demand and the autoscaler's CAPACITY; a job with grow=True hears of the VMs."""
    import burla

    new_cluster.start_worker("w", 1)
    new_cluster.wait_for(1)
    seen, job = [], {}

    def run():
        job["out"] = burla.remote_parallel_map(time.sleep, [0.4] * 6, cluster=new_cluster.address, spinner=False,
                                               grow=True)

    thread = threading.Thread(target=run)
    thread.start()
    deadline = time.monotonic() + 10
    while not (state := cluster_state(new_cluster.address))["demand"]:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    want, cpu, gpus, grow, age = state["demand"][0]
    assert (cpu, gpus, grow) == (1, 0, 1) and 1 <= want <= 6  # (some may have run already)
    state = cluster_state(new_cluster.address, capacity={"b": 3, "n": 4, "mx": 9})
    assert state["scaling"]["b"] == 3 and state["scaling"]["mx"] == 9
    seen.append(state)
    thread.join(20)
    assert job["out"] == [None] * 6
    assert "burla: waiting for 3 VMs to boot" in capfd.readouterr().err  # (the job's own progress line)
    with pytest.raises(ValueError, match="grow must be True or False"):
        burla.remote_parallel_map(time.sleep, [0], cluster=new_cluster.address, grow="yes")


def test_careless_up_is_refused_before_any_vm(fake, compute, tmp_path):
    for kwargs, message in [(dict(workers=3, max_workers=2), r"--workers \(3\) <= --max-workers \(2\)"),
                            (dict(workers=1, min_workers=2), r"--min-workers \(2\) <= --workers \(1\)"),
                            (dict(python="3.9"), "can run Python 3.11, 3.12, 3.13, not 3.9"),
                            (dict(machine_type="n9-huge-1"), "machineTypes/n9-huge-1' was not found")]:
        with pytest.raises(gce.CloudError, match=message):
            up(compute, tmp_path, **kwargs)
    assert fake.vms() == [] and not any(m == "POST" for m, _ in fake.requests)


def test_cluster_status_json(fake, cli_env, capsys):
    import json

    assert cli("up", "--zone", "us-central1-a", "--workers", "1", "--wait-minutes", "0") == 0
    capsys.readouterr()
    assert cli("status", "--json") == 0
    rows = json.loads(capsys.readouterr().out)
    assert [(r["name"], r["role"], r["joined"]) for r in rows] == [("burla-head", "head", False),
                                                                   ("burla-worker-0", "worker", False)]
    assert rows[1]["machine_type"] == "n2-standard-4" and rows[1]["cost"] is not None
    assert cli("status") == 0
    table = capsys.readouterr().out
    assert "SLOTS" in table and "cost so far about $" in table and "the broker did not answer" in table


def test_up_waits_for_every_slot_of_a_worker_and_names_one_that_lacks_some(fake, compute, tmp_path, new_cluster):
    """A worker's slots dial one by one after it registers: `up` counts a worker joined once all have, so a job
    right after it has every slot; one that never gets them all is named with its count."""
    import zmq

    from burla import protocol as P

    up(compute, tmp_path)
    ctx = zmq.Context()
    socks = []
    try:
        for worker, ready in (("t1-worker-0", 2), ("t1-worker-1", 1)):
            sock = ctx.socket(zmq.DEALER)
            sock.connect(new_cluster.address)
            P.send(sock, P.REGISTER, {"w": worker, "host": worker, "slots": 2, "cpu": 2, "ram": 8})
            socks.append(sock)
            for k in range(ready):
                slot = ctx.socket(zmq.DEALER)
                slot.connect(new_cluster.address)
                P.send(slot, P.READY, {"w": worker, "s": P.slot_name(worker, k), "k": 1})
                socks.append(slot)
        new_cluster.wait_for(2, slots=3)
        fake.booter = types.SimpleNamespace(serial=lambda zone, name: f"the serial output of {name}")
        said, done = [], threading.Event()

        def beat():  # (the broker drops a worker that stops sending heartbeats)
            while not done.wait(0.2):
                for sock, worker in ((socks[0], "t1-worker-0"), (socks[3], "t1-worker-1")):
                    P.send(sock, P.HEARTBEAT, {"w": worker})

        beating = threading.Thread(target=beat)
        beating.start()
        try:
            with pytest.raises(gce.CloudError) as e:
                gce.wait_until_joined(compute, "t1", new_cluster.address, None, 2, 1, said.append)
        finally:
            done.set()
            beating.join()
        assert "only 1 of 2 workers joined" in str(e.value) and "(t1-worker-1 has 1 of its 2 slots)" in str(e.value)
        assert str(e.value).endswith("t1-worker-1's boot (`gcloud compute instances get-serial-port-output t1-worker-1 "
                                     "--zone us-central1-a`):\nthe serial output of t1-worker-1")
        assert said[-1].endswith("1/2 joined; broker answers"), said
    finally:
        for sock in socks:
            sock.close(0)
        ctx.term()
