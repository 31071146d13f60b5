"""Turning functions, inputs and results into frames and back.

cloudpickle (protocol 5) for everything: it is as fast as pickle on plain data and also carries lambdas, closures
and classes defined in __main__ or a notebook. Out-of-band buffers (numpy arrays, bytearrays) become frames of their
own and are never copied into the pickle stream. blosc2 compresses large frames only when the link is not local and
the frame actually shrinks; on loopback or ipc compression costs more time than it saves.
"""

import array
import collections
import functools
import io
import operator
import os
import pickle
import site
import sys
import sysconfig
import types
import weakref

import cloudpickle

from burla import calling
from burla.protocol import FRAME_MAX, function_digest

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
_NAMES = {}  # code object -> the global names it may use
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


def _global_names(code):
    """The global names a code object and the code nested in it may use (cached: a notebook's globals are many,
    a function's few)."""
    names = _NAMES.get(code)
    if names is None:
        names = set(code.co_names)
        for const in code.co_consts:
            if isinstance(const, types.CodeType):
                names |= _global_names(const)
        if len(_NAMES) > 1024:
            _NAMES.clear()
        _NAMES[code] = names
    return names


def _send_by_value(function):
    """Have cloudpickle carry the user's own modules that the function uses by value: workers on other machines do
    not have them. (Installed packages still go by reference.)"""
    names = {getattr(function, "__module__", None)}
    while isinstance(function, (calling.Star, calling.Call, functools.partial)):  # (what they wrap is the code)
        function = function.func if isinstance(function, functools.partial) else function.function
        names.add(getattr(function, "__module__", None))
    code, scope = getattr(function, "__code__", None), getattr(function, "__globals__", None)
    if code is None or scope is None:  # (a callable object: its class's module is the one to look at)
        scope, used = {}, ()
    else:
        used = _global_names(code)
    for name in used:
        value = scope.get(name)
        if value is not None:
            names.add(value.__name__ if isinstance(value, types.ModuleType) else getattr(value, "__module__", None))
    for name in names - _BY_VALUE:
        module = sys.modules.get(name) if isinstance(name, str) and name != "__main__" else None
        if module is not None and _is_users_own(module):
            _BY_VALUE.add(name)
            try:
                cloudpickle.register_pickle_by_value(module)
            except ValueError:
                pass


_IMMUTABLE = frozenset({int, float, complex, str, bytes, bool, type(None)})
_pickled = weakref.WeakKeyDictionary()  # plain function -> (what its pickle was made of, the pickle, its digest)


def _pickled_from(function):
    """Everything a pickle of this plain function reads, when each part is immutable and held here: while the
    same objects are there, the pickle is the same. None when that cannot be told cheaply (a closure, a mutable
    default or global, a function or class it uses, attributes, annotations): then it is pickled every time."""
    if type(function) is not types.FunctionType or function.__closure__ or function.__dict__ or \
            function.__annotations__:
        return None
    scope = function.__globals__
    # (the module counts are compared as numbers, the rest as objects: an import can change the pickle)
    parts = [(len(sys.modules), len(_BY_VALUE)), function.__code__, function.__defaults__, function.__name__,
             function.__qualname__, function.__module__, function.__doc__]
    kwdefaults = function.__kwdefaults__ or {}  # (a dict: it can change in place)
    for value in (*(function.__defaults__ or ()), *kwdefaults, *kwdefaults.values()):
        if type(value) not in _IMMUTABLE:
            return None
        parts.append(value)
    for name in ("__package__", "__name__", "__path__", "__file__", *sorted(_global_names(function.__code__))):
        value = scope.get(name)
        if type(value) not in _IMMUTABLE and not (type(value) is types.ModuleType and value.__name__ != "__main__"
                                                  and value.__name__ not in _BY_VALUE and
                                                  sys.modules.get(value.__name__) is value):
            return None  # (a module of the user's own, or one not imported, travels by value: it may change)
        parts.append(value)
    return parts


def dumps_function(function):
    """(pickle, digest). A warm loop maps the same function again and again: when its pickle can only be what it
    was (_pickled_from), it is not made again."""
    made_of = _pickled_from(function)
    if made_of is not None:
        cached = _pickled.get(function)
        if cached is not None and len(cached[0]) == len(made_of) and cached[0][0] == made_of[0] and \
                all(map(operator.is_, cached[0][1:], made_of[1:])):
            return cached[1], cached[2]
    _send_by_value(function)
    out = io.BytesIO()
    _FunctionPickler(out, protocol=5).dump(function)
    data = out.getvalue()
    digest = function_digest((data,))
    made_of = made_of and _pickled_from(function)  # (again: _send_by_value may have sent a module by value)
    if made_of is not None:
        _pickled[function] = (made_of, data, digest)
    return data, digest


def loads_function(data):
    return cloudpickle.loads(data)


def serialize_exception(exc):
    """A failed call's exception as one frame, or b"" if it cannot be pickled or is too large (the client then
    raises burla.RemoteError with its type name and message)."""
    try:
        data = cloudpickle.dumps(exc, protocol=5)
    except Exception:
        return b""
    return data if len(data) <= FRAME_MAX else b""


# Frame flags ("z" in BATCH, TASK and RESULT headers), one per frame on the wire:
COMPRESSED = 1  # the buffer this frame belongs to is blosc2-compressed (set on each of its frames)
CONTINUED = 2  # this frame continues the previous frame's buffer (no frame exceeds protocol.FRAME_MAX)
INDEXED = 4  # the buffer is an index of per-item pickles (see pack_items)


class Unloadable:
    """Stands for an item that could not be unpickled: that item's outcome is this error, and only that item's."""

    __slots__ = ("error",)

    def __init__(self, error):
        self.error = error


OUT_OF_BAND_MIN = 64 * 1024  # smaller buffers stay in the pickle: many small arrays would make many frames


def _collect(buffers):
    """A pickle buffer_callback that keeps large buffers out of band (returning True keeps one in the pickle)."""
    def callback(buffer):
        if buffer.raw().nbytes < OUT_OF_BAND_MIN:
            return True
        buffers.append(buffer)
        return False

    return callback


def pack(obj, compress=False):
    """obj -> (flags, frames), one pickle (large buffers out of band)."""
    buffers = []
    stream = cloudpickle.dumps(obj, protocol=5, buffer_callback=_collect(buffers))
    return _to_frames([stream, *(b.raw() for b in buffers)], [0] * (1 + len(buffers)), compress)


class _Custom(Exception):
    pass


class _Watching(pickle.Pickler):
    """Stops at the first object that is not a builtin value or container: only such objects (a class, a custom
    __reduce__, a module the other side may lack) can fail to unpickle, and then each item needs its own pickle.
    (The C pickler: for builtin values it writes what cloudpickle's would, and it starts faster.)"""

    def reducer_override(self, obj):  # (never called for ints, strings, bytes, lists, tuples, dicts, sets)
        raise _Custom


def pack_items(items, compress=False):
    """A list -> (flags, frames) that unpack_items turns back into the list, where an item that cannot be
    unpickled on the other side fails alone. A list of builtin values (which always load) is one pickle; any
    other list is one pickle per item (~0.5 us each) with an index of where each ends."""
    out, buffers = io.BytesIO(), []
    try:
        _Watching(out, protocol=5, buffer_callback=_collect(buffers)).dump(items)
        parts = [out.getvalue(), *(b.raw() for b in buffers)]
        return _to_frames(parts, [0] * len(parts), compress)
    except _Custom:
        pass
    out, buffers, index = io.BytesIO(), [], array.array("Q")
    pickler = cloudpickle.Pickler(out, protocol=5, buffer_callback=_collect(buffers))
    for item in items:
        pickler.dump(item)
        pickler.clear_memo()  # each item loads on its own
        index.append(out.tell())
        index.append(len(buffers))
    parts = [index.tobytes(), out.getvalue(), *(b.raw() for b in buffers)]
    return _to_frames(parts, [INDEXED] + [0] * (len(parts) - 1), compress)


def _to_frames(parts, kinds, compress):
    flags, frames = [], []
    for part, kind in zip(parts, kinds):
        if compress and len(part) >= COMPRESS_MIN:
            packed = _compress(part)
            if len(packed) < 0.9 * len(part):
                part, kind = packed, kind | COMPRESSED
        view = memoryview(part).cast("B")
        for k, piece in enumerate(split(view) or [view]):
            flags.append(kind | (CONTINUED if k else 0))
            frames.append(piece)
    return flags, frames


def split(data):
    """A buffer as frames of at most protocol.FRAME_MAX bytes (views, no copy)."""
    view = memoryview(data).cast("B")
    return [view[k:k + FRAME_MAX] for k in range(0, len(view), FRAME_MAX)]


def join(frames):
    """Frames (zmq.Frame or bytes-like) back into one buffer; a single frame is not copied."""
    views = [f.buffer if hasattr(f, "buffer") else f for f in frames]
    return views[0] if len(views) == 1 else b"".join(views)


def _buffers(flags, frames, stream_pieces=False):
    """[(kind, buffer)] from frames and their flags: pieces joined, decompressed. stream_pieces: the first buffer
    (the pickle stream), if uncompressed, stays a list of pieces for a _Pieces reader."""
    if len(flags) != len(frames) or (flags and flags[0] & CONTINUED):
        raise ValueError("frames do not match their flags")
    groups = []
    for flag, frame in zip(flags, frames):
        if flag & CONTINUED:
            groups[-1][1].append(frame)
        else:
            groups.append((flag, [frame]))
    out = []
    for k, (flag, pieces) in enumerate(groups):
        if k == 0 and stream_pieces and not flag & COMPRESSED and len(pieces) > 1:
            out.append((flag, [p.buffer if hasattr(p, "buffer") else memoryview(p) for p in pieces]))
            continue
        data = join(pieces)
        if flag & COMPRESSED:
            data = _decompress(data)
        out.append((flag, data))
    return out


class _Pieces:
    """A file over a pickle stream's frames: the unpickler copies each large string or bytes object straight out
    of them (readinto), with no joined copy of the whole stream first (a copy, and its page faults)."""

    def __init__(self, views):
        self.views, self.k, self.at = [memoryview(v).cast("B") for v in views], 0, 0

    def readinto(self, buffer):
        out, n = memoryview(buffer).cast("B"), 0
        while n < len(out) and self.k < len(self.views):
            view = self.views[self.k]
            take = min(len(view) - self.at, len(out) - n)
            out[n:n + take] = view[self.at:self.at + take]
            n, self.at = n + take, self.at + take
            if self.at == len(view):
                self.k, self.at = self.k + 1, 0
        return n

    def read(self, size=-1):
        if self.k < len(self.views) and 0 <= size <= len(self.views[self.k]) - self.at:
            data = bytes(self.views[self.k][self.at:self.at + size])  # (the common case: within one frame)
            self.at += size
            if self.at == len(self.views[self.k]):
                self.k, self.at = self.k + 1, 0
            return data
        if size < 0:
            size = sum(len(v) for v in self.views[self.k:]) - self.at
        buffer = bytearray(size)
        return bytes(buffer[:self.readinto(buffer)])

    def readline(self):  # (protocol 5 pickles never need it; pickle asks that it exist)
        line = bytearray()
        while not line.endswith(b"\n") and self.k < len(self.views):
            line += self.read(1)
        return bytes(line)


def unpack(flags, frames):
    if len(frames) == 1 and (not flags or flags == [0]):  # (most batches and results: one plain pickle)
        return pickle.loads(join(frames))
    buffers = [data for _, data in _buffers(flags or [0] * len(frames), frames, stream_pieces=True)]
    if isinstance(buffers[0], list):
        return pickle.load(_Pieces(buffers[0]), buffers=buffers[1:])
    return pickle.loads(buffers[0], buffers=buffers[1:])


def per_item(flags):
    """Whether unpack_items may hold an Unloadable: only per-item pickles can fail one by one."""
    return bool(flags) and bool(flags[0] & INDEXED)


def unpack_items(flags, frames):
    """What pack_items packed. With an index, an item that fails to unpickle is an Unloadable in its place."""
    if not flags or not flags[0] & INDEXED:
        return unpack(flags, frames)
    buffers = _buffers(flags, frames)
    index = array.array("Q")
    index.frombytes(buffers[0][1])
    stream, oob = memoryview(buffers[1][1]), [data for _, data in buffers[2:]]
    items, start, first = [], 0, 0
    for k in range(0, len(index), 2):
        end, last = index[k], index[k + 1]
        try:
            items.append(pickle.loads(stream[start:end], buffers=oob[first:last]))
        except Exception as e:
            items.append(Unloadable(e))
        start, first = end, last
    return items


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
