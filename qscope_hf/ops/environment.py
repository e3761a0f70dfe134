"""What this process can run: leaf probes that every other ops module may import (and that import nothing of qscope)."""

from __future__ import annotations

import importlib.util
import os


def triton_importable() -> bool:
    """Whether the ``triton`` package is installed (it imports without a GPU)."""
    return importlib.util.find_spec("triton") is not None


def triton_interpreted() -> bool:
    """Whether Triton kernels run in the CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
