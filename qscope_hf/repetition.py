"""Repetition features (docs/methods/post-training.md): the SAE features whose activation rises from a repeated
token's first occurrence to its last, found on a model's own degenerate outputs."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, NamedTuple

import torch
from torch import nn

from .errors import ConfigError
from .hooks import check_sae_fits, layer_outputs
from .sae import SparseAutoencoder
from .validation import positive_int


class RepetitionFeature(NamedTuple):
    """One feature of :func:`repetition_features` and its mean activation rise."""

    feature: int
    rise: float


@torch.no_grad()
def repetition_features(model: nn.Module, tokenizer: Any, sae: SparseAutoencoder, texts: Sequence[str], *,
                        top: int = 20, max_length: int = 256) -> list[RepetitionFeature]:
    """Features whose activation rises most from a repeated token's first occurrence to its last.

    ``texts`` should be degenerate, repetitive outputs. For every token id that occurs at least twice in a text,
    the change of each feature's activation between its first and last occurrence is averaged over all such
    (text, token) pairs; returns :class:`RepetitionFeature` ``(feature, rise)`` for the ``top`` largest rises.
    """
    layer = check_sae_fits(model, sae)
    positive_int("top", top)
    positive_int("max_length", max_length)
    total, pairs = torch.zeros(sae.d_sae, dtype=torch.float64), 0
    device = next(model.parameters()).device
    for text in texts:
        inputs = tokenizer(text, return_tensors="pt", truncation=True, max_length=max_length).to(device)
        hidden = layer_outputs(model, [layer], **inputs)[layer][0]
        codes = sae.encode(hidden.to(sae.device, sae.dtype)).double().cpu()  # [T, d_sae]
        ids = inputs["input_ids"][0].tolist()
        first: dict[int, int] = {}
        last: dict[int, int] = {}
        for position, token in enumerate(ids):
            first.setdefault(token, position)
            last[token] = position
        for token, start in first.items():
            if last[token] > start:
                total += codes[last[token]] - codes[start]
                pairs += 1
    if not pairs:
        raise ConfigError("no token repeats in the given texts: pass degenerate, repetitive outputs")
    rise = total / pairs
    order = rise.argsort(descending=True, stable=True)[:top]
    return [RepetitionFeature(int(f), float(rise[f])) for f in order]
