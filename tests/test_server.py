"""The Jupyter server extension behind the JupyterLab panel, in a real Jupyter server against a real cluster: its
state and log stream, cancelling a job, detached jobs in the state, a job's history (series, timeline, failures),
starting the server's own cluster (again at the same address), and authentication on every endpoint. The
manager's bounds on a job's history are checked on their own, with states written here."""

import asyncio
import json
import os
import threading
import time

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
            assert message["total"] == len(lines)  # the job's count after the batch: nothing was skipped
            job_id = message["job"]
        else:
            states.append(message)
            if lines:  # every line a state counts was pushed before it
                assert message["lines"][job_id] == len(lines), (message["lines"], len(lines))
    job.join(10)
    assert sorted(lines, key=lambda t: int(t.split()[1])) == [f"line {i}" for i in range(50)]
    finished = states[-1]["state"]["recent"][0]
    assert finished["state"] == "done" and finished["done"] == 50 and finished["failed"] == 0
    assert states[-1]["lines"][finished["id"]] == 50
    logs = json.loads((await jp_fetch("burla", "jobs", finished["id"], "logs")).body)
    assert len(logs["lines"]) == 50 and logs["total"] == 50  # kept for a panel that opens the job later
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
    for method, path in [("GET", "state"), ("GET", "jobs/00/logs"), ("GET", "jobs/00/history"), ("POST", "cluster"),
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
        assert manager.cluster() == {"address": None, "embedded": False, "connected": False, "hint": None}
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
        stopped = manager.stop_embedded()
        assert stopped["address"] is None and "BURLA_CLUSTER" not in os.environ
        assert "still point at it" in stopped["hint"]  # (the kernels that got the address are told)
        socket_path = started["address"][len("ipc://"):]
        assert not os.path.exists(socket_path) and os.path.isdir(os.path.dirname(socket_path))
        # Started again: the same address, so a kernel that got it in the first run reaches this one.
        again = manager.start_embedded()
        assert again["address"] == started["address"] and os.environ["BURLA_CLUSTER"] == started["address"]
        assert oct(os.stat(os.path.dirname(socket_path)).st_mode & 0o777) == "0o700"
        deadline = loop.time() + 10
        while not (manager.cluster()["connected"] and manager.state["workers"]):
            assert loop.time() < deadline
            await asyncio.sleep(0.05)
        result = await loop.run_in_executor(None, lambda: remote_parallel_map(
            abs, range(-3, 3), cluster=started["address"], spinner=False))
        assert result == [3, 2, 1, 0, 1, 2]
        manager.stop_embedded()
    finally:
        manager.close()


async def test_history_of_a_job(jp_fetch, panel_cluster):
    """What the panel draws of a real job: its series (done over time, busy slots of its worker), a bar per result
    on its timeline, and its failed inputs with the lines each printed."""
    body = await state_when(jp_fetch, lambda b: b["cluster"]["connected"])
    before = {j["id"] for j in body["state"]["recent"]}

    def shaky(x):
        import time

        print(f"input {x} starts")
        time.sleep(0.05)
        if x in (3, 17):
            raise KeyError(f"no tile {x}")
        return x

    results = await asyncio.get_running_loop().run_in_executor(None, lambda: remote_parallel_map(
        shaky, range(40), cluster=panel_cluster.address, spinner=False, return_exceptions=True))
    assert [type(r).__name__ for r in results].count("KeyError") == 2
    body = await state_when(jp_fetch, lambda b: {j["id"] for j in b["state"]["recent"]} - before)
    (job,) = [j for j in body["state"]["recent"] if j["id"] not in before]
    assert "bars" not in job and "failures" not in job  # (the pushes stay light: the history has them)
    history = json.loads((await jp_fetch("burla", "jobs", job["id"], "history")).body)
    points = history["points"]
    assert history["ended"] and len(points) >= 2 and points[-1][1] == 40 and points[-1][2] == 2
    assert history["workers"] == ["w1"] and max(p[4] for p in points) > 0  # busy slots of w1 over time
    assert all(a[0] <= b[0] and a[1] <= b[1] for a, b in zip(points, points[1:]))
    # (the results of the job's last quarter second can miss the timeline: the broker lists bars while it runs)
    assert 30 <= sum(b[3] for b in history["bars"]) <= 40
    assert {b[0].split("/")[0] for b in history["bars"]} == {"w1"}
    failures = {f["i"]: f for f in history["failures"]}
    assert sorted(failures) == [3, 17]
    assert failures[3]["type"].endswith("KeyError") and "no tile 3" in failures[3]["msg"]
    assert "in shaky" in failures[3]["tb"]
    assert failures[17]["lines"] == [["w1", 1, "input 17 starts"]]


# ------------------------------------------------------------------------------------------ bounds, on their own


def record(job="aa" * 8, **fields):
    now = time.time()
    base = {"id": job, "name": "f", "state": "running", "done": 0, "failed": 0, "submitted": 0, "total": None,
            "queued": 0, "slots": 0, "started": now, "elapsed": 0.0, "finished": None, "detached": 0,
            "attached": 1, "reason": None, "workers": []}
    return dict(base, **fields)


@pytest.fixture
def manager(monkeypatch):
    from burla_jupyter.manager import Manager

    monkeypatch.setenv("BURLA_CLUSTER", "")
    manager = Manager()  # (no cluster: its thread idles, and the test feeds it states)
    yield manager
    manager.close()


def test_history_of_a_big_job_stays_bounded(manager):
    """100,000 calls in 4,000 states (1,000 s at 4 a second), 64 results in each state's bars, 20 workers: the
    history keeps a few hundred points and at most MAX_BARS bars over the whole span, and it costs little."""
    from burla import protocol as P
    from burla_jupyter import manager as m

    started, seq = 1_000_000.0, 0
    workers = [{"id": f"w{k}", "busy": 4} for k in range(20)]
    clock = time.perf_counter()
    for n in range(4000):
        bars = []
        for _ in range(25):
            seq += 1
            t = started + n * 0.25
            bars.append([seq, f"w{seq % 20}/{seq % 4}", t - 0.2, t, 1, int(seq % 1000 == 0)])
        state = {"workers": workers, "nworkers": 20, "recent": [],
                 "jobs": [record(done=25 * n, failed=seq // 1000, total=100_000, slots=80, started=started,
                                 elapsed=n * 0.25, workers=[w["id"] for w in workers], bars=bars[-64:])]}
        manager.receive(P.STATE, state, [])
    per_state = (time.perf_counter() - clock) / 4000
    history = manager.job_history("aa" * 8)
    assert len(history["points"]) <= m.SERIES_POINTS and history["step"] >= 999 / m.SERIES_POINTS
    assert len(history["bars"]) <= m.MAX_BARS and history["missed"] == 0
    assert sum(b[3] for b in history["bars"]) == 100_000 and sum(b[4] for b in history["bars"]) == 100
    spans = [b[1] for b in history["bars"]]
    assert min(spans) <= started and max(b[2] for b in history["bars"]) >= started + 999  # the whole span
    assert len(history["workers"]) == m.SERIES_WORKERS + 1 and history["workers"][-1] == "other"
    assert history["points"][-1][4] == 4 and history["points"][-1][-1] == 4 * (20 - m.SERIES_WORKERS)
    assert history["points"][-1][1] == 25 * 3999
    assert len(json.dumps(history)) < 200_000
    print(f"{per_state * 1e3:.3f} ms a state")
    assert per_state < 0.005
    assert manager.state["jobs"][0].get("bars") is None  # (what the pages get)


def test_failed_inputs_keep_their_lines(manager):
    from burla import protocol as P
    from burla_jupyter import manager as m

    job = "bb" * 8
    manager.receive(P.LOG, {"j": bytes.fromhex(job), "w": "w1/0", "l": [[7, 1, "seven"], [8, 1, "eight"]]}, [])
    manager.receive(P.LOG, {"j": bytes.fromhex(job), "w": "w2/1", "l": [[7, 2, "oops"]]}, [])
    failure = {"i": 7, "type": "builtins.ValueError", "msg": "bad", "tb": "Traceback ...\nValueError: bad"}
    manager.receive(P.STATE, {"workers": [], "recent": [], "jobs": [record(job, failed=1, failures=[failure])]}, [])
    manager.receive(P.LOG, {"j": bytes.fromhex(job), "w": "w2/1", "l": [[7, 2, "after"], [9, 1, "nine"]]}, [])
    (kept,) = manager.job_history(job)["failures"]
    assert kept == dict(failure, lines=[["w1", 1, "seven"], ["w2", 2, "oops"], ["w2", 2, "after"]])
    history = manager.histories[job]
    assert set(history.lines) == {8, 9}  # the others wait, in case they fail
    # bounded: the inputs whose lines wait, the lines of one input, the failures kept
    for i in range(m.INPUTS_KEPT + 10):
        manager.receive(P.LOG, {"j": bytes.fromhex(job), "w": "w1/0", "l": [[100 + i, 1, "x"]] * 3}, [])
    manager.receive(P.LOG, {"j": bytes.fromhex(job), "w": "w1/0", "l": [[7, 1, "more"]] * 100}, [])
    assert len(history.lines) == m.INPUTS_KEPT and 8 not in history.lines
    many = [dict(failure, i=1000 + k) for k in range(m.MAX_FAILURES + 5)]
    manager.receive(P.STATE, {"workers": [], "recent": [], "jobs": [record(job, failures=[failure, *many])]}, [])
    failures = manager.job_history(job)["failures"]
    assert len(failures) == m.MAX_FAILURES and len(failures[0]["lines"]) == m.INPUT_LINES
    # the job ends: no more lines wait; then the broker forgets it, and so does the history
    ended = record(job, state="done", finished=time.time())
    manager.receive(P.STATE, {"workers": [], "jobs": [], "recent": [ended]}, [])
    assert manager.job_history(job)["ended"] and not history.lines
    manager.receive(P.STATE, {"workers": [], "jobs": [], "recent": []}, [])
    assert job not in manager.histories and manager.job_history(job)["points"] == []


def test_histories_are_kept_for_a_bounded_number_of_jobs(manager):
    from burla import protocol as P
    from burla_jupyter import manager as m

    jobs = [record(f"{k:016x}") for k in range(m.HISTORY_JOBS + 20)]
    manager.receive(P.STATE, {"workers": [], "recent": [], "jobs": jobs}, [])
    assert len(manager.histories) == m.HISTORY_JOBS
    ended = [record(f"{k:016x}", state="done") for k in range(1000, 1010)]  # never seen running: nothing to draw
    manager.receive(P.STATE, {"workers": [], "jobs": [], "recent": ended}, [])
    assert not manager.histories
