"""What to steer: the :class:`Steering` spec (SAE features or a vector, strengths, layer, positions, mode) and its
checks against a model; see :mod:`qscope_hf.steering` for the positions and modes."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import KW_ONLY, dataclass, field, replace
from typing import Literal, get_args

import torch
from torch import Tensor, nn

from ..errors import ArgumentTypeError, ConfigError
from ..hooks import check_layer, check_sae_fits, hidden_size
from ..sae import FeatureReader, SparseAutoencoder
from ..validation import finite

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

    def delta(self, hidden: Tensor, *, mask: Tensor | None = None, unit: Tensor | None = None) -> Tensor:
        """What the spec adds to the residuals ``hidden [..., d]``: ``[..., d]``, or ``[d]`` when it is the same
        everywhere (``add`` without a mask). ``mask [..., 1]`` (bool) limits it to some positions, ``unit [..., 1]``
        is the residual spread ``relative=True`` strengths are multiplied by; ``clamp`` and ``gated`` read the
        features' activations from ``hidden``."""
        t = self.tensors(hidden.dtype, hidden.device)
        if self.mode == "clamp":
            target = t["strengths"] if unit is None else t["strengths"] * unit
            delta = (target - self.reader.acts(hidden)) @ t["directions"]
        else:
            delta = t["vector"] if unit is None else t["vector"] * unit
        if self.mode == "gated":  # one gate feature: [..., 1]; ReLU(pre) > threshold >= 0 is pre > threshold
            gate = self.reader.pre_acts(hidden) > self.threshold
            mask = gate if mask is None else mask & gate
        return delta if mask is None else mask.to(hidden.dtype) * delta

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
