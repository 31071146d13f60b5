"""A client on a host of its own (a network namespace) whose link goes down mid-job: for 30 s it gets every
result and log line exactly once when the link is back; for longer than its job's lease, it is told the job was
cancelled. The link is cut at the bridge, as a Wi-Fi drop would: the client's interface stays up."""

import os
import re
import subprocess
import textwrap
import time

import pytest

import netns
from conftest import HERE

pytestmark = pytest.mark.skipif(not netns.available(), reason="needs root and iproute2 for network namespaces")

CLIENT = """
import sys, time
from burla import remote_parallel_map
from test_outages import noisy
try:
    for x in remote_parallel_map(noisy, range(200), cluster=sys.argv[1], generator=True):
        print(f"R {x}", flush=True)
    print("DONE", flush=True)
except Exception as e:
    print("ERROR", type(e).__name__, e, flush=True)
"""


def noisy(x):
    print(f"call {x}")
    time.sleep(0.1)
    return x


@pytest.fixture
def hosts(tmp_path):
    net = netns.Network(["head", "w1", "client"])
    try:
        address = f"tcp://{net.address('head')}:5555"
        env = dict(os.environ, PYTHONPATH=HERE, BURLA_HEARTBEAT_INTERVAL="0.5")
        broker = net.python("head", "-m", "burla", "broker", "--bind", "tcp://0.0.0.0:5555", "--state-dir",
                            str(tmp_path / "broker"), env=env, stdout=subprocess.PIPE, text=True)
        banner = "".join(broker.stdout.readline() for _ in range(3))
        env["BURLA_API_KEY"] = re.search(r"--api-key (\S+)", banner).group(1)
        token = re.search(r"BURLA_WORKER_TOKEN=(\S+)", banner).group(1)
        net.python("w1", "-m", "burla", "worker", "--broker", address, "--slots", "2", "--name", "w1",
                   env=dict(env, BURLA_WORKER_TOKEN=token))
        yield net, address, env
    finally:
        net.close()


def link(net, up):
    netns.ip("link", "set", "p3", "up" if up else "down", ns=net.hub)  # the client's port on the bridge


def run_with_outage(net, address, env, seconds, lease=None):
    """Start the client, cut its link after its 20th result for `seconds`, and return its (stdout, stderr)."""
    if lease is not None:
        env = dict(env, BURLA_JOB_LEASE=str(lease))
    client = net.python("client", "-c", textwrap.dedent(CLIENT), address, env=env, stdout=subprocess.PIPE,
                        stderr=subprocess.PIPE, text=True)
    lines = []
    deadline = time.monotonic() + 60
    while sum(line.startswith("R ") for line in lines) < 20 and time.monotonic() < deadline:
        line = client.stdout.readline()
        if not line:
            break
        lines.append(line.rstrip("\n"))
    link(net, False)
    time.sleep(seconds)
    link(net, True)
    out, err = client.communicate(timeout=120)
    return lines + out.splitlines(), err


def test_a_30_s_outage_loses_nothing_and_repeats_nothing(hosts):
    net, address, env = hosts
    out, err = run_with_outage(net, address, env, 30)
    assert out[-1] == "DONE", (out[-5:], err[-2000:])
    results = [int(line[2:]) for line in out if line.startswith("R ")]
    calls = [int(line[5:]) for line in out if line.startswith("call ")]
    assert sorted(results) == list(range(200))  # every result, once
    assert sorted(calls) == list(range(200))  # every log line, once
    assert "reconnecting" in err


def test_an_outage_past_the_lease_cancels_the_job_and_the_client_is_told(hosts):
    net, address, env = hosts
    out, err = run_with_outage(net, address, env, 9, lease=3)
    assert out[-1].startswith("ERROR JobExpiredError") and "lease (3 s" in out[-1], (out[-5:], err[-2000:])
