"""Reading and writing SAE checkpoints: Qwen-Scope ``.sae.pt``, qscope safetensors, SAELens; hub downloads.

Every reader returns a :class:`Checkpoint` in the Qwen-Scope orientation (``W_enc [d_sae, d_model]``,
``W_dec [d_model, d_sae]``, ``b_enc [d_sae]``, ``b_dec [d_model]``). Layouts on disk:

- ``qwen-scope``: ``layer{n}.sae.pt``, a plain ``torch.save`` dict, exactly as in the hub repos (read with
  ``weights_only=True`` and memory-mapped); qscope adds a ``layer{n}.json`` sidecar when it writes one.
- ``qscope``: ``layer{n}.safetensors`` plus the ``layer{n}.json`` sidecar (the :class:`SAEConfig` and the
  name of the weights file).
- ``saelens``: ``cfg.json`` plus ``sae_weights.safetensors`` in one directory, weights transposed
  (``W_enc [d_in, d_sae]``, ``W_dec [d_sae, d_in]``), as SAELens' ``SAE.load_from_disk`` reads them.

Sources: a local file or directory in any of these layouts, a Qwen-Scope release repo id (only the requested
layer file is downloaded, via ``huggingface_hub``), or any other hub repo in the qscope layout.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import safetensors.torch
import torch
from huggingface_hub import hf_hub_download
from huggingface_hub.errors import EntryNotFoundError, LocalEntryNotFoundError, RepositoryNotFoundError
from torch import Tensor

from .config import RESID_POST, SAEConfig
from .releases import Release, get_release, is_release_name

FORMATS = ("qscope", "qwen-scope", "saelens")
TENSOR_KEYS = ("W_enc", "W_dec", "b_enc", "b_dec")
SAELENS_CONFIG, SAELENS_WEIGHTS = "cfg.json", "sae_weights.safetensors"
#: The SAELens version whose config conventions qscope writes (``k`` at the top level, metadata block).
SAELENS_FORMAT_VERSION = "6.0.0"

_LAYER_FILE = re.compile(r"^layer(\d+)\.(sae\.pt|safetensors)$")
_SAELENS_HOOK = re.compile(r"blocks\.(\d+)\.hook_resid_post$")


class CheckpointError(ValueError):
    """A checkpoint that is not a valid TopK SAE: missing keys, inconsistent shapes, unsupported options."""


@dataclass
class Checkpoint:
    """What every reader returns: the config and the four tensors in the Qwen-Scope orientation."""

    config: SAEConfig
    tensors: dict[str, Tensor]


def sidecar_name(layer: int) -> str:
    return f"layer{layer}.json"


def weights_name(layer: int, fmt: str) -> str:
    return f"layer{layer}.sae.pt" if fmt == "qwen-scope" else f"layer{layer}.safetensors"


def _check_tensors(tensors: dict[str, Tensor], origin: str) -> tuple[int, int]:
    """Validate keys and shapes; return ``(d_model, d_sae)``."""
    missing = [key for key in TENSOR_KEYS if key not in tensors]
    if missing:
        raise CheckpointError(f"malformed checkpoint {origin}: missing {missing} (has {sorted(tensors)})")
    if tensors["W_enc"].dim() != 2:
        raise CheckpointError(f"malformed checkpoint {origin}: W_enc must be 2-D, got {tuple(tensors['W_enc'].shape)}")
    d_sae, d_model = tensors["W_enc"].shape
    expected = {"W_enc": (d_sae, d_model), "W_dec": (d_model, d_sae), "b_enc": (d_sae,), "b_dec": (d_model,)}
    for key, shape in expected.items():
        if tuple(tensors[key].shape) != shape:
            raise CheckpointError(f"malformed checkpoint {origin}: {key} has shape {tuple(tensors[key].shape)}, "
                                  f"expected {shape} for d_model={d_model}, d_sae={d_sae}")
    return d_model, d_sae


def _release_in_path(path: Path) -> Release | None:
    """The release a path belongs to, from a hub-cache folder (``models--Qwen--SAE-Res-…``) or a folder name."""
    for part in reversed(path.resolve().parts):
        name = part.replace("models--Qwen--", "Qwen/", 1) if part.startswith("models--Qwen--") else f"Qwen/{part}"
        if is_release_name(name):
            try:
                return get_release(name)
            except KeyError:
                return None
    return None


def _torch_load(path: Path) -> dict[str, Tensor]:
    try:
        loaded = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except RuntimeError:  # legacy (non-zip) serialisation cannot be memory-mapped
        loaded = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # weights_only refuses anything but plain tensors and containers
        message = f"{path} is not a plain tensor checkpoint (loaded with weights_only=True): {error}"
        raise CheckpointError(message) from None
    if not isinstance(loaded, dict):
        raise CheckpointError(f"malformed checkpoint {path}: expected a dict of tensors, got {type(loaded).__name__}")
    return loaded


def _read_weights(path: Path) -> dict[str, Tensor]:
    if path.name.endswith(".sae.pt"):
        return _torch_load(path)
    return safetensors.torch.load_file(path)


def _read_layer_file(path: Path, layer: int | None, overrides: dict[str, Any], release: Release | None) -> Checkpoint:
    """A ``layer{n}.sae.pt`` / ``layer{n}.safetensors`` file, configured by its sidecar, the registry and overrides."""
    match = _LAYER_FILE.match(path.name)
    if match is None:
        raise CheckpointError(f"{path.name!r} is not a layer file (expected layer{{n}}.sae.pt or "
                              "layer{n}.safetensors)")
    file_layer = int(match.group(1))
    if layer is not None and layer != file_layer:
        raise ValueError(f"layer={layer} was asked for but {path} holds layer {file_layer}")
    tensors = _read_weights(path)
    d_model, d_sae = _check_tensors(tensors, str(path))
    sidecar = path.with_name(sidecar_name(file_layer))
    meta: dict[str, Any] = json.loads(sidecar.read_text()) if sidecar.exists() else {}
    release = release or _release_in_path(path)
    if release is not None:
        if (d_model, d_sae) != (release.d_model, release.d_sae):
            raise CheckpointError(f"malformed checkpoint {path}: shapes d_model={d_model}, d_sae={d_sae} do not match "
                                  f"release {release.repo_id} (d_model={release.d_model}, d_sae={release.d_sae})")
        meta.setdefault("k", release.k)
        meta.setdefault("release", release.repo_id)
        meta.setdefault("model_id", release.model_id)
    for key, value in {"d_model": d_model, "d_sae": d_sae}.items():
        if meta.get(key, value) != value:
            raise CheckpointError(f"malformed checkpoint {path}: sidecar says {key}={meta[key]}, weights have {value}")
    meta.update({key: value for key, value in overrides.items() if value is not None})
    if "k" not in meta:
        raise ValueError(f"k is unknown for {path}: it has no {sidecar.name} sidecar and is not a known release; "
                         f"pass k=... (e.g. 50 for an L0_50 release)")
    meta.update(d_model=d_model, d_sae=d_sae, layer=file_layer)
    return Checkpoint(SAEConfig.from_dict(meta), tensors)


def _read_saelens(directory: Path, layer: int | None, overrides: dict[str, Any]) -> Checkpoint:
    cfg = json.loads((directory / SAELENS_CONFIG).read_text())
    origin = str(directory)
    architecture = cfg.get("architecture") or ("topk" if cfg.get("activation_fn") == "topk" else "standard")
    k = cfg.get("k") or (cfg.get("activation_fn_kwargs") or {}).get("k")
    if architecture != "topk" or k is None:
        raise CheckpointError(f"{origin}: only TopK SAEs are supported, got architecture {architecture!r}")
    for option, fine in (("normalize_activations", "none"), ("rescale_acts_by_decoder_norm", False)):
        if cfg.get(option, fine) != fine:
            raise CheckpointError(f"{origin}: SAELens option {option}={cfg[option]!r} is not supported")
    weights = safetensors.torch.load_file(directory / SAELENS_WEIGHTS)
    tensors = {key: weights[key] for key in TENSOR_KEYS if key in weights}
    for key in ("W_enc", "W_dec"):
        if key in tensors:
            tensors[key] = tensors[key].T
    d_model, d_sae = _check_tensors(tensors, origin)
    if cfg.get("apply_b_dec_to_input", False):
        # encode(x - b_dec) == encode(x) with b_enc - W_enc @ b_dec: fold it so the Qwen-Scope formula holds.
        shift = tensors["W_enc"].double().mv(tensors["b_dec"].double())
        tensors["b_enc"] = tensors["b_enc"] - shift.to(tensors["b_enc"].dtype)
    metadata = cfg.get("metadata") or {}
    hook = _SAELENS_HOOK.search(metadata.get("hook_name") or cfg.get("hook_name") or "")
    file_layer = int(hook.group(1)) if hook else None
    if layer is not None and file_layer is not None and layer != file_layer:
        raise ValueError(f"layer={layer} was asked for but {origin} reads layer {file_layer}")
    meta = {"d_model": d_model, "d_sae": d_sae, "k": k, "layer": layer if file_layer is None else file_layer,
            "model_id": metadata.get("model_name") or cfg.get("model_name"), "activation": "relu_topk"}
    meta.update({key: value for key, value in overrides.items() if value is not None})
    return Checkpoint(SAEConfig.from_dict(meta), tensors)


def _layers_in(directory: Path) -> list[int]:
    return sorted({int(m.group(1)) for p in directory.iterdir() if (m := _LAYER_FILE.match(p.name))})


def _read_local(path: Path, layer: int | None, overrides: dict[str, Any]) -> Checkpoint:
    if path.is_file():
        if path.name == SAELENS_WEIGHTS:
            return _read_saelens(path.parent, layer, overrides)
        return _read_layer_file(path, layer, overrides, None)
    if (path / SAELENS_CONFIG).exists():
        return _read_saelens(path, layer, overrides)
    present = _layers_in(path)
    if layer is None:
        if len(present) != 1:
            raise ValueError(f"{path} holds layers {present}: pass layer=...")
        layer = present[0]
    for fmt in ("qscope", "qwen-scope"):
        candidate = path / weights_name(layer, fmt)
        if candidate.exists():
            return _read_layer_file(candidate, layer, overrides, None)
    raise FileNotFoundError(f"{path} has no SAE for layer {layer} (looked for {weights_name(layer, 'qscope')} and "
                            f"{weights_name(layer, 'qwen-scope')}); layers present: {present}")


def download(repo_id: str, filename: str, *, revision: str | None = None, cache_dir: str | Path | None = None) -> Path:
    """One file of a hub repo through ``huggingface_hub`` (cache first); errors name the repo and the file."""
    try:
        return Path(hf_hub_download(repo_id, filename, revision=revision, cache_dir=cache_dir))
    except LocalEntryNotFoundError:
        raise OSError(
            f"cannot fetch {filename!r} from {repo_id!r}: the hub is unreachable (offline, or HF_HUB_OFFLINE=1) and "
            f"the file is not in the local cache. Download it where the hub is reachable "
            f"(hf download {repo_id} {filename} --local-dir DIR) and load the local copy instead: "
            f"SparseAutoencoder.from_pretrained('DIR', layer=...)"
        ) from None
    except EntryNotFoundError:
        raise FileNotFoundError(f"hub repo {repo_id!r} has no file {filename!r}") from None
    except RepositoryNotFoundError:
        raise FileNotFoundError(f"hub repo {repo_id!r} does not exist (or is private)") from None


def read(source: str | Path, layer: int | None = None, *, revision: str | None = None,
         cache_dir: str | Path | None = None, **overrides: Any) -> Checkpoint:
    """Read one SAE from a local path, a Qwen-Scope release id, or a qscope-layout hub repo.

    ``overrides`` (``k``, ``activation``, ``model_id``, …) take precedence over what the checkpoint says.
    """
    path = Path(source).expanduser()
    if path.exists():
        return _read_local(path, layer, overrides)
    name = str(source)
    if is_release_name(name):
        release = get_release(name)
        if layer is None:
            raise ValueError(f"{name} has one SAE per layer (0..{release.num_layers - 1}): pass layer=...")
        file = download(name, release.layer_file(layer), revision=revision, cache_dir=cache_dir)
        return _read_layer_file(file, layer, overrides, release)
    if name.count("/") == 1 and not name.startswith((".", "/", "~")):
        if layer is None:
            raise ValueError(f"pass layer=... to load an SAE from hub repo {name!r}")
        sidecar = download(name, sidecar_name(layer), revision=revision, cache_dir=cache_dir)
        weights = json.loads(sidecar.read_text()).get("weights", weights_name(layer, "qscope"))
        file = download(name, weights, revision=revision, cache_dir=cache_dir)
        if file.parent != sidecar.parent:
            raise CheckpointError(f"hub repo {name!r}: {weights} and {sidecar.name} resolved to different snapshots")
        return _read_layer_file(file, layer, overrides, None)
    raise FileNotFoundError(f"SAE source {name!r} is neither an existing path nor a hub repo id")


def _saelens_config(config: SAEConfig, dtype: torch.dtype) -> dict[str, Any]:
    if config.activation != "relu_topk":
        raise ValueError("SAELens' TopK applies ReLU to the selected values; an activation='topk' SAE would change "
                         "its outputs in SAELens format (save it as 'qscope' or 'qwen-scope')")
    hook = {} if config.layer is None else {"hook_name": f"blocks.{config.layer}.hook_resid_post",
                                           "hf_hook_name": f"model.layers.{config.layer}"}
    return {
        "architecture": "topk", "d_in": config.d_model, "d_sae": config.d_sae, "k": config.k,
        "dtype": str(dtype).removeprefix("torch."), "device": "cpu", "apply_b_dec_to_input": False,
        "normalize_activations": "none", "reshape_activations": "none", "rescale_acts_by_decoder_norm": False,
        "metadata": {"sae_lens_version": SAELENS_FORMAT_VERSION, "model_name": config.model_id, **hook,
                     "qscope_release": config.release},
    }


def write(config: SAEConfig, tensors: dict[str, Tensor], directory: str | Path, fmt: str = "qscope") -> Path:
    """Write one SAE into ``directory`` in ``fmt``; returns the weights file. Reading it back gives the same SAE."""
    if fmt not in FORMATS:
        raise ValueError(f"unknown SAE format {fmt!r}; choose one of {FORMATS}")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    plain = {key: tensors[key].detach().cpu().contiguous() for key in TENSOR_KEYS}
    if fmt == "saelens":
        cfg = _saelens_config(config, plain["W_enc"].dtype)
        saelens = {**plain, "W_enc": plain["W_enc"].T.contiguous(), "W_dec": plain["W_dec"].T.contiguous()}
        safetensors.torch.save_file(saelens, directory / SAELENS_WEIGHTS)
        (directory / SAELENS_CONFIG).write_text(json.dumps(cfg, indent=2))
        return directory / SAELENS_WEIGHTS
    if config.layer is None:
        raise ValueError(f"the {fmt} layout names files by layer: set the SAE's layer before saving")
    weights = directory / weights_name(config.layer, fmt)
    if fmt == "qwen-scope":
        torch.save(plain, weights)
    else:
        safetensors.torch.save_file(plain, weights, metadata={"format": "qscope"})
    sidecar = {"format": fmt, "weights": weights.name, **config.to_dict()}
    (directory / sidecar_name(config.layer)).write_text(json.dumps(sidecar, indent=2))
    return weights


__all__ = ["FORMATS", "Checkpoint", "CheckpointError", "RESID_POST", "download", "read", "write"]
