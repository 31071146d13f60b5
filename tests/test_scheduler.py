"""The broker's scheduler driven without sockets: messages in, the messages it sends out recorded."""

import pytest

from burla import protocol as P
from burla.broker.scheduler import Scheduler
from burla.broker.store import Store

CLIENT, WORKER, SLOT = b"client", b"worker", b"slot-0"
JOB = b"J" * 8
DIGEST = P.function_digest([b"function"])  # (the function these tests submit is b"function")


class Wire:
    """Stands in for the socket loop: records what is sent; a peer can be made full or gone."""

    def __init__(self):
        self.sent, self.full, self.gone = [], set(), set()

    def send(self, ident, command, header, payload=(), keep=False, strict=False):
        if ident in self.gone:
            return False
        self.sent.append((ident, command, header, list(payload)))
        return True

    def offer(self, ident, command, header, payload=()):
        if ident in self.gone:
            return "gone"
        if ident in self.full:
            return "full"
        self.sent.append((ident, command, header, list(payload)))
        return "ok"

    def take(self, ident=None, command=None):
        picked = [m for m in self.sent if (ident is None or m[0] == ident) and (command is None or m[1] == command)]
        self.sent = [m for m in self.sent if m not in picked]
        return picked


def cluster(tmp_path, **kwargs):
    wire = Wire()
    store = Store(tmp_path / "jobs", 1 << 30)
    s = Scheduler(wire.send, wire.offer, store=store, **kwargs)
    s.handle(WORKER, None, P.REGISTER, {"w": "w", "slots": 1, "cpu": 4, "ram": 16}, [])
    s.handle(SLOT, None, P.READY, {"w": "w", "s": "w/0", "k": 1}, [])
    return s, wire, store


def submit(s, n, detached=False, **extra):
    header = {"j": JOB, "c": b"c1", "d": DIGEST, "fn": 1, "n": n, "cpu": 1, "ram": 1, **extra}
    if detached:
        header["dt"] = 1
    s.handle(CLIENT, None, P.SUBMIT, header, [b"function"])
    for start in range(n):
        s.handle(CLIENT, None, P.BATCH, {"j": JOB, "i": start, "n": 1, "z": [0]}, [b"input%d" % start])


def run_one(s, wire):
    """Dispatch, and answer the task the slot got with its result."""
    s.dispatch()
    (_, _, task, payload), = wire.take(SLOT, P.TASK)
    s.handle(SLOT, None, P.RESULT, {"j": JOB, "i": task["i"], "o": 0, "k": 1, "f": 1, "z": [0], "w": "w/0"},
             [b"result%d" % task["i"]])
    return task, payload


def test_results_are_numbered_kept_until_acknowledged_and_wait_for_a_full_client(tmp_path):
    s, wire, _ = cluster(tmp_path)
    submit(s, 3)
    s.dispatch()
    assert wire.take(CLIENT, P.ACCEPTED)  # (after the dispatch the SUBMIT's batches were in time for)
    task, payload = run_one(s, wire)
    assert payload == [b"function", b"input0"]  # (the function goes with a slot's first task of the job)
    (_, _, result, frames), = wire.take(CLIENT, P.RESULT)
    assert (result["q"], result["n"], frames) == (1, 1, [b"result0"])
    job = s.jobs[JOB]
    assert len(job.outbox.mem) == 1
    s.handle(CLIENT, None, P.ACK, {"j": JOB, "q": 1}, [])
    assert len(job.outbox.mem) == 0
    wire.full.add(CLIENT)  # the client stops reading: its entries wait, in order
    run_one(s, wire)
    assert not wire.take(CLIENT, P.RESULT) and JOB in s.behind
    wire.full.clear()
    s.pump_behind()
    assert [m[2]["q"] for m in wire.take(CLIENT, P.RESULT)] == [2]


def test_a_client_that_attaches_again_gets_what_it_does_not_hold_then_what_the_broker_has(tmp_path):
    s, wire, _ = cluster(tmp_path)
    submit(s, 3)
    for _ in range(2):
        run_one(s, wire)
    wire.take()
    new = b"client-again"
    s.handle(new, None, P.ATTACH, {"j": JOB, "c": b"c1", "q": 1}, [])
    sent = wire.take(new)
    assert [(m[1], m[2].get("q")) for m in sent] == [(P.RESULT, 2), (P.ATTACHED, None)]
    assert sent[-1][2]["have"] == [2]  # the batch still queued: the client sends its others again
    assert s.jobs[JOB].client == new


def test_a_client_away_past_its_lease_has_its_job_cancelled_and_is_told_when_it_returns(tmp_path):
    s, wire, store = cluster(tmp_path)
    submit(s, 2, ls=1)
    wire.gone.add(CLIENT)
    run_one(s, wire)  # its result cannot reach the client: the job's entries go to disk
    job = s.jobs[JOB]
    assert job.away is not None and job.stored and job.outbox.disk_hi == 1
    job.away -= 5
    s.beat()
    assert JOB not in s.jobs
    s.handle(b"back", None, P.ATTACH, {"j": JOB, "c": b"c1", "q": 0}, [])
    (_, _, told, _), = wire.take(b"back", P.REJECTED)
    assert told["t"] == "expired" and "lease (1 s" in told["e"]
    store.commit()
    assert store.db.execute("SELECT COUNT(*) FROM outbox").fetchone()[0] == 0


def test_a_detached_job_is_spooled_runs_from_disk_and_resumes_in_a_new_scheduler(tmp_path):
    s, wire, store = cluster(tmp_path)
    submit(s, 3, detached=True)
    s.handle(CLIENT, None, P.SEAL, {"j": JOB, "n": 3}, [])
    store.commit()
    s.committed()
    (_, _, spooled, _), = wire.take(CLIENT, P.SPOOLED)
    assert (spooled["n"], spooled["sealed"]) == (3, 1)
    assert all(b.frames is None for b in s.jobs[JOB].queue)  # (inputs live on disk, not in memory)
    task, payload = run_one(s, wire)
    assert payload == [b"function", b"input0"]
    s.dispatch()  # the second batch is running when the broker dies
    assert wire.take(SLOT, P.TASK)
    store.commit()
    store.close()

    wire = Wire()
    store = Store(tmp_path / "jobs", 1 << 30)
    s = Scheduler(wire.send, wire.offer, store=store)
    job = s.jobs[JOB]
    assert (job.done, sorted(b.start for b in job.queue)) == (1, [1, 2])
    s.handle(WORKER, None, P.REGISTER, {"w": "w", "slots": 1, "cpu": 4, "ram": 16}, [])
    s.handle(SLOT, None, P.READY, {"w": "w", "s": "w/0", "k": 1}, [])
    for _ in range(2):
        run_one(s, wire)
    assert JOB not in s.jobs and s.finished[JOB].state == "done"
    reader = b"reader"
    s.handle(reader, None, P.ATTACH, {"j": JOB, "c": b"c2", "q": 0, "p": 1}, [])
    sent = wire.take(reader)
    assert [m[1] for m in sent] == [P.RESULT, P.RESULT, P.RESULT, P.END, P.ATTACHED]
    assert sorted(m[2]["i"] for m in sent[:3]) == [0, 1, 2] and sent[3][2]["st"] == "done"


def test_another_owner_cannot_attach_see_or_cancel_a_job(tmp_path):
    wire = Wire()
    s = Scheduler(wire.send, wire.offer, store=Store(tmp_path / "jobs", 1 << 30))
    header = {"j": JOB, "c": b"c1", "d": DIGEST, "fn": 1, "n": 1}
    s.handle(CLIENT, "client:aaaa", P.SUBMIT, header, [b"function"])
    s.handle(b"thief", "client:bbbb", P.ATTACH, {"j": JOB, "c": b"c9", "q": 0}, [])
    (_, _, told, _), = wire.take(b"thief", P.REJECTED)
    assert told["t"] == "unknown"  # (looks exactly like no job)
    s.handle(b"thief", "client:bbbb", P.JOBS, {}, [])
    assert wire.take(b"thief", P.JOBS)[0][2]["jobs"] == []
    s.handle(b"thief", "client:bbbb", P.CANCEL, {"j": JOB}, [])
    assert JOB in s.jobs


def test_a_spool_past_its_limit_refuses_detached_inputs(tmp_path):
    wire = Wire()
    s = Scheduler(wire.send, wire.offer, store=Store(tmp_path / "jobs", 4096))
    s.handle(CLIENT, None, P.SUBMIT, {"j": JOB, "c": b"c1", "d": DIGEST, "fn": 1, "dt": 1}, [b"function"])
    s.handle(CLIENT, None, P.BATCH, {"j": JOB, "i": 0, "n": 1, "z": [0]}, [b"x" * 10_000])
    (_, _, told, _), = wire.take(CLIENT, P.REJECTED)
    assert told["t"] == "spool" and "spool is full" in told["e"]
    assert JOB not in s.jobs


def test_malformed_durable_messages_are_refused_where_they_enter(tmp_path):
    s, wire, _ = cluster(tmp_path)
    for command, header in [(P.ACK, {"j": JOB, "q": -1}), (P.ATTACH, {"j": b"short", "q": 0}),
                            (P.SEAL, {"j": JOB}), (P.SUBMIT, {"j": JOB, "d": DIGEST, "ls": 0}),
                            (P.JOBS, {"j": 7}), (P.ATTACH, {"j": JOB, "q": 0, "extra": 1})]:
        with pytest.raises(P.ProtocolError):
            s.handle(CLIENT, None, command, header, [])
    submit(s, 2)
    with pytest.raises(P.ProtocolError, match="fewer inputs"):
        s.handle(CLIENT, None, P.SEAL, {"j": JOB, "n": 1}, [])


def test_a_second_process_follows_a_job_without_taking_it_from_its_client(tmp_path):
    s, wire, _ = cluster(tmp_path)
    submit(s, 2)
    run_one(s, wire)
    follower = b"follower"
    s.handle(follower, None, P.ATTACH, {"j": JOB, "c": b"c2", "q": 0}, [])
    assert [m[1] for m in wire.take(follower)] == [P.RESULT, P.ATTACHED]
    assert s.jobs[JOB].client == CLIENT
    s.handle(follower, None, P.ACK, {"j": JOB, "q": 1}, [])  # (a follower's ack lets nothing go)
    assert len(s.jobs[JOB].outbox.mem) == 1
    wire.take()
    run_one(s, wire)
    assert len(wire.take(CLIENT, P.RESULT)) == 1 and len(wire.take(follower, P.RESULT)) == 1
    s.handle(CLIENT, None, P.END, {"j": JOB}, [])
    (_, _, end, _), = wire.take(follower, P.END)
    assert end["st"] == "done" and not wire.take(CLIENT, P.END)


def test_a_process_taking_over_a_job_whose_client_is_gone_gets_its_end(tmp_path):
    s, wire, _ = cluster(tmp_path)
    submit(s, 2)
    run_one(s, wire)
    wire.gone.add(CLIENT)
    s.beat()  # (the heartbeat to the client fails: it is away)
    new = b"new-kernel"
    s.handle(new, None, P.ATTACH, {"j": JOB, "c": b"c2", "q": 0}, [])
    assert s.jobs[JOB].client == new and s.jobs[JOB].sealed  # its inputs are what the old client sent
    run_one(s, wire)
    assert JOB not in s.jobs
    sent = wire.take(new)
    assert [m[1] for m in sent] == [P.RESULT, P.ATTACHED, P.RESULT, P.END] and sent[-1][2]["st"] == "done"


def test_single_calls_are_cancelled_queued_or_running_and_only_by_their_owner(tmp_path):
    s, wire, _ = cluster(tmp_path)
    submit(s, 3, o={"c": 1, "k": 1})
    s.dispatch()
    (_, _, task, _), = wire.take(SLOT, P.TASK)  # input 0 is on the slot; 1 and 2 are queued
    s.handle(b"intruder", "client:someone-else", P.CANCEL, {"j": JOB, "i": [0, 1]}, [])
    assert not wire.take(WORKER, P.KILL) and not s.jobs[JOB].call_cancels  # (another owner's job: nothing)
    s.handle(CLIENT, None, P.CANCEL, {"j": JOB, "i": [0, 2, 10 ** 9]}, [])
    (_, _, kill, _), = wire.take(WORKER, P.KILL)
    assert kill == {"s": "w/0", "j": JOB, "hard": 0, "i": [0]}  # the running one: interrupted there
    assert s.jobs[JOB].call_cancels == {0, 2}  # (an input never sent is no call)
    assert JOB in s.jobs  # the job goes on
    s.handle(SLOT, None, P.RESULT, {"j": JOB, "i": 0, "o": 0, "k": 0, "f": 1, "w": "w/0",
                                    "e": [P.error_record(0, "CallCancelled", "cancelled")]}, [b""])
    s.handle(SLOT, None, P.READY, {"w": "w", "s": "w/0", "k": 1}, [])
    s.dispatch()
    (_, _, task, _), = wire.take(SLOT, P.TASK)
    assert task["i"] == 1 and "cc" not in task
    s.handle(SLOT, None, P.RESULT, {"j": JOB, "i": 1, "o": 0, "k": 1, "f": 1, "z": [0], "w": "w/0"}, [b"r"])
    s.dispatch()
    (_, _, task, _), = wire.take(SLOT, P.TASK)
    assert task["i"] == 2 and task["cc"] == [0]  # the queued one: skipped by its executor, with an outcome
    assert s.jobs[JOB].call_cancels == {2}  # (input 0's batch is done: forgotten)
    # a job that did not ask for single cancels (no option k) ignores them
    s2, wire2, _ = cluster(tmp_path / "other")
    submit(s2, 1)
    s2.dispatch()
    s2.handle(CLIENT, None, P.CANCEL, {"j": JOB, "i": [0]}, [])
    assert not wire2.take(WORKER, P.KILL) and JOB in s2.jobs


def test_job_records_name_failures_and_bars_and_a_state_stays_within_a_frame(tmp_path):
    s, wire, _ = cluster(tmp_path)
    s.handle(CLIENT, None, P.SUBMIT, {"j": JOB, "c": b"c1", "d": DIGEST, "fn": 1, "n": 40, "cpu": 1, "ram": 1,
                                      "o": {"c": 1}, "nm": "my_function · cell [3]"}, [b"function"])
    for start in range(0, 40, 10):
        s.handle(CLIENT, None, P.BATCH, {"j": JOB, "i": start, "n": 10, "z": [0]}, [b"inputs"])
    for _ in range(4):
        s.dispatch()
        (_, _, task, _), = wire.take(SLOT, P.TASK)
        for k in range(10):  # one RESULT per failed input
            error = P.error_record(task["i"] + k, "ValueError", "m" * 9000, "t" * 90_000)
            s.handle(SLOT, None, P.RESULT, {"j": JOB, "i": task["i"], "o": k, "k": 0, "f": int(k == 9), "w": "w/0",
                                            "t": 0.5, "e": [error]}, [b""])
    record, = [r for r in s.state()["jobs"] + s.state()["recent"] if r["id"] == JOB.hex()]
    assert record["name"] == "my_function · cell [3]" and record["failed"] == 40
    assert len(record["failures"]) == 20 and record["failures"][0]["i"] == 0
    assert len(record["failures"][0]["tb"]) == 2000  # (a traceback's end, cut short)
    import msgpack

    other = b"K" * 8
    s.handle(CLIENT, None, P.SUBMIT, {"j": other, "c": b"c1", "d": DIGEST, "fn": 1, "cpu": 1, "ram": 1,
                                      "o": {"c": 1}}, [b"function"])
    s.handle(CLIENT, None, P.BATCH, {"j": other, "i": 0, "n": 1, "z": [0]}, [b"input"])
    s.dispatch()
    (_, _, task, _), = wire.take(SLOT, P.TASK)
    s.handle(SLOT, None, P.RESULT, {"j": other, "i": 0, "o": 0, "k": 1, "f": 1, "z": [0], "w": "w/0", "t": 0.5},
             [b"r"])
    bar, = [r for r in s.state()["jobs"] if r["id"] == other.hex()][0]["bars"]  # a running job's timeline: [seq, slot, t0, t1, calls, failed]
    assert bar[0] == 1 and bar[1] == "w/0" and bar[3] - bar[2] == pytest.approx(0.5, abs=0.01) and bar[4:] == [1, 0]
    for k in range(30):  # many jobs with big failures: STATE drops what it must to stay one frame (tracebacks first)
        s.handle(CLIENT, None, P.SUBMIT, {"j": bytes([k]) * 8, "c": b"c1", "d": DIGEST, "fn": 1, "cpu": 1,
                                          "ram": 1}, [b"function"])
    for job in s.jobs.values():
        job.failures = [dict(f) for f in record["failures"]]
    state = s.state()
    assert len(msgpack.packb(state)) <= P.FRAME_MAX
    assert all("tb" not in f for r in state["jobs"] for f in r.get("failures", ()))


def test_a_flood_of_single_call_cancels_costs_the_broker_little(tmp_path):
    s, wire, _ = cluster(tmp_path)
    s.handle(CLIENT, None, P.SUBMIT, {"j": JOB, "c": b"c1", "d": DIGEST, "fn": 1, "cpu": 1, "ram": 1,
                                      "o": {"c": 1, "k": 1}}, [b"function"])
    s.handle(CLIENT, None, P.BATCH, {"j": JOB, "i": 0, "n": 60_000, "z": [0]}, [b"inputs"])
    s.dispatch()
    assert wire.take(SLOT, P.TASK)
    for k in range(20):  # the same 60,000 calls again and again, and calls that were never sent
        s.handle(CLIENT, None, P.CANCEL, {"j": JOB, "i": list(range(k, 60_000 + k))}, [])
    kills = wire.take(WORKER, P.KILL)  # a worker is told once per new cancel, and of a bounded number of calls
    assert len(kills) == 1 and len(kills[0][2]["i"]) == 200
    assert len(s.jobs[JOB].call_cancels) == 60_000 and JOB in s.jobs


def test_a_detached_job_done_before_its_seal_still_tells_its_uploader(tmp_path):
    """Every outcome of a small detached job can come before its SEAL: the job ends at the SEAL, in the same
    turn, and its uploader must still hear SPOOLED sealed (it waited for it for ever)."""
    s, wire, store = cluster(tmp_path)
    submit(s, 1, detached=True)
    store.commit()
    s.committed()
    wire.take(CLIENT, P.SPOOLED)
    run_one(s, wire)
    s.handle(CLIENT, None, P.SEAL, {"j": JOB, "n": 1}, [])
    assert JOB not in s.jobs  # done, at the seal
    store.commit()
    s.committed()
    (_, _, spooled, _), = wire.take(CLIENT, P.SPOOLED)
    assert (spooled["n"], spooled["sealed"]) == (1, 1)


def test_a_state_of_many_big_workers_still_fits_one_frame(tmp_path):
    """A thousand workers with long names and 64 GPUs each make a STATE of about 4 MB, which no frame carries:
    STATUS went unanswered and every dashboard went blank. The busiest workers are listed, all are counted."""
    import msgpack

    s, wire, _ = cluster(tmp_path)
    for k in range(1000):
        s.handle(b"w%d" % k, None, P.REGISTER, {"w": f"{k:04d}" + "w" * 124, "host": "h" * 256, "slots": 8,
                                                "cpu": 8, "ram": 32, "gpu": ["G" * 64] * 64}, [])
    submit(s, 3)
    s.dispatch()
    state = s.state()
    assert len(msgpack.packb(state)) <= P.FRAME_MAX
    assert state["nworkers"] == 1001 and 10 < len(state["workers"]) < 1001
    assert state["workers"][0]["id"] == "w" and state["workers"][0]["busy"] == 1  # (the one running the job)
    assert [j["id"] for j in state["jobs"]] == [JOB.hex()]
    s.handle(CLIENT, None, P.STATUS, {}, [])
    (_, _, answer, _), = wire.take(CLIENT, P.STATUS)
    assert answer["nworkers"] == 1001


def test_a_function_that_is_not_its_digests_is_refused_and_cannot_take_its_place(tmp_path):
    """Slots cache a function by its digest, and the broker sends it only to a slot without it: a SUBMIT with
    other bytes under a real function's digest would have had every later job of that digest run them (a fuzzed
    SUBMIT made a real job's five calls all fail with 'Ran out of input')."""
    s, wire, _ = cluster(tmp_path)
    with pytest.raises(P.ProtocolError, match="not its digest"):
        s.handle(CLIENT, None, P.SUBMIT, {"j": b"X" * 8, "c": b"c1", "d": DIGEST, "fn": 1, "n": 1, "cpu": 1},
                 [b""])
    with pytest.raises(P.ProtocolError, match="not its digest"):  # (over its frames, as the client splits it)
        s.handle(CLIENT, None, P.SUBMIT, {"j": b"X" * 8, "c": b"c1", "d": DIGEST, "fn": 2, "n": 1, "cpu": 1},
                 [b"function", b"function"])
    assert b"X" * 8 not in s.jobs
    s.handle(CLIENT, None, P.SUBMIT, {"j": b"Y" * 8, "c": b"c1", "d": DIGEST, "fn": 2, "n": 1, "cpu": 1},
             [b"func", b"tion"])
    submit(s, 1)
    _, payload = run_one(s, wire)
    assert payload == [b"function", b"input0"]  # the job's own function, in full


def test_a_stored_job_whose_function_is_not_its_digests_is_dropped_and_the_broker_starts(tmp_path):
    """(Stored by a broker from before the check: it must not stop the next one from starting.)"""
    store = Store(tmp_path / "jobs", 1 << 30)
    header = {"j": b"Z" * 8, "c": b"c1", "d": DIGEST, "fn": 1, "n": 1, "cpu": 1, "ram": 1, "dt": 1}
    store.put_job(b"Z" * 8, None, True, header, [b"other bytes"], 0.0)
    store.commit()
    wire = Wire()
    s = Scheduler(wire.send, wire.offer, store=store)
    assert b"Z" * 8 not in s.jobs and not list(store.jobs())
