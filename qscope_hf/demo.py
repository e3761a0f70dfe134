"""``qscope demo``: what an SAE sees in a prompt, and steering generation with a feature found by contrast.

By default on SmolLM2-135M-Instruct with the SAEs qscope trained and ships (offline): the prompt's strongest
features with their top contexts from a small English + French corpus, the features that tell French from
English, and a greedy generation without and with the top French feature steered in. ``--model``/``--sae``/
``--layer`` run the same on any model and SAE source (a Qwen-Scope release uses the hub when reachable);
``--model tiny`` runs the offline tiny model with a random SAE (what the tests use).
"""

from __future__ import annotations

import json
from collections.abc import Callable

import torch

from .corpus import chat_token_ids
from .discovery import activation_stats, contrast_features, residual_norm
from .hooks import check_sae_fits, layer_outputs
from .sae import SparseAutoencoder, fraction_of_variance_unexplained
from .steering import SAELogitsProcessor, Steering
from .tiny import tiny_model, tiny_sae, tiny_tokenizer

CONTRAST_TEXTS = 24
#: Steering strength as a fraction of the residual stream's median norm at the SAE's layer.
STRENGTH_OF_NORM = 0.6


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
    """Features of ``prompt`` with top contexts, features telling ``contrast["fr"]`` from ``contrast["en"]``, and
    generation without / with the top French feature. Returns what it showed."""
    layer = check_sae_fits(model, sae)
    french, english = contrast["fr"][:CONTRAST_TEXTS], contrast["en"][:CONTRAST_TEXTS]
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

    rows = [r for r in contrast_features(stats_fr, stats_en, top=10) if r.rate_diff > 0]
    echo("\nfeatures firing more on French than on English text (rate FR / EN):")
    for r in rows[:5]:
        echo(f"  #{r.feature:<5d} {r.rate_a:.2f} / {r.rate_b:.2f}")
    best = rows[0]
    norm = residual_norm(model, tokenizer, layer, french + english)
    strength = STRENGTH_OF_NORM * norm
    spec = Steering(sae, best.feature, strength, positions="generated")
    ids = torch.tensor([chat_token_ids(tokenizer, prompt)])
    chat = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    options = dict(max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    plain = model.generate(**chat, **options)
    steered = model.generate(**chat, **options, logits_processor=[SAELogitsProcessor(model, spec)])
    start = chat["input_ids"].shape[1]
    texts = {name: tokenizer.decode(out[0, start:], skip_special_tokens=True) for name, out in
             (("unsteered", plain), ("steered", steered))}
    echo(f"\ngeneration, unsteered:\n  {texts['unsteered']!r}")
    echo(f"steered with feature #{best.feature} on the generated tokens at strength {strength:.0f} "
         f"({STRENGTH_OF_NORM} x the residual stream's median norm {norm:.0f}):\n  {texts['steered']!r}")
    return {"feature": best.feature, "strength": strength, **texts}


def run_demo(model_name: str = "smollm2", sae_source: str | None = None, layer: int | None = None,
             prompt: str | None = None, echo: Callable[[str], None] = print) -> object:
    """Entry point of ``qscope demo``."""
    if model_name == "tiny":
        return tiny_demo(prompt or "Sparse autoencoders find features.", layer=layer or 1, echo=echo)
    from .loading import load_model, load_sae
    from .smollm2 import ASSETS, shipped_metrics

    model, tokenizer = load_model(model_name)
    if sae_source is None:
        sae_source, layer = "smollm2", layer or shipped_metrics()["layers"][0]
        echo(f"SmolLM2-135M-Instruct with qscope's layer-{layer} SAE (explained variance on held-out text "
             f"{shipped_metrics()['metrics'][str(layer)]['explained']:.2f})")
    if layer is None:
        raise ValueError("pass --layer with --sae")
    sae = load_sae(sae_source, layer, model=model)
    contrast = json.loads((ASSETS / "contrast.json").read_text())
    return contrast_demo(model, tokenizer, sae, prompt or "Tell me about your morning.", contrast, echo=echo)
