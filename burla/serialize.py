"""Turning functions, inputs and results into frames and back.

cloudpickle (protocol 5) for everything: it is as fast as pickle on plain data and also carries lambdas, closures
and classes defined in __main__ or a notebook. Out-of-band buffers (numpy arrays, bytearrays) become frames of their
own and are never copied into the pickle stream. blosc2 compresses large frames only when the link is not local and
the frame actually shrinks; on loopback or ipc compression costs more time than it saves.
"""

import collections
import hashlib
import io
import os
import pickle
import site
import sys
import sysconfig
import types

import cloudpickle

COMPRESS_MIN = 64 * 1024  # smaller frames are not worth a compression attempt
_blosc2 = None  # imported on first use: importing blosc2 costs ~0.2 s (it brings numpy)


def _code_reduce_keeping_filename(code):
    # cloudpickle blanks co_filename (to make payloads deterministic); keep it, so that remote tracebacks name the
    # user's file and line.
    constructor, args = cloudpickle.cloudpickle._code_reduce(code)
    return constructor, tuple(code.co_filename if a == "<dynamic-code>" else a for a in args)


class _FunctionPickler(cloudpickle.Pickler):
    if hasattr(cloudpickle.cloudpickle, "_code_reduce"):
        dispatch_table = collections.ChainMap({types.CodeType: _code_reduce_keeping_filename},
                                              cloudpickle.Pickler.dispatch_table)


def _installed_roots():
    roots = {sysconfig.get_paths()[k] for k in ("stdlib", "platstdlib", "purelib", "platlib")}
    roots.update(site.getsitepackages() + [site.getusersitepackages()])
    roots.add(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # burla itself
    return tuple(os.path.realpath(r) + os.sep for r in roots if r)


_INSTALLED = _installed_roots()


_BY_VALUE = set()  # module names already registered with cloudpickle
_OWN = {}  # module file -> whether it is the user's own (realpath costs system calls: ask once per file)


def _is_users_own(module):
    """A module of the user's own code: a file outside the standard library and site-packages (a script's
    neighbour, a notebook's folder, an editable install)."""
    path = getattr(module, "__file__", None)
    if not path:
        return False
    if path not in _OWN:
        _OWN[path] = not os.path.realpath(path).startswith(_INSTALLED)
    return _OWN[path]


def _send_by_value(function):
    """Have cloudpickle carry the user's own modules that the function uses by value: workers on other machines do
    not have them. (Installed packages still go by reference.)"""
    names = {getattr(function, "__module__", None)}
    for value in getattr(function, "__globals__", {}).values():
        names.add(value.__name__ if isinstance(value, types.ModuleType) else getattr(value, "__module__", None))
    for name in names - _BY_VALUE:
        module = sys.modules.get(name) if isinstance(name, str) and name != "__main__" else None
        if module is not None and _is_users_own(module):
            _BY_VALUE.add(name)
            try:
                cloudpickle.register_pickle_by_value(module)
            except ValueError:
                pass


def dumps_function(function):
    _send_by_value(function)
    out = io.BytesIO()
    _FunctionPickler(out, protocol=5).dump(function)
    data = out.getvalue()
    return data, hashlib.blake2b(data, digest_size=16).digest()


def loads_function(data):
    return cloudpickle.loads(data)


def serialize_exception(exc):
    return cloudpickle.dumps(exc, protocol=5)


def pack(obj, compress=False):
    """obj -> (flags, frames); flags[k] is 1 where frame k is blosc2-compressed."""
    buffers = []
    frames = [cloudpickle.dumps(obj, protocol=5, buffer_callback=buffers.append)]
    frames += [b.raw() for b in buffers]
    flags = [0] * len(frames)
    if compress:
        for k, frame in enumerate(frames):
            if len(frame) >= COMPRESS_MIN:
                packed = _compress(frame)
                if len(packed) < 0.9 * len(frame):
                    frames[k], flags[k] = packed, 1
    return flags, frames


def unpack(flags, frames):
    buffers = []
    for k, frame in enumerate(frames):
        data = frame.buffer if hasattr(frame, "buffer") else frame
        if flags and flags[k]:
            data = _decompress(data)
        buffers.append(data)
    return pickle.loads(buffers[0], buffers=buffers[1:])


def _codec():
    global _blosc2
    if _blosc2 is None:
        import blosc2

        _blosc2 = blosc2
    return _blosc2


def _compress(data):
    blosc2 = _codec()
    return blosc2.compress2(memoryview(data).cast("B"), clevel=1, codec=blosc2.Codec.LZ4, typesize=1)


def _decompress(data):
    return _codec().decompress2(bytes(data) if not isinstance(data, bytes) else data)
