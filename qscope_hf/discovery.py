"""Feature discovery (docs/methods/steering.md): activation statistics over a corpus, and contrast between two corpora.

:func:`activation_stats` runs one forward per batch for every requested layer, encodes each layer with its SAE
(top-k, through :mod:`qscope_hf.ops`) and accumulates per feature: how often it fires (activation > 0), the sum
and maximum of its activation, and its top-activating contexts. :func:`contrast_features` ranks features by the
difference of firing rates (or mean activations) between two corpora and says which way to steer each; how hard
is for :func:`qscope_hf.calibration.calibrate_strength` to say (raw strengths do not transfer between features,
layers or models).
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, get_args

import torch
from torch import Tensor, nn

from .corpus import Corpus, as_dataset, layer_batches, residual_spread
from .errors import ConfigError
from .hooks import check_sae_fits
from .sae import SparseAutoencoder
from .validation import non_negative_int, positive_int

#: Multipliers of the firing-rate difference (in percentage points) behind the deprecated ``ContrastRow.strengths``.
CONTRAST_MULTIPLIERS = (0.5, 2.0, 10.0)
ContrastBy = Literal["rate", "mean"]
CONTRAST_BY: tuple[ContrastBy, ...] = get_args(ContrastBy)

@dataclass
class FeatureContext:
    """One top-activating occurrence of a feature: the token, its neighbours, and the activation."""

    doc: int
    position: int
    value: float
    token: str
    left: str
    right: str


@dataclass
class FeatureStats:
    """Statistics of one SAE's features over ``tokens`` counted token positions (tensors are ``[d_sae]`` or
    ``[d_sae, n_contexts]``)."""

    sae: SparseAutoencoder
    tokens: int
    fire_count: Tensor
    act_sum: Tensor
    act_max: Tensor
    top_values: Tensor
    top_docs: Tensor
    top_positions: Tensor
    doc_tokens: dict[int, list[int]] = field(default_factory=dict, repr=False)
    tokenizer: Any = field(default=None, repr=False)

    @property
    def layer(self) -> int:
        """The layer of the SAE these statistics were gathered with."""
        return self.sae.layer

    @property
    def rate(self) -> Tensor:
        """Fraction of counted token positions where each feature fires."""
        return self.fire_count.double() / max(self.tokens, 1)

    @property
    def mean(self) -> Tensor:
        """Mean activation over all counted positions (zeros included)."""
        return self.act_sum / max(self.tokens, 1)

    def top_contexts(self, feature: int, *, window: int = 8) -> list[FeatureContext]:
        """The recorded top-activating contexts of ``feature``, best first, ``window`` tokens either side."""
        feature = int(self.sae.feature_index(feature)[0])
        found = []
        for value, doc, position in zip(self.top_values[feature].tolist(), self.top_docs[feature].tolist(),
                                        self.top_positions[feature].tolist()):
            if doc < 0:
                break
            ids = self.doc_tokens[doc]
            decode = self.tokenizer.decode
            found.append(FeatureContext(doc, position, value, decode(ids[position:position + 1]),
                                        decode(ids[max(0, position - window):position]),
                                        decode(ids[position + 1:position + 1 + window])))
        return found


class _Accumulator:
    """Running statistics for one SAE, updated from top-k codes of each batch."""

    def __init__(self, sae: SparseAutoencoder, n_contexts: int) -> None:
        d_sae = sae.d_sae
        self.sae, self.n = sae, n_contexts
        self.tokens = 0
        self.fire_count = torch.zeros(d_sae, dtype=torch.long)
        self.act_sum = torch.zeros(d_sae, dtype=torch.float64)
        self.act_max = torch.zeros(d_sae)
        self.top_values = torch.full((d_sae, n_contexts), -torch.inf)
        self.top_docs = torch.full((d_sae, n_contexts), -1, dtype=torch.long)
        self.top_positions = torch.full((d_sae, n_contexts), -1, dtype=torch.long)

    def add(self, values: Tensor, indices: Tensor, valid: Tensor, docs: Tensor, positions: Tensor) -> None:
        """``values``/``indices [B, T, k]`` codes; ``valid [B, T]`` counted positions; ``docs [B]``,
        ``positions [B, T]`` where each token comes from."""
        self.tokens += int(valid.sum())
        k = values.shape[-1]
        fires = (values > 0) & valid[..., None]
        feats, vals = indices[fires].cpu(), values[fires].float().cpu()
        self.fire_count += torch.bincount(feats, minlength=self.sae.d_sae)
        self.act_sum.index_add_(0, feats, vals.double())
        self.act_max.scatter_reduce_(0, feats, vals, reduce="amax")
        if self.n == 0:
            return
        entry_docs = docs[:, None, None].expand_as(values)[fires].cpu()
        entry_positions = positions[..., None].expand(-1, -1, k)[fires].cpu()
        could_enter = vals > self.top_values[feats, -1]
        self._merge(vals[could_enter], feats[could_enter], entry_docs[could_enter], entry_positions[could_enter])

    def _merge(self, vals: Tensor, feats: Tensor, docs: Tensor, positions: Tensor) -> None:
        """Keep the ``n`` best (value, doc, position) per feature among the table and the new entries."""
        if not len(vals):
            return
        touched = feats.unique()
        n = self.n
        all_vals = torch.cat([self.top_values[touched].flatten(), vals])
        all_feats = torch.cat([touched.repeat_interleave(n), feats])
        all_docs = torch.cat([self.top_docs[touched].flatten(), docs])
        all_positions = torch.cat([self.top_positions[touched].flatten(), positions])
        order = all_vals.argsort(descending=True, stable=True)
        order = order[all_feats[order].argsort(stable=True)]
        sorted_feats = all_feats[order]
        rank = torch.arange(len(order)) - torch.searchsorted(sorted_feats, sorted_feats)
        keep = order[rank < n]
        slots = rank[rank < n]
        self.top_values[all_feats[keep], slots] = all_vals[keep]
        self.top_docs[all_feats[keep], slots] = all_docs[keep]
        self.top_positions[all_feats[keep], slots] = all_positions[keep]

    def result(self, tokenizer: Any) -> FeatureStats:
        return FeatureStats(self.sae, self.tokens, self.fire_count, self.act_sum, self.act_max, self.top_values,
                            self.top_docs, self.top_positions, tokenizer=tokenizer)


@torch.no_grad()
def activation_stats(model: nn.Module, tokenizer: Any, saes: SparseAutoencoder | Iterable[SparseAutoencoder],
                     data: Corpus, *, text_column: str = "text", batch_size: int = 8, max_length: int = 256,
                     skip_first: bool = True, exclude_tokens: Iterable[int] | None = None, n_contexts: int = 5,
                     progress: bool = True) -> dict[int, FeatureStats]:
    """Per-feature statistics of each SAE (keyed by its layer) over ``data`` (texts or a ``datasets.Dataset``).

    One forward per batch serves every layer. Counted positions are real tokens, minus each text's first token
    when ``skip_first`` (it carries an outsized norm) and minus ``exclude_tokens`` (e.g. from
    :func:`common_tokens`). ``n_contexts`` top-activating contexts are kept per feature.
    """
    saes = [saes] if isinstance(saes, SparseAutoencoder) else list(saes)
    positive_int("batch_size", batch_size)
    positive_int("max_length", max_length)
    non_negative_int("n_contexts", n_contexts)
    if not saes:
        raise ConfigError("no SAEs given")
    layers = [check_sae_fits(model, sae) for sae in saes]
    if len(set(layers)) != len(layers):
        raise ConfigError(f"one SAE per layer, got layers {layers}")
    dataset = as_dataset(data, text_column)
    excluded = torch.tensor(sorted(set(exclude_tokens or ())), dtype=torch.long)
    accumulators = [_Accumulator(sae, n_contexts) for sae in saes]
    for batch in layer_batches(model, tokenizer, layers, dataset, text_column=text_column, batch_size=batch_size,
                               max_length=max_length, progress=progress, desc="activation stats"):
        valid = batch.counted(skip_first)
        if excluded.numel():
            valid &= ~torch.isin(batch.inputs["input_ids"], excluded.to(valid.device))
        docs = torch.arange(batch.start, batch.start + len(valid))
        for accumulator, layer in zip(accumulators, layers):
            sae = accumulator.sae
            values, indices = sae.encode_topk(batch.hidden[layer].to(sae.device, sae.dtype))
            accumulator.add(values, indices, valid.to(sae.device), docs.to(sae.device),
                            batch.positions.to(sae.device))
    stats = {layer: acc.result(tokenizer) for layer, acc in zip(layers, accumulators)}
    referenced = sorted({d for s in stats.values() for d in s.top_docs[s.top_docs >= 0].unique().tolist()})
    for doc in referenced:
        ids = tokenizer(dataset[doc][text_column], truncation=True, max_length=max_length)["input_ids"]
        for s in stats.values():
            s.doc_tokens[doc] = ids
    return stats


def common_tokens(tokenizer: Any, texts_a: Iterable[str], texts_b: Iterable[str]) -> set[int]:
    """Token ids that occur in both corpora (pass to ``activation_stats(exclude_tokens=...)`` to compare only
    what tells the corpora apart)."""

    def vocabulary(texts: Iterable[str]) -> set[int]:
        return {i for ids in tokenizer(list(texts))["input_ids"] for i in ids}

    return vocabulary(texts_a) & vocabulary(texts_b)


@dataclass
class ContrastRow:
    """One feature's difference between corpus A and corpus B; ``sign`` (+1 or −1) steers towards A."""

    layer: int
    feature: int
    rate_a: float
    rate_b: float
    mean_a: float
    mean_b: float

    @property
    def sign(self) -> float:
        """The sign of a strength that steers towards corpus A (+1 when the feature fires more there)."""
        return 1.0 if self.rate_diff >= 0 else -1.0

    @property
    def strengths(self) -> tuple[float, float, float]:
        """Deprecated: absolute strengths from the rate difference, which mean nothing on another model (57 did
        nothing against a residual norm of 6400). Calibrate instead (:func:`qscope_hf.calibration.calibrate_strength`,
        ``qscope steer --auto-strength``), starting from ``sign``."""
        warnings.warn("ContrastRow.strengths does not transfer between models and goes in the next release: use "
                      "row.sign and calibrate_strength", FutureWarning, stacklevel=2)
        return tuple(m * 100 * self.rate_diff for m in CONTRAST_MULTIPLIERS)

    @property
    def rate_diff(self) -> float:
        """Firing rate on corpus A minus firing rate on corpus B."""
        return self.rate_a - self.rate_b

    @property
    def mean_diff(self) -> float:
        """Mean activation on corpus A minus mean activation on corpus B."""
        return self.mean_a - self.mean_b


def _by_layer(stats: FeatureStats | dict[int, FeatureStats]) -> dict[int, FeatureStats]:
    return {stats.layer: stats} if isinstance(stats, FeatureStats) else dict(stats)


def contrast_features(stats_a: FeatureStats | dict[int, FeatureStats], stats_b: FeatureStats | dict[int, FeatureStats],
                      *, top: int = 20, by: ContrastBy = "rate") -> list[ContrastRow]:
    """The ``top`` features per layer ranked by ``|rate_A − rate_B|`` (``by="rate"``) or by
    ``|mean_A − mean_B|`` (``by="mean"``), best first.

    Each row's ``sign`` steers towards A; calibrate the strength (:func:`qscope_hf.calibration.calibrate_strength`).
    """
    if by not in CONTRAST_BY:
        raise ConfigError(f"by must be one of {CONTRAST_BY}, got {by!r}")
    positive_int("top", top)
    a, b = _by_layer(stats_a), _by_layer(stats_b)
    if set(a) != set(b):
        raise ConfigError(f"the two corpora were analysed at different layers: {sorted(a)} vs {sorted(b)}")
    rows = []
    for layer in sorted(a):
        sa, sb = a[layer], b[layer]
        if sa.sae.d_sae != sb.sae.d_sae:
            raise ConfigError(f"layer {layer}: SAEs differ in width ({sa.sae.d_sae} vs {sb.sae.d_sae})")
        diff = (sa.rate - sb.rate) if by == "rate" else (sa.mean - sb.mean)
        for feature in diff.abs().argsort(descending=True, stable=True)[:top].tolist():
            rows.append(ContrastRow(layer, feature, float(sa.rate[feature]), float(sb.rate[feature]),
                                    float(sa.mean[feature]), float(sb.mean[feature])))
    return rows


def format_contrast(rows: Sequence[ContrastRow]) -> str:
    """A markdown table of :func:`contrast_features` rows."""
    lines = ["| layer | feature | rate A | rate B | Δ rate | mean A | mean B | steer towards A |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r.layer} | {r.feature} | {r.rate_a:.3f} | {r.rate_b:.3f} | {r.rate_diff:+.3f} | "
                     f"{r.mean_a:.3f} | {r.mean_b:.3f} | {'+' if r.sign > 0 else '−'} |")
    lines.append("\nstrength: calibrate it on the model (calibrate_strength, or qscope steer --auto-strength with the "
                 "sign above); raw strengths do not transfer between features, layers or models")
    return "\n".join(lines)


@torch.no_grad()
def residual_norm(model: nn.Module, tokenizer: Any, layer: int, data: Corpus, *, text_column: str = "text",
                  batch_size: int = 8, max_length: int = 256) -> float:
    """Median norm of the residual stream after ``layer`` over ``data`` (first tokens excluded): the scale a
    steering vector must be compared with (decoder columns have unit norm, so α is in these units)."""
    norms = [batch.hidden[layer][batch.counted(skip_first=True)].float().norm(dim=-1).cpu()
             for batch in layer_batches(model, tokenizer, [layer], data, text_column=text_column,
                                        batch_size=batch_size, max_length=max_length, progress=False)]
    return float(torch.cat(norms).median())


@torch.no_grad()
def residual_unit(model: nn.Module, tokenizer: Any, layer: int, data: Corpus, *, text_column: str = "text",
                  batch_size: int = 8, max_length: int = 256) -> float:
    """The unit of ``relative=True`` strengths at ``layer`` on ``data``: the median over texts of each text's
    :func:`~qscope_hf.corpus.residual_spread` (what a steered prompt measures on itself)."""
    spreads = [residual_spread(batch.hidden[layer], batch.real).cpu()
               for batch in layer_batches(model, tokenizer, [layer], data, text_column=text_column,
                                          batch_size=batch_size, max_length=max_length, progress=False)]
    return float(torch.cat(spreads).median())


def __getattr__(name: str) -> object:
    """The language and repetition helpers moved to :mod:`qscope_hf.languages` and :mod:`qscope_hf.repetition`;
    their old names here keep working for one release, with a warning."""
    moved = {"language_features": "languages", "estimate_language_baselines": "languages",
             "repetition_features": "repetition"}
    if name in moved:
        import importlib
        import warnings

        warnings.warn(f"qscope_hf.discovery.{name} moved to qscope_hf.{moved[name]}.{name}", FutureWarning,
                      stacklevel=2)
        return getattr(importlib.import_module(f"qscope_hf.{moved[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
