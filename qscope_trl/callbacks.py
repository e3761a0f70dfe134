"""``SAEFeatureMonitorCallback``: log how often chosen SAE features fire on completion tokens during training.

Add it to any ``SFTTrainer`` / ``GRPOTrainer`` (or ``Trainer``) with ``callbacks=[...]``. It reads the chosen layers'
outputs from hooks during the trainer's own training forwards (no extra forward; recomputation under gradient
checkpointing is not counted twice) and, every ``every`` steps, logs per feature the firing rate (fraction of
completion tokens where ``ReLU(f_s(x)) > threshold``) and the mean activation, as ``sae/L{layer}/f{feature}/rate``
and ``.../mean`` in the trainer's normal logs, so they reach TensorBoard / W&B like any metric. An optional probe
set is run (one extra no-grad forward at each logging step) and logged under ``sae_probe/``.

Completion tokens are those with ``labels != -100`` (SFT), the last ``logits_to_keep`` real tokens (GRPO), or all
real tokens otherwise. Activations are read from each feature's own encoder row (no full encode).

``monitor.attach(trainer)`` is the recommended way in: it puts the monitor first in the trainer's callbacks (so
its metrics reach TensorBoard / W&B, which transformers places before user callbacks) and removes its hooks when
``trainer.train()`` ends, also when it raises. Passed as ``callbacks=[monitor]`` instead, it works the same except
that the metrics reach ``trainer.state.log_history`` and the console but not the reporting integrations that
run before it, and hooks left by a run that raised are removed by ``monitor.close()``, ``with monitor:`` or the
next ``train()``.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn
from transformers import TrainerCallback

from qscope_hf.errors import ConfigError
from qscope_hf.hooks import check_sae_fits, decoder_layers, layer_hidden, layer_outputs, unwrap_model
from qscope_hf.sae import SparseAutoencoder
from qscope_hf.validation import finite, positive_int


def _token_mask(kwargs: Mapping[str, Any], hidden: Tensor) -> Tensor:
    """``[B, T]`` mask of the completion tokens of a forward, from the arguments the trainer passed."""
    batch, length = hidden.shape[:2]
    attention = kwargs.get("attention_mask")
    real = attention.bool() if attention is not None else torch.ones(batch, length, dtype=torch.bool,
                                                                   device=hidden.device)
    labels = kwargs.get("labels")
    if labels is not None:
        return labels != -100
    keep = kwargs.get("logits_to_keep")
    if isinstance(keep, int) and keep > 0:
        tail = torch.zeros_like(real)
        tail[:, -keep:] = True
        return real & tail
    return real


class SAEFeatureMonitorCallback(TrainerCallback):
    """Firing rate and mean activation of ``features`` of ``saes`` on completion tokens, logged every ``every`` steps.

    ``features`` is a list (one SAE) or a mapping layer -> list. ``probe_texts`` (with ``tokenizer``) adds the same
    statistics on a fixed probe set.
    """

    def __init__(self, saes: SparseAutoencoder | Sequence[SparseAutoencoder],
                 features: Sequence[int] | Mapping[int, Sequence[int]], *, every: int = 10, threshold: float = 0.0,
                 probe_texts: Sequence[str] | None = None, tokenizer: Any = None, prefix: str = "sae") -> None:
        saes = [saes] if isinstance(saes, SparseAutoencoder) else list(saes)
        if not saes:
            raise ConfigError("SAEFeatureMonitorCallback needs at least one SAE")
        self.saes = {sae.layer: sae for sae in saes}
        if not isinstance(features, Mapping):
            if len(saes) != 1:
                raise ConfigError("with several SAEs, pass features as a mapping layer -> feature ids")
            features = {saes[0].layer: features}
        unknown = sorted(set(features) - set(self.saes))
        if unknown:
            raise ConfigError(f"features are given for layers {unknown} but the SAEs read layers {sorted(self.saes)}")
        self.readers = {layer: self.saes[layer].feature_reader(list(ids)) for layer, ids in features.items()}
        self.features = {layer: reader.features for layer, reader in self.readers.items()}
        empty = [layer for layer, index in self.features.items() if not index.numel()]
        if not self.features or empty:
            raise ConfigError(f"no features to monitor at layers {empty or sorted(self.saes)}")
        positive_int("every", every)
        finite("threshold", threshold, non_negative=True)
        if probe_texts is not None and tokenizer is None:
            raise ConfigError("probe_texts need a tokenizer")
        self.every, self.threshold, self.prefix = every, threshold, prefix
        self.probe_texts, self.tokenizer = probe_texts, tokenizer
        self._handles: list = []
        self._reset()

    def _reset(self) -> None:
        self.counts = {layer: torch.zeros(len(f), dtype=torch.float64) for layer, f in self.features.items()}
        self.sums = {layer: torch.zeros(len(f), dtype=torch.float64) for layer, f in self.features.items()}
        self.tokens = 0.0

    def _record(self, layer: int, hidden: Tensor, mask: Tensor, counts: dict, sums: dict) -> float:
        acts = self.readers[layer].acts(hidden.detach()).float()[mask]  # [n, S]
        counts[layer] += (acts > self.threshold).sum(0).double().cpu()
        sums[layer] += acts.sum(0).double().cpu()
        return float(mask.sum())

    # -- hooks on the training model --------------------------------------------------------------------------
    def _install(self, model: nn.Module) -> None:
        inner = unwrap_model(model)
        layers = decoder_layers(model)
        for sae in self.saes.values():
            check_sae_fits(model, sae)
        state: dict[str, Any] = {"kwargs": None}

        def before(_module: nn.Module, args: tuple, kwargs: dict) -> None:
            counting = inner.training and torch.is_grad_enabled()
            state["kwargs"] = kwargs if counting else None
            state["counted"] = False

        def after(_module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
            state["kwargs"] = None

        def reader(layer: int):
            def read(_module: nn.Module, _inputs: Any, output: Any) -> None:
                kwargs = state["kwargs"]
                if kwargs is None:  # not a training forward (generation, eval, checkpoint recomputation)
                    return
                hidden = layer_hidden(output)
                tokens = self._record(layer, hidden, _token_mask(kwargs, hidden), self.counts, self.sums)
                if not state["counted"]:
                    self.tokens += tokens
                    state["counted"] = True

            return read

        self._handles = [inner.register_forward_pre_hook(before, with_kwargs=True),
                         inner.register_forward_hook(after, with_kwargs=True)]
        self._handles += [layers[layer].register_forward_hook(reader(layer)) for layer in self.saes]

    def close(self) -> None:
        """Remove the monitor's hooks from the model (idempotent)."""
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def __enter__(self) -> SAEFeatureMonitorCallback:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def attach(self, trainer: Any) -> Any:
        """Make this monitor the first callback of ``trainer`` and have ``trainer.train()`` remove its hooks when it
        returns or raises; returns ``trainer``."""
        callbacks = trainer.callback_handler.callbacks
        if self in callbacks:
            callbacks.remove(self)
        callbacks.insert(0, self)
        train = trainer.train

        @functools.wraps(train)
        def train_then_close(*args: Any, **kwargs: Any) -> Any:
            try:
                return train(*args, **kwargs)
            finally:
                self.close()

        trainer.train = train_then_close
        return trainer

    # -- TrainerCallback events ---------------------------------------------------------------------------------
    def on_train_begin(self, args: Any, state: Any, control: Any, model: nn.Module | None = None, **kwargs: Any):
        self.close()
        self._reset()
        self._install(model)

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any):
        self.close()

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any):
        if state.global_step % self.every == 0:
            control.should_log = True
        return control

    def on_log(self, args: Any, state: Any, control: Any, logs: dict | None = None, model: nn.Module | None = None,
               **kwargs: Any):
        if logs is None or state.global_step % self.every or "loss" not in logs:
            return
        metrics = self._metrics(self.prefix, self.counts, self.sums, self.tokens)
        if self.probe_texts:
            metrics.update(self._probe(model))
        self._reset()
        logs.update(metrics)
        if state.log_history and state.log_history[-1].get("step") == state.global_step:
            state.log_history[-1].update(metrics)

    def _metrics(self, prefix: str, counts: dict, sums: dict, tokens: float) -> dict[str, float]:
        totals = torch.tensor([tokens], dtype=torch.float64)
        stacked = {layer: torch.stack([counts[layer], sums[layer]]) for layer in counts}
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(totals)
            for value in stacked.values():
                dist.all_reduce(value)
        n = max(float(totals[0]), 1.0)
        metrics = {}
        for layer, (count, total) in stacked.items():
            for feature, c, s in zip(self.features[layer].tolist(), count.tolist(), total.tolist()):
                metrics[f"{prefix}/L{layer}/f{feature}/rate"] = c / n
                metrics[f"{prefix}/L{layer}/f{feature}/mean"] = s / n
        return metrics

    @torch.no_grad()
    def _probe(self, model: nn.Module) -> dict[str, float]:
        inner = unwrap_model(model)
        counts = {layer: torch.zeros(len(f), dtype=torch.float64) for layer, f in self.features.items()}
        sums = {layer: torch.zeros(len(f), dtype=torch.float64) for layer, f in self.features.items()}
        inputs = self.tokenizer(list(self.probe_texts), return_tensors="pt", padding=True)
        inputs = {k: v.to(next(inner.parameters()).device) for k, v in inputs.items()}
        was_training = inner.training
        inner.eval()
        try:
            captured = layer_outputs(inner, list(self.saes), **inputs)
        finally:
            inner.train(was_training)
        tokens = 0.0
        for layer in self.saes:
            tokens = self._record(layer, captured[layer], inputs["attention_mask"].bool(), counts, sums)
        return self._metrics(f"{self.prefix}_probe", counts, sums, tokens)
