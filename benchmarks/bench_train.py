"""SAE training throughput and quality: qscope's trainer vs sparsify's training step, same activations, same run.

    python benchmarks/bench_train.py [--tokens 262144] [--epochs 2] [--out results.json]

Activations: SmolLM2-135M-Instruct (bf16) at layer 15 on docstring paragraphs of the standard library and ML
packages (the English part of the shipped SAEs' corpus), cached once; the last 10 % are held out. Both trainers get
the same activations in the same order, width 4096, k = 32, batches of 4096 tokens, Adam at the same learning rate,
AuxK weight 1/32, unit-norm decoder columns. qscope runs :meth:`SAETrainer.fit_activations` (the CPU streaming
backend); sparsify (``eai-sparsify``) runs its ``SparseCoder`` forward (which computes all pre-activations) with
the loss and decoder handling of its trainer. Reported: tokens/s and held-out FVU after the same token budget.
SAELens' trainer needs its own activation store and is not wired here.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import sys
import time
from pathlib import Path

import torch
from smollm2_saes import docstring_paragraphs

from qscope_hf.hooks import layer_outputs
from qscope_hf.sae import fraction_of_variance_unexplained
from qscope_hf.smollm2 import load_model
from qscope_hf.training import SAETrainer, TrainConfig

LAYER, D_SAE, K, BATCH = 15, 4096, 32, 4096


@torch.no_grad()
def harvest(tokens: int) -> torch.Tensor:
    model, tokenizer = load_model(torch.bfloat16)
    texts, chunks, total = docstring_paragraphs(), [], 0
    for start in range(0, len(texts), 16):
        inputs = tokenizer(texts[start:start + 16], return_tensors="pt", padding=True, truncation=True,
                           max_length=256)
        hidden = layer_outputs(model, [LAYER], **inputs)[LAYER]
        keep = inputs["attention_mask"].bool() & (inputs["attention_mask"].cumsum(1) > 1)
        chunks.append(hidden[keep].float())
        total += len(chunks[-1])
        if total >= tokens:
            break
    return torch.cat(chunks)[:tokens]


def fvu(reconstruct, x: torch.Tensor) -> float:
    with torch.no_grad():
        return float(fraction_of_variance_unexplained(x, reconstruct(x)))


def run_qscope(train: torch.Tensor, held: torch.Tensor, epochs: int, lr: float) -> dict:
    model, tokenizer = load_model(torch.bfloat16)
    trainer = SAETrainer(model, tokenizer, TrainConfig(layers=[LAYER], d_sae=D_SAE, k=K, batch_tokens=BATCH, lr=lr,
                                                       dead_after_tokens=100_000, seed=0,
                                                       total_tokens=epochs * len(train)))
    start = time.perf_counter()
    trainer.fit_activations(train[:, None], epochs=epochs, progress=False)
    seconds = time.perf_counter() - start
    return {"tokens_per_s": trainer.tokens / seconds, "held_out_fvu": fvu(trainer.saes[LAYER], held),
            "tokens": trainer.tokens}


def run_sparsify(train: torch.Tensor, held: torch.Tensor, epochs: int, lr: float) -> dict:
    if not torch.cuda.is_available():  # sparsify picks its Triton decoder whenever Triton imports, even on CPU
        os.environ["SPARSIFY_DISABLE_TRITON"] = "1"
    from sparsify import SparseCoder, SparseCoderConfig

    torch.manual_seed(0)
    sae = SparseCoder(train.shape[1], SparseCoderConfig(num_latents=D_SAE, k=K))
    optimizer = torch.optim.Adam(sae.parameters(), lr=lr)
    since_fired = torch.zeros(D_SAE, dtype=torch.long)
    generator = torch.Generator().manual_seed(1)
    tokens, start = 0, time.perf_counter()
    for _ in range(epochs):
        order = torch.randperm(len(train), generator=generator)
        for first in range(0, len(train) - BATCH + 1, BATCH):
            x = train[order[first:first + BATCH]]
            if tokens == 0:
                with torch.no_grad():
                    sae.b_dec.copy_(x.mean(0))
            out = sae(x, dead_mask=since_fired > 100_000)
            loss = out.fvu + out.auxk_loss / 32
            optimizer.zero_grad()
            loss.backward()
            sae.remove_gradient_parallel_to_decoder_directions()
            optimizer.step()
            sae.set_decoder_norm_to_unit_norm()
            fired = torch.zeros(D_SAE, dtype=torch.bool)
            fired[out.latent_indices.flatten()] = True
            since_fired += BATCH
            since_fired[fired] = 0
            tokens += BATCH
    seconds = time.perf_counter() - start
    return {"tokens_per_s": tokens / seconds, "held_out_fvu": fvu(lambda x: sae(x).sae_out, held), "tokens": tokens}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=262144)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    acts = harvest(args.tokens)
    split = int(0.9 * len(acts))
    train, held = acts[:split], acts[split:]
    lr = 2e-4 / math.sqrt(D_SAE / 16384)
    results = {"qscope": run_qscope(train, held, args.epochs, lr), "sparsify": run_sparsify(train, held, args.epochs,
                                                                                            lr)}
    ratio = results["qscope"]["tokens_per_s"] / results["sparsify"]["tokens_per_s"]
    for name, r in results.items():
        print(f"{name}: {r['tokens_per_s']:.0f} tokens/s, held-out FVU {r['held_out_fvu']:.3f} after {r['tokens']} "
              f"tokens", flush=True)
    print(f"qscope ÷ sparsify throughput: {ratio:.2f}")
    if args.out:
        args.out.write_text(json.dumps({"machine": f"{platform.machine()}, {torch.get_num_threads()} threads",
                                        "date": datetime.date.today().isoformat(), "command": " ".join(sys.argv),
                                        "activations": len(acts), "results": results, "throughput_ratio": ratio},
                                       indent=2))


if __name__ == "__main__":
    main()
