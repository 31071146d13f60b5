"""Floods that must not hurt a real CURVE broker over TCP: its RSS stays under RSS_LIMIT while each runs, and an
honest job from another connection completes meanwhile. Each prints the broker's peak RSS (pytest -s), and writes
it as a line to the file named by $BURLA_FLOOD_REPORT, if set."""

import os
import pickle
import socket
import struct
import threading
import time

import psutil
import pytest
import zmq
from zmq.utils.monitor import recv_monitor_message

from burla import protocol as P, security, serialize
from burla.client import cluster_state
from test_fuzz import WatchedCluster, honest_job, settle, wait_idle

RSS_LIMIT = 300 << 20
MB = 1 << 20


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    c = WatchedCluster(tmp_path_factory.mktemp("floods"))
    yield c
    c.stop()


class RssWatch:
    """Samples the broker's resident memory every 10 ms until stopped; peak is the most it reached."""

    def __init__(self, cluster):
        self.proc = cluster.broker_process
        self.before = self.peak = self.proc.memory_info().rss
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=self.sample, daemon=True)

    def sample(self):
        while not self.stopping.is_set():
            try:
                self.peak = max(self.peak, self.proc.memory_info().rss)
            except psutil.NoSuchProcess:
                return
            self.stopping.wait(0.01)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.stopping.set()
        self.thread.join()


def report(name, watch, **figures):
    line = (f"flood {name}: broker RSS peak {watch.peak / MB:.0f} MB (before {watch.before / MB:.0f} MB, limit "
            f"{RSS_LIMIT / MB:.0f} MB)" + "".join(f", {k.replace('_', ' ')} {v}" for k, v in figures.items()))
    print("\n" + line)
    path = os.environ.get("BURLA_FLOOD_REPORT")
    if path:
        with open(path, "a") as f:
            f.write(line + "\n")


def dealer(c, credential=None, kind=security.CLIENT, rcvhwm=None):
    sock = P.socket(zmq.Context.instance(), zmq.DEALER, credential=credential or c.api_key, role=kind)
    if rcvhwm is not None:
        sock.rcvhwm = rcvhwm
    sock.connect(c.address)
    return sock


class Flooder(threading.Thread):
    """Runs flood(stop) in a thread; what it returns (or raises) is kept."""

    def __init__(self, flood):
        super().__init__(daemon=True)
        self.flood, self.stop, self.result, self.error = flood, threading.Event(), None, None

    def run(self):
        try:
            self.result = self.flood(self.stop)
        except BaseException as e:  # (reported by the test)
            self.error = e

    def finish(self, timeout=60):
        """Wait for the flood to end (told to stop after timeout), then give what it returned."""
        self.join(timeout)
        self.stop.set()
        self.join(5)
        assert not self.is_alive(), "the flood did not stop"
        if self.error is not None:
            raise self.error
        return self.result


def timed_honest_job(c):
    began = time.monotonic()
    honest_job(c)
    return f"{time.monotonic() - began:.1f} s"


@pytest.mark.timeout(120)
def test_client_that_never_reads(cluster):
    """A client that asks STATUS as fast as it can and reads nothing (its receive queue holds one message): the
    broker must not block on it, nor keep what it does not read."""
    seconds = 6.0

    def flood(stop):
        sock = dealer(cluster, rcvhwm=1)
        sent, end = 0, time.monotonic() + seconds
        try:
            while time.monotonic() < end and not stop.is_set():
                try:
                    P.send(sock, P.STATUS, {}, flags=zmq.NOBLOCK)
                    sent += 1
                except zmq.Again:
                    time.sleep(0.001)
        finally:
            sock.close(0)
        return sent

    with RssWatch(cluster) as watch:
        flooder = Flooder(flood)
        flooder.start()
        time.sleep(1.0)  # the flood is on
        try:
            took = timed_honest_job(cluster)
            assert flooder.is_alive(), "the honest job only completed once the flood was over"
            sent = flooder.finish()
        finally:
            flooder.stop.set()
    assert cluster.broker.poll() is None
    state = cluster_state(cluster.address, 3, cluster.api_key)  # it answers once the flooder has gone
    assert [w["id"] for w in state["workers"]] == ["w"]
    report("a (a client that never reads)", watch, STATUS_sent=f"{sent} in {seconds:.0f} s",
           honest_job_during_it=took)
    assert sent > 10_000, "the flood did not get going"
    assert watch.peak < RSS_LIMIT


def greeting(mechanism):
    """A ZMTP 3.0 greeting (64 bytes): signature, version 3.0, mechanism, as-server 0, filler."""
    return b"\xff" + bytes(8) + b"\x7f" + bytes([3, 0]) + mechanism.ljust(20, b"\0") + b"\0" + bytes(31)


@pytest.mark.timeout(120)
def test_raw_peers_announcing_2_gib_frames(cluster):
    """Three connections without credentials, each a ZMTP greeting and then a frame header announcing 2 GiB,
    followed by zeros for several seconds: the broker must hang up on each (a frame is at most P.FRAME_MAX, before
    authentication too) instead of buffering what they send."""
    host, port = cluster.address[len("tcp://"):].rsplit(":", 1)
    seconds = 5.0
    zeros = bytes(64 << 10)

    def stream(mechanism):
        def flood(stop):
            sent, began = 0, time.monotonic()
            with socket.create_connection((host, int(port)), timeout=5) as conn:
                conn.settimeout(1.0)
                try:
                    conn.sendall(greeting(mechanism) + b"\x02" + struct.pack(">Q", 2 << 30))
                    while time.monotonic() < began + seconds and not stop.is_set():
                        conn.sendall(zeros)
                        sent += len(zeros)
                except (BrokenPipeError, ConnectionResetError):
                    return "dropped", sent, time.monotonic() - began
                except socket.timeout:
                    return "stalled", sent, time.monotonic() - began
            return "streamed", sent, time.monotonic() - began
        return flood

    with RssWatch(cluster) as watch:
        flooders = [Flooder(stream(m)) for m in (b"NULL", b"CURVE", b"CURVE")]
        for f in flooders:
            f.start()
        try:
            took = timed_honest_job(cluster)
            outcomes = [f.finish(seconds + 10) for f in flooders]
        finally:
            for f in flooders:
                f.stop.set()
    assert cluster.broker.poll() is None
    report("b (raw TCP peers announcing 2 GiB frames)", watch, connections=", ".join(
        f"{what} after {sent / MB:.1f} MB in {t:.1f} s" for what, sent, t in outcomes), honest_job_during_it=took)
    assert [what for what, _, _ in outcomes] == ["dropped"] * 3
    assert watch.peak < RSS_LIMIT
    assert [w["id"] for w in cluster_state(cluster.address, 3, cluster.api_key)["workers"]] == ["w"]


@pytest.mark.timeout(120)
def test_authenticated_client_sending_a_200_mib_header(cluster):
    """The old attack was a 1 GiB msgpack header from an authenticated client. Frames above P.FRAME_MAX now drop
    the connection: a 200 MiB header frame must cost the broker nothing but that connection."""
    sock = P.socket(zmq.Context.instance(), zmq.DEALER, credential=cluster.api_key, role=security.CLIENT)
    monitor = sock.get_monitor_socket(zmq.EVENT_HANDSHAKE_SUCCEEDED | zmq.EVENT_DISCONNECTED)
    sock.connect(cluster.address)  # (after the monitor: it sees the handshake)
    events = []

    def wait_for(event, timeout):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if monitor.poll(100):
                events.append(recv_monitor_message(monitor)["event"])
                if event in events:
                    return True
        return False

    try:
        assert wait_for(zmq.EVENT_HANDSHAKE_SUCCEEDED, 5), "the client was not admitted"
        header = bytes([0xc6]) + struct.pack(">I", 200 * MB) + bytes(200 * MB)  # msgpack bin32 of 200 MiB
        with RssWatch(cluster) as watch:
            began = time.monotonic()
            # (P.send refuses a header over FRAME_MAX: the frames are written by hand)
            sock.send_multipart([b"", P.VERSION, P.STATUS, header], copy=False)
            dropped = wait_for(zmq.EVENT_DISCONNECTED, 20)
            dropped_after = time.monotonic() - began
            sock.close(0)
            took = timed_honest_job(cluster)
            wait_idle(cluster)
    finally:
        monitor.close(0)
        sock.close(0)
    assert cluster.broker.poll() is None
    report("c (an authenticated client sending a 200 MiB header)", watch,
           connection=f"dropped after {dropped_after:.1f} s" if dropped else "not dropped", honest_job_after_it=took)
    assert dropped, "the broker kept the connection that sent a frame over FRAME_MAX"
    assert watch.peak < RSS_LIMIT


@pytest.mark.timeout(120)
def test_authenticated_client_ignoring_its_credit(cluster):
    """A client that submits a job, then sends 2,500 batches of 512 KiB (1.25 GiB) without waiting for results:
    past its window the broker ends the job (REJECTED, t "credit") and drops the rest unread."""
    settle(cluster)
    job = os.urandom(8)
    client_id = os.urandom(8)
    function, digest = serialize.dumps_function(len)
    batch = pickle.dumps(bytes(P.FRAME_MAX * 2 - 9), protocol=5)  # one input of 512 KiB, as two frames
    assert len(batch) == 2 * P.FRAME_MAX
    frames = [batch[:P.FRAME_MAX], batch[P.FRAME_MAX:]]
    count = 2500

    def flood(stop):
        sock = dealer(cluster)
        replies = []

        def drain():
            while sock.poll(0):
                command, header, _ = P.recv(sock)
                replies.append((command, header))

        try:
            function_frames = serialize.split(function)
            P.send(sock, P.SUBMIT, {"j": job, "c": client_id, "d": digest, "fn": len(function_frames), "n": count,
                                    "cpu": 1, "ram": 0, "gpu": None, "par": None, "o": {}}, function_frames)
            beat = time.monotonic()
            for i in range(count):
                if stop.is_set():
                    break
                if i % 100 == 0:
                    P.send(sock, P.HEARTBEAT, {"c": client_id})
                    drain()
                P.send(sock, P.BATCH, {"j": job, "i": i, "n": 1, "z": [0, serialize.CONTINUED]}, frames)
            # the broker answers this STATUS once it has read every batch in front of it
            P.send(sock, P.STATUS, {})
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline and not stop.is_set() and not any(c == P.STATUS for c, _ in replies):
                if time.monotonic() > beat + 0.3:
                    P.send(sock, P.HEARTBEAT, {"c": client_id})
                    beat = time.monotonic()
                sock.poll(100)
                drain()
            assert any(c == P.STATUS for c, _ in replies), "the broker did not get through the batches"
            return replies
        finally:
            sock.close(0)

    cpu = sum(cluster.broker_process.cpu_times()[:2])
    with RssWatch(cluster) as watch:
        began = time.monotonic()
        flooder = Flooder(flood)
        flooder.start()
        try:
            took = timed_honest_job(cluster)
            replies = flooder.finish(90)
        finally:
            flooder.stop.set()
        seconds = time.monotonic() - began
    cpu = sum(cluster.broker_process.cpu_times()[:2]) - cpu
    assert cluster.broker.poll() is None
    rejected = [h for c, h in replies if c == P.REJECTED and h.get("j") == job]
    results = sum(1 for c, h in replies if c == P.RESULT and h.get("j") == job)
    report("d (a client ignoring its credit)", watch, batches=f"{count} x 512 KiB in {seconds:.1f} s",
           broker_CPU=f"{cpu:.1f} s",
           results_before_the_end=results, ended_with=repr(rejected[0].get("t")) if rejected else "nothing",
           honest_job_during_it=took)
    assert rejected and rejected[0]["t"] == "credit", f"the job was not ended for its credit: {replies[:5]}"
    assert watch.peak < RSS_LIMIT
    assert not any(j["id"] == job.hex() for j in cluster_state(cluster.address, 3, cluster.api_key)["jobs"])
