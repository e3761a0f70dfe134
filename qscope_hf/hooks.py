"""Where an SAE reads and writes in a model: the decoder layers and hooks on their outputs.

SAE ``layer n`` reads the output of decoder layer ``n`` (the residual stream after block n), which equals
``output_hidden_states=True``'s ``hidden_states[n + 1]`` (index 0 is the embeddings). Hooks go on the layer
module itself, so they also see the last layer's output, which ``hidden_states[-1]`` replaces by the final
norm's output. A decoder layer returns a tensor or a tuple whose first item is the hidden state, depending on
the transformers version; both are handled.

Hooks are registered on model *instances* (never on classes) and always removed when their context exits,
exceptions included. They act only on the forwards run by the code inside their block: a ``contextvars.ContextVar``
names the hook blocks active in the current thread (or asyncio task), so another thread that runs the same model at
the same time, steered differently or not at all, is not affected.

``torch.compile`` does not see forward hooks added after a module was compiled (Dynamo does not guard on them), so
while a hook block is open on a compiled model (``torch.compile(model)``, ``model.compile()`` or a compiled decoder
layer), the forwards run inside that block call the eager module: they are edited, and every other caller keeps
the compiled graph. Hooks that exist when Dynamo traces read the ``ContextVar``, which Dynamo does not trace, so
they run eagerly there too and never go stale.

A copy of a model made inside a hook block (``copy.deepcopy``, pickling) does not carry the block's hooks: the
copied hook is inert and removes itself at its first call (:func:`strip_hooks` removes it at once).
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import ExitStack, contextmanager
from contextvars import ContextVar
from typing import Any

import torch
from accelerate.utils import extract_model_from_parallel
from torch import Tensor, nn
from transformers import PreTrainedModel

from .errors import ConfigError, LayerError, UnsupportedError

LayerEdit = Callable[[Tensor], Tensor | None]

#: Where decoder layers live in architectures without ``get_decoder()``, tried in order.
_LAYER_PATHS = ("model.layers", "model.language_model.layers", "language_model.model.layers", "transformer.h",
                "gpt_neox.layers", "model.decoder.layers", "layers")


def unwrap_model(model: nn.Module) -> nn.Module:
    """The model inside DDP / FSDP / DeepSpeed / ``torch.compile`` / PEFT wrappers (PEFT's LoRA layers stay)."""
    previous = None
    while model is not previous:
        previous = model
        if not isinstance(model, PreTrainedModel):  # an HF model wraps nothing: skip accelerate's checks (~60 µs)
            model = extract_model_from_parallel(model)
        get_base_model = getattr(model, "get_base_model", None)
        if callable(get_base_model):
            model = get_base_model()
    return model


def _attribute_path(root: nn.Module, path: str) -> Any:
    obj: Any = root
    for name in path.split("."):
        obj = getattr(obj, name, None)
        if obj is None:
            return None
    return obj


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The decoder layers of a causal LM (Qwen3, Qwen3-MoE, Qwen3.5 text and multimodal, Llama-style, GPT-2,
    GPT-NeoX), also through PEFT, DDP, accelerate and ``torch.compile`` wrappers."""
    inner = unwrap_model(model)
    get_decoder = getattr(inner, "get_decoder", None)
    candidates = []
    if callable(get_decoder):
        try:
            candidates.append(getattr(get_decoder(), "layers", None))
        except (AttributeError, NotImplementedError):
            pass
    candidates += [_attribute_path(inner, path) for path in _LAYER_PATHS]
    for layers in candidates:
        if isinstance(layers, nn.ModuleList) and len(layers):
            return layers
    raise UnsupportedError(f"cannot find the decoder layers of {type(inner).__name__}: tried get_decoder().layers and "
                           f"{', '.join(_LAYER_PATHS)}")


def hidden_size(model: nn.Module) -> int:
    """The residual-stream width of ``model`` (the text model's hidden size for multimodal models)."""
    config = unwrap_model(model).config
    return config.get_text_config().hidden_size


def num_layers(model: nn.Module) -> int:
    """The number of decoder layers of ``model`` (through any wrapper)."""
    return len(decoder_layers(model))


def check_layer(model: nn.Module, layer: int) -> int:
    """``layer`` if the model has it, else an ``IndexError`` naming the valid range."""
    count = num_layers(model)
    if not isinstance(layer, int) or not 0 <= layer < count:
        raise LayerError(f"layer {layer} is out of range: {type(unwrap_model(model)).__name__} has decoder layers "
                         f"0..{count - 1}")
    return layer


def check_sae_fits(model: nn.Module, sae: nn.Module, layer: int | None = None) -> int:
    """Check that ``sae`` can read ``layer`` of ``model`` (default: the SAE's own layer); return the layer."""
    layer = sae.layer if layer is None else layer
    if layer is None:
        raise ConfigError("the SAE has no layer: pass layer=... to say which decoder layer it reads")
    check_layer(model, layer)
    width = hidden_size(model)
    if sae.d_model != width:
        raise ConfigError(f"SAE d_model={sae.d_model} does not match the model's hidden size {width} at layer {layer}")
    return layer


def layer_hidden(output: Tensor | tuple) -> Tensor:
    """The hidden state ``[B, T, d]`` in a decoder layer's output (a tensor, or a tuple led by it)."""
    return output if isinstance(output, Tensor) else output[0]


def replace_hidden(output: Tensor | tuple, hidden: Tensor) -> Tensor | tuple:
    """``output`` with its hidden state replaced, keeping the tensor-or-tuple shape the layer returned."""
    return hidden if isinstance(output, Tensor) else (hidden, *output[1:])


#: The hook blocks active in the current thread / asyncio task (one token object per block).
_ACTIVE: ContextVar[frozenset[object]] = ContextVar("qscope_active_hook_blocks", default=frozenset())
_SWAP_LOCK = threading.Lock()


class _LayerHook:
    """A forward hook that applies ``edit`` to ``layer``'s output in the forwards of its block only.

    Deep copies and pickles of it are inert (a copied model must not carry a block's hooks); an inert hook removes
    itself from the module it is called on.
    """

    def __init__(self, edit: LayerEdit | None, block: object | None, layer: nn.Module | None) -> None:
        self.edit, self.block, self.layer = edit, block, layer

    def __call__(self, module: nn.Module, _inputs: Any, output: Tensor | tuple) -> Tensor | tuple | None:
        if module is not self.layer:  # a copy's hook: drop it (the hook dict is iterated from a snapshot)
            _remove_forward_hooks(module, lambda hook: hook is self)
            return None
        if self.block not in _ACTIVE.get():
            return None
        new = self.edit(layer_hidden(output))
        return None if new is None else replace_hidden(output, new)

    def __deepcopy__(self, memo: dict) -> _LayerHook:
        return _LayerHook(None, None, None)

    def __reduce__(self) -> tuple:
        return _LayerHook, (None, None, None)


def _remove_forward_hooks(module: nn.Module, chosen: Callable[[Any], bool]) -> None:
    for key, hook in list(module._forward_hooks.items()):
        if chosen(hook):
            del module._forward_hooks[key]


def strip_hooks(model: nn.Module) -> nn.Module:
    """Remove every qscope layer hook from ``model``'s modules (for a copy made inside a hook block); returns it."""
    for module in model.modules():
        _remove_forward_hooks(module, lambda hook: isinstance(hook, _LayerHook))
    return model


class _EagerInBlocks:
    """Stands in for a compiled callable: a call made inside a hook block runs ``eager`` (so the block's hooks
    run), any other call the compiled one. ``users`` counts the open blocks that installed it."""

    def __init__(self, compiled: Callable, eager: Callable) -> None:
        self.compiled, self.eager, self.users = compiled, eager, 0

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return (self.eager if _ACTIVE.get() else self.compiled)(*args, **kwargs)


def _compiled_around(model: nn.Module, layers: list[nn.Module]) -> list[tuple[nn.Module, str, Callable]]:
    """``(module, attribute, eager callable)`` for each compiled module whose compiled graph contains one of
    ``layers`` (the layer itself or an ancestor): ``torch.compile(m)`` wrappers and ``m.compile()``-d modules."""
    found = []
    targets = {id(layer) for layer in layers}
    for module in model.modules():
        if isinstance(module, torch._dynamo.eval_frame.OptimizedModule) and "forward" in module.__dict__:
            attribute, eager = "forward", module._orig_mod.__call__
        elif getattr(module, "_compiled_call_impl", None) is not None:
            attribute, eager = "_compiled_call_impl", module._call_impl
        else:
            continue
        if any(id(inner) in targets for inner in module.modules()):
            found.append((module, attribute, eager))
    return found


@contextmanager
def _eager_in_blocks(model: nn.Module, layers: list[nn.Module]) -> Iterator[None]:
    """While open, calls made inside hook blocks skip the compiled graphs that contain ``layers``."""
    swapped = []
    with _SWAP_LOCK:
        for module, attribute, eager in _compiled_around(model, layers):
            current = getattr(module, attribute)
            if not isinstance(current, _EagerInBlocks):
                current = _EagerInBlocks(current, eager)
                setattr(module, attribute, current)
            current.users += 1
            swapped.append((module, attribute, current))
    try:
        yield
    finally:
        with _SWAP_LOCK:
            for module, attribute, current in swapped:
                current.users -= 1
                if not current.users:
                    setattr(module, attribute, current.compiled)


@contextmanager
def _active_block() -> Iterator[object]:
    """Mark a new hook block active in this context for the duration of the ``with``; yields its token."""
    block = object()
    _ACTIVE.set(_ACTIVE.get() | {block})
    try:
        yield block
    finally:  # not ContextVar.reset: blocks of one context may close in any order
        _ACTIVE.set(_ACTIVE.get() - {block})


@contextmanager
def hook_layers(model: nn.Module, edits: Mapping[int, LayerEdit]) -> Iterator[None]:
    """Call ``edits[n](hidden)`` on the output of each decoder layer ``n`` during every forward run inside the
    block (in this thread or asyncio task; other threads' forwards are not edited).

    ``hidden`` is ``[B, T, d]``; a returned tensor replaces the layer's output, ``None`` leaves it unchanged.
    All hooks are removed on exit, also when the block raises. On a compiled model the block's forwards run the
    eager module (see the module docstring).
    """
    layers = decoder_layers(model)
    for layer in edits:
        check_layer(model, layer)
    handles = []
    with ExitStack() as stack:
        block = stack.enter_context(_active_block())
        stack.enter_context(_eager_in_blocks(model, [layers[layer] for layer in edits]))
        try:
            for layer, edit in edits.items():
                handles.append(layers[layer].register_forward_hook(_LayerHook(edit, block, layers[layer])))
            yield
        finally:
            for handle in handles:
                handle.remove()


class _StopForward(Exception):
    """Raised after the last captured layer to end a forward early (``capture_layers(stop=True)``)."""


@contextmanager
def capture_layers(model: nn.Module, layers: Iterable[int], *, detach: bool = True,
                   stop: bool = False) -> Iterator[dict[int, Tensor]]:
    """Capture the output ``[B, T, d]`` of each decoder layer in ``layers``.

    Yields a dict that each forward fills with the latest output per layer (detached unless ``detach=False``,
    which keeps the graph for losses). With ``stop=True`` the forward ends right after the last of ``layers``
    (the later layers and the LM head are skipped) and the block ends there: use it around a single forward whose
    only purpose is the capture.
    """
    layers = sorted(set(layers))
    captured: dict[int, Tensor] = {}

    def recorder(layer: int) -> LayerEdit:
        def record(hidden: Tensor) -> None:
            captured[layer] = hidden.detach() if detach else hidden
            if stop and layer == layers[-1]:
                raise _StopForward

        return record

    try:
        with hook_layers(model, {layer: recorder(layer) for layer in layers}):
            yield captured
    except _StopForward:
        pass


@contextmanager
def add_to_layers(model: nn.Module, vectors: Mapping[int, Tensor]) -> Iterator[None]:
    """Add ``vectors[n]`` (``[d]``, or anything broadcastable to ``[B, T, d]``) to the output of layer ``n``."""
    width = hidden_size(model)
    for layer, vector in vectors.items():
        if vector.shape[-1] != width:
            raise ConfigError(f"vector for layer {layer} has size {vector.shape[-1]}, "
                              f"the model's hidden size is {width}")

    def adder(vector: Tensor) -> LayerEdit:
        return lambda hidden: hidden + vector.to(device=hidden.device, dtype=hidden.dtype)

    with hook_layers(model, {layer: adder(vector) for layer, vector in vectors.items()}):
        yield


@torch.no_grad()
def layer_outputs(model: nn.Module, layers: Iterable[int], **inputs: Any) -> dict[int, Tensor]:
    """The outputs ``[B, T, d]`` of ``layers`` for ``model(**inputs)`` (the forward stops after the last of them)."""
    with capture_layers(model, layers, stop=True) as captured:
        model(**inputs)
    return dict(captured)
