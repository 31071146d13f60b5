"""Hosts for multi-host tests: network namespaces on this machine joined by a bridge, each with its own address.

Traffic between them never leaves the machine. Needs root and iproute2; tests skip without them.
"""

import os
import shutil
import subprocess
import sys


def available():
    return os.geteuid() == 0 and shutil.which("ip") is not None


def ip(*args, ns=None, check=True):
    cmd = (["ip", "netns", "exec", ns] if ns else []) + ["ip", *args]
    return subprocess.run(cmd, check=check, capture_output=True, text=True, timeout=10)


class Network:
    """A bridge in a hub namespace and one namespace per host, on 10.213.N.0/24 (N from the pid: no clash)."""

    def __init__(self, names):
        tag = f"{os.getpid() % 10000}"
        self.subnet = f"10.213.{os.getpid() % 250}"
        self.hub = f"bh{tag}"
        self.hosts = {}  # name -> (namespace, address)
        self.procs = []
        ip("netns", "add", self.hub)
        try:
            ip("link", "add", "br0", "type", "bridge", ns=self.hub)
            ip("link", "set", "br0", "up", ns=self.hub)
            for k, name in enumerate(names, start=1):
                ns, addr = f"b{tag}{name}", f"{self.subnet}.{k}"
                ip("netns", "add", ns)
                self.hosts[name] = (ns, addr)
                ip("link", "add", "eth0", "netns", ns, "type", "veth", "peer", "name", f"p{k}", "netns", self.hub)
                ip("link", "set", f"p{k}", "master", "br0", "up", ns=self.hub)
                ip("addr", "add", f"{addr}/24", "dev", "eth0", ns=ns)
                ip("link", "set", "eth0", "up", ns=ns)
                ip("link", "set", "lo", "up", ns=ns)
        except BaseException:
            self.close()
            raise

    def address(self, name):
        return self.hosts[name][1]

    def run(self, name, argv, **kwargs):
        """Start argv inside host `name`; the process is stopped by close()."""
        proc = subprocess.Popen(["ip", "netns", "exec", self.hosts[name][0], *argv], **kwargs)
        self.procs.append(proc)
        return proc

    def python(self, name, *args, **kwargs):
        return self.run(name, [sys.executable, *args], **kwargs)

    def close(self):
        for proc in self.procs:
            if proc.poll() is None:
                proc.kill()
            proc.wait()
        for ns, _ in self.hosts.values():
            ip("netns", "del", ns, check=False)
        ip("netns", "del", self.hub, check=False)
