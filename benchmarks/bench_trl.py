"""TRL step time with qscope's additions ÷ without, same run, same data:

- LoRA SFT step with the SASFT penalty (two layers) ÷ plain LoRA SFT            (target <= 1.03)
- GRPO step with an SAE reward added ÷ the task reward alone                     (target <= 1.10)
- GRPO step with one steered negative rollout per group ÷ vanilla GRPO

    python benchmarks/bench_trl.py [--steps 8] [--rounds 3] [--out results.json]

Model: a 135M-parameter Llama built from SmolLM2-135M's configuration (random weights), LoRA r=8 on q/v; SAEs of
width 16 × 576 at layers 20 and 21. Each configuration runs `rounds` times, alternating, `steps` optimizer steps
each after one warm-up step; the median step time (between the trainer's step-begin and step-end callbacks) is
reported.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from bench_steering import SMOLLM2_135M
from datasets import Dataset
from peft import LoraConfig
from transformers import LlamaConfig, LlamaForCausalLM, TrainerCallback
from trl import GRPOConfig, GRPOTrainer, SFTConfig, SFTTrainer

from qscope_hf import Steering
from qscope_hf.tiny import tiny_sae, tiny_tokenizer
from qscope_trl import SAEFeaturePenalty, SAEFeatureReward, SteeredNegativeRollouts, add_sae_penalty

os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
LAYERS = (20, 21)


class StepTimer(TrainerCallback):
    def __init__(self):
        self.times, self._start = [], None

    def on_step_begin(self, args, state, control, **kwargs):
        self._start = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        self.times.append(time.perf_counter() - self._start)


def model():
    torch.manual_seed(0)
    config = LlamaConfig(**{**SMOLLM2_135M, "vocab_size": 259, "eos_token_id": 256, "pad_token_id": 256})
    return LlamaForCausalLM(config)


def saes():
    return [tiny_sae(576, 16 * 576, 32, layer=layer, seed=layer) for layer in LAYERS]


def lora():
    return LoraConfig(r=8, target_modules=["q_proj", "v_proj"])


def sft_run(penalty: bool, steps: int) -> list[float]:
    words = "the quick brown fox jumps over the lazy dog while seven small birds sing".split()
    data = Dataset.from_dict({"prompt": [" ".join(words[i % 5:]) for i in range(64)],
                              "completion": [" ".join(words[: 6 + i % 6]) * 3 for i in range(64)],
                              "language": ["en", "zh"] * 32})
    timer = StepTimer()
    args = SFTConfig(output_dir=tempfile.mkdtemp(), max_steps=steps + 1, per_device_train_batch_size=8,
                     use_cpu=True, bf16=False, report_to="none", save_strategy="no", logging_steps=1000)
    trainer = SFTTrainer(model=model(), args=args, train_dataset=data, processing_class=tiny_tokenizer(),
                         peft_config=lora(), callbacks=[timer])
    if penalty:
        add_sae_penalty(trainer, SAEFeaturePenalty(saes(), {"zh": list(range(64))}, coef=5e-4))
    trainer.train()
    return timer.times[1:]


def grpo_run(mode: str, steps: int) -> list[float]:
    policy = model()
    tokenizer = tiny_tokenizer()

    def task(completion_ids, **kwargs):
        return [len(set(ids)) / max(len(ids), 1) for ids in completion_ids]

    rewards = [task]
    rollout = None
    if mode == "sae_reward":
        rewards.append(SAEFeatureReward(policy, tokenizer, saes()[0], list(range(64))))
    if mode == "steered":
        rollout = SteeredNegativeRollouts(Steering(saes()[0], 5, 8.0))
    timer = StepTimer()
    args = GRPOConfig(output_dir=tempfile.mkdtemp(), max_steps=steps + 1, num_generations=4,
                      per_device_train_batch_size=8, max_completion_length=32, use_cpu=True, bf16=False,
                      report_to=[], save_strategy="no", logging_steps=1000)
    prompts = Dataset.from_dict({"prompt": ["Once upon a time", "The answer is", "In the morning", "My friend"] * 16})
    trainer = GRPOTrainer(model=policy, reward_funcs=rewards, args=args, train_dataset=prompts,
                          processing_class=tokenizer, peft_config=lora(), rollout_func=rollout, callbacks=[timer])
    trainer.train()
    return timer.times[1:]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    runs = {"sft": lambda: sft_run(False, args.steps), "sft+penalty": lambda: sft_run(True, args.steps),
            "grpo": lambda: grpo_run("vanilla", args.steps),
            "grpo+sae_reward": lambda: grpo_run("sae_reward", args.steps),
            "grpo+steered": lambda: grpo_run("steered", args.steps)}
    times = {name: [] for name in runs}
    for _ in range(args.rounds):
        for name, run in runs.items():
            times[name] += run()
            print(f"{name}: median step {statistics.median(times[name]):.3f} s over {len(times[name])} steps",
                  flush=True)
    median = {name: statistics.median(t) for name, t in times.items()}
    ratios = {"sft+penalty ÷ sft": median["sft+penalty"] / median["sft"],
              "grpo+sae_reward ÷ grpo": median["grpo+sae_reward"] / median["grpo"],
              "grpo+steered ÷ grpo": median["grpo+steered"] / median["grpo"]}
    print("\n| run | median step s |\n|---|---|")
    for name, value in median.items():
        print(f"| {name} | {value:.3f} |")
    print("\n| ratio | value |\n|---|---|")
    for name, value in ratios.items():
        print(f"| {name} | {value:.3f} |")
    if args.out:
        machine = f"{platform.machine()}, {torch.get_num_threads()} threads"
        args.out.write_text(json.dumps({
            "machine": machine, "date": datetime.date.today().isoformat(), "command": " ".join(sys.argv),
            "median_step_s": median, "ratios": ratios, "step_times": times}, indent=2))


if __name__ == "__main__":
    main()
