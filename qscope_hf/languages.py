"""Language features and baselines for SASFT (docs/methods/post-training.md): which SAE features belong to a
language, and the mean pre-activation α of each feature on each language's own text.

Both results are typed mappings that also read as the nested dicts they hold:

- :class:`LanguageFeatures`: layer -> language -> feature ids (best first); ``.of("zh")`` keeps one language, as
  :class:`qscope_trl.SAEFeaturePenalty` takes it;
- :class:`LanguageBaselines`: layer -> language -> feature -> α, with ``.alpha(layer, language, feature)`` and a
  JSON round trip (feature ids stay integers).
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import datasets
import torch
from torch import Tensor, nn

from .corpus import as_dataset, layer_batches
from .discovery import activation_stats
from .errors import ConfigError, MissingColumnError
from .hooks import check_sae_fits
from .sae import SparseAutoencoder
from .validation import positive_int


class _ByLayer(Mapping[int, Any]):
    """A read-only mapping layer -> per-layer values, over the ``by_layer`` dict of a dataclass."""

    by_layer: dict[int, Any]

    def __getitem__(self, layer: int) -> Any:
        return self.by_layer[layer]

    def __iter__(self) -> Iterator[int]:
        return iter(self.by_layer)

    def __len__(self) -> int:
        return len(self.by_layer)


@dataclass(frozen=True)
class LanguageFeatures(_ByLayer):
    """``by_layer[layer][language]``: the language's feature ids at that layer, most monolingual first."""

    by_layer: dict[int, dict[str, list[int]]]

    @property
    def languages(self) -> list[str]:
        """The languages that have features at some layer, sorted."""
        return sorted({lang for per_layer in self.by_layer.values() for lang in per_layer})

    def of(self, *languages: str) -> dict[int, dict[str, list[int]]]:
        """Only ``languages`` (layer -> language -> ids): the features to keep out of the other languages."""
        unknown = sorted(set(languages) - set(self.languages))
        if unknown:
            raise ConfigError(f"no features for languages {unknown}; known: {self.languages}")
        return {layer: {lang: ids for lang, ids in per_layer.items() if lang in languages}
                for layer, per_layer in self.by_layer.items()}

    def union(self) -> dict[int, list[int]]:
        """Every language's features per layer (layer -> sorted ids), e.g. for :func:`estimate_language_baselines`."""
        return {layer: sorted({f for ids in per_layer.values() for f in ids})
                for layer, per_layer in self.by_layer.items()}


@dataclass(frozen=True)
class LanguageBaselines(_ByLayer):
    """``by_layer[layer][language][feature]``: α, the mean pre-activation of the feature on the language's text."""

    by_layer: dict[int, dict[str, dict[int, float]]]

    def __post_init__(self) -> None:  # JSON turns integer keys into strings: take them back
        by_layer = {int(layer): {str(lang): {int(f): float(a) for f, a in per_lang.items()}
                                 for lang, per_lang in per_layer.items()}
                    for layer, per_layer in self.by_layer.items()}
        object.__setattr__(self, "by_layer", by_layer)

    @classmethod
    def coerce(cls, baselines: Mapping[Any, Any]) -> LanguageBaselines:
        """``baselines`` as :class:`LanguageBaselines` (a nested mapping is converted, string keys included)."""
        return baselines if isinstance(baselines, cls) else cls(dict(baselines))

    def alpha(self, layer: int, language: str, feature: int) -> float:
        """α of ``feature`` on ``language`` at ``layer``; a :class:`ConfigError` naming what is missing."""
        try:
            return self.by_layer[layer][language][feature]
        except KeyError:
            raise ConfigError(f"no baseline for feature {feature} of language {language!r} at layer {layer}") from None

    def to_json(self) -> str:
        """The baselines as JSON (layer -> language -> feature -> α)."""
        return json.dumps(self.by_layer)

    @classmethod
    def from_json(cls, text: str) -> LanguageBaselines:
        return cls(json.loads(text))


def _language_subsets(data: datasets.Dataset, language_column: str) -> dict[str, datasets.Dataset]:
    if language_column not in data.column_names:
        raise MissingColumnError(f"language column {language_column!r} not in the dataset (columns: "
                                 f"{data.column_names})")
    languages = sorted(set(data[language_column]))
    if len(languages) < 2:
        raise ConfigError(f"need texts in at least two languages, got {languages}")
    return {lang: data.filter(lambda row, lang=lang: row[language_column] == lang) for lang in languages}


def language_features(model: nn.Module, tokenizer: Any, saes: SparseAutoencoder | Iterable[SparseAutoencoder],
                      data: datasets.Dataset, *, language_column: str = "language", text_column: str = "text",
                      top: int = 20, **stats_options: Any) -> LanguageFeatures:
    """Per layer and language L, the ``top`` features by monolinguality: mean activation on L minus the mean of
    their mean activations on the other languages (docs/methods/post-training.md). One pass over each language's
    texts."""
    positive_int("top", top)
    subsets = _language_subsets(data, language_column)
    stats_options.setdefault("progress", False)
    means = {lang: activation_stats(model, tokenizer, saes, subset, text_column=text_column, **stats_options)
             for lang, subset in subsets.items()}
    result: dict[int, dict[str, list[int]]] = {}
    for layer in next(iter(means.values())):
        table = torch.stack([means[lang][layer].mean for lang in subsets])  # [languages, d_sae]
        for row, lang in enumerate(subsets):
            others = torch.cat([table[:row], table[row + 1:]]).mean(0)
            score = table[row] - others
            result.setdefault(layer, {})[lang] = score.argsort(descending=True, stable=True)[:top].tolist()
    return LanguageFeatures(result)


@torch.no_grad()
def estimate_language_baselines(model: nn.Module, tokenizer: Any, saes: SparseAutoencoder | Iterable[SparseAutoencoder],
                                features: Mapping[int, Iterable[int]] | LanguageFeatures, data: datasets.Dataset, *,
                                language_column: str = "language", text_column: str = "text", batch_size: int = 8,
                                max_length: int = 256, progress: bool = True) -> LanguageBaselines:
    """α per layer, language and feature: the mean pre-activation ``f_s(x)`` of each feature in ``features[layer]``
    over the tokens (first token of each text skipped) of that language's texts — the baseline of the SASFT loss.
    ``features`` is layer -> feature ids, or a :class:`LanguageFeatures` (all of its languages' features)."""
    if isinstance(features, LanguageFeatures):
        features = features.union()
    saes = {sae.layer: sae for sae in ([saes] if isinstance(saes, SparseAutoencoder) else saes)}
    positive_int("batch_size", batch_size)
    positive_int("max_length", max_length)
    if not features or not all(list(fs) for fs in features.values()):
        raise ConfigError(f"features must name at least one feature per layer, got {features!r}")
    for layer in features:
        if layer not in saes:
            raise ConfigError(f"no SAE given for layer {layer} (SAEs for layers {sorted(saes)})")
        check_sae_fits(model, saes[layer])
    readers = {layer: saes[layer].feature_reader(sorted(set(fs))) for layer, fs in features.items()}
    dataset = as_dataset(data, text_column)
    if language_column not in dataset.column_names:
        raise MissingColumnError(f"language column {language_column!r} not in the dataset (columns: "
                                 f"{dataset.column_names})")
    sums: dict[tuple[int, str], Tensor] = {}
    counts: dict[str, int] = {}
    for batch in layer_batches(model, tokenizer, list(features), dataset, text_column=text_column,
                               batch_size=batch_size, max_length=max_length, progress=progress,
                               desc="language baselines"):
        valid = batch.counted(skip_first=True)
        for row, lang in enumerate(batch.rows[language_column]):
            counts[lang] = counts.get(lang, 0) + int(valid[row].sum())
            for layer, reader in readers.items():
                pre = reader.pre_acts(batch.hidden[layer][row][valid[row]])
                key = (layer, lang)
                sums[key] = sums.get(key, 0) + pre.double().sum(0).cpu()
    return LanguageBaselines({layer: {lang: dict(zip(readers[layer].features.tolist(),
                                                     (sums[(layer, lang)] / max(counts[lang], 1)).tolist()))
                                      for lang in sorted(counts)} for layer in features})
