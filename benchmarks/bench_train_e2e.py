"""SAE training end to end — text → model forward → SAE — qscope's trainer vs sparsify's ``Trainer``, in one run.

    python benchmarks/bench_train_e2e.py [--tokens 131072] [--out results/train_e2e.json]

Same model (SmolLM2-135M-Instruct, fp32, CPU), same texts (docstring and Faker paragraphs, the corpus of
``sae_defaults.py``), layer 15, 4096 latents, k = 32, 4096 tokens per step, Adam at the same learning rate, AuxK
weight 1/32, the same number of training tokens. Each trainer runs in its own process (so peak memory is its own):
qscope's :class:`~qscope_hf.training.SAETrainer` with its data path (length-sorted padded forwards that stop after
the last trained layer, a shuffled activation buffer), sparsify's ``Trainer`` with its own (``chunk_and_tokenize``
packs texts into 256-token chunks; the whole model runs forward; no buffer). Reported per trainer: training tokens
per second (wall time of ``fit``), peak resident memory, held-out FVU on the same held-out activations (real
tokens, each text's first left out), and for qscope where the time goes (tokenisation, model forward, buffer and
shuffling, SAE steps), timed inside the run.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

import torch

LAYER, D_SAE, K, BATCH, CONTEXT = 15, 4096, 32, 4096, 256
LR = 2e-4 / math.sqrt(D_SAE / 16384)


def texts() -> tuple[list[str], list[str]]:
    sys.path.insert(0, str(Path(__file__).parent))
    from sae_defaults import corpus

    return corpus(0)


@torch.no_grad()
def held_out_activations(model, tokenizer, held: list[str]) -> torch.Tensor:
    """``[n, d]`` layer-15 activations of the held-out texts' real tokens, each text's first left out."""
    from qscope_hf.corpus import layer_batches

    return torch.cat([batch.hidden[LAYER][batch.counted(skip_first=True)] for batch in layer_batches(
        model, tokenizer, [LAYER], held, batch_size=16, max_length=CONTEXT, progress=False)])


def fvu(reconstruct, x: torch.Tensor) -> float:
    from qscope_hf.sae import fraction_of_variance_unexplained

    with torch.no_grad():
        return float(fraction_of_variance_unexplained(x, reconstruct(x)))


def run_qscope(tokens: int) -> dict:
    from qscope_hf.smollm2 import load_model
    from qscope_hf.training import SAETrainer, TrainConfig

    class Timed(SAETrainer):
        """The trainer with its stages timed (seconds, summed over the run)."""

        seconds = {"texts: tokenise, sort, forward": 0.0, "forward (padded batch, filter)": 0.0, "SAE steps": 0.0}

        @contextmanager
        def timed(self, stage: str):
            start = time.perf_counter()
            try:
                yield
            finally:
                self.seconds[stage] += time.perf_counter() - start

        def _activations(self, batch):
            with self.timed("texts: tokenise, sort, forward"):
                return super()._activations(batch)

        def _forward_activations(self, batch):
            with self.timed("forward (padded batch, filter)"):
                return super()._forward_activations(batch)

        def _step(self, layer, x):
            with self.timed("SAE steps"):
                return super()._step(layer, x)

    model, tokenizer = load_model()
    train, held = texts()
    trainer = Timed(model, tokenizer, TrainConfig(layers=[LAYER], d_sae=D_SAE, k=K, batch_tokens=BATCH, lr=LR,
                                                  total_tokens=tokens, context_length=CONTEXT, seed=0))
    start = time.perf_counter()
    trainer.fit(train, progress=False)
    seconds = time.perf_counter() - start
    sae = trainer.saes[LAYER]
    stages = dict(trainer.seconds)  # the forwards run inside _activations: split its time
    stages["tokenise for lengths, sort"] = stages.pop("texts: tokenise, sort, forward") - stages[
        "forward (padded batch, filter)"]
    stages["buffer, shuffling, rest"] = seconds - sum(stages.values())
    return {"seconds": seconds, "tokens": trainer.tokens, "stages": stages,
            "held_out_fvu": fvu(sae, held_out_activations(model, tokenizer, held[:100]))}


def run_sparsify(tokens: int) -> dict:
    os.environ["SPARSIFY_DISABLE_TRITON"] = "1"  # its Triton decoder needs a GPU
    import datasets
    from sparsify import SparseCoderConfig, Trainer
    from sparsify import TrainConfig as SparsifyConfig
    from sparsify.data import chunk_and_tokenize

    from qscope_hf.smollm2 import load_model

    model, tokenizer = load_model()
    train, held = texts()
    chunks = chunk_and_tokenize(datasets.Dataset.from_dict({"text": train}), tokenizer, max_seq_len=CONTEXT,
                                num_proc=1)
    rows = BATCH // CONTEXT
    chunks = chunks.select(range(min(len(chunks), tokens // CONTEXT)))
    with tempfile.TemporaryDirectory() as save_dir:
        config = SparsifyConfig(SparseCoderConfig(num_latents=D_SAE, k=K), batch_size=rows, layers=[LAYER],
                                optimizer="adam", lr=LR, lr_warmup_steps=0, auxk_alpha=1 / 32, log_to_wandb=False,
                                save_every=10**9, save_dir=save_dir, init_seeds=[0])
        torch.manual_seed(0)
        trainer = Trainer(config, chunks, model)
        start = time.perf_counter()
        trainer.fit()
        seconds = time.perf_counter() - start
    sae = next(iter(trainer.saes.values()))
    return {"seconds": seconds, "tokens": len(chunks) // rows * rows * CONTEXT,
            "held_out_fvu": fvu(lambda x: sae(x).sae_out, held_out_activations(model, tokenizer, held[:100]))}


def child(name: str, tokens: int) -> None:
    """Run one trainer and print its record (with this process's peak memory) as JSON."""
    record = {"qscope": run_qscope, "sparsify": run_sparsify}[name](tokens)
    record["tokens_per_s"] = record["tokens"] / record["seconds"]
    record["peak_rss_gb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    print("RESULT " + json.dumps(record), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=131072)
    parser.add_argument("--out", type=Path)
    parser.add_argument("--child", choices=["qscope", "sparsify"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child, args.tokens)
        return
    results = {}
    for name in ("qscope", "sparsify"):
        done = subprocess.run([sys.executable, __file__, "--child", name, "--tokens", str(args.tokens)],
                              capture_output=True, text=True, check=True)
        results[name] = json.loads(done.stdout.split("RESULT ", 1)[1])
        record = results[name]
        print(f"{name}: {record['tokens_per_s']:.0f} training tokens/s, peak {record['peak_rss_gb']:.2f} GB, "
              f"held-out FVU {record['held_out_fvu']:.3f} ({record['tokens']} tokens, {record['seconds']:.0f} s)",
              flush=True)
    ratio = results["qscope"]["tokens_per_s"] / results["sparsify"]["tokens_per_s"]
    stages = results["qscope"]["stages"]
    print(f"qscope ÷ sparsify end to end: {ratio:.2f}; qscope's time: " +
          ", ".join(f"{k} {v / results['qscope']['seconds']:.0%}" for k, v in stages.items()))
    if args.out:
        args.out.write_text(json.dumps({
            "machine": f"{platform.machine()}, {torch.get_num_threads()} threads", "date": time.strftime("%Y-%m-%d"),
            "command": "python benchmarks/bench_train_e2e.py " + " ".join(sys.argv[1:]), "results": results,
            "throughput_ratio": ratio}, indent=2))


if __name__ == "__main__":
    main()
