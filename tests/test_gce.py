"""`burla cluster up/down/status` against a local fake of the Compute Engine REST API (tests/fake_gce.py), with
google-cloud-compute pointed at it and anonymous credentials. No test touches Google Cloud."""

import base64
import io
import os
import subprocess
import sys
import tarfile
import threading
import time

import pytest

from fake_gce import FakeCompute

from burla import config, gce
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
                   compute=compute, say=lambda text: None)
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
    assert "docker run" in worker_md["startup-script"] and "gce-container-declaration" not in worker_md
    with tarfile.open(fileobj=io.BytesIO(base64.b64decode(metadata(head)["burla-broker-state"]))) as tar:
        assert sorted(tar.getnames()) == ["api_keys", "broker.secret", "worker_tokens"]

    # the client now uses the cluster
    assert address == f"tcp://{head['networkInterfaces'][0]['accessConfigs'][0]['natIP']}:5555"
    assert config.cluster_address() == address and config.api_key() == keys.api_keys[0]

    rows = gce.status("proj", "t1", compute=compute)
    assert [(r[0], r[1], r[3]) for r in rows] == [("t1-head", "head", "RUNNING"), ("t1-worker-0", "worker", "RUNNING"),
                                                  ("t1-worker-1", "worker", "RUNNING")]
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
    assert "cleaning up the 3 VM(s) this command made or tried to make" in said
    deletes = [p for m, p in fake.requests if m == "DELETE"]  # (the refused one is not found: fine)
    assert sorted(p.rsplit("/", 1)[1] for p in deletes) == ["t1-head", "t1-worker-0", "t1-worker-1"]


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


def test_cli_against_the_fake(fake, tmp_path):
    env = dict(os.environ, BURLA_GCE_ENDPOINT=fake.endpoint, BURLA_CONFIG=str(tmp_path / "config.toml"),
               HOME=str(tmp_path))
    run = lambda *args: subprocess.run([sys.executable, "-m", "burla", "cluster", *args, "--project", "proj"],  # noqa: E731
                                       capture_output=True, text=True, env=env, timeout=60)
    fake.exhausted.add("us-central1-a")
    failed = run("up", "--zone", "us-central1-a", "--workers", "1")
    assert failed.returncode == 1 and "burla cluster up: no room for it" in failed.stderr
    done = run("up", "--zone", "us-central1-a", "--workers", "1", "--zone-fallback")
    assert done.returncode == 0, done.stderr
    assert "cluster burla is up: tcp://203.0.113." in done.stdout
    status = run("status")
    assert "burla-head" in status.stdout and "burla-worker-0" in status.stdout and "RUNNING" in status.stdout
    assert run("down").stdout.strip().endswith("deleted 2 VM(s) of cluster burla")
    assert "no VMs" in run("status").stdout


def test_reaper_deletes_idle_workers_only(fake, compute, tmp_path, new_cluster):
    up(compute, tmp_path, workers=2)
    # workers join under their VM's name (the startup script passes --name "$(hostname)")
    new_cluster.start_worker("t1-worker-0", 1)
    new_cluster.start_worker("t1-worker-1", 1)
    new_cluster.wait_for(2)
    state = lambda: cluster_state(new_cluster.address)  # noqa: E731
    busy = threading.Thread(target=lambda: __import__("burla").remote_parallel_map(
        time.sleep, [3], cluster=new_cluster.address, spinner=False))
    busy.start()
    deadline = time.monotonic() + 10
    while sum(w["busy"] for w in state()["workers"]) == 0:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    idle_since = {}
    # the reaper's clock is given, so the test does not wait for it (nor race the busy call's end)
    assert gce.reap("proj", "t1", 0.5, state, compute=compute, idle_since=idle_since, now=100.0) == []  # idle from now
    deleted = gce.reap("proj", "t1", 0.5, state, compute=compute, idle_since=idle_since, now=100.6)
    assert len(deleted) == 1  # the idle one; the busy one stays, and so does the head
    busy_worker = next(w["id"] for w in state()["workers"] if w["busy"])
    assert sorted(v["name"] for v in fake.vms()) == sorted(["t1-head", busy_worker])
    busy.join(10)
