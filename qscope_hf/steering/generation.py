"""Steering inside ``model.generate``: :class:`SAELogitsProcessor`, the :class:`SteeringGenerationMixin` that opens a
session around transformers' decoding loop (prefill included), and :func:`enable_steering` /
:func:`disable_steering`, which give one model instance that mixin."""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import ExitStack
from typing import Any

import torch
from torch import Tensor, nn
from transformers import LogitsProcessor, LogitsProcessorList

from ..classes import add_mixin, remove_mixin
from ..compat import check_transformers
from ..errors import ConfigError, SteeringNotActiveError, UnsupportedError
from ..hooks import unwrap_model
from ..sae import SparseAutoencoder
from .session import FeatureTrace, PromptLayout, SteeringSession
from .spec import RowSpecs, Steering, check_rows, steering_list


class SAELogitsProcessor(LogitsProcessor):
    """Steer a ``model.generate`` call with SAE features; pass it in ``logits_processor=``.

    ``steerings`` apply to every row; ``rows`` gives each prompt row its own spec (or list, or None), following
    the row expansion of ``num_beams`` / ``num_return_sequences``. ``trace`` lists ``(sae, features)`` whose
    activations are recorded at every step into :attr:`traces` (reset at each call). Steering is in force from
    the prefill forward of each generate call the processor is passed to, and only then; a processor can be
    reused. Its hooks do the steering: it leaves the scores unchanged, and the decoding loop is handed the other
    processors only.
    """

    def __init__(self, model: nn.Module, steerings: Steering | Sequence[Steering] | None = None, *,
                 rows: RowSpecs | None = None, trace: Sequence[tuple[SparseAutoencoder, Sequence[int]]] = ()) -> None:
        self.steerings, self.rows = steering_list(steerings), rows
        if rows is not None:
            check_rows(rows)
        self.trace_specs = list(trace)
        for spec in self.steerings + [s for row in rows or [] for s in steering_list(row)]:
            spec.check_fits(model)
        self.traces: list[FeatureTrace] = []
        enable_steering(model)

    def session(self, model: nn.Module, input_ids: Tensor, attention_mask: Tensor | None, *, expand: int = 1,
                max_new_tokens: int = 0) -> SteeringSession:
        """The session for one decoding loop over ``input_ids [B·expand, T]`` (prompts already repeated ``expand``
        times for beams / return sequences), validated now, before the prefill."""
        if len(input_ids) % expand:
            raise ConfigError(f"{len(input_ids)} rows are not {expand} copies of each prompt")
        real = (attention_mask.bool() if attention_mask is not None else torch.ones_like(input_ids, dtype=torch.bool))
        prompt = PromptLayout(len(input_ids) // expand, real[::expand].cpu(), max(int(max_new_tokens), 0))
        self.traces = [FeatureTrace(sae, list(features)) for sae, features in self.trace_specs]
        return SteeringSession(model, self.steerings, self.rows, prompt, self.traces)

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        # The steering generate wrapper hands the decoding loop every processor but this one, so a call means the
        # processor reached a loop without steering: another model than the one it was built for, a custom
        # generate loop, assisted decoding. Steering would be silently off there.
        raise SteeringNotActiveError(
            "this SAELogitsProcessor was called by a decoding loop that qscope does not steer (a model it was not "
            "built for, a custom generate loop or generation strategy): its steering would be silently off. Build "
            "the processor with the model whose generate you call, or call generate(..., steering=spec) on it")


def _active(processors: Any) -> list[SAELogitsProcessor]:
    return [p for p in processors or [] if isinstance(p, SAELogitsProcessor)]


class SteeringGenerationMixin:
    """Adds ``generate(..., steering=..., steering_rows=...)`` to a causal LM, and opens a steering session for
    every :class:`SAELogitsProcessor` in ``logits_processor`` around transformers' decoding loop (``_sample`` /
    ``_beam_search``), which contains the prefill: so a processor works even when built inside the very
    ``model.generate(...)`` call that uses it."""

    def generate(self, *args: Any, steering: Steering | Sequence[Steering] | None = None,
                 steering_rows: RowSpecs | None = None, **kwargs: Any) -> Any:
        """``generate`` with ``steering=`` (specs for every row) and ``steering_rows=`` (one spec list or None
        per prompt row); without them it is the model's own ``generate``."""
        if steering is not None or steering_rows is not None:
            processors = LogitsProcessorList(kwargs.pop("logits_processor", None) or [])
            processors.append(SAELogitsProcessor(self, steering, rows=steering_rows))
            kwargs["logits_processor"] = processors
        return super().generate(*args, **kwargs)

    def _steered_loop(self, loop: Any, input_ids: Tensor, logits_processor: Any, generation_config: Any,
                      **kwargs: Any) -> Any:
        expand = max(generation_config.num_beams or 1, generation_config.num_return_sequences or 1)
        steering = _active(logits_processor)
        if steering:  # the hooks do the steering: the loop need not call the pass-through processors every step
            logits_processor = LogitsProcessorList([p for p in logits_processor if p not in steering])
        with ExitStack() as stack:
            for processor in steering:
                stack.enter_context(processor.session(
                    self, input_ids, kwargs.get("attention_mask"), expand=expand,
                    max_new_tokens=generation_config.max_length - input_ids.shape[1]))
            return loop(input_ids, logits_processor=logits_processor, generation_config=generation_config, **kwargs)

    def _sample(self, input_ids: Tensor, logits_processor: Any = None, generation_config: Any = None,
                **kwargs: Any) -> Any:
        return self._steered_loop(super()._sample, input_ids, logits_processor, generation_config, **kwargs)

    def _beam_search(self, input_ids: Tensor, logits_processor: Any = None, generation_config: Any = None,
                     **kwargs: Any) -> Any:
        return self._steered_loop(super()._beam_search, input_ids, logits_processor, generation_config, **kwargs)

    def _assisted_decoding(self, *args: Any, logits_processor: Any = None, **kwargs: Any) -> Any:
        if _active(logits_processor):
            raise UnsupportedError("SAE steering does not support assisted generation")
        return super()._assisted_decoding(*args, logits_processor=logits_processor, **kwargs)


def enable_steering(model: nn.Module) -> nn.Module:
    """Give ``model`` (or the HF model inside a PEFT / DDP wrapper) ``generate(..., steering=...)``; returns
    ``model``. The instance's class becomes a same-named subclass (:mod:`qscope_hf.classes`); nothing else changes."""
    check_transformers()
    add_mixin(unwrap_model(model), SteeringGenerationMixin)
    return model


def disable_steering(model: nn.Module) -> nn.Module:
    """Undo :func:`enable_steering` (restores the instance's original class)."""
    remove_mixin(unwrap_model(model), SteeringGenerationMixin)
    return model
