"""``qscope demo``: what an SAE sees in a prompt, and steering generation with a feature found by contrast.

By default on SmolLM2-135M-Instruct with the SAEs qscope trained and ships (offline): the prompt's strongest
features with their top contexts from a small English + French corpus; French features chosen by contrast and
re-ranked by output score, with their logit-lens tokens; and greedy generations unsteered, with an instruction, and
with the instruction plus a gentle steer (the workflow that did best in benchmarks/RESULTS.md §5).
``--model``/``--sae``/``--layer`` run the same on any model and SAE source (a Qwen-Scope release uses the hub
when reachable); ``--model tiny`` runs the offline tiny model with a random SAE (what the tests use).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import torch

from .calibration import calibrate_strength
from .corpus import chat_token_ids
from .discovery import activation_stats, contrast_features
from .errors import ConfigError
from .formats import layers_in
from .hooks import check_sae_fits, layer_outputs
from .output_scores import logit_lens, output_scores, rank_features
from .sae import SparseAutoencoder, fraction_of_variance_unexplained
from .steering import SAELogitsProcessor, Steering
from .tiny import tiny_model, tiny_sae, tiny_tokenizer

#: Contrast candidates re-ranked by output score.
CANDIDATES = 40
INSTRUCTION = " Answer in French."
#: The steering strength of the demo, in units of each prompt's residual spread (``relative=True``): about the
#: study's best with the prompt on SmolLM2 (0.1 × the median residual norm there, 0.17 × the spread). On another model
#: the demo steers at its calibrated budget instead when that is smaller.
GENTLE_STRENGTH = 0.15


def describe_prompt(model, tokenizer, sae: SparseAutoencoder, prompt: str, *, top: int = 3,
                    echo: Callable[[str], None] = print) -> float:
    """Print each token's ``top`` features (id and activation) and return the reconstruction FVU."""
    layer = check_sae_fits(model, sae)
    inputs = tokenizer(prompt, return_tensors="pt")
    hidden = layer_outputs(model, [layer], **inputs)[layer][0].to(sae.dtype)
    with torch.no_grad():
        values, indices = sae.encode_topk(hidden)
        reconstruction = sae.decode_topk(values, indices)
    echo(f"layer {layer}: top {top} of k={sae.k} active features per token (of d_sae={sae.d_sae})")
    for token_id, token_values, token_indices in zip(inputs["input_ids"][0], values, indices):
        token = tokenizer.decode([int(token_id)])
        features = "  ".join(f"#{int(i):<5d} {float(v):7.3f}" for v, i in zip(token_values[:top], token_indices[:top]))
        echo(f"  {token!r:>12}  {features}")
    fvu = float(fraction_of_variance_unexplained(hidden[1:], reconstruction[1:]))  # the first token is not modelled
    echo(f"reconstruction (tokens after the first): fraction of variance unexplained {fvu:.3f}")
    return fvu


def tiny_demo(prompt: str = "Sparse autoencoders find features.", *, layer: int = 1,
              echo: Callable[[str], None] = print) -> float:
    """The offline tiny demo: a tiny random Qwen3 model and a tiny random SAE (features carry no meaning)."""
    model, tokenizer = tiny_model("qwen3"), tiny_tokenizer()
    sae = tiny_sae(d_model=model.config.hidden_size, d_sae=256, k=8, layer=layer)
    echo("tiny Qwen3 (4 layers, hidden 64, random weights) with a tiny random SAE (d_sae=256, k=8)")
    return describe_prompt(model, tokenizer, sae, prompt, echo=echo)


def contrast_demo(model, tokenizer, sae: SparseAutoencoder, prompt: str, contrast: dict[str, list[str]], *,
                  max_new_tokens: int = 40, echo: Callable[[str], None] = print) -> dict:
    """Features of ``prompt`` with top contexts; French features chosen by contrast (``contrast["fr"]`` vs
    ``contrast["en"]``) and re-ranked by their output score, with their logit-lens tokens; and generation
    unsteered, with the instruction "Answer in French." alone, and with the instruction plus a gentle steer by
    the chosen feature — the workflow of benchmarks/RESULTS.md §5. Returns what it showed."""
    layer = check_sae_fits(model, sae)
    french, english = contrast["fr"], contrast["en"]
    stats_fr = activation_stats(model, tokenizer, sae, french, progress=False)[layer]
    stats_en = activation_stats(model, tokenizer, sae, english, progress=False)[layer]
    both = activation_stats(model, tokenizer, sae, french + english, progress=False, n_contexts=2)[layer]

    inputs = tokenizer(prompt, return_tensors="pt")
    hidden = layer_outputs(model, [layer], **inputs)[layer][0, 1:].to(sae.dtype)
    strongest = sae.encode(hidden).max(dim=0).values.topk(5)
    echo(f"\nstrongest layer-{layer} features of {prompt!r}, with their top contexts in the demo corpus:")
    for value, feature in zip(strongest.values.tolist(), strongest.indices.tolist()):
        contexts = " | ".join(f"{c.left[-24:]}[{c.token}]{c.right[:16]}" for c in both.top_contexts(feature, window=6))
        echo(f"  #{feature:<5d} {value:6.2f}  {contexts!r}")

    rows = contrast_features(stats_fr, stats_en, top=CANDIDATES)
    scores = output_scores(model, tokenizer, sae, [r.feature for r in rows], target=french, progress=False)
    ranked = rank_features(rows, scores, by="both", top=5) or rank_features(rows, scores, by="input", top=5)
    lens = logit_lens(model, sae, [r.feature for r in ranked], top=6).tokens(tokenizer)
    echo("\nFrench features: firing more on French than English text (input), and raising French tokens when "
         "amplified (output score), with the tokens their decoder direction promotes (logit lens):")
    for r, tokens in zip(ranked, lens):
        echo(f"  #{r.feature:<5d} rate FR-EN {r.input_score:+.2f}  output {r.output_score:+.3f}  {' '.join(tokens)!r}")
    chosen = ranked[0].feature
    budget = calibrate_strength(model, tokenizer, Steering(sae, chosen, 1.0, relative=True))
    strength = min(GENTLE_STRENGTH, budget.strength)  # gentle, and never past this model's calibrated budget
    spec = Steering(sae, chosen, strength, relative=True)
    options = dict(max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    texts = {}
    for name, question, extra in (("unsteered", prompt, {}), ("instruction", prompt + INSTRUCTION, {}),
                                  ("instruction + steering", prompt + INSTRUCTION,
                                   {"logits_processor": [SAELogitsProcessor(model, spec)]})):
        ids = torch.tensor([question_ids(tokenizer, question)])
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), **options, **extra)
        texts[name] = tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)
    echo(f"\ngeneration, unsteered:\n  {texts['unsteered']!r}")
    echo(f"with the instruction {INSTRUCTION.strip()!r}:\n  {texts['instruction']!r}")
    echo(f"with the instruction and feature #{chosen} added at {strength:.3g} x each prompt's residual spread "
         f"(calibrated: the loss budget of +{budget.max_ce_increase} nats on neutral text allows up to "
         f"{budget.strength:.3g}; the demo uses {GENTLE_STRENGTH} or the budget, whichever is smaller):"
         f"\n  {texts['instruction + steering']!r}")
    return {"feature": chosen, "strength": strength, "calibrated": budget.strength, **texts}


def question_ids(tokenizer, question: str) -> list[int]:
    """A question as the model expects it: a chat turn through the chat template, or for a base model (no
    template) a "Question: … Answer:" completion prompt."""
    if getattr(tokenizer, "chat_template", None):
        return chat_token_ids(tokenizer, question)
    return tokenizer(f"Question: {question}\nAnswer:")["input_ids"]


def run_demo(model_name: str = "smollm2", sae_source: str | None = None, layer: int | None = None,
             prompt: str | None = None, echo: Callable[[str], None] = print) -> object:
    """Entry point of ``qscope demo``."""
    if model_name == "tiny":
        return tiny_demo(prompt or "Sparse autoencoders find features.", layer=layer or 1, echo=echo)
    from .loading import load_model, load_sae
    from .smollm2 import ASSETS, shipped_metrics

    if sae_source is None and model_name != "smollm2":
        raise ConfigError(f"the shipped SAEs are SmolLM2's: pass --sae (a Qwen-Scope release, an SAE directory or "
                          f"file) and --layer for --model {model_name}")
    if sae_source is not None and layer is None:
        layer = _only_layer(sae_source)
    model, tokenizer = load_model(model_name)
    if sae_source is None:
        sae_source, layer = "smollm2", layer or shipped_metrics()["layers"][0]
        echo(f"SmolLM2-135M-Instruct with qscope's layer-{layer} SAE (explained variance on held-out text "
             f"{shipped_metrics()['metrics'][str(layer)]['explained']:.2f})")
    sae = load_sae(sae_source, layer, model=model)
    contrast = json.loads((ASSETS / "steering_texts.json").read_text())
    shown = contrast_demo(model, tokenizer, sae, prompt or "Tell me about your morning.", contrast, echo=echo)
    if model_name == "smollm2":
        echo("on 30 held-out questions (benchmarks/RESULTS.md §5) no SAE feature steers SmolLM2 into French on its "
             "own, and adding one to the instruction does not beat the instruction alone; for a topic (the sea) a "
             "gentle SAE-TS targeted vector plus the instruction does best.")
    return shown


def _only_layer(sae_source: str) -> int:
    """The layer of the SAE at ``sae_source`` when it holds exactly one; else an error asking for --layer."""
    path = Path(sae_source)
    layers = layers_in(path) if path.is_dir() else []
    if layers:
        if len(layers) != 1:
            raise ConfigError(f"{path} holds SAEs for layers {layers}: pass --layer")
        return layers[0]
    try:
        sae = SparseAutoencoder.from_pretrained(sae_source)
    except ConfigError as error:
        raise ConfigError(f"pass --layer: {error}") from None
    if sae.layer is None:
        raise ConfigError(f"{sae_source} does not say which layer it reads: pass --layer")
    return sae.layer
