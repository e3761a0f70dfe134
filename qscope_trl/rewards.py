"""SAE-feature rewards for ``GRPOTrainer``: score each completion by feature activity of the current policy.

A reward is a callable with TRL's signature ``(prompts, completions, completion_ids, **kwargs) -> list[float]`` and a
readable ``__name__`` for TRL's logs. It runs the policy (the same model object the trainer trains; PEFT adapters
are injected in place, so they are included) without gradients on prompt + completion, reads the SAE's layer, and
reduces the chosen features' activations ``ReLU(f_s(x))`` over the completion tokens:

- ``"fraction"``: minus the fraction of completion tokens where any chosen feature exceeds ``threshold``;
- ``"max"``: minus the largest activation; ``"mean"``: minus the mean activation (over tokens and features).

Prompts are tokenized the way ``GRPOTrainer`` does (the chat template with a generation prompt for
conversational prompts, the plain tokenizer otherwise). Completions are scored in batches of ``batch_size``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal, get_args

import torch
from torch import nn

from qscope_hf.corpus import chat_token_ids, pad_token_ids
from qscope_hf.errors import ConfigError
from qscope_hf.hooks import check_sae_fits, layer_outputs, unwrap_model
from qscope_hf.sae import SparseAutoencoder
from qscope_hf.validation import finite, integer_ids, positive_int, renamed

Reduction = Literal["fraction", "max", "mean"]
REDUCTIONS: tuple[Reduction, ...] = get_args(Reduction)


def tokenize_prompts(tokenizer: Any, prompts: Sequence[Any]) -> list[list[int]]:
    """Token ids of GRPO prompts, as ``GRPOTrainer`` builds them for generation (conversational prompts through the
    chat template with a generation prompt, plain ones through the tokenizer)."""
    if prompts and isinstance(prompts[0], list):  # conversational
        return [chat_token_ids(tokenizer, prompt) for prompt in prompts]
    return tokenizer(text=list(prompts))["input_ids"]


class SAEFeatureReward:
    """Reward = −``coef`` × (activity of ``features`` of ``sae`` on each completion), see the module docstring."""

    def __init__(self, model: nn.Module, tokenizer: Any, sae: SparseAutoencoder, features: Sequence[int], *,
                 reduce: Reduction = "fraction", threshold: float = 0.0, coef: float = 1.0, batch_size: int = 16,
                 name: str | None = None, weight: float | None = None) -> None:
        if reduce not in REDUCTIONS:
            raise ConfigError(f"unknown reduction {reduce!r}; choose one of {REDUCTIONS}")
        self.layer = check_sae_fits(model, sae)
        self.model, self.tokenizer, self.sae = model, tokenizer, sae
        self.reader = sae.feature_reader(list(features))
        if not len(self.reader):
            raise ConfigError("SAEFeatureReward needs at least one feature")
        finite("threshold", threshold, non_negative=True)
        coef = renamed("SAEFeatureReward", "weight", weight, "coef", coef, 1.0)
        finite("coef", coef)
        positive_int("batch_size", batch_size)
        self.features = self.reader.features.tolist()
        self.reduce, self.threshold, self.coef, self.batch_size = reduce, threshold, coef, batch_size
        self.__name__ = name or f"sae_L{self.layer}_{reduce}"

    @torch.no_grad()
    def activity(self, prompt_ids: Sequence[Sequence[int]], completion_ids: Sequence[Sequence[int]]) -> list[float]:
        """The (unsigned) activity of each completion given its prompt."""
        inner = unwrap_model(self.model)
        device = next(inner.parameters()).device
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        scores: list[float] = []
        was_training = inner.training
        inner.eval()
        try:
            for start in range(0, len(completion_ids), self.batch_size):
                prompts = prompt_ids[start:start + self.batch_size]
                completions = completion_ids[start:start + self.batch_size]
                sequences = [list(p) + list(c) for p, c in zip(prompts, completions)]
                vocabulary = inner.get_input_embeddings().num_embeddings
                for row, sequence in enumerate(sequences):
                    integer_ids(f"token (prompt and completion {start + row})", sequence, vocabulary,
                                error=ConfigError)
                ids, real = pad_token_ids(sequences, pad, side="right")
                scored = real.bool() & (torch.arange(ids.shape[1]) >= torch.tensor([len(p) for p in prompts])[:, None])
                hidden = layer_outputs(inner, [self.layer], input_ids=ids.to(device), attention_mask=real.to(device),
                                       use_cache=False)[self.layer]
                acts = self.reader.acts(hidden).float().cpu()
                scores += [self._reduce(acts[row][scored[row]]) for row in range(len(sequences))]
        finally:
            inner.train(was_training)
        return scores

    def _reduce(self, acts: torch.Tensor) -> float:
        """``acts [completion tokens, features]`` -> one number (0 for an empty completion)."""
        if acts.numel() == 0:
            return 0.0
        if self.reduce == "fraction":
            return float((acts > self.threshold).any(-1).float().mean())
        return float(acts.max() if self.reduce == "max" else acts.mean())

    def __call__(self, prompts: Sequence[Any], completions: Sequence[Any], completion_ids: Sequence[Sequence[int]],
                 **kwargs: Any) -> list[float]:
        if len(prompts) != len(completion_ids):
            raise ConfigError(f"{len(prompts)} prompts for {len(completion_ids)} completions")
        if not completion_ids:
            return []
        activity = self.activity(tokenize_prompts(self.tokenizer, prompts), completion_ids)
        return [-self.coef * value for value in activity]


def code_switching_reward(model: nn.Module, tokenizer: Any, sae: SparseAutoencoder, features: Sequence[int],
                          **options: Any) -> SAEFeatureReward:
    """Penalise the share of completion tokens on which wrong-language features fire (``__name__``
    ``sae_code_switching``)."""
    options.setdefault("name", "sae_code_switching")
    return SAEFeatureReward(model, tokenizer, sae, features, reduce="fraction", **options)


def repetition_reward(model: nn.Module, tokenizer: Any, sae: SparseAutoencoder, features: Sequence[int],
                      **options: Any) -> SAEFeatureReward:
    """Penalise the mean activation of repetition features (from :func:`qscope_hf.repetition.repetition_features`)
    over the completion (``__name__`` ``sae_repetition``). The paper warns they also fire on benign repetition:
    the steered-negative rollout of :mod:`qscope_trl.rollouts` is the paper's method, this is the baseline."""
    options.setdefault("name", "sae_repetition")
    return SAEFeatureReward(model, tokenizer, sae, features, reduce="mean", **options)
