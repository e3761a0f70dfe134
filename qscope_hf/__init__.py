"""qscope_hf: Qwen-Scope sparse autoencoders for transformers (SAE core, formats, hooks, steering, analysis)."""

from . import ops
from .calibration import Calibration, calibrate_strength, steered_cross_entropy
from .config import SAEConfig
from .errors import (
    CheckpointError,
    ConfigError,
    FeatureIndexError,
    LayerError,
    MissingColumnError,
    QscopeError,
)
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
from .output_scores import (
    LogitLens,
    OutputScores,
    RankedFeature,
    logit_lens,
    output_scores,
    rank_features,
    unembedding,
)
from .releases import Release, UnknownReleaseError, find_release, get_release, list_releases, register_release
from .sae import SparseAutoencoder
from .steering import (
    FeatureTrace,
    PromptLayout,
    SAELogitsProcessor,
    Steering,
    SteeringGenerationMixin,
    SteeringSession,
    disable_steering,
    enable_steering,
    steered,
)
from .vectors import EffectApproximator, diff_means_vector, fit_effect_approximator, targeted_vector

__all__ = [
    "ConfigError",
    "FeatureIndexError",
    "LayerError",
    "MissingColumnError",
    "QscopeError",
    "Calibration",
    "EffectApproximator",
    "LogitLens",
    "OutputScores",
    "RankedFeature",
    "calibrate_strength",
    "diff_means_vector",
    "fit_effect_approximator",
    "logit_lens",
    "output_scores",
    "rank_features",
    "steered_cross_entropy",
    "targeted_vector",
    "unembedding",
    "CheckpointError",
    "FeatureTrace",
    "PromptLayout",
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
