"""A zygote: one process per environment a worker's slots have run in. It has imported what an executor needs
and forks executors on request, so moving a slot into a cached environment costs a fork (a few ms) instead of a
fresh interpreter importing pyzmq and cloudpickle (~70 ms). The worker is not the executors' parent, so the zygote
reports their exit statuses.

On the worker's socketpair (SOCK_SEQPACKET, one JSON message per packet):
    worker -> zygote   {slot, broker, worker, token, key}, with the executor's control and WHERE fds attached
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
        self.sock.settimeout(30)  # its first answer waits for its imports
        self.codes = {}  # executor pid -> exit status, as reported

    def fork(self, request, fds):
        socket.send_fds(self.sock, [json.dumps(request).encode()], fds)
        while True:
            answer = self.receive()
            if "slot" in answer:
                return answer["pid"]

    def receive(self):
        data = self.sock.recv(65536)
        if not data:
            raise OSError("the zygote exited")
        answer = json.loads(data)
        if "code" in answer:
            self.codes[answer["pid"]] = answer["code"]
        return answer

    def exit_code(self, pid, timeout=2.0):
        """The exit status of an executor that has exited (its pidfd said so); -1 if the zygote cannot tell (it
        died too, taking its executors with it)."""
        try:
            self.sock.settimeout(timeout)
            while pid not in self.codes:
                self.receive()
            self.sock.settimeout(30)
        except OSError:
            return self.codes.pop(pid, -1)
        return self.codes.pop(pid)

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
                message, fds, _, _ = socket.recv_fds(sock, 65536, 2)
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
                    executor.main(request["broker"], request["worker"], request["slot"], fds[0], request["token"],
                                  fds[1], request["key"])
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
