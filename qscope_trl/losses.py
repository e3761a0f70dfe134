"""SAE feature penalties as auxiliary losses for ``SFTTrainer`` (SASFT, METHODS.md §7) and ``GRPOTrainer``.

``L = L_task + λ · Σ ReLU(f_s(x_t) − α_{lang(i), s}) / (n + 1)`` over completion tokens ``t`` of each sample ``i``
and the features ``s`` penalised for it, where ``n`` counts those (token, feature) pairs. Features are grouped by
the language ``L`` they belong to and are penalised on samples of every *other* language; ``α`` is the feature's
mean pre-activation on the sample's own language (:func:`qscope_hf.languages.estimate_language_baselines`;
``baselines=None`` is the harsher α = 0 variant). Pre-activations use only the selected encoder rows
(:class:`qscope_hf.sae.FeatureReader`) of frozen SAEs, so gradients reach only the model's trainable parameters.

On a stock trainer::

    found = language_features(model, tokenizer, saes, multilingual_texts, top=2)         # layer -> language -> ids
    alpha = estimate_language_baselines(model, tokenizer, saes, found, multilingual_texts)
    penalty = SAEFeaturePenalty(saes, found.of("zh"), lam=5e-4, baselines=alpha, language_column="language")
    trainer = SFTTrainer(model, args=args, train_dataset=data, peft_config=LoraConfig(...))
    add_sae_penalty(trainer, penalty)

:func:`add_sae_penalty` validates the configuration against the trainer's model and dataset (clear errors before
training), keeps the language column through the collator, and reads the layer outputs from hooks during the
trainer's own forward (no extra forward). The penalty is logged as ``sae_penalty``. With several processes the
normaliser ``n`` is summed over them, so the loss equals the single-process loss on the same global batch.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn
from trl import GRPOTrainer

from qscope_hf.classes import add_mixin
from qscope_hf.errors import ConfigError
from qscope_hf.hooks import check_sae_fits, hook_layers
from qscope_hf.languages import LanguageBaselines
from qscope_hf.sae import FeatureReader, SparseAutoencoder
from qscope_hf.validation import finite

LANGUAGE_KEY = "sae_language"
#: The row of samples in a language the penalty does not list (without baselines, or without a language column):
#: every listed feature is penalised on them, with α = 0.
OTHER = "<other>"

FeaturesByLanguage = Mapping[str, Sequence[int]]


@dataclass
class _Term:
    """One layer's penalty: selected encoder rows, and per language id the α row and the penalised-feature mask."""

    sae: SparseAutoencoder
    reader: FeatureReader  # the S selected encoder rows
    alpha: Tensor  # [languages, S]
    active: Tensor  # [languages, S] bool


@dataclass
class SAEFeaturePenalty:
    """The SASFT penalty: per SAE (one or two layers), language -> features to keep out of other languages.

    ``features`` maps a language to feature ids (the same for every SAE) or a layer to such a mapping, e.g.
    ``language_features(...).of("zh")`` (:class:`qscope_hf.languages.LanguageFeatures`).
    ``language_column`` names the dataset column with each sample's language; ``None`` penalises every listed
    feature on every sample. ``baselines`` (layer -> language -> feature -> α, a
    :class:`~qscope_hf.languages.LanguageBaselines` or the same as nested mappings) comes from
    :func:`qscope_hf.languages.estimate_language_baselines`; with baselines, every sample's language needs them,
    without, samples in unlisted languages are penalised on all features with α = 0.
    """

    saes: SparseAutoencoder | Sequence[SparseAutoencoder]
    features: FeaturesByLanguage | Mapping[int, FeaturesByLanguage]
    lam: float = 5e-4
    baselines: LanguageBaselines | Mapping[int, Mapping[str, Mapping[int, float]]] | None = None
    language_column: str | None = "language"
    languages: list[str] = field(init=False)
    terms: dict[int, _Term] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        finite("lam", self.lam, non_negative=True)
        if self.baselines is not None:
            self.baselines = LanguageBaselines.coerce(self.baselines)
        saes = [self.saes] if isinstance(self.saes, SparseAutoencoder) else list(self.saes)
        if not saes:
            raise ValueError("SAEFeaturePenalty needs at least one SAE")
        layers = [sae.layer for sae in saes]
        if None in layers or len(set(layers)) != len(layers):
            raise ValueError(f"give one SAE per layer, each with its layer set (got layers {layers})")
        per_layer = {layer: self._features_of(layer) for layer in layers}
        known = set().union(*(set(f) for f in per_layer.values()))
        if self.baselines is not None:
            known |= {lang for layer in self.baselines.values() for lang in layer}
        if self.language_column is None:
            known = set()
        self.languages = sorted(known) + ([OTHER] if self.baselines is None or self.language_column is None else [])
        self.terms = {sae.layer: self._term(sae, per_layer[sae.layer]) for sae in saes}

    def _features_of(self, layer: int) -> FeaturesByLanguage:
        features = self.features
        if features and all(isinstance(key, int) for key in features):
            if layer not in features:
                raise ValueError(f"no features given for layer {layer} (features for layers {sorted(features)})")
            features = features[layer]
        if not features or not all(list(ids) for ids in features.values()):
            raise ConfigError(f"no penalised features for layer {layer} (every language needs at least one feature, "
                              f"got {dict(features)!r})")
        return features

    def _term(self, sae: SparseAutoencoder, features: FeaturesByLanguage) -> _Term:
        union = sorted({int(f) for ids in features.values() for f in sae.feature_index(list(ids)).tolist()})
        column = {feature: i for i, feature in enumerate(union)}
        alpha = torch.zeros(len(self.languages), len(union))
        active = torch.zeros(len(self.languages), len(union), dtype=torch.bool)
        for row, lang in enumerate(self.languages):
            for owner, ids in features.items():
                if owner != lang or self.language_column is None:
                    active[row, [column[int(f)] for f in ids]] = True
            if self.baselines is not None and lang != OTHER:
                layer_baselines = self.baselines.get(sae.layer, {})
                if lang not in layer_baselines and self.language_column is not None:
                    raise ValueError(f"no baselines for language {lang!r} at layer {sae.layer}")
                values = layer_baselines.get(lang, {})
                missing = [f for f in union if f not in values]
                if self.language_column is not None and missing:
                    raise ValueError(f"baselines for {lang!r} at layer {sae.layer} lack features {missing}")
                alpha[row] = torch.tensor([values.get(f, 0.0) for f in union])
        if not bool(alpha.isfinite().all()):
            raise ConfigError(f"baselines must be finite numbers (layer {sae.layer} has NaN or infinite values)")
        return _Term(sae, sae.feature_reader(union), alpha, active)

    @property
    def layers(self) -> list[int]:
        return list(self.terms)

    def language_ids(self, languages: Sequence[Any]) -> Tensor:
        """Map each sample's language to its row in the tables; an unknown language raises."""
        ids = []
        for lang in languages:
            if lang is None:
                raise ConfigError(f"a sample has no language (None in the {self.language_column!r} column)")
            if lang in self.languages:
                ids.append(self.languages.index(lang))
            elif OTHER in self.languages:
                ids.append(self.languages.index(OTHER))
            else:
                raise ValueError(f"unknown language {lang!r}: the penalty has baselines for {self.languages}")
        return torch.tensor(ids, dtype=torch.long)

    def check(self, model: nn.Module, dataset: Any = None) -> None:
        """Errors, before training, for SAEs that do not fit ``model`` and for a dataset without the language column
        or with languages the penalty does not know."""
        for term in self.terms.values():
            check_sae_fits(model, term.sae)
        if self.language_column is None or dataset is None:
            return
        columns = getattr(dataset, "column_names", None)
        if columns is not None and self.language_column not in columns:
            raise ValueError(f"the training dataset has no language column {self.language_column!r} "
                             f"(columns: {columns})")
        if columns is not None:
            self.language_ids(sorted(set(dataset[self.language_column])))

    def sums(self, hidden: Mapping[int, Tensor], tokens: Tensor, language_ids: Tensor | None) -> tuple[Tensor, Tensor]:
        """``(Σ ReLU(f − α) over penalised (token, feature) pairs, their count)`` for layer outputs ``[B, T, d]``
        and a ``[B, T]`` mask of the tokens to penalise."""
        total, count = None, None
        for layer, term in self.terms.items():
            h = hidden[layer]
            if language_ids is None:  # no language column: every sample is in the OTHER row
                ids = torch.full((h.shape[0],), self.languages.index(OTHER), dtype=torch.long)
            else:
                ids = language_ids
            ids = ids.to(h.device)
            pre = term.reader.pre_acts(h).float()
            excess = (pre - term.alpha.to(h.device)[ids][:, None, :]).relu()
            weight = tokens.to(h.device)[..., None] & term.active.to(h.device)[ids][:, None, :]
            part, n = (excess * weight).sum(), weight.sum()
            total, count = (part, n) if total is None else (total + part, count + n)
        return total, count


@contextmanager
def _capture_all(model: nn.Module, layers: Sequence[int]):
    """Outputs of ``layers`` from every forward in the block (kept in the graph), listed per layer."""
    captured: dict[int, list[Tensor]] = {layer: [] for layer in layers}

    def recorder(layer: int):
        return lambda hidden: captured[layer].append(hidden)

    with hook_layers(model, {layer: recorder(layer) for layer in layers}):
        yield captured


class _LanguageCollator:
    """Wraps a trainer's collator: takes the language column out of the examples and adds ids as a tensor."""

    def __init__(self, collator: Any, penalty: SAEFeaturePenalty) -> None:
        self.collator, self.penalty = collator, penalty

    def __call__(self, examples: list[dict]) -> dict:
        column = self.penalty.language_column
        languages = [example[column] for example in examples]
        batch = self.collator([{k: v for k, v in example.items() if k != column} for example in examples])
        batch[LANGUAGE_KEY] = self.penalty.language_ids(languages)
        return batch


class SAEPenaltyMixin:
    """Adds an :class:`SAEFeaturePenalty` to a TRL trainer's loss (``SFTTrainer``; :class:`GRPOPenaltyMixin` for
    ``GRPOTrainer``); apply it with :func:`add_sae_penalty`."""

    sae_penalty: SAEFeaturePenalty

    def _setup_sae_penalty(self, penalty: SAEFeaturePenalty) -> None:
        penalty.check(self.model, self.train_dataset)
        self.sae_penalty = penalty
        if penalty.language_column is not None:
            self.data_collator = _LanguageCollator(self.data_collator, penalty)

    def _set_signature_columns_if_needed(self) -> None:
        super()._set_signature_columns_if_needed()
        column = self.sae_penalty.language_column
        if column is not None and column not in self._signature_columns:
            self._signature_columns = [*self._signature_columns, column]

    def _penalty_tokens(self, inputs: dict) -> Tensor:
        """``[B, T]`` mask of the completion tokens in the trainer's forward."""
        if "labels" in inputs:  # SFT: completion (assistant) tokens are the labelled ones
            return inputs["labels"] != -100
        prompt = torch.zeros_like(inputs["prompt_ids"], dtype=torch.bool)  # GRPO: prompt then completion
        return torch.cat([prompt, inputs["completion_mask"].bool()], dim=1)

    def _accumulation_divisor(self, num_items_in_batch: Any) -> int:
        """Gradient-accumulation steps to divide the penalty by: as many as the trainer's own loss is divided by
        inside ``compute_loss`` (when it is not, ``Trainer.training_step`` divides the sum, penalty included)."""
        scaled = getattr(self, "loss_is_scaled_for_ga", None)
        if scaled is None:
            scaled = (self.model_accepts_loss_kwargs and num_items_in_batch is not None) or \
                self.compute_loss_func is not None
        return self.current_gradient_accumulation_steps if scaled and self.model.training else 1

    def compute_loss(self, model: nn.Module, inputs: dict, return_outputs: bool = False,
                     num_items_in_batch: Any = None) -> Any:
        penalty = self.sae_penalty
        language_ids = inputs.pop(LANGUAGE_KEY, None)
        with _capture_all(model, penalty.layers) as captured:
            result = super().compute_loss(model, inputs, return_outputs=return_outputs,
                                          num_items_in_batch=num_items_in_batch)
        hidden = {layer: torch.cat(outputs, dim=0) for layer, outputs in captured.items()}
        total, count = penalty.sums(hidden, self._penalty_tokens(inputs), language_ids)
        world = self.accelerator.num_processes
        count = self.accelerator.reduce(count.detach().float(), reduction="sum") if world > 1 else count.float()
        value = total / (count + 1)
        aux = penalty.lam * value * world / self._accumulation_divisor(num_items_in_batch)
        mode = "train" if self.model.training else "eval"
        logged = self.accelerator.reduce(value.detach(), reduction="sum") if world > 1 else value.detach()
        self._metrics[mode]["sae_penalty"].append(float(logged))
        if return_outputs:
            loss, outputs = result
            return loss + aux, outputs
        return result + aux


class GRPOPenaltyMixin(SAEPenaltyMixin):
    """:class:`SAEPenaltyMixin` for ``GRPOTrainer``: the language ids travel with the generated batch (the dataset
    rows stay with the reward functions), and the penalised tokens are the completion tokens."""

    def _setup_sae_penalty(self, penalty: SAEFeaturePenalty) -> None:
        penalty.check(self.model, self.train_dataset)
        self.sae_penalty = penalty

    def _generate_and_score_completions(self, inputs: list[dict]) -> dict:
        output = super()._generate_and_score_completions(inputs)
        column = self.sae_penalty.language_column
        if column is not None:
            languages = self.sae_penalty.language_ids([x[column] for x in inputs])
            output[LANGUAGE_KEY] = languages.to(output["completion_ids"].device)
        return output


def add_sae_penalty(trainer: Any, penalty: SAEFeaturePenalty) -> Any:
    """Add ``penalty`` to ``trainer``'s loss (an ``SFTTrainer`` or ``GRPOTrainer``, already constructed, with or
    without ``peft_config``); returns the trainer. The instance's class becomes a same-named subclass with
    :class:`SAEPenaltyMixin`; configuration errors are raised here, before training."""
    add_mixin(trainer, GRPOPenaltyMixin if isinstance(trainer, GRPOTrainer) else SAEPenaltyMixin)
    trainer._setup_sae_penalty(penalty)
    return trainer
