"""Repetition effect on SmolLM2 (paper §8): a short GRPO run, vanilla vs SAE-penalty reward vs steered negatives.

    python benchmarks/effects/repetition.py [--quick] [--steps 16] [--seeds 0 1]

Prompts ask SmolLM2 to continue texts (English and French), where it sometimes falls into loops. The task reward
is the share of distinct tokens in the completion (a generic quality proxy, unchanged across conditions). Same
LoRA policy, steps, seeds and prompts for:

- vanilla GRPO (task reward only);
- GRPO + SAE-penalty reward (``repetition_reward``: minus the mean activation of the repetition features);
- GRPO + one steered negative rollout per group (``SteeredNegativeRollouts``: the top repetition feature amplified
  in the first rollout of each group; the reward is the task reward alone).

Repetition features are found by ``repetition_features`` on SmolLM2's own looping outputs. Reported: the share
of held-out completions with a loop (a 4-token n-gram at least 3 times), the mean task reward, and the
perplexity the trained policy assigns to the base model's own looping completions of the held-out prompts (a
continuous measure: higher means the policy moved away from those loops).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile

import torch
from common import (
    STRENGTH_OF_NORM,
    add_output_options,
    chat_prompts,
    generate,
    has_loop,
    load_model,
    load_saes,
    perplexity,
    provenance,
    write_section,
)
from datasets import Dataset
from peft import LoraConfig
from trl import GRPOConfig, GRPOTrainer

from qscope_hf import Steering
from qscope_hf.discovery import residual_norm
from qscope_trl import SteeredNegativeRollouts, repetition_features, repetition_reward

os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
STARTS = ["Il était une fois un petit chat qui", "The list of things I love: cats, cats,", "Je pense que je pense que",
          "Once upon a time there was a king who", "Répète après moi : bonjour, bonjour,", "The end. The end. The end.",
          "Continue the song: la la la", "Mon ami m'a dit que", "Write the same word again and again: yes",
          "Le jour se lève et le jour", "Count with me: one, one, one,", "Nous allons à la plage et nous allons",
          "The rain falls and the rain falls", "Un deux trois, un deux trois,", "Tell me again and again that",
          "C'est la vie, c'est la vie,"]


def continuation_questions(starts: list[str]) -> list[str]:
    return [f"Continue this text: {start}" for start in starts]


def distinct_ratio(completion_ids, **kwargs):
    return [len(set(ids)) / max(len(ids), 1) for ids in completion_ids]


def train(condition: str, prompts: list[str], sae, features, strength: float, seed: int, steps: int):
    model, tokenizer = load_model()
    rewards = [distinct_ratio]
    rollout = None
    if condition == "SAE-penalty reward":
        rewards.append(repetition_reward(model, tokenizer, sae, features[:8], coef=1.0))
    if condition == "steered negative rollout":
        rollout = SteeredNegativeRollouts(Steering(sae, features[0], strength), count=1)
    args = GRPOConfig(output_dir=tempfile.mkdtemp(), max_steps=steps, num_generations=4, per_device_train_batch_size=8,
                      max_completion_length=40, learning_rate=2e-4, seed=seed, use_cpu=True, bf16=False, report_to=[],
                      save_strategy="no", logging_steps=max(1, steps // 4), temperature=1.0)
    torch.manual_seed(seed)
    trainer = GRPOTrainer(model=model, reward_funcs=rewards, args=args, processing_class=tokenizer,
                          train_dataset=Dataset.from_dict({"prompt": [[{"role": "user", "content": p}]
                                                                      for p in prompts]}),
                          peft_config=LoraConfig(r=16, lora_alpha=32, target_modules=["q_proj", "v_proj"]),
                          rollout_func=rollout)
    trainer.train()
    return trainer.model.eval(), tokenizer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    add_output_options(parser)
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--seeds", type=int, nargs="+", default=None)
    args = parser.parse_args()
    steps = args.steps or (4 if args.quick else 16)
    seeds = args.seeds or ([0] if args.quick else [0, 1])
    model, tokenizer = load_model()
    sae = load_saes()[-1]
    train_starts, held_starts = STARTS[::2], STARTS[1::2]
    outputs, ids = generate(model, tokenizer, chat_prompts(tokenizer, continuation_questions(STARTS)),
                            max_new_tokens=48)
    looping = [text for text, row in zip(outputs, ids) if has_loop(row)]
    degenerate = looping or [start + " " + " ".join([start] * 4) for start in STARTS[:4]]
    features = [f for f, _ in repetition_features(model, tokenizer, sae, degenerate, top=16)]
    strength = STRENGTH_OF_NORM * residual_norm(model, tokenizer, sae.layer, outputs)
    held_prompts = chat_prompts(tokenizer, continuation_questions(held_starts))
    held_loops = [(prompt, text) for prompt, text, row in zip(held_prompts, outputs[1::2], ids[1::2])
                  if has_loop(row)]
    del model

    def evaluate(model):
        texts, rows = generate(model, tokenizer, held_prompts, max_new_tokens=48)
        return {"repeat_ratio": sum(map(has_loop, rows)) / len(rows),
                "task_reward": statistics.mean(distinct_ratio(rows)),
                "loop_perplexity": perplexity(model, tokenizer, *map(list, zip(*held_loops))) if held_loops else None,
                "example": texts[0]}

    base, _ = load_model()
    results = {"before training": [evaluate(base)]}
    del base
    for condition in ("vanilla GRPO", "SAE-penalty reward", "steered negative rollout"):
        results[condition] = []
        for seed in seeds:
            trained, _ = train(condition, continuation_questions(train_starts), sae, features, strength,
                                seed, steps)
            results[condition].append({"seed": seed, **evaluate(trained)})
            print(f"{condition}, seed {seed}: {results[condition][-1]}", flush=True)
    summary = {name: {key: statistics.mean(r[key] for r in rs) if held_loops or key != "loop_perplexity" else None
                      for key in ("repeat_ratio", "task_reward", "loop_perplexity")} for name, rs in results.items()}
    args.results.mkdir(parents=True, exist_ok=True)
    tag = "quick" if args.quick else "full"
    (args.results / f"effects_repetition_{tag}.json").write_text(json.dumps(
        {"layer": sae.layer, "features": features, "steering_strength": strength, "looping_seed_outputs": len(looping),
         "steps": steps,
         "seeds": seeds, "results": results, "summary": summary}, indent=2, ensure_ascii=False))
    rows = "\n".join(f"| {name} | {s['repeat_ratio']:.2f} | {s['task_reward']:.3f} | {s['loop_perplexity'] or 0:.3f} |"
                     for name, s in summary.items())
    vanilla = summary["vanilla GRPO"]["repeat_ratio"]
    verdict = " ".join(
        f"{name}: {'fewer' if summary[name]['repeat_ratio'] < vanilla else 'not fewer'} looping completions than "
        f"vanilla GRPO ({summary[name]['repeat_ratio']:.2f} vs {vanilla:.2f})."
        for name in ("SAE-penalty reward", "steered negative rollout"))
    write_section(f"repetition-{tag}", f"""### Repetition: {steps} GRPO steps, {len(held_starts)} held-out prompts

{provenance(args.quick)}. LoRA r=16 on q/v, 4 rollouts per prompt, 40 new tokens, seeds {seeds}; repetition
features {features[:4]}… at layer {sae.layer} (from {len(looping)} looping outputs of the base model); the steered
negative amplifies feature {features[0]} at strength {strength:.0f} ({STRENGTH_OF_NORM} × the median residual norm).

| condition | completions with a loop | task reward (distinct-token share) | perplexity of the base model's loops |
|---|---|---|---|
{rows}

{verdict} {len(held_starts)} prompts and {len(seeds)} seeds are a small sample: differences of one or two
completions are within noise.
""", not args.no_write)


if __name__ == "__main__":
    main()
