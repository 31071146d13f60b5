"""Broker, two workers and a client on four separate hosts (network namespaces), over TCP."""

import json
import os
import subprocess
import sys
import time

import pytest

import netns
from conftest import HERE

pytestmark = pytest.mark.skipif(not netns.available(), reason="needs root and iproute2 for network namespaces")

CLIENT = """
import json, os, sys, time
from burla import remote_parallel_map

def where(x):
    print(f"call {x}")
    time.sleep(0.05)
    return x * 2, os.getppid()

out = remote_parallel_map(where, range(40), cluster=sys.argv[1], spinner=False)
# large, compressible inputs and results cross the network blosc2-compressed
big = remote_parallel_map(lambda b: b + b"!", [bytes(4 << 20)] * 3, cluster=sys.argv[1], spinner=False)
assert [len(b) for b in big] == [(4 << 20) + 1] * 3 and big[0][-2:] == bytes(1) + b"!"
print(json.dumps(out))
"""


@pytest.fixture
def network():
    net = netns.Network(["head", "w1", "w2", "client"])
    try:
        yield net
    finally:
        net.close()


def test_job_runs_across_hosts(network, tmp_path):
    address = f"tcp://{network.address('head')}:5555"
    env = dict(os.environ, PYTHONPATH=HERE, BURLA_HEARTBEAT_INTERVAL="0.5")
    network.python("head", "-m", "burla", "broker", "--bind", "tcp://0.0.0.0:5555", env=env)
    workers = {name: network.python(name, "-m", "burla", "worker", "--broker", address, "--slots", "2",
                                    "--name", name, env=env) for name in ("w1", "w2")}
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
    client = network.python("client", str(script), address, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    out, err = client.communicate(timeout=60)
    assert client.returncode == 0, err
    lines = out.splitlines()
    results = json.loads(lines[-1])
    assert [r[0] for r in results] == [x * 2 for x in range(40)]
    assert sorted(lines[:-1]) == sorted(f"call {x}" for x in range(40))  # streamed from the workers' hosts
    assert {r[1] for r in results} == {workers["w1"].pid, workers["w2"].pid}  # both hosts did work

    human = subprocess.run(["ip", "netns", "exec", network.hosts["client"][0], sys.executable, "-m", "burla",
                            "status", "--cluster", address], capture_output=True, text=True, timeout=20, env=env)
    assert "2 workers" in human.stdout and "worker w1" in human.stdout
