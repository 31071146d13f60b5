"""What a Compute Engine VM runs to become the head or a worker of a cluster: its startup script, and the burla
the client ships to it.

The VMs boot a public Debian image, so there is no image to build or push. The client packs the burla it runs
(its own files: the exact version, local changes included) into a wheel that travels in the VMs' metadata; the
startup script installs it with uv into a Python of the client's minor version (uv finds one on the image, or
downloads it), then keeps the broker and the autoscaler (head) or the worker running. It runs again at every boot,
and reinstalls only when the wheel changed.
"""

import base64
import hashlib
import io
import os
import re
import sys
import zipfile
from importlib import metadata

METADATA_URL = "http://169.254.169.254/computeMetadata/v1"  # (metadata.google.internal, without a DNS lookup)
PART = 240_000  # characters of one metadata value (Compute Engine allows 256 KB per value, 512 KB in all)
WHEEL_LIMIT = 360_000  # bytes of wheel that fit, base64 in parts, beside the rest of a VM's metadata
NOTEBOOK_ONLY = {"ipython", "ipywidgets"}  # the client's; nothing on a VM imports them
HEAD_ONLY = {"google-cloud-compute"}  # the autoscaler's; workers do without (and boot faster)
ZIP_DATE = (2020, 1, 1, 0, 0, 0)  # fixed, so that the same files make the same wheel (and digest)


def _record_hash(data):
    return "sha256=" + base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()


def write_wheel(path, name, version, files, requires=(), tag="py3-none-any", compress=True):
    """Write a wheel at path: files ({path in the wheel: bytes}) and a dist-info made from name, version,
    requires (Requires-Dist lines) and tag. Returns path."""
    dist = f"{re.sub(r'[-.]+', '_', name)}-{version}.dist-info"
    files = dict(files)
    files[f"{dist}/METADATA"] = (f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n"
                                 + "".join(f"Requires-Dist: {r}\n" for r in requires)).encode()
    files[f"{dist}/WHEEL"] = (f"Wheel-Version: 1.0\nGenerator: burla\nRoot-Is-Purelib: "
                              f"{'true' if tag.endswith('-none-any') else 'false'}\nTag: {tag}\n").encode()
    record = [f"{member},{_record_hash(data)},{len(data)}" for member, data in files.items()]
    files[f"{dist}/RECORD"] = ("\n".join(record + [f"{dist}/RECORD,,"]) + "\n").encode()
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED if compress else zipfile.ZIP_STORED) as z:
        for member in sorted(files):
            info = zipfile.ZipInfo(member, ZIP_DATE)
            info.compress_type = z.compression
            info.external_attr = 0o644 << 16
            z.writestr(info, files[member])
    return path


def package():
    """(file name, bytes) of a wheel of the burla this process runs: its packages burla, burla.broker and
    burla.worker as they are on disk (the notebook parts stay behind), requiring what they need to run, with
    google-cloud-compute under the extra "head"."""
    import burla

    root = os.path.dirname(os.path.abspath(burla.__file__))
    trees = {"burla": root}
    for role in ("broker", "worker"):  # (in an editable install they are folders beside burla/, not inside)
        module = __import__(f"burla.{role}", fromlist=["_"])
        trees[f"burla/{role}"] = os.path.dirname(os.path.abspath(module.__file__))
    files = {}
    for prefix, folder in trees.items():
        for name in sorted(os.listdir(folder)):
            full = os.path.join(folder, name)
            if name.endswith(".py") and os.path.isfile(full):
                with open(full, "rb") as fh:
                    files[f"{prefix}/{name}"] = fh.read()
    requires = []
    try:
        declared = metadata.requires("burla") or []
    except metadata.PackageNotFoundError:
        declared = []
    for line in declared:
        if ";" in line and "extra" in line.split(";", 1)[1]:
            continue  # (the test and jupyter extras)
        name = re.split(r"[<>=!~\[ ;]", line, maxsplit=1)[0].lower()
        if name in NOTEBOOK_ONLY:
            continue
        requires.append(f"{line}; extra == 'head'" if name in HEAD_ONLY else line)
    files[f"burla-{burla.__version__}.dist-info/entry_points.txt"] = b"[console_scripts]\nburla = burla.cli:main\n"
    buffer = io.BytesIO()
    write_wheel(buffer, "burla", burla.__version__, files, requires)
    return f"burla-{burla.__version__}-py3-none-any.whl", buffer.getvalue()


def write_package(folder):
    """Write package()'s wheel into folder (the dist/ that broker/Dockerfile installs from), after removing any
    other burla wheel there, so that the image's `burla-*.whl` names this one. Returns its path."""
    filename, wheel = package()
    os.makedirs(folder, exist_ok=True)
    for name in os.listdir(folder):
        if name.startswith("burla-") and name.endswith(".whl") and name != filename:
            os.remove(os.path.join(folder, name))
    path = os.path.join(folder, filename)
    with open(path, "wb") as fh:
        fh.write(wheel)
    return path


def wheel_metadata(filename, wheel, url=None):
    """The instance metadata that carries the wheel: its name, digest and base64 in parts; or where it is
    (url: gs://bucket/object) when it is too big for metadata."""
    items = {"burla-wheel": filename, "burla-wheel-sha256": hashlib.sha256(wheel).hexdigest()}
    if url:
        return dict(items, **{"burla-wheel-url": url})
    if len(wheel) > WHEEL_LIMIT:
        raise ValueError(f"burla's wheel is {len(wheel) // 1024} KB, more than the {WHEEL_LIMIT // 1024} KB that "
                         "fit in a VM's metadata")
    text = base64.b64encode(wheel).decode()
    parts = [text[k:k + PART] for k in range(0, len(text), PART)]
    items["burla-wheel-parts"] = str(len(parts))
    items.update({f"burla-wheel-{k}": part for k, part in enumerate(parts)})
    return items


def python_version():
    return f"{sys.version_info.major}.{sys.version_info.minor}"


STARTUP_SCRIPT = r"""#!/bin/bash
# burla: make this VM the head or a worker of a cluster. Compute Engine runs it at every boot; everything it needs
# is in the instance metadata that `burla cluster up` (or the head's autoscaler) wrote.
set -euo pipefail
MD=${BURLA_METADATA:-%(metadata)s}
ROOT=${BURLA_ROOT:-/opt/burla}
RUN_AS=${BURLA_USER:-burla}  # the worker, and so the calls, run unprivileged: they cannot read the head's keys
get() { curl -sf --retry 10 --retry-connrefused --retry-delay 1 -H 'Metadata-Flavor: Google' "$MD/$1"; }
attr() { get "instance/attributes/$1"; }
ROLE=$(attr burla-role)
NAME=$(get instance/name)
mkdir -p "$ROOT" && chmod 755 "$ROOT" && cd "$ROOT"
export PATH="$ROOT/bin:$PATH" UV_PYTHON_INSTALL_DIR="$ROOT/python"
if ! command -v uv >/dev/null; then  # uv brings a Python of the client's version, and installs fast
    curl -LsSf https://astral.sh/uv/install.sh | env UV_INSTALL_DIR="$ROOT/bin" UV_NO_MODIFY_PATH=1 sh
fi
CONTAINERS=""
if [ "$ROLE" != head ] && ! command -v docker >/dev/null && ! command -v podman >/dev/null && command -v apt-get >/dev/null
then  # jobs with image= run in containers: podman, installed while the rest is
    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq podman) > containers.log 2>&1 &
    CONTAINERS=$!
fi
WHEEL=$(attr burla-wheel)
SHA=$(attr burla-wheel-sha256)
if [ "$(cat venv/.burla-wheel 2>/dev/null || true)" != "$SHA" ]; then
    URL=$(attr burla-wheel-url || true)
    if [ -n "$URL" ]; then  # gs://BUCKET/OBJECT, read with the VM's service account
        OBJECT=${URL#gs://*/}; BUCKET=${URL#gs://}; BUCKET=${BUCKET%%%%/*}
        TOKEN=$(get instance/service-accounts/default/token | sed -E 's/.*"access_token" *: *"([^"]+)".*/\1/')
        curl -sf --retry 5 -H "Authorization: Bearer $TOKEN" -o "$WHEEL" \
            "${BURLA_STORAGE_URL:-https://storage.googleapis.com}/storage/v1/b/$BUCKET/o/${OBJECT//\//%%2F}?alt=media"
    else
        : > wheel.b64
        for ((k = 0; k < $(attr burla-wheel-parts); k++)); do attr "burla-wheel-$k" >> wheel.b64; done
        base64 -d wheel.b64 > "$WHEEL" && rm wheel.b64
    fi
    echo "$SHA  $WHEEL" | sha256sum -c --quiet
    rm -rf venv
    uv venv -q --python "$(attr burla-python)" venv
    EXTRA=""; [ "$ROLE" = head ] && EXTRA="[head]"
    # burla-pip-args: where the packages come from, when not PyPI (a mirror, a wheelhouse)
    uv pip install -q --python venv/bin/python $(attr burla-pip-args || true) "$ROOT/$WHEEL$EXTRA"
    echo "$SHA" > venv/.burla-wheel
fi
supervise() {  # UNIT COMMAND...: keep COMMAND running (started again 3 s after it ends); output in UNIT.log
    local unit=$1; shift
    if [ -f "$unit.pid" ] && kill -0 "$(cat "$unit.pid")" 2>/dev/null; then return; fi
    setsid nohup bash -c 'while :; do "$@" || true; echo "burla: exited, starting again in 3 s"; sleep 3; done' \
        "$unit" "$@" >> "$unit.log" 2>&1 < /dev/null &
    echo $! > "$unit.pid"
}
AS=()
if [ "$RUN_AS" != root ] && [ "$(id -u)" = 0 ]; then
    # (not a system user: a regular one gets subordinate ids, which rootless podman needs)
    id -u "$RUN_AS" >/dev/null 2>&1 || useradd --create-home --shell /usr/sbin/nologin "$RUN_AS"
    AS=(setpriv --reuid="$RUN_AS" --regid="$RUN_AS" --init-groups --)
fi
if [ "$ROLE" = head ]; then
    mkdir -p state && chmod 700 state
    [ -f state/broker.secret ] || attr burla-broker-state | base64 -d | tar -xz -C state
    attr burla-cluster > state/cluster.json
    attr burla-wheel-url > state/wheel-url || rm -f state/wheel-url
    get instance/network-interfaces/0/ip > state/address
    supervise broker venv/bin/python -m burla broker --bind tcp://0.0.0.0:%(port)d --state-dir "$ROOT/state"
    supervise autoscaler venv/bin/python -m burla cluster autoscale --state-dir "$ROOT/state" --wheel "$ROOT/$WHEEL"
else
    mkdir -p envs && chown "${RUN_AS}:" envs 2>/dev/null || true
    if [ -n "$CONTAINERS" ] && ! wait "$CONTAINERS"; then
        echo "burla: podman could not be installed (containers.log): jobs with image= will not run here"
    fi
    BROKER=$(attr burla-broker)
    GPUS=$(attr burla-gpus || true)
    BURLA_WORKER_TOKEN=$(attr burla-worker-token) supervise worker "${AS[@]}" venv/bin/python -m burla worker \
        --broker "$BROKER" --name "$NAME" --env-cache "$ROOT/envs" ${GPUS:+--gpus "$GPUS"}
fi
echo "burla: $ROLE $NAME started"
"""


def startup_script(port):
    return STARTUP_SCRIPT % {"metadata": METADATA_URL, "port": port}
