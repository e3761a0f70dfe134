"""Train TopK SAEs on the residual stream of any HF causal LM (the Qwen-Scope recipe; docs/methods/training.md).

:class:`SAETrainer` streams texts through the model once, reading every chosen layer from the same forward (the
forward stops after the last of them), and trains one :class:`SparseAutoencoder` per layer, all through
:mod:`qscope_hf.ops`:

- **Data.** Real tokens only, minus each text's first token (``skip_first``), minus tokens whose activation norm
  exceeds ``norm_filter`` × the batch median at some layer (attention sinks). Activations go through a buffer of
  ``buffer_tokens`` that is shuffled (seeded) before half of it is drawn, so batches mix many documents.
- **Loss.** Fraction of variance unexplained, ``Σ‖x − x̂‖² / Σ‖x − mean(x)‖²``, plus the AuxK loss (weight
  ``aux_coef = 1/32``): the ``aux_k`` largest pre-activations among *dead* latents (no firing for
  ``dead_after_tokens`` tokens), without ReLU so that gradients reach latents whose pre-activations went
  negative, reconstruct the detached residual ``x − x̂``, normalised the same way.
- **Input normalisation.** Each layer's activations are centred on the first batch's mean and divided by its
  root-mean-square per dimension before they reach the SAE, and the affine map is folded back into the biases of
  the SAEs the trainer hands out (:attr:`SAETrainer.saes`). Residual streams often carry a huge, nearly constant
  dimension ("massive activations": one coordinate can hold most of a token's norm); uncentred, it dominates every
  pre-activation, a few random latents win every TopK and the rest die, and the optimiser's step sizes depend on
  the layer's scale. Centred and scaled, the same defaults train any layer of any model.
- **Parameters.** Decoder columns start as random unit vectors and the encoder as their transpose; ``b_dec`` starts
  at the first (normalised) batch's mean. Decoder columns are kept at unit norm: before each Adam step the gradient
  component along each column is removed, after it the columns are renormalised (so activations carry the scale).
- **Dead latents and guard rails.** A latent is dead when it has not fired for ``dead_after_tokens`` tokens
  (default: a tenth of the run, at most 1 M, so AuxK switches on in short runs too); the logged ``dead`` counts the
  latents that have not fired within that window or since the start, whichever is shorter (so latents that never
  fire count from the first step). A warning (and :attr:`SAETrainer.problems`) flags a run whose training FVU is
  still ≥ 1 after warm-up or where most latents never fire; :class:`SAEMetrics` flags the same on held-out text.
- **Batches of texts.** Texts are drawn ``text_batch_size × 8`` at a time, sorted by length and run through the
  model ``text_batch_size`` at a time, so short and long texts are not padded to each other.
- **State.** ``checkpoint_every`` steps the SAEs, optimizers, dead-latent counters, the activation buffer, the data
  cursor and the shuffling generator are saved; :meth:`SAETrainer.fit` with ``resume=True`` and the same
  configuration continues exactly where it stopped (same result as an uninterrupted run). The buffer's last fill
  stops at what ``total_tokens`` still needs, so a longer budget at resume continues, but not bit-identically.
- **Many processes** (``torchrun`` / ``accelerate launch``; :mod:`qscope_hf.distributed`). ``parallel="data"``:
  each process forwards its share of every pool of texts into its own buffer and trains on ``batch_tokens /
  world`` rows per step; the batch's mean and variance, the gradients, the firing counts and the logged metrics
  are summed over the processes, so a step equals one process's step on the union of the shares (every process
  holds the same SAEs). ``parallel="layers"``: every process reads all texts and trains its share of ``layers``
  (``layers[rank::world]``) from its own forward, on the tokens one process would keep, so each layer gets the
  SAE one process would give it. Rank 0 writes what the processes share; in ``"layers"`` mode each process writes
  its own layers' SAEs. Checkpoints hold one file per process (``trainer_state.pt``, ``trainer_state.rank1.pt``,
  ...): rank 0's holds the SAEs and optimizers in ``"data"`` mode, each process's its buffer and data position.

:func:`evaluate_saes` reports on held-out text: FVU, L0, dead fraction, and the next-token loss with each SAE's
reconstruction spliced in, against the clean model and a zero-ablated layer (and the loss recovered).
"""

from __future__ import annotations

import copy
import json
import math
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal, get_args

import datasets
import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from .corpus import without_first_token
from .distributed import Processes
from .errors import ConfigError, MissingFileError
from .hooks import capture_layers, check_layer, hidden_size, hook_layers, layer_outputs
from .next_token import next_token_loss
from .ops import Activation
from .sae import SparseAutoencoder
from .validation import finite, positive_int, renamed

CHECKPOINT = "trainer_state.pt"
#: Texts drawn at once are this many forwards' worth; they are sorted by length before batching.
TEXT_POOL = 8
#: Steps before the guard rails judge a run (the first steps of any run reconstruct badly).
WARM_UP_STEPS = 20
#: How several processes share the work: the data (each its share of the texts) or the layers (each its layers).
Parallel = Literal["data", "layers"]
PARALLEL: tuple[Parallel, ...] = get_args(Parallel)


@dataclass
class TrainConfig:
    """Hyper-parameters of :class:`SAETrainer` (``d_sae`` defaults to ``expansion × d_model``; ``lr`` to
    ``2e-4 / sqrt(d_sae / 16384)``; ``aux_k`` to ``d_model / 2``; ``parallel`` matters only under a launcher)."""

    layers: list[int]
    k: int = 32
    d_sae: int | None = None
    expansion: int = 8
    activation: Activation = "relu_topk"
    lr: float | None = None
    batch_tokens: int = 4096
    total_tokens: int = 1_000_000
    context_length: int = 256
    text_batch_size: int = 16
    buffer_tokens: int = 65536
    aux_k: int | None = None
    aux_coef: float = 1 / 32
    dead_after_tokens: int | None = None
    skip_first: bool = True
    norm_filter: float | None = 10.0
    dtype: str = "float32"
    seed: int = 0
    checkpoint_every: int | None = None
    log_every: int = 20
    parallel: Parallel = "data"

    def __post_init__(self) -> None:
        self.layers = list(self.layers)
        if not self.layers or not all(isinstance(layer, int) and layer >= 0 for layer in self.layers):
            raise ConfigError(f"layers must be a non-empty list of layer indices >= 0, got {self.layers!r}")
        for name in ("k", "expansion", "batch_tokens", "total_tokens", "context_length", "text_batch_size",
                     "buffer_tokens", "log_every"):
            positive_int(name, getattr(self, name))
        for name in ("d_sae", "aux_k", "checkpoint_every", "dead_after_tokens"):
            if getattr(self, name) is not None:
                positive_int(name, getattr(self, name))
        for name in ("lr", "norm_filter"):
            if getattr(self, name) is not None:
                finite(name, getattr(self, name), positive=True)
        finite("aux_coef", self.aux_coef, non_negative=True)
        if self.buffer_tokens < self.batch_tokens:
            raise ConfigError(f"buffer_tokens={self.buffer_tokens} must hold at least one batch of "
                              f"batch_tokens={self.batch_tokens}")
        if self.parallel not in PARALLEL:
            raise ConfigError(f"parallel must be one of {PARALLEL}, got {self.parallel!r}")
        if self.dtype not in ("float32", "bfloat16", "float16", "float64"):
            raise ConfigError(f"dtype must be one of float32, bfloat16, float16, float64; got {self.dtype!r}")
        if self.dead_after_tokens is not None and self.dead_after_tokens >= self.total_tokens:
            warnings.warn(f"dead_after_tokens={self.dead_after_tokens} >= total_tokens={self.total_tokens}: no latent "
                          "can count as dead, so AuxK never revives one in this run (leave dead_after_tokens=None "
                          "for a tenth of the run)", stacklevel=3)

    @property
    def dead_window(self) -> int:
        """Tokens without firing after which a latent is dead: ``dead_after_tokens``, or a tenth of the run (at
        least one batch, at most 1 M tokens)."""
        if self.dead_after_tokens is not None:
            return self.dead_after_tokens
        return min(1_000_000, max(self.batch_tokens, self.total_tokens // 10))


@dataclass(frozen=True)
class StepMetrics:
    """One SAE's training step: ``fvu`` and ``aux`` losses, mean ``l0`` of the batch, fraction of ``dead`` latents."""

    fvu: float
    aux: float
    l0: float
    dead: float


@dataclass
class _Buffer:
    """Shuffled activation buffer: ``store [capacity, layers, d]`` holds ``count`` rows; after each shuffle, rows
    ``[position, drawn)`` are still to be handed out; ``pending`` holds activations waiting for room."""

    store: Tensor
    count: int = 0
    position: int = 0
    drawn: int = 0
    pending: list[Tensor] = field(default_factory=list)

    def fill(self) -> None:
        while self.pending and self.count < len(self.store):
            chunk = self.pending.pop(0)
            room = len(self.store) - self.count
            self.store[self.count:self.count + min(room, len(chunk))] = chunk[:room]
            self.count += min(room, len(chunk))
            if len(chunk) > room:
                self.pending.insert(0, chunk[room:])

    def compact(self) -> None:
        """Drop the rows handed out; the rest moves to the front."""
        rest = self.store[self.drawn:self.count].clone()
        self.store[:len(rest)] = rest
        self.count, self.position, self.drawn = len(rest), 0, 0

    @property
    def full(self) -> bool:
        return self.count == len(self.store)


class SAETrainer:
    """Train one TopK SAE per layer of ``model`` on texts (see the module docstring)."""

    def __init__(self, model: nn.Module, tokenizer: Any, config: TrainConfig, *, text_column: str = "text") -> None:
        self.model, self.tokenizer, self.config, self.text_column = model, tokenizer, config, text_column
        for layer in config.layers:
            check_layer(model, layer)
        self.d_model = hidden_size(model)
        self.d_sae = config.d_sae or config.expansion * self.d_model
        self.device = next(model.parameters()).device
        self.dtype = getattr(torch, config.dtype)
        #: This process and the others it trains with (under a launcher).
        self.processes = Processes.current()
        world = self.processes.world
        if world > 1 and config.parallel == "layers" and len(config.layers) < world:
            raise ConfigError(f"parallel='layers' gives each of {world} processes its own layers, but there are "
                              f"only {len(config.layers)}: train more layers or use parallel='data'")
        if world > 1 and config.parallel == "data" and (config.batch_tokens % world or config.buffer_tokens % world):
            raise ConfigError(f"parallel='data' splits batch_tokens={config.batch_tokens} and buffer_tokens="
                              f"{config.buffer_tokens} over {world} processes: make both multiples of {world}")
        split = world > 1 and config.parallel == "data"
        #: The processes each batch is split over (this one alone unless ``parallel="data"``).
        self.data_processes = self.processes if split else Processes()
        #: The layers this process trains (``layers[rank::world]`` with ``parallel="layers"``, else all).
        self.layers = list(config.layers) if world == 1 or split else config.layers[self.processes.rank::world]
        self._columns = [config.layers.index(layer) for layer in self.layers]
        generator = torch.Generator().manual_seed(config.seed)
        #: The SAEs being trained, in normalised units (see :attr:`saes` for the SAEs in the model's units).
        self.working: dict[int, SparseAutoencoder] = {}
        for layer in config.layers:  # every layer's initial SAE draws from the generator, trained here or not
            sae = SparseAutoencoder(self.d_model, self.d_sae, config.k, config.activation, layer=layer,
                                    model_id=getattr(getattr(model, "config", None), "_name_or_path", None))
            sae.reset_parameters(generator)
            if layer in self.layers:
                self.working[layer] = sae.to(self.device, self.dtype)
        self.batch_rows = config.batch_tokens // self.data_processes.world  # this process's rows of a batch
        lr = config.lr or 2e-4 / math.sqrt(self.d_sae / 16384)
        self.optimizers = {layer: torch.optim.Adam(sae.parameters(), lr=lr) for layer, sae in self.working.items()}
        #: Per layer, the input normalisation ``(mean [d_model], scale)`` fitted on the first batch (fp64).
        self.normalisation: dict[int, tuple[Tensor, Tensor]] = {}
        self.since_fired = {layer: torch.zeros(self.d_sae, dtype=torch.long) for layer in self.layers}
        self.problems: list[str] = []
        self._folded: tuple[int, dict[int, SparseAutoencoder]] | None = None
        self._progress = True
        self.shuffle = torch.Generator().manual_seed(config.seed + 1)
        self.buffer = _Buffer(torch.zeros(config.buffer_tokens // self.data_processes.world, len(self.layers),
                                          self.d_model, dtype=self.dtype))
        self.step, self.tokens, self.texts_consumed = 0, 0, 0
        self.history: list[dict[str, float]] = []

    # -- data -------------------------------------------------------------------------------------------------
    def _activations(self, texts: list[str]) -> Tensor:
        """``[n, layers, d]`` activations of the kept tokens of ``texts``: sorted by length, ``text_batch_size``
        texts per forward (one forward for all layers), so that little of each batch is padding."""
        lengths = [len(ids) for ids in self.tokenizer(texts, truncation=True,
                                                      max_length=self.config.context_length)["input_ids"]]
        order = sorted(range(len(texts)), key=lengths.__getitem__)
        size = self.config.text_batch_size
        chunks = [self._forward_activations([texts[i] for i in order[start:start + size]])
                  for start in range(0, len(order), size)]
        return torch.cat(chunks) if chunks else torch.empty(0, len(self.layers), self.d_model, dtype=self.dtype)

    def _forward_activations(self, texts: list[str]) -> Tensor:
        """``[n, layers, d]`` activations of the kept tokens of ``texts`` (one padded forward)."""
        config = self.config
        inputs = self.tokenizer(texts, return_tensors="pt", padding=True, truncation=True,
                                max_length=config.context_length).to(self.device)
        if inputs["input_ids"].shape[1] == 0:
            return torch.empty(0, len(self.layers), self.d_model, dtype=self.dtype)
        with torch.no_grad():
            captured = layer_outputs(self.model, config.layers, **inputs)
        acts = torch.stack([captured[layer] for layer in config.layers], dim=2)  # [B, T, L, d]
        keep = inputs["attention_mask"].bool()
        if config.skip_first:
            keep = without_first_token(keep)
        acts = acts[keep]  # [n, L, d]
        if config.norm_filter is not None and len(acts):  # judged at every layer, trained here or not
            norms = acts.float().norm(dim=-1)  # [n, L]
            acts = acts[(norms <= config.norm_filter * norms.median(dim=0).values).all(dim=1)]
        if len(self._columns) < len(config.layers):
            acts = acts[:, self._columns]
        return acts.to("cpu", self.dtype)

    def _texts(self, data: datasets.Dataset) -> list[str]:
        """The next ``text_batch_size × TEXT_POOL`` texts (cycling through ``data``, one epoch after another). With
        ``parallel="data"`` the pool is ``world`` times larger, wraps around the end of ``data`` and each process
        takes every ``world``-th text: equal shares, so every process runs as many forwards (a sharded model
        needs that)."""
        start, size = self.texts_consumed % len(data), self.config.text_batch_size * TEXT_POOL
        split = self.data_processes
        if split.world == 1:
            texts = data[start:start + size][self.text_column]
            self.texts_consumed += len(texts)
            return texts
        pool = [(start + i) % len(data) for i in range(size * split.world)]
        self.texts_consumed += len(pool)
        return data[pool[split.rank::split.world]][self.text_column]

    def _batches(self, data: datasets.Dataset) -> Iterator[Tensor]:
        """Shuffled ``[batch_rows, layers, d]`` batches, endlessly (the caller stops at its token budget). Each
        round fills the buffer, shuffles it and hands out half of it; the last round fills only what the budget
        still needs and hands all of it out, so no forward is wasted on activations that are never trained on. The
        state lives in ``self.buffer``, so a checkpoint taken between two batches resumes mid-round."""
        buffer, rows = self.buffer, self.batch_rows
        while True:
            if buffer.position >= buffer.drawn:
                buffer.compact()
                needed = -(-max(self.config.total_tokens - self.tokens, 1) // (self.data_processes.world * rows)) * rows
                target = min(len(buffer.store), needed)  # rows this process still trains on, in whole batches
                texts_before = self.texts_consumed
                filling = tqdm(total=target, initial=min(buffer.count, target), unit="tok", desc="fill buffer",
                               leave=False, disable=not self._progress)
                while self._filling(target):
                    buffer.fill()
                    if buffer.count < target or self.data_processes.world > 1:  # in step with the others' forwards
                        buffer.pending.append(self._activations(self._texts(data)))
                        filling.update(min(target, buffer.count + len(buffer.pending[-1])) - filling.n)
                    if self.texts_consumed - texts_before > 2 * len(data) and buffer.count == 0:
                        raise ConfigError("the training texts yield no tokens (all empty, or filtered out)")
                filling.close()
                order = torch.randperm(buffer.count, generator=self.shuffle)
                buffer.store[:buffer.count] = buffer.store[order]
                last = needed <= buffer.count
                handed = needed if last else buffer.count // 2 // rows * rows
                buffer.drawn = max(rows, handed)
            start = buffer.position
            buffer.position += rows
            yield buffer.store[start:start + rows]

    def _filling(self, target: int) -> bool:
        """Whether some process's buffer holds fewer than ``target`` rows (they all forward until none does)."""
        short = torch.tensor([int(self.buffer.count < target)], device=self.device)
        return bool(self.data_processes.sum(short)[0])

    # -- one step ---------------------------------------------------------------------------------------------
    def _normalise(self, layer: int, x: Tensor) -> Tensor:
        """``(x − mean) / scale`` with the layer's normalisation, fitted on the first batch it sees."""
        if layer not in self.normalisation:
            wide = x.double()
            mean = self.data_processes.mean_rows(wide)
            spread = self.data_processes.sum(torch.stack([(wide - mean).pow(2).sum(), wide.new_tensor(len(x))]))
            scale = (spread[0] / spread[1] / x.shape[-1]).sqrt().clamp(min=1e-12)
            self.normalisation[layer] = (mean.cpu(), scale.cpu())
        mean, scale = self.normalisation[layer]
        return ((x.double() - mean.to(x.device)) / scale.to(x.device)).to(self.dtype)

    def _step(self, layer: int, x: Tensor) -> StepMetrics:
        config, sae, optimizer, split = self.config, self.working[layer], self.optimizers[layer], self.data_processes
        x = self._normalise(layer, x.to(self.device))
        variance = None  # one process: the loss computes it from x
        if self.step == 0 or split.world > 1:
            with torch.no_grad():
                mean = split.mean_rows(x)
                if self.step == 0:
                    sae.b_dec.copy_(mean.to(self.dtype))
                if split.world > 1:  # the whole batch's, so that the processes' losses add up to its FVU
                    variance = split.sum((x.double() - mean).pow(2).sum().reshape(1))[0].to(self.dtype)
        dead = self.since_fired[layer] > config.dead_window
        out = sae.training_loss(x, dead=dead if config.aux_coef > 0 else None, aux_k=config.aux_k,
                                variance=variance)
        optimizer.zero_grad(set_to_none=True)
        (out.fvu + config.aux_coef * out.aux).backward()
        split.sum_gradients(sae.parameters())
        sae.remove_gradient_parallel_to_decoder_directions()
        optimizer.step()
        sae.set_decoder_norm_to_unit_norm()
        rows = len(x) * split.world
        self._track_firing(layer, out.values, out.indices, rows)
        fvu, aux, firing = split.sum(torch.stack([out.fvu.detach(), out.aux.detach(),
                                                  (out.values > 0).sum().to(out.fvu.dtype)]).double()).tolist()
        window = min(config.dead_window, self.tokens + rows)  # never fired since the start counts as dead
        return StepMetrics(fvu, aux, firing / rows, float((self.since_fired[layer] >= window).float().mean()))

    @torch.no_grad()
    def _track_firing(self, layer: int, values: Tensor, indices: Tensor, tokens: int) -> None:
        """Dead-latent bookkeeping: tokens since each latent last fired (in any process's share of the batch)."""
        fired = torch.zeros(self.d_sae, dtype=torch.int32, device=indices.device)
        fired[indices[values > 0]] = 1
        fired = self.data_processes.sum(fired).cpu() > 0
        self.since_fired[layer] += tokens
        self.since_fired[layer][fired] = 0

    # -- the loop ---------------------------------------------------------------------------------------------
    def fit(self, data: datasets.Dataset | Sequence[str], out_dir: str | Path | None = None, *,
            resume: bool = False, progress: bool = True) -> dict[int, SparseAutoencoder]:
        """Train until ``total_tokens`` tokens per SAE (or the data runs out); returns the SAEs by layer.

        With ``out_dir``, the SAEs are written there in the Qwen-Scope layout (``layer{n}.sae.pt`` plus qscope's
        ``layer{n}.json``) and in SAELens' (``saelens/layer{n}/``), with checkpoints if ``checkpoint_every``.
        """
        dataset = data if isinstance(data, datasets.Dataset) else \
            datasets.Dataset.from_dict({self.text_column: list(data)})
        out = Path(out_dir) if out_dir is not None else None
        if resume:
            if out is None or not (out / CHECKPOINT).exists():
                raise MissingFileError(f"nothing to resume: no {CHECKPOINT} in {out}")
            self.load_checkpoint(out / CHECKPOINT)
        config = self.config
        self._progress = progress and self.processes.main
        bar = tqdm(total=config.total_tokens, initial=self.tokens, unit="tok", desc="train SAEs",
                   disable=not self._progress)
        batches = self._batches(dataset)
        while self.tokens < config.total_tokens:  # checked before drawing: no forward past the budget
            self._train_batch(next(batches), bar)
            if out is not None and config.checkpoint_every and self.step % config.checkpoint_every == 0:
                self.save_checkpoint(out / CHECKPOINT)
        bar.close()
        self._check_health()
        if out is not None:
            self.save(out)
        return self.saes

    def fit_activations(self, activations: Tensor, *, epochs: int = 1,
                        progress: bool = True) -> dict[int, SparseAutoencoder]:
        """Train on cached activations ``[N, len(layers), d_model]`` (reshuffled every epoch) instead of text.

        Under a launcher every process passes the same activations: with ``parallel="data"`` each trains on its
        share of every batch, with ``parallel="layers"`` on its layers' columns."""
        expected = (len(self.config.layers), self.d_model)
        if activations.dim() != 3 or tuple(activations.shape[1:]) != expected:
            raise ConfigError(f"activations must be [N, {expected[0]}, {expected[1]}], got {tuple(activations.shape)}")
        batch, share = self.config.batch_tokens, self.data_processes.rank * self.batch_rows
        bar = tqdm(total=epochs * (len(activations) // batch) * batch, unit="tok", desc="train SAEs",
                   disable=not (progress and self.processes.main))
        for _ in range(epochs):
            order = torch.randperm(len(activations), generator=self.shuffle)
            for start in range(0, len(activations) - batch + 1, batch):
                rows = order[start + share:start + share + self.batch_rows]
                self._train_batch(activations[rows[:, None], self._columns].to(self.dtype), bar)  # one gather
        bar.close()
        self._check_health()
        return self.saes

    def _check_health(self) -> None:
        """Warn (and list in :attr:`problems`) when a layer's training FVU is ≥ 1 after warm-up or when most of
        its latents never fired: the SAE is unusable, whatever the loss curve looked like."""
        last = self.history[-1] if self.history and self.step >= WARM_UP_STEPS else None
        self.problems = []
        for layer in self.layers:
            if last is not None and last[f"sae/L{layer}/fvu"] >= 1:
                self.problems.append(f"layer {layer}: training FVU {last[f'sae/L{layer}/fvu']:.3f} >= 1 after "
                                     f"{self.step} steps (worse than predicting the mean)")
            never = float((self.since_fired[layer] >= self.tokens).float().mean()) if self.tokens else 0.0
            if never > 0.5:
                self.problems.append(f"layer {layer}: {never:.0%} of the latents never fired in {self.tokens} tokens")
        for problem in self.problems:
            warnings.warn(f"SAE training: {problem}", stacklevel=3)

    @property
    def saes(self) -> dict[int, SparseAutoencoder]:
        """The trained SAEs in the model's units (the input normalisation folded into their biases), by layer: this
        process's layers (all of them unless ``parallel="layers"`` under a launcher)."""
        if self._folded is None or self._folded[0] != self.step:
            self._folded = (self.step, {layer: self._fold(layer) for layer in self.layers})
        return self._folded[1]

    @torch.no_grad()
    def _fold(self, layer: int) -> SparseAutoencoder:
        """The working SAE of ``layer`` for raw activations: ``b_enc ← s·b_enc − W_enc·μ``, ``b_dec ← s·b_dec + μ``
        (TopK and ReLU commute with the positive scale ``s``; the unit decoder columns stay as they are)."""
        sae = copy.deepcopy(self.working[layer])
        if layer in self.normalisation:
            mean, scale = (t.to(sae.device) for t in self.normalisation[layer])
            wide_enc = sae.W_enc.double()
            sae.b_enc.copy_(scale * sae.b_enc.double() - wide_enc @ mean)
            sae.b_dec.copy_(scale * sae.b_dec.double() + mean)
        return sae

    def _train_batch(self, batch: Tensor, bar: tqdm) -> None:
        """One step of every SAE on ``batch [batch_rows, layers, d]``; logs every ``log_every`` steps."""
        config = self.config
        metrics = {layer: self._step(layer, batch[:, i]) for i, layer in enumerate(self.layers)}
        rows = len(batch) * self.data_processes.world
        self.step += 1
        self.tokens += rows
        bar.update(rows)
        if self.step % config.log_every == 0 or self.tokens >= config.total_tokens:
            self.history.append({"step": self.step, "tokens": self.tokens,
                                 **{f"sae/L{layer}/{k}": v for layer, m in metrics.items()
                                    for k, v in asdict(m).items()}})
            bar.set_postfix({f"L{layer}": f"fvu {m.fvu:.3f} l0 {m.l0:.0f} dead {m.dead:.2f}"
                             for layer, m in metrics.items()})

    # -- persistence ------------------------------------------------------------------------------------------
    @property
    def writes_saes(self) -> bool:
        """Whether this process writes SAE files: rank 0, or every process for its own layers (``"layers"``)."""
        return self.processes.main or self.data_processes.world == 1

    def save(self, out_dir: str | Path) -> Path:
        """Write the SAEs (Qwen-Scope layout + SAELens directories) and the training history. Under a launcher
        every process calls it: rank 0 writes what they share, each process its own layers (``"layers"``)."""
        out = Path(out_dir)
        if self.writes_saes:
            for layer, sae in self.saes.items():
                sae.save_pretrained(out, format="qwen-scope")
                sae.save_pretrained(out / "saelens" / f"layer{layer}", format="saelens")
        histories = self.processes.gather(self.history) if self.data_processes.world == 1 else [self.history]
        if self.processes.main:  # each process logged its own layers at the same steps
            history = [{key: value for entry in entries for key, value in entry.items()} for entries in zip(*histories)]
            (out / "training.json").write_text(json.dumps({
                "config": asdict(self.config), "d_sae": self.d_sae, "steps": self.step, "tokens": self.tokens,
                "processes": self.processes.world, "history": history}, indent=2))
        return out

    def _state_path(self, path: Path) -> Path:
        """This process's checkpoint file: ``path`` for rank 0, ``<stem>.rank<r><suffix>`` for the others."""
        rank = self.processes.rank
        return path if rank == 0 else path.with_name(f"{path.stem}.rank{rank}{path.suffix}")

    def save_checkpoint(self, path: str | Path) -> None:
        """Write everything :meth:`fit` needs to resume exactly (SAEs, optimizers, counters, buffer, data
        cursor, generators) to ``path``; under a launcher each process writes its own file (see the module
        docstring), and with ``parallel="data"`` only rank 0 writes the SAEs and optimizers they all hold."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        state = {
            "processes": self.processes.world, "shuffle": self.shuffle.get_state(),
            "buffer": self.buffer.store[:self.buffer.count].clone(), "pending": self.buffer.pending,
            "position": self.buffer.position, "drawn": self.buffer.drawn,
            "step": self.step, "tokens": self.tokens, "texts_consumed": self.texts_consumed,
        }
        if self.writes_saes:
            state.update({
                "saes": {layer: sae.state_dict() for layer, sae in self.working.items()},
                "normalisation": self.normalisation,
                "optimizers": {layer: opt.state_dict() for layer, opt in self.optimizers.items()},
                "since_fired": self.since_fired, "history": self.history})
        torch.save(state, self._state_path(path))

    def load_checkpoint(self, path: str | Path) -> None:
        """Restore the state :meth:`save_checkpoint` wrote (each process its own file, with as many processes)."""
        path = Path(path)
        state = torch.load(self._state_path(path), weights_only=True)
        if state.get("processes", 1) != self.processes.world:
            raise ConfigError(f"{path} was written by {state.get('processes', 1)} processes; resume with as many "
                              f"(this run has {self.processes.world})")
        shared = state if "saes" in state else torch.load(path, weights_only=True)  # "data": rank 0's file
        for layer, sae in self.working.items():
            sae.load_state_dict(shared["saes"][layer])
            self.optimizers[layer].load_state_dict(shared["optimizers"][layer])
        self.normalisation = shared["normalisation"]
        self.since_fired = shared["since_fired"]
        self.history = shared["history"]
        self.shuffle.set_state(state["shuffle"])
        count = len(state["buffer"])
        self.buffer.store[:count] = state["buffer"]
        self.buffer.count, self.buffer.pending = count, list(state["pending"])
        self.buffer.position, self.buffer.drawn = state["position"], state["drawn"]
        self.step, self.tokens, self.texts_consumed = state["step"], state["tokens"], state["texts_consumed"]


def _replacement(sae: SparseAutoencoder, keep: Tensor, mode: str):
    """A layer edit that puts the SAE reconstruction (``"spliced"``) or zeros (``"zero"``) at the ``keep`` tokens."""

    def replace(hidden: Tensor) -> Tensor:
        out = hidden.clone()
        out[keep] = 0 if mode == "zero" else sae(hidden[keep].to(sae.device, sae.dtype)).to(hidden.dtype)
        return out

    return replace


@dataclass(frozen=True)
class SAEMetrics:
    """Held-out metrics of one SAE (:func:`evaluate_saes`).

    ``fvu``: fraction of variance unexplained over the counted tokens (``explained`` = 1 − FVU); ``l0``: mean number
    of firing latents per token; ``dead``: fraction of latents that never fire; next-token losses ``ce_clean``,
    ``ce_spliced`` (the SAE's reconstruction in place of the layer output on every token but each text's first),
    ``ce_zero`` (that output zeroed); ``loss_recovered`` = ``(ce_zero − ce_spliced) / (ce_zero − ce_clean)``;
    ``ce_increase`` = ``ce_spliced / ce_clean − 1``; ``tokens`` counted. ``problems`` names what makes the SAE
    unusable (FVU ≥ 1: worse than predicting the mean; most latents never firing); empty when it looks healthy.
    """

    fvu: float
    explained: float
    l0: float
    dead: float
    ce_clean: float
    ce_spliced: float
    ce_zero: float
    loss_recovered: float
    ce_increase: float
    tokens: int
    problems: tuple[str, ...] = ()

    @property
    def healthy(self) -> bool:
        """True when :attr:`problems` is empty."""
        return not self.problems

    def as_dict(self) -> dict[str, float]:
        """The numbers (``problems`` left out)."""
        return {key: value for key, value in asdict(self).items() if key != "problems"}

    def __getitem__(self, name: str) -> float:
        """``metrics["fvu"]``, the dict access of the previous release (deprecated: use ``metrics.fvu``)."""
        warnings.warn("SAEMetrics is a dataclass now: use metrics.name instead of metrics['name']", FutureWarning,
                      stacklevel=2)
        return getattr(self, name)


@torch.no_grad()
def evaluate_saes(model: nn.Module, tokenizer: Any, saes: Sequence[SparseAutoencoder], texts: Sequence[str], *,
                  max_length: int = 256, batch_size: int = 8,
                  context_length: int | None = None) -> dict[int, SAEMetrics]:
    """Held-out :class:`SAEMetrics` per SAE layer.

    Per batch: one forward gives the clean loss and reads every SAE's layer, two per SAE the spliced and zeroed
    losses. A prediction counts when both its input token and its target are real (not padding); the losses come
    from :func:`qscope_hf.next_token.next_token_loss`, which never holds the full-vocabulary logits of a batch."""
    max_length = renamed("evaluate_saes", "context_length", context_length, "max_length", max_length, 256,
                         stacklevel=4)  # under torch.no_grad()'s wrapper
    positive_int("max_length", max_length)
    positive_int("batch_size", batch_size)
    if not saes:
        raise ConfigError("no SAEs to evaluate")
    device = next(model.parameters()).device
    layers = [sae.layer for sae in saes]
    sums = {layer: {"err": 0.0, "sq": 0.0, "sum": 0.0, "n": 0, "l0": 0.0} for layer in layers}
    fired = {sae.layer: torch.zeros(sae.d_sae, dtype=torch.bool) for sae in saes}
    ce = {(layer, name): 0.0 for layer in layers for name in ("spliced", "zero")}
    clean, tokens = 0.0, 0
    for start in range(0, len(texts), batch_size):
        inputs = tokenizer(list(texts[start:start + batch_size]), return_tensors="pt", padding=True,
                           truncation=True, max_length=max_length).to(device)
        real = inputs["attention_mask"].bool()
        keep = without_first_token(real)
        with capture_layers(model, layers) as captured:  # the clean pass reads the SAEs' layers too
            loss, count = next_token_loss(model, inputs)
        clean, tokens = clean + loss, tokens + count
        for sae in saes:
            x = captured[sae.layer][keep].to(sae.device, sae.dtype)
            values, indices = sae.encode_topk(x)
            part = sums[sae.layer]
            part["err"] += float((sae.decode_topk(values, indices, check_indices=False) - x).double().pow(2).sum())
            part["sq"] += float(x.double().pow(2).sum())
            part["sum"] = part["sum"] + x.double().sum(0)
            part["n"] += len(x)
            part["l0"] += float((values > 0).sum())
            fired[sae.layer][indices[values > 0].cpu()] = True
            for name in ("spliced", "zero"):
                with hook_layers(model, {sae.layer: _replacement(sae, keep, name)}):
                    ce[(sae.layer, name)] += next_token_loss(model, inputs)[0]
    results = {}
    ce_clean = clean / tokens
    for layer in layers:
        part = sums[layer]
        n = part["n"]
        fvu = part["err"] / (part["sq"] - float((part["sum"] ** 2).sum()) / n)
        spliced, zero = ce[(layer, "spliced")] / tokens, ce[(layer, "zero")] / tokens
        dead = float((~fired[layer]).float().mean())
        problems = tuple(problem for problem, bad in (
            (f"held-out FVU {fvu:.3f} >= 1 (worse than predicting the mean)", fvu >= 1),
            (f"{dead:.0%} of the latents never fire on the held-out text", dead > 0.5)) if bad)
        for problem in problems:
            warnings.warn(f"SAE at layer {layer}: {problem}", stacklevel=2)
        results[layer] = SAEMetrics(fvu, 1 - fvu, part["l0"] / n, dead, ce_clean, spliced, zero,
                                    (zero - spliced) / (zero - ce_clean), spliced / ce_clean - 1, n, problems)
    return results
