"""Atomic file writes: a reader sees the old file or the whole new one, never half of it.

Each file is written under a temporary name in its own directory and renamed over the target (``os.replace``,
atomic on POSIX within one file system). The temporary file is created with mode ``0o666`` masked by the process
umask, as ``open()`` would create the target, not the ``0o600`` of :func:`tempfile.mkstemp`.
"""

from __future__ import annotations

import os
import stat
import uuid
from collections.abc import Callable
from pathlib import Path

from .errors import MissingFileError


def atomic_write(path: str | Path, write: Callable[[Path], None]) -> Path:
    """Call ``write(temporary_path)`` and rename the result to ``path``; returns ``path``. Nothing is left behind
    when ``write`` raises. ``path``'s directory must exist (a :class:`MissingFileError` names it otherwise)."""
    path = Path(path)
    if not path.parent.is_dir():
        raise MissingFileError(f"cannot write {path}: the directory {path.parent} does not exist")
    temporary = path.with_name(f".{path.name}.{uuid.uuid4().hex[:12]}.tmp")
    os.close(os.open(temporary, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666))  # umask applies, as for open()
    try:
        mode = stat.S_IMODE(temporary.stat().st_mode)
        write(temporary)
        os.chmod(temporary, mode)  # writers that replace the file (safetensors) create it 0600
        os.replace(temporary, path)
    finally:
        if temporary.exists():
            temporary.unlink()
    return path


def atomic_write_text(path: str | Path, text: str) -> Path:
    """Write ``text`` to ``path`` atomically (see :func:`atomic_write`)."""
    return atomic_write(path, lambda temporary: temporary.write_text(text))
