"""Where the cluster is: the cluster= argument, else $BURLA_CLUSTER, else ~/.burla/config.toml, else "local"
(the embedded cluster on this machine). The API key comes the same way: api_key=, $BURLA_API_KEY, the config file
(written by `burla login`)."""

import os
import pathlib
import re
import tomllib


def _config_file():
    return os.environ.get("BURLA_CONFIG") or os.path.join(os.path.expanduser("~"), ".burla", "config.toml")


def config_path():
    return pathlib.Path(_config_file())


_loaded = {}  # path -> (its size and modification time, what it holds): every call reads the config


def load():
    path = _config_file()  # (a str: pathlib's parsing cost more than the rest of a small job's set-up)
    try:
        stat = os.stat(path)
        stamp = (stat.st_size, stat.st_mtime_ns, stat.st_ino)
        cached = _loaded.get(path)
        if cached is not None and cached[0] == stamp:
            return dict(cached[1])
        with open(path, "rb") as f:
            data = tomllib.load(f)
        _loaded[path] = (stamp, data)
        return dict(data)
    except FileNotFoundError:
        return {}
    except tomllib.TOMLDecodeError as e:
        raise ValueError(f"{config_path()} is not valid TOML: {e}") from None


def cluster_address(cluster=None):
    address = cluster or os.environ.get("BURLA_CLUSTER") or load().get("cluster") or "local"
    return "local" if address == "local" else normalize_address(address, "cluster=", local=True)


# HOST is a name or an IPv4 address, or an IPv6 one in brackets; "*" only where the broker binds (every interface).
_TCP = re.compile(r"(?:tcp://)?(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9._-]+|\*):([0-9]{1,5})")


def normalize_address(address, what="address ", bind=False, local=False):
    """The one spelling of a broker's address everywhere (client, worker, login, status): 'HOST:PORT' means
    'tcp://HOST:PORT'; tcp:// and ipc:// addresses stay as given. Anything else is a ValueError that says what an
    address looks like (ZeroMQ's own error for it is a bare "Invalid argument")."""
    text = str(address).strip()
    if text.startswith("ipc://") and len(text) > len("ipc://"):
        return text
    match = _TCP.fullmatch(text)
    if match and 0 < int(match.group(2)) < 65536 and (bind or match.group(1) != "*"):
        return f"tcp://{match.group(1)}:{match.group(2)}"
    hint = ""
    if "://" in text and not text.startswith(("tcp://", "ipc://")):
        hint = f" ({text.split('://')[0]}:// is not a broker's protocol)"
    elif match and match.group(1) == "*" and 0 < int(match.group(2)) < 65536:
        hint = " (* is every interface: only a broker's --bind takes it)"
    elif match or _TCP.fullmatch(text + ":1"):
        hint = " (no port, or a port outside 1-65535)"
    expected = "'local', 'tcp://HOST:PORT' or 'ipc://PATH'" if local else "'tcp://HOST:PORT' or 'ipc://PATH'"
    raise ValueError(f"{what}{address!r}: expected {expected} (or HOST:PORT, short for tcp://HOST:PORT){hint}")


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
    _loaded.pop(path, None)
    return path


def _toml_string(value):
    return '"' + str(value).replace("\\", "\\\\").replace('"', '\\"') + '"'
