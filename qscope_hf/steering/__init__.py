"""Steering generation with SAE features (docs/methods/steering.md): ``h' = h + α·W_dec[:, f]`` at chosen layers
and positions.

One mechanism, three ways in. A :class:`SteeringSession` hooks the decoder layers named by its :class:`Steering`
specs for exactly one ``generate`` call (or one block of plain forwards) and removes the hooks when it ends,
also on exceptions:

- ``SAELogitsProcessor(model, steerings)`` passed to a plain ``model.generate(..., logits_processor=[proc])``;
- ``model.generate(**inputs, steering=spec)`` once :func:`enable_steering` (or :class:`SteeringGenerationMixin`)
  gave the model a ``steering=`` argument;
- ``with steered(model, specs, attention_mask=...):`` around plain forwards.

A processor cannot see the prefill forward (transformers calls processors after it), so constructing one calls
:func:`enable_steering` on the model instance: its class becomes a subclass, with the same name, whose
``generate`` opens a session for every :class:`SAELogitsProcessor` in ``logits_processor``. No library class and
no global is patched; :func:`disable_steering` restores the original class.

Positions: ``"all"`` (real prompt tokens and generated tokens; left padding is never steered), ``"prompt"``,
``"generated"``, or explicit indices counted from each row's first real token (generated tokens continue the
count; negative indices count back from the end of the prompt, ``-1`` is the last prompt token).

Modes: ``"add"`` adds ``strength·W_dec[:, f]``; ``"clamp"`` sets the feature's activation to ``strength``
(``h + (strength − z_f)·W_dec[:, f]``); ``"gated"`` adds only where the gate feature (default: the steered one)
fires above ``threshold``. Clamp and gated modes read a feature's activation as ``ReLU(f_s(h))`` from its own
encoder row, without a full encode (exact whenever the feature is in the top-k, as a firing feature is).
Specs at the same layer apply in the order given.
"""

from .generation import SAELogitsProcessor, SteeringGenerationMixin, disable_steering, enable_steering
from .session import FeatureTrace, PromptLayout, SteeringSession, steered
from .spec import MODES, POSITIONS, Mode, Positions, RowSpecs, Steering, check_rows, steering_list

__all__ = [
    "MODES",
    "POSITIONS",
    "FeatureTrace",
    "Mode",
    "Positions",
    "PromptLayout",
    "RowSpecs",
    "SAELogitsProcessor",
    "Steering",
    "SteeringGenerationMixin",
    "SteeringSession",
    "check_rows",
    "disable_steering",
    "enable_steering",
    "steered",
    "steering_list",
]
