"""Triton kernels: fused encode-and-select, and the three sparse primitives of :mod:`.sparse`.

**Encode.** A TopK over ``d_sae`` = 32K–128K latents per token must not write the ``[N, d_sae]`` pre-activation
matrix. Keeping an exact running top-k inside the GEMM epilogue needs a sort network per tile, which costs more
than the GEMM itself at k = 50–100. This backend instead streams with a per-row *threshold*:

1. a strided sample of the latents (every ``sample_stride``-th encoder row, 1/32 of the GEMM) gives each row a
   threshold ``t`` that about ``12·sample_stride`` pre-activations exceed — safely more than ``k`` of them;
2. one fused kernel runs the GEMM tile by tile, adds the bias, and appends every pre-activation ``>= t`` with its
   feature index to a per-row candidate buffer ``[N, capacity]`` (slots from an atomic counter per row);
3. the exact top-k (shared tie rule, :func:`.chunked.topk_with_ties`) is taken among the candidates.

The result is exact, not approximate: a row whose count is below ``k`` (threshold too high) or above ``capacity``
(buffer overflow) is recomputed by the streaming torch backend; with the default sample such rows are rare.
ReLU commutes with TopK, so it is applied to the ``k`` selected values only.

**Sparse primitives.** ``gather_sum`` (the decode, and the encoder's input gradient), ``gather_dot`` (the
decode's value gradient) and ``scatter_outer`` (weight gradients, fp32 atomics: summation order is not
deterministic) read one feature row per selected entry and never build dense codes. Tables are indexed with
64-bit offsets.

Import this module only through :mod:`.dispatch`: with ``TRITON_INTERPRET=1`` set before the import, the
kernels run on CPU tensors (slowly; that is how the tests check them without a GPU).
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl
from torch import Tensor

from .chunked import select_topk as chunked_select_topk
from .chunked import topk_with_ties
from .dispatch import triton_interpreted
from .reference import accumulate_dtype

SAMPLE_STRIDE = 32
#: Extra sampled latents above the threshold beyond the ``ceil(k / stride)`` the expectation asks for.
SAMPLE_MARGIN = 10


def _acc_type(dtype: torch.dtype) -> tl.dtype:
    return tl.float64 if dtype == torch.float64 else tl.float32


def _dot_precision(dtype: torch.dtype) -> str:
    if dtype == torch.float32 and torch.backends.cuda.matmul.allow_tf32:
        return "tf32"
    return "ieee"


@triton.jit
def _encode_candidates_kernel(
    x_ptr, w_ptr, b_ptr, thr_ptr, count_ptr, val_ptr, idx_ptr,
    n_rows, d_model, d_sae, capacity,
    stride_xn, stride_xd, stride_wf, stride_wd,
    ACC: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < n_rows
    col_ok = cols < d_sae
    x_rows = x_ptr + rows.to(tl.int64)[:, None] * stride_xn
    w_rows = w_ptr + cols.to(tl.int64)[:, None] * stride_wf
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=ACC)
    for k0 in range(0, d_model, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        k_ok = ks < d_model
        a = tl.load(x_rows + ks[None, :] * stride_xd, mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        b = tl.load(w_rows + ks[None, :] * stride_wd, mask=col_ok[:, None] & k_ok[None, :], other=0.0)
        if UPCAST:  # Triton's CPU interpreter computes bf16 dots wrongly; bf16 -> fp32 is exact
            a, b = a.to(tl.float32), b.to(tl.float32)
        acc = tl.dot(a, tl.trans(b), acc, input_precision=PRECISION, out_dtype=ACC)
    acc += tl.load(b_ptr + cols, mask=col_ok, other=0.0).to(ACC)[None, :]
    threshold = tl.load(thr_ptr + rows, mask=row_ok, other=0.0)
    keep = (acc >= threshold[:, None]) & row_ok[:, None] & col_ok[None, :]
    counters = count_ptr + rows[:, None] + tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)
    slot = tl.atomic_add(counters, 1, mask=keep)
    keep = keep & (slot < capacity)
    dst = rows.to(tl.int64)[:, None] * capacity + slot
    tl.store(val_ptr + dst, acc, mask=keep)
    tl.store(idx_ptr + dst, cols[None, :] + tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32), mask=keep)


@triton.jit
def _gather_sum_kernel(
    val_ptr, idx_ptr, table_ptr, out_ptr, k, d, stride_tf, stride_td,
    ACC: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr,
):
    n = tl.program_id(0).to(tl.int64)
    js = tl.arange(0, BLOCK_K)
    j_ok = js < k
    ds = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    d_ok = ds < d
    idx = tl.load(idx_ptr + n * k + js, mask=j_ok, other=0).to(tl.int64)
    val = tl.load(val_ptr + n * k + js, mask=j_ok, other=0.0).to(ACC)
    rows = tl.load(table_ptr + idx[:, None] * stride_tf + ds[None, :] * stride_td,
                   mask=j_ok[:, None] & d_ok[None, :], other=0.0).to(ACC)
    tl.store(out_ptr + n * d + ds, tl.sum(rows * val[:, None], axis=0), mask=d_ok)


@triton.jit
def _gather_dot_kernel(
    idx_ptr, table_ptr, rows_ptr, out_ptr, k, d, stride_tf, stride_td,
    ACC: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr,
):
    n = tl.program_id(0).to(tl.int64)
    js = tl.arange(0, BLOCK_K)
    j_ok = js < k
    idx = tl.load(idx_ptr + n * k + js, mask=j_ok, other=0).to(tl.int64)
    total = tl.zeros((BLOCK_K,), dtype=ACC)
    for d0 in range(0, d, BLOCK_D):
        ds = d0 + tl.arange(0, BLOCK_D)
        d_ok = ds < d
        table = tl.load(table_ptr + idx[:, None] * stride_tf + ds[None, :] * stride_td,
                        mask=j_ok[:, None] & d_ok[None, :], other=0.0).to(ACC)
        row = tl.load(rows_ptr + n * d + ds, mask=d_ok, other=0.0).to(ACC)
        total += tl.sum(table * row[None, :], axis=1)
    tl.store(out_ptr + n * k + js, total, mask=j_ok)


@triton.jit
def _scatter_outer_kernel(
    val_ptr, idx_ptr, rows_ptr, out_ptr, k, d,
    ACC: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr,
):
    n = tl.program_id(0).to(tl.int64)
    js = tl.arange(0, BLOCK_K)
    j_ok = js < k
    ds = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    d_ok = ds < d
    idx = tl.load(idx_ptr + n * k + js, mask=j_ok, other=0).to(tl.int64)
    val = tl.load(val_ptr + n * k + js, mask=j_ok, other=0.0).to(ACC)
    row = tl.load(rows_ptr + n * d + ds, mask=d_ok, other=0.0).to(ACC)
    tl.atomic_add(out_ptr + idx[:, None] * d + ds[None, :], val[:, None] * row[None, :],
                  mask=j_ok[:, None] & d_ok[None, :])


def _pow2(n: int, floor: int = 16) -> int:
    return max(floor, triton.next_power_of_2(n))


def _threshold(x: Tensor, W_enc: Tensor, b_enc: Tensor, k: int, stride: int) -> Tensor | None:
    """Per-row threshold from a strided sample of latents, or ``None`` when the sample is too small to help."""
    needed = math.ceil(k / stride) + SAMPLE_MARGIN
    sample_w, sample_b = W_enc[::stride], b_enc[::stride]
    if needed >= sample_w.shape[0]:
        return None
    sample = torch.addmm(sample_b, x, sample_w.T)
    return sample.topk(needed, dim=-1).values[:, -1].to(accumulate_dtype(x.dtype))


def encode_config(dtype: torch.dtype, n_rows: int, d_model: int) -> dict[str, int]:
    """Tile sizes and launch options of the fused encode kernel (tuned on an H100, see benchmarks/RESULTS.md)."""
    half = dtype in (torch.bfloat16, torch.float16)
    return {"BLOCK_M": min(128, _pow2(n_rows)), "BLOCK_N": 128, "BLOCK_K": min(64 if half else 32, _pow2(d_model)),
            "num_warps": 8, "num_stages": 3 if half else 2}


def select_topk(
    x: Tensor, W_enc: Tensor, b_enc: Tensor, k: int, *,
    sample_stride: int = SAMPLE_STRIDE, capacity: int | None = None, config: dict[str, int] | None = None,
) -> tuple[Tensor, Tensor]:
    """Top-``k`` pre-activations of ``x [N, d_model]`` by the fused kernel: ``(values [N, k], indices [N, k])``.

    ``sample_stride`` and ``capacity`` (candidates kept per row) tune the threshold, ``config`` the kernel's tiles
    (default :func:`encode_config`); results do not depend on any of them, only speed does.
    """
    n_rows, d_model = x.shape
    d_sae = W_enc.shape[0]
    acc = accumulate_dtype(x.dtype)
    threshold = _threshold(x, W_enc, b_enc, k, sample_stride)
    if threshold is None:
        threshold = x.new_full((n_rows,), -math.inf, dtype=acc)
        capacity = d_sae
    elif capacity is None:
        capacity = min(d_sae, _pow2(3 * (math.ceil(k / sample_stride) + SAMPLE_MARGIN) * sample_stride))
    capacity = max(capacity, k)
    counts = torch.zeros(n_rows, dtype=torch.int32, device=x.device)
    cand_values = x.new_full((n_rows, capacity), -math.inf, dtype=acc)
    cand_indices = torch.full((n_rows, capacity), d_sae, dtype=torch.int32, device=x.device)
    config = config or encode_config(x.dtype, n_rows, d_model)
    grid = (triton.cdiv(n_rows, config["BLOCK_M"]), triton.cdiv(d_sae, config["BLOCK_N"]))
    _encode_candidates_kernel[grid](
        x, W_enc, b_enc, threshold, counts, cand_values, cand_indices,
        n_rows, d_model, d_sae, capacity,
        x.stride(0), x.stride(1), W_enc.stride(0), W_enc.stride(1),
        ACC=_acc_type(x.dtype), PRECISION=_dot_precision(x.dtype),
        UPCAST=x.dtype == torch.bfloat16 and triton_interpreted(), **config,
    )
    values, indices = topk_with_ties(cand_values, cand_indices.long(), k)
    redo = ((counts < k) | (counts > capacity)).nonzero().squeeze(1)
    if redo.numel():
        values[redo], indices[redo] = chunked_select_topk(x[redo], W_enc, b_enc, k)
    return values, indices


def _launch_rowwise(kernel, k: int, d: int, n_rows: int, *args, acc: torch.dtype, tiled: bool) -> None:
    block_k = _pow2(k, floor=2)
    block_d = min(_pow2(d), max(16, 8192 // block_k))
    grid = (n_rows, triton.cdiv(d, block_d)) if tiled else (n_rows,)
    kernel[grid](*args, ACC=_acc_type(acc), BLOCK_K=block_k, BLOCK_D=block_d)


def gather_sum(values: Tensor, indices: Tensor, table: Tensor) -> Tensor:
    """``Σ_j values[n, j] · table[indices[n, j]]``: ``[N, D]`` in the accumulate dtype."""
    n_rows, k = indices.shape
    acc = accumulate_dtype(table.dtype)
    out = table.new_empty(n_rows, table.shape[1], dtype=acc)
    if n_rows:
        _launch_rowwise(_gather_sum_kernel, k, table.shape[1], n_rows,
                        values.contiguous(), indices.contiguous(), table, out, k, table.shape[1],
                        table.stride(0), table.stride(1), acc=acc, tiled=True)
    return out


def gather_dot(indices: Tensor, table: Tensor, rows: Tensor) -> Tensor:
    """``<table[indices[n, j]], rows[n]>``: ``[N, k]`` in the accumulate dtype."""
    n_rows, k = indices.shape
    acc = accumulate_dtype(table.dtype)
    out = rows.new_empty(n_rows, k, dtype=acc)
    if n_rows:
        _launch_rowwise(_gather_dot_kernel, k, table.shape[1], n_rows,
                        indices.contiguous(), table, rows.contiguous(), out, k, table.shape[1],
                        table.stride(0), table.stride(1), acc=acc, tiled=False)
    return out


def scatter_outer(values: Tensor, indices: Tensor, rows: Tensor, num_rows: int) -> Tensor:
    """``out[indices[n, j]] += values[n, j] · rows[n]``: ``[num_rows, D]`` in the accumulate dtype."""
    n_rows, k = indices.shape
    acc = accumulate_dtype(rows.dtype)
    out = rows.new_zeros(num_rows, rows.shape[1], dtype=acc)
    if n_rows:
        _launch_rowwise(_scatter_outer_kernel, k, rows.shape[1], n_rows,
                        values.contiguous(), indices.contiguous(), rows.contiguous(), out, k, rows.shape[1],
                        acc=acc, tiled=True)
    return out
