"""`burla cluster up` against the fake Compute Engine whose VMs boot (tests/fake_vms.py): each VM is a network
namespace that runs its real startup script against a fake metadata server, installs the client's own burla from
a local wheelhouse, and starts the broker and autoscaler (head) or a worker. Jobs then run on those "VMs"."""

import os
import threading
import time

import pytest

import netns
import wheels
from fake_gce import FakeCompute

pytestmark = pytest.mark.skipif(not netns.available(), reason="needs root and iproute2 (ip netns)")


@pytest.fixture(scope="module")
def cloud(tmp_path_factory):
    from fake_vms import Booter

    root = tmp_path_factory.mktemp("vms")
    # burla's requirements (burla itself travels in the VMs' metadata), as the wheel the VMs get names them
    house = wheels.wheelhouse(str(root / "wheelhouse"), [
        r.split(";")[0] for r in __import__("importlib.metadata").metadata.requires("burla") if "extra" not in r])
    booter = Booter(root / "vm", env={"UV_CACHE_DIR": str(root / "uv-cache")})
    fake = FakeCompute(host=booter.host_address, booter=booter)
    booter.env.update(BURLA_GCE_ENDPOINT=fake.endpoint, BURLA_STORAGE_URL=fake.endpoint)
    booter.house = house
    try:
        yield fake, booter
    finally:
        fake.close()
        booter.close()


@pytest.fixture(autouse=True)
def private_config(tmp_path, monkeypatch):
    monkeypatch.setenv("BURLA_CONFIG", str(tmp_path / "config.toml"))


def cluster_up(cloud, tmp_path, name, **kwargs):
    from burla import gce

    fake, booter = cloud
    said = []
    options = dict(project="proj", zone="us-central1-a", workers=2, machine_type="e2-standard-2", name=name,
                   state_root=str(tmp_path / "state"), compute=gce.Compute("proj", endpoint=fake.endpoint),
                   say=said.append, pip_args=f"--no-index --find-links {booter.house}", wait_minutes=1.5,
                   autoscale_interval=0.5)
    options.update(kwargs)
    try:
        address = gce.up(**options)
    except BaseException:
        workers = sorted({e.rsplit("-", 1)[0] for e in os.listdir(booter.root) if e.startswith(f"{name}-worker-")})
        print("\n".join(said), booter.logs(f"{name}-head"), *map(booter.logs, workers), sep="\n")
        raise
    return address, said, options["compute"]


def wait_for(condition, seconds, what, booter=None, *names):
    """Wait for condition(); past the time, fail with the logs of every VM of these names, and what booted."""
    deadline = time.monotonic() + seconds
    while not condition():
        if time.monotonic() > deadline:
            logs = "\n".join(booter.logs(name) for name in names) if booter else ""
            booted = sorted(os.listdir(booter.root)) if booter else []
            what = what() if callable(what) else what
            raise AssertionError(f"{what}: not within {seconds} s (VM folders: {booted})\n{logs}")
        time.sleep(0.2)


def vm_root():
    return os.environ.get("BURLA_ROOT", "")


def test_up_boots_vms_that_run_a_job_and_survive_a_preemption(cloud, tmp_path):
    import burla
    from burla import gce

    fake, booter = cloud
    address, said, compute = cluster_up(cloud, tmp_path, "b1")
    assert any("2/2 joined" in s for s in said), said
    assert any(s.startswith("cost: about $0.20 per hour") for s in said), said  # 3 x e2-standard-2

    # the calls ran in the VMs (their BURLA_ROOT is the VM's), all of them: `up` returned once every slot had
    # joined, and calls of 50 ms each are spread over all four (20 instant ones could all go to the first)
    assert all(w["slots"] == w["of"] == 2 for w in burla.client.cluster_state(address)["workers"])
    roots = burla.remote_parallel_map(lambda _: (__import__("time").sleep(0.05), __import__("os").environ[
        "BURLA_ROOT"])[1], range(20), packages=[], spinner=False)
    assert {os.path.basename(os.path.dirname(r)).rsplit("-", 1)[0] for r in roots} == {"b1-worker-0", "b1-worker-1"}

    # a VM deleted mid-job (what a preemption is): its calls run again elsewhere; every result comes once
    state = lambda: burla.client.cluster_state(address)  # noqa: E731
    first = {w["id"]: w["pid"] for w in state()["workers"]}
    out = {}
    job = threading.Thread(target=lambda: out.update(r=burla.remote_parallel_map(
        lambda x: (__import__("time").sleep(0.25), x)[1], range(40), packages=[], spinner=False)))
    job.start()
    time.sleep(1.5)
    gone = next(i for i in fake.vms() if i["name"] == "b1-worker-0")
    compute.delete(gone["zone"].rsplit("/", 1)[1], "b1-worker-0")
    job.join(60)
    assert out["r"] == list(range(40))
    # the minimum is 2: the autoscaler boots another, which joins with all its slots (the old one's
    # registration can linger until its heartbeats are missed, and a new worker's slots dial one by one)
    seen = []

    def replaced():
        workers = {w["id"]: w for w in state()["workers"]}
        seen[:] = [{k: w.get(k) for k in ("id", "pid", "slots", "busy")} for w in workers.values()]
        return sorted(workers) == ["b1-worker-0", "b1-worker-1"] and \
            workers["b1-worker-0"]["pid"] != first["b1-worker-0"] and all(w["slots"] == 2 for w in workers.values())
    wait_for(replaced, 60, lambda: f"a replacement VM (workers were {first}, now {seen})", booter, "b1-head",
             "b1-worker-0")
    rows = gce.status("proj", "b1", compute=compute, state=state())
    assert [(r["name"], r["joined"]) for r in rows] == [("b1-head", False), ("b1-worker-0", True),
                                                        ("b1-worker-1", True)]
    assert [r["slots"] for r in rows[1:]] == [2, 2] and all(r["cost"] is not None for r in rows), rows
    assert gce.down("proj", "b1", compute=compute) == 3


def test_grow_boots_vms_for_a_job_and_idle_ones_go(cloud, tmp_path, capfd, monkeypatch):
    """A cluster of none but its head grows for a job with grow=True, then shrinks back. Here burla's wheel is
    too big for metadata (the limit lowered), so every VM, those the autoscaler makes too, reads it from the
    cluster's bucket with its own token, and `down` deletes the bucket."""
    import burla
    from burla import bootstrap, gce

    fake, booter = cloud
    monkeypatch.setattr(bootstrap, "WHEEL_LIMIT", 1000)
    address, said, compute = cluster_up(cloud, tmp_path, "b2", workers=0, min_workers=0, max_workers=2,
                                        idle_minutes=0.05)
    assert [v["name"] for v in fake.vms() if v["name"].startswith("b2-")] == ["b2-head"]
    bucket = gce.bucket_name("proj", "b2")
    assert any(f"it goes in gs://{bucket}" in s for s in said) and list(fake.buckets) == [bucket]
    head = next(v for v in fake.vms() if v["name"] == "b2-head")
    head_metadata = {i["key"]: i["value"] for i in head["metadata"]["items"]}
    assert "burla-wheel-0" not in head_metadata and head_metadata["burla-wheel-url"].startswith(f"gs://{bucket}/")
    start = time.monotonic()
    roots = burla.remote_parallel_map(
        lambda x: (__import__("time").sleep(0.3), __import__("os").environ["BURLA_ROOT"])[1], range(16),
        packages=[], grow=True)
    assert len(roots) == 16 and {os.path.basename(os.path.dirname(r)).rsplit("-", 1)[0] for r in roots} <= {
        "b2-worker-0", "b2-worker-1"}
    assert "waiting for 2 VMs to boot" in capfd.readouterr().err
    print(f"grew and ran in {time.monotonic() - start:.1f} s")
    # idle past 3 s: the autoscaler deletes them, down to the minimum (0); the head stays
    wait_for(lambda: [v["name"] for v in fake.vms() if v["name"].startswith("b2-")] == ["b2-head"], 30,
             "idle workers deleted", booter, "b2-head")
    readers = {auth for b, _, auth in fake.storage_reads if b == bucket}
    assert readers == {"Bearer token-of-b2-head", "Bearer token-of-b2-worker-0", "Bearer token-of-b2-worker-1"}
    assert gce.down("proj", "b2", compute=compute) == 1
    assert bucket not in fake.buckets


def test_a_boot_that_fails_says_why(cloud, tmp_path):
    """Workers that cannot install burla never join: `up` stops waiting and shows the end of a worker's boot."""
    from burla import gce

    empty = tmp_path / "empty-wheelhouse"
    empty.mkdir()
    with pytest.raises(gce.CloudError) as failed:
        cluster_up(cloud, tmp_path, "b3", workers=1, wait_minutes=0.15, pip_args=f"--no-index --find-links {empty}")
    text = str(failed.value)
    assert "only 0 of 1 workers joined within 0.15 minutes" in text and "burla cluster down --name b3" in text
    assert "The end of b3-head's boot" in text and "pyzmq" in text  # (the broker never came: the head's boot)
    compute = gce.Compute("proj", endpoint=cloud[0].endpoint)
    assert gce.down("proj", "b3", compute=compute) == 2
