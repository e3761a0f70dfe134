"""Steering effect on SmolLM2 (paper §3): make English questions get French answers, against controls.

    python benchmarks/effects/steering.py [--quick]

The French feature is the top feature of ``contrast_features`` (French vs English paragraphs of the shipped
contrast corpus) at the SAE's layer. Conditions, each over the same prompts, greedy decoding:

- no steering; SAE feature ``add`` (the paper's operator), ``gated`` (add only where the top English feature
  fires), ``clamp`` (set the feature's activation high);
- controls: zero strength, a random feature at the same strength (decoder columns have unit norm, so the same
  vector norm), the negative strength, a prompt-only instruction ("Answer in French."), and a difference-of-means
  vector (mean residual on French minus on English paragraphs) scaled to the SAE vector's norm.

Success: the answer is mostly French (stop-word shares, see ``common.is_french``). Fluency cost: perplexity of
the answers under the unsteered model. A strength sweep of ``add`` is plotted.
"""

from __future__ import annotations

import argparse
import json
import random

import torch
from common import (
    add_output_options,
    chat_prompts,
    contrast_texts,
    generate,
    is_french,
    load_model,
    load_saes,
    perplexity,
    provenance,
    write_section,
)

from qscope_hf import SAELogitsProcessor, Steering, add_to_layers, layer_outputs
from qscope_hf.discovery import activation_stats, contrast_features

TOPICS = ["the weather", "your favourite food", "the ocean", "a good book", "mountains", "your city", "music",
          "a busy morning", "cats", "the night sky", "trains", "gardening", "the moon", "a rainy day", "football",
          "coffee", "a long walk", "winter", "the library", "a birthday party"]
FORMS = ["Tell me about {}.", "What do you think of {}?", "Describe {} in two sentences."]
SWEEP = [0.0, 4.0, 8.0, 16.0, 32.0, 64.0]


def questions(quick: bool) -> list[str]:
    items = [form.format(topic) for topic in TOPICS for form in FORMS]
    random.Random(0).shuffle(items)
    return items[:12] if quick else items[:60]


@torch.no_grad()
def mean_residual(model, tokenizer, layer: int, texts: list[str]) -> torch.Tensor:
    total, count = 0.0, 0
    for text in texts:
        inputs = tokenizer(text, return_tensors="pt", truncation=True, max_length=256)
        hidden = layer_outputs(model, [layer], **inputs)[layer][0, 1:]
        total = total + hidden.sum(0)
        count += len(hidden)
    return total / count


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    add_output_options(parser)
    parser.add_argument("--layer", type=int, default=None)
    args = parser.parse_args()
    model, tokenizer = load_model()
    sae = load_saes([args.layer] if args.layer is not None else None)[0]
    contrast = contrast_texts()
    stats_fr = activation_stats(model, tokenizer, sae, contrast["fr"], progress=False)[sae.layer]
    stats_en = activation_stats(model, tokenizer, sae, contrast["en"], progress=False)[sae.layer]
    rows = contrast_features(stats_fr, stats_en, top=20)
    french = next(r for r in rows if r.rate_diff > 0)
    english = next(r for r in rows if r.rate_diff < 0)
    strength = 16.0
    clamp_target = 2.0 * float(stats_fr.act_max[french.feature])
    random_feature = random.Random(1).choice([f for f in range(sae.d_sae) if f not in (french.feature,)])
    diff = mean_residual(model, tokenizer, sae.layer, contrast["fr"]) - mean_residual(model, tokenizer, sae.layer,
                                                                                      contrast["en"])
    diff = diff / diff.norm() * strength  # same norm as strength × a unit decoder column

    asked = questions(args.quick)
    prompts = chat_prompts(tokenizer, asked)
    instructed = chat_prompts(tokenizer, [q + " Answer in French." for q in asked])
    new_tokens = 16 if args.quick else 32

    def steered(spec):
        return {"logits_processor": [SAELogitsProcessor(model, spec)]}

    conditions = {
        "no steering": (prompts, {}),
        "SAE add": (prompts, steered(Steering(sae, french.feature, strength))),
        "SAE gated (on the English feature)": (prompts, steered(Steering(sae, french.feature, strength, mode="gated",
                                                                         gate_feature=english.feature))),
        "SAE clamp": (prompts, steered(Steering(sae, french.feature, clamp_target, mode="clamp"))),
        "zero strength": (prompts, steered(Steering(sae, french.feature, 0.0))),
        "random feature, same norm": (prompts, steered(Steering(sae, random_feature, strength))),
        "negative strength": (prompts, steered(Steering(sae, french.feature, -strength))),
        "prompt only (Answer in French.)": (instructed, {}),
        "difference of means, same norm": (prompts, None),
    }
    results = {}
    for name, (inputs, options) in conditions.items():
        if options is None:
            with add_to_layers(model, {sae.layer: diff}):
                texts, _ = generate(model, tokenizer, inputs, max_new_tokens=new_tokens)
        else:
            texts, _ = generate(model, tokenizer, inputs, max_new_tokens=new_tokens, **options)
        results[name] = {"success": sum(map(is_french, texts)) / len(texts),
                         "perplexity": perplexity(model, tokenizer, prompts, texts), "example": texts[0]}
        print(f"{name}: {results[name]['success']:.2f} French, perplexity {results[name]['perplexity']:.1f}",
              flush=True)
    sweep = []
    for value in SWEEP:
        texts, _ = generate(model, tokenizer, prompts, max_new_tokens=new_tokens,
                            **steered(Steering(sae, french.feature, value)))
        sweep.append({"strength": value, "success": sum(map(is_french, texts)) / len(texts),
                      "perplexity": perplexity(model, tokenizer, prompts, texts)})
        print(f"sweep {value}: {sweep[-1]}", flush=True)

    args.results.mkdir(parents=True, exist_ok=True)
    tag = "quick" if args.quick else "full"
    record = {"layer": sae.layer, "french_feature": french.feature, "english_feature": english.feature,
              "rate_fr": french.rate_a, "rate_en": french.rate_b, "strength": strength, "clamp_target": clamp_target,
              "random_feature": random_feature, "prompts": len(asked), "new_tokens": new_tokens,
              "conditions": results, "sweep": sweep}
    (args.results / f"effects_steering_{tag}.json").write_text(json.dumps(record, indent=2, ensure_ascii=False))
    plot = args.results / f"effects_steering_sweep_{tag}.png"
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, left = plt.subplots(figsize=(6, 3.5))
    left.plot([s["strength"] for s in sweep], [s["success"] for s in sweep], "o-", color="tab:blue")
    left.set(xlabel="strength α", ylabel="answers in French", ylim=(-0.02, 1.02), xscale="symlog")
    right = left.twinx()
    right.plot([s["strength"] for s in sweep], [s["perplexity"] for s in sweep], "s--", color="tab:red")
    right.set(ylabel="perplexity (unsteered model)")
    left.set_title(f"SAE add, feature {french.feature} at layer {sae.layer}")
    figure.tight_layout()
    figure.savefig(plot, dpi=110)
    plt.close(figure)

    table = "\n".join(f"| {name} | {r['success']:.2f} | {r['perplexity']:.1f} | {r['example'][:60]!r} |"
                      for name, r in results.items())
    best_control = max(v["success"] for k, v in results.items() if not k.startswith("SAE"))
    best_sae = max(v["success"] for k, v in results.items() if k.startswith("SAE"))
    verdict = ("SAE steering beats every control." if best_sae > best_control else
               "A control matches or beats SAE steering here: " + ", ".join(
                   k for k, v in results.items() if not k.startswith("SAE") and v["success"] >= best_sae) + ".")
    write_section(f"steering-{tag}", f"""### Steering towards French ({len(asked)} prompts, {new_tokens} new tokens)

{provenance(args.quick)}. Feature {french.feature} at layer {sae.layer} (fires on {french.rate_a:.0%} of French vs
{french.rate_b:.0%} of English tokens), strength {strength}; gated on English feature {english.feature}; clamp target
{clamp_target:.1f}; random feature {random_feature}.

| condition | answers in French | perplexity | first answer |
|---|---|---|---|
{table}

{verdict} Strength sweep: `results/{plot.name}`.

![strength sweep](results/{plot.name})
""", not args.no_write)


if __name__ == "__main__":
    main()
