"""Shared pieces of the effect studies: SmolLM2 with its shipped SAEs, text measures, and RESULTS.md sections.

Language and repetition are measured with transparent heuristics (stop-word shares, repeated n-grams), which is
what an offline run can afford; the numbers are comparable across conditions, not against external detectors.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import platform
import re
import statistics
import sys
from collections import Counter
from pathlib import Path

import torch

from qscope_hf.smollm2 import ASSETS, load_model, load_saes

ROOT = Path(__file__).resolve().parents[1]
#: Steering strength of the studies that steer at a fixed strength, as a fraction of the residual's median norm.
STRENGTH_OF_NORM = 0.6
RESULTS = ROOT / "RESULTS.md"
OUT = ROOT / "results"

FRENCH = set("le la les de des du un une et est sont en dans pour pas que qui sur avec au aux ce cette il elle nous "
             "vous ils elles je tu on mais ou plus par son sa ses leur très être avoir fait comme".split())
ENGLISH = set("the a an and is are of to in for not that who on with at this it he she we you they i but or more by "
              "his her their very be have has do does as was were".split())


def words(text: str) -> list[str]:
    return re.findall(r"[a-zàâçéèêëîïôûùüÿœæ']+", text.lower())


def language_scores(text: str) -> tuple[float, float]:
    """Shares of French and of English stop words among the words of ``text``."""
    tokens = words(text)
    if not tokens:
        return 0.0, 0.0
    return sum(t in FRENCH for t in tokens) / len(tokens), sum(t in ENGLISH for t in tokens) / len(tokens)


def is_french(text: str, minimum: int = 4) -> bool:
    """Mostly French: at least ``minimum`` words, and more French than English stop words."""
    french, english = language_scores(text)
    return len(words(text)) >= minimum and french > english


def has_english(text: str) -> bool:
    """Contains English: an English stop-word share of at least 10% (a French text has about 0%)."""
    return language_scores(text)[1] >= 0.10


def has_loop(token_ids: list[int], n: int = 4, repeats: int = 3) -> bool:
    """An n-gram (n tokens) that occurs at least ``repeats`` times: a repetition loop."""
    grams = Counter(tuple(token_ids[i:i + n]) for i in range(len(token_ids) - n + 1))
    return bool(grams) and max(grams.values()) >= repeats


def padded_batches(sequences: list[tuple[int, list[int]]], pad_id: int, batch_size: int):
    """Right-padded batches of ``(prompt length, token ids)`` pairs. Yields ``(first row, ids [B, T], attention mask
    [B, T], scored [B, T-1])``, where ``scored`` marks the positions whose next token belongs to the completion."""
    for start in range(0, len(sequences), batch_size):
        chunk = sequences[start:start + batch_size]
        length = max(len(ids) for _, ids in chunk)
        ids = torch.full((len(chunk), length), pad_id, dtype=torch.long)
        scored = torch.zeros(len(chunk), length - 1, dtype=torch.bool)
        for row, (prompt_length, sequence) in enumerate(chunk):
            ids[row, :len(sequence)] = torch.tensor(sequence)
            scored[row, prompt_length - 1:len(sequence) - 1] = True
        mask = torch.arange(length)[None, :] < torch.tensor([len(s) for _, s in chunk])[:, None]
        yield start, ids, mask.long(), scored


@torch.no_grad()
def perplexity(model, tokenizer, prompts: list[str], completions: list[str], batch_size: int = 16) -> float:
    """Perplexity of ``completions`` given their prompts under ``model`` (mean over completion tokens)."""
    total, count = 0.0, 0
    pairs = [(tokenizer(p)["input_ids"], tokenizer(p + c)["input_ids"]) for p, c in zip(prompts, completions)]
    pairs = [(len(p), ids) for p, ids in pairs if len(ids) > len(p)]
    for _, ids, mask, scored in padded_batches(pairs, tokenizer.pad_token_id or 0, batch_size):
        logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1]
        total += float(torch.nn.functional.cross_entropy(logits[scored], ids[:, 1:][scored], reduction="sum"))
        count += int(scored.sum())
    return float(torch.tensor(total / max(count, 1)).exp())


def seed_spread(records: list[dict], keys: tuple[str, ...]) -> dict[str, dict[str, float]]:
    """Mean, min and max over the seeds' ``records`` of each of ``keys`` that was measured (not None)."""
    return {key: {"mean": statistics.mean(r[key] for r in records), "min": min(r[key] for r in records),
                  "max": max(r[key] for r in records)} for key in keys if records[0][key] is not None}


def spread_cell(spread: dict[str, float], digits: int) -> str:
    """A table cell: the mean, with the min–max range when the seeds differ."""
    mean = f"{spread['mean']:.{digits}f}"
    return mean if spread["min"] == spread["max"] else f"{mean} ({spread['min']:.{digits}f}–{spread['max']:.{digits}f})"


def chat_prompts(tokenizer, questions: list[str]) -> list[str]:
    return [tokenizer.apply_chat_template([{"role": "user", "content": q}], tokenize=False, add_generation_prompt=True)
            for q in questions]


@torch.no_grad()
def generate(model, tokenizer, prompts: list[str], *, max_new_tokens: int, batch_size: int = 16,
             **options) -> tuple[list[str], list[list[int]]]:
    """Continuations (greedy unless ``do_sample=True`` is passed) of already templated ``prompts``: texts and
    token ids."""
    options.setdefault("do_sample", False)
    texts, ids = [], []
    for start in range(0, len(prompts), batch_size):
        inputs = tokenizer(prompts[start:start + batch_size], return_tensors="pt", padding=True,
                           add_special_tokens=False)
        out = model.generate(**inputs, max_new_tokens=max_new_tokens, pad_token_id=tokenizer.pad_token_id,
                             **options)
        for row in out[:, inputs["input_ids"].shape[1]:]:
            row = [t for t in row.tolist() if t != tokenizer.pad_token_id]
            ids.append(row)
            texts.append(tokenizer.decode(row, skip_special_tokens=True))
    return texts, ids


def contrast_texts() -> dict[str, list[str]]:
    return json.loads((ASSETS / "contrast.json").read_text())


def positive(kind: type):
    """An argparse ``type``: the value as ``kind`` (int or float), refused unless finite and > 0."""
    def parse(text: str):
        value = kind(text)
        if not math.isfinite(value) or value <= 0:
            raise argparse.ArgumentTypeError(f"must be finite and > 0, got {text}")
        return value

    return parse


def add_output_options(parser) -> None:
    """``--results DIR`` (JSON and plots; default benchmarks/results) and ``--no-write`` (leave RESULTS.md alone)."""
    parser.add_argument("--results", type=Path, default=OUT, help="where the JSON and plots go")
    parser.add_argument("--no-write", action="store_true", help="do not update benchmarks/RESULTS.md")


def write_section(name: str, body: str, enabled: bool = True) -> None:
    """Replace the ``effects:name`` section of RESULTS.md (between its markers), or append it."""
    if not enabled:
        return
    start, end = f"<!-- effects:{name} -->", f"<!-- /effects:{name} -->"
    text = RESULTS.read_text() if RESULTS.exists() else ""
    block = f"{start}\n{body.rstrip()}\n{end}"
    if start in text:
        text = text[:text.index(start)] + block + text[text.index(end) + len(end):]
    else:
        text = text.rstrip() + "\n\n" + block + "\n"
    RESULTS.write_text(text)


def provenance(quick: bool) -> str:
    return (f"Machine: {platform.machine()}, {torch.get_num_threads()} threads; {datetime.date.today().isoformat()}; "
            f"command: `{' '.join(['python', f'benchmarks/effects/{Path(sys.argv[0]).name}', *sys.argv[1:]])}`"
            + (" (quick mode: fewer prompts, shorter runs)" if quick else ""))


__all__ = ["ASSETS", "OUT", "STRENGTH_OF_NORM", "add_output_options", "chat_prompts", "contrast_texts", "generate",
           "has_english", "has_loop", "is_french", "language_scores", "load_model", "load_saes", "padded_batches",
           "perplexity", "positive", "provenance", "seed_spread", "spread_cell", "words", "write_section"]
