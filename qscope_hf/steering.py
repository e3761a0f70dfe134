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

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import KW_ONLY, dataclass, field, replace
from enum import Enum
from typing import Any, Literal, get_args

import torch
from torch import Tensor, nn
from transformers import LogitsProcessor, LogitsProcessorList

from .classes import add_mixin, remove_mixin
from .compat import check_transformers
from .corpus import residual_spread
from .errors import ArgumentTypeError, ConfigError, PositionError, SteeringNotActiveError, UnsupportedError
from .hooks import check_layer, check_sae_fits, hidden_size, hook_layers, unwrap_model
from .sae import FeatureReader, SparseAutoencoder
from .validation import finite

Positions = Literal["all", "prompt", "generated"]
Mode = Literal["add", "clamp", "gated"]
POSITIONS: tuple[Positions, ...] = get_args(Positions)
MODES: tuple[Mode, ...] = get_args(Mode)
RowSpecs = Sequence["Steering | Sequence[Steering] | None"]


@dataclass(eq=False)
class Steering:
    """Steer ``feature`` (one id or a list) of ``sae`` by ``strength`` (one value or one per feature).

    ``layer`` defaults to the SAE's own layer. See the module docstring for ``positions`` and ``mode``;
    ``gate_feature``/``threshold`` configure ``mode="gated"``. With ``relative=True`` strengths are in units of the
    spread of the layer's residuals: each row's strength is multiplied by
    :func:`~qscope_hf.corpus.residual_spread` of its real prompt tokens at the steered layer (their median distance
    from their mean, the first token left out), measured at the prefill and kept for the generated tokens. Centred,
    the unit ignores the nearly constant "massive" dimensions many models carry, so a relative strength is of the
    same order at every layer and in every model; what a model tolerates still differs (4–6 × between two
    small models), which :func:`~qscope_hf.calibration.calibrate_strength` measures.
    :meth:`from_vector` steers along any direction (difference of means, a probe, a targeted vector) instead of
    SAE features.
    """

    sae: SparseAutoencoder | None
    feature: int | Sequence[int] | None
    strength: float | Sequence[float]
    _: KW_ONLY
    layer: int | None = None
    positions: Positions | Sequence[int] = "all"
    mode: Mode = "add"
    gate_feature: int | None = None
    threshold: float = 0.0
    relative: bool = False
    vector: Tensor | None = field(default=None, repr=False)
    features: Tensor = field(init=False, repr=False)
    strengths: Tensor = field(init=False, repr=False)
    _prepared: dict = field(init=False, repr=False, default_factory=dict)

    def __post_init__(self) -> None:
        if self.vector is None:
            self._check_sae()
        else:
            self._check_vector()
        strengths = torch.as_tensor(self.strength, dtype=torch.float32).reshape(-1)
        if strengths.numel() not in (1, self.features.numel()):
            raise ConfigError(f"{strengths.numel()} strengths for {self.features.numel()} features")
        if not bool(strengths.isfinite().all()):
            raise ConfigError(f"steering strengths must be finite numbers, got {self.strength!r}")
        self.strengths = strengths.expand(self.features.numel()).clone()
        if self.mode not in MODES:
            raise ConfigError(f"unknown steering mode {self.mode!r}; choose one of {MODES}")
        if isinstance(self.positions, str):
            if self.positions not in POSITIONS:
                raise ConfigError(f"unknown positions {self.positions!r}; choose one of {POSITIONS} or a list of ints")
        elif not all(isinstance(p, int) for p in self.positions):
            raise ArgumentTypeError(f"positions must be one of {POSITIONS} or a list of ints, got {self.positions!r}")
        if not math.isfinite(self.threshold):
            raise ConfigError(f"threshold must be a finite number, got {self.threshold}")
        if self.threshold < 0:
            raise ConfigError(f"threshold={self.threshold} is below 0, where a ReLU activation never is: "
                              "use mode='add'")
        if self.sae is not None:
            gate = self.features[0] if self.gate_feature is None else self.sae.feature_index(self.gate_feature)[0]
            self.gate_feature = int(gate)

    def _check_sae(self) -> None:
        if not isinstance(self.sae, SparseAutoencoder):
            raise ArgumentTypeError(f"Steering needs a SparseAutoencoder (or use Steering.from_vector), got "
                                    f"{type(self.sae).__name__}")
        self.features = self.sae.feature_index(self.feature).cpu()
        if not self.features.numel():
            raise ConfigError("a Steering needs at least one feature")
        self.layer = self.sae.layer if self.layer is None else self.layer
        if self.layer is None:
            raise ConfigError("the SAE has no layer: pass Steering(..., layer=n)")

    def _check_vector(self) -> None:
        if self.sae is not None or self.feature is not None:
            raise ConfigError("a Steering takes either an SAE and features or a vector, not both")
        if self.layer is None:
            raise ConfigError("a vector Steering needs layer=n")
        if self.mode != "add":
            raise ConfigError(f"mode={self.mode!r} reads an SAE feature's activation; a vector Steering only adds")
        vector = self.vector
        if not isinstance(vector, Tensor) or vector.dim() != 1 or not vector.is_floating_point():
            raise ArgumentTypeError("a steering vector must be a 1-D floating-point tensor [d_model]")
        if not bool(vector.isfinite().all()) or not bool(vector.any()):
            raise ConfigError("a steering vector must be finite and not all zeros")
        self.features = torch.zeros(1, dtype=torch.long)

    @classmethod
    def from_vector(cls, vector: Tensor, layer: int, strength: float = 1.0, *,
                    positions: Positions | Sequence[int] = "all", relative: bool = False,
                    normalize: bool = True) -> Steering:
        """Steer along ``vector [d_model]`` at ``layer``: ``h + strength · v`` with ``v = vector / ‖vector‖``
        (``normalize=False``: ``v = vector``), through the same hooks, positions, per-row specs and calibration as
        SAE features."""
        vector = torch.as_tensor(vector).detach()
        if normalize and vector.is_floating_point() and bool(vector.isfinite().all()) and bool(vector.any()):
            vector = vector / vector.float().norm().to(vector.dtype)
        return cls(None, None, strength, layer=layer, positions=positions, relative=relative, vector=vector)

    @property
    def d_model(self) -> int:
        """Width of the residual stream the spec steers."""
        return self.sae.d_model if self.vector is None else self.vector.numel()

    def scaled(self, factor: float) -> Steering:
        """This spec with every strength multiplied by ``factor``."""
        return replace(self, strength=(self.strengths * factor).tolist())

    def absolute(self, unit: float) -> Steering:
        """This ``relative=True`` spec with absolute strengths: each multiplied by ``unit``, the residual spread the
        relative strengths are in units of (e.g. :func:`qscope_hf.discovery.residual_unit` on a text set, or
        :func:`qscope_hf.calibration.absolute_steering`, which measures it)."""
        if not self.relative:
            raise ConfigError("absolute() converts a relative=True spec; this one's strengths are absolute already")
        finite("unit", unit, positive=True)
        return replace(self, strength=(self.strengths * unit).tolist(), relative=False)

    def check_fits(self, model: nn.Module) -> int:
        """Check that the spec can steer ``model`` (layer in range, width equal to the hidden size); the layer."""
        if self.sae is not None:
            return check_sae_fits(model, self.sae, self.layer)
        check_layer(model, self.layer)
        width = hidden_size(model)
        if self.d_model != width:
            raise ConfigError(f"steering vector has size {self.d_model} but the model's hidden size is {width}")
        return self.layer

    def tensors(self, dtype: torch.dtype, device: torch.device) -> dict[str, Tensor]:
        """Directions ``[S, d]``, their strength-weighted sum ``[d]`` and the strengths, cast once."""
        key = (dtype, device)
        if key not in self._prepared:
            with torch.no_grad():
                directions = (self.vector[None] if self.sae is None else
                              self.sae.feature_directions(self.features)).to(device=device, dtype=dtype)
                self._prepared[key] = {"directions": directions,
                                       "vector": (self.strengths.to(device, dtype)[:, None] * directions).sum(0),
                                       "strengths": self.strengths.to(device, dtype)}
        return self._prepared[key]

    @property
    def reader(self) -> FeatureReader:
        """Reads what ``mode="clamp"`` (the steered features) and ``mode="gated"`` (the gate feature) compare."""
        if "reader" not in self._prepared:
            self._prepared["reader"] = self.sae.feature_reader(self.features if self.mode == "clamp"
                                                               else [self.gate_feature])
        return self._prepared["reader"]


def steering_list(steerings: Steering | Sequence[Steering] | None) -> list[Steering]:
    """``None``, one spec or a sequence of specs, as a list (anything else raises)."""
    if steerings is None:
        return []
    if not isinstance(steerings, (Steering, Sequence)) or isinstance(steerings, str):
        raise ArgumentTypeError(f"expected a Steering spec or a list of them, got {type(steerings).__name__}")
    items = [steerings] if isinstance(steerings, Steering) else list(steerings)
    for item in items:
        if not isinstance(item, Steering):
            raise ArgumentTypeError(f"expected Steering specs, got {type(item).__name__}")
    return items


def check_rows(rows: RowSpecs) -> None:
    """Raise unless ``rows`` is a list with one entry (a spec, a list of specs or None) per prompt row."""
    if isinstance(rows, (Steering, str)) or not isinstance(rows, Sequence):
        raise ConfigError(f"per-row steering takes a list with one entry per prompt row (a Steering, a list of them "
                          f"or None), got {type(rows).__name__}: pass steering= to steer every row")


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
        t = spec.tensors(hidden.dtype, hidden.device)
        unit = self.units if spec.relative else None
        mask = None if mask is None else mask[..., None]  # [B', t, 1]
        if spec.mode == "clamp":
            current = spec.reader.acts(hidden)  # [B', t, S]
            target = t["strengths"] if unit is None else t["strengths"] * unit
            delta = (target - current) @ t["directions"]
        else:
            delta = t["vector"] if unit is None else t["vector"] * unit
        if spec.mode == "gated":  # one gate feature: [B', t, 1]; ReLU(pre) > threshold ≥ 0 is pre > threshold
            gate = spec.reader.pre_acts(hidden) > spec.threshold
            mask = gate if mask is None else mask & gate
        return hidden + delta if mask is None else torch.addcmul(hidden, mask.to(hidden.dtype), delta)

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
