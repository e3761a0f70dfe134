"""Which backend runs an op: per call, then the ``QSCOPE_OPS_BACKEND`` environment variable, then the device.

- ``reference``: dense plain torch, the readable definition (:mod:`.reference`);
- ``chunked``: streaming plain torch (:mod:`.chunked`, :mod:`.sparse`), the default off CUDA;
- ``triton``: fused kernels (:mod:`.triton_kernels`), the default on CUDA when Triton imports. On CPU tensors
  it runs only under Triton's interpreter (``TRITON_INTERPRET=1`` set before qscope imports the kernels).
"""

from __future__ import annotations

import os
from typing import Literal, Protocol, get_args

import torch
from torch import Tensor

from ..errors import BackendUnavailableError, ConfigError
from .environment import triton_importable, triton_interpreted

Backend = Literal["reference", "chunked", "triton"]
BACKENDS: tuple[Backend, ...] = get_args(Backend)
ENV_VAR = "QSCOPE_OPS_BACKEND"


class Kernels(Protocol):
    """What a streaming backend provides (:mod:`.chunked` + :mod:`.sparse`, or :mod:`.triton_kernels`). Every
    result is in the accumulate dtype of its inputs (fp32 for fp16/bf16/fp32, fp64 for fp64)."""

    def select_topk(self, x: Tensor, W_enc: Tensor, b_enc: Tensor, k: int) -> tuple[Tensor, Tensor]:
        """Top-``k`` pre-activations of ``x [N, d_model]``: ``(values [N, k], indices [N, k] int64)``."""

    def gather_sum(self, values: Tensor, indices: Tensor, table: Tensor) -> Tensor:
        """``Σ_j values[n, j] · table[indices[n, j]]``: ``[N, D]``."""

    def gather_dot(self, indices: Tensor, table: Tensor, rows: Tensor) -> Tensor:
        """``<table[indices[n, j]], rows[n]>``: ``[N, k]``."""

    def scatter_outer(self, values: Tensor, indices: Tensor, rows: Tensor, num_rows: int) -> Tensor:
        """``out[indices[n, j]] += values[n, j] · rows[n]``: ``[num_rows, D]``."""


def available_backends(device: torch.device | str = "cpu") -> list[str]:
    """The backends that can run on ``device`` in this process."""
    device = torch.device(device)
    names = ["reference", "chunked"]
    if triton_importable() and (device.type == "cuda" or triton_interpreted()):
        names.append("triton")
    return names


def resolve_backend(backend: Backend | str | None, device: torch.device) -> Backend:
    """The backend to use for tensors on ``device``: ``backend``, else ``$QSCOPE_OPS_BACKEND``, else automatic."""
    name = backend or os.environ.get(ENV_VAR) or None
    if name is None:
        return "triton" if device.type == "cuda" and triton_importable() else "chunked"
    if name not in BACKENDS:
        raise ConfigError(f"unknown SAE ops backend {name!r}; choose one of {BACKENDS}")
    if name == "triton":
        if not triton_importable():
            raise BackendUnavailableError("backend 'triton' needs the triton package: pip install 'qscope[triton]'")
        if device.type != "cuda" and not triton_interpreted():
            raise BackendUnavailableError(
                f"backend 'triton' needs CUDA tensors, got tensors on {device}; use backend='chunked', or set "
                "TRITON_INTERPRET=1 before importing qscope to run the kernels in Triton's (slow) CPU interpreter"
            )
    return name


def triton_module() -> Kernels:
    """The Triton kernels module, imported on first use (so that importing qscope never needs Triton)."""
    from . import triton_kernels

    return triton_kernels
