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
import re
from collections.abc import Sequence
from pathlib import Path

import torch
from accelerate.utils import extract_model_from_parallel
from peft import PeftModel
from torch import Tensor, nn

from .atomic import atomic_write
from .errors import (
    ArgumentTypeError,
    CheckpointError,
    ConfigError,
    MissingFileError,
    OutputExistsError,
    UnsupportedError,
)
from .formats import non_finite_count
from .hooks import decoder_layers, hidden_size, strip_hooks, unwrap_model
from .steering import Steering, steering_list

ARCHITECTURE = "controlvector"
_DIRECTION = re.compile(r"^direction\.(0|[1-9][0-9]*)$")


def _constant_vectors(steerings: Steering | Sequence[Steering], model: nn.Module | None, *,
                      control_vector: bool) -> dict[int, Tensor]:
    """Per layer, the sum of the specs' constant vectors ``[d_model]`` (fp32, CPU); refuses what is not constant
    (and, for a llama.cpp ``control_vector``, block 0)."""
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
            raise ConfigError("relative=True strengths are measured on each prompt; a constant vector needs absolute "
                              "ones: qscope_hf.calibration.absolute_steering(spec, model, tokenizer, texts) measures "
                              "the unit (the residual spread) on texts and converts the spec (or spec.absolute(unit))")
        if spec.layer == 0 and control_vector:
            raise ConfigError("llama.cpp cannot steer block 0 (direction.0 is rejected): steer layer 1 or later")
        if model is not None:
            spec.check_fits(model)
        vector = spec.tensors(torch.float32, torch.device("cpu"))["vector"]
        vectors[spec.layer] = vectors.get(spec.layer, 0) + vector
    for layer, vector in vectors.items():
        if non_finite_count(vector):
            raise ConfigError(f"the steering vector for layer {layer} has non-finite values (NaN or inf): check the "
                              "SAE's decoder weights and the strengths")
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
        raise OutputExistsError(f"{path} exists: pass overwrite=True to replace it")
    vectors = _constant_vectors(steerings, model, control_vector=True)
    config = unwrap_model(model).config.get_text_config()

    def write(temporary: Path) -> None:
        writer = gguf.GGUFWriter(temporary, ARCHITECTURE)
        writer.add_string(f"{ARCHITECTURE}.model_hint", str(config.model_type))
        writer.add_uint32(f"{ARCHITECTURE}.layer_count", len(decoder_layers(model)))
        for layer in sorted(vectors):
            writer.add_tensor(f"direction.{layer}", vectors[layer].numpy().astype("float32"))
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()

    return atomic_write(path, write)


def import_control_vector(path: str | Path) -> list[Steering]:
    """The control vector at ``path`` (written by qscope, repeng or llama.cpp's generator) as one
    ``Steering.from_vector(direction, layer, 1.0, normalize=False)`` per ``direction.N``."""
    import gguf

    path = Path(path)
    if not path.is_file():
        raise MissingFileError(f"no control vector at {path}")
    try:
        reader = gguf.GGUFReader(path)
    except Exception as error:  # not GGUF at all, or truncated
        raise CheckpointError(f"{path} is not a GGUF file: {error}") from None
    field = reader.get_field("general.architecture")
    architecture = field.contents() if field is not None else None
    if architecture != ARCHITECTURE:
        raise CheckpointError(f"{path} is a GGUF file of architecture {architecture!r}, not a control vector")
    specs: dict[int, Steering] = {}
    for tensor in reader.tensors:
        name = tensor.name
        match = _DIRECTION.match(name)
        if match is None:
            raise CheckpointError(f"{path}: unexpected tensor {name!r} in a control vector (expected direction.N)")
        layer = int(match.group(1))
        if layer in specs:
            raise CheckpointError(f"{path}: two tensors for layer {layer} ({name!r} and direction.{layer})")
        shape = tuple(int(n) for n in tensor.shape if n != 1) or (1,)
        if len(shape) != 1:
            raise CheckpointError(f"{path}: {name} has shape {tuple(int(n) for n in tensor.shape)}; a control vector "
                                  "holds one 1-D direction per layer")
        vector = torch.from_numpy(tensor.data.astype("float32").reshape(-1).copy())
        if non_finite_count(vector) or not bool(vector.any()):
            raise CheckpointError(f"{path}: {name} is {'all zeros' if bool(vector.isfinite().all()) else 'not finite'}"
                                  "; a control vector's directions are finite and not all zero")
        specs[layer] = Steering.from_vector(vector, layer, 1.0, normalize=False)
    if not specs:
        raise CheckpointError(f"{path} holds no direction.N tensor")
    return [specs[layer] for layer in sorted(specs)]


def _plain_copy(model: nn.Module) -> nn.Module:
    """A deep copy of the HF model in ``model`` that plain ``from_pretrained`` can rebuild: PEFT adapters merged
    into the weights (a PEFT model saves its adapters, not the base weights), no qscope hooks."""
    outer = extract_model_from_parallel(model)
    if isinstance(outer, PeftModel):
        if not callable(getattr(outer.base_model, "merge_and_unload", None)):
            raise UnsupportedError(f"cannot bake steering into a PEFT model with {type(outer.base_model).__name__} "
                                   "adapters: they cannot be merged into the weights (LoRA-type adapters can)")
        baked = copy.deepcopy(outer).merge_and_unload()
    else:
        baked = copy.deepcopy(unwrap_model(model))
    return strip_hooks(baked)


def bake_steering(model: nn.Module, steerings: Steering | Sequence[Steering]) -> nn.Module:
    """A copy of ``model`` that adds ``steerings`` through its MLP ``down_proj`` biases (Llama-style models with
    ``mlp_bias`` in their config); ``model`` itself is not changed. The copy ``save_pretrained``-s and loads with
    plain ``from_pretrained``: every MLP projection gets a bias (zeros, except ``down_proj`` of steered layers).
    A PEFT model's adapters are merged into the copy's weights; hooks of open steering blocks are not copied."""
    if not isinstance(model, nn.Module):
        raise ArgumentTypeError(f"bake_steering needs a transformers model, got {type(model).__name__}")
    inner = unwrap_model(model)
    config = inner.config.get_text_config()
    vectors = _constant_vectors(steerings, model, control_vector=False)
    if not hasattr(config, "mlp_bias"):
        raise UnsupportedError(
            f"{type(inner).__name__} ({config.model_type}) has no MLP bias to hold a constant vector: baking needs a "
            "Llama-style config with mlp_bias (Qwen3, Qwen2 and Gemma have none; an attention o_proj bias would act "
            "before the MLP, not at the layer output). Export a llama.cpp control vector instead "
            "(export_control_vector), or steer with hooks")
    baked = _plain_copy(model)
    layers = decoder_layers(baked)
    width = hidden_size(baked)
    for index, layer in enumerate(layers):
        mlp = getattr(layer, "mlp", None)
        projections = [getattr(mlp, name, None) for name in ("gate_proj", "up_proj", "down_proj")]
        if not all(isinstance(p, nn.Linear) for p in projections) or projections[2].out_features != width:
            found = {name: type(p).__name__ for name, p in zip(("gate_proj", "up_proj", "down_proj"), projections)}
            raise UnsupportedError(f"layer {index} of {type(inner).__name__} has no plain gate/up/down nn.Linear MLP "
                                   f"projections to hold a bias (found {found})")
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
