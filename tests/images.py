"""A container image holding this machine's Python and nothing else, made without a registry: the interpreter, its
standard library and the shared libraries they load, imported into podman as a root file system."""

import glob
import io
import os
import subprocess
import sys
import sysconfig
import tarfile

SKIP = {"site-packages", "dist-packages", "test", "tests", "__pycache__", "idlelib", "tkinter", "turtledemo",
        "ensurepip", "lib2to3"}
MARKER = "/etc/burla-test-image"


def shared_libraries(binaries):
    """The libraries ldd says these binaries load."""
    libs = set()
    for chunk in range(0, len(binaries), 200):
        out = subprocess.run(["ldd", *binaries[chunk:chunk + 200]], capture_output=True, text=True).stdout
        for line in out.splitlines():
            parts = line.split()
            path = parts[2] if len(parts) >= 3 and parts[1] == "=>" else parts[0] if parts else ""
            if path.startswith("/") and "site-packages" not in path:  # those come with the mounted packages
                libs.add(os.path.normpath(path))
    return libs


def python_rootfs(tar_path, extra_binaries=()):
    """Write a root file system tarball: the interpreter at its own path (so it finds its own prefix), its
    standard library, python3 on PATH, the libraries all of these (and extra_binaries) load, and MARKER."""
    exe = os.path.realpath(sys._base_executable)
    files = {exe}
    for root in {sysconfig.get_path("stdlib"), sysconfig.get_path("platstdlib")}:
        for folder, dirs, names in os.walk(root):
            dirs[:] = [d for d in dirs if d not in SKIP]
            files.update(os.path.join(folder, n) for n in names if not n.endswith(".pyc") and "_tkinter" not in n)
    libdir = sysconfig.get_config_var("LIBDIR") or ""
    files.update(glob.glob(os.path.join(libdir, "libpython3*.so*")))
    binaries = [f for f in files if f.endswith(".so") or ".so." in f or f == exe] + list(extra_binaries)
    files.update(shared_libraries(binaries))
    with tarfile.open(tar_path, "w") as tar:
        seen = set()

        def add(path):
            """A file, and every symbolic link on the way to it (/lib64 -> /usr/lib64, lib.so.6 -> lib.so.6.0)."""
            parts = path.strip("/").split("/")
            for i in range(1, len(parts) + 1):
                prefix = "/" + "/".join(parts[:i])
                if prefix in seen:
                    continue
                if os.path.islink(prefix):
                    seen.add(prefix)
                    tar.add(prefix, arcname=prefix.lstrip("/"), recursive=False)
                    add(os.path.normpath(os.path.join(os.path.dirname(prefix), os.readlink(prefix))))
                    add("/" + "/".join([os.path.realpath(prefix).strip("/"), *parts[i:]]))
                    return
                if i == len(parts) and os.path.isfile(prefix):
                    seen.add(prefix)
                    tar.add(prefix, arcname=prefix.lstrip("/"), recursive=False)

        for path in sorted(files):
            add(path)
        for name, target in (("usr/local/bin/python3", exe), ("usr/bin/python3", exe)):
            info = tarfile.TarInfo(name)
            info.type, info.linkname = tarfile.SYMTYPE, target
            tar.addfile(info)
        for folder in ("tmp", "etc"):
            info = tarfile.TarInfo(folder)
            info.type, info.mode = tarfile.DIRTYPE, 0o1777 if folder == "tmp" else 0o755
            tar.addfile(info)
        data = b"burla test image\n"
        info = tarfile.TarInfo(MARKER.lstrip("/"))
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))


def native_modules(folder):
    """Compiled extension modules under a folder (the worker's packages mounted into a container need their
    libraries in the image too)."""
    return [p for p in glob.glob(os.path.join(folder, "**", "*.so*"), recursive=True) if os.path.isfile(p)]
