"""SASFT as the paper ran it (Deng et al. 2025, arXiv 2507.14894; docs/methods/post-training.md), on a
mixed-language SFT set.

    python benchmarks/effects/sasft.py [--quick] [--seeds 0 1 2] [--lams 1e-4 5e-4 1e-3 1e-2] [--full-lams ...]
                                        [--modes lora full] [--resume]
    python benchmarks/effects/sasft.py --render benchmarks/results/effects_sasft_full.json   # table + plot again

The paper's situation: SFT on multilingual data that is mostly in one language, after which the model switches into
that dominant language where it should not. Here the SFT set is 75 % English and 25 % French question/answer pairs
(SmolLM2-135M-Instruct's own sampled answers; French answers under a "reply in French" instruction, or French
paragraphs of the shipped contrast corpus when the model's answer is not French), with a ``language`` column; the
evaluation asks 24 held-out French questions with no instruction and samples 3 answers each (temperature 0.8).

The paper's recipe: SAEs on the **last two layers** (here 28 and 29 of 30; the shipped SAEs are at 15 and 24, so the
study trains two on Faker text in five languages and caches them, reporting the time), the **top-2** English
features per layer by monolinguality (contrast texts), α = each feature's mean pre-activation on French text, the
penalty ``λ · mean over response tokens of ReLU(f − α)`` on the French samples only, λ swept over {1e-4, 5e-4, 1e-3,
1e-2} (paper: 5e-4 Gemma, 1e-3 Llama) and 1e-1 (feature scales differ between SAEs), with 3e-2 as well for LoRA; one
epoch (the paper's over 110k samples, here over the small set). Our previous recipe (top-16 features at the shipped
layers 15 and 24, λ = 0.05) runs as a further condition. Conditions run with LoRA (r = 16 on q/k/v/o, lr 2e-4)
and with full fine-tuning (lr 2e-5), in bf16 mixed precision as the paper trained, for seeds 0, 1, 2 (seed by seed,
so an interrupted study has whole seeds), from the same model, data, order and steps. Answers are sampled under bf16
autocast; the held-out loss is computed in fp32.

Measures, on held-out data: code-switched answers (≥ 10 % English stop words; a French answer has about 0 %),
held-out next-token loss on French and English answers (teacher-forced), answers on topic (the answer names the
question's topic, in French or English: whether it stayed useful, whatever its language), and the English-feature
excess the penalty targets. Target: ≥ 50 % fewer code-switched answers than plain SFT at ≤ 2 % held-out loss change
for at least one λ.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import math
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from common import (
    ROOT,
    add_output_options,
    chat_prompts,
    contrast_texts,
    generate,
    has_english,
    is_french,
    load_model,
    load_saes,
    padded_batches,
    positive,
    provenance,
    seed_spread,
    spread_cell,
    words,
    write_section,
)
from datasets import Dataset
from peft import LoraConfig
from trl import SFTConfig, SFTTrainer

from qscope_hf import SparseAutoencoder, capture_layers
from qscope_hf.training import SAETrainer, TrainConfig
from qscope_trl import SAEFeaturePenalty, add_sae_penalty, estimate_language_baselines, language_features

# French topic -> the words that show an answer is about it (French, English).
TOPICS = {"la pluie": ("pluie", "rain"), "les chats": ("chat", "cat"), "la musique": ("musique", "music"),
          "le café": ("café", "coffee"), "la mer": ("mer", "sea"), "les livres": ("livre", "book"),
          "le vélo": ("vélo", "bicycle", "bike"), "la montagne": ("montagne", "mountain"),
          "le pain": ("pain", "bread"), "les étoiles": ("étoile", "star"), "le jardin": ("jardin", "garden"),
          "la ville": ("ville", "city"), "le train": ("train",), "l'hiver": ("hiver", "winter"),
          "les oiseaux": ("oiseau", "bird"), "le cinéma": ("cinéma", "cinema", "film", "movie"),
          "la cuisine": ("cuisine", "cook", "kitchen"), "le sport": ("sport",), "les fleurs": ("fleur", "flower"),
          "la forêt": ("forêt", "forest"), "le soleil": ("soleil", "sun"),
          "la bibliothèque": ("bibliothèque", "library"), "les vacances": ("vacances", "holiday", "vacation"),
          "le marché": ("marché", "market")}
ENGLISH_TOPICS = ["rain", "cats", "music", "coffee", "the sea", "books", "cycling", "mountains", "bread", "the stars",
                  "gardens", "cities", "trains", "winter", "birds", "cinema", "cooking", "sport", "flowers",
                  "forests", "the sun", "libraries", "holidays", "markets"]
FRENCH_FORMS = ["Parle-moi de {}.", "Décris {} en deux phrases.", "Que penses-tu de {} ?"]
ENGLISH_FORMS = ["Tell me about {}.", "Describe {} in two sentences.", "What do you think of {}?"]
ENGLISH_HELD_FORM = "Write a few words about {}."
INSTRUCTION = " Réponds uniquement en français."
SAMPLES = 3  # sampled answers per held-out question (temperature 0.8): code-switching is a sampling event
PREVIOUS = {"top": 16, "layers": [15, 24], "lam": 0.05}
CACHE = ROOT / ".cache"


def french_questions() -> list[tuple[str, str]]:
    """``(question, topic)`` for every French topic and form, shuffled once."""
    items = [(form.format(topic), topic) for topic in TOPICS for form in FRENCH_FORMS]
    random.Random(0).shuffle(items)
    return items


def on_topic(answer: str, topic: str) -> bool:
    """The answer names its question's topic (a word starting with one of the topic's French or English stems)."""
    return any(word.startswith(stem) for word in words(answer) for stem in TOPICS[topic])


def sampled_answers(model, tokenizer, questions: list[str], seed: int, max_new_tokens: int = 48,
                    temperature: float = 0.7, top_p: float = 0.9) -> list[str]:
    """One sampled answer per question, all in one batch, under bf16 autocast (about 1.8 × faster on CPUs with bf16
    units)."""
    torch.manual_seed(seed)
    with torch.autocast(model.device.type, dtype=torch.bfloat16):
        answers, _ = generate(model, tokenizer, chat_prompts(tokenizer, questions), max_new_tokens=max_new_tokens,
                              do_sample=True, temperature=temperature, top_p=top_p, batch_size=len(questions))
    return [a.strip() for a in answers]


def french_answers(model, tokenizer, asked: list[str], fallback: list[str]) -> list[str]:
    """The model's own French answers under the instruction; a French contrast paragraph where it did not reply in
    French."""
    answers = sampled_answers(model, tokenizer, [q + INSTRUCTION for q in asked], seed=0)
    spare = iter(fallback)
    return [a if is_french(a) and not has_english(a) else next(spare)[:240] for a in answers]


def conversations(asked: list[str], answers: list[str], languages: list[str]) -> Dataset:
    return Dataset.from_dict({"prompt": [[{"role": "user", "content": q}] for q in asked],
                              "completion": [[{"role": "assistant", "content": a}] for a in answers],
                              "language": languages})


def build_data(model, tokenizer, quick: bool) -> dict:
    """The SFT set (75 % English), the held-out French questions, and the held-out loss set (French + English)."""
    french = french_questions()
    train_fr, held_fr = french[:48], french[48:]
    train_en = [form.format(topic) for topic in ENGLISH_TOPICS for form in ENGLISH_FORMS]
    held_en = [ENGLISH_HELD_FORM.format(topic) for topic in ENGLISH_TOPICS]
    if quick:
        train_fr, held_fr, train_en, held_en = train_fr[:8], held_fr[:8], train_en[:24], held_en[:8]
    fallback = [t for t in contrast_texts()["fr"] if not has_english(t)] * 4
    fr_questions = [q for q, _ in train_fr[:len(train_en) // 3]]
    fr_answers = french_answers(model, tokenizer, fr_questions + [q for q, _ in held_fr], fallback)
    en_answers = sampled_answers(model, tokenizer, train_en + held_en, seed=1)
    rows = [(q, a, "en") for q, a in zip(train_en, en_answers)] + \
        [(q, a, "fr") for q, a in zip(fr_questions, fr_answers)]
    random.Random(1).shuffle(rows)
    held_loss = [(q, a, "fr") for (q, _), a in zip(held_fr, fr_answers[len(fr_questions):])] + \
        [(q, a, "en") for q, a in zip(held_en, en_answers[len(train_en):])]
    return {"train": conversations(*map(list, zip(*rows))), "held_loss": conversations(*map(list, zip(*held_loss))),
            "held_questions": held_fr}


def last_layer_saes(model, tokenizer, layers: list[int], tokens: int, d_sae: int,
                    cache: Path) -> tuple[list[SparseAutoencoder], dict]:
    """TopK SAEs (k = 32) at ``layers`` trained on Faker paragraphs in five languages (the multilingual part of the
    shipped SAEs' corpus, ``benchmarks/smollm2_saes.py``), unless ``cache`` holds them; returns them with their
    training record (tokens, seconds)."""
    directory = cache / f"saes_L{'_'.join(map(str, layers))}_{d_sae}_{tokens}"
    record_file = directory / "training.json"
    if not record_file.exists():
        sys.path.insert(0, str(ROOT))
        from smollm2_saes import faker_paragraphs

        start = time.time()
        texts = [text for text, _ in faker_paragraphs(800, seed=0)]
        random.Random(0).shuffle(texts)
        config = TrainConfig(layers=layers, d_sae=d_sae, k=32, total_tokens=tokens, batch_tokens=4096,
                             buffer_tokens=min(65536, tokens), context_length=256, text_batch_size=16,
                             dead_after_tokens=min(200_000, tokens // 4), seed=0)
        # the model in bf16: about 3 x faster forwards on CPUs with bf16 units; the SAEs train in fp32
        trainer = SAETrainer(copy.deepcopy(model).to(torch.bfloat16), tokenizer, config)
        trainer.fit(texts, directory, progress=False)
        record_file.write_text(json.dumps({"tokens": trainer.tokens, "seconds": round(time.time() - start),
                                           "texts": len(texts), "d_sae": d_sae}))
    record = json.loads(record_file.read_text())
    return [SparseAutoencoder.from_pretrained(directory, layer=layer) for layer in layers], record


def language_penalty(model, tokenizer, saes: list[SparseAutoencoder], top: int, coef: float) -> SAEFeaturePenalty:
    """The top English features per layer (monolinguality on the contrast texts), penalised on French samples with
    α = their mean pre-activation on French text."""
    contrast = contrast_texts()
    texts = Dataset.from_dict({"text": contrast["en"] + contrast["fr"],
                               "language": ["en"] * len(contrast["en"]) + ["fr"] * len(contrast["fr"])})
    found = language_features(model, tokenizer, saes, texts, top=top)
    english = {layer: {"en": found[layer]["en"]} for layer in found}
    baselines = estimate_language_baselines(model, tokenizer, saes, {layer: f["en"] for layer, f in english.items()},
                                            texts, progress=False)
    return SAEFeaturePenalty(saes, english, coef=coef, baselines=baselines, language_column="language")


def fine_tune(base, tokenizer, data: Dataset, penalty: SAEFeaturePenalty | None, seed: int, mode: str,
              epochs: float):
    """One SFT run from a copy of ``base``: full fine-tuning or LoRA; returns the trained model and its penalty log."""
    lora = mode == "lora"
    args = SFTConfig(output_dir=tempfile.mkdtemp(), num_train_epochs=epochs, per_device_train_batch_size=8,
                     learning_rate=2e-4 if lora else 2e-5, seed=seed, use_cpu=True, bf16=True, report_to="none",
                     save_strategy="no", logging_steps=2, lr_scheduler_type="constant", max_length=256,
                     gradient_checkpointing=False)
    torch.manual_seed(seed)
    trainer = SFTTrainer(model=copy.deepcopy(base).train(), args=args, train_dataset=data, processing_class=tokenizer,
                         peft_config=LoraConfig(r=16, lora_alpha=32, target_modules=["q_proj", "k_proj", "v_proj",
                                                                                    "o_proj"]) if lora else None)
    if penalty is not None:
        add_sae_penalty(trainer, penalty)
    trainer.train()
    logged = [entry["sae/penalty"] for entry in trainer.state.log_history if "sae/penalty" in entry]
    return trainer.model.eval(), logged


@torch.no_grad()
def held_out_measures(model, tokenizer, data: Dataset, penalty: SAEFeaturePenalty,
                      batch_size: int = 24) -> tuple[float, float]:
    """Teacher-forced on the held-out answers: next-token loss (all of them), and the English-feature excess the
    paper's penalty targets (mean ReLU(f − α_fr) over the French answers' tokens and the penalised features)."""
    total, count, excess, pairs = 0.0, 0, 0.0, 0
    sequences = []
    for prompt, completion in zip(data["prompt"], data["completion"]):
        context = tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
        full = tokenizer.apply_chat_template(prompt + completion, tokenize=False)
        sequences.append((len(tokenizer(context, add_special_tokens=False)["input_ids"]),
                          tokenizer(full, add_special_tokens=False)["input_ids"]))
    french = [language == "fr" for language in data["language"]]
    for first, ids, mask, scored in padded_batches(sequences, tokenizer.pad_token_id or 0, batch_size):
        with capture_layers(model, penalty.layers) as hidden:
            logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1]
        total += float(torch.nn.functional.cross_entropy(logits[scored], ids[:, 1:][scored], reduction="sum"))
        count += int(scored.sum())
        answer = torch.zeros_like(ids, dtype=torch.bool)  # the French answers' tokens
        answer[:, 1:] = scored & torch.tensor(french[first:first + len(ids)])[:, None]
        part, n = penalty.sums(hidden, answer, penalty.language_ids(["fr"] * len(ids)))
        excess += float(part)
        pairs += int(n)
    return total / max(count, 1), excess / max(pairs, 1)


def evaluate(model, tokenizer, data: dict, penalty: SAEFeaturePenalty, seed: int) -> dict:
    questions = [(q, topic) for q, topic in data["held_questions"] for _ in range(SAMPLES)]
    answers = sampled_answers(model, tokenizer, [q for q, _ in questions], 1000 + seed, max_new_tokens=40,
                              temperature=0.8, top_p=0.95)
    loss, excess = held_out_measures(model, tokenizer, data["held_loss"], penalty)
    return {"seed": seed, "code_switching": sum(map(has_english, answers)) / len(answers),
            "on_topic": sum(on_topic(a, t) for a, (_, t) in zip(answers, questions)) / len(answers),
            "held_out_loss": loss, "english_feature_excess": excess, "example": answers[0]}


MEASURES = ("code_switching", "held_out_loss", "on_topic", "english_feature_excess")


def fewer_p_value(switched: int, total: int, plain_switched: int, plain_total: int) -> float:
    """One-sided p-value of a two-proportion z-test that a condition's share of code-switched answers
    (``switched`` of ``total``) is lower than plain SFT's."""
    pooled = (switched + plain_switched) / (total + plain_total)
    if pooled in (0.0, 1.0):
        return 1.0
    spread = math.sqrt(pooled * (1 - pooled) * (1 / total + 1 / plain_total))
    return 0.5 * math.erfc((plain_switched / plain_total - switched / total) / spread / math.sqrt(2))


def summarise(runs: dict, answers: int) -> dict:
    """Per condition: mean, min and max over seeds of each measure, and against the same mode's plain SFT on the same
    seeds: the loss change (seed by seed, then averaged), the reduction in code-switched answers and its p-value
    (answers pooled over seeds; ``answers`` sampled per run)."""
    summary = {}
    for name, records in runs.items():
        if not records:
            continue
        entry = seed_spread(records, MEASURES)
        mode = records[0].get("mode")
        plain = {r["seed"]: r for r in runs.get(f"{mode}: plain SFT", [])}
        if mode and name != f"{mode}: plain SFT" and plain:
            entry["loss_change"] = statistics.mean(r["held_out_loss"] / plain[r["seed"]]["held_out_loss"] - 1
                                                   for r in records)
            base = statistics.mean(plain[r["seed"]]["code_switching"] for r in records)
            entry["code_switching_reduction"] = 1 - entry["code_switching"]["mean"] / base if base else 0.0
            entry["fewer_p"] = fewer_p_value(sum(round(r["code_switching"] * answers) for r in records),
                                             answers * len(records),
                                             sum(round(plain[r["seed"]]["code_switching"] * answers) for r in records),
                                             answers * len(records))
            entry["met"] = entry["code_switching_reduction"] >= 0.5 and abs(entry["loss_change"]) <= 0.02
        summary[name] = entry
    return summary


def p_text(p: float) -> str:
    return "p < 0.001" if p < 0.001 else f"p {p:.3f}"


def render(record: dict, results: Path, write: bool) -> None:
    summary, tag = record["summary"], record["tag"]

    def cell(name: str, key: str, digits: int = 2) -> str:
        return spread_cell(summary[name][key], digits)

    rows = []
    for name in summary:
        entry = summary[name]
        change = f"{entry['loss_change']:+.2%}" if "loss_change" in entry else "—"
        fewer = (f"{entry['code_switching_reduction']:.0%} ({p_text(entry['fewer_p'])})"
                 if "code_switching_reduction" in entry else "—")
        seeds = ", ".join(str(r["seed"]) for r in record["runs"][name])
        rows.append(f"| {name} | {seeds} | {cell(name, 'code_switching')} | {fewer} | "
                    f"{cell(name, 'held_out_loss', 4)} | {change} | {cell(name, 'on_topic')} | "
                    f"{cell(name, 'english_feature_excess', 3)} |")
    met = [f"{name} ({p_text(summary[name]['fewer_p'])})" for name, entry in summary.items() if entry.get("met")]
    verdict = (f"met by {', '.join(met)}" if met else "not met by any condition")
    plot(summary, record, results / f"effects_sasft_lambda_{tag}.png")
    sae = record["sae_training"]
    write_section(f"sasft-{tag}", f"""### SASFT with the paper's recipe: mixed-language SFT, drift into English

{record['provenance']}. SFT set: {record['train_size']} samples ({record['train_french']} French, the rest English),
{record['epochs']:g} epoch of batches of 8; evaluation: {record['held_questions']} held-out French questions ×
{SAMPLES} sampled answers. SAEs at layers {record['layers']} trained by the study ({sae['tokens']} tokens, d_sae
{sae['d_sae']}, {sae['seconds']} s on this machine, cached in `benchmarks/.cache`); English features (top 2 per layer):
{record['features']}. Cells: mean over the seeds listed (min–max); loss change and "fewer" are against the same mode's
plain SFT on the same seeds, p is a one-sided two-proportion z-test of "fewer" on the answers pooled over those seeds
({record['held_questions'] * SAMPLES} per seed); the base model's seeds only change the sampling. Whole study
{record['seconds'] / 60:.0f} min.

| condition | seeds | code-switched | fewer than plain | held-out loss | loss change | on topic | English excess |
|---|---|---|---|---|---|---|---|
{chr(10).join(rows)}

Target (≥ 50 % fewer code-switched answers than plain SFT at ≤ 2 % held-out loss change, some λ): {verdict}.

![code-switching against λ](results/effects_sasft_lambda_{tag}.png)
""", write)


def plot(summary: dict, record: dict, path: Path) -> None:
    """Code-switched answers against λ, one line per mode, plain SFT drawn as a dashed line."""
    from matplotlib.figure import Figure

    figure = Figure(figsize=(6, 3.5))
    axes = figure.subplots()
    for mode in [mode for mode in record["modes"] if f"{mode}: plain SFT" in summary]:
        points = [(lam, summary[f"{mode}: SASFT λ={lam:g}"]["code_switching"]["mean"])
                  for lam in record["lams"][mode] if f"{mode}: SASFT λ={lam:g}" in summary]
        line = axes.plot(*zip(*points), "o-", label=f"{mode} + SASFT")[0]
        axes.axhline(summary[f"{mode}: plain SFT"]["code_switching"]["mean"], linestyle="--",
                     color=line.get_color(), label=f"{mode}, plain SFT")
    axes.axhline(summary["base model"]["code_switching"]["mean"], linestyle=":", color="gray",
                 label="before SFT")
    axes.set(xscale="log", xlabel="λ", ylabel="code-switched answers", ylim=(-0.02, 1.02))
    axes.legend(fontsize="x-small")
    figure.tight_layout()
    figure.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    add_output_options(parser)
    parser.add_argument("--lams", type=positive(float), nargs="+", default=None, help="λ of the paper's recipe (LoRA)")
    parser.add_argument("--full-lams", type=positive(float), nargs="+", default=None,
                        help="λ of the paper's recipe with full fine-tuning (default 1e-4 5e-4 1e-3 1e-2 1e-1)")
    parser.add_argument("--seeds", type=int, nargs="+", default=None)
    parser.add_argument("--modes", nargs="+", choices=["full", "lora"], default=None)
    parser.add_argument("--epochs", type=positive(float), default=None, help="SFT epochs (default 1, as in the paper)")
    parser.add_argument("--sae-tokens", type=positive(int), default=None, help="training tokens of the last-layer SAEs")
    parser.add_argument("--cache", type=Path, default=CACHE, help="where the trained SAEs are kept")
    parser.add_argument("--resume", action="store_true",
                        help="keep the runs of the record in --results (same data: checked on the base model's "
                             "answers) and run only the missing conditions and seeds")
    parser.add_argument("--render", type=Path, default=None, help="rewrite the table and plot from a JSON record")
    args = parser.parse_args()
    if args.render:  # the summary is recomputed from the runs, so a record made by an older version renders too
        record = json.loads(args.render.read_text())
        record["summary"] = summarise(record["runs"], record["held_questions"] * SAMPLES)
        args.render.write_text(json.dumps(record, indent=2, ensure_ascii=False))
        render(record, args.results, not args.no_write)
        return
    quick = args.quick
    seeds = args.seeds or ([0] if quick else [0, 1, 2])
    modes = args.modes or (["lora"] if quick else ["lora", "full"])
    lams = {"lora": args.lams or ([1e-2] if quick else [1e-4, 5e-4, 1e-3, 1e-2, 3e-2, 1e-1]),
            "full": args.full_lams or [1e-4, 5e-4, 1e-3, 1e-2, 1e-1]}
    epochs = args.epochs or 1.0
    tokens = args.sae_tokens or (16_384 if quick else 400_000)
    d_sae = 512 if quick else 4096
    start = time.time()
    model, tokenizer = load_model()
    layers = [model.config.num_hidden_layers - 2, model.config.num_hidden_layers - 1]
    saes, sae_training = last_layer_saes(model, tokenizer, layers, tokens, d_sae, args.cache)
    paper = language_penalty(model, tokenizer, saes, top=2, coef=lams[modes[0]][0])
    conditions = {}
    for mode in modes:
        conditions[mode, "plain SFT"] = None
        conditions |= {(mode, f"SASFT λ={lam:g}"): dataclasses.replace(paper, coef=lam) for lam in lams[mode]}
    if not quick:
        name = f"previous recipe (top-{PREVIOUS['top']}, layers 15+24, λ={PREVIOUS['lam']})"
        previous = language_penalty(model, tokenizer, load_saes(PREVIOUS["layers"]), PREVIOUS["top"], PREVIOUS["lam"])
        conditions |= {(mode, name): previous for mode in modes}
    data = build_data(model, tokenizer, quick)
    print(f"data and SAEs ready ({time.time() - start:.0f} s)", flush=True)
    tag = "quick" if quick else "full"
    record = {"tag": tag, "provenance": provenance(quick), "layers": layers, "sae_training": sae_training,
              "features": {layer: paper.features[layer]["en"] for layer in layers},
              "lams": {mode: lams[mode] for mode in modes}, "modes": modes,
              "seeds": seeds, "epochs": epochs, "train_size": len(data["train"]),
              "train_french": list(data["train"]["language"]).count("fr"),
              "held_questions": len(data["held_questions"])}
    runs = {"base model": [evaluate(model, tokenizer, data, paper, seed) for seed in seeds]}
    runs |= {f"{mode}: {name}": [] for mode, name in conditions}
    out, earlier_seconds = args.results / f"effects_sasft_{tag}.json", 0
    if args.resume and out.exists():
        earlier = json.loads(out.read_text())
        if [r for r in earlier["runs"]["base model"] if r["seed"] in seeds] != runs["base model"]:
            raise SystemExit(f"{out}: the base model's answers differ from this run's (other data, model or machine); "
                             "not resuming")
        runs |= {name: found for name, found in earlier["runs"].items() if name in runs}
        record["provenance"] = f"{earlier['provenance']}; resumed: {record['provenance']}"
        earlier_seconds = earlier["seconds"]
    args.results.mkdir(parents=True, exist_ok=True)
    for seed in seeds:  # seeds outermost: an interrupted run still has every condition for the seeds it finished
        for (mode, name), penalty in conditions.items():
            if any(r["seed"] == seed for r in runs[f"{mode}: {name}"]):
                continue  # kept from the record resumed
            trained, logged = fine_tune(model, tokenizer, data["train"], penalty, seed, mode, epochs)
            result = {**evaluate(trained, tokenizer, data, paper, seed), "mode": mode, "penalty_log": logged}
            runs[f"{mode}: {name}"].append(result)
            print(f"{mode}: {name}, seed {seed}: code-switching {result['code_switching']:.2f}, on topic "
                  f"{result['on_topic']:.2f}, held-out loss {result['held_out_loss']:.4f}, English-feature excess "
                  f"{result['english_feature_excess']:.3f} ({time.time() - start:.0f} s)", flush=True)
            record |= {"runs": runs, "seconds": earlier_seconds + round(time.time() - start)}
            out.write_text(json.dumps(record, indent=2, ensure_ascii=False))
    record |= {"runs": runs, "seconds": earlier_seconds + round(time.time() - start),
               "summary": summarise(runs, record["held_questions"] * SAMPLES)}
    out.write_text(json.dumps(record, indent=2, ensure_ascii=False))
    render(record, args.results, not args.no_write)


if __name__ == "__main__":
    main()
