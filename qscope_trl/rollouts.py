"""Paper §8: one SAE-steered negative rollout per GRPO group, as a ``rollout_func`` for ``GRPOTrainer``.

``GRPOTrainer(..., rollout_func=SteeredNegativeRollouts(Steering(sae, repetition_feature, 8.0)))`` generates every
group of ``num_generations`` completions in one ``generate`` call where the first ``count`` rows of each group are
steered (per-row steering of :class:`qscope_hf.SAELogitsProcessor`) and the others are not. The task reward is
unchanged: the steered (e.g. repetitive) rollout earns a low reward and so a negative advantage.

Log-probabilities: the rollout returns none (``logprobs=None``), so the loss uses the log-probabilities that
``GRPOTrainer`` computes with the *unsteered* policy on all tokens, steered ones included; the steering hooks exist
only inside the ``generate`` call. A boolean ``steered`` column reaches the reward functions as a keyword argument.

``GRPOTrainer`` passes the rollout function each process's prompts with every prompt repeated ``num_generations``
times in a row (checked here); it runs on the transformers generation path. With ``use_vllm=True`` it refuses with
a clear error: vLLM's engine does not run qscope's hooks, and TRL's importance-sampling correction for vLLM rollouts
needs sampling log-probabilities that a transformers rollout does not provide.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from trl.models import unwrap_model_for_generation

from qscope_hf.corpus import pad_token_ids
from qscope_hf.errors import ConfigError
from qscope_hf.steering import SAELogitsProcessor, Steering, steering_list
from qscope_hf.validation import finite, non_negative_int, positive_int

from .rewards import tokenize_prompts


class SteeredNegativeRollouts:
    """A ``rollout_func`` that steers ``count`` rollouts of every group with ``steering``.

    ``probability`` (optional) steers a group's ``count`` rollouts only with that probability (seeded by ``seed``).
    """

    def __init__(self, steering: Steering | Sequence[Steering], *, count: int = 1, probability: float | None = None,
                 seed: int = 0, num_generations: int | None = None) -> None:
        self.steerings = steering_list(steering)
        if not self.steerings:
            raise ConfigError("SteeredNegativeRollouts needs at least one Steering spec")
        non_negative_int("count", count)
        if probability is not None and not 0.0 <= finite("probability", probability) <= 1.0:
            raise ConfigError(f"probability must be in [0, 1], got {probability}")
        if num_generations is not None:
            self._check_fits(count, positive_int("num_generations", num_generations))
        self.count, self.probability = count, probability
        self.generator = torch.Generator().manual_seed(seed)
        self.__name__ = "steered_negative_rollouts"

    def attach(self, trainer: Any) -> Any:
        """Use this as ``trainer``'s rollout function, after checking that ``count`` fits its groups (training and
        evaluation) and that the trainer generates with transformers; returns ``trainer``. Equivalent to
        ``GRPOTrainer(..., rollout_func=self)`` plus those checks."""
        self._check_backend(trainer)
        for group in {trainer.num_generations, getattr(trainer, "num_generations_eval", None)} - {None}:
            self._check_fits(self.count, group)
        trainer.rollout_func = self
        return trainer

    @staticmethod
    def _check_fits(count: int, group: int) -> None:
        """A group must keep at least one unsteered rollout: the steered ones are negatives relative to it."""
        if count >= group:
            raise ConfigError(f"count={count} steered rollouts in groups of {group} generations leave no unsteered "
                              f"rollout to compare with: use count < num_generations")

    @staticmethod
    def _check_backend(trainer: Any) -> None:
        if getattr(trainer, "use_vllm", False):
            raise ConfigError(
                "SteeredNegativeRollouts steers transformers' generate on the trainer's own model (that is where "
                "qscope's hooks run); with use_vllm=True TRL expects rollouts from vLLM, whose engine these hooks do "
                "not reach, and their sampling log-probabilities for its importance-sampling correction. Use "
                "use_vllm=False (server and colocate vLLM modes are not supported). Steering inside vLLM needs a "
                "steering-capable engine such as the EasySteer fork, which reads the control-vector files that "
                "qscope_hf.export.export_control_vector writes (add mode, every position, one spec for all rows)")

    def steered_rows(self, n_rows: int, group: int) -> list[bool]:
        """Which rows of a batch of ``n_rows`` (groups of ``group`` consecutive rows) are steered."""
        self._check_fits(self.count, group)
        flags = []
        for _ in range(n_rows // group):
            on = self.probability is None or float(torch.rand((), generator=self.generator)) < self.probability
            flags += [on and i < self.count for i in range(group)]
        return flags

    def __call__(self, prompts: list[Any], trainer: Any) -> dict[str, Any]:
        self._check_backend(trainer)
        group = trainer.num_generations if trainer.model.training else trainer.num_generations_eval
        if len(prompts) % group:
            raise ConfigError(f"{len(prompts)} prompts do not split into groups of {group}")
        for i, prompt in enumerate(prompts):
            if prompt != prompts[i - i % group]:
                raise ConfigError(f"prompt {i} differs from the first of its group: GRPOTrainer is expected to pass "
                                  f"each prompt {group} times in a row")
        tokenizer = getattr(trainer.processing_class, "tokenizer", trainer.processing_class)  # processors wrap one
        prompt_ids = tokenize_prompts(tokenizer, prompts)
        flags = self.steered_rows(len(prompts), group)
        device = trainer.accelerator.device
        length = max(len(ids) for ids in prompt_ids)
        input_ids, attention_mask = pad_token_ids(prompt_ids, tokenizer.pad_token_id, side="left")
        with unwrap_model_for_generation(trainer.model_wrapped, trainer.accelerator) as model, torch.no_grad():
            processor = SAELogitsProcessor(model, rows=[self.steerings if on else None for on in flags])
            output = model.generate(input_ids=input_ids.to(device), attention_mask=attention_mask.to(device),
                                    generation_config=trainer.generation_config, logits_processor=[processor])
        completion_ids = []
        eos = set(trainer.eos_token_ids)
        for row in output[:, length:].tolist():
            end = next((i + 1 for i, token in enumerate(row) if token in eos), len(row))
            completion_ids.append(row[:end])
        return {"prompt_ids": prompt_ids, "completion_ids": completion_ids, "logprobs": None, "steered": flags}
