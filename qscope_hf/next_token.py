"""Next-token cross-entropy of a causal LM without its full-vocabulary logits for every position at once.

``model(**inputs, labels=...)`` holds ``[B, T, V]`` logits, and the loss upcasts and log-softmaxes them again: with a
262k-token vocabulary, 8 texts of 256 tokens are 2 GB per copy, and evaluating SAEs (a clean, a spliced and a
zero-ablated pass per batch) holds several such copies. :func:`next_token_loss` runs the model's decoder once
and applies the output head to chunks of the scored positions only (at most :data:`CHUNK_ELEMENTS` logits at once).

The head is ``get_output_embeddings()`` followed by the final-logit soft-capping that some architectures configure
(``final_logit_softcapping``, Gemma 2/3). A model may transform its logits in other ways, so the first call on each
model checks the chunked head against the model's own logits at one position; where they differ, this model's
losses come from its own forward (full logits, as before; never different).
"""

from __future__ import annotations

import weakref

import torch
from torch import Tensor, nn

from .hooks import unwrap_model

#: At most this many logits (positions × vocabulary) are held at once: 256 MB in fp32.
CHUNK_ELEMENTS = 1 << 26

#: Per model: whether the chunked head reproduces its logits (checked on the first call).
_HEAD_MATCHES: weakref.WeakKeyDictionary[nn.Module, bool] = weakref.WeakKeyDictionary()


def _softcap(model: nn.Module, logits: Tensor) -> Tensor:
    cap = getattr(getattr(model, "config", None), "final_logit_softcapping", None)
    return logits if not cap else torch.tanh(logits / cap) * cap


def _head_logits(model: nn.Module, hidden: Tensor) -> Tensor:
    """``[n, V]`` logits (fp32) of final hidden states ``hidden [n, d]`` through the model's output head."""
    return _softcap(model, model.get_output_embeddings()(hidden)).float()


def _final_hidden(model: nn.Module, inputs: dict[str, Tensor]) -> Tensor:
    """``[B, T, d]``: the decoder's last hidden state (after its final norm), the output head's input."""
    return model.get_decoder()(**inputs).last_hidden_state


def _own_last_logits(model: nn.Module, inputs: dict[str, Tensor]) -> Tensor:
    """``[B, V]``: ``model``'s own logits at the last position (fp32)."""
    try:
        return model(**inputs, logits_to_keep=1).logits[:, -1].float()
    except TypeError:  # an architecture without logits_to_keep
        return model(**inputs).logits[:, -1].float()


def _chunked_head(model: nn.Module) -> bool:
    """Whether ``model`` has the decoder / output-head split that :func:`next_token_loss` chunks."""
    return callable(getattr(model, "get_decoder", None)) and callable(getattr(model, "get_output_embeddings", None)) \
        and getattr(model.get_output_embeddings(), "weight", None) is not None


@torch.no_grad()
def next_token_loss(model: nn.Module, inputs: dict[str, Tensor], scored: Tensor | None = None) -> tuple[float, int]:
    """``(sum of next-token cross-entropies in nats, number of predictions)`` of ``model`` on ``inputs``.

    ``inputs`` holds ``input_ids [B, T]`` and ``attention_mask [B, T]``; ``scored [B, T-1]`` (bool) marks the
    predictions that count, prediction ``t`` being token ``t + 1`` from the prefix up to ``t`` (default: both tokens
    real). Layer hooks active around the call apply as in ``model(**inputs)``.
    """
    ids, mask = inputs["input_ids"], inputs["attention_mask"].bool()
    if scored is None:
        scored = mask[:, 1:] & mask[:, :-1]
    targets = ids[:, 1:][scored]
    if not len(targets):
        return 0.0, 0
    base = unwrap_model(model)
    if _HEAD_MATCHES.get(base, True) and _chunked_head(base):
        try:
            hidden = _final_hidden(base, inputs)  # [B, T, d]
        except (AttributeError, TypeError):  # a decoder without last_hidden_state, or other inputs than ours
            _HEAD_MATCHES[base] = False
        else:
            if base not in _HEAD_MATCHES:
                theirs = _own_last_logits(base, inputs)
                ours = _head_logits(base, hidden[:, -1])
                scale = float(theirs.abs().max().clamp(min=1.0))
                _HEAD_MATCHES[base] = bool(torch.allclose(ours, theirs, rtol=1e-3, atol=1e-3 * scale))
            if _HEAD_MATCHES[base]:
                return _chunked_loss(base, hidden[:, :-1][scored], targets), len(targets)
    _HEAD_MATCHES[base] = False
    logits = base(**inputs).logits[:, :-1][scored].float()
    return float(nn.functional.cross_entropy(logits, targets, reduction="sum")), len(targets)


def _chunked_loss(model: nn.Module, hidden: Tensor, targets: Tensor) -> float:
    """Summed cross-entropy of ``targets [n]`` given final hidden states ``hidden [n, d]``, a chunk at a time."""
    step = max(1, CHUNK_ELEMENTS // model.get_output_embeddings().weight.shape[0])
    return sum(float(nn.functional.cross_entropy(_head_logits(model, hidden[i:i + step]), targets[i:i + step],
                                                 reduction="sum")) for i in range(0, len(hidden), step))
