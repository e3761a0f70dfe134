"""Give one object a same-named subclass that adds a mixin, and take it back; the one place qscope does this.

``transformers`` calls a ``LogitsProcessor`` only after the prefill and TRL trainers compute their loss in methods
that a callback cannot reach, so steering (:mod:`qscope_hf.steering`) and the SASFT penalty
(:mod:`qscope_trl.losses`) extend *one instance* through a subclass ``type(name, (Mixin, cls), …)`` with the original
class's name, module and qualified name. No library class and no global is changed. Such an instance pickles,
deep-copies and ``torch.save``-s as its original class (the mixin's behaviour is per session and is not saved).
"""

from __future__ import annotations

from functools import cache
from typing import Any, TypeVar

T = TypeVar("T")


def _rebuild(cls: type, state: Any) -> Any:
    """Unpickle an instance of ``cls`` from ``state`` (what ``__getstate__`` returned)."""
    obj = cls.__new__(cls)
    if hasattr(obj, "__setstate__"):
        obj.__setstate__(state)
    else:
        obj.__dict__.update(state)
    return obj


def _reduce_as_base(self: Any, protocol: int) -> Any:
    """``__reduce_ex__`` of an extended instance: rebuild it as an instance of the class it extends."""
    state = self.__getstate__() if hasattr(self, "__getstate__") else self.__dict__.copy()
    return _rebuild, (type(self).__qscope_base__, state)


@cache
def _extended(mixin: type, cls: type) -> type:
    return type(cls.__name__, (mixin, cls), {"__module__": cls.__module__, "__qualname__": cls.__qualname__,
                                             "__qscope_base__": cls, "__reduce_ex__": _reduce_as_base})


def add_mixin(obj: T, mixin: type) -> T:
    """Make ``obj`` an instance of a same-named subclass of its class with ``mixin`` first (no-op if it already
    is an instance of ``mixin``); returns ``obj``."""
    if not isinstance(obj, mixin):
        obj.__class__ = _extended(mixin, type(obj))
    return obj


def remove_mixin(obj: T, mixin: type) -> T:
    """Undo :func:`add_mixin` (a class that was defined with the mixin, not added by qscope, is kept)."""
    cls = type(obj)
    base = cls.__dict__.get("__qscope_base__")
    if base is not None and cls.__bases__[0] is mixin:
        obj.__class__ = base
    return obj
