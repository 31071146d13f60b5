"""The Jupyter server extension behind the JupyterLab panel, in a real Jupyter server against a real cluster: its
state and log stream, cancelling a job, detached jobs in the state, starting the server's own cluster, and
authentication on every endpoint."""

import asyncio
import json
import os
import threading

import pytest
import tornado
from tornado.httpclient import HTTPClientError

from burla import remote_parallel_map
from burla.errors import JobCancelledError


@pytest.fixture
def panel_cluster(cluster, monkeypatch):
    monkeypatch.setenv("BURLA_CLUSTER", cluster.address)
    return cluster


@pytest.fixture
def jp_server_config(panel_cluster):  # (the cluster first: the extension reads BURLA_CLUSTER when it loads)
    return {"ServerApp": {"jpserver_extensions": {"burla_jupyter": True}}}


async def state_when(jp_fetch, ready, timeout=10):
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        body = json.loads((await jp_fetch("burla", "state")).body)
        if ready(body):
            return body
        assert loop.time() < deadline, body
        await asyncio.sleep(0.05)


async def test_state_and_log_stream(jp_fetch, jp_ws_fetch, panel_cluster):
    body = await state_when(jp_fetch, lambda b: b["cluster"]["connected"])
    assert body["cluster"]["address"] == panel_cluster.address and not body["cluster"]["embedded"]
    assert [w["id"] for w in body["state"]["workers"]] == ["w1"]

    ws = await jp_ws_fetch("burla", "events")
    first = json.loads(await ws.read_message())
    assert first["type"] == "state" and first["cluster"]["connected"]

    def shout(x):
        print(f"line {x}")
        return x

    job = threading.Thread(target=remote_parallel_map, args=(shout, range(50)),
                           kwargs={"cluster": panel_cluster.address, "spinner": False})
    job.start()
    lines, states = [], []
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 20
    while len(lines) < 50 or not any(s["state"]["recent"] for s in states):
        assert loop.time() < deadline, (len(lines), states[-1:] if states else None)
        message = json.loads(await asyncio.wait_for(ws.read_message(), 10))
        if message["type"] == "logs":
            lines += [text for worker, stream, text in message["lines"]]
            assert all(worker == "w1" and stream == 1 for worker, stream, _ in message["lines"])
        else:
            states.append(message)
    job.join(10)
    assert sorted(lines, key=lambda t: int(t.split()[1])) == [f"line {i}" for i in range(50)]
    finished = states[-1]["state"]["recent"][0]
    assert finished["state"] == "done" and finished["done"] == 50 and finished["failed"] == 0
    logs = json.loads((await jp_fetch("burla", "jobs", finished["id"], "logs")).body)
    assert len(logs["lines"]) == 50  # kept for a panel that opens the job later
    ws.close()


async def test_cancel_a_job_from_the_panel(jp_fetch, panel_cluster):
    await state_when(jp_fetch, lambda b: b["cluster"]["connected"])
    outcome = {}

    def long_job():
        try:
            remote_parallel_map(__import__("time").sleep, [5] * 20, cluster=panel_cluster.address, spinner=False)
        except BaseException as e:
            outcome["error"] = e

    thread = threading.Thread(target=long_job)
    thread.start()
    body = await state_when(jp_fetch, lambda b: b["state"] and any(j["slots"] for j in b["state"]["jobs"]))
    job_id = body["state"]["jobs"][0]["id"]
    await jp_fetch("burla", "jobs", job_id, "cancel", method="POST", body="{}")
    await asyncio.get_running_loop().run_in_executor(None, thread.join, 10)
    assert isinstance(outcome.get("error"), JobCancelledError)
    body = await state_when(jp_fetch, lambda b: not b["state"]["jobs"] and b["state"]["recent"])
    assert body["state"]["recent"][0]["state"] == "cancelled"
    assert sum(w["busy"] for w in body["state"]["workers"]) == 0

    with pytest.raises(HTTPClientError) as missing:
        await jp_fetch("burla", "jobs", "00" * 8, "cancel", method="POST", body="{}")
    assert missing.value.code == 404


async def test_state_lists_detached_jobs_that_ended(jp_fetch, panel_cluster):
    """What the panel's "attach in a new cell" is offered for: a detached job, among the ended jobs, marked so."""
    await state_when(jp_fetch, lambda b: b["cluster"]["connected"])

    def double(x):
        return 2 * x

    def detached_job():
        job = remote_parallel_map(double, range(7), detach=True, cluster=panel_cluster.address)
        return job.id, job.result(timeout=60, spinner=False)

    job_id, results = await asyncio.get_running_loop().run_in_executor(None, detached_job)
    assert results == [2 * x for x in range(7)]
    body = await state_when(jp_fetch, lambda b: any(j["id"] == job_id for j in b["state"]["recent"]))
    record = [j for j in body["state"]["recent"] if j["id"] == job_id][0]
    assert (record["state"], record["done"], record["total"], record["detached"]) == ("done", 7, 7, 1)
    assert not any(j["id"] == job_id for j in body["state"]["jobs"])


async def test_every_endpoint_needs_authentication(jp_fetch, jp_base_url, jp_http_port, panel_cluster):
    client = tornado.httpclient.AsyncHTTPClient()
    base = f"http://localhost:{jp_http_port}{jp_base_url}burla"
    for method, path in [("GET", "state"), ("GET", "jobs/00/logs"), ("POST", "cluster"),
                         ("POST", "jobs/00/cancel"), ("GET", "events")]:
        response = await client.fetch(f"{base}/{path}", method=method, body="{}" if method == "POST" else None,
                                      raise_error=False, follow_redirects=False)
        assert response.code in (401, 403), (path, response.code)
    with pytest.raises(Exception) as refused:
        await tornado.websocket.websocket_connect(f"ws://localhost:{jp_http_port}{jp_base_url}burla/events")
    assert "403" in str(refused.value)
    assert (await jp_fetch("burla", "state")).code == 200  # and with Jupyter's token, they answer


async def test_start_and_stop_the_servers_own_cluster(jp_fetch, monkeypatch):
    """The manager (what the panel's buttons call) with no cluster configured."""
    from burla_jupyter.manager import Manager

    with pytest.raises(HTTPClientError) as bad:
        await jp_fetch("burla", "cluster", method="POST", body=json.dumps({"action": "explode"}))
    assert bad.value.code == 400
    monkeypatch.setenv("BURLA_CLUSTER", "")
    manager = Manager()
    try:
        assert manager.cluster() == {"address": None, "embedded": False, "connected": False}
        with pytest.raises(ValueError):
            manager.stop_embedded()
        started = manager.start_embedded()
        assert started["embedded"] and started["address"].startswith("ipc://")
        assert os.environ["BURLA_CLUSTER"] == started["address"]  # the kernels started from now on use it
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 10
        while not (manager.cluster()["connected"] and manager.state["workers"]):
            assert loop.time() < deadline
            await asyncio.sleep(0.05)
        assert manager.stop_embedded()["address"] is None and "BURLA_CLUSTER" not in os.environ
    finally:
        manager.close()
