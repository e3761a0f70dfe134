"""Streaming TopK selection in plain torch: the CPU default.

The encoder GEMM runs over ``d_sae`` in tiles, in index order, keeping each row's best ``k`` so far, so peak extra
memory is ``O(N·k + N·tile)`` instead of ``O(N·d_sae)``. Once a row holds ``k`` candidates, only a tile's entries
strictly above the row's current k-th best can enter (an equal one has a higher index than every kept entry, so
it loses the tie): they are picked by one comparison and merged into the ``k`` kept, so most tiles cost a
comparison rather than a partial sort (half the selection time on two cores). The selection rule (ties towards
the lower feature index) is that of :mod:`qscope_hf.ops.reference`; :func:`topk_with_ties` enforces it for any
list of candidates and is shared with the Triton backend.
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


def _merge_above(values: Tensor, indices: Tensor, pre: Tensor, start: int) -> tuple[Tensor, Tensor]:
    """``values``/``indices [N, k]`` (each row's best so far) joined by the entries of ``pre [N, tile]`` (columns
    ``start, start + 1, …``) above the row's k-th best (NaN counts as above, as in ``topk``): ``[N, k + W]``, where
    ``W`` is the most entries any row adds; empty slots hold ``-inf`` with an index past every real one."""
    n_rows, k = values.shape
    above = pre.le(values.min(dim=1, keepdim=True).values).logical_not_()
    rows, columns = above.nonzero(as_tuple=True)
    if rows.numel() == 0:
        return values, indices
    counts = torch.bincount(rows, minlength=n_rows)
    slots = k + torch.arange(rows.numel(), device=rows.device) - (counts.cumsum(0) - counts)[rows]
    width = k + int(counts.max())
    joined_values = values.new_full((n_rows, width), -torch.inf)
    joined_indices = indices.new_full((n_rows, width), torch.iinfo(indices.dtype).max)
    joined_values[:, :k], joined_indices[:, :k] = values, indices
    joined_values[rows, slots] = pre[rows, columns]
    joined_indices[rows, slots] = columns + start
    return joined_values, joined_indices


def _keep_best(values: Tensor, indices: Tensor, pre: Tensor, start: int, k: int) -> tuple[Tensor, Tensor]:
    """Each row's best ``k`` (unordered) among those kept so far (``values``/``indices [N, ≤k]``) and the tile
    ``pre [N, tile]`` of columns ``start, start + 1, …``."""
    if values.shape[1] == k:
        values, indices = _merge_above(values, indices, pre, start)
    else:  # the first tile(s): no copy of the tile unless candidates are already kept (k > tile)
        columns = torch.arange(start, start + pre.shape[1], device=pre.device).expand_as(pre)
        if values.shape[1]:
            pre, columns = torch.cat([values, pre], dim=1), torch.cat([indices, columns], dim=1)
        values, indices = pre, columns
    return topk_with_ties(values, indices, k, ordered=False) if values.shape[1] > k else (values, indices)


@torch.no_grad()
def select_topk(x: Tensor, W_enc: Tensor, b_enc: Tensor, k: int, tile: int | None = None) -> tuple[Tensor, Tensor]:
    """Top-``k`` pre-activations of ``x [N, d_model]``: ``(values [N, k] in the accumulate dtype, indices [N, k])``."""
    n_rows, d_sae = x.shape[0], W_enc.shape[0]
    tile = tile or tile_width(n_rows, d_sae, W_enc.shape[1])
    xa = x.to(accumulate_dtype(x.dtype))
    values = xa.new_empty(n_rows, 0)
    indices = torch.empty(n_rows, 0, dtype=torch.int64, device=x.device)
    for start in range(0, d_sae, tile):  # a tile's pre-activations are freed before the next tile's GEMM
        rows = slice(start, start + tile)
        values, indices = _keep_best(values, indices, pre_acts(xa, W_enc[rows], b_enc[rows]), start, k)
    return topk_with_ties(values, indices, k)
