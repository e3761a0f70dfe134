"""Generation throughput with SAE steering ÷ without, measured in one run.

    python benchmarks/bench_steering.py [--device cpu|cuda] [--out results.json]

Models: the tiny Qwen3 of the tests and a 135M-parameter Llama built from SmolLM2-135M's configuration (random
weights: throughput does not depend on them). Greedy decoding, KV cache, batch 1 and 4. Runs of the three modes
alternate, so drift in machine speed hits all of them alike; the median tokens/s of each is reported.

Two more tables: **two threads** generating at once on one model (both steered with different specs, ÷ both
unsteered; tokens/s of the pair), and a **compiled model** (``torch.compile``, plain forwards of 32 tokens): forwards
inside a ``steered`` block run the eager module (hooks added after compilation are invisible to the compiled
graph), so the ratio to compiled unsteered forwards is the price of correct steering there; eager unsteered
forwards are given for reference.
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import statistics
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from qscope_hf import SAELogitsProcessor, Steering, steered
from qscope_hf.tiny import tiny_model, tiny_sae

SMOLLM2_135M = dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                    num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=2048,
                    tie_word_embeddings=True)


def models(device: str):
    yield "tiny Qwen3 (4 layers, d=64)", tiny_model("qwen3").to(device), tiny_sae(64, 256, 8, layer=2)
    torch.manual_seed(0)
    llama = LlamaForCausalLM(LlamaConfig(**SMOLLM2_135M)).eval().to(device)
    yield "Llama 135M (SmolLM2-135M config)", llama, tiny_sae(576, 9216, 32, layer=15)


def tokens_per_second(model, input_ids, new_tokens: int, processors) -> float:
    if input_ids.device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    model.generate(input_ids=input_ids, attention_mask=torch.ones_like(input_ids), max_new_tokens=new_tokens,
                   min_new_tokens=new_tokens, do_sample=False, logits_processor=processors)
    if input_ids.device.type == "cuda":
        torch.cuda.synchronize()
    return input_ids.shape[0] * new_tokens / (time.perf_counter() - start)


def threads_tokens_per_second(model, input_ids, new_tokens: int, processors: list[list]) -> float:
    """Tokens/s of ``len(processors)`` threads generating at once, thread i with ``processors[i]``."""
    threads = [threading.Thread(target=tokens_per_second, args=(model, input_ids, new_tokens, p)) for p in processors]
    start = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return len(processors) * input_ids.shape[0] * new_tokens / (time.perf_counter() - start)


def alternating_medians(configs: dict[str, Any], measure: Callable[[Any, bool], float],
                        repeats: int) -> dict[str, float]:
    """The median of ``measure(config, warm_up=False)`` per config over ``repeats`` rounds, the configs alternating
    within each round (so drift in machine speed hits all of them alike), after one ``warm_up=True`` call each."""
    for config in configs.values():
        measure(config, True)
    speeds: dict[str, list[float]] = {name: [] for name in configs}
    for _ in range(repeats):
        for name, config in configs.items():
            speeds[name].append(measure(config, False))
    return {name: statistics.median(values) for name, values in speeds.items()}


def two_threads(model, sae, input_ids, args) -> dict:
    modes = {"none": [[], []], "add": [[SAELogitsProcessor(model, Steering(sae, [1, 2], [4.0, -4.0]))],
                                       [SAELogitsProcessor(model, Steering(sae, 3, -4.0))]]}
    median = alternating_medians(modes, lambda processors, warm: threads_tokens_per_second(
        model, input_ids, 8 if warm else args.new_tokens, processors), args.repeats)
    return {"none_tok_s": median["none"], "add_tok_s": median["add"], "add_ratio": median["add"] / median["none"]}


def forwards_per_second(call, input_ids, repeats: int = 20) -> float:
    with torch.no_grad():
        if input_ids.device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(repeats):
            call(input_ids=input_ids)
        if input_ids.device.type == "cuda":
            torch.cuda.synchronize()
    return repeats / (time.perf_counter() - start)


def compiled_model(model, sae, input_ids, args) -> dict:
    compiled = torch.compile(model)
    spec = Steering(sae, [1, 2], [4.0, -4.0])

    def steered_call(**inputs):
        with steered(compiled, spec):
            return compiled(**inputs)

    calls = {"eager": model, "compiled": compiled, "steered": steered_call}  # the warm-up call compiles
    median = alternating_medians(calls, lambda call, warm: forwards_per_second(call, input_ids, 1 if warm else 20),
                                 args.repeats)
    return {**{f"{name}_fwd_s": v for name, v in median.items()},
            "steered_ratio": median["steered"] / median["compiled"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--out", type=Path)
    parser.add_argument("--skip", nargs="*", default=[], choices=["batches", "threads", "compiled"])
    args = parser.parse_args()
    rows, thread_rows, compiled_rows = [], [], []
    for name, model, sae in models(args.device):
        sae = sae.to(args.device)
        input_ids = torch.randint(0, model.config.vocab_size, (1, 32), generator=torch.Generator().manual_seed(1))
        input_ids = input_ids.to(args.device)
        if "threads" not in args.skip:
            thread_rows.append({"model": name, "batch": 1, **two_threads(model, sae, input_ids, args)})
            print(f"{name}, two threads: {thread_rows[-1]}", flush=True)
        if "compiled" not in args.skip:
            compiled_rows.append({"model": name, "batch": 1, **compiled_model(model, sae, input_ids, args)})
            print(f"{name}, compiled: {compiled_rows[-1]}", flush=True)
        if "batches" in args.skip:
            continue
        sae = sae.to(args.device)
        vocab = model.config.vocab_size
        for batch in (1, 4):
            input_ids = torch.randint(0, vocab, (batch, 32), generator=torch.Generator().manual_seed(batch))
            input_ids = input_ids.to(args.device)
            modes = {"none": [],
                     "add": [SAELogitsProcessor(model, Steering(sae, [1, 2], [4.0, -4.0]))],
                     "gated": [SAELogitsProcessor(model, Steering(sae, 1, -4.0, mode="gated"))]}
            median = alternating_medians(modes, lambda processors, warm, model=model, ids=input_ids: tokens_per_second(
                model, ids, 8 if warm else args.new_tokens, processors), args.repeats)
            row = {"model": name, "batch": batch, **{f"{m}_tok_s": v for m, v in median.items()},
                   "add_ratio": median["add"] / median["none"], "gated_ratio": median["gated"] / median["none"]}
            rows.append(row)
            print(f"{name}, batch {batch}: " + ", ".join(f"{m} {v:.1f} tok/s" for m, v in median.items())
                  + f" | add {row['add_ratio']:.3f}, gated {row['gated_ratio']:.3f}", flush=True)
    machine = (torch.cuda.get_device_name() if args.device == "cuda"
               else f"{platform.machine()}, {torch.get_num_threads()} threads")
    print("\n| model | batch | no steering tok/s | add tok/s | gated tok/s | add ÷ none | gated ÷ none |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['model']} | {r['batch']} | {r['none_tok_s']:.1f} | {r['add_tok_s']:.1f} | "
              f"{r['gated_tok_s']:.1f} | {r['add_ratio']:.3f} | {r['gated_ratio']:.3f} |")
    print("\n| model | two threads unsteered tok/s | two threads steered tok/s | steered ÷ unsteered |")
    print("|---|---|---|---|")
    for r in thread_rows:
        print(f"| {r['model']} | {r['none_tok_s']:.1f} | {r['add_tok_s']:.1f} | {r['add_ratio']:.3f} |")
    print("\n| model | eager forwards/s | compiled forwards/s | steered compiled forwards/s | steered ÷ compiled |")
    print("|---|---|---|---|---|")
    for r in compiled_rows:
        print(f"| {r['model']} | {r['eager_fwd_s']:.1f} | {r['compiled_fwd_s']:.1f} | {r['steered_fwd_s']:.1f} | "
              f"{r['steered_ratio']:.3f} |")
    if args.out:
        args.out.write_text(json.dumps({"machine": machine, "date": datetime.date.today().isoformat(),
                                        "command": " ".join(sys.argv), "rows": rows, "two_threads": thread_rows,
                                        "compiled": compiled_rows}, indent=2))


if __name__ == "__main__":
    main()
