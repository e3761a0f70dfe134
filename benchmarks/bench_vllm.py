"""vLLM generation throughput with qscope steering ÷ without, on SmolLM2-135M-Instruct, measured in one run.

    .venv-vllm/bin/python benchmarks/bench_vllm.py [--batch 1 8] [--tokens 64] [--repeats 5] [--compiled]
                                                   [--out results.json]

Runs in vLLM's environment (``bash .ci/vllm-env``). One eager engine (``enforce_eager=True``, which steering needs),
fp32, greedy, ``ignore_eos`` so every run generates the same number of tokens. Modes, alternating so that drift in
machine speed hits all of them alike (median tokens/s of each):

- unsteered: ``llm.generate`` with no hook;
- ``steered`` block, two SAE features added at every position (no per-token bookkeeping);
- ``generate(..., steering_rows=...)``: half the prompts steered (each request's specs read from vLLM's batch
  every forward);
- clamp, generated positions: reads one feature's activation at every token.

``--compiled`` also starts vLLM's default (compiled) engine and times it unsteered: what enforcing eager mode costs
before any hook runs.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

os.environ.update(VLLM_CPU_KVCACHE_SPACE="2", VLLM_CPU_OMP_THREADS_BIND="nobind", VLLM_ENABLE_V1_MULTIPROCESSING="0")

import torch  # noqa: E402
from vllm import LLM, SamplingParams  # noqa: E402

from qscope_hf import vllm as qv  # noqa: E402
from qscope_hf.smollm2 import load_model, load_saes  # noqa: E402
from qscope_hf.steering import Steering  # noqa: E402

PROMPTS = ["The capital of France is", "Write a short poem about the sea:", "My favourite food is",
           "Explain why the sky is blue.", "Once upon a time, in a small village,", "List three uses of copper:",
           "The best way to learn a language is", "Describe a sunset over the mountains."]


def model_dir(cache: Path) -> Path:
    """SmolLM2 as an HF folder (vLLM 0.32 does not read GGUF), written once."""
    if not (cache / "config.json").exists():
        model, tokenizer = load_model()
        model.save_pretrained(cache)
        tokenizer.save_pretrained(cache)
    return cache


def tokens_per_second(run, prompts: list[str], params: SamplingParams) -> float:
    start = time.perf_counter()
    outputs = run(prompts, params)
    seconds = time.perf_counter() - start
    return sum(len(output.outputs[0].token_ids) for output in outputs) / seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--compiled", action="store_true")
    parser.add_argument("--cache", default="benchmarks/.cache/smollm2-hf")
    parser.add_argument("--out", default="benchmarks/results/vllm_cpu.json")
    args = parser.parse_args()

    directory = model_dir(Path(args.cache))
    llm = LLM(model=str(directory), dtype="float32", enforce_eager=True, max_model_len=512)
    sae = load_saes([15])[0]
    features = Steering(sae, [828, 4023], 8.0)
    clamp = Steering(sae, 828, 20.0, mode="clamp", positions="generated")
    params = SamplingParams(max_tokens=args.tokens, temperature=0.0, ignore_eos=True)

    def unsteered(prompts, p):
        return llm.generate(prompts, p, use_tqdm=False)

    def block(prompts, p):
        with qv.steered(llm, features):
            return llm.generate(prompts, p, use_tqdm=False)

    def rows(prompts, p):
        return qv.generate(llm, prompts, p, steering_rows=[features if i % 2 == 0 else None
                                                           for i in range(len(prompts))])

    def clamped(prompts, p):
        return qv.generate(llm, prompts, p, steering=clamp)

    modes = {"unsteered": unsteered, "steered block (add, all)": block, "per-prompt specs": rows,
             "clamp, generated": clamped}
    results = {}
    for batch in args.batch:
        prompts = (PROMPTS * batch)[:batch]
        for run in modes.values():  # warm-up
            run(prompts, SamplingParams(max_tokens=4, temperature=0.0))
        times: dict[str, list[float]] = {name: [] for name in modes}
        for _ in range(args.repeats):
            for name, run in modes.items():
                times[name].append(tokens_per_second(run, prompts, params))
        median = {name: statistics.median(values) for name, values in times.items()}
        results[f"batch {batch}"] = {name: {"tokens_per_s": value, "ratio": value / median["unsteered"]}
                                     for name, value in median.items()}
    if args.compiled:
        del llm
        compiled = LLM(model=str(directory), dtype="float32", max_model_len=512)
        for batch in args.batch:
            prompts = (PROMPTS * batch)[:batch]
            compiled.generate(prompts, SamplingParams(max_tokens=4, temperature=0.0), use_tqdm=False)
            value = statistics.median(tokens_per_second(lambda ps, p: compiled.generate(ps, p, use_tqdm=False),
                                                        prompts, params) for _ in range(args.repeats))
            eager = results[f"batch {batch}"]["unsteered"]["tokens_per_s"]
            results[f"batch {batch}"]["compiled engine, unsteered"] = {"tokens_per_s": value, "ratio": value / eager}

    record = {"machine": f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads",
              "date": datetime.date.today().isoformat(), "command": " ".join(sys.argv),
              "tokens": args.tokens, "repeats": args.repeats, "results": results}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(record, indent=2))
    for setting, rows_ in results.items():
        print(f"\n{setting}: {args.tokens} new tokens per prompt")
        print("| mode | tokens/s | ÷ unsteered eager |\n|---|---:|---:|")
        for name, row in rows_.items():
            print(f"| {name} | {row['tokens_per_s']:.1f} | {row['ratio']:.3f} |")


if __name__ == "__main__":
    main()
