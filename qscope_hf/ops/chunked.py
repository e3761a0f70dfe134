"""Streaming TopK selection in plain torch: the CPU default.

The encoder GEMM runs over ``d_sae`` in tiles; each tile's best ``k`` candidates join a candidate buffer that is
cut back to the best ``k`` whenever it grows past a few tiles' worth, so peak extra memory is
``O(N·k + N·tile)`` instead of ``O(N·d_sae)``. The selection rule (ties towards the lower feature index) is
that of :mod:`qscope_hf.ops.reference`; :func:`topk_with_ties` enforces it for any list of candidates and is
shared with the Triton backend.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .reference import accumulate_dtype, pre_acts

#: A tile's temporaries may always hold this many elements (8 MiB in fp32) ...
TILE_ELEMENTS = 1 << 21
#: ... or, when that is more, ``1 / TILE_FRACTION`` of the dense ``[N, d_sae]`` matrix.
TILE_FRACTION = 6
MIN_TILE = 256
#: Candidates are cut back to ``k`` once the buffer holds this many times ``k``.
MERGE_FACTOR = 8


def tile_width(n_rows: int, d_sae: int, d_model: int) -> int:
    """Columns per tile, so that a tile's temporaries (``[N, tile]`` pre-activations and ``[tile, d_model]`` encoder
    rows: cast to the accumulate dtype, or packed by the BLAS) hold at most ``max(TILE_ELEMENTS, N·d_sae / 6)``
    elements.

    Peak extra memory is then about ``max(8 MiB, dense / 6)`` where dense is the ``[N, d_sae]`` fp32 matrix a
    naive encode allocates (twice, with its ReLU output).
    """
    budget = max(TILE_ELEMENTS, n_rows * d_sae // TILE_FRACTION)
    return min(d_sae, max(MIN_TILE, budget // (n_rows + d_model)))


def _order(values: Tensor, indices: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """Exact rule by sorting: index order first, so the stable value sort breaks ties by index."""
    indices, by_index = indices.sort(dim=-1)
    values = values.gather(-1, by_index)
    order = values.sort(dim=-1, descending=True, stable=True).indices[:, :k]
    return values.gather(-1, order), indices.gather(-1, order)


def topk_with_ties(values: Tensor, indices: Tensor, k: int, *, ordered: bool = True) -> tuple[Tensor, Tensor]:
    """The ``k`` best candidates of each row, ties towards the lower index.

    ``values``/``indices`` ``[N, C]`` list each row's candidates in any order (``C >= k``); returns ``[N, k]``
    each, in descending order (ties by index) when ``ordered``, else in any order. A fast ``topk`` picks the set;
    rows where the k-th and (k+1)-th values tie (the only case where ``topk``'s choice is unspecified) are
    redone by a full sort.
    """
    if values.shape[1] > k:
        top, position = values.topk(k + 1, dim=-1, sorted=True)
        tied = top[:, k - 1] == top[:, k]
        chosen_values, chosen_indices = top[:, :k], indices.gather(-1, position[:, :k])
        if bool(tied.any()):
            rows = tied.nonzero().squeeze(1)
            chosen_values[rows], chosen_indices[rows] = _order(values[rows], indices[rows], k)
        values, indices = chosen_values, chosen_indices
    return _order(values, indices, k) if ordered else (values, indices)


@torch.no_grad()
def select_topk(x: Tensor, W_enc: Tensor, b_enc: Tensor, k: int, tile: int | None = None) -> tuple[Tensor, Tensor]:
    """Top-``k`` pre-activations of ``x [N, d_model]``: ``(values [N, k] in the accumulate dtype, indices [N, k])``."""
    n_rows, d_sae = x.shape[0], W_enc.shape[0]
    acc = accumulate_dtype(x.dtype)
    tile = tile or tile_width(n_rows, d_sae, W_enc.shape[1])
    xa = x.to(acc)
    values: list[Tensor] = []
    indices: list[Tensor] = []
    buffered = 0
    for start in range(0, d_sae, tile):
        stop = min(start + tile, d_sae)
        pre = pre_acts(xa, W_enc[start:stop], b_enc[start:stop])
        columns = torch.arange(start, stop, device=x.device).expand_as(pre)
        if pre.shape[1] > k:
            pre, columns = topk_with_ties(pre, columns, k, ordered=False)
        values.append(pre)
        indices.append(columns)
        buffered += pre.shape[1]
        if buffered >= MERGE_FACTOR * k:
            merged = topk_with_ties(torch.cat(values, dim=1), torch.cat(indices, dim=1), k, ordered=False)
            values, indices, buffered = [merged[0]], [merged[1]], k
    return topk_with_ties(torch.cat(values, dim=1), torch.cat(indices, dim=1), k)
