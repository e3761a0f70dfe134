"""Reading and writing SAE checkpoints: Qwen-Scope ``.sae.pt``, qscope safetensors, SAELens; hub downloads.

Every reader returns a :class:`Checkpoint` in the Qwen-Scope orientation (``W_enc [d_sae, d_model]``,
``W_dec [d_model, d_sae]``, ``b_enc [d_sae]``, ``b_dec [d_model]``). Layouts on disk:

- ``qwen-scope``: ``layer{n}.sae.pt``, a plain ``torch.save`` dict, exactly as in the hub repos (read with
  ``weights_only=True`` and memory-mapped); qscope adds a ``layer{n}.json`` sidecar when it writes one.
- ``qscope``: ``layer{n}.safetensors`` plus the ``layer{n}.json`` sidecar (the :class:`SAEConfig` and the
  name of the weights file).
- ``saelens``: ``cfg.json`` plus ``sae_weights.safetensors`` in one directory, weights transposed
  (``W_enc [d_in, d_sae]``, ``W_dec [d_sae, d_in]``), as SAELens' ``SAE.load_from_disk`` reads them.
- ``sparsify``: ``cfg.json`` plus ``sae.safetensors`` (``encoder.weight [d_sae, d_in]``, ``encoder.bias``,
  ``W_dec [d_sae, d_in]``, ``b_dec``; the encoder reads ``x − b_dec``), as eai-sparsify's
  ``SparseCoder.save_to_disk`` writes them, in a directory named after the hook point (``layers.10``).

Encoders that subtract ``b_dec`` from their input (SAELens ``apply_b_dec_to_input``, sparsify) are folded into
``b_enc − W_enc · b_dec`` in at least fp32 on reading, and unfolded on writing, so the Qwen-Scope formula holds.

Sources: a local file or directory in any of these layouts, a Qwen-Scope release repo id (only the requested
layer file is downloaded), or any other hub repo in the qscope layout; :mod:`qscope_hf.hub` resolves and fetches
them, this module only reads and writes files.
"""

from __future__ import annotations

import json
import pickle
import re
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, get_args

import safetensors.torch
import torch
from torch import Tensor

from . import hub
from .atomic import atomic_write, atomic_write_text
from .config import RESID_POST, SAEConfig
from .errors import CheckpointError, ConfigError, MissingFileError
from .hub import LAYER_FILE as _LAYER_FILE
from .hub import sidecar_name, weights_name
from .releases import Release, get_release, is_release_name

Format = Literal["qscope", "qwen-scope", "saelens", "sparsify"]
FORMATS: tuple[Format, ...] = get_args(Format)
TENSOR_KEYS = ("W_enc", "W_dec", "b_enc", "b_dec")
SAELENS_CONFIG, SAELENS_WEIGHTS = "cfg.json", "sae_weights.safetensors"
SPARSIFY_WEIGHTS = "sae.safetensors"
#: The SAELens version whose config conventions qscope writes (``k`` at the top level, metadata block).
SAELENS_FORMAT_VERSION = "6.0.0"

_BLOCK_HOOK = re.compile(r"^blocks\.(\d+)\.hook_resid_(pre|post)$")
_HF_LAYER = re.compile(r"^(?:base_model\.model\.)?(?:model\.|model\.language_model\.|transformer\.|gpt_neox\.)?"
                       r"(?:layers|h)\.(\d+)$")


@dataclass
class Checkpoint:
    """What every reader returns: the config and the four tensors in the Qwen-Scope orientation."""

    config: SAEConfig
    tensors: dict[str, Tensor]


def _check_tensors(tensors: dict[str, Tensor], origin: str) -> tuple[int, int]:
    """Validate keys, dtypes and shapes (Qwen-Scope orientation); return ``(d_model, d_sae)``. Extra keys are
    dropped with a warning naming them."""
    missing = [key for key in TENSOR_KEYS if key not in tensors]
    if missing:
        raise CheckpointError(f"malformed checkpoint {origin}: missing {missing} (has {sorted(tensors)})")
    extra = sorted(set(tensors) - set(TENSOR_KEYS))
    if extra:
        warnings.warn(f"{origin}: ignoring tensors {extra}, which a plain TopK SAE does not have (the SAE may not "
                      "be a plain TopK SAE)", stacklevel=4)
        for key in extra:
            del tensors[key]
    for key in TENSOR_KEYS:
        if not isinstance(tensors[key], Tensor) or not tensors[key].is_floating_point():
            kind = tensors[key].dtype if isinstance(tensors[key], Tensor) else type(tensors[key]).__name__
            raise CheckpointError(f"malformed checkpoint {origin}: {key} must be a floating-point tensor, got {kind}")
    for key in TENSOR_KEYS:
        if tensors[key].is_meta:
            raise CheckpointError(f"malformed checkpoint {origin}: {key} is a meta tensor (shape only, no values)")
        bad = non_finite_count(tensors[key])
        if bad:
            raise CheckpointError(f"malformed checkpoint {origin}: {key} has {bad} non-finite values (NaN or inf); an "
                                  "SAE with them selects or reconstructs garbage")
    if tensors["W_enc"].dim() != 2:
        raise CheckpointError(f"malformed checkpoint {origin}: W_enc must be 2-D, got {tuple(tensors['W_enc'].shape)}")
    d_sae, d_model = tensors["W_enc"].shape
    biases = (tensors["b_enc"].numel(), tensors["b_dec"].numel())
    if d_sae != d_model and biases == (d_model, d_sae):
        raise CheckpointError(f"malformed checkpoint {origin}: W_enc is stored transposed {(d_sae, d_model)}; the "
                              f"Qwen-Scope orientation is (d_sae, d_model) = {biases} (from b_enc and b_dec)")
    expected = {"W_dec": (d_model, d_sae), "b_enc": (d_sae,), "b_dec": (d_model,)}
    for key, shape in expected.items():
        found = tuple(tensors[key].shape)
        if key == "W_dec" and found == shape[::-1] and d_sae != d_model:
            raise CheckpointError(f"malformed checkpoint {origin}: W_dec is stored transposed {found}; the Qwen-Scope "
                                  f"orientation is (d_model, d_sae) = {shape}")
        if found != shape:
            raise CheckpointError(f"malformed checkpoint {origin}: {key} has shape {found}, expected {shape} for "
                                  f"d_model={d_model}, d_sae={d_sae}")
    return d_model, d_sae


def non_finite_count(tensor: Tensor, chunk: int = 1 << 24) -> int:
    """How many entries of ``tensor`` are NaN or ±inf (read in chunks, so a memory-mapped file is not copied)."""
    flat = tensor.detach().reshape(-1)
    return sum(int((~part.isfinite()).sum()) for part in flat.split(chunk))


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise CheckpointError(f"{path} is not valid JSON: {error}") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{path} must hold a JSON object, got {type(data).__name__}")
    return data


def _read_safetensors(path: Path) -> dict[str, Tensor]:
    try:
        return safetensors.torch.load_file(path)
    except Exception as error:  # SafetensorError, or OSError on an unreadable file
        raise CheckpointError(f"{path} cannot be read as a safetensors file (empty, truncated or another "
                              f"format): {error}") from None


def _fold_input_bias(tensors: dict[str, Tensor]) -> None:
    """``encode(x − b_dec) == encode(x)`` with ``b_enc − W_enc · b_dec``: fold it, in at least fp32."""
    shift = tensors["W_enc"].double().mv(tensors["b_dec"].double())
    wide = torch.promote_types(tensors["b_enc"].dtype, torch.float32)
    tensors["b_enc"] = (tensors["b_enc"].double() - shift).to(wide)


def _unfold_input_bias(tensors: dict[str, Tensor]) -> Tensor:
    """The encoder bias of an encoder that reads ``x − b_dec`` (inverse of :func:`_fold_input_bias`)."""
    shift = tensors["W_enc"].double().mv(tensors["b_dec"].double())
    return (tensors["b_enc"].double() + shift).to(tensors["b_enc"].dtype)


def hook_layer(hook_name: str, origin: str) -> int:
    """The decoder layer whose output the hook point ``hook_name`` reads, i.e. qscope's SAE layer.

    TransformerLens / SAELens names: ``blocks.n.hook_resid_post`` is layer ``n``; ``blocks.n.hook_resid_pre`` is the
    output of block ``n − 1`` (``n = 0`` reads the embeddings, which no qscope SAE does). HF module names of a
    decoder layer (``model.layers.n``, ``layers.n``, ``model.language_model.layers.n``, ``transformer.h.n``, …)
    are that layer's output. Anything else (``hook_resid_mid``, ``hook_mlp_out``, ``attn.hook_z``, a submodule of a
    layer) reads somewhere else in the block: a :class:`CheckpointError` naming it.
    """
    block = _BLOCK_HOOK.match(hook_name)
    if block:
        layer = int(block.group(1)) - (block.group(2) == "pre")
        if layer < 0:
            raise CheckpointError(f"{origin}: {hook_name!r} reads the embeddings (before block 0); qscope SAEs read "
                                  "the output of a decoder layer")
        return layer
    module = _HF_LAYER.match(hook_name)
    if module:
        return int(module.group(1))
    raise CheckpointError(f"{origin}: hook point {hook_name!r} is not the residual stream after a decoder layer "
                          "(supported: blocks.N.hook_resid_post, blocks.N.hook_resid_pre, HF decoder-layer module "
                          "names such as model.layers.N)")


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
    """A ``torch.save`` dict of tensors, read with ``weights_only=True`` (never executing pickled code)."""
    with path.open("rb") as file:
        head = file.read(9)
    if not head:
        raise CheckpointError(f"{path} is empty")
    if len(head) == 9 and head[8:9] == b"{":
        raise CheckpointError(f"{path} looks like a safetensors file, not a torch.save checkpoint: name it "
                              f"{path.name.replace('.sae.pt', '.safetensors')}")
    if not head.startswith((b"PK\x03\x04", b"\x80")):  # a torch zip archive, or a (legacy torch) pickle
        raise CheckpointError(f"{path} is not a torch.save checkpoint (it starts with {head[:4]!r})")
    try:
        try:
            loaded = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError:  # legacy (non-zip) serialisation cannot be memory-mapped
            loaded = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        raise CheckpointError(f"{path} is not a plain tensor checkpoint: it holds Python objects other than tensors "
                              "(qscope reads checkpoints as plain tensors and never runs pickled code)") from None
    except Exception:  # a truncated archive: torch's messages vary (OSError, RuntimeError, EOFError, ...)
        raise CheckpointError(f"{path} cannot be read as a torch.save checkpoint (truncated or corrupt)") from None
    if not isinstance(loaded, dict):
        raise CheckpointError(f"malformed checkpoint {path}: expected a dict of tensors, got {type(loaded).__name__}")
    return loaded


def _read_weights(path: Path) -> dict[str, Tensor]:
    if path.name.endswith(".sae.pt"):
        return _torch_load(path)
    return _read_safetensors(path)


def _read_layer_file(path: Path, layer: int | None, overrides: dict[str, Any], release: Release | None) -> Checkpoint:
    """A ``layer{n}.sae.pt`` / ``layer{n}.safetensors`` file, configured by its sidecar, the registry and overrides."""
    match = _LAYER_FILE.match(path.name)
    if match is None:
        raise CheckpointError(f"{path.name!r} is not a layer file (expected layer{{n}}.sae.pt or "
                              "layer{n}.safetensors)")
    file_layer = int(match.group(1))
    if layer is not None and layer != file_layer:
        raise ConfigError(f"layer={layer} was asked for but {path} holds layer {file_layer}")
    tensors = _read_weights(path)
    d_model, d_sae = _check_tensors(tensors, str(path))
    sidecar = path.with_name(sidecar_name(file_layer))
    meta: dict[str, Any] = _read_json(sidecar) if sidecar.exists() else {}
    hook = meta.pop("hook_point", RESID_POST)
    if hook != RESID_POST and hook_layer(str(hook), str(sidecar)) != file_layer:
        raise CheckpointError(f"{sidecar}: hook point {hook!r} reads layer {hook_layer(str(hook), str(sidecar))}, "
                              f"but the weights file is for layer {file_layer}")
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
        raise ConfigError(f"k is unknown for {path}: it has no {sidecar.name} sidecar and is not a known release; "
                          f"pass k=... (e.g. 50 for an L0_50 release)")
    meta.update(d_model=d_model, d_sae=d_sae, layer=file_layer)
    try:
        return Checkpoint(SAEConfig.from_dict(meta), tensors)
    except ConfigError as error:
        given = ", ".join(f"{key}={value!r}" for key, value in overrides.items() if value is not None)
        if given:
            raise ConfigError(f"{path} with {given}: {error}") from None
        raise CheckpointError(f"malformed checkpoint {sidecar if sidecar.exists() else path}: {error}") from None


def _read_saelens(directory: Path, layer: int | None, overrides: dict[str, Any]) -> Checkpoint:
    cfg = _read_json(directory / SAELENS_CONFIG)
    origin = str(directory)
    architecture = cfg.get("architecture") or ("topk" if cfg.get("activation_fn") == "topk" else "standard")
    if architecture != "topk":
        raise CheckpointError(f"{origin}: only TopK SAEs are supported, got architecture {architecture!r}")
    k = cfg["k"] if cfg.get("k") is not None else (cfg.get("activation_fn_kwargs") or {}).get("k")
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise CheckpointError(f"{origin}: a TopK SAE needs an integer k >= 1, cfg.json says k={k!r}")
    for option, fine in (("normalize_activations", "none"), ("rescale_acts_by_decoder_norm", False)):
        if cfg.get(option, fine) != fine:
            raise CheckpointError(f"{origin}: SAELens option {option}={cfg[option]!r} is not supported")
    weights = _read_safetensors(directory / SAELENS_WEIGHTS)
    tensors = {key: value.T if key in ("W_enc", "W_dec") and value.dim() == 2 else value
               for key, value in weights.items()}
    d_model, d_sae = _check_tensors(tensors, origin)
    if cfg.get("apply_b_dec_to_input", False):
        _fold_input_bias(tensors)
    metadata = cfg.get("metadata") or {}
    hook_name = metadata.get("hook_name") or cfg.get("hook_name")
    file_layer = None if hook_name is None else hook_layer(hook_name, origin)
    if layer is not None and file_layer is not None and layer != file_layer:
        raise ConfigError(f"layer={layer} was asked for but {origin} reads layer {file_layer}")
    meta = {"d_model": d_model, "d_sae": d_sae, "k": k, "layer": layer if file_layer is None else file_layer,
            "model_id": metadata.get("model_name") or cfg.get("model_name"), "activation": "relu_topk"}
    meta.update({key: value for key, value in overrides.items() if value is not None})
    return Checkpoint(SAEConfig.from_dict(meta), tensors)


def _read_sparsify(directory: Path, layer: int | None, overrides: dict[str, Any]) -> Checkpoint:
    """A sparsify ``SparseCoder.save_to_disk`` directory; its name, when a hook point, gives the layer."""
    cfg = _read_json(directory / SAELENS_CONFIG)
    origin = str(directory)
    if cfg.get("activation", "topk") != "topk":
        raise CheckpointError(f"{origin}: only TopK sparse coders are supported, got activation "
                              f"{cfg.get('activation')!r}")
    if cfg.get("transcode") or cfg.get("skip_connection"):
        raise CheckpointError(f"{origin}: transcoders and skip connections are not SAEs of one layer's residual "
                              "stream (cfg.json: transcode / skip_connection)")
    k = cfg.get("k")
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise CheckpointError(f"{origin}: a TopK SAE needs an integer k >= 1, cfg.json says k={k!r}")
    weights = _read_safetensors(directory / SPARSIFY_WEIGHTS)
    renamed = {"encoder.weight": "W_enc", "encoder.bias": "b_enc"}
    tensors = {renamed.get(key, key): value for key, value in weights.items()}
    if isinstance(tensors.get("W_dec"), Tensor) and tensors["W_dec"].dim() == 2:
        tensors["W_dec"] = tensors["W_dec"].T
    d_model, d_sae = _check_tensors(tensors, origin)
    _fold_input_bias(tensors)
    file_layer = hook_layer(directory.name, origin) if _HF_LAYER.match(directory.name) else None
    if layer is not None and file_layer is not None and layer != file_layer:
        raise ConfigError(f"layer={layer} was asked for but {origin} reads layer {file_layer}")
    meta = {"d_model": d_model, "d_sae": d_sae, "k": k, "layer": layer if file_layer is None else file_layer,
            "activation": "relu_topk"}
    meta.update({key: value for key, value in overrides.items() if value is not None})
    return Checkpoint(SAEConfig.from_dict(meta), tensors)


def layers_in(directory: Path) -> list[int]:
    """The layers of the ``layer{n}.sae.pt`` / ``layer{n}.safetensors`` files in ``directory``."""
    return sorted({int(m.group(1)) for p in directory.iterdir() if (m := _LAYER_FILE.match(p.name))})


def _read_local(path: Path, layer: int | None, overrides: dict[str, Any]) -> Checkpoint:
    if path.is_file():
        if path.name == SAELENS_WEIGHTS:
            return _read_saelens(path.parent, layer, overrides)
        if path.name == SPARSIFY_WEIGHTS:
            return _read_sparsify(path.parent, layer, overrides)
        return _read_layer_file(path, layer, overrides, None)
    if (path / SAELENS_CONFIG).exists():
        reader = _read_sparsify if (path / SPARSIFY_WEIGHTS).exists() else _read_saelens
        return reader(path, layer, overrides)
    if layer is not None:
        hookpoints = [p for p in path.iterdir() if p.is_dir() and _HF_LAYER.match(p.name)
                      and int(_HF_LAYER.match(p.name).group(1)) == layer and (p / SPARSIFY_WEIGHTS).exists()]
        if len(hookpoints) == 1:  # a sparsify run directory: one sub-directory per hook point
            return _read_sparsify(hookpoints[0], layer, overrides)
    present = layers_in(path)
    if layer is None:
        if len(present) != 1:
            raise ConfigError(f"{path} holds layers {present}: pass layer=...")
        layer = present[0]
    for fmt in ("qscope", "qwen-scope"):
        candidate = path / weights_name(layer, fmt)
        if candidate.exists():
            return _read_layer_file(candidate, layer, overrides, None)
    raise MissingFileError(f"{path} has no SAE for layer {layer} (looked for {weights_name(layer, 'qscope')} and "
                           f"{weights_name(layer, 'qwen-scope')}); layers present: {present}")


def read(source: str | Path, layer: int | None = None, *, revision: str | None = None,
         cache_dir: str | Path | None = None, **overrides: Any) -> Checkpoint:
    """Read one SAE from a local path, a Qwen-Scope release id, or a qscope-layout hub repo (hub sources are
    fetched by :func:`qscope_hf.hub.resolve`). ``overrides`` (``k``, ``activation``, …) take precedence over what
    the checkpoint says."""
    path, release = hub.resolve(source, layer, revision=revision, cache_dir=cache_dir)
    if release is not None:
        return _read_layer_file(path, layer, overrides, release)
    return _read_local(path, layer, overrides)


def _saelens_config(config: SAEConfig, dtype: torch.dtype) -> dict[str, Any]:
    if config.activation != "relu_topk":
        raise ConfigError("SAELens' TopK applies ReLU to the selected values; an activation='topk' SAE would change "
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
        raise ConfigError(f"unknown SAE format {fmt!r}; choose one of {FORMATS}")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    plain = {key: tensors[key].detach().cpu().contiguous() for key in TENSOR_KEYS}
    if fmt == "sparsify":
        if config.activation != "relu_topk":
            raise ConfigError("sparsify's TopK applies ReLU to the selected values; an activation='topk' SAE would "
                              "change its outputs in sparsify format (save it as 'qscope' or 'qwen-scope')")
        if config.layer is None:
            raise ConfigError("the sparsify layout names the directory by hook point: set the SAE's layer first")
        directory = directory / f"layers.{config.layer}"
        directory.mkdir(exist_ok=True)
        coder = {"encoder.weight": plain["W_enc"], "encoder.bias": _unfold_input_bias(plain),
                 "W_dec": plain["W_dec"].T.contiguous(), "b_dec": plain["b_dec"]}
        atomic_write(directory / SPARSIFY_WEIGHTS, lambda path: safetensors.torch.save_file(coder, path))
        cfg = {"activation": "topk", "expansion_factor": max(1, config.d_sae // config.d_model),
               "normalize_decoder": True, "num_latents": config.d_sae, "k": config.k, "multi_topk": False,
               "skip_connection": False, "transcode": False, "d_in": config.d_model}
        atomic_write_text(directory / SAELENS_CONFIG, json.dumps(cfg))
        return directory / SPARSIFY_WEIGHTS
    if fmt == "saelens":
        cfg = _saelens_config(config, plain["W_enc"].dtype)
        saelens = {**plain, "W_enc": plain["W_enc"].T.contiguous(), "W_dec": plain["W_dec"].T.contiguous()}
        atomic_write(directory / SAELENS_WEIGHTS, lambda path: safetensors.torch.save_file(saelens, path))
        atomic_write_text(directory / SAELENS_CONFIG, json.dumps(cfg, indent=2))
        return directory / SAELENS_WEIGHTS
    if config.layer is None:
        raise ConfigError(f"the {fmt} layout names files by layer: set the SAE's layer before saving")
    weights = directory / weights_name(config.layer, fmt)
    if fmt == "qwen-scope":
        atomic_write(weights, lambda path: torch.save(plain, path))
    else:
        atomic_write(weights, lambda path: safetensors.torch.save_file(plain, path, metadata={"format": "qscope"}))
    sidecar = {"format": fmt, "weights": weights.name, **config.to_dict()}
    atomic_write_text(directory / sidecar_name(config.layer), json.dumps(sidecar, indent=2))
    return weights


__all__ = ["FORMATS", "Checkpoint", "CheckpointError", "RESID_POST", "read", "write"]
