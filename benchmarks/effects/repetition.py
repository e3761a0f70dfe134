"""Repetition under GRPO on SmolLM2 (paper §8): vanilla vs SAE-penalty reward vs steered negatives vs both.

    python benchmarks/effects/repetition.py [--quick] [--steps 16] [--seeds 0 1]
    python benchmarks/effects/repetition.py --render benchmarks/results/effects_repetition_full.json

Prompts ask SmolLM2 to continue texts that invite a loop ("Count with me: one, one, one,", "Le jour se lève et le
jour"), in English and French: 8 forms × 6 subjects, half for training and 24 held out (a subject is never in both
halves of one form). The task reward is the share of distinct tokens in the completion (a generic quality proxy,
unchanged across conditions). Same LoRA policy, steps, seeds and prompts for:

- vanilla GRPO (task reward only);
- GRPO + SAE-penalty reward (``repetition_reward``: minus the mean activation of the repetition features);
- GRPO + one steered negative rollout per group (``SteeredNegativeRollouts``: the top repetition feature amplified
  in the first rollout of each group; the reward is the task reward alone);
- both.

Repetition features are found once by ``repetition_features`` on SmolLM2's own looping outputs (layer 24) and shared
by every condition. Reported on the 24 held-out prompts, greedy, 48 new tokens: completions with a loop (a 4-token
n-gram at least 3 times), the task reward, the perplexity the trained policy assigns to the base model's own looping
completions (higher = moved away from those loops), and how many greedy completions differ from the base model's
(whether training was long enough to change outputs); mean and min–max over seeds.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

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
    positive,
    provenance,
    seed_spread,
    spread_cell,
    write_section,
)
from datasets import Dataset
from peft import LoraConfig
from trl import GRPOConfig, GRPOTrainer

from qscope_hf import Steering
from qscope_hf.discovery import residual_norm
from qscope_trl import SteeredNegativeRollouts, repetition_features, repetition_reward

os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
FORMS = ["Count with me: {0}, {0}, {0},", "The {0} falls and the {0} falls and the",
         "Tell me again and again about the {0}:", "Write the word {0} as many times as you can:",
         "Je pense au {1}, je pense au {1}, je pense",
         "Répète après moi : {1}, {1},", "Once upon a time there was a {0} who", "Le {1} et le {1} et le"]
SUBJECTS = [("rain", "vent"), ("cat", "chat"), ("song", "chant"), ("river", "fleuve"), ("star", "soleil"),
            ("door", "train")]
CONDITIONS = ("vanilla GRPO", "SAE-penalty reward", "steered negative rollout", "both")
MEASURES = ("loop_share", "task_reward", "loop_perplexity", "changed")


def starts() -> tuple[list[str], list[str]]:
    """Training and held-out text starts: for each form, subjects alternate between the two halves (the halves swap
    every form, so each subject is held out under half of the forms)."""
    train, held = [], []
    for f, form in enumerate(FORMS):
        for s, subject in enumerate(SUBJECTS):
            (train if (s + f) % 2 == 0 else held).append(form.format(*subject))
    return train, held


def questions(texts: list[str]) -> list[str]:
    return [f"Continue this text: {text}" for text in texts]


def distinct_ratio(completion_ids, **kwargs):
    return [len(set(ids)) / max(len(ids), 1) for ids in completion_ids]


def train(base, tokenizer, condition: str, prompts: list[str], sae, features, strength: float, seed: int,
          steps: int):
    """One GRPO run from a copy of ``base`` (LoRA r=16 on q/v)."""
    model = copy.deepcopy(base)
    rewards = [distinct_ratio]
    if condition in ("SAE-penalty reward", "both"):
        rewards.append(repetition_reward(model, tokenizer, sae, features[:8], coef=1.0))
    rollout = (SteeredNegativeRollouts(Steering(sae, features[0], strength), count=1)
               if condition in ("steered negative rollout", "both") else None)
    args = GRPOConfig(output_dir=tempfile.mkdtemp(), max_steps=steps, num_generations=4, per_device_train_batch_size=8,
                      max_completion_length=40, learning_rate=5e-4, seed=seed, use_cpu=True, bf16=False, report_to=[],
                      save_strategy="no", logging_steps=max(1, steps // 4), temperature=1.0,
                      lr_scheduler_type="constant")
    torch.manual_seed(seed)
    trainer = GRPOTrainer(model=model, reward_funcs=rewards, args=args, processing_class=tokenizer,
                          train_dataset=Dataset.from_dict({"prompt": [[{"role": "user", "content": p}]
                                                                      for p in prompts]}),
                          peft_config=LoraConfig(r=16, lora_alpha=32, target_modules=["q_proj", "v_proj"]),
                          rollout_func=rollout)
    trainer.train()
    return trainer.model.eval()


def summarise(results: dict) -> dict:
    """Mean, min and max over seeds of each measure, per condition."""
    return {name: seed_spread(records, MEASURES) for name, records in results.items()}


def separated(summary: dict, seeds: int, name: str, key: str, better: str) -> str:
    """Whether ``name`` beats vanilla GRPO on ``key``, and whether beyond the seed spread (its worst seed better than
    vanilla's best seed)."""
    if key not in summary[name]:
        return "not measured (no held-out prompt loops before training)"
    ours, vanilla = summary[name][key], summary["vanilla GRPO"][key]
    if better == "lower":
        beyond, direction = ours["max"] < vanilla["min"], ours["mean"] < vanilla["mean"]
    else:
        beyond, direction = ours["min"] > vanilla["max"], ours["mean"] > vanilla["mean"]
    if not direction:
        return "not better"
    if seeds < 2:
        return "better (one seed: no spread to compare with)"
    return "better, beyond the seed spread" if beyond else "better on average, within the seed spread"


def render(record: dict, write: bool) -> None:
    summary = record.get("summary") or summarise({name: rs for name, rs in record["results"].items() if rs})

    def cell(name: str, key: str, digits: int) -> str:
        if key not in summary[name]:
            return "—"
        return spread_cell(summary[name][key], digits)

    rows = "\n".join(f"| {name} | {cell(name, 'loop_share', 2)} | {cell(name, 'task_reward', 3)} | "
                     f"{cell(name, 'loop_perplexity', 3)} | {cell(name, 'changed', 0)} |" for name in summary)

    def against(name: str, key: str, better: str) -> str:
        return separated(summary, len(record["seeds"]), name, key, better)

    verdicts = "\n".join(
        f"- {name}: loops {against(name, 'loop_share', 'lower')}; perplexity of the base model's loops "
        f"{against(name, 'loop_perplexity', 'higher')}; task reward "
        f"{against(name, 'task_reward', 'higher')}." for name in CONDITIONS[1:])
    held = record["held_out"]
    title = f"Repetition: {record['steps']} GRPO steps, {held} held-out prompts, seeds {record['seeds']}"
    write_section(f"repetition-{record['tag']}", f"""### {title}

{record['provenance']}. LoRA r=16 on q/v, lr 5e-4 (constant), 2 prompts × 4 rollouts per step, 40 new tokens; repetition
features {record['features'][:4]}… at layer {record['layer']} (from {record['looping_seed_outputs']} looping outputs of
the base model); the steered negative amplifies feature {record['features'][0]} at strength
{record['steering_strength']:.0f} ({STRENGTH_OF_NORM} × the median residual norm). Cells: mean over seeds (min–max);
"changed": held-out greedy completions (of {held}) that differ from the base model's. Whole study
{record['seconds'] / 60:.0f} min.

| condition | completions with a loop | task reward (distinct tokens) | perplexity of the base model's loops | changed |
|---|---|---|---|---|
{rows}

Against vanilla GRPO (beyond the seed spread = every seed of the method better than every seed of vanilla):
{verdicts}
""", write)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    add_output_options(parser)
    parser.add_argument("--steps", type=positive(int), default=None,
                        help="GRPO steps per run (default 3 quick, 16 full)")
    parser.add_argument("--seeds", type=int, nargs="+", default=None)
    parser.add_argument("--render", type=Path, default=None, help="rewrite the RESULTS.md section from a JSON record")
    args = parser.parse_args()
    if args.render:
        render(json.loads(args.render.read_text()), not args.no_write)
        return
    start = time.time()
    steps = args.steps or (3 if args.quick else 16)
    seeds = args.seeds or ([0] if args.quick else [0, 1])
    model, tokenizer = load_model()
    sae = load_saes([24])[0]
    train_starts, held_starts = starts()
    if args.quick:
        train_starts, held_starts = train_starts[:8], held_starts[:8]
    train_prompts = questions(train_starts)
    held_prompts = chat_prompts(tokenizer, questions(held_starts))
    outputs, ids = generate(model, tokenizer, chat_prompts(tokenizer, train_prompts) + held_prompts,
                            max_new_tokens=48)
    looping = [text for text, row in zip(outputs, ids) if has_loop(row)]
    degenerate = looping or [text + " " + " ".join([text] * 4) for text in train_starts[:4]]
    features = [f for f, _ in repetition_features(model, tokenizer, sae, degenerate, top=16)]
    strength = STRENGTH_OF_NORM * residual_norm(model, tokenizer, sae.layer, outputs)
    base_held = ids[len(train_prompts):]
    held_loops = [(prompt, text) for prompt, text, row in zip(held_prompts, outputs[len(train_prompts):], base_held)
                  if has_loop(row)]

    def evaluate(policy) -> dict:
        texts, rows = generate(policy, tokenizer, held_prompts, max_new_tokens=48, batch_size=24)
        return {"loop_share": sum(map(has_loop, rows)) / len(rows),
                "task_reward": statistics.mean(distinct_ratio(rows)),
                "loop_perplexity": perplexity(policy, tokenizer, *map(list, zip(*held_loops))) if held_loops else None,
                "changed": sum(row != base for row, base in zip(rows, base_held)), "example": texts[0]}

    tag = "quick" if args.quick else "full"
    record = {"tag": tag, "provenance": provenance(args.quick), "layer": sae.layer, "features": features,
              "steering_strength": strength, "looping_seed_outputs": len(looping), "steps": steps, "seeds": seeds,
              "held_out": len(held_prompts)}
    results = {"before training": [{"seed": None, **evaluate(model)}]} | {condition: [] for condition in CONDITIONS}
    args.results.mkdir(parents=True, exist_ok=True)
    for seed in seeds:  # seeds outermost: an interrupted run still has every condition for the seeds it finished
        for condition in CONDITIONS:
            trained = train(model, tokenizer, condition, train_prompts, sae, features, strength, seed, steps)
            results[condition].append({"seed": seed, **evaluate(trained)})
            print(f"{condition}, seed {seed}: {results[condition][-1]} ({time.time() - start:.0f} s)", flush=True)
            record |= {"results": results, "seconds": round(time.time() - start)}
            (args.results / f"effects_repetition_{tag}.json").write_text(json.dumps(record, indent=2,
                                                                                   ensure_ascii=False))
    record["summary"] = summarise(results)
    (args.results / f"effects_repetition_{tag}.json").write_text(json.dumps(record, indent=2, ensure_ascii=False))
    render(record, not args.no_write)


if __name__ == "__main__":
    main()
