"""Paper §8: one SAE-steered negative rollout per GRPO group, as a ``rollout_func`` for ``GRPOTrainer``.

``GRPOTrainer(..., rollout_func=SteeredNegativeRollouts(Steering(sae, repetition_feature, 8.0)))`` generates every
group of ``num_generations`` completions in one ``generate`` call where the first ``count`` rows of each group are
steered (per-row steering of :class:`qscope_hf.SAELogitsProcessor`) and the others are not. The task reward is
unchanged: the steered (e.g. repetitive) rollout earns a low reward and so a negative advantage.

Log-probabilities, on the transformers path (``use_vllm=False``): the rollout returns none (``logprobs=None``), so the
loss uses the log-probabilities that ``GRPOTrainer`` computes with the *unsteered* policy on all tokens, steered ones
included; the steering hooks exist only inside the ``generate`` call. A boolean ``steered`` column reaches the reward
functions as a keyword argument.

With ``use_vllm=True`` (``vllm_mode="colocate"``; server mode is refused: its engine is in another process) the
unsteered rollouts come from the trainer's vLLM engine with their sampling log-probabilities, which TRL's
importance-sampling correction compares with the trainer's own (the vLLM/trainer mismatch it exists for). The
steered rollouts come from that engine under :func:`qscope_hf.vllm.steered` when it runs eagerly (an ``LLM`` created
with ``enforce_eager=True``), else from transformers' ``generate`` on the trainer's model, as without vLLM (TRL's
own colocate engine is compiled). Their log-probabilities are returned as ``None``, which TRL reads as "no
correction" (ratio 1): a steered rollout is deliberately not a sample of the policy, and weighting it by
``π_θ / π_steered`` would shrink exactly the tokens the steering made likely (the ones it is meant to penalise)
towards zero weight, so it is trained as on the transformers path.

``GRPOTrainer`` passes the rollout function each process's prompts with every prompt repeated ``num_generations``
times in a row (checked here).
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
        if getattr(trainer, "use_vllm", False) and getattr(trainer, "vllm_mode", "colocate") != "colocate":
            raise ConfigError(
                f"SteeredNegativeRollouts with use_vllm=True needs vllm_mode='colocate': in {trainer.vllm_mode!r} "
                f"mode the engine runs in another process, where qscope cannot steer it (and its steered rows could "
                f"not come from the trainer's model either). Use vllm_mode='colocate' or use_vllm=False")

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
        prompt_ids = tokenize_prompts(self._tokenizer(trainer), prompts)
        flags = self.steered_rows(len(prompts), group)
        if getattr(trainer, "use_vllm", False):
            completion_ids, logprobs = self._vllm_rollouts(trainer, prompt_ids, flags, group)
        else:
            rows = [self.steerings if on else None for on in flags]
            completion_ids, logprobs = self._transformers_rollouts(trainer, prompt_ids, rows), None
        return {"prompt_ids": prompt_ids, "completion_ids": completion_ids, "logprobs": logprobs, "steered": flags}

    @staticmethod
    def _tokenizer(trainer: Any) -> Any:
        return getattr(trainer.processing_class, "tokenizer", trainer.processing_class)  # processors wrap one

    def _transformers_rollouts(self, trainer: Any, prompt_ids: list[list[int]], rows: list[Any]) -> list[list[int]]:
        """Completions of ``prompt_ids`` from the trainer's model, row ``i`` steered with ``rows[i]`` (or not)."""
        device = trainer.accelerator.device
        length = max(len(ids) for ids in prompt_ids)
        input_ids, attention_mask = pad_token_ids(prompt_ids, self._tokenizer(trainer).pad_token_id, side="left")
        with unwrap_model_for_generation(trainer.model_wrapped, trainer.accelerator) as model, torch.no_grad():
            processor = SAELogitsProcessor(model, rows=rows)
            output = model.generate(input_ids=input_ids.to(device), attention_mask=attention_mask.to(device),
                                    generation_config=trainer.generation_config, logits_processor=[processor])
        completion_ids = []
        eos = set(trainer.eos_token_ids)
        for row in output[:, length:].tolist():
            end = next((i + 1 for i, token in enumerate(row) if token in eos), len(row))
            completion_ids.append(row[:end])
        return completion_ids

    def _vllm_rollouts(self, trainer: Any, prompt_ids: list[list[int]], flags: list[bool],
                       group: int) -> tuple[list[list[int]], list[list[float | None]]]:
        """Completions and sampling log-probabilities: unsteered rows from the trainer's vLLM engine; steered rows
        from that engine under qscope's hooks when it runs eagerly, else from the trainer's model. Steered rows get
        ``None`` log-probabilities, which TRL reads as "no importance-sampling correction" (ratio 1)."""
        from qscope_hf.errors import UnsupportedError
        from qscope_hf.vllm import check_engine, steered

        generation = trainer.vllm_generation
        completions: list[list[int]] = [[] for _ in flags]
        logprobs: list[list[float | None]] = [[] for _ in flags]
        plain = [i for i, on in enumerate(flags) if not on]
        chosen = [i for i, on in enumerate(flags) if on]
        if plain:
            _, ids, top, _ = generation.generate([prompt_ids[i] for i in plain], None, group)
            for i, row, row_logprobs in zip(plain, ids, top, strict=True):
                completions[i], logprobs[i] = list(row), [token[0] for token in row_logprobs]
        if chosen:
            try:
                check_engine(generation.llm)
                inside = True
            except UnsupportedError:
                inside = False
            if inside:
                with steered(generation.llm, self.steerings):
                    _, ids, _, _ = generation.generate([prompt_ids[i] for i in chosen], None, group)
            else:
                ids = self._transformers_rollouts(trainer, [prompt_ids[i] for i in chosen],
                                                  [self.steerings] * len(chosen))
            for i, row in zip(chosen, ids, strict=True):
                completions[i], logprobs[i] = list(row), [None] * len(row)
        return completions, logprobs
