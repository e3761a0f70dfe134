"""Every use qscope_trl makes of private parts of TRL's and transformers' trainers, in one place.

TRL documents subclassing and overriding ``compute_loss`` as the way to add a loss, which is what
:class:`qscope_trl.losses.SAEPenaltyMixin` does. Four things it needs have no public API in TRL 1.16 /
transformers 5.x; if a release changes them, this module (and the two method overrides named below) is what
to adapt:

- keeping an extra dataset column (the samples' language) through the trainer's column pruning:
  ``Trainer._set_signature_columns_if_needed`` / ``_signature_columns`` (the mixin overrides the method);
- logging a scalar the way TRL logs its own metrics, averaged per logging step: ``trainer._metrics[mode]``;
- carrying a per-row field from GRPO's generated batch to ``compute_loss``: ``GRPOTrainer.
  _generate_and_score_completions`` (the GRPO mixin overrides it);
- dividing an added loss term by gradient accumulation exactly as the trainer divides its own loss:
  ``loss_is_scaled_for_ga`` / ``model_accepts_loss_kwargs`` / ``compute_loss_func`` /
  ``current_gradient_accumulation_steps``;
- tags on the model card TRL writes: its per-trainer ``_tag_names``.
"""

from __future__ import annotations

from typing import Any

#: The TRL release these accesses were written and tested against.
TESTED_TRL = "1.16"


def keep_column(trainer: Any, column: str) -> None:
    """Add ``column`` to the columns the trainer keeps when it prunes the dataset (call after the trainer set
    its own, inside an override of ``_set_signature_columns_if_needed``)."""
    if column not in trainer._signature_columns:
        trainer._signature_columns = [*trainer._signature_columns, column]


def log_metric(trainer: Any, name: str, value: float) -> None:
    """Record ``value`` under ``name``; TRL averages the values of a logging step into its next log entry."""
    trainer._metrics["train" if trainer.model.training else "eval"][name].append(value)


def add_card_tags(trainer: Any, tags: tuple[str, ...]) -> None:
    """Add ``tags`` to the model card the trainer writes (TRL merges ``_tag_names`` into its card's tags)."""
    trainer._tag_names = [*trainer._tag_names, *(tag for tag in tags if tag not in trainer._tag_names)]


def accumulation_divisor(trainer: Any, num_items_in_batch: Any) -> int:
    """Gradient-accumulation steps to divide an added loss term by: as many as the trainer's own loss is divided
    by inside ``compute_loss`` (when it is not, ``Trainer.training_step`` divides the sum, the term included)."""
    scaled = getattr(trainer, "loss_is_scaled_for_ga", None)
    if scaled is None:
        scaled = (trainer.model_accepts_loss_kwargs and num_items_in_batch is not None) or \
            trainer.compute_loss_func is not None
    return trainer.current_gradient_accumulation_steps if scaled and trainer.model.training else 1
