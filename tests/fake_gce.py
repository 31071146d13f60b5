"""A local fake of the Compute Engine REST API (the parts burla uses), on loopback, for tests: instances (insert,
get, list, aggregated list with a label filter, delete), zone and global operations (get, wait), regions (get)
and firewalls (get, insert). Failures are injected per zone or per call:

    fake.exhausted.add("us-central1-a")    inserts there end in an operation error ZONE_RESOURCE_POOL_EXHAUSTED
    fake.quota_after = 3                   the 4th VM insert is refused: 403 quotaExceeded
    fake.transient = 2                     the next 2 requests answer 503
    fake.lost_inserts = 2                  the next 2 VM inserts are made, but their connection drops unanswered

With a booter (tests/fake_vms.py), each VM it creates really boots: on_insert(zone, instance) starts it and gives
its address, on_delete(zone, name) stops it (a delete from the test is how a preemption looks).
"""

import itertools
import json
import re
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

ZONES = {"us-central1": ["us-central1-a", "us-central1-b", "us-central1-c"], "europe-west4": ["europe-west4-a"]}
MACHINE_TYPES = {"e2-standard-2": (2, 8192), "n2-standard-4": (4, 16384), "n2-standard-8": (8, 32768)}


class Server(ThreadingHTTPServer):
    request_queue_size = 128  # (up makes 32 VMs at once, and Google's API takes them)


class FakeCompute:
    def __init__(self, host="127.0.0.1", booter=None):
        self.booter = booter
        self.instances = {}  # (zone, name) -> instance JSON
        self.operations = {}  # name -> operation JSON
        self.firewalls = {}
        self.buckets = {}  # name -> {object name: bytes}
        self.storage_reads = []  # (bucket, object, Authorization header) of every object read
        self.exhausted, self.quota_after, self.transient, self.lost_inserts = set(), None, 0, 0
        self.requests = []  # (method, path) of every request
        self.ids = itertools.count(1)
        self.lock = threading.Lock()
        self.server = Server((host, 0), self.handler())
        self.endpoint = f"http://{host}:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()

    def vms(self):
        return sorted(self.instances.values(), key=lambda i: i["name"])

    # ------------------------------------------------------------------ the API
    def operation(self, project, zone, target, error=None):
        name = f"operation-{next(self.ids)}"
        op = {"kind": "compute#operation", "name": name, "status": "DONE", "progress": 100,
              "targetLink": target, "selfLink": f"projects/{project}/zones/{zone}/operations/{name}"}
        if zone:
            op["zone"] = f"https://www.googleapis.com/compute/v1/projects/{project}/zones/{zone}"
        if error:
            op["error"] = {"errors": [error]}
            op["httpErrorStatusCode"] = 503
        self.operations[name] = op
        return op

    def insert(self, project, zone, body):
        if self.quota_after is not None and len(self.instances) >= self.quota_after:
            return 403, {"error": {"code": 403, "message": "Quota 'CPUS' exceeded.  Limit: 8.0 in region "
                                   f"{zone.rsplit('-', 1)[0]}.", "errors": [{"reason": "quotaExceeded",
                                                                             "message": "Quota 'CPUS' exceeded."}]}}
        name = body["name"]
        target = f"projects/{project}/zones/{zone}/instances/{name}"
        if zone in self.exhausted:
            return 200, self.operation(project, zone, target, {
                "code": "ZONE_RESOURCE_POOL_EXHAUSTED",
                "message": f"The zone 'projects/{project}/zones/{zone}' does not have enough resources available "
                           "to fulfill the request. Try a different zone, or try again later."})
        if (zone, name) in self.instances:
            return 409, {"error": {"code": 409, "message": f"The resource '{target}' already exists"}}
        n = next(self.ids)
        instance = dict(body, id=str(n), status="RUNNING", zone=f"https://www.googleapis.com/compute/v1/projects/"
                        f"{project}/zones/{zone}", selfLink=target,
                        creationTimestamp=time.strftime("%Y-%m-%dT%H:%M:%S.000-00:00", time.gmtime()))
        address = self.booter.insert(zone, instance) if self.booter else None
        for nic in instance.get("networkInterfaces", []):
            # (without a booter: loopback addresses where nothing listens, so that no test sends a packet out)
            nic["networkIP"] = address or f"127.0.2.{n}"
            for access in nic.get("accessConfigs", []):
                access["natIP"] = address or f"127.0.1.{n}"
        self.instances[(zone, name)] = instance
        return 200, self.operation(project, zone, target)

    def storage(self, method, path, query, raw, authorization):
        """Cloud Storage's JSON API, the parts burla uses: buckets made, listed and deleted, objects uploaded
        (uploadType=media), read (alt=media) and deleted."""
        from urllib.parse import parse_qs, unquote

        args = {k: v[0] for k, v in parse_qs(query).items()}
        missing = 404, {"error": {"code": 404, "message": "No such object or bucket."}}
        if path == "/storage/v1/b" and method == "POST":
            name = json.loads(raw)["name"]
            if name in self.buckets:
                return 409, {"error": {"code": 409, "message": "Your previous request to create the named bucket "
                                                              "succeeded and you already own it."}}
            self.buckets[name] = {}
            return 200, {"kind": "storage#bucket", "name": name}
        if m := re.fullmatch(r"/upload/storage/v1/b/([^/]+)/o", path):
            if m.group(1) not in self.buckets:
                return missing
            self.buckets[m.group(1)][args["name"]] = raw
            return 200, {"kind": "storage#object", "bucket": m.group(1), "name": args["name"], "size": str(len(raw))}
        if m := re.fullmatch(r"/storage/v1/b/([^/]+)/o", path):
            if m.group(1) not in self.buckets:
                return missing
            return 200, {"items": [{"name": n} for n in self.buckets[m.group(1)]]}
        if m := re.fullmatch(r"/storage/v1/b/([^/]+)/o/([^/]+)", path):
            bucket, name = m.group(1), unquote(m.group(2))
            if name not in self.buckets.get(bucket, {}):
                return missing
            if method == "DELETE":
                del self.buckets[bucket][name]
                return 204, {}
            self.storage_reads.append((bucket, name, authorization))
            return 200, self.buckets[bucket][name] if args.get("alt") == "media" else {"name": name}
        if m := re.fullmatch(r"/storage/v1/b/([^/]+)", path):
            if m.group(1) not in self.buckets:
                return missing
            if method == "DELETE":
                if self.buckets[m.group(1)]:
                    return 409, {"error": {"code": 409, "message": "The bucket you tried to delete is not empty."}}
                del self.buckets[m.group(1)]
                return 204, {}
        return 404, {"error": {"code": 404, "message": f"not faked: {method} {path}"}}

    def route(self, method, path, query, body):
        if self.transient > 0:
            self.transient -= 1
            return 503, {"error": {"code": 503, "message": "Backend Error (injected)"}}
        m = re.fullmatch(r"/compute/v1/projects/([^/]+)/(.*)", path)
        if not m:
            return 404, {"error": {"code": 404, "message": f"no such path {path}"}}
        project, rest = m.groups()
        if m2 := re.fullmatch(r"zones/([^/]+)/instances", rest):
            zone = m2.group(1)
            if method == "POST":
                return self.insert(project, zone, body)
            return 200, {"items": [i for (z, _), i in self.instances.items() if z == zone and matches(i, query)]}
        if m2 := re.fullmatch(r"zones/([^/]+)/instances/([^/]+)/serialPort", rest):
            if m2.groups() not in self.instances:
                return 404, {"error": {"code": 404, "message": f"The resource '{m2.group(2)}' was not found"}}
            text = self.booter.serial(*m2.groups()) if self.booter else ""
            return 200, {"kind": "compute#serialPortOutput", "contents": text, "start": "0", "next": str(len(text))}
        if m2 := re.fullmatch(r"zones/([^/]+)/instances/([^/]+)", rest):
            zone, name = m2.groups()
            if (zone, name) not in self.instances:
                return 404, {"error": {"code": 404, "message": f"The resource '{name}' was not found"}}
            if method == "DELETE":
                del self.instances[(zone, name)]
                if self.booter:
                    self.booter.delete(zone, name)
                return 200, self.operation(project, zone, f"projects/{project}/zones/{zone}/instances/{name}")
            return 200, self.instances[(zone, name)]
        if rest == "aggregated/instances":
            items = {}
            for (zone, _), i in self.instances.items():
                if matches(i, query):
                    items.setdefault(f"zones/{zone}", {"instances": []})["instances"].append(i)
            return 200, {"items": items}
        if m2 := re.fullmatch(r"(?:zones/[^/]+|global)/operations/([^/]+)(/wait)?", rest):
            op = self.operations.get(m2.group(1))
            return (200, op) if op else (404, {"error": {"code": 404, "message": "no such operation"}})
        if m2 := re.fullmatch(r"zones/([^/]+)/machineTypes/([^/]+)", rest):
            if m2.group(2) not in MACHINE_TYPES:
                return 404, {"error": {"code": 404, "message": f"The resource 'machineTypes/{m2.group(2)}' was not "
                                                               "found"}}
            cpus, memory = MACHINE_TYPES[m2.group(2)]
            return 200, {"name": m2.group(2), "guestCpus": cpus, "memoryMb": memory, "zone": m2.group(1)}
        if m2 := re.fullmatch(r"regions/([^/]+)", rest):
            region = m2.group(1)
            zones = [f"https://www.googleapis.com/compute/v1/projects/{project}/zones/{z}"
                     for z in ZONES.get(region, [])]
            if not zones:
                return 404, {"error": {"code": 404, "message": "no such region"}}
            return 200, {"name": region, "zones": zones}
        if rest == "global/firewalls" and method == "POST":
            self.firewalls[body["name"]] = body
            return 200, self.operation(project, None, f"projects/{project}/global/firewalls/{body['name']}")
        if m2 := re.fullmatch(r"global/firewalls/([^/]+)", rest):
            fw = self.firewalls.get(m2.group(1))
            return (200, fw) if fw else (404, {"error": {"code": 404, "message": "no such firewall"}})
        return 404, {"error": {"code": 404, "message": f"not faked: {method} {path}"}}

    def handler(fake):
        class Handler(BaseHTTPRequestHandler):
            def do(self):
                path, _, query = self.path.partition("?")
                length = int(self.headers.get("Content-Length") or 0)
                raw = self.rfile.read(length) if length else b""
                with fake.lock:
                    fake.requests.append((self.command, path))
                    if path.startswith(("/storage/", "/upload/storage/")):
                        status, answer = fake.storage(self.command, path, query, raw,
                                                      self.headers.get("Authorization"))
                    else:
                        status, answer = fake.route(self.command, path, query, json.loads(raw) if raw else None)
                    lost = fake.lost_inserts > 0 and self.command == "POST" and path.endswith("/instances")
                    fake.lost_inserts -= lost
                if lost:  # made, but the connection drops before the answer
                    self.close_connection = True
                    self.connection.shutdown(2)
                    return
                data = b"" if status == 204 else answer if isinstance(answer, bytes) else json.dumps(answer).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/octet-stream" if isinstance(answer, bytes) else
                                 "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            do_GET = do_POST = do_DELETE = do

            def log_message(self, *args):
                pass

        return Handler


def matches(instance, query):
    """The label filter burla sends: filter=labels.KEY%3DVALUE (or `labels.KEY = VALUE`)."""
    from urllib.parse import parse_qs

    for text in parse_qs(query).get("filter", []):
        m = re.fullmatch(r"\s*labels\.([\w-]+)\s*=\s*\"?([\w-]+)\"?\s*", text)
        if m and instance.get("labels", {}).get(m.group(1)) != m.group(2):
            return False
    return True
