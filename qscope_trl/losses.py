"""SAE feature penalties as auxiliary losses for ``SFTTrainer`` (SASFT, docs/methods/post-training.md) and
``GRPOTrainer``.

``L = L_task + coef · Σ ReLU(f_s(x_t) − α_{lang(i), s}) / (n + 1)`` over completion tokens ``t`` of each sample ``i``
and the features ``s`` penalised for it, where ``n`` counts those (token, feature) pairs. Features are grouped by
the language ``L`` they belong to and are penalised on samples of every *other* language; ``α`` is the feature's
mean pre-activation on the sample's own language (:func:`qscope_hf.languages.estimate_language_baselines`;
``baselines=None`` is the harsher α = 0 variant). Pre-activations use only the selected encoder rows
(:class:`qscope_hf.sae.FeatureReader`) of frozen SAEs, so gradients reach only the model's trainable parameters.

On a stock trainer::

    found = language_features(model, tokenizer, saes, multilingual_texts, top=2)         # layer -> language -> ids
    alpha = estimate_language_baselines(model, tokenizer, saes, found, multilingual_texts)
    penalty = SAEFeaturePenalty(saes, found.of("zh"), coef=5e-4, baselines=alpha, language_column="language")
    trainer = SFTTrainer(model, args=args, train_dataset=data, peft_config=LoraConfig(...))
    add_sae_penalty(trainer, penalty)

:func:`add_sae_penalty` validates the configuration against the trainer's model and dataset (clear errors before
training), keeps the language column through the collator, and reads the layer outputs from hooks during the
trainer's own forward (no extra forward). The penalty is logged as ``sae/penalty``. With several processes the
normaliser ``n`` is summed over them, so the loss equals the single-process loss on the same global batch.
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import torch
from torch import Tensor, nn
from transformers import Trainer, TrainerCallback
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR
from trl import GRPOTrainer, SFTTrainer

from qscope_hf.classes import add_mixin
from qscope_hf.errors import ArgumentTypeError, ConfigError, MissingColumnError
from qscope_hf.hooks import check_sae_fits, hook_layers
from qscope_hf.languages import LanguageBaselines
from qscope_hf.sae import FeatureReader, SparseAutoencoder, saes_by_layer
from qscope_hf.validation import finite, renamed

from . import trl_internals

T = TypeVar("T")
LANGUAGE_KEY = "sae_language"
#: The penalty's log key (unscaled, as in the paper's plots); ``sae/penalty_scaled`` is coef × it, the part of
#: ``loss`` it contributes.
PENALTY_METRIC = "sae/penalty"
PENALTY_CONFIG = "qscope_sae_penalty.json"
PENALTY_TAGS = ("qscope", "sae-penalty")
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
    coef: float = 5e-4
    baselines: LanguageBaselines | Mapping[int, Mapping[str, Mapping[int, float]]] | None = None
    language_column: str | None = "language"
    lam: float | None = field(default=None, repr=False)  # the previous release's name of coef (deprecated)
    languages: list[str] = field(init=False)
    terms: dict[int, _Term] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        if self.lam is not None:
            finite("lam", self.lam, non_negative=True)
        self.coef = renamed("SAEFeaturePenalty", "lam", self.lam, "coef", self.coef, 5e-4, stacklevel=4)
        self.lam = None
        finite("coef", self.coef, non_negative=True)
        if self.baselines is not None:
            self.baselines = LanguageBaselines.coerce(self.baselines)
        saes = saes_by_layer(self.saes, who="SAEFeaturePenalty",
                             hint="; the penalty reads one SAE per layer (as the monitor does)")
        if not saes:
            raise ConfigError("SAEFeaturePenalty needs at least one SAE")
        per_layer = {layer: self._features_of(layer) for layer in saes}
        known = set().union(*(set(f) for f in per_layer.values()))
        if self.baselines is not None:
            known |= {lang for layer in self.baselines.values() for lang in layer}
        if self.language_column is None:
            known = set()
        self.languages = sorted(known) + ([OTHER] if self.baselines is None or self.language_column is None else [])
        self.terms = {layer: self._term(sae, per_layer[layer]) for layer, sae in saes.items()}

    def _features_of(self, layer: int) -> FeaturesByLanguage:
        features = self.features
        if features and all(isinstance(key, int) for key in features):
            if layer not in features:
                raise ConfigError(f"no features given for layer {layer} (features for layers {sorted(features)})")
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
                    raise ConfigError(f"no baselines for language {lang!r} at layer {sae.layer}")
                values = layer_baselines.get(lang, {})
                missing = [f for f in union if f not in values]
                if self.language_column is not None and missing:
                    raise ConfigError(f"baselines for {lang!r} at layer {sae.layer} lack features {missing}")
                alpha[row] = torch.tensor([values.get(f, 0.0) for f in union])
        if not bool(alpha.isfinite().all()):
            raise ConfigError(f"baselines must be finite numbers (layer {sae.layer} has NaN or infinite values)")
        return _Term(sae, sae.feature_reader(union), alpha, active)

    @property
    def layers(self) -> list[int]:
        """The layers the penalty reads, in order."""
        return list(self.terms)

    def config(self) -> dict[str, Any]:
        """What the penalty does, as JSON (saved next to the trainer's checkpoints as ``qscope_sae_penalty.json``):
        coef, language column, languages, and per layer the features, their α table and the SAE's config."""
        return {"coef": self.coef, "language_column": self.language_column, "languages": self.languages,
                "layers": {str(layer): {"features": term.reader.features.tolist(), "alpha": term.alpha.tolist(),
                                        "penalised": term.active.tolist(), "sae": term.sae.cfg.to_dict()}
                           for layer, term in self.terms.items()}}

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
                raise ConfigError(f"unknown language {lang!r}: the penalty has baselines for {self.languages}")
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
            raise MissingColumnError(f"the training dataset has no language column {self.language_column!r} "
                                     f"(columns: {columns})")
        if columns is not None:
            self.language_ids(sorted(set(dataset[self.language_column]), key=str))  # None sorts too: refused there

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


class _PenaltyRecord(TrainerCallback):
    """Writes the penalty's :meth:`~SAEFeaturePenalty.config` into each checkpoint; on resume, warns when the
    checkpoint was trained with another penalty."""

    def __init__(self, penalty: SAEFeaturePenalty) -> None:
        self.penalty = penalty

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any):
        saved = Path(args.output_dir) / f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}" / PENALTY_CONFIG
        if state.global_step and saved.exists() and json.loads(saved.read_text()) != self.penalty.config():
            warnings.warn(f"resuming from {saved.parent} with a different SAE penalty than it was trained with "
                          f"(see {saved})", stacklevel=2)

    def on_save(self, args: Any, state: Any, control: Any, **kwargs: Any):
        checkpoint = Path(args.output_dir) / f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}"
        if checkpoint.is_dir():
            (checkpoint / PENALTY_CONFIG).write_text(json.dumps(self.penalty.config(), indent=2))


class SAEPenaltyMixin:
    """Adds an :class:`SAEFeaturePenalty` to a TRL trainer's loss (``SFTTrainer``; :class:`GRPOPenaltyMixin` for
    ``GRPOTrainer``); apply it with :func:`add_sae_penalty`."""

    sae_penalty: SAEFeaturePenalty

    def _setup_sae_penalty(self, penalty: SAEFeaturePenalty) -> None:
        penalty.check(self.model, self.train_dataset)
        self.sae_penalty = penalty
        if penalty.language_column is not None:
            self.data_collator = _LanguageCollator(self.data_collator, penalty)
        self._record_sae_penalty(penalty)

    def _record_sae_penalty(self, penalty: SAEFeaturePenalty) -> None:
        """Tag the model and its card (``qscope``, ``sae-penalty``), and keep the penalty's configuration next to
        every checkpoint (checked against the checkpoint a run resumes from)."""
        self.model.add_model_tags(list(PENALTY_TAGS))
        trl_internals.add_card_tags(self, PENALTY_TAGS)
        self.add_callback(_PenaltyRecord(penalty))

    def _set_signature_columns_if_needed(self) -> None:  # private override: see qscope_trl.trl_internals
        super()._set_signature_columns_if_needed()
        if self.sae_penalty.language_column is not None:
            trl_internals.keep_column(self, self.sae_penalty.language_column)

    def _penalty_tokens(self, inputs: dict) -> Tensor:
        """``[B, T]`` mask of the completion tokens in the trainer's forward."""
        if "labels" in inputs:  # SFT: completion (assistant) tokens are the labelled ones
            return inputs["labels"] != -100
        prompt = torch.zeros_like(inputs["prompt_ids"], dtype=torch.bool)  # GRPO: prompt then completion
        return torch.cat([prompt, inputs["completion_mask"].bool()], dim=1)

    def compute_loss(self, model: nn.Module, inputs: dict, return_outputs: bool = False,
                     num_items_in_batch: Any = None) -> Any:
        """The trainer's own loss plus the SAE penalty on this batch's completion tokens (logged as
        ``sae/penalty``)."""
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
        aux = penalty.coef * value * world / trl_internals.accumulation_divisor(self, num_items_in_batch)
        logged = float(self.accelerator.reduce(value.detach(), reduction="sum") if world > 1 else value.detach())
        trl_internals.log_metric(self, PENALTY_METRIC, logged)
        trl_internals.log_metric(self, PENALTY_METRIC + "_scaled", penalty.coef * logged)
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
        self._record_sae_penalty(penalty)

    def _generate_and_score_completions(self, inputs: list[dict]) -> dict:  # private: see trl_internals
        output = super()._generate_and_score_completions(inputs)
        column = self.sae_penalty.language_column
        if column is not None:
            languages = self.sae_penalty.language_ids([x[column] for x in inputs])
            output[LANGUAGE_KEY] = languages.to(output["completion_ids"].device)
        return output


def _check_trainer_class(cls: type) -> None:
    """The penalty reads TRL's completion masks: only ``SFTTrainer`` and ``GRPOTrainer`` (and subclasses) have them."""
    if not issubclass(cls, (SFTTrainer, GRPOTrainer)):
        raise ArgumentTypeError(f"the SAE penalty extends TRL's SFTTrainer or GRPOTrainer (it reads their completion "
                                f"tokens), got {cls.__name__}")


def with_sae_penalty(trainer_class: type[T]) -> type[T]:
    """``trainer_class`` (``SFTTrainer``, ``GRPOTrainer`` or a subclass) extended with the SAE penalty: construct it
    as usual plus ``sae_penalty=SAEFeaturePenalty(...)``. The subclass way TRL documents for custom losses::

        SASFTTrainer = with_sae_penalty(SFTTrainer)
        trainer = SASFTTrainer(model, args=args, train_dataset=data, sae_penalty=penalty)
    """
    if not isinstance(trainer_class, type):
        hint = " (an instance: use add_sae_penalty(trainer, penalty))" if isinstance(trainer_class, Trainer) else ""
        raise ArgumentTypeError(f"with_sae_penalty takes a trainer class, got {type(trainer_class).__name__}{hint}")
    _check_trainer_class(trainer_class)
    mixin = GRPOPenaltyMixin if issubclass(trainer_class, GRPOTrainer) else SAEPenaltyMixin

    def __init__(self: Any, *args: Any, sae_penalty: SAEFeaturePenalty, **kwargs: Any) -> None:
        trainer_class.__init__(self, *args, **kwargs)
        self._setup_sae_penalty(sae_penalty)

    return type(f"{trainer_class.__name__}WithSAEPenalty", (mixin, trainer_class),
                {"__init__": __init__, "__module__": __name__, "__doc__": with_sae_penalty.__doc__})


def add_sae_penalty(trainer: Any, penalty: SAEFeaturePenalty) -> Any:
    """Add ``penalty`` to an already constructed ``SFTTrainer`` or ``GRPOTrainer`` (with or without
    ``peft_config``); returns the trainer. The convenience form of :func:`with_sae_penalty`: the instance's class
    becomes a same-named subclass with the mixin; configuration errors are raised here, before training."""
    _check_trainer_class(type(trainer))
    if not isinstance(penalty, SAEFeaturePenalty):
        raise ArgumentTypeError(f"add_sae_penalty takes an SAEFeaturePenalty, got {type(penalty).__name__}")
    add_mixin(trainer, GRPOPenaltyMixin if isinstance(trainer, GRPOTrainer) else SAEPenaltyMixin)
    trainer._setup_sae_penalty(penalty)
    return trainer
