"""``SAEFeatureMonitorCallback``: log how often chosen SAE features fire on completion tokens during training.

Add it to any ``SFTTrainer`` / ``GRPOTrainer`` (or ``Trainer``). It reads the chosen layers' outputs from hooks
during the trainer's own training forwards (no extra forward; recomputation under gradient checkpointing is not
counted twice) and, at the trainer's logging steps, logs per feature the firing rate (fraction of completion tokens
where ``ReLU(f_s(x)) > threshold``) and the mean activation, as ``sae/L{layer}/f{feature}/rate`` and ``.../mean``
in the trainer's normal logs, so they reach TensorBoard / W&B like any metric. An optional probe set is run (one
extra no-grad forward at each logging step) and logged under ``sae/probe/``. What it watches is saved next to each
checkpoint (``qscope_monitor.json``). Probe statistics leave out each text's first token, as SAE training does
(its residual norm is an outlier in many models).

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
import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn
from transformers import TrainerCallback
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from qscope_hf.corpus import without_first_token
from qscope_hf.errors import ConfigError, UnsupportedError
from qscope_hf.hooks import check_sae_fits, decoder_layers, layer_hidden, layer_outputs, unwrap_model
from qscope_hf.sae import SparseAutoencoder, saes_by_layer
from qscope_hf.validation import finite, positive_int, renamed

#: The file next to a trainer checkpoint that records what the monitor watched.
MONITOR_CONFIG = "qscope_monitor.json"


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


Features = Sequence[int] | Mapping[str, int]


class SAEFeatureMonitorCallback(TrainerCallback):
    """Firing rate and mean activation of ``features`` of ``saes`` on the completion tokens of training batches.

    ``features``: feature ids (one SAE), ``{label: id}`` (one SAE, logged under the label, e.g.
    ``{"french": 797}``), or a mapping layer -> either of those. Per feature and logging step, ``rate`` is the
    fraction of completion tokens where ``ReLU(f_s(x)) > threshold`` and ``mean`` the activation averaged over all
    completion tokens (zeros included), logged as ``sae/L{layer}/{label}/rate`` and ``.../mean`` (label ``f{id}``
    by default). ``log_every=None`` logs whenever the trainer logs (its ``logging_steps``); an integer adds
    logging every that many steps. ``probe_texts`` (with ``tokenizer``) adds the same statistics on a fixed probe
    set, under ``sae/probe/``.
    """

    def __init__(self, saes: SparseAutoencoder | Sequence[SparseAutoencoder],
                 features: Features | Mapping[int, Features], *, log_every: int | None = None,
                 threshold: float = 0.0, probe_texts: Sequence[str] | None = None, tokenizer: Any = None,
                 prefix: str = "sae", every: int | None = None) -> None:
        self.saes = saes_by_layer(saes, who="SAEFeatureMonitorCallback",
                                  hint="; to watch two SAEs of one layer, add one monitor per SAE with "
                                       "different prefix= values")
        if not self.saes:
            raise ConfigError("SAEFeatureMonitorCallback needs at least one SAE")
        if not (isinstance(features, Mapping) and features and all(isinstance(k, int) for k in features)):
            if len(self.saes) != 1:
                raise ConfigError("with several SAEs, pass features as a mapping layer -> feature ids")
            features = {next(iter(self.saes)): features}
        unknown = sorted(set(features) - set(self.saes))
        if unknown:
            raise ConfigError(f"features are given for layers {unknown} but the SAEs read layers {sorted(self.saes)}")
        self.labels: dict[int, list[str]] = {}
        ids: dict[int, list[int]] = {}
        for layer, chosen in features.items():
            named = dict(chosen) if isinstance(chosen, Mapping) else {None: chosen}
            index = self.saes[layer].feature_index(list(named.values()) if None not in named else chosen).tolist()
            self.labels[layer] = list(named) if None not in named else [f"f{f}" for f in index]
            ids[layer] = index
        self.readers = {layer: self.saes[layer].feature_reader(chosen) for layer, chosen in ids.items()}
        self.features = {layer: reader.features for layer, reader in self.readers.items()}
        empty = [layer for layer, index in self.features.items() if not index.numel()]
        if not self.features or empty:
            raise ConfigError(f"no features to monitor at layers {empty or sorted(self.saes)}")
        log_every = renamed("SAEFeatureMonitorCallback", "every", every, "log_every", log_every, None)
        self.log_every = None if log_every is None else positive_int("log_every", log_every)
        finite("threshold", threshold, non_negative=True)
        if probe_texts is not None and tokenizer is None:
            raise ConfigError("probe_texts need a tokenizer")
        self.threshold, self.prefix = threshold, prefix
        self.probe_texts, self.tokenizer = probe_texts, tokenizer
        self._handles: list = []
        self._reset()

    def config(self) -> dict[str, Any]:
        """What the monitor watches (saved next to the trainer's checkpoints as ``qscope_monitor.json``)."""
        return {"layers": {str(layer): dict(zip(self.labels[layer], self.features[layer].tolist()))
                           for layer in self.features}, "threshold": self.threshold, "log_every": self.log_every,
                "saes": {str(layer): sae.cfg.to_dict() for layer, sae in self.saes.items()}}

    def _reset(self) -> None:
        self.counts: dict[int, Tensor] = {}
        self.sums: dict[int, Tensor] = {}
        self.tokens: Tensor | float = 0.0

    def _record(self, layer: int, hidden: Tensor, mask: Tensor, counts: dict, sums: dict) -> Tensor:
        """Add one forward's statistics (kept on the hidden states' device: no host sync, no graph break under
        ``torch.compile``); returns the number of counted tokens as a tensor."""
        acts = self.readers[layer].acts(hidden.detach()).float()  # [B, T, S]
        weight = mask.unsqueeze(-1)  # [B, T, 1]: a mask multiply, not boolean indexing (no data-dependent shape)
        counts[layer] = counts.get(layer, 0) + ((acts > self.threshold) & weight).sum((0, 1)).double()
        sums[layer] = sums.get(layer, 0) + (acts * weight).sum((0, 1)).double()
        return mask.sum().double()

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
        if self._handles and isinstance(self.tokens, float):  # a step ran, and no training forward reached the hooks
            raise UnsupportedError(
                "SAEFeatureMonitorCallback saw no training forward in this step: its hooks did not run. This happens "
                "when the model was compiled and called before the monitor added its hooks (torch.compile does not "
                "see hooks added after its first call). Attach the monitor before the model's first compiled call "
                "(e.g. TrainingArguments(torch_compile=True) compiles at train()), or call torch._dynamo.reset()")
        if self.log_every is not None and state.global_step % self.log_every == 0:
            control.should_log = True
        return control

    def on_save(self, args: Any, state: Any, control: Any, **kwargs: Any):
        checkpoint = Path(args.output_dir) / f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}"
        if checkpoint.is_dir():
            (checkpoint / MONITOR_CONFIG).write_text(json.dumps(self.config(), indent=2))

    def on_log(self, args: Any, state: Any, control: Any, logs: dict | None = None, model: nn.Module | None = None,
               **kwargs: Any):
        if logs is None or "loss" not in logs or (self.log_every is not None and state.global_step % self.log_every):
            return
        metrics = self._metrics(self.prefix, self.counts, self.sums, self.tokens)
        if self.probe_texts:
            metrics.update(self._probe(model))
        self._reset()
        logs.update(metrics)
        if state.log_history and state.log_history[-1].get("step") == state.global_step:
            state.log_history[-1].update(metrics)

    def _metrics(self, prefix: str, counts: dict, sums: dict, tokens: Tensor | float) -> dict[str, float]:
        totals = torch.as_tensor(tokens, dtype=torch.float64).reshape(1).cpu()
        stacked = {layer: torch.stack([counts[layer], sums[layer]]).cpu() if layer in counts
                   else torch.zeros(2, len(self.features[layer]), dtype=torch.float64) for layer in self.features}
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(totals)
            for value in stacked.values():
                dist.all_reduce(value)
        n = max(float(totals[0]), 1.0)
        metrics = {}
        for layer, (count, total) in stacked.items():
            for label, c, s in zip(self.labels[layer], count.tolist(), total.tolist()):
                metrics[f"{prefix}/L{layer}/{label}/rate"] = c / n
                metrics[f"{prefix}/L{layer}/{label}/mean"] = s / n
        return metrics

    @torch.no_grad()
    def _probe(self, model: nn.Module) -> dict[str, float]:
        inner = unwrap_model(model)
        counts: dict[int, Tensor] = {}
        sums: dict[int, Tensor] = {}
        inputs = self.tokenizer(list(self.probe_texts), return_tensors="pt", padding=True)
        inputs = {k: v.to(next(inner.parameters()).device) for k, v in inputs.items()}
        was_training = inner.training
        inner.eval()
        try:
            captured = layer_outputs(inner, list(self.saes), **inputs)
        finally:
            inner.train(was_training)
        counted = without_first_token(inputs["attention_mask"].bool())
        tokens = 0.0
        for layer in self.saes:
            tokens = self._record(layer, captured[layer], counted, counts, sums)
        return self._metrics(f"{self.prefix}/probe", counts, sums, tokens)
