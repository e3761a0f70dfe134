"""Hooks that steer an in-process vLLM engine: :class:`EngineSteering` edits the decoder layers' outputs on vLLM's
packed batch (every scheduled token of every request in one ``[N, d]`` tensor) and :func:`steered` opens one around
``llm.generate`` calls."""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from ..corpus import residual_spread
from ..errors import ConfigError, SteeringNotActiveError, UnsupportedError
from ..hooks import decoder_layers
from ..steering import Steering, steering_list
from .engine import Engine, PackedBatch

_NOWHERE = object()


@dataclass(eq=False)
class _Entry:
    spec: Steering
    key: str | None  # None: every request; else the requests whose steering key is this

    @property
    def needs_batch(self) -> bool:
        """Whether the edit depends on which request or position a token is."""
        return self.key is not None or self.spec.positions != "all" or self.spec.relative

    @property
    def needs_residuals(self) -> bool:
        """Whether the edit reads the residual stream (a feature's activation, or the spread of a prompt)."""
        return self.spec.mode != "add" or self.spec.relative


class EngineSteering:
    """Steer every request of an in-process ``vllm.LLM`` with ``steerings``, and the requests whose
    ``SamplingParams.extra_args`` name a key of ``by_key`` with that key's specs too, while the block is open.

    Checked on entry: the engine runs in this process and eagerly (``enforce_eager=True``), the specs fit its model,
    their positions are ``"all"``, ``"prompt"`` or ``"generated"`` (explicit indices are refused). vLLM's prefix cache
    is emptied on entry and on exit, so no request reuses a prompt computed with other steering. With the prefix
    cache on, ``"prompt"`` / ``"generated"`` positions and relative strengths need ``private_cache=True``: the caller
    salts each steered request's cache (as :func:`qscope_hf.vllm.generate` does), else they are refused. On exit
    (without an exception) it checks that every hooked layer ran in every forward the engine made, and raises
    :class:`~qscope_hf.errors.SteeringNotActiveError` if not.
    """

    def __init__(self, llm: Any, steerings: Sequence[Steering] = (),
                 by_key: Mapping[str, Sequence[Steering]] | None = None, *, private_cache: bool = False) -> None:
        self.engine = Engine.of(llm)
        self.engine.check_eager()
        entries = [_Entry(spec, None) for spec in steerings]
        entries += [_Entry(spec, key) for key, specs in (by_key or {}).items() for spec in specs]
        for entry in entries:
            entry.spec.check_fits(self.engine.model)
            if not isinstance(entry.spec.positions, str):
                raise UnsupportedError(f"positions={entry.spec.positions!r}: explicit positions are not supported "
                                       f"inside vLLM; use 'all', 'prompt' or 'generated'")
            if self.engine.prefix_caching and not private_cache and \
                    (entry.spec.positions != "all" or entry.spec.relative):
                raise UnsupportedError(
                    f"{'relative=True' if entry.spec.relative else repr(entry.spec.positions) + ' positions'} with "
                    f"vLLM's prefix cache on: a request may reuse prompt blocks computed for another one, steered "
                    f"elsewhere or measured on another prompt. Use qscope_hf.vllm.generate (which keeps each "
                    f"request's cache apart), create the LLM with enable_prefix_caching=False, or (for relative "
                    f"strengths) convert the spec to absolute ones with Steering.absolute")
        self.entries: dict[int, list[_Entry]] = {}
        for entry in entries:
            self.entries.setdefault(entry.spec.layer, []).append(entry)
        self.needs_batch = any(entry.needs_batch for entry in entries)
        self.reads_stream = {layer: any(entry.needs_residuals for entry in layer_entries)
                             for layer, layer_entries in self.entries.items()}
        self.forwards = 0
        self.calls = dict.fromkeys(self.entries, 0)
        self.units: dict[tuple[int, str], float] = {}  # (layer, request key or id) -> residual spread of its prompt
        self._batch: PackedBatch | None = None
        self._masks: dict[int, Any] = {}
        self._stack: ExitStack | None = None

    # -- hooks ------------------------------------------------------------------------------------------------------

    def _before_forward(self, _module: nn.Module, args: tuple, kwargs: dict) -> None:
        self.forwards += 1
        self._masks = {}
        if self.needs_batch:
            positions = kwargs.get("positions", args[1] if len(args) > 1 else None)
            if not isinstance(positions, Tensor):
                raise UnsupportedError("vLLM called the model without a positions tensor; qscope_hf.vllm was "
                                       "written for vLLM's model interface forward(input_ids, positions, ...)")
            self._batch = PackedBatch.read(self.engine.runner, positions)

    def _layer_hook(self, layer: int) -> Any:
        def hook(module: nn.Module, _inputs: Any, output: Any) -> Any:
            self.calls[layer] += 1
            return self._edit(layer, module, output)
        return hook

    def _edit(self, layer: int, module: nn.Module, output: Any) -> Any:
        if isinstance(output, Tensor):
            hidden, residual = output, None
        elif isinstance(output, tuple) and len(output) == 2 and all(isinstance(t, Tensor) for t in output) and \
                output[0].shape == output[1].shape:
            hidden, residual = output
        else:
            raise UnsupportedError(f"vLLM's {type(module).__name__} returns {type(output).__name__}: qscope steers "
                                   f"decoder layers that return hidden_states or (hidden_states, residual)")
        stream = None  # the residual stream, hidden + residual, built only for edits that read it
        if self.reads_stream[layer]:
            stream = hidden if residual is None else hidden + residual
        unsteered = stream  # relative units are measured before any edit at this layer, as for transformers
        for entry in self.entries[layer]:
            mask = self._mask(entry)
            if mask is _NOWHERE:
                continue
            unit = self._unit(layer, entry, unsteered) if entry.spec.relative else None
            delta = entry.spec.delta(hidden if stream is None else stream, mask=mask, unit=unit)
            hidden = hidden + delta
            if stream is not None:
                stream = stream + delta if residual is not None else hidden
        return hidden if residual is None else (hidden, residual)

    def _applies(self, entry: _Entry) -> list[bool]:
        """Which requests of the batch ``entry`` steers."""
        batch = self._batch
        return [True] * len(batch.requests) if entry.key is None else [key == entry.key for key in batch.steering]

    def _mask(self, entry: _Entry) -> Tensor | None | object:
        """``[N, 1]`` bool: the tokens ``entry`` steers in this forward; None for all of them, ``_NOWHERE``."""
        if not entry.needs_batch:
            return None
        if id(entry) not in self._masks:
            batch = self._batch
            requests = torch.tensor(self._applies(entry) + [False], device=batch.request.device)
            mask = requests[batch.request]  # padding (-1) reads the trailing False
            if entry.spec.positions != "all":
                in_prompt = batch.positions < batch.prompt_lengths[batch.request.clamp(min=0)]
                mask &= in_prompt if entry.spec.positions == "prompt" else ~in_prompt
            self._masks[id(entry)] = None if bool(mask.all()) else _NOWHERE if not bool(mask.any()) else mask[:, None]
        return self._masks[id(entry)]

    def _unit(self, layer: int, entry: _Entry, stream: Tensor) -> Tensor:
        """``[N, 1]``: the residual spread of each steered token's prompt at ``layer``, measured on the prompt at
        its prefill (all of it in one forward) and kept for the tokens generated after it."""
        batch = self._batch
        keys = {index: (layer, batch.steering[index] or batch.requests[index])
                for index, steered in enumerate(self._applies(entry)) if steered}
        # whole prompts first: a sample of the same prompt may reuse this forward's first blocks (n > 1)
        for index in sorted(keys, key=lambda index: int(batch.positions[batch.tokens(index).start]) != 0):
            if keys[index] not in self.units:
                self.units[keys[index]] = self._measure(index, stream)
        units = torch.zeros(len(batch.requests) + 1, dtype=stream.dtype, device=stream.device)
        for index, key in keys.items():
            units[index] = self.units[key]
        return units[batch.request][:, None]

    def _measure(self, index: int, stream: Tensor) -> float:
        batch = self._batch
        tokens = batch.tokens(index)
        length = int(batch.prompt_lengths[index])
        if int(batch.positions[tokens.start]) != 0 or tokens.stop - tokens.start < length:
            raise UnsupportedError(
                f"request {batch.requests[index]}: relative=True strengths are measured on the whole prompt at its "
                f"prefill, but vLLM computed it in parts ({tokens.stop - tokens.start} of {length} prompt tokens "
                f"from position {int(batch.positions[tokens.start])}: chunked prefill or a reused prefix). Create "
                f"the LLM with max_num_batched_tokens above the prompts' total length, or use absolute strengths "
                f"(Steering.absolute)")
        prompt = stream[tokens.start:tokens.start + length][None]
        return float(residual_spread(prompt, torch.ones(prompt.shape[:2], dtype=torch.bool))[0])

    # -- the block --------------------------------------------------------------------------------------------------

    def __enter__(self) -> EngineSteering:
        model = self.engine.model
        if getattr(model, "_qscope_steering", None) is not None:
            raise ConfigError("this vLLM engine is already steered by an open qscope_hf.vllm block: close it first "
                              "(several specs go in one block)")
        self.engine.reset_prefix_cache()
        stack = ExitStack()
        try:
            model._qscope_steering = self
            stack.callback(delattr, model, "_qscope_steering")
            stack.callback(self.engine.reset_prefix_cache)
            layers = decoder_layers(model)
            stack.callback(model.register_forward_pre_hook(self._before_forward, with_kwargs=True).remove)
            for layer in self.entries:
                stack.callback(layers[layer].register_forward_hook(self._layer_hook(layer)).remove)
        except BaseException:
            stack.close()
            raise
        self._stack = stack
        return self

    def __exit__(self, exc_type: Any, *exc: Any) -> None:
        stack, self._stack = self._stack, None
        if exc_type is not None:  # a generate call that raised inside the block leaves its requests in the engine
            self.engine.abort_unfinished()
        if stack is not None:
            stack.close()
        if exc_type is None:
            self.check_ran()

    def check_ran(self, *, generated: bool = False) -> None:
        """Raise :class:`~qscope_hf.errors.SteeringNotActiveError` unless every hooked layer ran in every forward
        the engine made (and, when ``generated`` tokens came out, in at least one)."""
        short = {layer: calls for layer, calls in self.calls.items() if calls < max(self.forwards, int(generated))}
        if short:
            raise SteeringNotActiveError(
                f"vLLM ran the model {self.forwards} times but the steered layers' hooks ran {short} times: its "
                f"forwards skip Python hooks (a compiled graph or CUDA graphs), so the outputs were not steered. "
                f"Create the LLM with enforce_eager=True")


@contextmanager
def steered(llm: Any, steering: Steering | Sequence[Steering]) -> Iterator[EngineSteering]:
    """Steer every request ``llm.generate`` (or ``llm.chat``) runs inside the block with ``steering``.

    ``llm`` is an in-process ``vllm.LLM`` created with ``enforce_eager=True``; see :class:`EngineSteering` for what
    is checked and refused.
    """
    specs = steering_list(steering)
    if not specs:
        raise ConfigError("steered() needs at least one Steering spec")
    with EngineSteering(llm, specs) as session:
        yield session
