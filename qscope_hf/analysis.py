"""Evaluation analysis by feature footprints (docs/methods/data.md): coverage, redundancy and overlap of benchmarks.

- Footprint of a sample: the set of features that fire on it (on all its tokens, or on its last token only);
  of a benchmark ``D``: their union ``F(D)``.
- Coverage curve ``c_n = E_S[|F(S)| / |F(D)|]`` over random subsets ``S`` of ``n`` samples, with a band (the
  10th–90th percentiles of the draws).
- Feature redundancy ``R̂(D) = AUC(c_n) · N / |F(D)|``, AUC taken over ``n/N ∈ [0, 1]``: high when a few samples
  already show most of the benchmark's features and when there are many samples per feature.
- Overlap: asymmetric ``|F(D1) ∩ F(D2)| / |F(D1)|`` (how much of D1 D2 covers) and symmetric (Jaccard), and a
  matrix of either over many benchmarks.
- Ranking-stability redundancy ``R``: mean Kendall τ between the model ranking on random subsets and on the full
  benchmark, from per-model per-sample scores, to validate ``R̂`` where scores exist.

Benchmarks are read from disk (json/jsonl/parquet/csv, text column configurable) by :func:`qscope_hf.loading.
load_texts`; plots are PNG files (matplotlib) that :class:`qscope_hf.report.Report` embeds.
"""

from __future__ import annotations

import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from itertools import combinations
from pathlib import Path
from typing import Any, Literal, get_args

import torch
from torch import nn

from .corpus import Corpus, layer_batches
from .errors import ConfigError, MissingDependencyError
from .hooks import check_sae_fits
from .sae import SparseAutoencoder
from .validation import fraction as fraction_
from .validation import positive_int

Footprint = frozenset[int]
FootprintMode = Literal["all", "last"]
FOOTPRINT_MODES: tuple[FootprintMode, ...] = get_args(FootprintMode)


@torch.no_grad()
def footprints(model: nn.Module, tokenizer: Any, sae: SparseAutoencoder, data: Corpus, *, mode: FootprintMode = "all",
               text_column: str = "text", batch_size: int = 8, max_length: int = 256,
               skip_first: bool = True) -> list[Footprint]:
    """The features firing on each sample: on every real token (``mode="all"``, each text's first token skipped
    unless ``skip_first=False``) or on its last token (``mode="last"``)."""
    if mode not in FOOTPRINT_MODES:
        raise ConfigError(f"mode must be one of {FOOTPRINT_MODES}, got {mode!r}")
    layer = check_sae_fits(model, sae)
    result = []
    for batch in layer_batches(model, tokenizer, [layer], data, text_column=text_column, batch_size=batch_size,
                               max_length=max_length, progress=False):
        values, indices = sae.encode_topk(batch.hidden[layer].to(sae.device, sae.dtype))
        if mode == "last":
            keep = batch.real & (batch.positions == batch.real.sum(1, keepdim=True) - 1)
        else:
            keep = batch.counted(skip_first)
        keep = keep.to(values.device)
        for row in range(len(values)):
            fired = indices[row][keep[row]][values[row][keep[row]] > 0]
            result.append(frozenset(fired.unique().tolist()))
    return result


def union(prints: Sequence[Footprint]) -> set[int]:
    """``F(D)``: the union of the footprints of a benchmark's samples."""
    if not prints:
        raise ConfigError("a benchmark needs at least one sample")
    return set().union(*prints)


@dataclass
class CoverageCurve:
    """``c_n`` at subset sizes ``n`` (mean, and the 10th and 90th percentile over draws)."""

    n: list[int]
    mean: list[float]
    low: list[float]
    high: list[float]

    def auc(self) -> float:
        """Trapezoid area of ``c_n`` over ``n / N`` from 0 (where ``c_0 = 0``) to 1."""
        total = self.n[-1]
        xs = [0.0] + [n / total for n in self.n]
        ys = [0.0] + self.mean
        return sum((xs[i + 1] - xs[i]) * (ys[i + 1] + ys[i]) / 2 for i in range(len(xs) - 1))


def coverage_curve(prints: Sequence[Footprint], *, points: int = 20, draws: int = 50, seed: int = 0) -> CoverageCurve:
    """``c_n = E_S[|F(S)| / |F(D)|]`` for ``points`` subset sizes from 1 to N (``draws`` random subsets each)."""
    positive_int("points", points)
    positive_int("draws", draws)
    everything = union(prints)
    size = len(prints)
    rng = random.Random(seed)
    ns = sorted({max(1, round(size * (i + 1) / points)) for i in range(points)})
    curve = CoverageCurve([], [], [], [])
    for n in ns:
        ratios = sorted(len(union(rng.sample(list(prints), n))) / max(len(everything), 1)
                        for _ in range(draws if n < size else 1))
        curve.n.append(n)
        curve.mean.append(sum(ratios) / len(ratios))
        curve.low.append(ratios[int(0.1 * (len(ratios) - 1))])
        curve.high.append(ratios[int(0.9 * (len(ratios) - 1))])
    return curve


def redundancy(prints: Sequence[Footprint], **options: Any) -> float:
    """``R̂(D) = AUC(c_n) · N / |F(D)|``."""
    return coverage_curve(prints, **options).auc() * len(prints) / max(len(union(prints)), 1)


def overlap(first: Sequence[Footprint], second: Sequence[Footprint], *, symmetric: bool = False) -> float:
    """``|F(D1) ∩ F(D2)| / |F(D1)|`` (``symmetric``: ``/ |F(D1) ∪ F(D2)|``)."""
    a, b = union(first), union(second)
    return len(a & b) / max(len(a | b) if symmetric else len(a), 1)


def overlap_matrix(benchmarks: Mapping[str, Sequence[Footprint]], *, symmetric: bool = False) -> list[list[float]]:
    """``matrix[i][j] = overlap(benchmark i → benchmark j)`` in the mapping's order."""
    names = list(benchmarks)
    return [[overlap(benchmarks[a], benchmarks[b], symmetric=symmetric) for b in names] for a in names]


def kendall_tau(x: Sequence[float], y: Sequence[float]) -> float:
    """Kendall's τ-b between two score lists."""
    concordant = discordant = ties_x = ties_y = 0
    for i, j in combinations(range(len(x)), 2):
        dx, dy = x[i] - x[j], y[i] - y[j]
        if dx == 0 and dy == 0:
            continue
        if dx == 0:
            ties_x += 1
        elif dy == 0:
            ties_y += 1
        elif (dx > 0) == (dy > 0):
            concordant += 1
        else:
            discordant += 1
    denominator = ((concordant + discordant + ties_x) * (concordant + discordant + ties_y)) ** 0.5
    return (concordant - discordant) / denominator if denominator else 0.0


def ranking_redundancy(scores: Mapping[str, Sequence[float]], *, fraction: float = 0.1, draws: int = 100,
                       seed: int = 0) -> float:
    """Ranking-stability redundancy ``R``: mean Kendall τ between the models' mean scores on random subsets of
    ``fraction`` of the samples and on the whole benchmark (``scores``: model -> per-sample scores)."""
    fraction_("fraction", fraction)
    positive_int("draws", draws)
    models = list(scores)
    lengths = {len(v) for v in scores.values()}
    if len(models) < 2 or len(lengths) != 1:
        raise ConfigError("need per-sample scores of at least two models, all over the same samples")
    size = lengths.pop()
    full = [sum(scores[m]) / size for m in models]
    rng = random.Random(seed)
    n = max(1, round(fraction * size))
    taus = []
    for _ in range(draws):
        rows = rng.sample(range(size), n)
        taus.append(kendall_tau([sum(scores[m][i] for i in rows) / n for m in models], full))
    return sum(taus) / len(taus)


def _figure(**options: Any) -> Any:
    """A matplotlib ``Figure`` (no pyplot: a notebook's backend and figures are left alone); plots are the only
    part of qscope that needs matplotlib, an optional dependency."""
    try:
        from matplotlib.figure import Figure
    except ImportError:
        raise MissingDependencyError("plots need matplotlib: pip install 'qscope[plots]'") from None
    return Figure(**options)


def plot_coverage(curves: Mapping[str, CoverageCurve], path: str | Path) -> Path:
    """Coverage curves (with bands) of several benchmarks, against the fraction of samples, as a PNG."""
    figure = _figure(figsize=(6, 4))
    axis = figure.subplots()
    for name, curve in curves.items():
        xs = [n / curve.n[-1] for n in curve.n]
        axis.plot(xs, curve.mean, label=name)
        axis.fill_between(xs, curve.low, curve.high, alpha=0.2)
    axis.set(xlabel="fraction of samples n/N", ylabel="c_n = |F(S)| / |F(D)|", ylim=(0, 1.02),
             title="feature coverage")
    axis.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    return Path(path)


def plot_overlap(names: Sequence[str], matrix: Sequence[Sequence[float]], path: str | Path) -> Path:
    """An overlap heatmap (row benchmark → column benchmark) as a PNG."""
    figure = _figure(figsize=(1.2 * len(names) + 2, 1.0 * len(names) + 1.5))
    axis = figure.subplots()
    image = axis.imshow(matrix, vmin=0, vmax=1, cmap="viridis")
    axis.set_xticks(range(len(names)), names, rotation=45, ha="right")
    axis.set_yticks(range(len(names)), names)
    for i, row in enumerate(matrix):
        for j, value in enumerate(row):
            axis.text(j, i, f"{value:.2f}", ha="center", va="center", color="white" if value < 0.6 else "black")
    axis.set_title("overlap(row → column)")
    figure.colorbar(image)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    return Path(path)
