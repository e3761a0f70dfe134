"""Autograd for the streaming backends: one ``Function`` per op, backends differing only in their kernels.

A backend's ``kernels`` provide ``select_topk`` and the sparse primitives ``gather_sum``, ``gather_dot`` and
``scatter_outer`` (:mod:`.sparse` documents them). Backward passes use only the ``k`` selected entries per row:

- encode, ``values = act(x · W_enc[idx] + b_enc[idx])``, with ``g = grad_values · act'``:
  ``grad_x = gather_sum(g, idx, W_enc)``, ``grad_W_enc = scatter_outer(g, idx, x)``, ``grad_b_enc[idx] += g``;
- decode, ``out = Σ_j values_j · W_dec[:, idx_j] + b_dec``:
  ``grad_values = gather_dot(idx, W_dec.T, grad_out)``, ``grad_W_dec.T = scatter_outer(values, idx, grad_out)``,
  ``grad_b_dec = Σ_n grad_out``.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from .dispatch import Kernels
from .reference import accumulate_dtype


class TopKEncode(torch.autograd.Function):
    """``(x [N, d_model], W_enc, b_enc) -> (values [N, k], indices [N, k])``; indices carry no gradient."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, W_enc: Tensor, b_enc: Tensor, k: int, activation: str,
                kernels: Kernels) -> tuple[Tensor, Tensor]:
        pre_values, indices = kernels.select_topk(x, W_enc, b_enc, k)
        values = pre_values.relu() if activation == "relu_topk" else pre_values
        ctx.save_for_backward(x, W_enc, indices, pre_values)
        ctx.kernels, ctx.relu = kernels, activation == "relu_topk"
        ctx.mark_non_differentiable(indices)
        return values.to(x.dtype), indices

    @staticmethod
    def backward(ctx: Any, grad_values: Tensor, _grad_indices: Tensor | None) -> tuple[Tensor | None, ...]:
        x, W_enc, indices, pre_values = ctx.saved_tensors
        kernels = ctx.kernels
        g = grad_values.to(pre_values.dtype)
        if ctx.relu:
            g = g * (pre_values > 0)
        grad_x = grad_w = grad_b = None
        if ctx.needs_input_grad[0]:
            grad_x = kernels.gather_sum(g, indices, W_enc).to(x.dtype)
        if ctx.needs_input_grad[1]:
            grad_w = kernels.scatter_outer(g, indices, x, W_enc.shape[0]).to(W_enc.dtype)
        if ctx.needs_input_grad[2]:
            grad_b = g.new_zeros(W_enc.shape[0]).index_add_(0, indices.reshape(-1), g.reshape(-1)).to(W_enc.dtype)
        return grad_x, grad_w, grad_b, None, None, None


class SparseDecode(torch.autograd.Function):
    """``(values [N, k], indices [N, k], W_dec [d_model, d_sae], b_dec) -> [N, d_model]``."""

    @staticmethod
    def forward(ctx: Any, values: Tensor, indices: Tensor, W_dec: Tensor, b_dec: Tensor,
                kernels: Kernels) -> Tensor:
        acc = accumulate_dtype(values.dtype)
        out = kernels.gather_sum(values, indices, W_dec.T).to(acc) + b_dec.to(acc)
        ctx.save_for_backward(values, indices, W_dec)
        ctx.kernels = kernels
        return out.to(values.dtype)

    @staticmethod
    def backward(ctx: Any, grad_out: Tensor) -> tuple[Tensor | None, ...]:
        values, indices, W_dec = ctx.saved_tensors
        kernels = ctx.kernels
        grad_out = grad_out.contiguous()
        grad_values = grad_w = grad_b = None
        if ctx.needs_input_grad[0]:
            grad_values = kernels.gather_dot(indices, W_dec.T, grad_out).to(values.dtype)
        if ctx.needs_input_grad[2]:
            grad_w = kernels.scatter_outer(values, indices, grad_out, W_dec.shape[1]).to(W_dec.dtype).T
        if ctx.needs_input_grad[3]:
            grad_b = grad_out.to(accumulate_dtype(grad_out.dtype)).sum(0).to(W_dec.dtype)
        return grad_values, None, grad_w, grad_b, None
