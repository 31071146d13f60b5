"""Where the cluster is: the cluster= argument, else $BURLA_CLUSTER, else ~/.burla/config.toml, else "local"
(the embedded cluster on this machine)."""

import os
import pathlib
import tomllib


def config_path():
    return pathlib.Path(os.environ.get("BURLA_CONFIG", pathlib.Path.home() / ".burla" / "config.toml"))


def load():
    try:
        with open(config_path(), "rb") as f:
            return tomllib.load(f)
    except FileNotFoundError:
        return {}
    except tomllib.TOMLDecodeError as e:
        raise ValueError(f"{config_path()} is not valid TOML: {e}") from None


def cluster_address(cluster=None):
    address = cluster or os.environ.get("BURLA_CLUSTER") or load().get("cluster") or "local"
    if address != "local" and not address.startswith(("tcp://", "ipc://")):
        raise ValueError(f"cluster={address!r}: expected 'local', 'tcp://HOST:PORT' or 'ipc://PATH'")
    return address
