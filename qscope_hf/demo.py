"""``qscope demo``: encode a prompt with an SAE and show the top features per token and the reconstruction error."""

from __future__ import annotations

from collections.abc import Callable

import torch

from .hooks import check_sae_fits, layer_outputs
from .sae import SparseAutoencoder
from .tiny import tiny_model, tiny_sae, tiny_tokenizer


def fraction_of_variance_unexplained(x: torch.Tensor, reconstruction: torch.Tensor) -> float:
    """``Σ‖x − x̂‖² / Σ‖x − mean(x)‖²`` over the rows of ``x [N, d]``."""
    residual = (x - reconstruction).pow(2).sum()
    total = (x - x.mean(dim=0, keepdim=True)).pow(2).sum()
    return float(residual / total)


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
        echo(f"  {token!r:>10}  {features}")
    fvu = fraction_of_variance_unexplained(hidden, reconstruction)
    echo(f"reconstruction: fraction of variance unexplained {fvu:.3f} (explained {1 - fvu:.3f})")
    return fvu


def tiny_demo(prompt: str = "Sparse autoencoders find features.", *, layer: int = 1,
              echo: Callable[[str], None] = print) -> float:
    """The offline demo: a tiny random Qwen3 model and a tiny random SAE (features carry no meaning)."""
    model, tokenizer = tiny_model("qwen3"), tiny_tokenizer()
    sae = tiny_sae(d_model=model.config.hidden_size, d_sae=256, k=8, layer=layer)
    echo("tiny Qwen3 (4 layers, hidden 64, random weights) with a tiny random SAE (d_sae=256, k=8)")
    return describe_prompt(model, tokenizer, sae, prompt, echo=echo)
