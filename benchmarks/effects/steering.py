"""Steering on SmolLM2 against its controls, in the style of AxBench: choose on development prompts, report on test.

    python benchmarks/effects/steering.py [--quick] [--layer 15]

Two concepts, each steered into answers to everyday English questions (20 topics × 3 forms, shuffled; the first
half is the development set, the second the test set):

- **French**: the answer should be in French (stop-word shares, ``common.is_french``); concept texts are
  hand-written French paragraphs, contrasted with their English translations (``steering_texts.json`` in the
  shipped SmolLM2 assets);
- **the sea**: the answer should mention the sea (a keyword list, :data:`SEA_WORDS`); concept texts are English
  paragraphs about the sea, contrasted with the English paragraphs on other subjects.

Per answer: the concept is present; no repetition loop (a 4-token n-gram repeated 3 times); **on topic** (it
names the question's topic: a keyword of :data:`TOPICS`, in English or French); and its perplexity under the
unsteered model given the plain question. Headline: the share of test answers with the concept, without a loop
and on topic.

Conditions, all at the SAE's layer, added at every position (prompt and answer) with strengths in units of the
residual norm (``Steering(..., relative=True)``):

- unsteered; the prompt alone (the question + an instruction, :data:`CONCEPTS`);
- SAE feature chosen by contrast (``contrast_features``: what the feature responds to); by output score
  (``output_scores`` towards the concept texts' vocabulary, every feature scored); by both (contrast candidates
  with a positive output score, ``rank_features(by="both")``); the SAE-TS targeted vector of the contrast feature
  (``fit_effect_approximator`` + ``targeted_vector``); the difference of means of the concept texts and the
  contrast texts; a random feature (control);
- each steering method alone and combined with the prompt, each at its calibrated strength
  (``calibrate_strength``: +0.5 nats of cross-entropy on neutral text) and at the strength that maximised the
  headline on the development prompts (a sweep over :data:`SWEEP`, chosen separately with and without the prompt).

``--quick`` (the test suite's run): French only, 6 development and 6 test prompts, 16 new tokens, two strengths,
output scores of the contrast candidates only and a 48-vector SAE-TS fit.
"""

from __future__ import annotations

import argparse
import json
import random
import time
from pathlib import Path

from common import (
    ASSETS,
    add_output_options,
    chat_prompts,
    generate,
    has_loop,
    is_french,
    load_model,
    load_saes,
    perplexity,
    provenance,
    words,
    write_section,
)

from qscope_hf import (
    SAELogitsProcessor,
    Steering,
    calibrate_strength,
    diff_means_vector,
    fit_effect_approximator,
    output_scores,
    rank_features,
    targeted_vector,
)
from qscope_hf.discovery import activation_stats, contrast_features

DATA = ASSETS / "steering_texts.json"
#: Question topics with the words (English or French, matched as word prefixes) that make an answer on topic.
TOPICS = {
    "the weather": ["weather", "météo", "temps", "climat"], "your favourite food": ["food", "dish", "nourriture",
                                                                                   "plat", "cuisine"],
    "a new phone": ["phone", "téléphone", "smartphone"], "a good book": ["book", "livre", "novel", "roman"],
    "mountains": ["mountain", "montagne"], "your city": ["city", "town", "ville", "cité"], "music": ["music", "musique",
                                                                                            "song", "chanson"],
    "a busy morning": ["morning", "matin", "busy"], "cats": ["cat", "chat"], "the night sky": ["sky", "ciel", "star",
                                                                                               "étoile"],
    "trains": ["train"], "gardening": ["garden", "jardin"], "the moon": ["moon", "lune"],
    "a rainy day": ["rain", "pluie", "pleu"], "football": ["football", "soccer", "foot"], "coffee": ["coffee", "café"],
    "a long walk": ["walk", "marche", "promenade"], "winter": ["winter", "hiver", "snow", "neige"],
    "the library": ["library", "bibliothèque"], "a birthday party": ["birthday", "party", "anniversaire", "fête"],
}
FORMS = ["Tell me about {}.", "What do you think of {}?", "Describe {} in two sentences."]
SEA_WORDS = ("sea", "ocean", "wave", "beach", "tide", "coast", "shore", "harbour", "harbor", "sail", "ship", "boat",
             "marine", "seagull", "dolphin", "whale", "coral", "mer", "océan", "vague", "plage", "marée", "bateau")
#: concept -> (concept texts key, contrast texts key, instruction appended to the question)
CONCEPTS = {"French": ("fr", "en", " Answer in French."), "the sea": ("sea", "en", " Mention the sea in your answer.")}
#: Strengths of the development sweep, in units of the residual norm (``relative=True``).
SWEEP = [0.1, 0.2, 0.35, 0.6]
CE_BUDGET = 0.5
METHODS = ["SAE feature by contrast", "SAE feature by output score", "SAE feature by both", "SAE-TS targeted vector",
           "difference of means", "random feature"]
SAE_DERIVED = ["SAE feature by output score", "SAE-TS targeted vector"]


def questions(quick: bool) -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
    """(development, test) lists of (question, topic)."""
    items = [(form.format(topic), topic) for topic in TOPICS for form in FORMS]
    random.Random(0).shuffle(items)
    dev, test = items[:30], items[30:]
    return (dev[:6], test[:6]) if quick else (dev, test)


def mentions_sea(text: str) -> bool:
    return any(w.startswith(SEA_WORDS) for w in words(text))


def on_topic(text: str, topic: str) -> bool:
    return any(w.startswith(tuple(TOPICS[topic])) for w in words(text))


def present(concept: str, text: str) -> bool:
    return is_french(text) if concept == "French" else mentions_sea(text)


def measure(concept: str, texts: list[str], ids: list[list[int]], topics: list[str]) -> dict[str, float]:
    hits = [present(concept, t) for t in texts]
    loops = [has_loop(i) for i in ids]
    topical = [on_topic(t, topic) for t, topic in zip(texts, topics)]
    n = len(texts)
    return {"concept": sum(hits) / n, "loops": sum(loops) / n, "on_topic": sum(topical) / n,
            "headline": sum(h and not lp and o for h, lp, o in zip(hits, loops, topical)) / n}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--layer", type=int, default=15)
    parser.add_argument("--render", type=Path, default=None, help="rewrite the plot and RESULTS.md section from a "
                                                                   "recorded JSON file instead of running")
    add_output_options(parser)
    args = parser.parse_args()
    if args.render is not None:
        record = json.loads(args.render.read_text())
        tag = "quick" if args.render.stem.endswith("quick") else "full"
        plot(record["concepts"], args.results / f"effects_steering_sweep_{tag}.png")
        write_section(f"steering-{tag}", report(record, tag), not args.no_write)
        return
    started = time.perf_counter()
    model, tokenizer = load_model()
    sae = load_saes([args.layer])[0]
    layer = sae.layer
    texts = json.loads(DATA.read_text())
    dev, test = questions(args.quick)
    new_tokens = 16 if args.quick else 32
    sweep = [0.2, 0.45] if args.quick else SWEEP

    def answers(items, suffix, spec):
        prompts = chat_prompts(tokenizer, [q + suffix for q, _ in items])
        options = {} if spec is None else {"logits_processor": [SAELogitsProcessor(model, spec)]}
        return generate(model, tokenizer, prompts, max_new_tokens=new_tokens, batch_size=30, **options)

    def evaluate(concept, items, suffix, spec):
        generated, ids = answers(items, suffix, spec)
        result = measure(concept, generated, ids, [topic for _, topic in items])
        result["perplexity"] = perplexity(model, tokenizer, chat_prompts(tokenizer, [q for q, _ in items]), generated)
        result["example"] = generated[0]
        return result

    profile = [t for key in ("fr", "en", "sea") for t in texts[key]]
    candidates = {}
    stats = {key: activation_stats(model, tokenizer, sae, texts[key], progress=False)[layer] for key in ("fr", "en",
                                                                                                          "sea")}
    for concept, (key_a, key_b, _) in CONCEPTS.items():
        rows = contrast_features(stats[key_a], stats[key_b], top=100)
        candidates[concept] = rows
    include = sorted({r.feature for rows in candidates.values() for r in rows[:16] if r.rate_diff > 0})
    approximator = fit_effect_approximator(model, tokenizer, sae, profile_texts=profile,
                                           n_vectors=48 if args.quick else 512, include=include, progress=False)
    timing = {"effect_approximator_s": approximator.seconds, "effect_approximator_r2": approximator.r2}
    print(f"SAE-TS approximator: R² {approximator.r2:.3f} in {approximator.seconds:.0f} s", flush=True)

    records = {}
    for concept, (key_a, key_b, suffix) in CONCEPTS.items():
        if args.quick and concept != "French":
            continue
        rows = candidates[concept]
        towards = [r for r in rows if r.rate_diff > 0]
        scored_features = [r.feature for r in rows] if args.quick else None
        clock = time.perf_counter()
        scores = output_scores(model, tokenizer, sae, scored_features, target=texts[key_a], progress=False)
        timing[f"output_scores_{concept}_s"] = time.perf_counter() - clock
        both = rank_features(rows, scores, by="both", top=1)
        random_feature = random.Random(1).choice([f for f in range(sae.d_sae) if f != towards[0].feature])
        directions = {
            "SAE feature by contrast": (towards[0].feature, sae.feature_directions(towards[0].feature)),
            "SAE feature by output score": (scores.top(1)[0][0], sae.feature_directions(scores.top(1)[0][0])),
            "SAE feature by both": (both[0].feature if both else None,
                                    sae.feature_directions(both[0].feature) if both else None),
            "SAE-TS targeted vector": (towards[0].feature, targeted_vector(approximator, towards[0].feature)),
            "difference of means": (None, diff_means_vector(model, tokenizer, texts[key_a], texts[key_b], layer)),
            "random feature": (random_feature, sae.feature_directions(random_feature)),
        }
        specs = {name: Steering.from_vector(vector.detach(), layer, 1.0, relative=True)
                 for name, (_, vector) in directions.items() if vector is not None}
        calibrated = {name: calibrate_strength(model, tokenizer, spec, max_ce_increase=CE_BUDGET).strength
                      for name, spec in specs.items()}
        development = {}
        for name, spec in specs.items():
            for with_prompt in (False, True):
                points = [{"strength": s, **evaluate(concept, dev, suffix if with_prompt else "", spec.scaled(s))}
                          for s in sweep]
                development[f"{name}{' + prompt' if with_prompt else ''}"] = points
                print(concept, name, with_prompt, [(p["strength"], p["headline"]) for p in points], flush=True)
        conditions = {"unsteered": evaluate(concept, test, "", None),
                      "prompt only": evaluate(concept, test, suffix, None)}
        for name, spec in specs.items():
            for with_prompt in (False, True):
                label = f"{name}{' + prompt' if with_prompt else ''}"
                best = max(development[label], key=lambda p: (p["headline"], -p["strength"]))["strength"]
                for kind, strength in (("calibrated", calibrated[name]), ("dev-best", best)):
                    result = evaluate(concept, test, suffix if with_prompt else "", spec.scaled(strength))
                    conditions[f"{label}, {kind}"] = {"strength": strength, **result}
                    print(concept, label, kind, round(strength, 3), result["headline"], flush=True)
        records[concept] = {"features": {name: feature for name, (feature, _) in directions.items()},
                            "output_top": scores.top(5), "calibrated": calibrated, "development": development,
                            "conditions": conditions}
    timing["total_s"] = time.perf_counter() - started
    tag = "quick" if args.quick else "full"
    args.results.mkdir(parents=True, exist_ok=True)
    record = {"provenance": provenance(args.quick), "layer": layer, "dev_prompts": len(dev), "test_prompts": len(test),
              "new_tokens": new_tokens, "sweep": sweep, "ce_budget": CE_BUDGET, "timing": timing, "concepts": records}
    (args.results / f"effects_steering_{tag}.json").write_text(json.dumps(record, indent=2, ensure_ascii=False))
    plot(records, args.results / f"effects_steering_sweep_{tag}.png")
    write_section(f"steering-{tag}", report(record, tag), not args.no_write)


def verdicts(concept: str, conditions: dict) -> list[str]:
    """The three targets of the study, each stated as met or not met on the test headline at the dev-chosen
    strength, alone and with the prompt; the random-feature control is named next to each comparison."""
    def best(name: str) -> float:
        return conditions[f"{name}, dev-best"]["headline"]

    lines = []
    methods = [m for m in METHODS if f"{m}, dev-best" in conditions]
    for suffix, setting in (("", "alone"), (" + prompt", "with the prompt")):
        sae_best = max([m for m in SAE_DERIVED if m in methods], key=lambda m: best(m + suffix))
        ours, theirs = best(sae_best + suffix), best("difference of means" + suffix)
        lines.append(f"SAE-derived method ≥ difference of means, {setting}: {'met' if ours >= theirs else 'not met'} "
                     f"({sae_best}{suffix} {ours:.2f} vs {theirs:.2f}; random feature{suffix} "
                     f"{best('random feature' + suffix):.2f}).")
    prompt = conditions["prompt only"]["headline"]
    combined = max(methods, key=lambda m: best(f"{m} + prompt"))
    met = best(f"{combined} + prompt") > prompt
    lines.append(f"steering + prompt > prompt alone: {'met' if met else 'not met'} (best: {combined} + prompt "
                 f"{best(combined + ' + prompt'):.2f} vs prompt only {prompt:.2f}; random feature + prompt "
                 f"{best('random feature + prompt'):.2f}).")
    for suffix, setting in (("", "alone"), (" + prompt", "with the prompt")):
        output, contrast = best("SAE feature by output score" + suffix), best("SAE feature by contrast" + suffix)
        met = output > 0 and output >= 2 * contrast
        lines.append(f"output-scored feature ≥ 2 × contrast-chosen feature, {setting}: {'met' if met else 'not met'} "
                     f"({output:.2f} vs {contrast:.2f}).")
    return [f"- {concept}: {line}" for line in lines]


def report(record: dict, tag: str) -> str:
    parts = [f"""### Steering with controls: French and the sea ({record['dev_prompts']} development + \
{record['test_prompts']} test prompts, {record['new_tokens']} new tokens)

{record['provenance']}. Layer {record['layer']}; every vector added at every position, strengths in units of
each prompt's median residual norm; "calibrated" = +{record['ce_budget']} nats of cross-entropy on neutral text;
"dev-best" = the best of {record['sweep']} on the development prompts. Headline = concept present **and** no loop
**and** on topic, on the test prompts. SAE-TS approximator: held-out R²
{record['timing']['effect_approximator_r2']:.2f}, fitted in {record['timing']['effect_approximator_s']:.0f} s; whole
study {record['timing']['total_s'] / 60:.0f} min."""]
    for concept, data in record["concepts"].items():
        features = ", ".join(f"{name}: {f}" for name, f in data["features"].items() if f is not None)
        seconds = record["timing"].get(f"output_scores_{concept}_s", 0)
        rows = "\n".join(
            f"| {name} | {r.get('strength', float('nan')):.2f} | {r['headline']:.2f} | {r['concept']:.2f} | "
            f"{r['loops']:.2f} | {r['on_topic']:.2f} | {r['perplexity']:.1f} | {r['example'][:50]!r} |"
            for name, r in data["conditions"].items()).replace("| nan |", "| — |")
        parts.append(f"""#### {concept}

Features ({features}); output scores of the features scored took {seconds:.0f} s.

| condition | strength | headline | {concept} | loops | on topic | perplexity | first answer |
|---|---|---|---|---|---|---|---|
{rows}

""" + "\n".join(verdicts(concept, data["conditions"])))
    parts.append(f"![development sweep](results/effects_steering_sweep_{tag}.png)")
    return "\n\n".join(parts)


def plot(records: dict, path: Path) -> None:
    """Development headline against strength: one panel per concept and setting (alone / with the prompt)."""
    from matplotlib.figure import Figure

    figure = Figure(figsize=(10, 3.5 * len(records)))
    axes = figure.subplots(len(records), 2, squeeze=False)
    for row, (concept, data) in zip(axes, records.items()):
        for column, (suffix, setting) in enumerate((("", "alone"), (" + prompt", "with the prompt"))):
            for name in METHODS:
                points = data["development"].get(name + suffix)
                if points:
                    row[column].plot([p["strength"] for p in points], [p["headline"] for p in points], "o-",
                                     label=name)
            row[column].set(title=f"{concept}, steering {setting}", xlabel="strength / residual norm",
                            ylabel="development headline", ylim=(-0.02, 1.02))
    axes[0][0].legend(fontsize="x-small")
    figure.tight_layout()
    figure.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
