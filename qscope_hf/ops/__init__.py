"""The one SAE op module: every encode, TopK and decode in qscope runs through these functions.

Public ops (shapes ``x [..., d_model]``, ``W_enc [d_sae, d_model]``, ``b_enc [d_sae]``,
``W_dec [d_model, d_sae]``, ``b_dec [d_model]``, ``values``/``indices [..., k]``):

- :func:`topk_encode` -> ``(values, indices)``: the k largest pre-activations (ties towards the lower index),
  ReLU-clamped for ``activation="relu_topk"``; never builds ``[N, d_sae]`` outside the reference backend;
- :func:`sparse_decode` -> ``[..., d_model]`` from ``(values, indices)`` without dense codes;
- :func:`feature_pre_acts` -> ``[..., S]`` pre-activations of selected features from their encoder rows;
- :func:`dense_codes` / :func:`dense_decode`: conversions to and from dense ``[..., d_sae]`` codes.

All accumulate in fp32 (fp64 for fp64) and return the activations' dtype; all are differentiable. A row of ``x``
with a NaN or infinite entry encodes to NaN values with indices ``0..k-1`` on every backend. Backends
(``reference``, ``chunked``, ``triton``) are chosen per call (``backend=``), by ``QSCOPE_OPS_BACKEND``, or
from the device; see :mod:`.dispatch`.
"""

from __future__ import annotations

from typing import Literal, get_args

import torch
from torch import Tensor

from ..errors import ArgumentTypeError, ConfigError, FeatureIndexError
from . import chunked, reference, sparse
from .autograd import SparseDecode, TopKEncode
from .dispatch import (
    BACKENDS,
    ENV_VAR,
    Backend,
    BackendUnavailableError,
    Kernels,
    available_backends,
    resolve_backend,
    triton_module,
)

Activation = Literal["relu_topk", "topk"]
ACTIVATIONS: tuple[Activation, ...] = get_args(Activation)


class _TorchKernels:
    """The streaming torch backend as a :class:`~.dispatch.Kernels`."""

    select_topk = staticmethod(chunked.select_topk)
    gather_sum = staticmethod(sparse.gather_sum)
    gather_dot = staticmethod(sparse.gather_dot)
    scatter_outer = staticmethod(sparse.scatter_outer)


def backend_kernels(name: str) -> Kernels:
    """The kernels of a streaming backend (``"chunked"`` or ``"triton"``)."""
    return triton_module() if name == "triton" else _TorchKernels


def _check_same(what: str, *tensors: Tensor) -> None:
    first = tensors[0]
    if any(t.dtype != first.dtype for t in tensors):
        dtypes = sorted({str(t.dtype) for t in tensors})
        raise ArgumentTypeError(f"{what}: dtype mismatch {dtypes}; cast the activations or the SAE weights")
    if any(t.device != first.device for t in tensors):
        devices = sorted({str(t.device) for t in tensors})
        raise ConfigError(f"{what}: device mismatch {devices}; move the activations or the SAE")
    if not first.is_floating_point():
        raise ArgumentTypeError(f"{what}: expected floating-point tensors, got {first.dtype}")


def _check_encoder(what: str, x: Tensor, W_enc: Tensor, b_enc: Tensor) -> None:
    if W_enc.dim() != 2 or b_enc.shape != (W_enc.shape[0],):
        raise ConfigError(f"{what}: expected W_enc [d_sae, d_model] and b_enc [d_sae], got {tuple(W_enc.shape)} "
                          f"and {tuple(b_enc.shape)}")
    if x.shape[-1] != W_enc.shape[1]:
        raise ConfigError(f"{what}: activations have d_model={x.shape[-1]} but the encoder expects "
                          f"d_model={W_enc.shape[1]}")
    _check_same(what, x, W_enc, b_enc)


def topk_encode(x: Tensor, W_enc: Tensor, b_enc: Tensor, k: int, activation: Activation = "relu_topk", *,
                backend: Backend | None = None) -> tuple[Tensor, Tensor]:
    """Top-``k`` SAE codes of ``x [..., d_model]``: ``(values [..., k] in x's dtype, indices [..., k] int64)``."""
    _check_encoder("topk_encode", x, W_enc, b_enc)
    d_sae = W_enc.shape[0]
    if not 0 < k <= d_sae:
        raise ConfigError(f"topk_encode: k={k} must be in [1, d_sae={d_sae}]")
    if activation not in ACTIVATIONS:
        raise ConfigError(f"topk_encode: unknown activation {activation!r}; choose one of {ACTIVATIONS}")
    lead = x.shape[:-1]
    x2 = x.reshape(-1, x.shape[-1])
    name = resolve_backend(backend, x.device)
    if name == "reference":
        values, indices = reference.topk_encode(x2, W_enc, b_enc, k, activation)
    else:
        values, indices = TopKEncode.apply(x2, W_enc, b_enc, k, activation, backend_kernels(name))
    # One rule for non-finite input on every backend (their NaN orderings differ): NaN values, indices 0..k-1.
    broken = ~x2.isfinite().all(-1, keepdim=True)  # [N, 1], no host sync
    values = values.masked_fill(broken, float("nan"))
    indices = torch.where(broken, torch.arange(k, device=indices.device), indices)
    return values.reshape(*lead, k), indices.reshape(*lead, k)


def _check_codes(what: str, values: Tensor, indices: Tensor, d_sae: int, *, check_range: bool = True) -> None:
    if values.shape != indices.shape:
        raise ConfigError(f"{what}: values {tuple(values.shape)} and indices {tuple(indices.shape)} differ in shape")
    if indices.dtype not in (torch.int64, torch.int32):
        raise ArgumentTypeError(f"{what}: indices must be int64 or int32, got {indices.dtype}")
    if check_range and indices.numel():
        low, high = torch.stack(torch.aminmax(indices)).tolist()
        if low < 0 or high >= d_sae:
            raise FeatureIndexError(f"{what}: feature indices must lie in [0, d_sae={d_sae}), got [{low}, {high}]")


def sparse_decode(values: Tensor, indices: Tensor, W_dec: Tensor, b_dec: Tensor, *,
                  backend: Backend | None = None, check_indices: bool = True) -> Tensor:
    """Reconstruction ``Σ_j values_j · W_dec[:, indices_j] + b_dec``: ``[..., k] -> [..., d_model]``.

    ``check_indices=False`` skips the range check of ``indices`` (which waits for the GPU: one host sync per
    call); pass it only for indices that :func:`topk_encode` returned for the same SAE.
    """
    if W_dec.dim() != 2 or b_dec.shape != (W_dec.shape[0],):
        raise ConfigError(f"sparse_decode: expected W_dec [d_model, d_sae] and b_dec [d_model], got "
                          f"{tuple(W_dec.shape)} and {tuple(b_dec.shape)}")
    _check_codes("sparse_decode", values, indices, W_dec.shape[1], check_range=check_indices)
    _check_same("sparse_decode", values, W_dec, b_dec)
    lead, k = values.shape[:-1], values.shape[-1]
    values2, indices2 = values.reshape(-1, k), indices.reshape(-1, k).long()
    name = resolve_backend(backend, values.device)
    if name == "reference":
        out = reference.sparse_decode(values2, indices2, W_dec, b_dec)
    else:
        out = SparseDecode.apply(values2, indices2, W_dec, b_dec, backend_kernels(name))
    return out.reshape(*lead, W_dec.shape[0])


def feature_pre_acts(x: Tensor, W_enc_rows: Tensor, b_enc_rows: Tensor) -> Tensor:
    """Pre-activations ``x · W_enc_rows.T + b_enc_rows`` of selected features: ``[..., d_model] -> [..., S]``.

    Only the ``S`` given encoder rows are read (one small GEMM, the same on every backend); differentiable
    with respect to all inputs.
    """
    _check_encoder("feature_pre_acts", x, W_enc_rows, b_enc_rows)
    return reference.feature_pre_acts(x, W_enc_rows, b_enc_rows)


def dense_codes(values: Tensor, indices: Tensor, d_sae: int) -> Tensor:
    """Scatter ``(values, indices) [..., k]`` into dense codes ``[..., d_sae]`` (zeros elsewhere)."""
    _check_codes("dense_codes", values, indices, d_sae)
    k = values.shape[-1]
    dense = reference.dense_codes(values.reshape(-1, k), indices.reshape(-1, k).long(), d_sae)
    return dense.reshape(*values.shape[:-1], d_sae)


def dense_decode(z: Tensor, W_dec: Tensor, b_dec: Tensor) -> Tensor:
    """Reconstruction from dense codes ``z [..., d_sae] -> [..., d_model]``."""
    if W_dec.dim() != 2 or z.shape[-1] != W_dec.shape[1]:
        raise ConfigError(f"dense_decode: codes have d_sae={z.shape[-1]} but W_dec is {tuple(W_dec.shape)}")
    _check_same("dense_decode", z, W_dec, b_dec)
    out = reference.dense_decode(z.reshape(-1, z.shape[-1]), W_dec, b_dec)
    return out.reshape(*z.shape[:-1], W_dec.shape[0])


__all__ = [
    "ACTIVATIONS",
    "Kernels",
    "backend_kernels",
    "BACKENDS",
    "ENV_VAR",
    "BackendUnavailableError",
    "available_backends",
    "dense_codes",
    "dense_decode",
    "feature_pre_acts",
    "resolve_backend",
    "sparse_decode",
    "topk_encode",
]
