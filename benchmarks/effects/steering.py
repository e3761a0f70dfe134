"""Steering effect on SmolLM2 (paper §3): make English questions get French answers, against controls.

    python benchmarks/effects/steering.py [--quick]

The French feature is the top feature of ``contrast_features`` (French vs English paragraphs of the shipped
contrast corpus) at the SAE's layer. Conditions, each over the same prompts, greedy decoding:

- no steering; SAE feature ``add`` (the paper's operator), ``gated`` (add only where the top English feature
  fires), ``clamp`` (set the feature's activation high);
- controls: zero strength, a random feature at the same strength (decoder columns have unit norm, so the same
  vector norm), the negative strength, a prompt-only instruction ("Answer in French."), and a difference-of-means
  vector (mean residual on French minus on English paragraphs) scaled to the SAE vector's norm.

Strength is a fraction of the residual stream's median norm at the layer (``STRENGTH_OF_NORM``, as in the demo)
and every vector is added on the generated tokens only, so the question itself is read unsteered.

Success: the answer is mostly French (stop-word shares, see ``common.is_french``); "fluent" success also asks that
it has no repetition loop (``common.has_loop``: "de, de, de, …" counts as French but is not an answer). Fluency
cost: perplexity of the answers under the unsteered model (which rates loops as easy text, hence the loop share).
A strength sweep of ``add`` and of the mean difference is plotted.
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
    has_loop,
    is_french,
    load_model,
    load_saes,
    perplexity,
    provenance,
    write_section,
)

from qscope_hf import SAELogitsProcessor, SparseAutoencoder, Steering, layer_outputs
from qscope_hf.demo import STRENGTH_OF_NORM
from qscope_hf.discovery import activation_stats, contrast_features, residual_norm

TOPICS = ["the weather", "your favourite food", "the ocean", "a good book", "mountains", "your city", "music",
          "a busy morning", "cats", "the night sky", "trains", "gardening", "the moon", "a rainy day", "football",
          "coffee", "a long walk", "winter", "the library", "a birthday party"]
FORMS = ["Tell me about {}.", "What do you think of {}?", "Describe {} in two sentences."]
#: Strengths of the sweep, as fractions of the residual stream's median norm.
SWEEP = [0.0, 0.2, 0.4, 0.6, 0.8, 1.0, 1.4]


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


def measures(texts: list[str], ids: list[list[int]]) -> dict[str, float]:
    """Shares of answers that are French, French without a loop, and looping."""
    french = [is_french(text) for text in texts]
    loops = [has_loop(row) for row in ids]
    return {"success": sum(french) / len(texts), "fluent": sum(f and not loop for f, loop in zip(french, loops))
            / len(texts), "loops": sum(loops) / len(texts)}


def direction_sae(direction: torch.Tensor, layer: int) -> SparseAutoencoder:
    """A one-feature "SAE" whose decoder column is ``direction / ‖direction‖``: steers any vector with the same
    positions and modes as an SAE feature."""
    sae = SparseAutoencoder(direction.numel(), 1, 1, layer=layer)
    with torch.no_grad():
        sae.W_dec[:, 0] = direction / direction.norm()
        sae.W_enc[0] = direction / direction.norm()
    return sae


def point_text(point: dict) -> str:
    return f"{point['success']:.2f} / {point['fluent']:.2f} / {point['perplexity']:.1f}"


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
    norm = residual_norm(model, tokenizer, sae.layer, contrast["fr"] + contrast["en"])
    strength = STRENGTH_OF_NORM * norm
    clamp_target = 2.0 * float(stats_fr.act_max[french.feature])
    random_feature = random.Random(1).choice([f for f in range(sae.d_sae) if f not in (french.feature,)])
    diff = mean_residual(model, tokenizer, sae.layer, contrast["fr"]) - mean_residual(model, tokenizer, sae.layer,
                                                                                      contrast["en"])
    mean_difference = direction_sae(diff, sae.layer)  # unit norm, steered at the same strength

    asked = questions(args.quick)
    prompts = chat_prompts(tokenizer, asked)
    instructed = chat_prompts(tokenizer, [q + " Answer in French." for q in asked])
    new_tokens = 16 if args.quick else 32

    def steered(source, feature, value, **options):
        spec = Steering(source, feature, value, positions="generated", **options)
        return {"logits_processor": [SAELogitsProcessor(model, spec)]}

    conditions = {
        "no steering": (prompts, {}),
        "SAE add": (prompts, steered(sae, french.feature, strength)),
        "SAE gated (on the English feature)": (prompts, steered(sae, french.feature, strength, mode="gated",
                                                                gate_feature=english.feature)),
        "SAE clamp": (prompts, steered(sae, french.feature, clamp_target, mode="clamp")),
        "zero strength": (prompts, steered(sae, french.feature, 0.0)),
        "random feature, same norm": (prompts, steered(sae, random_feature, strength)),
        "negative strength": (prompts, steered(sae, french.feature, -strength)),
        "prompt only (Answer in French.)": (instructed, {}),
        "difference of means, same norm": (prompts, steered(mean_difference, 0, strength)),
    }
    results = {}
    for name, (inputs, options) in conditions.items():
        texts, ids = generate(model, tokenizer, inputs, max_new_tokens=new_tokens, **options)
        results[name] = {**measures(texts, ids), "perplexity": perplexity(model, tokenizer, prompts, texts),
                         "example": texts[0]}
        print(f"{name}: {results[name]['success']:.2f} French, perplexity {results[name]['perplexity']:.1f}",
              flush=True)
    sweep = {"SAE add": [], "difference of means": []}
    for fraction in SWEEP[::2] if args.quick else SWEEP:
        for name, source, feature in (("SAE add", sae, french.feature), ("difference of means", mean_difference, 0)):
            texts, ids = generate(model, tokenizer, prompts, max_new_tokens=new_tokens,
                                  **steered(source, feature, fraction * norm))
            sweep[name].append({"fraction_of_norm": fraction, **measures(texts, ids),
                                "perplexity": perplexity(model, tokenizer, prompts, texts), "example": texts[0]})
            print(f"sweep {name} {fraction}: {sweep[name][-1]}", flush=True)

    args.results.mkdir(parents=True, exist_ok=True)
    tag = "quick" if args.quick else "full"
    record = {"layer": sae.layer, "french_feature": french.feature, "english_feature": english.feature,
              "rate_fr": french.rate_a, "rate_en": french.rate_b, "residual_norm": norm, "strength": strength,
              "clamp_target": clamp_target,
              "random_feature": random_feature, "prompts": len(asked), "new_tokens": new_tokens,
              "conditions": results, "sweep": sweep}
    (args.results / f"effects_steering_{tag}.json").write_text(json.dumps(record, indent=2, ensure_ascii=False))
    plot = args.results / f"effects_steering_sweep_{tag}.png"
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (left, right) = plt.subplots(1, 2, figsize=(9, 3.5))
    for (name, points), colour in zip(sweep.items(), ("tab:blue", "tab:orange")):
        fractions = [p["fraction_of_norm"] for p in points]
        left.plot(fractions, [p["success"] for p in points], "o-", color=colour, label=f"{name}: French")
        left.plot(fractions, [p["fluent"] for p in points], "x:", color=colour, label=f"{name}: without a loop")
        right.plot(fractions, [p["perplexity"] for p in points], "s--", color=colour, label=name)
    left.set(xlabel="strength / median residual norm", ylabel="answers in French", ylim=(-0.02, 1.02))
    right.set(xlabel="strength / median residual norm", ylabel="perplexity under the unsteered model", yscale="log")
    left.legend(fontsize="small")
    left.set_title(f"feature {french.feature} at layer {sae.layer} vs mean difference")
    figure.tight_layout()
    figure.savefig(plot, dpi=110)
    plt.close(figure)

    table = "\n".join(f"| {name} | {r['success']:.2f} | {r['fluent']:.2f} | {r['loops']:.2f} | {r['perplexity']:.1f} "
                      f"| {r['example'][:60]!r} |" for name, r in results.items())
    sweep_table = "\n".join(
        f"| {sae_point['fraction_of_norm']:.1f} | {point_text(sae_point)} | {point_text(mean_point)} |"
        for sae_point, mean_point in zip(sweep["SAE add"], sweep["difference of means"]))
    best_sae = max(v["fluent"] for k, v in results.items() if k.startswith("SAE"))
    controls = {k: v["fluent"] for k, v in results.items() if not k.startswith("SAE")}
    better = [f"{k} ({fluent:.2f})" for k, fluent in controls.items() if fluent > best_sae]
    if better:
        verdict = (f"Controls beat SAE steering (best {best_sae:.2f}) on French answers without a loop: "
                   + ", ".join(better) + ".")
    elif best_sae > max(controls.values()):
        verdict = f"SAE steering gives the most French answers without a loop ({best_sae:.2f})."
    else:
        verdict = f"SAE steering ties the best control on French answers without a loop ({best_sae:.2f})."
    write_section(f"steering-{tag}", f"""### Steering towards French ({len(asked)} prompts, {new_tokens} new tokens)

{provenance(args.quick)}. Feature {french.feature} at layer {sae.layer} (fires on {french.rate_a:.0%} of French vs
{french.rate_b:.0%} of English tokens), strength {strength:.0f} ({STRENGTH_OF_NORM} × the median residual norm
{norm:.0f}), added on generated tokens only; gated on English feature {english.feature}; clamp target
{clamp_target:.1f}; random feature {random_feature}.

| condition | answers in French | French without a loop | answers with a loop | perplexity | first answer |
|---|---|---|---|---|---|
{table}

{verdict}

Strength sweep (answers in French / French without a loop / perplexity), both vectors of the same norm on
generated tokens:

| strength / median residual norm | SAE add | difference of means |
|---|---|---|
{sweep_table}

![strength sweep](results/{plot.name})
""", not args.no_write)


if __name__ == "__main__":
    main()
