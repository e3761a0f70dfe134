"""Streaming a text corpus through a model's layers: what statistics, classifiers and footprints all start from."""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import datasets
import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from .errors import ConfigError, MissingColumnError, PositionError
from .hooks import layer_outputs
from .validation import positive_int

Corpus = Sequence[str] | datasets.Dataset


def as_dataset(data: Corpus, text_column: str) -> datasets.Dataset:
    """Texts (a list, one string, or a ``datasets.Dataset`` with ``text_column``) as a non-empty Dataset."""
    if isinstance(data, datasets.Dataset):
        if text_column not in data.column_names:
            raise MissingColumnError(f"text column {text_column!r} not in the dataset (columns: {data.column_names})")
        return data
    texts = [data] if isinstance(data, str) else list(data)
    if not texts:
        raise ConfigError("no texts to analyse")
    return datasets.Dataset.from_dict({text_column: texts})


def text_batches(data: datasets.Dataset, batch_size: int) -> Iterator[tuple[int, dict[str, list]]]:
    """``(index of the first row, batch)`` over ``data`` in order."""
    positive_int("batch_size", batch_size)
    start = 0
    for batch in data.iter(batch_size=batch_size):
        yield start, batch
        start += len(next(iter(batch.values())))


@dataclass
class LayerBatch:
    """One batch of texts after the forward: ``hidden[layer] [B, T, d]``, ``real [B, T]`` (not padding),
    ``positions [B, T]`` (0 at each text's first real token), and the rows of the dataset it holds."""

    start: int
    rows: dict[str, list]
    inputs: dict[str, Tensor]
    hidden: dict[int, Tensor]
    real: Tensor
    positions: Tensor

    def counted(self, skip_first: bool) -> Tensor:
        """``[B, T]`` real tokens, minus each text's first when ``skip_first``."""
        return without_first_token(self.real) if skip_first else self.real


def without_first_token(real: Tensor) -> Tensor:
    """``real [B, T]`` (bool, True on real tokens; left or right padding) without each row's first real token, which
    SAE training, evaluation, probes and relative steering leave out (its residual norm is an outlier)."""
    return real & (real.long().cumsum(1) > 1)


def residual_spread(hidden: Tensor, real: Tensor) -> Tensor:
    """``[B]``: the unit of ``relative=True`` steering strengths, per row of ``hidden [B, T, d]``.

    The median distance ``‖h_t − h̄‖`` of a row's residuals from their mean ``h̄``, over its real tokens but the first
    (``real [B, T]``), times ``√(n/(n−1))`` for the ``n`` tokens counted (their
    mean is estimated from them). Centring matters: many models carry a nearly constant "massive" dimension that
    holds most of a token's norm (at layer 9 of Gemma 3 270M one coordinate averages 6 466 against a median norm of
    6 737), and a unit that counted it
    would make the same relative strength tiny on one model and large on another. Raises :class:`PositionError` when
    a row has fewer than 3 real tokens.
    """
    counted = without_first_token(real)
    n = counted.sum(1)  # [B]
    if bool((n < 2).any()):
        row = int((n < 2).nonzero()[0])
        raise PositionError(f"relative=True strengths are in units of how far a prompt's residuals spread around "
                            f"their mean, measured on its real tokens but the first, so a prompt needs at least 3 "
                            f"real tokens; row {row} has {int(real[row].sum())}: use a longer prompt, or absolute "
                            f"strengths (Steering.absolute, qscope_hf.calibration.absolute_steering)")
    wide = hidden.double()  # the mean of residuals in the thousands, without cancellation
    mean = (wide * counted[..., None]).sum(1) / n[:, None]  # [B, d]
    distances = (wide - mean[:, None]).norm(dim=-1).masked_fill(~counted, float("nan"))  # [B, T]
    return (distances.nanmedian(dim=1).values * (n / (n - 1)).sqrt()).float()


def layer_batches(model: nn.Module, tokenizer: Any, layers: Iterable[int], data: Corpus, *, text_column: str = "text",
                  batch_size: int = 8, max_length: int = 256, progress: bool = True,
                  desc: str = "forward") -> Iterator[LayerBatch]:
    """Tokenize ``data`` in batches and read ``layers`` from one forward per batch (stopped after the last)."""
    dataset = as_dataset(data, text_column)
    positive_int("batch_size", batch_size)
    positive_int("max_length", max_length)
    layers = list(layers)
    device = next(model.parameters()).device
    bar = tqdm(total=len(dataset), desc=desc, unit="text", disable=not progress)
    try:
        for start, rows in text_batches(dataset, batch_size):
            inputs = tokenizer(rows[text_column], return_tensors="pt", padding=True, truncation=True,
                               max_length=max_length)
            inputs = {key: value.to(device) for key, value in inputs.items()}
            hidden = layer_outputs(model, layers, **inputs)
            real = inputs["attention_mask"].bool()
            yield LayerBatch(start, rows, inputs, hidden, real, real.long().cumsum(1) - 1)
            bar.update(len(rows[text_column]))
    finally:
        bar.close()


def pad_token_ids(sequences: Sequence[Sequence[int]], pad_id: int, *, side: str = "left") -> tuple[Tensor, Tensor]:
    """``(input_ids, attention_mask)``, both ``[B, T]``, from token-id lists padded with ``pad_id`` on ``side``
    (``"left"``: every row's last real token sits at ``T - 1``, as batched generation wants)."""
    if side not in ("left", "right"):
        raise ConfigError(f"side must be 'left' or 'right', got {side!r}")
    if not sequences or not all(len(ids) for ids in sequences):
        raise ConfigError("need at least one sequence, and no empty sequence")
    length = max(len(ids) for ids in sequences)
    input_ids = torch.full((len(sequences), length), pad_id, dtype=torch.long)
    attention_mask = torch.zeros_like(input_ids)
    for row, ids in enumerate(sequences):
        span = slice(length - len(ids), length) if side == "left" else slice(0, len(ids))
        input_ids[row, span] = torch.as_tensor(list(ids), dtype=torch.long)
        attention_mask[row, span] = 1
    return input_ids, attention_mask


def chat_token_ids(tokenizer: Any, prompt: str | Sequence[dict[str, str]]) -> list[int]:
    """Token ids of ``prompt`` as a chat turn awaiting the assistant's answer: a user message (or a list of
    messages) through the tokenizer's chat template with a generation prompt, or the plain text when the tokenizer
    has no chat template."""
    if not getattr(tokenizer, "chat_template", None):
        if not isinstance(prompt, str):
            raise ConfigError("the tokenizer has no chat template to format a list of messages")
        return tokenizer(prompt)["input_ids"]
    messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)
    return list(tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                              return_dict=True)["input_ids"])
