"""A worker's cache of job environments: one virtual environment per lock hash, built once and shared by the workers
of a host, evicted least recently used past a size budget.

The cache folder (`burla worker --env-cache`, default ~/.cache/burla/envs):
  <lock hash>/          a venv, complete: it is built in a .build-* folder and renamed into place
  <lock hash>.build     flock held while building, so two workers never build the same environment twice
  <lock hash>.use       flock held shared by every worker running executors in it: eviction skips it
  local-<digest>/       a job's locally installed packages, unzipped; on the executors' PYTHONPATH
  runtime-<hash>/       burla and what its executors import, linked from the worker's own environment and added
                        at the end of every job venv's path, so an executor starts whatever the lock pins

A pin the worker's own environment already satisfies (same name, same version, from an index) is hard-linked from
there instead of downloaded: a client and its workers usually share most of their packages.
"""

import contextlib
import fcntl
import hashlib
import io
import json
import os
import shutil
import subprocess
import sys
import sysconfig
import tempfile
import threading
import time
import zipfile
from dataclasses import dataclass

from burla import env as E
from burla.errors import EnvironmentBuildError

DONE = "burla-env.json"  # written last: a venv folder without it is not one
RUNTIME_ROOTS = ["pyzmq", "cloudpickle", "msgpack", "blosc2"]  # what an executor imports, beside burla itself
INSTALL_TIMEOUT = 30 * 60
PROGRESS_WORDS = ("Collecting", "Downloading", "Building", "Installing", "Resolved", "Prepared", "Installed")


@dataclass(frozen=True)
class Prepared:
    key: str
    python: str  # the interpreter to start executors with
    path: str = ""  # PYTHONPATH: the job's local packages
    hit: bool = False  # found in the cache rather than built
    image: str = ""  # a container image the executors run in (python is then the image's)
    runtime: str = ""  # with an image: the folder of burla and its packages, mounted into the container


def default_root():
    return os.environ.get("BURLA_ENV_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "burla", "envs")


def site_packages(prefix):
    return sysconfig.get_path("purelib", vars={"base": prefix, "platbase": prefix})


def installer(python):
    """(tool name, command that installs the requirements files given after it into that interpreter) or None.
    The job's venv has no pip of its own: uv, or the worker's pip, installs into it from outside."""
    if E.uv():
        return "uv", [E.uv(), "pip", "install", "--no-deps", "--python", python]
    try:
        import pip  # noqa: F401
    except ImportError:
        return None
    return "pip", [sys.executable, "-m", "pip", "--python", python, "install", "--no-deps", "--no-input",
                   "--progress-bar", "off", "--disable-pip-version-check"]


@contextlib.contextmanager
def flock(path, mode):
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, mode)
        yield fd
    finally:
        os.close(fd)


def link_tree(dist, site):
    """Hard-link (or copy, across file systems) a distribution's files into another site-packages folder. Files
    outside its own (scripts, data) are left out."""
    for f in dist.files or ():
        if f.parts and f.parts[0] == "..":
            continue
        src = dist.locate_file(f)
        if not os.path.isfile(src):
            continue
        dst = os.path.join(site, *f.parts)
        os.makedirs(os.path.dirname(dst), exist_ok=True)
        try:
            os.link(src, dst)
        except FileExistsError:
            pass
        except OSError:
            shutil.copy2(src, dst)


def folder_size(path):
    total = 0
    for folder, _, files in os.walk(path):
        for f in files:
            try:
                total += os.lstat(os.path.join(folder, f)).st_size
            except OSError:
                pass
    return total


class EnvCache:
    def __init__(self, root=None, budget_gb=20.0):
        self.root = os.path.abspath(root or default_root())
        os.makedirs(self.root, mode=0o700, exist_ok=True)
        self.budget = budget_gb * 1e9
        self.own = E.installed()  # the worker's own distributions: what it can link instead of download
        self.lock = threading.Lock()  # preparations run in threads; the worker's loop calls use()
        self.in_use = {}  # lock hash -> fd holding a shared flock: eviction leaves these alone
        self.fresh = {}  # lock hash -> when prepared: held until the slots switch into it (see use)
        self.grown = False  # a venv was built since use() last said so
        self.sweep()

    # ------------------------------------------------------------------------------------------ preparing
    def prepare(self, header, archive, say):
        """The environment a job's header names, built if need be. say(text) reports each step."""
        key, lock, py = header.get("k"), header.get("lock"), header.get("py")
        lock_hash, digest = E.parse_key(key)
        if not isinstance(lock, str) or hashlib.sha256(f"{py}\n{lock}".encode()).hexdigest()[:16] != lock_hash:
            raise EnvironmentBuildError("the job's environment key does not match its lock")
        if not isinstance(py, str) or py.split("-")[:2] != sys.implementation.cache_tag.split("-"):
            # Another platform is fine (a Mac client, Linux workers: most packages have wheels for both); another
            # Python version is not: the pinned versions may not exist for it, and pickles may not load.
            raise EnvironmentBuildError(
                f"the job's packages were pinned on {py}, and this worker runs {E.interpreter()}: run the client "
                "on the same Python version as the workers")
        venv = os.path.join(self.root, lock_hash)
        hit = self.hold(lock_hash)  # held from here on: no eviction between finding it and using it
        if not hit:
            with flock(venv + ".build", fcntl.LOCK_EX):
                if os.path.exists(os.path.join(venv, DONE)):
                    say("built by another worker on this host")
                else:
                    self.build(venv, lock, say)
                    self.grown = True
            if not self.hold(lock_hash):
                raise EnvironmentBuildError("the environment was deleted as soon as it was built (is the cache "
                                            "folder shared with a worker whose budget is too small?)")
        os.utime(os.path.join(venv, DONE))  # least recently used goes first
        path = self.unpack(digest, archive) if digest else ""
        return Prepared(key, os.path.join(venv, "bin", "python"), path, hit)

    def prepare_image(self, header, tool, say):
        """A container image for a job: pulled, or built from its Dockerfile, once; its Python must be the
        worker's, since burla and the packages it runs on are mounted into it from the worker's environment."""
        name, dockerfile = header.get("img"), header.get("df") or ""
        if not isinstance(name, str) or not E.IMAGE_NAME.fullmatch(name) or not isinstance(dockerfile, str):
            raise EnvironmentBuildError(f"not an image name: {name!r}")
        # The key must name this image (and this Dockerfile), and a Dockerfile's tag its content: otherwise one
        # client could put its own image under another's key or tag.
        if E.image_key(name, dockerfile) != header.get("k"):
            raise EnvironmentBuildError("the job's environment key does not match its image")
        if dockerfile and name != E.dockerfile_tag(dockerfile):
            raise EnvironmentBuildError("the image of a Dockerfile must be named by its content")
        hit = subprocess.run([tool, "image", "inspect", name], capture_output=True, timeout=60).returncode == 0
        if not hit and dockerfile:
            say(f"building image {name} from the job's Dockerfile with {tool}")
            with tempfile.TemporaryDirectory(prefix="burla-context-") as context:
                run([tool, "build", "-t", name, "-f", "-", context], f"{tool} build", stdin=dockerfile,
                    timeout=INSTALL_TIMEOUT)
        elif not hit:
            say(f"pulling image {name} with {tool}")
            run([tool, "pull", name], f"{tool} pull", timeout=INSTALL_TIMEOUT)
        probe = "import sys; print(sys.implementation.cache_tag)"
        found = run([tool, "run", "--rm", "--network", "none", name, "python3", "-c", probe],
                    f"running python3 in image {name}").strip()
        if found != sys.implementation.cache_tag:
            raise EnvironmentBuildError(
                f"image {name} has Python {found or '(none)'}, and this worker runs "
                f"{sys.implementation.cache_tag}: use an image with the same Python as the workers")
        return Prepared(header["k"], "python3", hit=hit, image=name, runtime=self.runtime())

    def build(self, venv, lock, say):
        started = time.monotonic()
        pins = [line.strip() for line in lock.splitlines() if line.strip()]
        options = [line for line in pins if line.startswith("-")]
        if options:  # a requirements file would take them as installer options (another index, a file to read)
            raise EnvironmentBuildError(f"the job's lock holds installer options, not requirements: {options[:3]}")
        shared, fetch = [], []
        for line in pins:
            name, _, version = line.partition("==")
            own = self.own.get(E.normalize(name))
            if version and own and own[0] == version and E.origin(own[1]) is None and own[1].files:
                shared.append(own[1])
            else:
                fetch.append(line)
        runtime = self.runtime()
        tmp = tempfile.mkdtemp(prefix=".build-", dir=self.root)
        try:
            say(f"creating a virtual environment for {len(pins)} packages")
            run([sys.executable, "-m", "venv", "--without-pip", tmp], "creating the virtual environment")
            site = site_packages(tmp)
            if fetch:
                self.install(tmp, fetch, say)
            if shared:
                say(f"linking {len(shared)} packages from the worker's own environment")
                for dist in shared:
                    link_tree(dist, site)
            with open(os.path.join(site, "_burla_runtime.pth"), "w") as fh:
                fh.write(f"import site; site.addsitedir({runtime!r})\n")  # last on the path: the lock's come first
            fix_scripts(tmp, venv)
            seconds = time.monotonic() - started
            with open(os.path.join(tmp, DONE), "w") as fh:
                json.dump({"lock": lock, "seconds": round(seconds, 3), "size": folder_size(tmp)}, fh)
            os.rename(tmp, venv)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise

    def install(self, prefix, requirements, say):
        found = installer(os.path.join(prefix, "bin", "python"))
        if found is None:
            raise EnvironmentBuildError("this worker has neither uv nor pip to install packages with")
        tool, command = found
        say(f"installing {len(requirements)} package{'s' if len(requirements) > 1 else ''} with {tool}: "
            + ", ".join(requirements[:5]) + (" …" if len(requirements) > 5 else ""))
        listing = os.path.join(prefix, "burla-requirements.txt")
        with open(listing, "w") as fh:
            fh.write("\n".join(requirements) + "\n")
        proc = subprocess.Popen([*command, *E.index_args(), "-r", listing], stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True, stdin=subprocess.DEVNULL)
        watchdog = threading.Timer(INSTALL_TIMEOUT, proc.kill)  # a hung installer must not hang the job
        watchdog.start()
        output, said = [], 0.0
        try:
            for line in proc.stdout:  # pass on what the installer is at, at most twice a second
                output.append(line)
                if time.monotonic() - said >= 0.5 and line.lstrip().startswith(PROGRESS_WORDS):
                    say(line.strip()[:200])
                    said = time.monotonic()
        finally:
            watchdog.cancel()
        if proc.wait() == -9:
            raise EnvironmentBuildError(f"{tool} took over {INSTALL_TIMEOUT // 60} minutes and was stopped")
        if proc.returncode != 0:
            raise EnvironmentBuildError(f"{tool} could not install the job's packages:\n"
                                        f"{E.installer_message(''.join(output))}")

    def runtime(self):
        """A folder with burla and the packages its executors import, linked from the worker's environment."""
        dists, todo = {}, ["burla", *RUNTIME_ROOTS]
        while todo:
            name = E.normalize(todo.pop())
            if name in dists or name not in self.own:
                continue
            dists[name] = self.own[name]
            todo.extend(requirement_names(self.own[name][1]))
        stamp = "".join(f"{n}=={v} {d._path}\n" for n, (v, d) in sorted(dists.items()))
        folder = os.path.join(self.root, "runtime-" + hashlib.sha256(stamp.encode()).hexdigest()[:16])
        if not os.path.isdir(folder):
            with flock(folder + ".build", fcntl.LOCK_EX):
                if not os.path.isdir(folder):
                    tmp = tempfile.mkdtemp(prefix=".build-", dir=self.root)
                    for _, dist in dists.values():
                        link_tree(dist, tmp)
                    os.rename(tmp, folder)
        return folder

    def unpack(self, digest, archive):
        folder = os.path.join(self.root, "local-" + digest)
        if not os.path.isdir(folder):
            if not archive or hashlib.sha256(archive).hexdigest()[:12] != digest:
                raise EnvironmentBuildError("the job's local packages did not arrive intact")
            tmp = tempfile.mkdtemp(prefix=".build-", dir=self.root)
            with zipfile.ZipFile(io.BytesIO(archive)) as z:
                for member in z.namelist():  # never outside the folder
                    if member.startswith("/") or ".." in member.split("/"):
                        raise EnvironmentBuildError(f"bad path in the job's local packages: {member}")
                z.extractall(tmp)
            try:
                os.rename(tmp, folder)
            except OSError:  # another worker got there first
                shutil.rmtree(tmp, ignore_errors=True)
        os.utime(folder)
        return folder

    # ------------------------------------------------------------------------------------------ use and eviction
    def hold(self, lock_hash):
        """Take a shared lock on a complete environment (False if there is none), so that eviction leaves it be."""
        if isinstance(lock_hash, Prepared):
            lock_hash = lock_hash.key.partition("-")[0]
        with self.lock:
            if lock_hash not in self.in_use:
                fd = os.open(os.path.join(self.root, lock_hash + ".use"), os.O_RDWR | os.O_CREAT, 0o600)
                fcntl.flock(fd, fcntl.LOCK_SH)  # an evictor holds it exclusively only while it renames
                if not os.path.exists(os.path.join(self.root, lock_hash, DONE)):
                    os.close(fd)
                    return False
                self.in_use[lock_hash] = fd
            self.fresh[lock_hash] = time.monotonic()
            return True

    def use(self, lock_hashes):
        """Keep holding the environments executors of this worker run in, and those just prepared for slots that
        are about to switch; let go of the rest."""
        with self.lock:
            now = time.monotonic()
            for h in set(lock_hashes):
                self.fresh.pop(h, None)
            keep = set(lock_hashes) | {h for h, when in self.fresh.items() if now - when < 60}
            released = set(self.in_use) - keep
            for h in released:
                os.close(self.in_use.pop(h))
                self.fresh.pop(h, None)
            grown, self.grown = self.grown, False
            return bool(released) or grown  # whether eviction may now find something to do

    def entries(self):
        """(last used, size, lock hash) of each complete environment."""
        found = []
        for name in os.listdir(self.root):
            done = os.path.join(self.root, name, DONE)
            try:
                with open(done) as fh:
                    size = json.load(fh).get("size", 0)
                found.append((os.stat(done).st_mtime, size, name))
            except (OSError, ValueError):
                continue
        return sorted(found)

    def evict(self, keep=()):
        """Delete the least recently used environments until the cache fits its budget; never one in use (the
        worker calls this after its slots switch environments, so the one they left can go)."""
        with flock(os.path.join(self.root, "evict.lock"), fcntl.LOCK_EX):
            self.evict_locked(keep)

    def evict_locked(self, keep):
        entries = self.entries()
        total = sum(size for _, size, _ in entries)
        for _, size, name in entries:
            if total <= self.budget:
                break
            if name in keep:
                continue
            fd = os.open(os.path.join(self.root, name + ".use"), os.O_RDWR | os.O_CREAT, 0o600)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                continue  # some worker holds it: its executors run in it, or are about to
            try:
                if not os.path.exists(os.path.join(self.root, name, DONE)):
                    continue  # gone already
                trash = tempfile.mkdtemp(prefix=".evicted-", dir=self.root)
                os.rename(os.path.join(self.root, name), os.path.join(trash, name))
            finally:
                os.close(fd)  # unlocked before the slow part: a worker taking a hold must not wait on rmtree
            shutil.rmtree(trash, ignore_errors=True)
            total -= size

    def sweep(self):
        """Remove what workers that died while building or evicting left behind (a build runs under an hour)."""
        for name in os.listdir(self.root):
            path = os.path.join(self.root, name)
            if name.startswith((".build-", ".evicted-")) and time.time() - os.stat(path).st_mtime > 3600:
                shutil.rmtree(path, ignore_errors=True)


def requirement_names(dist):
    """Names of what a distribution requires, leaving out extras and other platforms."""
    from packaging.requirements import InvalidRequirement, Requirement

    names = []
    for text in dist.requires or ():
        try:
            req = Requirement(text)
        except InvalidRequirement:
            continue
        if req.marker is None or req.marker.evaluate({"extra": ""}):
            names.append(req.name)
    return names


def fix_scripts(tmp, final):
    """Scripts the installer wrote name their interpreter by the temporary path: point them at the final one."""
    bin_dir = os.path.join(tmp, "bin")
    old, new = f"#!{tmp}/".encode(), f"#!{final}/".encode()
    for name in os.listdir(bin_dir):
        path = os.path.join(bin_dir, name)
        if os.path.islink(path) or not os.path.isfile(path):
            continue
        with open(path, "rb") as fh:
            head = fh.read(len(old))
            if head != old:
                continue
            rest = fh.read()
        with open(path, "wb") as fh:
            fh.write(new + rest)


def run(command, what, stdin=None, timeout=300):
    """Run a command; its output, or EnvironmentBuildError with the end of its output."""
    try:
        done = subprocess.run(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=timeout,
                              input=stdin, stdin=None if stdin is not None else subprocess.DEVNULL)
    except subprocess.TimeoutExpired:
        raise EnvironmentBuildError(f"{what} took over {timeout} s and was stopped") from None
    if done.returncode != 0:
        raise EnvironmentBuildError(f"{what} failed:\n{E.installer_message(done.stdout)}")
    return done.stdout
