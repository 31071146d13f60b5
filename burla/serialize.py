"""Turning functions, inputs and results into frames and back.

cloudpickle (protocol 5) for everything: it is as fast as pickle on plain data and also carries lambdas, closures
and classes defined in __main__ or a notebook. Out-of-band buffers (numpy arrays, bytearrays) become frames of their
own and are never copied into the pickle stream. blosc2 compresses large frames only when the link is not local and
the frame actually shrinks; on loopback or ipc compression costs more time than it saves.
"""

import collections
import hashlib
import io
import pickle
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


def dumps_function(function):
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
