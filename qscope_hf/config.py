"""``SAEConfig``: the shape of one SAE and where it reads from, as stored next to its weights."""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any

from .errors import ConfigError
from .ops import ACTIVATIONS, Activation

#: SAE ``layer n`` reads (and steering writes) the output of decoder layer n, i.e. ``hidden_states[n + 1]``: the
#: only hook point qscope SAEs have (older sidecars record it as ``"hook_point": "resid_post"``).
RESID_POST = "resid_post"


@dataclass
class SAEConfig:
    """Shape, activation and provenance of one TopK SAE.

    ``layer`` is the decoder layer whose output the SAE reads (the residual stream after it); ``release`` the hub
    repo it came from, if any; ``model_id`` the model it was trained on.
    """

    d_model: int
    d_sae: int
    k: int
    activation: Activation = "relu_topk"
    layer: int | None = None
    release: str | None = None
    model_id: str | None = None

    def __post_init__(self) -> None:
        for name in ("d_model", "d_sae", "k"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int):
                raise ConfigError(f"{name} must be an integer, got {value!r}")
        if self.d_model <= 0 or self.d_sae <= 0:
            raise ConfigError(f"d_model and d_sae must be positive, got d_model={self.d_model}, d_sae={self.d_sae}")
        if not 0 < self.k <= self.d_sae:
            raise ConfigError(f"k={self.k} must be in [1, d_sae={self.d_sae}]")
        if self.activation not in ACTIVATIONS:
            raise ConfigError(f"unknown activation {self.activation!r}; choose one of {ACTIVATIONS}")
        if self.layer is not None and (isinstance(self.layer, bool) or not isinstance(self.layer, int)):
            raise ConfigError(f"layer must be an integer, got {self.layer!r}")
        if self.layer is not None and self.layer < 0:
            raise ConfigError(f"layer must be >= 0, got {self.layer}")

    def to_dict(self) -> dict[str, Any]:
        """The config as a plain dict (the JSON sidecar's content)."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> SAEConfig:
        """Build from a dict, ignoring keys that are not config fields (e.g. format bookkeeping)."""
        names = {f.name for f in fields(cls)}
        return cls(**{key: value for key, value in data.items() if key in names})
