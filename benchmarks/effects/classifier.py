"""Feature classifier effect on SmolLM2 (paper §5): the OR rule vs difference-of-means vs a logistic probe.

    python benchmarks/effects/classifier.py [--quick]

Task, built offline: is a text about animals and nature or about machines and computers? Texts are SmolLM2's own
sampled answers to prompts of either topic (so the labels come from the prompts), split in half for fitting and
testing. All three classifiers read the same forward pass of the shipped SAEs' layers; the SAE rule keeps K
features (``top1-diff`` layer). Reported: F1 on the test half, and the SAE rule's data-efficiency curve.
"""

from __future__ import annotations

import argparse
import json
import random

import torch
from common import add_output_options, chat_prompts, generate, load_model, load_saes, provenance, write_section

from qscope_hf.classify import (
    collect_text_features,
    data_efficiency_curve,
    f1_score,
    fit_diff_means,
    fit_feature_classifier,
    fit_logistic_probe,
)

TOPICS = {
    1: ["a fox in the forest", "birds in spring", "a river full of fish", "wild horses", "a bee and its flowers",
        "an old oak tree", "whales in the ocean", "a family of rabbits", "mountain goats", "butterflies"],
    0: ["a laptop computer", "a new smartphone", "a printer that breaks", "a robot in a factory",
        "the internet", "a video game console", "an electric car", "a server room", "software updates",
        "a calculator"],
}
FORMS = ["Write a few sentences about {}.", "Describe {}.", "Tell a short story about {}."]


def corpus(model, tokenizer, per_prompt: int, seed: int) -> tuple[list[str], list[int]]:
    questions, labels = [], []
    for label, topics in TOPICS.items():
        for topic in topics:
            for form in FORMS:
                questions += [form.format(topic)] * per_prompt
                labels += [label] * per_prompt
    torch.manual_seed(seed)
    texts, _ = generate(model, tokenizer, chat_prompts(tokenizer, questions), max_new_tokens=48, do_sample=True,
                        temperature=0.9, top_p=0.95)
    order = list(range(len(texts)))
    random.Random(seed).shuffle(order)
    return [texts[i] for i in order], [labels[i] for i in order]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    add_output_options(parser)
    parser.add_argument("--top-k", type=int, default=5)
    args = parser.parse_args()
    model, tokenizer = load_model()
    saes = load_saes()
    texts, labels = corpus(model, tokenizer, 1 if args.quick else 4, seed=0)
    half = len(texts) // 2
    features = collect_text_features(model, tokenizer, saes, texts, progress=False)
    fit, test = features.subset(range(half)), features.subset(range(half, len(texts)))
    fit_labels, test_labels = labels[:half], labels[half:]
    sae_rule = fit_feature_classifier(fit, fit_labels, top=args.top_k)
    layer = next(iter(sae_rule.features))
    scores = {f"SAE OR rule (K={args.top_k}, layer {layer})": f1_score(sae_rule.predict(test), test_labels),
              f"difference of means (layer {layer})": f1_score(fit_diff_means(fit, fit_labels, layer).predict(test),
                                                               test_labels),
              f"logistic probe (layer {layer})": f1_score(fit_logistic_probe(fit, fit_labels, layer).predict(test),
                                                          test_labels)}
    curve = data_efficiency_curve(fit, fit_labels, test, test_labels, fractions=(0.1, 0.25, 0.5, 1.0), repeats=3,
                                  top=args.top_k)
    by_k = {k: f1_score(fit_feature_classifier(fit, fit_labels, top=k).predict(test), test_labels)
            for k in (1, 2, 3, 5, 10, 20)}
    for name, value in scores.items():
        print(f"{name}: F1 {value:.3f}", flush=True)
    print(f"SAE OR rule by K: {by_k}", flush=True)
    args.results.mkdir(parents=True, exist_ok=True)
    tag = "quick" if args.quick else "full"
    (args.results / f"effects_classifier_{tag}.json").write_text(json.dumps(
        {"texts": len(texts), "fit": half, "features": sae_rule.features, "f1": scores, "f1_by_k": by_k,
         "curve": curve}, indent=2))
    best = max(scores, key=scores.get)
    table = "\n".join(f"| {name} | {value:.3f} |" for name, value in scores.items())
    points = ", ".join(f"{p['fraction']:.0%}: {p['f1']:.2f}" for p in curve)
    verdict = ("The SAE rule is best." if best.startswith("SAE") else
               f"The SAE rule loses to the {best.split(' (')[0]} on this task.")
    write_section(f"classifier-{tag}", f"""### Classifier: nature vs machines ({len(texts)} SmolLM2 texts, half to fit)

{provenance(args.quick)}.

| classifier | F1 (test half) |
|---|---|
{table}

{verdict} SAE rule F1 against the fraction of fitting data used: {points}. SAE rule F1 by the number of
features K it keeps: {", ".join(f"K={k}: {v:.2f}" for k, v in by_k.items())} (the OR rule fires when any kept feature
fires, so each added feature can only add positives).
""", not args.no_write)


if __name__ == "__main__":
    main()
