"""How steering runs: a :class:`SteeringSession` hooks the decoder layers its specs name for one generate call (or a
block of plain forwards) and edits each layer's output at the positions and rows the specs ask for; :func:`steered`
opens one around plain forwards."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

import torch
from torch import Tensor, nn

from ..corpus import residual_spread
from ..errors import ConfigError, PositionError
from ..hooks import check_sae_fits, hook_layers
from ..sae import FeatureReader, SparseAutoencoder
from .spec import RowSpecs, Steering, check_rows, steering_list


@dataclass
class PromptLayout:
    """The batch a :class:`SteeringSession` steers: ``batch`` prompt rows, which prompt positions are real tokens
    (``real [B, T]``, False on padding; None when every token of every forward is a real prompt token), and how
    many tokens may follow (``max_new_tokens``; None for plain forwards, each forward a whole sequence)."""

    batch: int
    real: Tensor | None
    max_new_tokens: int | None
    _on_device: dict = field(default_factory=dict)

    @property
    def length(self) -> int | None:
        """Padded prompt length ``T`` (None for plain forwards)."""
        return None if self.real is None else self.real.shape[1]

    def real_on(self, device: torch.device) -> Tensor:
        """``[B, T]`` real-token mask of the prompt on ``device`` (cached per device)."""
        if device not in self._on_device:
            self._on_device[device] = self.real.to(device)
        return self._on_device[device]


def _explicit_targets(real: Tensor, length: int, indices: Sequence[int], extra: int) -> Tensor:
    """Absolute positions ``[B, P]`` of per-row logical ``indices`` (from each row's first real token; negative
    from the end of the prompt), for left or right padding. ``real`` is ``[B, T]``; logical positions past the
    prompt are generated tokens, which follow the whole padded prompt; raises for an index outside some row's
    sequence."""
    lengths = real.sum(1)
    order = real.long().cumsum(1) - 1  # each real token's logical position
    targets = []
    for index in indices:
        logical = lengths + index if index < 0 else torch.full_like(lengths, index)
        bad = (logical < 0) | (logical >= lengths + extra)
        if bool(bad.any()):
            row = int(bad.nonzero()[0])
            raise PositionError(f"position {index} is outside row {row}'s sequence ({int(lengths[row])} prompt "
                                f"tokens + up to {extra} generated)")
        in_prompt = (real & (order == logical[:, None])).long().argmax(1)
        targets.append(torch.where(logical < lengths, in_prompt, length + logical - lengths))
    return torch.stack(targets, dim=1)


@dataclass
class _Entry:
    spec: Steering
    rows: Tensor | None  # [B] bool: the prompt rows it applies to (None: all)
    targets: Tensor | None = None  # [B, P] absolute positions of explicit positions (generate sessions)

    @property
    def every_generated(self) -> bool:
        """Whether it applies to every row at every generated position (no mask needed while decoding)."""
        return self.rows is None and self.spec.positions in ("all", "generated")


class Where(Enum):
    """Where an edit applies in a forward when it is not a per-position mask."""

    EVERYWHERE = "everywhere"
    NOWHERE = "nowhere"


class _LayerSteerer:
    """The edit a session applies to one decoder layer's output ``[B·expand, t, d]`` at every forward."""

    def __init__(self, entries: list[_Entry], traces: list[FeatureTrace], prompt: PromptLayout,
                 stateless: bool) -> None:
        self.entries, self.traces, self.prompt, self.stateless = entries, traces, prompt, stateless
        self.offset = 0
        self.relative = any(entry.spec.relative for entry in entries)
        self.units: Tensor | None = None  # [B', 1, 1] residual spread per row, measured on the prompt
        self._rows: dict[tuple[int, torch.device], Tensor] = {}

    def _row_of(self, rows: int, device: torch.device) -> Tensor:
        """``[rows]``: the prompt row of each of the layer's rows (beams / return sequences are repeats)."""
        row_of = self._rows.get((rows, device))
        if row_of is None:
            if rows % self.prompt.batch:
                raise ConfigError(f"steering was set up for {self.prompt.batch} prompts but the layer sees {rows} "
                                  f"rows")
            row_of = self._rows[rows, device] = torch.arange(rows, device=device) // (rows // self.prompt.batch)
        return row_of

    def _real(self, row_of: Tensor, positions: Tensor, first: int) -> Tensor | None:
        """``[B', t]`` mask of real tokens (None when every position is real)."""
        prompt = self.prompt
        if prompt.real is None or first >= prompt.length:
            return None
        real = prompt.real_on(positions.device)[row_of][:, positions.clamp(max=prompt.length - 1)]
        return real | (positions >= prompt.length)[None, :]

    def _mask(self, entry: _Entry, row_of: Tensor, positions: Tensor, first: int) -> Tensor | Where:
        """Where ``entry`` applies in this forward: a ``[B', t]`` bool mask, or :class:`Where`."""
        spec, prompt = entry.spec, self.prompt
        length = prompt.length if prompt.length is not None else first + len(positions)
        last = first + len(positions) - 1
        if spec.positions == "generated":
            if prompt.max_new_tokens is None or last < length:
                return Where.NOWHERE
            mask = None if first >= length else (positions >= length)[None, :].expand(len(row_of), -1)
        elif spec.positions in ("prompt", "all"):
            if spec.positions == "prompt" and first >= length:
                return Where.NOWHERE
            mask = self._real(row_of, positions, first)
            if spec.positions == "prompt" and last >= length:
                below = (positions < length)[None, :]
                mask = below.expand(len(row_of), -1) if mask is None else mask & below
        else:
            targets = entry.targets
            if targets is None:  # plain forwards: positions count within this forward's sequence
                real = prompt.real if prompt.real is not None else torch.ones(prompt.batch, length, dtype=torch.bool)
                targets = _explicit_targets(real, length, spec.positions, 0)
            targets = targets.to(positions.device)[row_of]  # [B', P]
            mask = (positions[None, :, None] == targets[:, None, :]).any(-1)
        if entry.rows is not None:
            rows = entry.rows.to(row_of.device)[row_of][:, None]
            mask = rows.expand(-1, len(positions)) if mask is None else mask & rows
        return Where.EVERYWHERE if mask is None else mask

    def _measure_units(self, hidden: Tensor) -> Tensor:
        """``[B', 1, 1]``: each row's :func:`~qscope_hf.corpus.residual_spread` over its real prompt tokens."""
        if self.prompt.real is None:
            real = torch.ones(hidden.shape[:2], dtype=torch.bool, device=hidden.device)
        else:
            real = self.prompt.real_on(hidden.device)[self._row_of(len(hidden), hidden.device)][:, :hidden.shape[1]]
        return residual_spread(hidden, real).to(hidden.dtype)[:, None, None]

    def _apply(self, spec: Steering, hidden: Tensor, mask: Tensor | None) -> Tensor:
        return hidden + spec.delta(hidden, mask=None if mask is None else mask[..., None],
                                   unit=self.units if spec.relative else None)

    def __call__(self, hidden: Tensor) -> Tensor:
        if self.stateless:
            self.offset = 0
        rows, steps = hidden.shape[:2]
        first = self.offset
        self.offset += steps
        if self.relative and first == 0:
            self.units = self._measure_units(hidden)
        decoding = self.prompt.length is not None and first >= self.prompt.length
        where = None  # (row_of, positions), built only for entries that need a mask
        for entry in self.entries:
            if decoding and entry.every_generated:
                mask = Where.EVERYWHERE
            else:
                if where is None:
                    where = self._row_of(rows, hidden.device), torch.arange(first, first + steps, device=hidden.device)
                mask = self._mask(entry, *where, first)
            if mask is not Where.NOWHERE:
                hidden = self._apply(entry.spec, hidden, None if mask is Where.EVERYWHERE else mask)
        for trace in self.traces:
            trace.record(hidden)
        return hidden


@dataclass(eq=False)
class FeatureTrace:
    """Activations ``ReLU(f_s(h))`` of chosen features at the SAE's layer (after steering), step by step.

    ``values`` is ``[B', T_total, S]`` after a generate call: the prefill's ``T`` positions, then one per step.
    """

    sae: SparseAutoencoder
    features: Sequence[int]
    steps: list[Tensor] = field(default_factory=list, repr=False)
    reader: FeatureReader = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self.reader = self.sae.feature_reader(self.features)

    def record(self, hidden: Tensor) -> None:
        """Append the traced features' activations ``[B', t, S]`` of one forward's ``hidden [B', t, d]``."""
        with torch.no_grad():
            self.steps.append(self.reader.acts(hidden).float().cpu())

    @property
    def values(self) -> Tensor:
        """``[B', T_total, S]``: every recorded step, concatenated along time."""
        return torch.cat(self.steps, dim=1) if self.steps else torch.empty(0)


class SteeringSession:
    """Hooks that apply ``steerings`` (every row) and ``rows`` (one spec list or None per prompt row) to ``model``.

    Enter it around one generate call (``prompt`` known) or around plain forwards (``max_new_tokens=None``: each
    forward is a whole sequence). Errors in the specs are raised here, before any forward.
    """

    def __init__(self, model: nn.Module, steerings: Sequence[Steering], rows: RowSpecs | None, prompt: PromptLayout,
                 traces: Sequence[FeatureTrace] = ()) -> None:
        self.model, self.prompt = model, prompt
        entries: dict[int, list[_Entry]] = {}
        for spec in steerings:
            entries.setdefault(spec.layer, []).append(self._entry(spec, None))
        if rows is not None:
            check_rows(rows)
            if len(rows) != prompt.batch:
                raise ConfigError(f"{len(rows)} per-row steering specs for a batch of {prompt.batch} prompts")
            by_spec: dict[int, tuple[Steering, Tensor]] = {}
            for row, row_specs in enumerate(rows):
                for spec in steering_list(row_specs):
                    by_spec.setdefault(id(spec), (spec, torch.zeros(prompt.batch, dtype=torch.bool)))[1][row] = True
            for spec, mask in by_spec.values():
                entries.setdefault(spec.layer, []).append(self._entry(spec, mask))
        for layer_entries in entries.values():
            for entry in layer_entries:
                entry.spec.check_fits(model)
        traced: dict[int, list[FeatureTrace]] = {}
        for trace in traces:
            traced.setdefault(check_sae_fits(model, trace.sae), []).append(trace)
        stateless = prompt.max_new_tokens is None
        self.steerers = {layer: _LayerSteerer(entries.get(layer, []), traced.get(layer, []), prompt, stateless)
                         for layer in sorted(set(entries) | set(traced))}
        self._stack: ExitStack | None = None

    def _entry(self, spec: Steering, rows: Tensor | None) -> _Entry:
        entry = _Entry(spec, rows)
        prompt = self.prompt
        if not isinstance(spec.positions, str) and prompt.max_new_tokens is not None:
            entry.targets = _explicit_targets(prompt.real, prompt.length, spec.positions, prompt.max_new_tokens)
        return entry

    def __enter__(self) -> SteeringSession:
        self._stack = ExitStack()
        self._stack.enter_context(hook_layers(self.model, self.steerers))
        return self

    def __exit__(self, *exc: Any) -> None:
        stack, self._stack = self._stack, None
        if stack is not None:
            stack.close()



@contextmanager
def steered(model: nn.Module, steerings: Steering | Sequence[Steering] | None = None, *,
             rows: RowSpecs | None = None, attention_mask: Tensor | None = None,
             batch_size: int | None = None) -> Iterator[SteeringSession]:
    """Steer plain forwards inside the block: each forward is a whole sequence (``"prompt"`` and ``"all"`` cover
    its real tokens, ``"generated"`` nothing). ``attention_mask [B, T]`` marks padding; without it every token is
    real and per-row specs need ``batch_size``."""
    if attention_mask is None:
        batch = batch_size if batch_size is not None else (len(rows) if rows is not None else 1)
        prompt = PromptLayout(batch, None, None)
    else:
        prompt = PromptLayout(attention_mask.shape[0], attention_mask.bool().cpu(), None)
    with SteeringSession(model, steering_list(steerings), rows, prompt) as session:
        yield session
