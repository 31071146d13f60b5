"""A zygote: one process per environment a worker's slots have run in. It has imported what an executor needs
and forks executors on request, so moving a slot into a cached environment costs a fork (a few ms) instead of a
fresh interpreter importing pyzmq and cloudpickle (~70 ms). The worker is not the executors' parent, so the zygote
reports their exit statuses.

On the worker's socketpair (SOCK_SEQPACKET, one JSON message per packet):
    worker -> zygote   {slot, broker, worker, key}, with the executor's control and WHERE fds attached, and
                       a pipe holding its slot key (the zygote never reads it: executors inherit its memory)
    zygote -> worker   {slot, pid} once forked;  {pid, code} when an executor exits
End of file on it (the worker is gone) ends the zygote, and its executors with it (PR_SET_PDEATHSIG).
"""

import json
import os
import select
import signal
import socket
import subprocess
import sys
import time
import traceback


class Zygote:
    """The worker's end of a zygote (see zygote.py): it forks executors in one job environment."""

    def __init__(self, prepared):
        """prepared: a job environment (envs.Prepared), or None for the worker's own."""
        parent, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        env, python = dict(os.environ), sys.executable
        if prepared is not None:
            python = prepared.python
            env.pop("PYTHONPATH", None)
            if prepared.path:
                env["PYTHONPATH"] = prepared.path  # the job's local packages, first
        self.popen = subprocess.Popen(
            [python, "-c", f"from burla.worker.zygote import main; main({child.fileno()})"],
            pass_fds=(child.fileno(),), env=env)
        child.close()
        self.sock = parent
        self.codes = {}  # executor pid -> exit status, as reported
        self.abandoned = set()  # pids whose status was given up on: a late report must not go to a reused pid

    def fileno(self):
        return self.sock.fileno()  # the worker's loop wakes when a report comes

    def fork(self, request, fds):
        socket.send_fds(self.sock, [json.dumps(request).encode()], fds)
        while True:
            answer = self.receive(30)  # the first answer waits for its imports
            if "slot" in answer:
                self.codes.pop(answer["pid"], None)
                self.abandoned.discard(answer["pid"])
                return answer["pid"]

    def receive(self, timeout):
        """One message (timeout None: only one already there, else OSError)."""
        self.sock.settimeout(timeout)
        try:
            data = self.sock.recv(65536)
        except (BlockingIOError, socket.timeout):
            raise OSError("no message") from None
        finally:
            if self.sock.fileno() >= 0:
                self.sock.setblocking(True)
        if not data:
            raise OSError("the zygote exited")
        answer = json.loads(data)
        if "code" in answer and answer["pid"] not in self.abandoned:
            self.codes[answer["pid"]] = answer["code"]
        self.abandoned.discard(answer.get("pid"))
        return answer

    def drain(self):
        """Take the reports already sent, without waiting."""
        try:
            while True:
                self.receive(0)
        except OSError:
            pass

    def exit_code(self, pid, wait=0.0):
        """An executor's exit status if the zygote reported it (waiting up to `wait` s for it), else None; -1 if
        the zygote is gone, which takes its executors with it."""
        self.drain()
        if pid not in self.codes and wait:
            deadline = time.monotonic() + wait
            try:
                while pid not in self.codes and time.monotonic() < deadline:
                    self.receive(max(deadline - time.monotonic(), 0.001))
            except OSError:
                pass
        if pid in self.codes:
            return self.codes.pop(pid)
        if not self.alive():
            return -1
        if wait:
            self.abandoned.add(pid)  # given up on: its report, if it comes, is dropped
        return None

    def alive(self):
        return self.popen.poll() is None

    def close(self):
        self.sock.close()  # end of file: it exits, and so do its executors
        self.popen.kill()
        self.popen.wait()


def main(fd):
    from burla.worker import executor  # what every executor imports: paid once, here

    sock = socket.socket(fileno=fd)
    wake_read, wake_write = os.pipe()
    os.set_blocking(wake_write, False)
    signal.set_wakeup_fd(wake_write)  # a child's exit (SIGCHLD) wakes the select below
    signal.signal(signal.SIGCHLD, lambda *_: None)
    children = set()
    while True:
        ready, _, _ = select.select([sock, wake_read], [], [])
        if wake_read in ready:
            os.read(wake_read, 4096)
        if sock in ready:
            try:
                message, fds, _, _ = socket.recv_fds(sock, 65536, 3)
            except OSError:
                message, fds = b"", []
            if not message:
                return  # the worker is gone
            request = json.loads(message)
            pid = os.fork()
            if pid == 0:
                code = 0
                try:
                    sock.close()
                    signal.set_wakeup_fd(-1)
                    signal.signal(signal.SIGCHLD, signal.SIG_DFL)
                    # fds: control pipe, WHERE file, and the pipe holding its slot key (read by the executor only)
                    executor.main(request["broker"], request["worker"], request["slot"], fds[0],
                                  fds[2] if len(fds) > 2 else None, fds[1], request["key"])
                except BaseException:
                    traceback.print_exc()
                    code = 1
                finally:
                    os._exit(code)
            for f in fds:
                os.close(f)
            children.add(pid)
            sock.send(json.dumps({"slot": request["slot"], "pid": pid}).encode())
        while children:
            pid, status = os.waitpid(-1, os.WNOHANG)
            if pid == 0:
                break
            children.discard(pid)
            sock.send(json.dumps({"pid": pid, "code": os.waitstatus_to_exitcode(status)}).encode())
