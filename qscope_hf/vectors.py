"""Steering vectors besides single SAE features: difference of means, and SAE-TS targeted vectors.

- :func:`diff_means_vector`: mean residual on texts A minus mean on texts B at a layer — the supervised baseline
  that AxBench (Wu et al. 2025) finds stronger than SAE features for steering.
- SAE-TS (Chalnev, Siu & Conmy 2024, "Improving Steering Vectors by Targeting Sparse Autoencoder Features"): steering
  along a feature's decoder direction also moves many other features. SAE-TS learns a linear *effect approximator*
  ``effect(v) ≈ v · W + b`` — ``v [d_model]`` a steering vector at the SAE's layer, ``effect [d_sae]`` the mean
  change of the SAE's feature activations on the text the steered model *writes* — and takes
  ``s = W_j/‖W_j‖ − Wb/‖Wb‖`` (``W_j`` the column of feature ``j``; ``Wb`` the input direction of the generic effect
  every steering vector has) as a vector that moves feature ``j`` and little else.

  :func:`fit_effect_approximator` measures effects with plain forwards instead of SAE-TS's generations, so that
  a fit takes minutes on a CPU: each training vector (a sampled SAE decoder direction) is scaled to cost the same
  next-token loss on neutral text (SAE-TS scales each vector to a target loss; here from one probe per vector,
  assuming the loss grows with the square of the scale) and added at every position of those texts; its effect
  is the change of the *expected SAE code of the next token*, ``Σ_y p(y) · profile(y)`` averaged over positions,
  where ``profile(y)`` is the mean SAE code at positions holding token ``y`` in a reference corpus
  (:func:`token_profiles`). That is what the SAE would read after the steered model writes its next token, up to
  context; the approximation is that a token's code depends on the token more than on its context. A ridge
  regression (penalty chosen on held-out vectors) gives ``W, b`` and the held-out R².
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from .calibration import NEUTRAL_TEXTS, _token_batches, calibrate_strength
from .corpus import Corpus, as_dataset, layer_batches
from .errors import ConfigError
from .hooks import add_to_layers, check_layer, check_sae_fits, unwrap_model
from .sae import Features, SparseAutoencoder
from .steering import Steering
from .validation import finite, fraction, integer_ids, positive_int

#: Ridge penalties tried, in units of the mean eigenvalue of the training vectors' covariance.
RIDGE_PENALTIES = (1e-2, 1e-1, 1.0, 10.0, 100.0, 1000.0)
#: The fewest vectors the held-out R² is measured on, and the fewest the ridge penalty is picked from.
MIN_HELD_OUT = 8


@torch.no_grad()
def diff_means_vector(model: nn.Module, tokenizer: Any, texts_a: Corpus, texts_b: Corpus, layer: int, *,
                      batch_size: int = 8, max_length: int = 256) -> Tensor:
    """``mean(h | A) − mean(h | B)``: ``[d_model]`` (fp32, CPU), ``h`` the output of decoder layer ``layer`` over the
    real tokens of each text but its first (whose norm is outsized)."""
    check_layer(model, layer)

    def mean(texts: Corpus) -> Tensor:
        total, count = 0.0, 0
        for batch in layer_batches(model, tokenizer, [layer], texts, batch_size=batch_size, max_length=max_length,
                                   progress=False):
            counted = batch.counted(skip_first=True)
            total = total + batch.hidden[layer][counted].double().sum(0).cpu()
            count += int(counted.sum())
        if not count:
            raise ConfigError("the texts have no tokens after their first")
        return total / count

    return (mean(texts_a) - mean(texts_b)).float()


@dataclass(frozen=True)
class EffectApproximator:
    """``effect(v) ≈ v · weight + bias``: ``weight [d_model, d_sae]``, ``bias [d_sae]``, for steering vectors at
    ``layer``; ``r2`` is the fraction of the effects' variance explained on held-out vectors."""

    layer: int
    weight: Tensor
    bias: Tensor
    r2: float
    n_vectors: int
    seconds: float

    def predict(self, vectors: Tensor) -> Tensor:
        """Predicted effects ``[..., d_sae]`` of steering vectors ``[..., d_model]``."""
        return vectors.float() @ self.weight + self.bias


def targeted_vector(approximator: EffectApproximator, features: Features,
                    weights: Sequence[float] | None = None) -> Tensor:
    """SAE-TS: the unit vector ``s = M_t/‖M_t‖ − Wb/‖Wb‖`` (normalised), ``M_t = W · t`` for the target effect ``t``
    (one-hot on ``features``, or ``weights`` on them) and ``Wb`` the direction of the generic steering effect.
    ``[d_model]``; steer with ``Steering.from_vector(s, approximator.layer, strength)``."""
    d_sae = approximator.weight.shape[1]
    index = integer_ids("target feature", features, d_sae)
    if not index.numel():
        raise ConfigError("targeted_vector needs at least one target feature")
    target = torch.zeros(d_sae)
    values = torch.ones(len(index)) if weights is None else torch.as_tensor(weights, dtype=torch.float32)
    if values.shape != index.shape or not bool(values.isfinite().all()) or not bool(values.any()):
        raise ConfigError(f"need one finite weight per target feature, not all zero, got {weights!r}")
    target.index_add_(0, index, values)
    towards = approximator.weight @ target
    generic = approximator.weight @ approximator.bias
    if not bool(towards.any()) or not bool(generic.any()):
        raise ConfigError(f"features {index.tolist()} have no measured effect (they never fire in the texts the "
                          "approximator's token profiles came from): fit it with profile texts of that concept")
    vector = towards / towards.norm() - generic / generic.norm()
    norm = vector.norm()
    if not bool(norm.isfinite()) or float(norm) < 1e-6:
        raise ConfigError(f"the target effect of features {index.tolist()} (weights {weights!r}) points along the "
                          "generic steering effect, so the targeted vector is undefined: choose other features or "
                          "weights")
    return vector / norm


def _per_vector_logits(model: nn.Module, inputs: dict[str, Tensor], layer: int, vectors: Tensor,
                       batch_size: int) -> Iterator[Tensor]:
    """For chunks of ``vectors [n, d]``: the logits ``[c, B, T, V]`` of ``inputs [B, T]`` with each vector added to
    the output of ``layer`` at every position (one forward of ``c·B`` rows per chunk)."""
    inner = unwrap_model(model)
    device = next(inner.parameters()).device
    rows = len(inputs["input_ids"])
    for chunk in vectors.split(max(1, batch_size // rows)):
        added = chunk.to(device).repeat_interleave(rows, 0)[:, None, :]  # vector-major rows
        with add_to_layers(model, {layer: added}):
            logits = inner(**{key: value.repeat(len(chunk), 1) for key, value in inputs.items()}).logits
        yield logits.float().view(len(chunk), rows, *logits.shape[1:])


def _cross_entropy(logits: Tensor, inputs: dict[str, Tensor]) -> Tensor:
    """Mean next-token CE of ``logits [c, B, T, V]`` on ``inputs [B, T]``: ``[c]``."""
    mask = inputs["attention_mask"].bool()
    scored = (mask[:, 1:] & mask[:, :-1]).float()
    target = inputs["input_ids"][:, 1:].expand(len(logits), -1, -1)
    ce = torch.nn.functional.cross_entropy(logits[:, :, :-1].flatten(0, 1).transpose(1, 2), target.flatten(0, 1),
                                           reduction="none").view(len(logits), *scored.shape)
    return (ce * scored).sum((1, 2)) / scored.sum()


@torch.no_grad()
def token_profiles(model: nn.Module, tokenizer: Any, sae: SparseAutoencoder, texts: Corpus, *, batch_size: int = 8,
                   max_length: int = 256) -> tuple[Tensor, Tensor]:
    """``(token_ids [U], profiles [U, d_sae])``: the mean SAE code at the positions where each token id of ``texts``
    occurs — what the SAE reads, on average, when the model has just written that token."""
    layer = check_sae_fits(model, sae)
    sums: dict[int, Tensor] = {}
    counts: Counter[int] = Counter()
    for batch in layer_batches(model, tokenizer, [layer], texts, batch_size=batch_size, max_length=max_length,
                               progress=False):
        real = batch.real
        values, indices = sae.encode_topk(batch.hidden[layer][real].to(sae.device, sae.dtype))
        codes = torch.zeros(len(values), sae.d_sae, device=values.device).scatter_add_(1, indices, values.float())
        ids = batch.inputs["input_ids"][real].cpu()
        for token in ids.unique().tolist():
            where = (ids == token).to(codes.device)
            sums[token] = sums.get(token, 0) + codes[where].sum(0).cpu()
            counts[token] += int(where.sum())
    tokens = sorted(sums)
    return torch.tensor(tokens), torch.stack([sums[t] / counts[t] for t in tokens])


def _ridge(x: Tensor, y: Tensor, penalty: float) -> tuple[Tensor, Tensor]:
    """``W, b`` minimising ``‖x W + b − y‖² + penalty · ‖W‖²`` (x ``[n, d]``, y ``[n, m]``)."""
    x_mean, y_mean = x.mean(0), y.mean(0)
    xc, yc = (x - x_mean).double(), (y - y_mean).double()
    gram = xc.T @ xc + penalty * torch.eye(x.shape[1], dtype=torch.float64)
    weight = torch.linalg.solve(gram, xc.T @ yc).float()
    return weight, y_mean - x_mean @ weight


def _r2(x: Tensor, y: Tensor, weight: Tensor, bias: Tensor) -> float:
    residual = (y - (x @ weight + bias)).pow(2).sum()
    return float(1 - residual / (y - y.mean(0)).pow(2).sum().clamp(min=1e-12))


def _probe_strength(model: nn.Module, tokenizer: Any, directions: Tensor, layer: int, texts: Sequence[str],
                    ce_increase: float, max_length: int, tries: int = 8) -> float:
    """The calibrated strength of the first of ``directions`` (up to ``tries``) that can reach ``ce_increase``."""
    for direction in directions[:tries]:
        try:
            return calibrate_strength(model, tokenizer, Steering.from_vector(direction, layer), texts,
                                      max_ce_increase=ce_increase, steps=4, max_length=max_length).strength
        except ValueError:
            continue
    raise ConfigError(f"none of {tries} sampled directions raises the CE on the texts by {ce_increase} nats: "
                      "lower ce_increase")


def fit_effect_approximator(model: nn.Module, tokenizer: Any, sae: SparseAutoencoder,
                            texts: Sequence[str] = NEUTRAL_TEXTS, *, profile_texts: Corpus | None = None,
                            n_vectors: int = 512, include: Features | None = None, ce_increase: float = 0.5,
                            held_out: float = 0.1, batch_size: int = 64, max_length: int = 64, seed: int = 0,
                            progress: bool = True) -> EffectApproximator:
    """Fit SAE-TS's linear effect approximator for steering at the SAE's layer (module docstring).

    ``n_vectors`` decoder directions are sampled (``include``: features that must be among them, e.g. candidates
    for the concept to steer), each scaled to raise the CE on ``texts`` by about ``ce_increase`` nats. A vector's
    effect is the change of the expected SAE code of the next token over every position of ``texts``, the code of
    a token being its mean code in ``texts`` + ``profile_texts`` (pass text of the concepts you will target, so
    that their tokens have a profile; tokens without one count as no effect). ``batch_size`` rows (vectors ×
    texts) per forward. A fraction ``held_out`` of the vectors measures the R² of the ridge penalty picked on
    them; the final fit uses all vectors.
    """
    layer = check_sae_fits(model, sae)
    started = time.perf_counter()
    for name, value in (("n_vectors", n_vectors), ("batch_size", batch_size), ("max_length", max_length)):
        positive_int(name, value)
    fraction("held_out", held_out)
    n_test = max(MIN_HELD_OUT, round(held_out * n_vectors))
    if not n_test + MIN_HELD_OUT <= n_vectors <= sae.d_sae:
        raise ConfigError(f"n_vectors={n_vectors} must be in [{n_test + MIN_HELD_OUT}, d_sae={sae.d_sae}]: the "
                          f"held-out R² needs at least {MIN_HELD_OUT} held-out vectors ({n_test} with held_out="
                          f"{held_out}) and at least {MIN_HELD_OUT} to fit on")
    finite("ce_increase", ce_increase, positive=True)
    device = next(unwrap_model(model).parameters()).device
    inputs = _token_batches(tokenizer, texts, len(texts), max_length, device)[0]
    extra = [] if profile_texts is None else as_dataset(profile_texts, "text")["text"]
    tokens, profiles = token_profiles(model, tokenizer, sae, list(texts) + list(extra), max_length=max_length)

    generator = torch.Generator().manual_seed(seed)
    chosen = [] if include is None else sorted(set(sae.feature_index(include).cpu().tolist()))
    if len(chosen) > n_vectors:
        raise ConfigError(f"include lists {len(chosen)} features but only n_vectors={n_vectors} are sampled")
    rest = [f for f in torch.randperm(sae.d_sae, generator=generator).tolist() if f not in set(chosen)]
    features = (chosen + rest)[:n_vectors]
    directions = sae.feature_directions(features).detach().float().cpu()
    directions = directions / directions.norm(dim=-1, keepdim=True)

    probe = _probe_strength(model, tokenizer, directions, layer, texts, ce_increase, max_length)
    bar = tqdm(total=2 * n_vectors, desc="steering effects", unit="vector", disable=not progress)
    with torch.no_grad():
        base_logits = unwrap_model(model)(**inputs).logits.float()[None]
        base_ce = _cross_entropy(base_logits, inputs)
        costs = []
        for logits in _per_vector_logits(model, inputs, layer, probe * directions, batch_size):
            costs.append((_cross_entropy(logits, inputs) - base_ce).cpu())
            bar.update(len(logits))
        scales = (probe * (ce_increase / torch.cat(costs).clamp(min=1e-3)).sqrt()).clamp(probe / 4, probe * 4)
        vectors = directions * scales[:, None]

        real = inputs["attention_mask"].bool()
        profile_ids, profiles = tokens.to(device), profiles.to(device)

        def expected_code(logits: Tensor) -> Tensor:  # [c, B, T, V] -> [c, d_sae]
            probs = logits.softmax(-1)[:, real][..., profile_ids]  # [c, positions, U]
            return (probs.mean(1) @ profiles).cpu()

        baseline = expected_code(base_logits)[0]
        effects = []
        for logits in _per_vector_logits(model, inputs, layer, vectors, batch_size):
            effects.append(expected_code(logits) - baseline)
            bar.update(len(logits))
    bar.close()
    effects = torch.cat(effects)

    order = torch.randperm(n_vectors, generator=generator)
    test, train = order[:n_test], order[n_test:]
    scale = float((vectors[train] - vectors[train].mean(0)).pow(2).sum()) / vectors.shape[1]  # mean eigenvalue
    best = max((_r2(vectors[test], effects[test], *_ridge(vectors[train], effects[train], ridge * scale)), ridge)
               for ridge in RIDGE_PENALTIES)
    weight, bias = _ridge(vectors, effects, best[1] * scale)
    return EffectApproximator(layer, weight, bias, best[0], n_vectors, time.perf_counter() - started)
