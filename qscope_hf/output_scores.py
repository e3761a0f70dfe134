"""Rank SAE features by what they *do* to the model's output, not only by what they respond to.

Features chosen by what activates them (:func:`qscope_hf.discovery.contrast_features`, the "input" side) often make
a model repeat a token when steered. Arad, Mueller & Belinkov (2025, "SAEs Are Good for Steering – If You Select the
Right Features", arXiv 2505.20063) separate *input* features from *output* features and show that keeping features
with a high **output score** steers 2–3 × better. This module measures the output side:

- :func:`logit_lens`: a feature's top tokens by ``W_U · final_norm(W_dec[:, f])`` (the unembedding of its decoder
  direction, through the model's own final norm, found by a probe forward rather than by attribute names);
- :func:`output_scores`: amplify each feature at the last position of a few neutral prompts — its activation is
  raised by ``amplify · a_max`` (``a_max`` the largest SAE activation at that position; Arad et al. use 10), i.e.
  ``h + amplify · a_max · W_dec[:, f]`` — and read the next-token distribution ``p``. Without a target, the score
  is Arad et al.'s output score of the feature's own logit-lens tokens ``L_f``:
  ``(1 − rank(L_f) / V) · max_{t ∈ L_f} p(t)`` (``rank(L_f)`` the best rank any of them reaches, ``V`` the
  vocabulary size), steered minus unsteered. With a ``target`` (texts, e.g. French sentences, or token ids) it is
  the probability mass ``Σ_{t ∈ T} p(t)`` on the target vocabulary ``T``, steered minus unsteered (see
  :func:`target_vocabulary`). Scores are means over the prompts.
- :func:`rank_features`: the input ranking (contrast), the output ranking, or ``"both"``: contrast candidates
  towards corpus A that also have a positive output score, ordered by it (Arad et al.'s filter).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Literal, get_args

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from .corpus import pad_token_ids
from .discovery import ContrastRow
from .errors import ConfigError, UnsupportedError
from .hooks import check_sae_fits, decoder_layers, hook_layers, layer_hidden, unwrap_model
from .sae import Features, SparseAutoencoder
from .validation import finite, integer_ids, positive_int

#: Neutral prompts whose next token a steered feature should move (Arad et al. use "From my experience,").
NEUTRAL_PROMPTS = ("In my experience,", "From my experience,", "I think that", "Here is what happened:",
                   "The next part is")
Ranking = Literal["input", "output", "both"]
RANKINGS: tuple[Ranking, ...] = get_args(Ranking)


@dataclass(frozen=True)
class Unembedding:
    """The map from a residual-stream vector to logits: the model's final norm (None if it has none), then its
    output embedding (LM head). Callable on ``[..., d_model]``."""

    norm: nn.Module | None
    head: nn.Module

    def __call__(self, residual: Tensor) -> Tensor:
        return self.head(residual if self.norm is None else self.norm(residual))


@torch.no_grad()
def unembedding(model: nn.Module) -> Unembedding:
    """Find the final norm and the LM head of any HF causal LM (PEFT and other wrappers included).

    A probe forward on two tokens records the last decoder layer's output ``h`` and the LM head's input ``x``;
    the final norm is the decoder's direct submodule that outputs ``x``, checked by ``norm(h) == x`` (and none when
    ``x == h``). Raises ``TypeError`` when no such module explains ``x``.
    """
    inner = unwrap_model(model)
    head = inner.get_output_embeddings()
    if head is None:
        raise UnsupportedError(f"{type(inner).__name__} has no output embeddings (LM head)")
    layers = decoder_layers(model)
    decoder = inner.get_decoder()
    candidates = [m for m in decoder.children() if m is not layers and not isinstance(m, nn.Embedding)]
    seen: dict[str, Any] = {}
    outputs: dict[int, Any] = {}
    handles = [layers[-1].register_forward_hook(lambda m, i, out: seen.__setitem__("h", layer_hidden(out))),
               head.register_forward_pre_hook(lambda m, args: seen.__setitem__("x", args[0]))]
    handles += [m.register_forward_hook(lambda m, i, out, n=n: outputs.__setitem__(n, out))
                for n, m in enumerate(candidates)]
    try:
        device = next(inner.parameters()).device
        inner(input_ids=torch.zeros(1, 2, dtype=torch.long, device=device))
    finally:
        for handle in handles:
            handle.remove()
    h, x = seen["h"], seen["x"]
    for n, module in enumerate(candidates):
        out = outputs.get(n)
        if isinstance(out, Tensor) and out.shape == x.shape and torch.allclose(module(h), x):
            return Unembedding(module, head)
    if h.shape == x.shape and torch.allclose(h, x):
        return Unembedding(None, head)
    raise UnsupportedError(f"cannot find the final norm of {type(inner).__name__}: no direct submodule of its decoder "
                           "maps the last layer's output to the LM head's input")


@dataclass(frozen=True)
class LogitLens:
    """Each feature's ``top`` tokens by ``W_U · final_norm(W_dec[:, f])``: ``token_ids``/``scores`` ``[F, top]``."""

    features: list[int]
    token_ids: Tensor
    scores: Tensor

    def tokens(self, tokenizer: Any) -> list[list[str]]:
        """The token strings, one list per feature."""
        return [[tokenizer.decode([t]) for t in row] for row in self.token_ids.tolist()]


def _feature_index(sae: SparseAutoencoder, features: Features | None) -> Tensor:
    index = sae.feature_index(range(sae.d_sae) if features is None else features)
    if not index.numel():
        raise ConfigError("no features to score: pass at least one feature id (or None for all)")
    return index


@torch.no_grad()
def logit_lens(model: nn.Module, sae: SparseAutoencoder, features: Features | None = None, *, top: int = 20,
               batch_size: int = 512) -> LogitLens:
    """The ``top`` tokens each feature's decoder direction promotes through the final norm and the LM head
    (``features=None``: every feature). Works for any HF causal LM (see :func:`unembedding`)."""
    check_sae_fits(model, sae)
    positive_int("top", top)
    positive_int("batch_size", batch_size)
    index = _feature_index(sae, features)
    unembed = unembedding(model)
    weight = next(unembed.head.parameters())
    ids, scores = [], []
    for chunk in index.split(batch_size):
        logits = unembed(sae.feature_directions(chunk).to(weight.device, weight.dtype)).float()
        best = logits.topk(min(top, logits.shape[-1]), dim=-1)
        ids.append(best.indices.cpu())
        scores.append(best.values.cpu())
    return LogitLens(index.tolist(), torch.cat(ids), torch.cat(scores))


def target_vocabulary(tokenizer: Any, texts: Sequence[str], usual: Tensor, *, size: int = 100, ratio: float = 10.0,
                      min_count: int = 2) -> Tensor:
    """The target's vocabulary ``T``: token ids that are frequent in ``texts`` and rare in the model's usual output.

    A token enters when it occurs at least ``min_count`` times in ``texts`` and its share of the texts' tokens is
    at least ``ratio`` × its probability under ``usual [V]`` (the model's mean unsteered next-token distribution,
    see :func:`output_scores`); the ``size`` most frequent such tokens are kept. Special tokens never enter.
    """
    positive_int("size", size)
    texts = [texts] if isinstance(texts, str) else list(texts)
    if not texts or not any(t.strip() for t in texts):
        raise ConfigError("the target texts are empty")
    special = set(getattr(tokenizer, "all_special_ids", []))
    counts = Counter(t for ids in tokenizer(texts, add_special_tokens=False)["input_ids"] for t in ids
                     if t not in special)
    total = sum(counts.values())
    kept = [t for t, n in counts.most_common() if n >= min_count and t < len(usual) and n / total >= ratio * usual[t]]
    if not kept:
        raise ConfigError(f"no token of the target texts is {ratio} x more frequent there than in the model's usual "
                          f"output (with at least {min_count} occurrences): pass more or longer target texts")
    return torch.tensor(kept[:size], dtype=torch.long)


@dataclass(frozen=True)
class OutputScores:
    """Output scores of ``features`` of the SAE at ``layer`` (see the module docstring).

    ``scores [F]``: steered minus unsteered; ``steered [F]``: the steered value alone; ``vocabulary``: the target
    token ids, or None when each feature was scored on its own logit-lens tokens.
    """

    layer: int
    features: list[int]
    scores: Tensor
    steered: Tensor
    vocabulary: Tensor | None

    def top(self, n: int = 20) -> list[tuple[int, float]]:
        """The ``n`` best ``(feature, score)`` pairs."""
        order = self.scores.argsort(descending=True, stable=True)[:n]
        return [(self.features[i], float(self.scores[i])) for i in order.tolist()]

    def as_dict(self) -> dict[int, float]:
        """Feature id -> output score."""
        return dict(zip(self.features, self.scores.tolist()))


def _arad_score(probs: Tensor, tokens: Tensor) -> Tensor:
    """``(1 − rank / V) · max p(tokens)`` per row of ``probs [R, V]`` with ``tokens [R, L]``."""
    best = probs.gather(-1, tokens).max(-1).values  # [R]
    rank = (probs > best[:, None]).sum(-1)
    return (1 - rank / probs.shape[-1]) * best


@torch.no_grad()
def output_scores(model: nn.Module, tokenizer: Any, sae: SparseAutoencoder, features: Features | None = None, *,
                  prompts: Sequence[str] | None = None, target: Sequence[str] | Tensor | Sequence[int] | None = None,
                  amplify: float = 10.0, lens_tokens: int = 20, vocabulary_size: int = 100, batch_size: int = 64,
                  progress: bool = True) -> OutputScores:
    """Score ``features`` of ``sae`` (``None``: all) by how much amplifying each moves the next token (module
    docstring). ``target``: texts (its vocabulary is built by :func:`target_vocabulary`) or token ids; ``None``
    scores each feature on its own ``lens_tokens`` logit-lens tokens. ``batch_size`` rows (features × prompts) go
    through one forward.
    """
    layer = check_sae_fits(model, sae)
    index = _feature_index(sae, features)
    positive_int("batch_size", batch_size)
    positive_int("lens_tokens", lens_tokens)
    positive_int("vocabulary_size", vocabulary_size)
    finite("amplify", amplify, positive=True)
    prompts = list(NEUTRAL_PROMPTS if prompts is None else prompts)
    if not prompts or not all(isinstance(p, str) and p.strip() for p in prompts):
        raise ConfigError("prompts must be a non-empty list of non-empty strings")
    inner = unwrap_model(model)
    device = next(inner.parameters()).device
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    ids, mask = pad_token_ids(tokenizer(prompts)["input_ids"], pad)  # left padding: the last token is at T - 1
    ids, mask = ids.to(device), mask.to(device)

    captured: dict[int, Tensor] = {}
    with hook_layers(model, {layer: lambda hidden: captured.__setitem__(layer, hidden)}):
        logits = inner(input_ids=ids, attention_mask=mask).logits.float()
    probs = logits.softmax(-1)
    base = probs[:, -1]  # [P, V]
    last = captured[layer][:, -1]
    a_max = sae.encode_topk(last.to(sae.device, sae.dtype))[0].max(-1).values.float()  # [P]

    if target is None:
        vocabulary = None
        lens = logit_lens(model, sae, index, top=lens_tokens).token_ids.to(device)  # [F, L]
        base_scores = torch.stack([torch.cat([_arad_score(row.expand(len(chunk), -1), chunk) for chunk in
                                              lens.split(512)]) for row in base]).mean(0)  # [F]
    else:
        target = [target] if isinstance(target, str) else target
        if not all(isinstance(text, str) for text in target):  # token ids
            vocabulary = integer_ids("target token", target, base.shape[-1], error=ConfigError).unique()
            if not vocabulary.numel():
                raise ConfigError("target token ids are empty")
        else:
            vocabulary = target_vocabulary(tokenizer, target, probs[mask.bool()].mean(0).cpu(), size=vocabulary_size)
        vocabulary = vocabulary.to(device)
        base_scores = base[:, vocabulary].sum(-1).mean().expand(len(index))

    per_chunk = max(1, batch_size // len(prompts))
    steered = []
    delta: dict[str, Tensor] = {}

    def amplified(hidden: Tensor) -> Tensor:
        return torch.cat([hidden[:, :-1], hidden[:, -1:] + delta["vector"][:, None].to(hidden.dtype)], dim=1)

    bar = tqdm(total=len(index), desc="output scores", unit="feature", disable=not progress)
    with hook_layers(model, {layer: amplified}):
        for start in range(0, len(index), per_chunk):
            chunk = index[start:start + per_chunk]
            directions = sae.feature_directions(chunk).to(device, torch.float32)  # [c, d]
            delta["vector"] = (amplify * a_max.to(device)[None, :, None] * directions[:, None, :]).flatten(0, 1)
            out = inner(input_ids=ids.repeat(len(chunk), 1), attention_mask=mask.repeat(len(chunk), 1),
                        logits_to_keep=1).logits[:, -1].float().softmax(-1)  # [c·P, V], feature-major
            if vocabulary is None:
                tokens = lens[start:start + len(chunk)].repeat_interleave(len(prompts), 0)
                values = _arad_score(out, tokens)
            else:
                values = out[:, vocabulary].sum(-1)
            steered.append(values.view(len(chunk), len(prompts)).mean(1).cpu())
            bar.update(len(chunk))
    bar.close()
    steered_scores = torch.cat(steered)
    return OutputScores(layer, index.tolist(), steered_scores - base_scores.cpu(), steered_scores,
                        None if vocabulary is None else vocabulary.cpu())


@dataclass(frozen=True)
class RankedFeature:
    """A feature of the SAE at ``layer`` with its input score (firing-rate difference towards corpus A, None if it
    was not a contrast candidate) and output score (None if not scored)."""

    layer: int
    feature: int
    input_score: float | None
    output_score: float | None


def rank_features(contrast: Iterable[ContrastRow] | None = None, output: OutputScores | None = None, *,
                  by: Ranking = "both", top: int = 20) -> list[RankedFeature]:
    """The ``top`` features by ``"input"`` (the order of ``contrast``, from :func:`contrast_features`), by
    ``"output"`` (``output``'s scores, best first) or by ``"both"``: contrast candidates that fire more on corpus A
    (rate difference > 0) and have a positive output score, ordered by output score (Arad et al.'s recommendation:
    filter input-selected features by their output score)."""
    if by not in RANKINGS:
        raise ConfigError(f"by must be one of {RANKINGS}, got {by!r}")
    positive_int("top", top)
    rows = list(contrast or [])
    if by in ("input", "both") and not rows:
        raise ConfigError(f"by={by!r} needs contrast rows (from contrast_features)")
    if by in ("output", "both") and output is None:
        raise ConfigError(f"by={by!r} needs output scores (from output_scores)")
    out = output.as_dict() if output is not None else {}
    if output is not None:
        rows = [r for r in rows if r.layer == output.layer]
    rate = {r.feature: r.rate_diff for r in rows}
    if by == "input":
        return [RankedFeature(r.layer, r.feature, r.rate_diff, out.get(r.feature)) for r in rows[:top]]
    if by == "output":
        ordered = [f for f, _ in output.top(len(out))]
    else:
        ordered = [f for f, s in output.top(len(out)) if s > 0 and rate.get(f, 0.0) > 0]
    return [RankedFeature(output.layer, f, rate.get(f), out[f]) for f in ordered[:top]]


def format_ranking(ranked: Sequence[RankedFeature], lens_tokens: Sequence[Sequence[str]] = ()) -> str:
    """A markdown table of :func:`rank_features` rows, with each feature's logit-lens tokens when given."""
    lines = ["| layer | feature | input (rate A − B) | output score | logit lens |", "|---|---|---|---|---|"]
    for i, r in enumerate(ranked):
        tokens = " ".join(repr(t) for t in lens_tokens[i]) if i < len(lens_tokens) else ""
        value = "—" if r.input_score is None else f"{r.input_score:+.3f}"
        score = "—" if r.output_score is None else f"{r.output_score:+.4f}"
        lines.append(f"| {r.layer} | {r.feature} | {value} | {score} | {tokens} |")
    return "\n".join(lines)
