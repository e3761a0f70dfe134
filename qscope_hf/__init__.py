"""qscope_hf: Qwen-Scope sparse autoencoders for transformers (SAE core, formats, hooks, steering, analysis)."""

from . import ops
from .config import SAEConfig
from .formats import CheckpointError
from .hooks import (
    add_to_layers,
    capture_layers,
    check_layer,
    check_sae_fits,
    decoder_layers,
    hook_layers,
    layer_outputs,
    unwrap_model,
)
from .releases import Release, UnknownReleaseError, find_release, get_release, list_releases, register_release
from .sae import SparseAutoencoder
from .steering import (
    FeatureTrace,
    SAELogitsProcessor,
    Steering,
    SteeringGenerationMixin,
    SteeringSession,
    disable_steering,
    enable_steering,
    steered,
)

__all__ = [
    "CheckpointError",
    "FeatureTrace",
    "SAELogitsProcessor",
    "Steering",
    "SteeringGenerationMixin",
    "SteeringSession",
    "disable_steering",
    "enable_steering",
    "steered",
    "Release",
    "SAEConfig",
    "SparseAutoencoder",
    "UnknownReleaseError",
    "add_to_layers",
    "capture_layers",
    "check_layer",
    "check_sae_fits",
    "decoder_layers",
    "find_release",
    "get_release",
    "hook_layers",
    "layer_outputs",
    "list_releases",
    "ops",
    "register_release",
    "unwrap_model",
]
