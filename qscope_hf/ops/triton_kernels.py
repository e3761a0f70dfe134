"""Triton kernels: fused encode-and-select, and the three sparse primitives of :mod:`.sparse`.

**Encode.** A TopK over ``d_sae`` = 32K–128K latents per token must not write the ``[N, d_sae]`` pre-activation
matrix. Keeping an exact running top-k inside the GEMM epilogue needs a sort network per tile, which costs more
than the GEMM itself at k = 50–100. This backend instead streams with a per-row *threshold*:

1. a strided sample of the latents (every ``sample_stride``-th encoder row: 1/32 of the GEMM) gives each row a
   threshold ``t`` that about ``(k/32 + 10)·32`` pre-activations exceed, safely more than ``k``;
2. one fused kernel runs the GEMM tile by tile, adds the bias, and appends every pre-activation ``>= t`` to a
   per-row candidate buffer ``[N, capacity]`` (one atomic per row and tile reserves the slots; a prefix sum
   places them), packed with its feature index into an int64 key ordered by (value, lower index);
3. the ``k`` largest keys of each row are the exact top-k under the shared tie rule.

The result is exact, not approximate: a row whose count is below ``k`` (threshold too high) or above ``capacity``
(buffer overflow) is recomputed by the streaming torch backend; with the default sample such rows are rare.
ReLU commutes with TopK, so it is applied to the ``k`` selected values only. Keys hold fp32 values, so fp64
activations (used for gradient checks) select through the torch backend.

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
from .environment import triton_interpreted
from .reference import accumulate_dtype

SAMPLE_STRIDE = 32
#: Extra sampled latents above the threshold beyond the ``ceil(k / stride)`` the expectation asks for.
SAMPLE_MARGIN = 10
#: Key of an empty candidate slot (below every real key).
EMPTY_KEY = -(2**63)


def _acc_type(dtype: torch.dtype) -> tl.dtype:
    return tl.float64 if dtype == torch.float64 else tl.float32


def _dot_precision(dtype: torch.dtype) -> str:
    if dtype == torch.float32 and torch.backends.cuda.matmul.allow_tf32:
        return "tf32"
    return "ieee"


@triton.jit
def _pack_keys(values, columns):
    """int64 keys ordered like (fp32 value, then lower column first); -0.0 counts as +0.0."""
    bits = values.to(tl.int32, bitcast=True)
    bits = tl.where(bits == -2147483648, 0, bits)
    ordered = bits ^ ((bits >> 31) & 0x7FFFFFFF)
    return (ordered.to(tl.int64) << 32) | (0x7FFFFFFF - columns).to(tl.int64)


@triton.jit
def _unpack_keys(keys):
    high = (keys >> 32).to(tl.int32)
    values = (high ^ ((high >> 31) & 0x7FFFFFFF)).to(tl.float32, bitcast=True)
    return values, 0x7FFFFFFF - (keys & 0xFFFFFFFF)


@triton.jit
def _encode_candidates_kernel(
    x_ptr, w_ptr, b_ptr, thr_ptr, count_ptr, key_ptr,
    n_rows, d_model, d_sae, capacity,
    stride_xn, stride_xd, stride_wf, stride_wd,
    PRECISION: tl.constexpr, UPCAST: tl.constexpr, EVEN_K: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    # Grouped launch order: GROUP_M row blocks sweep the latent tiles together, so tiles are reused from L2.
    pid = tl.program_id(0)
    num_m = tl.cdiv(n_rows, BLOCK_M)
    num_n = tl.cdiv(d_sae, BLOCK_N)
    first_m = (pid // (GROUP_M * num_n)) * GROUP_M
    group_rows = min(num_m - first_m, GROUP_M)
    pid_m = first_m + (pid % (GROUP_M * num_n)) % group_rows
    pid_n = (pid % (GROUP_M * num_n)) // group_rows

    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    ks = tl.arange(0, BLOCK_K)
    # Out-of-range rows/columns read valid memory (wrapped) and are dropped in the epilogue.
    x_ptrs = x_ptr + (rows % n_rows).to(tl.int64)[:, None] * stride_xn + ks[None, :] * stride_xd
    w_ptrs = w_ptr + (cols % d_sae).to(tl.int64)[None, :] * stride_wf + ks[:, None] * stride_wd
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, tl.cdiv(d_model, BLOCK_K)):
        if EVEN_K:
            a = tl.load(x_ptrs)
            b = tl.load(w_ptrs)
        else:
            k_left = d_model - k0 * BLOCK_K
            a = tl.load(x_ptrs, mask=ks[None, :] < k_left, other=0.0)
            b = tl.load(w_ptrs, mask=ks[:, None] < k_left, other=0.0)
        if UPCAST:  # Triton's CPU interpreter computes bf16 dots wrongly; bf16 -> fp32 is exact
            a, b = a.to(tl.float32), b.to(tl.float32)
        acc = tl.dot(a, b, acc, input_precision=PRECISION)
        x_ptrs += BLOCK_K * stride_xd
        w_ptrs += BLOCK_K * stride_wd
    acc += tl.load(b_ptr + cols, mask=cols < d_sae, other=0.0).to(tl.float32)[None, :]
    row_ok = rows < n_rows
    threshold = tl.load(thr_ptr + rows, mask=row_ok, other=float("inf"))
    keep = ((acc >= threshold[:, None]) & (cols < d_sae)[None, :]).to(tl.int32)
    hits = tl.sum(keep, axis=1)
    base = tl.atomic_add(count_ptr + rows, hits, mask=row_ok & (hits > 0))
    slot = base[:, None] + tl.cumsum(keep, axis=1) - 1
    store = (keep > 0) & (slot < capacity) & row_ok[:, None]
    dst = key_ptr + rows.to(tl.int64)[:, None] * capacity + slot
    tl.store(dst, _pack_keys(acc, cols[None, :]), mask=store)


@triton.jit
def _kth_largest_kernel(x_ptr, out_ptr, n_rows, n_cols, stride, kth,
                        ROWS: tl.constexpr, BLOCK: tl.constexpr):
    """``kth`` largest value of each row, ties counted (values are packed with their column into unique keys, so
    each of the ``kth`` max-and-remove rounds removes exactly one element)."""
    rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    cols = tl.arange(0, BLOCK)
    mask = (rows < n_rows)[:, None] & (cols < n_cols)[None, :]
    values = tl.load(x_ptr + rows.to(tl.int64)[:, None] * stride + cols[None, :], mask=mask,
                     other=float("-inf")).to(tl.float32)
    keys = tl.where(mask, _pack_keys(values, cols[None, :]), -9223372036854775808)
    best = tl.max(keys, axis=1)
    for _ in range(1, kth):
        keys = tl.where(keys == best[:, None], -9223372036854775808, keys)
        best = tl.max(keys, axis=1)
    tl.store(out_ptr + rows, _unpack_keys(best)[0], mask=rows < n_rows)


@triton.jit
def _select_kernel(key_ptr, value_ptr, index_ptr, n_rows, capacity, k,
                   ROWS: tl.constexpr, BLOCK: tl.constexpr):
    """The ``k`` largest keys of each row, unpacked, in descending order: ``k`` rounds of max-and-remove
    (keys are unique, so each round removes exactly one)."""
    rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    row_ok = rows < n_rows
    rows64 = rows.to(tl.int64)
    cols = tl.arange(0, BLOCK)
    keys = tl.load(key_ptr + rows64[:, None] * capacity + cols[None, :],
                   mask=row_ok[:, None] & (cols < capacity)[None, :], other=-9223372036854775808)
    for j in range(0, k):
        best = tl.max(keys, axis=1)
        values, indices = _unpack_keys(best)
        tl.store(value_ptr + rows64 * k + j, values, mask=row_ok)
        tl.store(index_ptr + rows64 * k + j, indices, mask=row_ok)
        keys = tl.where(keys == best[:, None], -9223372036854775808, keys)


@triton.jit
def _gather_sum_kernel(
    val_ptr, idx_ptr, table_ptr, out_ptr, k, d, stride_tf, stride_td,
    ACC: tl.constexpr, BLOCK_J: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """One output row slice ``[BLOCK_D]``: the selected table rows, ``BLOCK_J`` at a time, weighted and summed."""
    n = tl.program_id(0).to(tl.int64)
    ds = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    d_ok = ds < d
    total = tl.zeros((BLOCK_D,), dtype=ACC)
    for j0 in range(0, k, BLOCK_J):
        js = j0 + tl.arange(0, BLOCK_J)
        j_ok = js < k
        idx = tl.load(idx_ptr + n * k + js, mask=j_ok, other=0).to(tl.int64)
        val = tl.load(val_ptr + n * k + js, mask=j_ok, other=0.0).to(ACC)
        rows = tl.load(table_ptr + idx[:, None] * stride_tf + ds[None, :] * stride_td,
                       mask=j_ok[:, None] & d_ok[None, :], other=0.0).to(ACC)
        total += tl.sum(rows * val[:, None], axis=0)
    tl.store(out_ptr + n * d + ds, total, mask=d_ok)


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


def default_capacity(k: int, sample_stride: int = SAMPLE_STRIDE) -> int:
    """Candidates kept per row by default: about twice the count a sampled threshold lets through."""
    return _pow2(2 * (math.ceil(k / sample_stride) + SAMPLE_MARGIN) * sample_stride)


def sample_threshold(x: Tensor, W_enc: Tensor, b_enc: Tensor, k: int, stride: int) -> Tensor | None:
    """Per-row threshold from a strided sample of latents, or ``None`` when the sample is too small to help."""
    needed = math.ceil(k / stride) + SAMPLE_MARGIN
    sample_w, sample_b = W_enc[::stride], b_enc[::stride]
    if needed >= sample_w.shape[0]:
        return None
    sample = torch.addmm(sample_b, x, sample_w.T)
    n_rows, n_cols = sample.shape
    threshold = torch.empty(n_rows, dtype=torch.float32, device=x.device)
    rows = _rows_per_program(n_cols)
    _kth_largest_kernel[(triton.cdiv(n_rows, rows),)](sample, threshold, n_rows, n_cols, sample.stride(0), needed,
                                                      ROWS=rows, BLOCK=_pow2(n_cols))
    return threshold


def _rows_per_program(width: int) -> int:
    """Rows per program for the row-wise selection kernels: about 4K elements in registers."""
    return max(1, min(16, 4096 // _pow2(width)))


def encode_config(dtype: torch.dtype, n_rows: int, d_model: int) -> dict[str, int]:
    """Tile sizes and launch options of the fused encode kernel (the best of a sweep on an H100 in bf16,
    benchmarks/tune_triton.py; see benchmarks/RESULTS.md)."""
    half = dtype in (torch.bfloat16, torch.float16)
    return {"BLOCK_M": min(128, _pow2(n_rows)), "BLOCK_N": 128, "BLOCK_K": min(64 if half else 32, _pow2(d_model)),
            "GROUP_M": 8, "num_warps": 4, "num_stages": 3}


def launch_encode(x: Tensor, W_enc: Tensor, b_enc: Tensor, threshold: Tensor, capacity: int,
                  config: dict[str, int]) -> tuple[Tensor, Tensor]:
    """Run the fused kernel: per row, the count of pre-activations ``>= threshold`` (``[N]`` int32) and their packed
    keys (``[N, capacity]`` int64, empty slots :data:`EMPTY_KEY`)."""
    n_rows, d_model = x.shape
    d_sae = W_enc.shape[0]
    counts = torch.zeros(n_rows, dtype=torch.int32, device=x.device)
    keys = torch.full((n_rows, capacity), EMPTY_KEY, dtype=torch.int64, device=x.device)
    grid = (triton.cdiv(n_rows, config["BLOCK_M"]) * triton.cdiv(d_sae, config["BLOCK_N"]),)
    _encode_candidates_kernel[grid](
        x, W_enc, b_enc, threshold, counts, keys, n_rows, d_model, d_sae, capacity,
        x.stride(0), x.stride(1), W_enc.stride(0), W_enc.stride(1),
        PRECISION=_dot_precision(x.dtype), UPCAST=x.dtype == torch.bfloat16 and triton_interpreted(),
        EVEN_K=d_model % config["BLOCK_K"] == 0, **config,
    )
    return counts, keys


def select_from_keys(keys: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """The ``k`` largest keys of each row, unpacked: ``(values [N, k] fp32, indices [N, k] int64)``, descending."""
    n_rows, capacity = keys.shape
    values = torch.empty(n_rows, k, dtype=torch.float32, device=keys.device)
    indices = torch.empty(n_rows, k, dtype=torch.int64, device=keys.device)
    if n_rows:
        rows = _rows_per_program(capacity)
        _select_kernel[(triton.cdiv(n_rows, rows),)](keys, values, indices, n_rows, capacity, k,
                                                     ROWS=rows, BLOCK=_pow2(capacity))
    return values, indices


def select_topk(
    x: Tensor, W_enc: Tensor, b_enc: Tensor, k: int, *,
    sample_stride: int = SAMPLE_STRIDE, capacity: int | None = None, config: dict[str, int] | None = None,
) -> tuple[Tensor, Tensor]:
    """Top-``k`` pre-activations of ``x [N, d_model]`` by the fused kernel: ``(values [N, k], indices [N, k])``.

    ``sample_stride`` and ``capacity`` (candidates kept per row, default about twice the expected count) tune the
    threshold, ``config`` the kernel's tiles
    (default :func:`encode_config`); results do not depend on any of them, only speed does.
    """
    if x.dtype == torch.float64:
        return chunked_select_topk(x, W_enc, b_enc, k)
    n_rows, d_model = x.shape
    d_sae = W_enc.shape[0]
    threshold = sample_threshold(x, W_enc, b_enc, k, sample_stride) if n_rows else None
    if threshold is None:
        threshold = torch.full((n_rows,), -math.inf, device=x.device)
        capacity = d_sae
    elif capacity is None:
        capacity = min(d_sae, default_capacity(k, sample_stride))
    capacity = max(capacity, k)
    config = config or encode_config(x.dtype, n_rows, d_model)
    counts, keys = launch_encode(x, W_enc, b_enc, threshold, capacity, config)
    values, indices = select_from_keys(keys, k)
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
    width = table.shape[1]
    acc = accumulate_dtype(table.dtype)
    out = table.new_empty(n_rows, width, dtype=acc)
    if n_rows:
        block_d = min(_pow2(width), 1024)
        _gather_sum_kernel[(n_rows, triton.cdiv(width, block_d))](
            values.contiguous(), indices.contiguous(), table, out, k, width, table.stride(0), table.stride(1),
            ACC=_acc_type(acc), BLOCK_J=16, BLOCK_D=block_d, num_warps=4)
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
