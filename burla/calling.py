"""How a job's function is called on each input, when that is not simply function(input): small picklable
wrappers the client puts around the user's function. The executor leaves their frames out of remote tracebacks
(like its own), so a traceback starts at the user's code."""

import inspect
import weakref


class Star:
    """function(*input) for a tuple input, function(input) otherwise: for a function that needs more than one
    positional argument, as upstream Burla unpacks tuples (see wants_unpacking)."""

    __slots__ = ("function",)

    def __init__(self, function):
        self.function = function

    def __call__(self, value):
        return self.function(*value) if type(value) is tuple else self.function(value)


class Call:
    """An input is (args, kwargs or None): what burla.Executor.submit(function, *args, **kwargs) sends."""

    __slots__ = ("function",)

    def __init__(self, function):
        self.function = function

    def __call__(self, value):
        args, kwargs = value
        return self.function(*args, **kwargs) if kwargs else self.function(*args)


def call_any(value):
    """An input is (function, args, kwargs or None): for callables that each come once (joblib's batches)."""
    function, args, kwargs = value
    return function(*args, **kwargs) if kwargs else function(*args)


_unpacking = weakref.WeakKeyDictionary()  # function -> (code, defaults, answer): inspect.signature is slow


def wants_unpacking(function):
    """True when function cannot be called with one argument: it requires two or more positional ones."""
    code, defaults = getattr(function, "__code__", None), getattr(function, "__defaults__", None)
    try:
        known = _unpacking.get(function)
    except TypeError:  # (not weakly referable, or unhashable)
        known = None
    if known is not None and code is not None and known[0] is code and known[1] is defaults:
        return known[2]
    answer = _wants_unpacking(function)
    if code is not None:
        try:
            _unpacking[function] = (code, defaults, answer)
        except TypeError:
            pass
    return answer


def _wants_unpacking(function):
    try:
        parameters = inspect.signature(function).parameters.values()
    except (TypeError, ValueError):  # (some builtins have no signature: they get each input whole)
        return False
    required = [p for p in parameters if p.default is p.empty and
                p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    return len(required) > 1
