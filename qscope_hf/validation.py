"""Checks of argument values shared by the whole package, so that the same mistake reads the same everywhere."""

from __future__ import annotations

import math
import warnings
from typing import Any

import torch
from torch import Tensor

from .errors import ArgumentTypeError, ConfigError, FeatureIndexError


def renamed(call: str, old: str, old_value: Any, new: str, new_value: Any, default: Any, *,
            stacklevel: int = 3) -> Any:
    """The value of an argument renamed in this release: ``new_value``, or the deprecated ``old_value`` (``None``
    when not passed) with a ``FutureWarning`` pointing at the user's call. Passing both is a :class:`ConfigError`,
    so the old name never silently wins over the new one."""
    if old_value is None:
        return new_value
    if new_value != default:
        raise ConfigError(f"{call}: pass {new}= only ({old}= is its previous name, kept for one release)")
    warnings.warn(f"{call}({old}=...) is now {new}=...", FutureWarning, stacklevel=stacklevel)
    return old_value


def positive_int(name: str, value: Any) -> int:
    """``value`` if it is an integer ≥ 1, else a :class:`ConfigError` naming ``name``."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"{name} must be a positive integer, got {value!r}")
    return value


def non_negative_int(name: str, value: Any) -> int:
    """``value`` if it is an integer ≥ 0, else a :class:`ConfigError` naming ``name``."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ConfigError(f"{name} must be an integer >= 0, got {value!r}")
    return value


def finite(name: str, value: Any, *, positive: bool = False, non_negative: bool = False) -> float:
    """``value`` as a float if it is a finite real number (and > 0 / ≥ 0 when asked), else a :class:`ConfigError`."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ConfigError(f"{name} must be a finite number, got {value!r}")
    if positive and value <= 0:
        raise ConfigError(f"{name} must be a finite number > 0, got {value!r}")
    if non_negative and value < 0:
        raise ConfigError(f"{name} must be a finite number >= 0, got {value!r}")
    return float(value)


def fraction(name: str, value: Any) -> float:
    """``value`` if it is a number in the open interval (0, 1), else a :class:`ConfigError`."""
    value = finite(name, value)
    if not 0 < value < 1:
        raise ConfigError(f"{name} must be a fraction in (0, 1), got {value!r}")
    return value


def integer_ids(kind: str, ids: Any, size: int, *, of: str = "",
                error: type[Exception] = FeatureIndexError) -> Tensor:
    """``ids`` (an int, a sequence, a range, a numpy array or a tensor of integers) as a 1-D int64 CPU tensor.
    Non-integers are an :class:`ArgumentTypeError` (a float id is never truncated), an id outside ``[0, size)`` an
    ``error``; messages read "``{kind}`` ids must be integers" / "``{kind}`` index i is out of range [0, size)
    ``{of}``"."""
    try:
        raw = torch.as_tensor(list(ids) if isinstance(ids, range) else ids)
    except (TypeError, ValueError, RuntimeError):
        raise ArgumentTypeError(f"{kind} ids must be integers, got {ids!r}") from None
    if raw.numel() and (raw.is_floating_point() or raw.is_complex() or raw.dtype == torch.bool):
        raise ArgumentTypeError(f"{kind} ids must be integers, got {ids!r}")
    index = raw.to(torch.long).reshape(-1).cpu()
    bad = index[(index < 0) | (index >= size)]
    if bad.numel():
        raise error(f"{kind} index {bad[0].item()} is out of range [0, {size}){of}")
    return index
