"""Broker, two workers and a client on four separate hosts (network namespaces), over TCP."""

import json
import os
import re
import subprocess
import sys
import time

import psutil
import pytest

import netns
from conftest import HERE

pytestmark = pytest.mark.skipif(not netns.available(), reason="needs root and iproute2 for network namespaces")

CLIENT = """
import json, os, sys, time
from burla import remote_parallel_map
import helpers  # a module beside this script, which the worker hosts do not have: it travels by value

def where(x):
    print(f"call {x}")
    time.sleep(0.05)
    return helpers.double(x), os.getppid()

out = remote_parallel_map(where, range(40), cluster=sys.argv[1], spinner=False)
# large, compressible inputs and results cross the network blosc2-compressed
big = remote_parallel_map(lambda b: b + b"!", [bytes(4 << 20)] * 3, cluster=sys.argv[1], spinner=False)
assert [len(b) for b in big] == [(4 << 20) + 1] * 3 and big[0][-2:] == bytes(1) + b"!"
print(json.dumps(out))
"""


def start_cluster(network, tmp_path):
    """A CURVE broker on the head host and a worker on w1 and w2 (joining with the broker's token); returns the
    address, the environment for clients (with the API key) and the worker processes."""
    address = f"tcp://{network.address('head')}:5555"
    env = dict(os.environ, PYTHONPATH=HERE, BURLA_HEARTBEAT_INTERVAL="0.5")
    broker = network.python("head", "-m", "burla", "broker", "--bind", "tcp://0.0.0.0:5555", "--state-dir",
                            str(tmp_path / "broker"), env=env, stdout=subprocess.PIPE, text=True)
    banner = "".join(broker.stdout.readline() for _ in range(3))
    token = re.search(r"BURLA_WORKER_TOKEN=(\S+)", banner).group(1)
    env["BURLA_API_KEY"] = re.search(r"--api-key (\S+)", banner).group(1)
    workers = {name: network.python(name, "-m", "burla", "worker", "--broker", address, "--slots", "2",
                                    "--name", name, env=dict(env, BURLA_WORKER_TOKEN=token))
               for name in ("w1", "w2")}
    return address, env, workers


@pytest.fixture
def network():
    net = netns.Network(["head", "w1", "w2", "client"])
    try:
        yield net
    finally:
        net.close()


def test_job_runs_across_hosts(network, tmp_path):
    address, env, workers = start_cluster(network, tmp_path)
    state = None
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        status = subprocess.run(["ip", "netns", "exec", network.hosts["client"][0], sys.executable, "-m", "burla",
                                 "status", "--cluster", address, "--json"],
                                capture_output=True, text=True, timeout=20, env=env)
        if status.returncode == 0:
            state = json.loads(status.stdout)
            if len(state["workers"]) == 2:
                break
        time.sleep(0.2)
    assert state and sorted(w["id"] for w in state["workers"]) == ["w1", "w2"]

    script = tmp_path / "client.py"
    script.write_text(CLIENT)
    (tmp_path / "helpers.py").write_text("def double(x):\n    return x * 2\n")
    client = network.python("client", str(script), address, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    out, err = client.communicate(timeout=60)
    assert client.returncode == 0, err
    lines = out.splitlines()
    results = json.loads(lines[-1])
    assert [r[0] for r in results] == [x * 2 for x in range(40)]
    assert sorted(lines[:-1]) == sorted(f"call {x}" for x in range(40))  # streamed from the workers' hosts
    # both hosts did work (an executor's parent is its worker, or the worker's zygote when it holds a token)
    worker_pids = {workers["w1"].pid, workers["w2"].pid}
    assert {pid if pid in worker_pids else psutil.Process(pid).ppid() for pid in {r[1] for r in results}} == \
        worker_pids

    human = subprocess.run(["ip", "netns", "exec", network.hosts["client"][0], sys.executable, "-m", "burla",
                            "status", "--cluster", address], capture_output=True, text=True, timeout=20, env=env)
    assert "2 workers" in human.stdout and "worker w1" in human.stdout


LONG_CLIENT = """
import json, os, sys, time
from burla import remote_parallel_map

def where(x):
    time.sleep(0.1)
    return x, os.getppid()

print("start", flush=True)
out = remote_parallel_map(where, range(80), cluster=sys.argv[1], spinner=False)
print(json.dumps(out))
"""


def wait_workers(network, address, env, count, timeout=20):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        status = subprocess.run(["ip", "netns", "exec", network.hosts["client"][0], sys.executable, "-m", "burla",
                                 "status", "--cluster", address, "--json"], capture_output=True, text=True,
                                timeout=20, env=env)
        if status.returncode == 0:
            state = json.loads(status.stdout)
            if len(state["workers"]) == count and sum(w["slots"] for w in state["workers"]) == 2 * count:
                return state
        time.sleep(0.2)
    raise AssertionError(f"never saw {count} workers: {status.stdout} {status.stderr}")


def test_worker_host_cut_off_and_back(network, tmp_path):
    address, env, workers = start_cluster(network, tmp_path)
    wait_workers(network, address, env, 2)
    script = tmp_path / "client.py"
    script.write_text(LONG_CLIENT)
    client = network.python("client", str(script), address, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    assert client.stdout.readline().strip() == "start"
    time.sleep(1.0)
    w2_ns = network.hosts["w2"][0]
    cut = time.monotonic()
    netns.ip("link", "set", "eth0", "down", ns=w2_ns)
    state = wait_workers(network, address, env, 1)
    detected = time.monotonic() - cut
    assert [w["id"] for w in state["workers"]] == ["w1"] and detected < 5
    print(f"link cut: worker declared dead after {detected:.2f} s")
    out, err = client.communicate(timeout=60)
    assert client.returncode == 0, err
    results = json.loads(out.splitlines()[-1])
    assert [r[0] for r in results] == list(range(80))  # every input exactly once, in order
    netns.ip("link", "set", "eth0", "up", ns=w2_ns)
    back = time.monotonic()
    wait_workers(network, address, env, 2, timeout=30)  # the worker rejoins by itself
    print(f"link restored: worker rejoined after {time.monotonic() - back:.2f} s")
    assert workers["w2"].poll() is None
