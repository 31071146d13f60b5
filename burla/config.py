"""Where the cluster is: the cluster= argument, else $BURLA_CLUSTER, else ~/.burla/config.toml, else "local"
(the embedded cluster on this machine). The API key comes the same way: api_key=, $BURLA_API_KEY, the config file
(written by `burla login`)."""

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


executor_api_key = None  # in an executor: its job owner's key, for nested calls


def api_key(key=None):
    return key or os.environ.get("BURLA_API_KEY") or executor_api_key or load().get("api_key")


def save(**values):
    """Write values into the config file (private: it may hold an API key)."""
    from burla.security import write_private

    current = load()
    current.update(values)
    path = config_path()
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    write_private(path, "".join(f"{k} = {_toml_string(v)}\n" for k, v in current.items()))
    return path


def _toml_string(value):
    return '"' + str(value).replace("\\", "\\\\").replace('"', '\\"') + '"'
