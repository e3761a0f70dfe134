"""Coverage-guided data synthesis (docs/methods/data.md): generate samples aimed at features a seed corpus never fires.

1. :func:`feature_coverage`: which features fire anywhere in a corpus (per SAE layer).
2. :func:`select_targets`: features relevant to a goal (a pluggable ``judge``: any callable scoring a feature's
   description; :class:`KeywordJudge` by default) that fire nowhere in the seed corpus. Descriptions come from the
   features' top-activating contexts in a reference corpus (:func:`describe_feature`); :func:`explainer_prompt`
   builds the prompt for an LLM explainer instead.
3. :func:`synthesize`: ask a pluggable ``generator`` (any callable ``prompt -> list[str]``; :class:`HFGenerator`
   runs a local HF model) for samples aimed at each target, and keep only the samples on which the target feature
   fires. Results are JSONL rows with provenance; coverage before and after is reported.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from .classify import collect_text_features
from .corpus import chat_token_ids
from .discovery import FeatureStats
from .errors import ConfigError
from .sae import SparseAutoencoder

Judge = Callable[[str], float]
Generator = Callable[[str], Sequence[str]]


def feature_coverage(model: nn.Module, tokenizer: Any, saes: SparseAutoencoder | Iterable[SparseAutoencoder],
                     texts: Sequence[str], **options: Any) -> dict[int, Tensor]:
    """``[d_sae]`` bool per layer: the features that fire on some token of some text."""
    options.setdefault("progress", False)
    features = collect_text_features(model, tokenizer, saes, list(texts), **options)
    covered = {}
    for layer, fired in features.fired.items():
        mask = torch.zeros(features.d_sae[layer], dtype=torch.bool)
        for ids in fired:
            mask[ids] = True
        covered[layer] = mask
    return covered


def describe_feature(stats: FeatureStats, feature: int, *, contexts: int = 5, window: int = 6) -> str:
    """A plain description of a feature: its top-activating tokens in context (what a keyword judge reads)."""
    found = stats.top_contexts(feature, window=window)[:contexts]
    return " | ".join(f"{c.left}[{c.token}]{c.right}" for c in found)


def explainer_prompt(stats: FeatureStats, feature: int, *, contexts: int = 8, window: int = 10) -> str:
    """A prompt asking an LLM to explain a feature from its top-activating contexts (tokens in [brackets])."""
    lines = [f"{i + 1}. {c.left}[{c.token}]{c.right}  (activation {c.value:.2f})"
             for i, c in enumerate(stats.top_contexts(feature, window=window)[:contexts])]
    return ("Here are text snippets where one feature of a language model's activations fires most strongly; the "
            "token it fires on is in [brackets].\n" + "\n".join(lines) +
            "\nIn one short phrase, what does this feature detect?")


@dataclass
class KeywordJudge:
    """Relevance by keyword matching: the share of ``keywords`` found (case-insensitively) in a description."""

    keywords: Sequence[str]

    def __call__(self, description: str) -> float:
        text = description.lower()
        return sum(word.lower() in text for word in self.keywords) / max(len(self.keywords), 1)


@dataclass
class Target:
    layer: int
    feature: int
    relevance: float
    description: str


def select_targets(coverage: Mapping[int, Tensor], descriptions: Mapping[int, Mapping[int, str]], judge: Judge, *,
                   min_relevance: float = 1e-9, limit: int | None = None) -> list[Target]:
    """Features judged relevant (score ``>= min_relevance``) among those that fire nowhere in the seed corpus.

    ``descriptions[layer][feature]`` are the candidates' descriptions (e.g. :func:`describe_feature` over a
    reference corpus, or an explainer's answers); the most relevant come first.
    """
    targets = []
    for layer, by_feature in descriptions.items():
        if layer not in coverage:
            raise ConfigError(f"no seed coverage for layer {layer} (coverage of layers {sorted(coverage)})")
        for feature, description in by_feature.items():
            if bool(coverage[layer][feature]):
                continue
            score = float(judge(description))
            if score >= min_relevance:
                targets.append(Target(layer, int(feature), score, description))
    targets.sort(key=lambda t: (-t.relevance, t.layer, t.feature))
    return targets[:limit]


class HFGenerator:
    """A local HF chat model as the sample generator: ``prompt -> n`` sampled answers."""

    def __init__(self, model: nn.Module, tokenizer: Any, *, n: int = 4, max_new_tokens: int = 64,
                 temperature: float = 0.9, seed: int = 0) -> None:
        self.model, self.tokenizer, self.n = model, tokenizer, n
        self.options = dict(max_new_tokens=max_new_tokens, do_sample=True, temperature=temperature,
                            pad_token_id=tokenizer.pad_token_id)
        self.generator = torch.Generator().manual_seed(seed)
        self.name = f"hf:{getattr(model.config, '_name_or_path', type(model).__name__)}"

    @torch.no_grad()
    def __call__(self, prompt: str) -> list[str]:
        torch.manual_seed(int(torch.randint(0, 2**31, (), generator=self.generator)))
        ids = torch.tensor([chat_token_ids(self.tokenizer, prompt)])
        inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
        out = self.model.generate(**inputs, num_return_sequences=self.n, **self.options)
        return [self.tokenizer.decode(row[inputs["input_ids"].shape[1]:], skip_special_tokens=True) for row in out]


def default_prompt(target: Target) -> str:
    """The generator prompt for ``target``: a request for a text like its top contexts."""
    return (f"Write a short, natural text that contains the kind of content shown in these examples (the key "
            f"token is in brackets): {target.description}")


@dataclass
class Sample:
    text: str
    layer: int
    feature: int
    activation: float
    generator: str
    prompt: str


def synthesize(model: nn.Module, tokenizer: Any, saes: Mapping[int, SparseAutoencoder] | Sequence[SparseAutoencoder],
               targets: Sequence[Target], generator: Generator, *, prompt: Callable[[Target], str] = default_prompt,
               threshold: float = 0.0, out: str | Path | None = None,
               seed_coverage: Mapping[int, Tensor] | None = None) -> tuple[list[Sample], dict[str, Any]]:
    """Generate for each target and keep the samples on which its feature fires above ``threshold``.

    Returns the kept samples (also written to ``out`` as JSONL) and a report: candidates, kept, the targets now
    covered, and — with ``seed_coverage`` — the coverage of the targeted features before and after.
    """
    by_layer = dict(saes) if isinstance(saes, Mapping) else {sae.layer: sae for sae in saes}
    name = getattr(generator, "name", getattr(generator, "__name__", type(generator).__name__))
    kept, candidates = [], 0
    for target in targets:
        sae = by_layer[target.layer]
        text_prompt = prompt(target)
        samples = [s for s in generator(text_prompt) if s.strip()]
        candidates += len(samples)
        if not samples:
            continue
        features = collect_text_features(model, tokenizer, sae, samples, progress=False)
        for text, ids, peak in zip(samples, features.fired[target.layer], features.peak[target.layer]):
            hit = ids == target.feature
            activation = float(peak[hit].max()) if hit.any() else 0.0
            if activation > threshold:
                kept.append(Sample(text, target.layer, target.feature, activation, name, text_prompt))
    covered = {(s.layer, s.feature) for s in kept}
    report: dict[str, Any] = {"targets": len(targets), "candidates": candidates, "kept": len(kept),
                              "targets_covered": len(covered)}
    if seed_coverage is not None and targets:
        before = sum(bool(seed_coverage[t.layer][t.feature]) for t in targets)
        report["target_coverage_before"] = before / len(targets)
        report["target_coverage_after"] = (before + len(covered)) / len(targets)
    if out is not None:
        with Path(out).open("w", encoding="utf-8") as handle:
            for sample in kept:
                handle.write(json.dumps(asdict(sample), ensure_ascii=False) + "\n")
    return kept, report
