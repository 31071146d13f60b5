"""The job's Python environment: the lock the client pins, and the key that names it.

By default a job runs in the client's own environment: every installed distribution at its exact version, in the
requirements format pip-tools writes (`name==version`, or `name @ url` for one installed from a URL or VCS).
Distributions installed from a local folder or file (editable installs among them) cannot be fetched by name, so
their importable packages travel with the job as a small zip archive. `packages=[...]` replaces the pins with that
list resolved by pip-compile (or `uv pip compile` where uv is installed: same output, faster).

The key is a hash of the interpreter (implementation, version, platform) and the lock, plus the archive's digest:
workers build one virtual environment per lock hash and keep it (see burla.worker.envs).
"""

import hashlib
import io
import json
import os
import pathlib
import re
import shutil
import stat
import subprocess
import sys
import sysconfig
import tempfile
import zipfile
from dataclasses import dataclass
from importlib import metadata

from burla.errors import EnvironmentBuildError

# Never pinned: pip is the installer, not part of an environment; every worker brings its own burla (it must speak
# its broker's protocol) and the packages burla itself runs on when a job's lock lacks them.
UNPINNED = {"pip", "burla"}
ARCHIVE_LIMIT = 64 * 2**20  # local packages bigger than this are refused: they belong in an index or an image


@dataclass(frozen=True)
class Environment:
    key: str  # lock hash, then "-" and the archive digest when local packages travel with the job
    lock: str  # one requirement per line
    interpreter: str  # e.g. "cpython-311-linux-x86_64": a lock is only valid for that
    archive: bytes = b""  # zip of the local packages' import trees, extracted onto the worker's sys.path
    image: str = ""  # or: a container image the calls run in ("img-" keys)
    dockerfile: str = ""  # what the image is built from, if given

    def header(self):
        if self.image:
            return {"k": self.key, "img": self.image, **({"df": self.dockerfile} if self.dockerfile else {})}
        return {"k": self.key, "lock": self.lock, "py": self.interpreter}


IMAGE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._/:@+-]*")  # never an option ("-..."), never two words


def image(name=None, dockerfile=None):
    """The Environment of a container image: one by name, or one built from a Dockerfile (named by its content,
    so a changed file is a new image)."""
    if name is not None and dockerfile is not None:
        raise ValueError("give image= or dockerfile=, not both")
    text = ""
    if dockerfile is not None:
        try:
            with open(os.fspath(dockerfile)) as fh:
                text = fh.read()
        except (OSError, TypeError) as e:
            raise ValueError(f"dockerfile must be the path of a Dockerfile: {e}") from None
        name = dockerfile_tag(text)
    if not isinstance(name, str) or not IMAGE_NAME.fullmatch(name):
        raise ValueError(f"image must be an image name like 'python:3.11-slim', not {name!r}")
    return Environment(image_key(name, text), "", interpreter(), image=name, dockerfile=text)


def dockerfile_tag(text):
    return "localhost/burla-job:" + hashlib.sha256(text.encode()).hexdigest()[:16]


def image_key(name, dockerfile=""):
    return "img-" + hashlib.sha256(f"{name}\n{dockerfile}".encode()).hexdigest()[:16]


def interpreter():
    return f"{sys.implementation.cache_tag}-{sysconfig.get_platform()}".replace("_", "-")


def python():
    """This interpreter as workers and jobs name it (REGISTER's and SUBMIT's py): a pickled function loads on
    the same one."""
    return sys.implementation.cache_tag


def python_name(tag):
    """"cpython-312" -> "Python 3.12" (what a user reads); another implementation's tag as it is."""
    found = re.fullmatch(r"cpython-(\d)(\d+)", tag or "")
    return f"Python {found[1]}.{found[2]}" if found else str(tag)


def normalize(name):
    return re.sub(r"[-_.]+", "-", name).lower()


def make(lock_lines, archive=b""):
    lock = "".join(sorted(set(line + "\n" for line in lock_lines), key=str.lower))
    py = interpreter()
    key = hashlib.sha256(f"{py}\n{lock}".encode()).hexdigest()[:16]
    if archive:
        key += "-" + hashlib.sha256(archive).hexdigest()[:12]
    return Environment(key, lock, py, archive)


def parse_key(key):
    """(lock hash, archive digest or "") of a key, or ValueError."""
    lock_hash, _, digest = str(key).partition("-")
    if not re.fullmatch(r"[0-9a-f]{16}", lock_hash) or not re.fullmatch(r"(|[0-9a-f]{12})", digest):
        raise ValueError(f"not an environment key: {key!r}")
    return lock_hash, digest


# ---------------------------------------------------------------------------------------------- the client's own
def search_path():
    """Where this interpreter's distributions are: sys.path without the current and the script's folder (a
    project's own *.egg-info there is not an installed package)."""
    return [p for p, _ in _search_stamp()]


def _search_stamp():
    """((folder, its modification time), ...) for the search path: one stat a folder (this runs every job)."""
    skip = {"", os.getcwd()}
    main = getattr(sys.modules.get("__main__"), "__file__", None)
    if main:
        skip.add(os.path.dirname(os.path.abspath(main)))
    out = []
    for p in sys.path:
        if p not in skip:
            try:
                st = os.stat(p)
            except OSError:
                continue
            if stat.S_ISDIR(st.st_mode):
                out.append((p, st.st_mtime_ns))
    return tuple(out)


def installed(path=None):
    """normalized name -> (version, Distribution), the first on the path winning as it does for imports. Names and
    versions come from the .dist-info folder names where they can: parsing every METADATA file costs ~2 ms each."""
    found = {}
    for folder in path or search_path():
        try:
            entries = sorted(os.listdir(folder))
        except OSError:
            continue
        for entry in entries:
            if not entry.endswith((".dist-info", ".egg-info")):
                continue
            dist = metadata.PathDistribution(pathlib.Path(folder, entry))
            name, _, version = entry.rpartition(".")[0].partition("-")
            if entry.endswith(".egg-info") or not version:
                name, version = dist.metadata["Name"], dist.version
            if name and normalize(name) not in found:
                found[normalize(name)] = (version, dist)
    return found


def origin(dist):
    """None for a distribution from an index; "local" for one from a local folder or file; else its URL."""
    try:
        info = json.loads(dist.read_text("direct_url.json") or "null")
    except ValueError:
        return None
    if not isinstance(info, dict) or not info.get("url"):
        return None
    url = info["url"]
    if url.startswith("file:"):
        # a folder (editable or not) is the user's own code: it travels with the job. A wheel or sdist file
        # installed by path is pinned by name and version like one from an index.
        return "local" if "dir_info" in info else None
    vcs = info.get("vcs_info")
    if vcs:
        return f"{vcs['vcs']}+{url}@{vcs.get('commit_id') or vcs.get('requested_revision') or ''}".rstrip("@")
    return url


_current = {}


def current():
    """The Environment of this interpreter (cached until a folder on the search path changes)."""
    stamp = _search_stamp()
    path = [p for p, _ in stamp]
    cached = _current.get("env")
    if cached is not None and cached[0] == stamp:
        env = cached[1]
        if not env.archive or _current.get("archive_stamp") == _archive_stamp(_current["local"]):
            return env
    pins, local = pins_and_local(path)
    trees = _local_trees(local)
    env = make(pins, _archive(trees))
    _current.update(env=(stamp, env), local=trees, archive_stamp=_archive_stamp(trees))
    return env


def pins_and_local(path=None):
    """(requirement lines, distributions installed from a local folder) of this interpreter's environment."""
    pins, local = [], []
    for name, (version, dist) in installed(path).items():
        if name in UNPINNED:
            continue
        where = origin(dist)
        if where == "local":
            local.append(dist)
        elif where:
            pins.append(f"{name} @ {where}")
        else:
            pins.append(f"{name}=={version}")
    return pins, local


def _top_level_names(dist):
    text = dist.read_text("top_level.txt")
    if text:
        return set(text.split())
    names = set()
    for f in dist.files or ():
        first = f.parts[0]
        if first in ("..", "__pycache__") or first.endswith((".dist-info", ".egg-info", ".pth")) \
                or first.startswith("__editable__"):
            continue
        names.add(first[:-3] if first.endswith(".py") else first)
    if not names:  # an editable install whose files are only an import hook: look in the project folder
        info = json.loads(dist.read_text("direct_url.json") or "{}")
        root = info.get("url", "")[len("file://"):]
        for base in (os.path.join(root, "src"), root):
            if os.path.isdir(base):
                for entry in os.listdir(base):
                    if entry not in ("tests", "test", "docs", "examples", "benchmarks") and \
                            os.path.isfile(os.path.join(base, entry, "__init__.py")):
                        names.add(entry)
                if names:
                    break
    return {n for n in names if n.isidentifier()}


def _local_trees(dists):
    """(import name, file or folder) for each top-level module of locally installed distributions."""
    import importlib.util

    trees = []
    for dist in dists:
        for name in sorted(_top_level_names(dist)):
            try:
                spec = importlib.util.find_spec(name)
            except (ImportError, ValueError):
                spec = None
            if spec is None:
                continue
            if spec.submodule_search_locations:
                trees.extend((name, p) for p in spec.submodule_search_locations if os.path.isdir(p))
            elif spec.origin and os.path.isfile(spec.origin):
                trees.append((name, spec.origin))
    return trees


def _tree_files(trees):
    for name, path in trees:
        if os.path.isfile(path):
            yield os.path.basename(path), path
            continue
        for folder, dirs, files in os.walk(path):
            dirs[:] = sorted(d for d in dirs if d != "__pycache__" and not d.startswith("."))
            for f in sorted(files):
                if not f.endswith((".pyc", ".pyo")):
                    full = os.path.join(folder, f)
                    yield os.path.join(name, os.path.relpath(full, path)), full


def _archive_stamp(trees):
    return tuple((arc, os.stat(full).st_mtime_ns) for arc, full in _tree_files(trees))


def _archive(trees):
    """A zip of the trees, byte for byte the same for the same files (so its digest names them)."""
    if not trees:
        return b""
    buf, total = io.BytesIO(), 0
    with zipfile.ZipFile(buf, "w") as z:
        for arc, full in _tree_files(trees):
            with open(full, "rb") as fh:
                data = fh.read()
            total += len(data)
            if total > ARCHIVE_LIMIT:
                raise EnvironmentBuildError(
                    f"the locally installed packages {sorted({n for n, _ in trees})} hold over "
                    f"{ARCHIVE_LIMIT >> 20} MiB: publish them to an index, or pass packages=[...]")
            z.writestr(zipfile.ZipInfo(arc, date_time=(1980, 1, 1, 0, 0, 0)), data)
    return buf.getvalue()


# ---------------------------------------------------------------------------------------------- packages=[...]
def index_args():
    """pip's own settings for where packages come from (PIP_INDEX_URL, PIP_EXTRA_INDEX_URL, PIP_FIND_LINKS,
    PIP_NO_INDEX), as command-line options that pip, pip-compile and uv all understand."""
    args = []
    if os.environ.get("PIP_INDEX_URL"):
        args += ["--index-url", os.environ["PIP_INDEX_URL"]]
    for url in os.environ.get("PIP_EXTRA_INDEX_URL", "").split():
        args += ["--extra-index-url", url]
    for link in os.environ.get("PIP_FIND_LINKS", "").split():
        args += ["--find-links", link]
    if os.environ.get("PIP_NO_INDEX", "").lower() in ("1", "true", "yes", "on"):
        args.append("--no-index")
    return args


def uv():
    """uv's path if it is to be used: where installed (on PATH or beside this interpreter), unless
    BURLA_INSTALLER=pip says otherwise."""
    if os.environ.get("BURLA_INSTALLER", "").lower() == "pip":
        return None
    beside = os.path.join(os.path.dirname(sys.executable), "uv")
    return shutil.which("uv") or (beside if os.access(beside, os.X_OK) else None)


_resolved = {}


def resolve(packages):
    """An Environment of exactly these requirements and what they depend on, pinned by pip-compile (or uv)."""
    if isinstance(packages, (str, bytes)) or not all(isinstance(p, str) and p.strip() for p in packages):
        raise TypeError(f"packages must be a list of requirement strings like 'numpy==2.1', not {packages!r}")
    bad = [p for p in packages if "\n" in p or p.lstrip().startswith("-")]
    if bad:
        raise ValueError(f"packages must be requirements, not options or several lines: {bad!r}")
    packages = sorted(p.strip() for p in packages)
    cache_key = (tuple(packages), tuple(index_args()))
    if cache_key not in _resolved:
        _resolved[cache_key] = make(_compile(packages))
    return _resolved[cache_key]


def _compile(packages):
    with tempfile.TemporaryDirectory(prefix="burla-lock-") as tmp:
        requirements = os.path.join(tmp, "requirements.in")
        with open(requirements, "w") as fh:
            fh.write("\n".join(packages) + "\n")
        if uv():
            command = [uv(), "pip", "compile", "--quiet", "--no-header", "--no-annotate", "--python",
                       sys.executable, *index_args(), requirements]
        else:
            command = [sys.executable, "-m", "piptools", "compile", "--quiet", "--no-header", "--no-annotate",
                       "--strip-extras", "--allow-unsafe", "--no-emit-index-url", "--no-emit-find-links",
                       *index_args(), "--output-file", "-",
                       requirements]
        try:
            done = subprocess.run(command, capture_output=True, text=True, timeout=600, cwd=tmp)
        except subprocess.TimeoutExpired:
            raise EnvironmentBuildError(f"resolving packages={packages!r} took over 10 minutes") from None
    if done.returncode != 0:
        raise EnvironmentBuildError(f"could not resolve packages={packages!r}:\n{installer_message(done.stderr)}")
    lines = [re.split(r"(^|\s)#", line)[0].strip() for line in done.stdout.splitlines()]  # (not url#fragments)
    return [line for line in lines if line and not line.startswith("-")]


def installer_message(output, tail=20):
    """The part of pip's, pip-compile's or uv's output that says what went wrong: its error lines (not the
    traceback pip-compile adds), else its last lines."""
    lines = [line.rstrip() for line in output.strip().splitlines() if line.strip()]
    errors = [line for line in lines
              if line.lstrip().lower().startswith(("error", "cause:", "hint:", "help:", "×", "╰─▶", "because"))]
    return "\n".join(errors or lines[-tail:])


def for_job(packages=None):
    """The Environment a job asks for: the client's own (None), exactly packages, or none at all ([]: whatever
    each worker has)."""
    if packages is None:
        return current()
    if isinstance(packages, (list, tuple)) and not packages:
        return None
    return resolve(packages)
