"""qscope's TRL pieces under DeepSpeed ZeRO-3 through transformers' Trainer: ``python dist_zero3.py OUT PART``.

Run alone (one process, no DeepSpeed: the reference) or under ``torchrun --nproc_per_node 2`` (each trainer gets a
ZeRO stage-3 config, gloo on CPU, ``use_cpu=True``); the global batch is the same. ``PART`` is ``sft-lora`` or
``sft-full`` (one ``SFTTrainer`` step with the SASFT penalty and the monitor) or ``grpo`` (one ``GRPOTrainer`` step
with an SAE reward, and steered rollouts under ZeRO-3 generation), or ``all`` of them in turn. Rank 0 writes what
it measured to ``OUT/result.json``, one entry per part.
"""

import json
import os
import sys
from contextlib import nullcontext
from pathlib import Path

import torch
from datasets import Dataset
from peft import LoraConfig
from test_trl import GRPO_PROMPTS, SFT_DATA  # this script's folder is on sys.path

from qscope_hf.tiny import tiny_model, tiny_sae, tiny_tokenizer

out, part = Path(sys.argv[1]), sys.argv[2]
world = int(os.environ.get("WORLD_SIZE", "1"))
# README's ZeRO-3 config; SGD is an optimizer DeepSpeed does not know, and max_grad_norm=0 turns its "auto" clipping
# off, as in the reference run.
ZERO3 = {**json.loads((Path(__file__).parents[1] / "examples" / "ds_zero3.json").read_text()),
         "zero_allow_untested_optimizer": True}
common = {"output_dir": str(out / "run"), "use_cpu": True, "bf16": False, "report_to": "none", "logging_steps": 1,
          "save_strategy": "no", "seed": 0, "lr_scheduler_type": "constant", "optim": "sgd", "max_grad_norm": 0.0,
          "max_steps": 1, "deepspeed": ZERO3 if world > 1 else None}


def zero_stage(trainer) -> int | None:
    """The ZeRO stage the trainer's accelerator runs (None without DeepSpeed)."""
    plugin = trainer.accelerator.state.deepspeed_plugin
    return None if plugin is None else plugin.zero_stage


def partitioned(model: torch.nn.Module) -> bool:
    """Whether the model's weights are held as ZeRO-3 shards (empty tensors outside a forward)."""
    return any(hasattr(p, "ds_status") and p.numel() == 0 for p in model.parameters())


def full_parameters(model: torch.nn.Module, keep) -> dict[str, list]:
    """The named parameters ``keep(name)`` selects, gathered whole (ZeRO-3 holds a shard per rank)."""
    chosen = [(name, p) for name, p in model.named_parameters() if keep(name)]
    if world > 1:
        import deepspeed

        gathered = deepspeed.zero.GatheredParameters([p for _, p in chosen])
    else:
        gathered = nullcontext()
    with gathered:
        return {name: p.detach().clone().tolist() for name, p in chosen}


def sft(peft: bool) -> dict:
    from trl import SFTConfig, SFTTrainer

    from qscope_trl import SAEFeatureMonitorCallback, SAEFeaturePenalty, add_sae_penalty

    data = Dataset.from_dict(SFT_DATA)
    args = SFTConfig(per_device_train_batch_size=4 // world, learning_rate=0.5, **common)
    sae = tiny_sae(64, 256, 8, layer=1, seed=5)
    monitor = SAEFeatureMonitorCallback(sae, [3, 9, 100], log_every=1)
    trainer = SFTTrainer(model=tiny_model("qwen3"), args=args, train_dataset=data, processing_class=tiny_tokenizer(),
                         peft_config=LoraConfig(r=4, target_modules=["q_proj", "v_proj"]) if peft else None,
                         callbacks=[monitor])
    add_sae_penalty(trainer, SAEFeaturePenalty(sae, {"zh": [3, 9], "en": [100]}, coef=2.0))
    trained = ("lora_B",) if peft else ("layers.1.", "layers.0.self_attn")
    keep = lambda name: any(part in name for part in trained)  # noqa: E731
    before = full_parameters(trainer.model, keep)
    trainer.train()
    logged = next(entry for entry in trainer.state.log_history if "sae/penalty" in entry)
    model = trainer.model_wrapped.module if world > 1 else trainer.model
    return {"loss": logged["loss"], "logs": {k: v for k, v in logged.items() if k.startswith("sae/")},
            "before": before, "parameters": full_parameters(model, keep), "zero_stage": zero_stage(trainer),
            "partitioned": partitioned(model),
            "sae_partitioned": any(hasattr(p, "ds_status") for p in sae.parameters()),
            "sae_in_optimizer": any(p is q for group in trainer.optimizer.param_groups for p in group["params"]
                                    for q in sae.parameters())}


def grpo() -> dict:
    import torch.distributed as dist
    from trl import GRPOConfig, GRPOTrainer

    from qscope_hf import Steering
    from qscope_trl import SAEFeatureReward, SteeredNegativeRollouts

    sae = tiny_sae(64, 256, 8, layer=1, seed=5)
    model, tokenizer = tiny_model("qwen3"), tiny_tokenizer()
    sae_reward, seen = SAEFeatureReward(model, tokenizer, sae, [3, 9, 100], reduce="max"), []

    def task_reward(prompts, completions, completion_ids, steered, **kwargs):
        """Distinct tokens (the steered rollout repeats one); records each row with its SAE reward."""
        scores = sae_reward(prompts, completions, completion_ids, **kwargs)
        seen.extend(zip(prompts, [list(ids) for ids in completion_ids], steered, scores))
        return [float(len(set(ids))) for ids in completion_ids]

    args = GRPOConfig(per_device_train_batch_size=8 // world, num_generations=4, max_completion_length=8,
                      learning_rate=0.1, generation_kwargs={"do_sample": False}, **common)
    trainer = GRPOTrainer(model=model, args=args, processing_class=tokenizer,
                          reward_funcs=[sae_reward, task_reward],
                          train_dataset=Dataset.from_dict({"prompt": GRPO_PROMPTS}),
                          rollout_func=SteeredNegativeRollouts(Steering(sae, 9, 60.0)))
    keep = lambda name: "layers.1.mlp" in name  # noqa: E731
    before = full_parameters(trainer.model, keep)
    trainer.train()
    rows = [None] * world
    if world > 1:
        dist.all_gather_object(rows, seen)
    else:
        rows = [seen]
    logged = next(entry for entry in trainer.state.log_history if "rewards/task_reward/mean" in entry)
    policy = trainer.model_wrapped.module if world > 1 else trainer.model
    return {"rollouts": [row for rank_rows in rows for row in rank_rows],
            "logs": {k: v for k, v in logged.items() if k.startswith("rewards/") or k in ("loss", "reward")},
            "before": before, "parameters": full_parameters(policy, keep), "zero_stage": zero_stage(trainer),
            "partitioned": partitioned(policy)}


PARTS = {"sft-lora": lambda: sft(True), "sft-full": lambda: sft(False), "grpo": grpo}

if __name__ == "__main__":
    results = {name: run() for name, run in PARTS.items() if part in (name, "all")}
    if int(os.environ.get("RANK", "0")) == 0:
        (out / "result.json").write_text(json.dumps({"processes": world, **results}))
