"""The readable definition of every SAE op (docs/methods/sae.md): the oracle the other backends are tested against.

Shapes: ``x [N, d_model]``, ``W_enc [d_sae, d_model]``, ``b_enc [d_sae]``, ``W_dec [d_model, d_sae]``,
``b_dec [d_model]``, ``values``/``indices [N, k]``. Arithmetic runs in :func:`accumulate_dtype` (fp32 for
half types, fp64 for fp64); results come back in the activations' dtype.

Selection rule shared by every backend: the ``k`` largest pre-activations, ties broken towards the lower
feature index, returned in descending order of pre-activation. With ``activation="relu_topk"`` the selected
values are then clamped at 0 (ReLU and TopK commute, so this equals ``TopK(ReLU(pre))`` with a deterministic
choice among the zeros); with ``activation="topk"`` (the model card's variant) they are kept as they are.

This backend materialises the full ``[N, d_sae]`` pre-activation matrix: use it for checking, not for speed.
Gradients come from plain torch autograd.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def accumulate_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype SAE arithmetic accumulates in for activations of ``dtype`` (never below fp32)."""
    return torch.promote_types(dtype, torch.float32)


def pre_acts(x: Tensor, W_enc: Tensor, b_enc: Tensor) -> Tensor:
    """``x @ W_enc.T + b_enc`` in the accumulate dtype: ``[..., d_model] -> [..., d_sae]``."""
    acc = accumulate_dtype(x.dtype)
    if not x.dtype == W_enc.dtype == b_enc.dtype == acc:  # no casts on the per-token path of fp32 steering
        x, W_enc, b_enc = x.to(acc), W_enc.to(acc), b_enc.to(acc)
    return F.linear(x, W_enc, b_enc)


def topk_encode(x: Tensor, W_enc: Tensor, b_enc: Tensor, k: int, activation: str) -> tuple[Tensor, Tensor]:
    """``(values, indices)``, each ``[N, k]``, by a stable descending sort of all pre-activations."""
    pre = pre_acts(x, W_enc, b_enc)
    indices = pre.sort(dim=-1, descending=True, stable=True).indices[:, :k]
    values = pre.gather(-1, indices)
    if activation == "relu_topk":
        values = values.relu()
    return values.to(x.dtype), indices


def dense_codes(values: Tensor, indices: Tensor, d_sae: int) -> Tensor:
    """Scatter ``(values, indices) [N, k]`` into dense codes ``[N, d_sae]``."""
    dense = values.new_zeros(values.shape[0], d_sae)
    return dense.scatter(-1, indices, values)


def dense_decode(z: Tensor, W_dec: Tensor, b_dec: Tensor) -> Tensor:
    """``z @ W_dec.T + b_dec``: dense codes ``[N, d_sae] -> [N, d_model]``."""
    acc = accumulate_dtype(z.dtype)
    return torch.addmm(b_dec.to(acc), z.to(acc), W_dec.to(acc).T).to(z.dtype)


def sparse_decode(values: Tensor, indices: Tensor, W_dec: Tensor, b_dec: Tensor) -> Tensor:
    """Decode through the dense codes: ``[N, k] -> [N, d_model]``."""
    return dense_decode(dense_codes(values, indices, W_dec.shape[1]), W_dec, b_dec)


def feature_pre_acts(x: Tensor, W_enc_rows: Tensor, b_enc_rows: Tensor) -> Tensor:
    """Pre-activations of selected features: ``[..., d_model] -> [..., S]`` using only their encoder rows."""
    return pre_acts(x, W_enc_rows, b_enc_rows).to(x.dtype)
