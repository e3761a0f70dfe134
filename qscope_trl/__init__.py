"""qscope_trl: thin adapters that bring qscope_hf's SAEs into TRL trainers.

- :class:`SAEFeatureMonitorCallback`: log feature firing on completion tokens during any trainer's run;
- :class:`SAEFeaturePenalty` + :func:`add_sae_penalty`: the SASFT auxiliary loss for ``SFTTrainer`` (and the same
  penalty for ``GRPOTrainer``);
- :class:`SAEFeatureReward` (+ presets): SAE-feature rewards for ``GRPOTrainer``;
- :class:`SteeredNegativeRollouts`: one SAE-steered negative rollout per GRPO group (paper §8).

The language and repetition feature finders they need are :mod:`qscope_hf`'s, re-exported here for convenience.
"""

from qscope_hf.compat import check_trl

check_trl()  # before importing the adapters, which subclass and read TRL internals

from qscope_hf.languages import LanguageBaselines, LanguageFeatures, estimate_language_baselines, language_features
from qscope_hf.repetition import repetition_features

from .callbacks import SAEFeatureMonitorCallback
from .losses import GRPOPenaltyMixin, SAEFeaturePenalty, SAEPenaltyMixin, add_sae_penalty, with_sae_penalty
from .rewards import SAEFeatureReward, code_switching_reward, repetition_reward
from .rollouts import SteeredNegativeRollouts

__all__ = [
    "GRPOPenaltyMixin",
    "LanguageBaselines",
    "LanguageFeatures",
    "SAEFeatureMonitorCallback",
    "SAEFeaturePenalty",
    "SAEFeatureReward",
    "SAEPenaltyMixin",
    "SteeredNegativeRollouts",
    "add_sae_penalty",
    "code_switching_reward",
    "estimate_language_baselines",
    "language_features",
    "repetition_features",
    "repetition_reward",
    "with_sae_penalty",
]
