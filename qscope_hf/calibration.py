"""Steering strength that does not break the model: calibrate it on the next-token loss of neutral text.

Raw strengths mean nothing across layers, features and models; a strength that is too high makes any steering
vector produce loops. :func:`calibrate_strength` finds, by bisection on a log scale, the factor on a spec's
strengths at which the mean next-token cross-entropy on neutral ``texts`` rises by ``max_ce_increase`` nats over
the unsteered model (the "fluency budget" of the steering), and returns it with the measured curve. SAE-TS
(Chalnev, Siu & Conmy 2024) scales its steering vectors the same way, to a fixed loss.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

import torch
from torch import nn

from .errors import ArgumentTypeError, ConfigError
from .hooks import unwrap_model
from .next_token import next_token_loss
from .steering import Steering, steered
from .validation import finite, positive_int

#: Generic English sentences on which a steering vector should cost little (the default calibration texts).
NEUTRAL_TEXTS = (
    "The meeting has been moved to Thursday afternoon, so please update your calendars.",
    "She opened the window to let in some fresh air before she started cooking dinner.",
    "Most libraries let you borrow books for three weeks and renew them online.",
    "The report shows that sales grew slowly during the first half of the year.",
    "After the rain stopped, the children went outside to play in the garden.",
    "To install the program, download the file and follow the instructions on the screen.",
    "He has been learning to play the piano for two years and practises every evening.",
    "The museum is closed on Mondays but open late on Friday evenings.",
)


def _token_batches(tokenizer: Any, texts: Sequence[str], batch_size: int, max_length: int,
                   device: torch.device) -> list[dict[str, torch.Tensor]]:
    texts = [texts] if isinstance(texts, str) else list(texts)
    if not texts or not all(isinstance(t, str) and t.strip() for t in texts):
        raise ConfigError("need a non-empty list of non-empty texts")
    positive_int("batch_size", batch_size)
    positive_int("max_length", max_length)
    return [{key: value.to(device) for key, value in
             tokenizer(texts[i:i + batch_size], return_tensors="pt", padding=True, truncation=True,
                       max_length=max_length).items()} for i in range(0, len(texts), batch_size)]


@torch.no_grad()
def _mean_cross_entropy(model: nn.Module, batches: list[dict[str, torch.Tensor]],
                        steering: Steering | None) -> float:
    total, count = 0.0, 0
    for inputs in batches:
        with steered(model, steering, attention_mask=inputs["attention_mask"]):
            loss, n = next_token_loss(model, inputs)
        total, count = total + loss, count + n
    return total / max(count, 1)


def steered_cross_entropy(model: nn.Module, tokenizer: Any, texts: Sequence[str], steering: Steering | None = None,
                          *, batch_size: int = 8, max_length: int = 256) -> float:
    """Mean next-token cross-entropy (nats) of ``model`` on ``texts`` with ``steering`` at every position."""
    device = next(unwrap_model(model).parameters()).device
    batches = _token_batches(tokenizer, texts, batch_size, max_length, device)
    return _mean_cross_entropy(model, batches, None if steering is None else replace(steering, positions="all"))


@dataclass(frozen=True)
class Calibration:
    """The result of :func:`calibrate_strength`.

    ``steering``: the spec at the calibrated strength; ``scale``: the factor applied to the given spec's strengths;
    ``baseline_ce``: the unsteered cross-entropy; ``curve``: every ``(scale, CE increase)`` measured, by scale.
    """

    steering: Steering
    scale: float
    baseline_ce: float
    max_ce_increase: float
    curve: list[tuple[float, float]]

    @property
    def strength(self) -> float:
        """The calibrated strength (the first feature's, when the spec has several)."""
        return float(self.steering.strengths[0])

    @property
    def ce_increase(self) -> float:
        """The CE increase measured at the calibrated strength."""
        return dict(self.curve)[self.scale]


def calibrate_strength(model: nn.Module, tokenizer: Any, steering: Steering, texts: Sequence[str] = NEUTRAL_TEXTS,
                       *, max_ce_increase: float = 0.5, steps: int = 8, batch_size: int = 8, max_length: int = 256,
                       max_scale: float = 1e4) -> Calibration:
    """The largest factor on ``steering``'s strengths whose mean next-token CE on ``texts`` stays within
    ``max_ce_increase`` nats of the unsteered model's (found to a ratio of ``4^(1/2^steps)``).

    The spec is applied at every position of ``texts`` whatever its ``positions`` (plain forwards have no generated
    tokens); its sign and the ratios between its strengths are kept. Starts from the spec's own strengths (×1),
    brackets by factors of 4, then bisects on a log scale. Raises ``ValueError`` when even ``max_scale`` × the
    strengths stay within budget (the vector does nothing measurable) or the texts are empty.
    """
    if not isinstance(steering, Steering):
        raise ArgumentTypeError(f"expected a Steering spec, got {type(steering).__name__}")
    finite("max_ce_increase", max_ce_increase, positive=True)
    positive_int("steps", steps)
    finite("max_scale", max_scale, positive=True)
    if not bool(steering.strengths.abs().sum() > 0):
        raise ConfigError("cannot calibrate a spec whose strengths are all zero: give the direction a sign")
    steering.check_fits(model)
    device = next(unwrap_model(model).parameters()).device
    batches = _token_batches(tokenizer, texts, batch_size, max_length, device)
    everywhere = replace(steering, positions="all")
    baseline = _mean_cross_entropy(model, batches, None)
    curve: dict[float, float] = {}

    def cost(scale: float) -> float:
        if scale not in curve:
            curve[scale] = _mean_cross_entropy(model, batches, everywhere.scaled(scale)) - baseline
        return curve[scale]

    low, high = 0.0, 1.0
    while cost(high) <= max_ce_increase:
        low, high = high, high * 4
        if high > max_scale:
            raise ConfigError(f"even {low:g} x the strengths raise the cross-entropy by only {curve[low]:.3f} nats "
                              f"(< {max_ce_increase}): the vector has no measurable effect")
    while low == 0.0 and high > 1e-6:
        candidate = high / 4
        if cost(candidate) <= max_ce_increase:
            low = candidate
        else:
            high = candidate
    if low == 0.0:
        raise ConfigError(f"even 1e-6 x the strengths raise the cross-entropy by more than {max_ce_increase} nats")
    for _ in range(steps):
        middle = math.sqrt(low * high)
        if cost(middle) <= max_ce_increase:
            low = middle
        else:
            high = middle
    return Calibration(steering.scaled(low), low, baseline, max_ce_increase, sorted(curve.items()))


def absolute_steering(steering: Steering, model: nn.Module, tokenizer: Any, texts: Sequence[str] = NEUTRAL_TEXTS, *,
                      batch_size: int = 8, max_length: int = 256) -> Steering:
    """``steering`` (``relative=True``) with absolute strengths for ``model``: the relative strengths times
    :func:`qscope_hf.discovery.residual_unit` at the spec's layer over ``texts`` (the unit ``relative=True``
    measures on each prompt, its median over the texts). What :func:`qscope_hf.export.export_control_vector` and
    ``bake_steering`` need."""
    from .discovery import residual_unit

    if not isinstance(steering, Steering):
        raise ArgumentTypeError(f"expected a Steering spec, got {type(steering).__name__}")
    steering.check_fits(model)
    return steering.absolute(residual_unit(model, tokenizer, steering.layer, list(texts), batch_size=batch_size,
                                            max_length=max_length))
