"""Checks of argument values shared by the whole package, so that the same mistake reads the same everywhere."""

from __future__ import annotations

import math
from typing import Any

from .errors import ConfigError


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
