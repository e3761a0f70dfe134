"""Tune and dissect the fused Triton encode on a GPU: kernel-config sweep and a time breakdown.

    python benchmarks/tune_triton.py [--shape "Qwen3-1.7B W32K"] [--tokens 4096] [--out tune.json]

Sweeps the encode kernel's tile sizes, warps and stages (``encode_config`` is set from the winners), timing each
configuration against cuBLAS' GEMM alone; then splits the best configuration's
time into the sampled threshold (a 1/32 GEMM and a k-th largest per row), the fused kernel, and the exact
selection among candidates.
"""

from __future__ import annotations

import argparse
import itertools
import json
from pathlib import Path

import torch
import triton.testing
from bench_ops import SHAPES, make_weights, make_x

from qscope_hf.ops import triton_kernels as tk


def bench(fn) -> float:
    return triton.testing.do_bench(fn, warmup=25, rep=200, return_mode="median")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--shape", default="Qwen3-1.7B W32K", choices=list(SHAPES))
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    d_model, d_sae, k = SHAPES[args.shape]
    dtype = getattr(torch, args.dtype)
    W, b, _, _ = make_weights(d_model, d_sae, dtype, "cuda")
    x = make_x(args.tokens, d_model, dtype, "cuda")
    gemm_ms = bench(lambda: x @ W.T)
    threshold = tk.sample_threshold(x, W, b, k, tk.SAMPLE_STRIDE)
    capacity = tk.default_capacity(k)
    sweep = []
    for bm, bn, bk, warps, stages in itertools.product((64, 128), (64, 128, 256), (64, 128), (4, 8), (3, 4)):
        config = {"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": 8, "num_warps": warps, "num_stages": stages}
        try:
            ms = bench(lambda config=config: tk.launch_encode(x, W, b, threshold, capacity, config))
        except Exception as error:  # out of shared memory / registers for this config
            print(f"skip {config}: {type(error).__name__}")
            continue
        sweep.append({**config, "kernel_ms": ms})
        print(f"{config}: {ms:.3f} ms ({ms / gemm_ms:.2f}× cuBLAS GEMM)", flush=True)
    sweep.sort(key=lambda row: row["kernel_ms"])
    best = {key: sweep[0][key] for key in ("BLOCK_M", "BLOCK_N", "BLOCK_K", "GROUP_M", "num_warps", "num_stages")}
    counts, keys = tk.launch_encode(x, W, b, threshold, capacity, best)
    breakdown = {
        "cublas_gemm_ms": gemm_ms,
        "threshold_ms": bench(lambda: tk.sample_threshold(x, W, b, k, tk.SAMPLE_STRIDE)),
        "kernel_ms": sweep[0]["kernel_ms"],
        "select_ms": bench(lambda: tk.select_from_keys(keys, k)),
        "pipeline_ms": bench(lambda: tk.select_topk(x, W, b, k, config=best)),
        "default_config_pipeline_ms": bench(lambda: tk.select_topk(x, W, b, k)),
        "candidates_per_row_mean": float(counts.float().mean()), "candidates_per_row_max": int(counts.max()),
        "rows_refused": int(((counts < k) | (counts > capacity)).sum()), "capacity": capacity,
    }
    print(json.dumps({"best": best, **breakdown}, indent=2))
    if args.out:
        args.out.write_text(json.dumps({"shape": args.shape, "tokens": args.tokens, "dtype": args.dtype,
                                        "device": torch.cuda.get_device_name(), "best": best,
                                        "breakdown": breakdown, "sweep": sweep}, indent=2))


if __name__ == "__main__":
    main()
