"""Steering outside transformers: llama.cpp control vectors, and checkpoints with the steering baked in.

**Control vectors** (:func:`export_control_vector`, :func:`import_control_vector`). llama.cpp (``llama-cli`` /
``llama-completion --control-vector-scaled FILE SCALE``, ``llama_apply_adapter_cvec`` in its C API and
llama-cpp-python) and the vLLM steering fork EasySteer read the same GGUF layout that repeng writes:
``general.architecture = "controlvector"``, ``controlvector.model_hint`` (the model type, informative),
``controlvector.layer_count``, and one float32 tensor ``direction.N`` per steered layer, added to the output of
block ``N`` — HF ``model.layers[N]``, which is qscope's SAE layer ``N``. Block 0 cannot be steered in llama.cpp.
Every ``add`` spec at all positions exports: SAE features (``Σ α_i W_dec[:, f_i]``), vectors from
:meth:`Steering.from_vector` (difference of means, SAE-TS targeted vectors); specs on one layer sum and strengths
are baked in. What a constant vector cannot express is refused: ``clamp`` and ``gated`` modes (they read the
activation), ``positions`` other than ``"all"``, and ``relative=True`` strengths (they depend on each prompt).

**Baked checkpoints** (:func:`bake_steering`): a copy of the model whose weights add the vectors, so that it
``save_pretrained``-s and loads with plain ``from_pretrained``. Exact where the architecture has a bias added
right at a layer's output: the MLP's ``down_proj`` bias of Llama-style models (``config.mlp_bias``), since the
decoder layer's output is ``h + attn(...) + down_proj(...)``. An attention ``o_proj`` bias is not equivalent (it
lands before the MLP reads the residual), so other architectures are refused.
"""

from __future__ import annotations

import copy
import os
import tempfile
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import Tensor, nn

from .errors import CheckpointError, ConfigError
from .hooks import decoder_layers, hidden_size, unwrap_model
from .steering import Steering, steering_list

ARCHITECTURE = "controlvector"


def _constant_vectors(steerings: Steering | Sequence[Steering], model: nn.Module | None) -> dict[int, Tensor]:
    """Per layer, the sum of the specs' constant vectors ``[d_model]`` (fp32, CPU); refuses what is not constant."""
    specs = steering_list(steerings)
    if not specs:
        raise ConfigError("nothing to export: pass at least one Steering spec")
    vectors: dict[int, Tensor] = {}
    for spec in specs:
        if spec.mode != "add":
            raise ConfigError(f"mode={spec.mode!r} reads the feature's activation at every token; a constant control "
                              "vector can only add (use mode='add')")
        if spec.positions != "all":
            raise ConfigError(f"positions={spec.positions!r} steers only some tokens; a control vector is added at "
                              "every position (use positions='all')")
        if spec.relative:
            raise ConfigError("relative=True strengths are measured on each prompt; export absolute strengths "
                              "(spec.scaled(norm) with relative=False, norm e.g. from discovery.residual_norm)")
        if spec.layer == 0:
            raise ConfigError("llama.cpp cannot steer block 0 (direction.0 is rejected): steer layer 1 or later")
        if model is not None:
            spec.check_fits(model)
        vector = spec.tensors(torch.float32, torch.device("cpu"))["vector"]
        vectors[spec.layer] = vectors.get(spec.layer, 0) + vector
    widths = {layer: v.numel() for layer, v in vectors.items()}
    if len(set(widths.values())) != 1:
        raise ConfigError(f"the specs have different widths per layer: {widths}")
    return vectors


def export_control_vector(steerings: Steering | Sequence[Steering], path: str | Path, *, model: nn.Module,
                          overwrite: bool = False) -> Path:
    """Write ``steerings`` as a llama.cpp control-vector GGUF at ``path`` (see the module docstring); returns it.

    ``model`` is the HF model the vectors were made for: it checks layers and widths and gives the model hint and
    layer count. The file is written to a temporary name and renamed, so a failure leaves nothing half-written.
    """
    import gguf

    path = Path(path)
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} exists: pass overwrite=True to replace it")
    vectors = _constant_vectors(steerings, model)
    config = unwrap_model(model).config.get_text_config()
    fd, temporary = tempfile.mkstemp(suffix=".gguf", dir=path.parent if path.parent.exists() else None)
    os.close(fd)
    try:
        writer = gguf.GGUFWriter(temporary, ARCHITECTURE)
        writer.add_string(f"{ARCHITECTURE}.model_hint", str(config.model_type))
        writer.add_uint32(f"{ARCHITECTURE}.layer_count", len(decoder_layers(model)))
        for layer in sorted(vectors):
            writer.add_tensor(f"direction.{layer}", vectors[layer].numpy().astype("float32"))
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        os.replace(temporary, path)
    finally:
        if os.path.exists(temporary):
            os.remove(temporary)
    return path


def import_control_vector(path: str | Path) -> list[Steering]:
    """The control vector at ``path`` (written by qscope, repeng or llama.cpp's generator) as one
    ``Steering.from_vector(direction, layer, 1.0, normalize=False)`` per ``direction.N``."""
    import gguf

    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"no control vector at {path}")
    try:
        reader = gguf.GGUFReader(path)
    except Exception as error:  # not GGUF at all, or truncated
        raise CheckpointError(f"{path} is not a GGUF file: {error}") from None
    field = reader.get_field("general.architecture")
    architecture = field.contents() if field is not None else None
    if architecture != ARCHITECTURE:
        raise CheckpointError(f"{path} is a GGUF file of architecture {architecture!r}, not a control vector")
    specs = []
    for tensor in reader.tensors:
        name = tensor.name
        if not name.startswith("direction.") or not name.split(".", 1)[1].isdigit():
            raise CheckpointError(f"{path}: unexpected tensor {name!r} in a control vector")
        vector = torch.from_numpy(tensor.data.astype("float32").reshape(-1).copy())
        specs.append(Steering.from_vector(vector, int(name.split(".", 1)[1]), 1.0, normalize=False))
    if not specs:
        raise CheckpointError(f"{path} holds no direction.N tensor")
    return sorted(specs, key=lambda spec: spec.layer)


def bake_steering(model: nn.Module, steerings: Steering | Sequence[Steering]) -> nn.Module:
    """A copy of ``model`` that adds ``steerings`` through its MLP ``down_proj`` biases (Llama-style models with
    ``mlp_bias`` in their config); ``model`` itself is not changed. The copy ``save_pretrained``-s and loads with
    plain ``from_pretrained``: every MLP projection gets a bias (zeros, except ``down_proj`` of steered layers)."""
    inner = unwrap_model(model)
    config = inner.config.get_text_config()
    vectors = _constant_vectors(steerings, model)
    if not hasattr(config, "mlp_bias"):
        raise ConfigError(f"{type(inner).__name__} has no MLP bias to hold a constant vector (config.mlp_bias); an "
                          "attention o_proj bias would act before the MLP, not at the layer output: export a control "
                          "vector instead")
    baked = copy.deepcopy(inner)
    layers = decoder_layers(baked)
    width = hidden_size(baked)
    for index, layer in enumerate(layers):
        mlp = getattr(layer, "mlp", None)
        projections = [getattr(mlp, name, None) for name in ("gate_proj", "up_proj", "down_proj")]
        if not all(isinstance(p, nn.Linear) for p in projections) or projections[2].out_features != width:
            raise ConfigError(f"layer {index} of {type(inner).__name__} has no gate/up/down MLP projections")
        for projection in projections:
            if projection.bias is None:
                weight = projection.weight
                projection.bias = nn.Parameter(torch.zeros(projection.out_features, dtype=weight.dtype,
                                                           device=weight.device))
        if index in vectors:
            with torch.no_grad():
                down = projections[2]
                down.bias += vectors[index].to(down.bias.device, down.bias.dtype)
    baked.config.get_text_config().mlp_bias = True
    return baked
