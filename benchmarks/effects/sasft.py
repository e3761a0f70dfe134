"""SASFT effect on SmolLM2 (paper §7): LoRA SFT on French answers, with and without the SAE penalty.

    python benchmarks/effects/sasft.py [--quick] [--lam 0.05] [--seeds 0 1 2] [--steps 30]

Task: French questions should get French answers, while SmolLM2-135M tends to drift into English. The SFT data
are French questions paired with French answers (SmolLM2's own answers under a "reply in French" instruction
when they are French, else French paragraphs of the shipped contrast corpus). Both runs use the same data, LoRA
configuration, steps and seeds; the penalised run adds the SAE penalty on the English features of the shipped
SAEs' layers (from ``language_features`` over the contrast corpus, baselines from
``estimate_language_baselines``) for these French samples.

Reported per seed and on average: the code-switching ratio on held-out French questions (4 sampled answers per
question at temperature 0.8; an answer code-switches when at least 10 % of its words are English stop words), the
held-out next-token loss on French answers, and the English-feature excess the penalty targets on those answers;
the model before training is the reference. Target: ≥ 50 % fewer code-switched
answers than plain SFT at ≤ 2 % loss change.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import tempfile

import torch
from common import (
    add_output_options,
    chat_prompts,
    contrast_texts,
    generate,
    has_english,
    is_french,
    load_model,
    load_saes,
    provenance,
    write_section,
)
from datasets import Dataset
from peft import LoraConfig
from trl import SFTConfig, SFTTrainer

from qscope_hf import capture_layers
from qscope_trl import SAEFeaturePenalty, add_sae_penalty, estimate_language_baselines, language_features

TOPICS = ["la pluie", "les chats", "la musique", "le café", "la mer", "les livres", "le vélo", "la montagne",
          "le pain", "les étoiles", "le jardin", "la ville", "le train", "l'hiver", "les oiseaux", "le cinéma",
          "la cuisine", "le sport", "les fleurs", "la forêt", "le soleil", "la bibliothèque", "les vacances",
          "le marché"]
FORMS = ["Parle-moi de {}.", "Décris {} en deux phrases.", "Que penses-tu de {} ?"]
INSTRUCTION = " Réponds uniquement en français."
SAMPLES = 4  # sampled answers per held-out question (temperature 0.8): code-switching is a sampling event


def questions() -> tuple[list[str], list[str]]:
    items = [form.format(topic) for topic in TOPICS for form in FORMS]
    random.Random(0).shuffle(items)
    return items[:48], items[48:]


def french_answers(model, tokenizer, asked: list[str], fallback: list[str]) -> list[str]:
    torch.manual_seed(0)
    answers, _ = generate(model, tokenizer, chat_prompts(tokenizer, [q + INSTRUCTION for q in asked]),
                          max_new_tokens=48, do_sample=True, temperature=0.7, top_p=0.9)
    spare = iter(fallback)
    return [a if is_french(a) and not has_english(a) else next(spare)[:240] for a in answers]


def conversations(asked: list[str], answers: list[str]) -> Dataset:
    return Dataset.from_dict({"prompt": [[{"role": "user", "content": q}] for q in asked],
                              "completion": [[{"role": "assistant", "content": a}] for a in answers],
                              "language": ["fr"] * len(asked)})


def run(data: Dataset, penalty: SAEFeaturePenalty | None, seed: int, steps: int):
    model, tokenizer = load_model()
    args = SFTConfig(output_dir=tempfile.mkdtemp(), max_steps=steps, per_device_train_batch_size=8,
                     learning_rate=2e-4, seed=seed, use_cpu=True, bf16=False, report_to="none", save_strategy="no",
                     logging_steps=max(1, steps // 4), lr_scheduler_type="constant")
    torch.manual_seed(seed)
    trainer = SFTTrainer(model=model, args=args, train_dataset=data, processing_class=tokenizer,
                         peft_config=LoraConfig(r=16, lora_alpha=32, target_modules=["q_proj", "k_proj", "v_proj",
                                                                                    "o_proj"]))
    if penalty is not None:
        add_sae_penalty(trainer, penalty)
    trainer.train()
    logged = [entry["sae/penalty"] for entry in trainer.state.log_history if "sae/penalty" in entry]
    return trainer.model.eval(), tokenizer, logged


@torch.no_grad()
def held_out_measures(model, tokenizer, data: Dataset, penalty: SAEFeaturePenalty) -> tuple[float, float]:
    """Teacher-forced on the held-out French answers: next-token loss, and the English-feature excess the penalty
    targets (mean ReLU(f − α_fr) over answer tokens and penalised features)."""
    total, count, excess, pairs = 0.0, 0, 0.0, 0
    french = penalty.language_ids(["fr"])
    for prompt, completion in zip(data["prompt"], data["completion"]):
        context = tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
        full = tokenizer.apply_chat_template(prompt + completion, tokenize=False)
        start = len(tokenizer(context, add_special_tokens=False)["input_ids"])
        ids = torch.tensor([tokenizer(full, add_special_tokens=False)["input_ids"]])
        with capture_layers(model, penalty.layers) as hidden:
            logits = model(input_ids=ids).logits[0, :-1]
        losses = torch.nn.functional.cross_entropy(logits, ids[0, 1:], reduction="none")[start - 1:]
        total += float(losses.sum())
        count += len(losses)
        answer = torch.zeros_like(ids, dtype=torch.bool)
        answer[:, start:] = True
        part, n = penalty.sums(hidden, answer, french)
        excess += float(part)
        pairs += int(n)
    return total / max(count, 1), excess / max(pairs, 1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    add_output_options(parser)
    parser.add_argument("--lam", type=float, default=0.05)
    parser.add_argument("--seeds", type=int, nargs="+", default=None)
    parser.add_argument("--steps", type=int, default=None, help="SFT steps per run (default 12 quick, 30 full)")
    parser.add_argument("--top", type=int, default=16, help="English features penalised per layer")
    args = parser.parse_args()
    seeds = args.seeds or ([0] if args.quick else [0, 1, 2])
    steps = args.steps or (12 if args.quick else 30)
    model, tokenizer = load_model()
    saes = load_saes()
    contrast = contrast_texts()
    languages = Dataset.from_dict({"text": contrast["en"] + contrast["fr"],
                                   "language": ["en"] * len(contrast["en"]) + ["fr"] * len(contrast["fr"])})
    english = {layer: found["en"][:args.top]
               for layer, found in language_features(model, tokenizer, saes, languages, top=args.top).items()}
    baselines = estimate_language_baselines(model, tokenizer, saes, english, languages, progress=False)
    train_q, held_q = questions()
    if args.quick:
        train_q, held_q = train_q[:16], held_q[:8]
    fallback = [t for t in contrast["fr"] if has_english(t) is False] * 4
    train = conversations(train_q, french_answers(model, tokenizer, train_q, fallback))
    held = conversations(held_q, french_answers(model, tokenizer, held_q, fallback))
    penalty = SAEFeaturePenalty(saes, {layer: {"en": feats} for layer, feats in english.items()}, coef=args.lam,
                                baselines=baselines, language_column="language")
    held_prompts = chat_prompts(tokenizer, [q for q in held_q for _ in range(SAMPLES)])

    def evaluate(policy, seed: int) -> dict:
        torch.manual_seed(1000 + seed)
        answers, _ = generate(policy, tokenizer, held_prompts, max_new_tokens=40, do_sample=True, temperature=0.8,
                              top_p=0.95)
        loss, excess = held_out_measures(policy, tokenizer, held, penalty)
        return {"seed": seed, "code_switching": sum(map(has_english, answers)) / len(answers), "held_out_loss": loss,
                "english_feature_excess": excess, "example": answers[0]}

    runs = {"before training": [evaluate(model, seed) for seed in seeds]}
    del model
    runs |= {"plain LoRA SFT": [], "LoRA SFT + SAE penalty": []}
    for seed in seeds:
        for name, term in (("plain LoRA SFT", None), ("LoRA SFT + SAE penalty", penalty)):
            trained, tokenizer, logged = run(train, term, seed, steps)
            record = {**evaluate(trained, seed), "penalty_log": logged}
            runs[name].append(record)
            print(f"{name}, seed {seed}: code-switching {record['code_switching']:.2f}, held-out loss "
                  f"{record['held_out_loss']:.4f}, English-feature excess {record['english_feature_excess']:.3f}",
                  flush=True)
    summary = {name: {key: statistics.mean(r[key] for r in rs)
                      for key in ("code_switching", "held_out_loss", "english_feature_excess")}
               for name, rs in runs.items()}
    plain, penalised = summary["plain LoRA SFT"], summary["LoRA SFT + SAE penalty"]
    reduction = 1 - penalised["code_switching"] / plain["code_switching"] if plain["code_switching"] else 0.0
    loss_change = penalised["held_out_loss"] / plain["held_out_loss"] - 1
    args.results.mkdir(parents=True, exist_ok=True)
    tag = "quick" if args.quick else "full"
    (args.results / f"effects_sasft_{tag}.json").write_text(json.dumps(
        {"lam": args.lam, "steps": steps, "seeds": seeds, "features": english, "runs": runs, "summary": summary,
         "reduction": reduction, "loss_change": loss_change}, indent=2, ensure_ascii=False))
    rows = "\n".join(f"| {name} | {r['seed']} | {r['code_switching']:.2f} | {r['held_out_loss']:.4f} | "
                     f"{r['english_feature_excess']:.3f} |" for name, rs in runs.items() for r in rs)
    met = reduction >= 0.5 and abs(loss_change) <= 0.02
    change = f"{reduction:.0%} fewer" if reduction >= 0 else f"{-reduction:.0%} more"
    asked = f"{len(held_q)} held-out prompts × {SAMPLES} samples"
    write_section(f"sasft-{tag}", f"""### SASFT: French answers, no drift into English ({asked})

{provenance(args.quick)}. LoRA r=16 on q/k/v/o, {steps} steps of 8, lr 2e-4; penalty λ={args.lam} on the top
{args.top} English features of layers {sorted(english)}, α from the French contrast texts.

| run | seed | code-switched answers | held-out loss | English-feature excess (held-out) |
|---|---|---|---|---|
{rows}

Mean code-switching {plain['code_switching']:.2f} → {penalised['code_switching']:.2f} ({change}), held-out
loss change {loss_change:+.2%}, English-feature excess {plain['english_feature_excess']:.3f} →
{penalised['english_feature_excess']:.3f}. Target (≥ 50 % fewer at ≤ 2 % loss change): {"met" if met else "not met"}.
""", not args.no_write)


if __name__ == "__main__":
    main()
