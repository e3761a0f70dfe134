"""Feature statistics and contrast equal hand computations on the tiny model."""

from __future__ import annotations

import datasets
import pytest
import torch

from qscope_hf import decoder_layers
from qscope_hf.discovery import (
    CONTRAST_MULTIPLIERS,
    FeatureStats,
    activation_stats,
    common_tokens,
    contrast_features,
    format_contrast,
)
from qscope_hf.tiny import tiny_sae

TEXTS = ["The quick brown fox.", "12345 67890", "jumps over the lazy dog", "SAE features!", "a"]


@pytest.fixture(scope="module")
def saes():
    return [tiny_sae(64, 256, 8, layer=1, seed=1), tiny_sae(64, 256, 8, layer=2, seed=2)]


def hand_codes(model, tokenizer, sae, text):
    """Dense TopK(ReLU) codes [T, d_sae] of one text alone, from output_hidden_states and the §2 formula."""
    ids = tokenizer(text, return_tensors="pt")
    with torch.no_grad():
        hidden = model(**ids, output_hidden_states=True).hidden_states[sae.layer + 1][0].double()
        pre = hidden @ sae.W_enc.double().T + sae.b_enc.double()
        values, indices = pre.relu().topk(sae.k, dim=-1)
    return torch.zeros_like(pre).scatter(-1, indices, values), ids["input_ids"][0]


@pytest.mark.parametrize("batch_size", [1, 3])
def test_stats_equal_hand_counts(qwen3, tokenizer, saes, batch_size):
    stats = activation_stats(qwen3, tokenizer, saes, TEXTS, batch_size=batch_size, progress=False)
    for sae in saes:
        codes = [hand_codes(qwen3, tokenizer, sae, text)[0][1:] for text in TEXTS]  # skip each first token
        acts = torch.cat(codes)
        s = stats[sae.layer]
        assert s.tokens == acts.shape[0]
        assert torch.equal(s.fire_count, (acts > 0).sum(0))
        torch.testing.assert_close(s.act_sum, acts.sum(0), rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(s.act_max.double(), acts.max(0).values, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(s.rate, (acts > 0).double().mean(0))
        # top contexts: the n best (value, text, position) of each feature, best first
        feature = int(s.fire_count.argmax())
        entries = sorted(((float(c[p, feature]), d, p + 1) for d, c in enumerate(codes) for p in range(len(c))
                          if c[p, feature] > 0), reverse=True)[:5]
        got = [(c.value, c.doc, c.position) for c in s.top_contexts(feature)]
        assert [(d, p) for _, d, p in got] == [(d, p) for _, d, p in entries]
        torch.testing.assert_close(torch.tensor([v for v, _, _ in got]), torch.tensor([v for v, _, _ in entries]))
        context = s.top_contexts(feature)[0]
        ids = tokenizer(TEXTS[context.doc])["input_ids"]
        assert context.token == tokenizer.decode(ids[context.position:context.position + 1])


def test_one_forward_per_batch_for_all_layers(qwen3, tokenizer, saes):
    calls = []
    handle = decoder_layers(qwen3)[0].register_forward_hook(lambda *a: calls.append(1))
    try:
        activation_stats(qwen3, tokenizer, saes, TEXTS, batch_size=2, progress=False)
    finally:
        handle.remove()
    assert len(calls) == 3


def test_skip_first_and_excluded_tokens(qwen3, tokenizer, saes):
    sae = saes[0]
    space = tokenizer(" ")["input_ids"][0]
    stats = activation_stats(qwen3, tokenizer, sae, TEXTS, skip_first=False, exclude_tokens=[space],
                             progress=False)[1]
    kept = []
    for text in TEXTS:
        codes, ids = hand_codes(qwen3, tokenizer, sae, text)
        kept.append(codes[ids != space])
    acts = torch.cat(kept)
    assert stats.tokens == acts.shape[0]
    assert torch.equal(stats.fire_count, (acts > 0).sum(0))


def test_dataset_input_and_errors(qwen3, tokenizer, saes):
    data = datasets.Dataset.from_dict({"body": TEXTS, "label": list(range(5))})
    from_dataset = activation_stats(qwen3, tokenizer, saes[0], data, text_column="body", progress=False)[1]
    from_list = activation_stats(qwen3, tokenizer, saes[0], TEXTS, progress=False)[1]
    assert torch.equal(from_dataset.fire_count, from_list.fire_count)
    with pytest.raises(KeyError, match="text column 'text' not in the dataset"):
        activation_stats(qwen3, tokenizer, saes[0], data, progress=False)
    with pytest.raises(ValueError, match="no texts"):
        activation_stats(qwen3, tokenizer, saes[0], [], progress=False)
    with pytest.raises(ValueError, match="one SAE per layer"):
        activation_stats(qwen3, tokenizer, [saes[0], saes[0]], TEXTS, progress=False)


def fake_stats(sae, rates, means, tokens=100):
    fire = torch.zeros(sae.d_sae, dtype=torch.long)
    acts = torch.zeros(sae.d_sae, dtype=torch.float64)
    for feature, rate in rates.items():
        fire[feature] = round(rate * tokens)
    for feature, mean in means.items():
        acts[feature] = mean * tokens
    empty = torch.zeros(sae.d_sae, 1)
    return FeatureStats(sae, tokens, fire, acts, torch.zeros(sae.d_sae), empty, empty.long(), empty.long())


def test_contrast_ranks_by_rate_difference_and_gives_the_sign_towards_a(saes):
    sae = saes[0]
    a = fake_stats(sae, {3: 0.50, 7: 0.10, 9: 0.30}, {3: 1.0, 7: 0.2, 9: 2.0})
    b = fake_stats(sae, {3: 0.20, 7: 0.35, 9: 0.29}, {3: 0.9, 7: 0.1, 9: 0.1})
    rows = contrast_features(a, b, top=3)
    assert [(r.layer, r.feature) for r in rows] == [(1, 3), (1, 7), (1, 9)]
    assert [r.sign for r in rows] == [1.0, -1.0, 1.0]
    assert rows[1].rate_diff == pytest.approx(-0.25)
    with pytest.warns(FutureWarning, match="does not transfer between models"):  # the deprecated absolute numbers
        torch.testing.assert_close(torch.tensor(rows[0].strengths), torch.tensor(CONTRAST_MULTIPLIERS) * 30.0)
    by_mean = contrast_features(a, b, top=1, by="mean")
    assert by_mean[0].feature == 9 and by_mean[0].mean_diff == pytest.approx(1.9)
    table = format_contrast(rows)
    assert "| 1 | 3 | 0.500 | 0.200 | +0.300 |" in table and "| 1 | 7 |" in table and "| − |" in table
    assert "calibrate it on the model" in table
    with pytest.raises(ValueError, match="different layers"):
        contrast_features(a, fake_stats(saes[1], {}, {}))


def test_common_tokens(tokenizer):
    assert common_tokens(tokenizer, ["ab"], ["bc", "xa"]) == {ord("a"), ord("b")}
