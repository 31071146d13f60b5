"""VMs for the fake Compute Engine (tests/fake_gce.py): each instance it creates boots, as a network namespace on
this machine, the way a Compute Engine VM does: a metadata server at 169.254.169.254 answers that instance's
metadata on Google's paths, then the instance's own startup script runs as root. Deleting the instance kills every
process in its namespace, as a preemption would.

What differs from a real VM: the "image" is this machine (its Python, and uv from the test environment on PATH),
packages come from a local wheelhouse (the metadata's burla-pip-args), BURLA_ROOT puts each VM's files in a folder
of its own, BURLA_USER=root keeps the test from adding a user to this machine, and the Compute Engine API the
head's autoscaler calls is the fake's, reached over a veth from this machine's own namespace.

Run as a script it is the metadata server: fake_vms.py FILE (a JSON map of path -> text).
"""

import itertools
import json
import os
import signal
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, HTTPServer

import netns

METADATA_IP = "169.254.169.254"


class Booter:
    def __init__(self, root, env=None):
        tag = os.getpid() % 10000
        self.root, self.env = str(root), dict(env or {})
        self.subnet = f"10.214.{os.getpid() % 250}"
        self.hub, self.host_link = f"gh{tag}", f"gv{tag}"
        self.tag, self.numbers = tag, itertools.count(1)
        self.vms = {}  # (zone, name) -> (namespace, address, [processes])
        self.lock = threading.Lock()
        netns.ip("netns", "add", self.hub)
        try:
            netns.ip("link", "add", "br0", "type", "bridge", ns=self.hub)
            netns.ip("link", "set", "br0", "up", ns=self.hub)
            # This machine joins the VMs' network too: the test reaches the head's broker, and the head's
            # autoscaler reaches the fake Compute Engine, at host_address.
            netns.ip("link", "add", self.host_link, "type", "veth", "peer", "name", "hp0", "netns", self.hub)
            netns.ip("link", "set", "hp0", "master", "br0", "up", ns=self.hub)
            self.host_address = f"{self.subnet}.254"
            netns.ip("addr", "add", f"{self.host_address}/24", "dev", self.host_link)
            netns.ip("link", "set", self.host_link, "up")
        except BaseException:
            self.close()
            raise

    def insert(self, zone, instance):
        """Make the VM's namespace and start its boot; its address."""
        k = next(self.numbers)
        ns, address = f"g{self.tag}v{k}", f"{self.subnet}.{k}"
        netns.ip("netns", "add", ns)
        netns.ip("link", "add", "eth0", "netns", ns, "type", "veth", "peer", "name", f"v{k}", "netns", self.hub)
        netns.ip("link", "set", f"v{k}", "master", "br0", "up", ns=self.hub)
        netns.ip("addr", "add", f"{address}/24", "dev", "eth0", ns=ns)
        netns.ip("link", "set", "eth0", "up", ns=ns)
        netns.ip("link", "set", "lo", "up", ns=ns)
        netns.ip("addr", "add", f"{METADATA_IP}/32", "dev", "lo", ns=ns)
        name = instance["name"]
        folder = os.path.join(self.root, f"{name}-{k}")
        os.makedirs(os.path.join(folder, "home"))
        served = {"instance/name": name, "instance/zone": f"projects/0/zones/{zone}",
                  "instance/network-interfaces/0/ip": address, "project/project-id": "proj",
                  "instance/service-accounts/default/token": json.dumps(
                      {"access_token": f"token-of-{name}", "expires_in": 3599, "token_type": "Bearer"})}
        for item in instance.get("metadata", {}).get("items", []):
            served[f"instance/attributes/{item['key']}"] = item["value"]
        with open(os.path.join(folder, "metadata.json"), "w") as fh:
            json.dump(served, fh)
        procs = []
        with self.lock:
            self.vms[zone, name] = (ns, address, procs, folder)
        threading.Thread(target=self.boot, args=(zone, name, ns, folder, procs), daemon=True).start()
        return address

    def boot(self, zone, name, ns, folder, procs):
        log = open(os.path.join(folder, "boot.log"), "ab")
        server = subprocess.Popen(["ip", "netns", "exec", ns, sys.executable, __file__,
                                   os.path.join(folder, "metadata.json")], stdout=subprocess.PIPE, stderr=log)
        procs.append(server)
        if server.stdout.readline().strip() != b"ready":
            return
        with open(os.path.join(folder, "metadata.json")) as fh:
            script = json.load(fh).get("instance/attributes/startup-script", "")
        with open(os.path.join(folder, "startup-script"), "w") as fh:
            fh.write(script)
        env = {"PATH": f"{os.path.dirname(sys.executable)}:/usr/local/bin:/usr/bin:/bin:/usr/sbin:/sbin",
               "HOME": os.path.join(folder, "home"), "BURLA_ROOT": os.path.join(folder, "root"),
               "BURLA_USER": "root", "UV_PYTHON_DOWNLOADS": "never", "UV_OFFLINE": "1", **self.env}
        with self.lock:
            if (zone, name) not in self.vms:
                return  # (deleted meanwhile)
            procs.append(subprocess.Popen(["ip", "netns", "exec", ns, "bash", os.path.join(folder, "startup-script")],
                                          env=env, stdout=log, stderr=subprocess.STDOUT, cwd=folder))

    def logs(self, name):
        """The boot log and the logs of what the startup script started, of every VM with this name."""
        out = []
        for entry in sorted(os.listdir(self.root)):
            if entry.rsplit("-", 1)[0] == name:
                for path in ("boot.log", "root/broker.log", "root/autoscaler.log", "root/worker.log"):
                    full = os.path.join(self.root, entry, path)
                    if os.path.exists(full):
                        with open(full, errors="replace") as fh:
                            out.append(f"--- {entry}/{path}\n{fh.read()[-4000:]}")
        return "\n".join(out)

    def serial(self, zone, name):
        """What the VM's startup script wrote (its serial console, on Compute Engine)."""
        with self.lock:
            vm = self.vms.get((zone, name))
        if vm is None:
            return ""
        with open(os.path.join(vm[3], "boot.log"), errors="replace") as fh:
            return fh.read()

    def delete(self, zone, name):
        with self.lock:
            vm = self.vms.pop((zone, name), None)
        if vm is not None:
            self.stop(vm)

    def stop(self, vm):
        ns, _, procs, _ = vm
        for _ in range(20):  # (a supervisor loop may start its command again between two looks)
            listed = subprocess.run(["ip", "netns", "pids", ns], capture_output=True, text=True).stdout.split()
            if not listed:
                break
            for pid in listed:
                try:
                    os.kill(int(pid), signal.SIGKILL)
                except (ProcessLookupError, ValueError):
                    pass
            time.sleep(0.05)
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
            proc.wait()
        netns.ip("netns", "del", ns, check=False)

    def close(self):
        with self.lock:
            vms, self.vms = list(self.vms.values()), {}
        for vm in vms:
            self.stop(vm)
        netns.ip("netns", "del", self.hub, check=False)  # (its end of the veth goes, and so this machine's)
        netns.ip("link", "del", self.host_link, check=False)


def serve(path):
    with open(path) as fh:
        served = json.load(fh)

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):
            key = self.path.split("?")[0].removeprefix("/computeMetadata/v1/")
            if self.headers.get("Metadata-Flavor") != "Google":
                status, body = 403, "Missing Metadata-Flavor:Google header."
            elif key in served:
                status, body = 200, served[key]
            else:
                status, body = 404, "not found"
            data = body.encode()
            self.send_response(status)
            self.send_header("Metadata-Flavor", "Google")
            self.send_header("Content-Type", "application/text")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, *args):
            pass

    server = HTTPServer((METADATA_IP, 80), Handler)
    print("ready", flush=True)
    server.serve_forever()


if __name__ == "__main__":
    serve(sys.argv[1])
