"""Tiny pure-Python wheels written by hand, so environment tests need no index and no build backend."""

import json
import os
import re
import zipfile
from importlib import metadata

from burla.bootstrap import write_wheel


def make_wheel(folder, name, version, code="", requires=()):
    """Write {name}-{version}-py3-none-any.whl with a package `name` whose VERSION is version."""
    files = {f"{name}/__init__.py": f"VERSION = {version!r}\n{code}".encode()}
    return write_wheel(os.path.join(folder, f"{name}-{version}-py3-none-any.whl"), name, version, files, requires)


def repack(dist, folder):
    """A wheel of an installed distribution, made from its installed files (what it was installed from, but for
    the scripts an installer writes), so that tests can install this machine's packages with no index."""
    tags = [line.split(":", 1)[1].strip() for line in (dist.read_text("WHEEL") or "").splitlines()
            if line.startswith("Tag:")]
    info = next((str(f).split("/")[0] for f in dist.files if str(f).split("/")[0].endswith(".dist-info")), None)
    if info is None:  # (an egg-info or a source tree on sys.path: not what an installer put there)
        raise ValueError(f"{dist.metadata['Name']} is not an installed wheel: cannot repack it")
    files = {}
    for f in dist.files:
        path = str(f)
        if path.startswith("..") or "__pycache__" in path or path.startswith(info + "/"):
            continue  # (scripts and data outside site-packages; the dist-info is written again)
        full = dist.locate_file(f)
        if os.path.isfile(full):
            with open(full, "rb") as fh:
                files[path] = fh.read()
    name, version, tag = dist.metadata["Name"], dist.version, (tags or ["py3-none-any"])[0]
    for extra in ("entry_points.txt", "top_level.txt"):
        text = dist.read_text(extra)
        if text:  # (beside the METADATA write_wheel writes, under the name it gives the dist-info)
            files[f"{re.sub(r'[-.]+', '_', name)}-{version}.dist-info/{extra}"] = text.encode()
    wheel = os.path.join(folder, f"{re.sub(r'[-.]+', '_', name)}-{version}-{tag}.whl")
    return write_wheel(wheel, name, version, files, dist.requires or [], tag, compress=False)


def wheelhouse(folder, names):
    """Wheels of the installed distributions names and everything they require (with their extras' markers
    false), in folder: an index for `--no-index --find-links folder`."""
    from packaging.requirements import Requirement

    os.makedirs(folder, exist_ok=True)
    todo, seen = list(names), set()
    while todo:
        req = Requirement(todo.pop())
        key = re.sub(r"[-_.]+", "-", req.name).lower()
        if key in seen:
            continue
        seen.add(key)
        dist = metadata.distribution(req.name)
        repack(dist, folder)
        for line in dist.requires or []:
            r = Requirement(line)
            if r.marker is None or r.marker.evaluate({"extra": ""}) or any(
                    r.marker.evaluate({"extra": e}) for e in req.extras):
                todo.append(line.split(";")[0])
    return folder


def install(wheel, site, local_from=None):
    """Install a pure wheel by unzipping it (what pip does for one); local_from marks it as installed from that
    local folder (direct_url.json), as `pip install ./folder` would."""
    with zipfile.ZipFile(wheel) as z:
        z.extractall(site)
        dist = next(n.split("/")[0] for n in z.namelist() if n.split("/")[0].endswith(".dist-info"))
    if local_from:
        with open(os.path.join(site, dist, "direct_url.json"), "w") as fh:
            json.dump({"url": f"file://{local_from}", "dir_info": {}}, fh)
