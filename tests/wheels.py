"""Tiny pure-Python wheels written by hand, so environment tests need no index and no build backend."""

import base64
import hashlib
import json
import os
import zipfile


def make_wheel(folder, name, version, code="", requires=()):
    """Write {name}-{version}-py3-none-any.whl with a package `name` whose VERSION is version."""
    dist = f"{name}-{version}.dist-info"
    files = {
        f"{name}/__init__.py": f"VERSION = {version!r}\n{code}",
        f"{dist}/METADATA": f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n"
                            + "".join(f"Requires-Dist: {r}\n" for r in requires),
        f"{dist}/WHEEL": "Wheel-Version: 1.0\nGenerator: burla-tests\nRoot-Is-Purelib: true\nTag: py3-none-any\n",
    }
    record = []
    for path, text in files.items():
        digest = base64.urlsafe_b64encode(hashlib.sha256(text.encode()).digest()).rstrip(b"=").decode()
        record.append(f"{path},sha256={digest},{len(text.encode())}")
    files[f"{dist}/RECORD"] = "\n".join(record + [f"{dist}/RECORD,,"]) + "\n"
    path = os.path.join(folder, f"{name}-{version}-py3-none-any.whl")
    with zipfile.ZipFile(path, "w") as z:
        for member, text in files.items():
            z.writestr(member, text)
    return path


def install(wheel, site, local_from=None):
    """Install a pure wheel by unzipping it (what pip does for one); local_from marks it as installed from that
    local folder (direct_url.json), as `pip install ./folder` would."""
    with zipfile.ZipFile(wheel) as z:
        z.extractall(site)
        dist = next(n.split("/")[0] for n in z.namelist() if n.split("/")[0].endswith(".dist-info"))
    if local_from:
        with open(os.path.join(site, dist, "direct_url.json"), "w") as fh:
            json.dump({"url": f"file://{local_from}", "dir_info": {}}, fh)
