"""Feature classifiers (docs/methods/data.md): the OR rule over SAE features, and two baselines on the same activations.

:func:`collect_text_features` runs one forward per batch and keeps, per text and layer, which features fired
anywhere in the text (and their maximum activation) plus the mean-pooled residual. From that:

- :func:`fit_feature_classifier`: per layer and feature ``Δ = P(fires | positive) − P(fires | negative)``; keep the
  top ``K`` features (of the ``top1-diff`` layer, or of explicit layers); predict positive if any of them fires
  above ``ε`` on any token. Scores (max selected activation) rank texts for ROC / PR curves.
- :func:`fit_diff_means` and :func:`fit_logistic_probe`: a difference-of-means direction and an L2-regularised
  logistic probe on the pooled residuals, so users see whether the SAE rule helps.
- :func:`data_efficiency_curve`: F1 on held-out texts against the fraction of fitting data.

A fitted :class:`FeatureClassifier` saves to plain JSON (feature ids, Δ, ε; SAEs referenced by source, not copied).
"""

from __future__ import annotations

import json
import random
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor, nn

from .corpus import Corpus, layer_batches
from .errors import ConfigError
from .hooks import check_sae_fits
from .sae import SparseAutoencoder
from .validation import finite, positive_int, renamed


@dataclass
class TextFeatures:
    """Per text and layer: the features that fired (``fired[layer][i]`` ids, ``peak[layer][i]`` their max
    activation) and the mean-pooled residual ``pooled[layer] [n, d]``."""

    fired: dict[int, list[Tensor]]
    peak: dict[int, list[Tensor]]
    pooled: dict[int, Tensor]
    d_sae: dict[int, int]

    def __len__(self) -> int:
        return len(next(iter(self.pooled.values())))

    def subset(self, rows: Sequence[int]) -> TextFeatures:
        """These features for the texts at ``rows`` only (same layers)."""
        return TextFeatures({layer: [f[i] for i in rows] for layer, f in self.fired.items()},
                            {layer: [p[i] for i in rows] for layer, p in self.peak.items()},
                            {layer: p[list(rows)] for layer, p in self.pooled.items()}, self.d_sae)


@torch.no_grad()
def collect_text_features(model: nn.Module, tokenizer: Any, saes: SparseAutoencoder | Iterable[SparseAutoencoder],
                          data: Corpus, *, text_column: str = "text", batch_size: int = 8, max_length: int = 256,
                          skip_first: bool = True, progress: bool = True) -> TextFeatures:
    """One forward per batch for every SAE's layer; see :class:`TextFeatures`."""
    saes = [saes] if isinstance(saes, SparseAutoencoder) else list(saes)
    if not saes:
        raise ConfigError("no SAEs given")
    layers = [check_sae_fits(model, sae) for sae in saes]
    fired = {layer: [] for layer in layers}
    peak = {layer: [] for layer in layers}
    pooled = {layer: [] for layer in layers}
    for batch in layer_batches(model, tokenizer, layers, data, text_column=text_column, batch_size=batch_size,
                               max_length=max_length, progress=progress, desc="text features"):
        valid = batch.counted(skip_first)
        for sae, layer in zip(saes, layers):
            hidden = batch.hidden[layer].to(sae.device, sae.dtype)
            values, indices = sae.encode_topk(hidden)
            for row in range(len(valid)):
                keep = valid[row].to(sae.device)
                vals, idx = values[row][keep].flatten(), indices[row][keep].flatten()
                positive = vals > 0
                ids, inverse = idx[positive].unique(return_inverse=True)
                best = torch.zeros(len(ids), dtype=torch.float32, device=vals.device)
                best.scatter_reduce_(0, inverse, vals[positive].float(), reduce="amax")
                fired[layer].append(ids.cpu())
                peak[layer].append(best.cpu())
                mask = keep[:, None].to(hidden.dtype)
                pooled[layer].append(((hidden[row] * mask).sum(0) / mask.sum().clamp(min=1)).float().cpu())
    return TextFeatures(fired, peak, {layer: torch.stack(p) for layer, p in pooled.items()},
                        {layer: sae.d_sae for sae, layer in zip(saes, layers)})


def _check_labels(labels: Sequence[Any], n: int) -> Tensor:
    y = torch.as_tensor([bool(v) for v in labels])
    if len(y) != n:
        raise ConfigError(f"{len(y)} labels for {n} texts")
    if n == 0:
        raise ConfigError("no texts to fit on")
    if y.all() or not y.any():
        raise ConfigError("fitting needs both positive and negative examples (got a single class)")
    return y


def feature_deltas(features: TextFeatures, labels: Sequence[Any]) -> dict[int, Tensor]:
    """``Δ[layer] [d_sae] = P(fires anywhere | positive) − P(fires anywhere | negative)``."""
    y = _check_labels(labels, len(features))
    deltas = {}
    for layer, fired in features.fired.items():
        counts = torch.zeros(2, features.d_sae[layer])
        for ids, label in zip(fired, y.tolist()):
            counts[int(label), ids] += 1
        deltas[layer] = counts[1] / y.sum() - counts[0] / (~y).sum()
    return deltas


@dataclass
class FeatureClassifier:
    """The OR rule: positive iff any of ``features[layer]`` fires above ``epsilon`` on any token of the text."""

    features: dict[int, list[int]]
    epsilon: float = 0.0
    deltas: dict[int, list[float]] = field(default_factory=dict)
    sae_sources: dict[int, str] = field(default_factory=dict)

    def scores(self, features: TextFeatures) -> Tensor:
        """``[n]`` maximum activation of the selected features in each text (0 when none fires)."""
        for layer in self.features:
            if layer not in features.fired:
                raise ConfigError(f"the classifier reads layer {layer}, the collected features cover "
                                  f"{sorted(features.fired)}")
        n = len(features)
        out = torch.zeros(n)
        for layer, selected in self.features.items():
            chosen = torch.tensor(selected)
            for i, (ids, peak) in enumerate(zip(features.fired[layer], features.peak[layer])):
                hit = torch.isin(ids, chosen)
                if hit.any():
                    out[i] = max(out[i], float(peak[hit].max()))
        return out

    def predict(self, features: TextFeatures) -> Tensor:
        """``[N]`` bool: a text is positive when its score exceeds ``epsilon`` (the OR rule)."""
        return self.scores(features) > self.epsilon

    def to_json(self) -> str:
        """The classifier as JSON (feature ids, Δ, ε; SAEs referenced by source)."""
        return json.dumps({"type": "qscope.FeatureClassifier", **asdict(self)}, indent=2)

    @classmethod
    def from_json(cls, text: str) -> FeatureClassifier:
        data = json.loads(text)
        data.pop("type", None)
        for key in ("features", "deltas", "sae_sources"):
            data[key] = {int(layer): value for layer, value in data.get(key, {}).items()}
        return cls(**data)

    def save(self, path: str | Path) -> Path:
        """Write :meth:`to_json` to ``path``; returns the path."""
        path = Path(path)
        path.write_text(self.to_json())
        return path

    @classmethod
    def load(cls, path: str | Path) -> FeatureClassifier:
        return cls.from_json(Path(path).read_text())


def fit_feature_classifier(features: TextFeatures, labels: Sequence[Any], *, top: int = 10,
                           layers: Literal["top1-diff"] | Sequence[int] = "top1-diff", epsilon: float = 0.0,
                           sae_sources: Mapping[int, str] | None = None,
                           top_k: int | None = None) -> FeatureClassifier:
    """Keep the ``top`` features with the largest Δ per chosen layer (``"top1-diff"``: the layer whose best single
    feature has the largest Δ)."""
    top = renamed("fit_feature_classifier", "top_k", top_k, "top", top, 10)
    positive_int("top", top)
    finite("epsilon", epsilon, non_negative=True)
    deltas = feature_deltas(features, labels)
    if layers == "top1-diff":
        chosen = [max(deltas, key=lambda layer: float(deltas[layer].max()))]
    else:
        chosen = list(layers)
        missing = [layer for layer in chosen if layer not in deltas]
        if missing:
            raise ConfigError(f"layers {missing} are not covered by the collected SAE features ({sorted(deltas)})")
    selected = {layer: deltas[layer].argsort(descending=True, stable=True)[:top].tolist() for layer in chosen}
    return FeatureClassifier(selected, epsilon, {layer: deltas[layer][ids].tolist() for layer, ids in selected.items()},
                             dict(sae_sources or {}))


@dataclass
class ProbeClassifier:
    """A linear rule on a layer's pooled residual: positive iff ``pooled · weight + bias > 0``."""

    layer: int
    weight: Tensor
    bias: float

    def scores(self, features: TextFeatures) -> Tensor:
        """``[N]`` scores: the pooled residual of each text projected on the probe, plus its bias."""
        return features.pooled[self.layer] @ self.weight + self.bias

    def predict(self, features: TextFeatures) -> Tensor:
        """``[N]`` bool: a text is positive when its score is above 0."""
        return self.scores(features) > 0


def fit_diff_means(features: TextFeatures, labels: Sequence[Any], layer: int) -> ProbeClassifier:
    """Direction = mean pooled residual of positives − of negatives; threshold halfway between the class medians
    of the projections (medians, so one text with an outlying residual cannot move the threshold past a class)."""
    y = _check_labels(labels, len(features))
    x = features.pooled[layer]
    direction = x[y].mean(0) - x[~y].mean(0)
    projected = x @ direction
    return ProbeClassifier(layer, direction, -float(projected[y].median() + projected[~y].median()) / 2)


def fit_logistic_probe(features: TextFeatures, labels: Sequence[Any], layer: int, *, l2: float = 1e-3,
                       steps: int = 200) -> ProbeClassifier:
    """L2-regularised logistic regression on standardised pooled residuals (full-batch L-BFGS)."""
    y = _check_labels(labels, len(features)).float()
    x = features.pooled[layer].double()
    mean, std = x.mean(0), x.std(0).clamp(min=1e-6)
    z = (x - mean) / std
    weight = torch.zeros(z.shape[1], dtype=torch.float64, requires_grad=True)
    bias = torch.zeros((), dtype=torch.float64, requires_grad=True)
    optimizer = torch.optim.LBFGS([weight, bias], max_iter=steps, line_search_fn="strong_wolfe")

    def closure():
        optimizer.zero_grad()
        loss = nn.functional.binary_cross_entropy_with_logits(z @ weight + bias, y.double()) + l2 * weight.pow(2).sum()
        loss.backward()
        return loss

    optimizer.step(closure)
    w = (weight / std).detach()
    return ProbeClassifier(layer, w.float(), float(bias.detach() - (mean * w).sum()))


def f1_score(predicted: Tensor, labels: Sequence[Any]) -> float:
    """F1 of ``predicted [N]`` (bool) against ``labels`` (truthy = positive); 0 when there are no true positives."""
    y = torch.as_tensor([bool(v) for v in labels])
    tp = float((predicted & y).sum())
    precision = tp / max(float(predicted.sum()), 1.0)
    recall = tp / max(float(y.sum()), 1.0)
    return 0.0 if tp == 0 else 2 * precision * recall / (precision + recall)


def data_efficiency_curve(fit: TextFeatures, fit_labels: Sequence[Any], test: TextFeatures,
                          test_labels: Sequence[Any], *, fractions: Sequence[float] = (0.01, 0.05, 0.1, 0.25, 0.5, 1.0),
                          repeats: int = 3, seed: int = 0, **options: Any) -> list[dict[str, float]]:
    """F1 of the OR-rule classifier on ``test`` when fitted on a random fraction of ``fit`` (mean and range over
    ``repeats`` draws; draws with a single class are redrawn)."""
    rng = random.Random(seed)
    labels = [bool(v) for v in fit_labels]
    curve = []
    for fraction in fractions:
        scores = []
        for _ in range(repeats):
            size = max(2, round(fraction * len(fit)))
            for _attempt in range(100):
                rows = rng.sample(range(len(fit)), size)
                chosen = [labels[i] for i in rows]
                if any(chosen) and not all(chosen):
                    break
            else:
                raise ConfigError(f"cannot draw both classes in {size} examples")
            classifier = fit_feature_classifier(fit.subset(rows), chosen, **options)
            scores.append(f1_score(classifier.predict(test), test_labels))
        curve.append({"fraction": fraction, "f1": sum(scores) / len(scores), "f1_min": min(scores),
                      "f1_max": max(scores)})
    return curve


__all__ = [
    "FeatureClassifier",
    "ProbeClassifier",
    "TextFeatures",
    "collect_text_features",
    "data_efficiency_curve",
    "f1_score",
    "feature_deltas",
    "fit_diff_means",
    "fit_feature_classifier",
    "fit_logistic_probe",
]
