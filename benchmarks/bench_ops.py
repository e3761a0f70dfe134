"""Benchmark the SAE op module against naive torch, SAELens and the bare GEMM, in one run.

    python benchmarks/bench_ops.py                      # CPU, real release shapes (slow: ~20 min on 2 cores)
    python benchmarks/bench_ops.py --quick              # CPU, small shapes only
    python benchmarks/bench_ops.py --parts train        # only some of the tables (encode, decode, train)
    python benchmarks/bench_ops.py --device cuda        # GPU, adds Triton, correctness and a kernel-config sweep

Encode methods, all on the same weights: ``gemm`` (``x @ W_enc.T`` alone, the floor), ``naive``
(``relu(x @ W_enc.T + b_enc).topk(k)``), ``saelens`` (SAELens' ``TopKSAE.encode``; needs ``sae-lens``),
``chunked`` and ``triton`` (qscope). Decode: ``dense`` (``z @ W_dec.T + b_dec`` from dense codes) vs qscope's
sparse decode. Prints markdown tables and writes the raw numbers as JSON (``--out``).

Time is the median of repeated runs (CUDA: ``triton.testing.do_bench``). Peak extra memory is measured on CUDA
with ``torch.cuda.max_memory_allocated`` and on CPU as the growth of the process's peak RSS while running the
method once in a fresh subprocess.
"""

from __future__ import annotations

import argparse
import ctypes
import datetime
import functools
import json
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from qscope_hf import ops

SHAPES = {  # name: (d_model, d_sae, k)
    "small": (512, 4096, 32),
    "Qwen3-1.7B W32K": (2048, 32768, 50),
    "Qwen3-8B W64K": (4096, 65536, 50),
    "Qwen3-30B-A3B W128K": (2048, 131072, 100),
}
TOKENS = (512, 4096)
ENCODERS = ("gemm", "naive", "saelens", "chunked", "triton")


def make_weights(d_model: int, d_sae: int, dtype: torch.dtype, device: str, seed: int = 0):
    g = torch.Generator(device=device).manual_seed(seed)
    W_enc = (torch.randn(d_sae, d_model, generator=g, device=device) / d_model**0.5).to(dtype)
    b_enc = (0.1 * torch.randn(d_sae, generator=g, device=device) - 0.5).to(dtype)
    W_dec = torch.randn(d_sae, d_model, generator=g, device=device).to(dtype).T  # feature-major, as the SAE stores it
    b_dec = torch.zeros(d_model, device=device, dtype=dtype)
    return W_enc, b_enc, W_dec, b_dec


def make_x(n: int, d_model: int, dtype: torch.dtype, device: str, seed: int = 1):
    g = torch.Generator(device=device).manual_seed(seed)
    return torch.randn(n, d_model, generator=g, device=device).to(dtype)


def saelens_sae(W_enc, b_enc, W_dec, b_dec, k):
    from sae_lens import TopKSAE, TopKSAEConfig

    d_sae, d_model = W_enc.shape
    cfg = TopKSAEConfig(d_in=d_model, d_sae=d_sae, k=k, dtype=str(W_enc.dtype).removeprefix("torch."),
                        device=str(W_enc.device), apply_b_dec_to_input=False)
    sae = TopKSAE(cfg)
    with torch.no_grad():
        sae.W_enc.copy_(W_enc.T)
        sae.b_enc.copy_(b_enc)
        sae.W_dec.copy_(W_dec.T)
        sae.b_dec.copy_(b_dec)
    return sae


def encoder(method: str, W_enc, b_enc, W_dec, b_dec, k):
    """A callable ``x -> result`` for one encode method."""
    if method == "gemm":
        return lambda x: x @ W_enc.T
    if method == "naive":
        return lambda x: torch.relu(x @ W_enc.T + b_enc).topk(k, dim=-1)
    if method == "saelens":
        sae = saelens_sae(W_enc, b_enc, W_dec, b_dec, k)
        return sae.encode
    return lambda x: ops.topk_encode(x, W_enc, b_enc, k, backend=method)


def available(method: str, device: str) -> bool:
    if method == "saelens":
        try:
            import sae_lens  # noqa: F401
        except ImportError:
            return False
    return method != "triton" or device == "cuda"


def median_time(device: str, reps: int, fn, *args) -> float:
    """Median seconds per call of ``fn(*args)``."""
    call = functools.partial(fn, *args)
    if device == "cuda":
        import triton.testing

        return triton.testing.do_bench(call, warmup=25, rep=200, return_mode="median") / 1e3
    call()
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        call()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def cuda_peak_extra(fn, *args) -> int:
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    result = fn(*args)
    torch.cuda.synchronize()
    del result
    return torch.cuda.max_memory_allocated() - base


def cpu_peak_extra(method: str, n: int, shape: str, dtype: str) -> int:
    """Peak RSS growth (bytes) of one call in a fresh process."""
    out = subprocess.run([sys.executable, __file__, "--probe", method, str(n), shape, dtype],
                         capture_output=True, text=True, check=True)
    return int(out.stdout.strip().splitlines()[-1])


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def probe(method: str, n: int, shape: str, dtype_name: str) -> None:
    """Print the peak RSS growth (bytes) of one call: free heap pages are returned to the OS and the kernel's
    high-water mark is reset (``/proc/self/clear_refs``) right before the call, so setup does not hide it."""
    d_model, d_sae, k = SHAPES[shape]
    dtype = getattr(torch, dtype_name)
    weights = make_weights(d_model, d_sae, dtype, "cpu")
    x = make_x(n, d_model, dtype, "cpu")
    fn = encoder(method, *weights, k)
    fn(make_x(4, d_model, dtype, "cpu"))  # load kernels / libraries before measuring
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    Path("/proc/self/clear_refs").write_text("5")
    before = _status_kib("VmRSS")
    result = fn(x)
    after = _status_kib("VmHWM")
    del result
    print((after - before) * 1024)


def check_triton(x, W_enc, b_enc, k) -> dict:
    """Triton vs reference on one batch: index agreement (a mismatch must be a near-tie) and value error."""
    values, indices = ops.topk_encode(x, W_enc, b_enc, k, backend="triton")
    ref_values, ref_indices = ops.topk_encode(x, W_enc, b_enc, k, backend="chunked")
    same_sets = (indices.sort(-1).values == ref_indices.sort(-1).values).all(-1)
    error = ((values.float() - ref_values.float()).norm() / ref_values.float().norm()).item()
    return {"rows_with_identical_sets": float(same_sets.float().mean()), "relative_value_error": error}


def run_encode(device: str, dtype: torch.dtype, shapes: list[str], tokens: tuple[int, ...], reps: int) -> list[dict]:
    rows = []
    for shape in shapes:
        d_model, d_sae, k = SHAPES[shape]
        weights = make_weights(d_model, d_sae, dtype, device)
        for n in tokens:
            x = make_x(n, d_model, dtype, device)
            row = {"shape": shape, "tokens": n, "d_model": d_model, "d_sae": d_sae, "k": k,
                   "dense_bytes": n * d_sae * x.element_size()}
            for method in ENCODERS:
                if not available(method, device):
                    continue
                fn = encoder(method, *weights, k)
                row[f"{method}_s"] = median_time(device, reps, fn, x)
                row[f"{method}_extra_bytes"] = (cuda_peak_extra(fn, x) if device == "cuda" else
                                                cpu_peak_extra(method, n, shape, str(dtype).removeprefix("torch.")))
                print(f"  {shape} N={n} {method}: {row[f'{method}_s'] * 1e3:.2f} ms, "
                      f"extra {row[f'{method}_extra_bytes'] / 2**20:.1f} MiB", flush=True)
            if device == "cuda":
                row["triton_check"] = check_triton(x, weights[0], weights[1], k)
            rows.append(row)
    return rows


def run_decode(device: str, dtype: torch.dtype, shapes: list[str], tokens: tuple[int, ...], reps: int) -> list[dict]:
    rows = []
    backends = ["chunked"] + (["triton"] if device == "cuda" else [])
    for shape in shapes:
        d_model, d_sae, k = SHAPES[shape]
        W_enc, b_enc, W_dec, b_dec = make_weights(d_model, d_sae, dtype, device)
        for n in tokens:
            x = make_x(n, d_model, dtype, device)
            values, indices = ops.topk_encode(x, W_enc, b_enc, k, backend="chunked")
            dense = ops.dense_codes(values, indices, d_sae)
            row = {"shape": shape, "tokens": n, "k_over_d_sae": k / d_sae,
                   "gathered_bytes": n * k * d_model * W_dec.element_size(),  # one decoder row per selected entry
                   "dense_s": median_time(device, reps, torch.addmm, b_dec, dense, W_dec.T)}
            for backend in backends:
                decode = functools.partial(ops.sparse_decode, backend=backend, check_indices=False)  # as sae(x)
                row[f"{backend}_s"] = median_time(device, reps, decode, values, indices, W_dec, b_dec)
            rows.append(row)
            print(f"  decode {shape} N={n}: " + ", ".join(f"{key} {v * 1e3:.2f} ms" for key, v in row.items()
                                                          if key.endswith("_s")), flush=True)
    return rows


def train_step(x, params, k, backend):
    """Encode + decode + MSE + backward, as one SAE training step computes them (no optimizer)."""
    W_enc, b_enc, W_dec, b_dec = params
    if backend == "naive":
        values, indices = torch.relu(x @ W_enc.T + b_enc).topk(k, dim=-1)
        dense = torch.zeros(x.shape[0], W_enc.shape[0], dtype=x.dtype, device=x.device).scatter(-1, indices, values)
        recon = dense @ W_dec.T + b_dec
    else:
        values, indices = ops.topk_encode(x, W_enc, b_enc, k, backend=backend)
        recon = ops.sparse_decode(values, indices, W_dec, b_dec, backend=backend, check_indices=False)
    loss = (recon.float() - x.float()).pow(2).mean()
    loss.backward()
    for p in params:
        p.grad = None


def run_train(device: str, dtype: torch.dtype, shapes: list[str], tokens: tuple[int, ...], reps: int) -> list[dict]:
    rows = []
    backends = ["naive", "chunked"] + (["triton"] if device == "cuda" else [])
    for shape in shapes:
        d_model, d_sae, k = SHAPES[shape]
        params = [t.detach().clone().requires_grad_() for t in make_weights(d_model, d_sae, dtype, device)]
        params[2] = params[2].detach().T.contiguous().T.requires_grad_()  # keep the feature-major decoder
        for n in tokens:
            x = make_x(n, d_model, dtype, device)
            row = {"shape": shape, "tokens": n}
            for backend in backends:
                row[f"{backend}_s"] = median_time(device, reps, train_step, x, params, k, backend)
                if device == "cuda":
                    row[f"{backend}_extra_bytes"] = cuda_peak_extra(train_step, x, params, k, backend)
            rows.append(row)
            print(f"  train step {shape} N={n}: " + ", ".join(f"{b} {row[f'{b}_s'] * 1e3:.1f} ms" for b in backends),
                  flush=True)
    return rows


def train_table(rows: list[dict]) -> str:
    backends = [b for b in ("naive", "chunked", "triton") if any(f"{b}_s" in r for r in rows)]
    head = "| shape | N | " + " | ".join(f"{b} ms" for b in backends) + " | naive ÷ qscope |"
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        ours = "triton" if "triton_s" in r else "chunked"
        lines.append(f"| {r['shape']} | {r['tokens']} | " + " | ".join(f"{r[f'{b}_s'] * 1e3:.1f}" for b in backends)
                     + f" | {r['naive_s'] / r[f'{ours}_s']:.2f}× |")
    return "\n".join(lines)


def encode_table(rows: list[dict]) -> str:
    methods = [m for m in ENCODERS if any(f"{m}_s" in r for r in rows)]
    head = ("| shape | N | " + " | ".join(f"{m} ms" for m in methods)
            + " | qscope ÷ naive | qscope ÷ gemm | qscope ÷ SAELens | extra MiB: " + " / ".join(methods)
            + " | dense N×d_sae MiB |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        ours = "triton" if "triton_s" in r else "chunked"
        ratios = [f"{r[f'{ours}_s'] / r[f'{other}_s']:.2f}" if f"{other}_s" in r else "n/a"
                  for other in ("naive", "gemm", "saelens")]
        lines.append(
            f"| {r['shape']} | {r['tokens']} | " + " | ".join(f"{r[f'{m}_s'] * 1e3:.1f}" for m in methods)
            + f" | {' | '.join(ratios)} | "
            + " / ".join(f"{r[f'{m}_extra_bytes'] / 2**20:.0f}" for m in methods)
            + f" | {r['dense_bytes'] / 2**20:.0f} |")
    return "\n".join(lines)


def decode_table(rows: list[dict]) -> str:
    backends = [b for b in ("chunked", "triton") if any(f"{b}_s" in r for r in rows)]
    head = ("| shape | N | k/d_sae | dense ms | " + " | ".join(f"{b} ms | dense ÷ {b}" for b in backends)
            + f" | {backends[-1]} reads GB/s |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        cells = " | ".join(f"{r[f'{b}_s'] * 1e3:.2f} | {r['dense_s'] / r[f'{b}_s']:.1f}×" for b in backends)
        rate = r["gathered_bytes"] / r[f"{backends[-1]}_s"] / 1e9
        lines.append(f"| {r['shape']} | {r['tokens']} | 1/{round(1 / r['k_over_d_sae'])} | "
                     f"{r['dense_s'] * 1e3:.2f} | {cells} | {rate:.0f} |")
    return "\n".join(lines)


#: Each part of the benchmark: how to measure it, how to tabulate it.
PARTS = {"encode": (run_encode, encode_table), "decode": (run_decode, decode_table), "train": (run_train, train_table)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--dtype", default=None, help="default: float32 on CPU, bfloat16 on CUDA")
    parser.add_argument("--quick", action="store_true", help="only the small shape")
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--parts", nargs="+", default=list(PARTS), choices=list(PARTS), help="which tables to measure")
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--render", type=Path, default=None, help="print the tables of an earlier --out file")
    parser.add_argument("--probe", nargs=4, metavar=("METHOD", "N", "SHAPE", "DTYPE"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.probe:
        method, n, shape, dtype = args.probe
        probe(method, int(n), shape, dtype)
        return
    if args.render:
        result = json.loads(args.render.read_text())
        print("\n\n".join(table(result[part]) for part, (_, table) in PARTS.items() if part in result))
        return
    dtype = getattr(torch, args.dtype or ("bfloat16" if args.device == "cuda" else "float32"))
    shapes = ["small"] if args.quick else list(SHAPES)
    machine = (torch.cuda.get_device_name() if args.device == "cuda"
               else f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads")
    print(f"# {machine}, torch {torch.__version__}, {dtype}", flush=True)
    result = {"machine": machine, "date": datetime.date.today().isoformat(), "torch": torch.__version__,
              "dtype": str(dtype), "command": " ".join(sys.argv)}
    tables = []
    for part in args.parts:
        run, table = PARTS[part]
        result[part] = run(args.device, dtype, shapes, TOKENS, args.reps)
        tables.append(table(result[part]))
    print("\n" + "\n\n".join(tables))
    if args.out:
        args.out.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
