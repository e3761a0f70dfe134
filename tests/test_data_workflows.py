"""Feature classifier, coverage-guided synthesis and benchmark footprints against hand computations."""

from __future__ import annotations

import json
from html.parser import HTMLParser

import datasets
import pytest
import torch

from qscope_hf.analysis import (
    coverage_curve,
    footprints,
    kendall_tau,
    overlap,
    overlap_matrix,
    ranking_redundancy,
    redundancy,
)
from qscope_hf.classify import (
    FeatureClassifier,
    TextFeatures,
    collect_text_features,
    data_efficiency_curve,
    f1_score,
    feature_deltas,
    fit_diff_means,
    fit_feature_classifier,
    fit_logistic_probe,
)
from qscope_hf.cli import main
from qscope_hf.synthesis import KeywordJudge, Target, feature_coverage, select_targets, synthesize
from qscope_hf.tiny import tiny_sae

POSITIVE = ["you are an idiot", "stupid idiot!", "what an idiot you are", "idiots everywhere", "so stupid"]
NEGATIVE = ["have a nice day", "thank you friend", "what a lovely view", "see you soon", "kind regards"]


@pytest.fixture(scope="module")
def saes():
    return [tiny_sae(64, 256, 8, layer=1, seed=11), tiny_sae(64, 256, 8, layer=2, seed=12)]


def hand_fired(model, tokenizer, sae, text, *, last=False):
    """{feature: max activation} over a text's tokens (its first token skipped), by the §2 formula."""
    ids = tokenizer(text, return_tensors="pt")
    with torch.no_grad():
        hidden = model(**ids, output_hidden_states=True).hidden_states[sae.layer + 1][0]
        values, indices = (hidden @ sae.W_enc.T + sae.b_enc).relu().topk(sae.k, dim=-1)
    rows = [len(hidden) - 1] if last else range(1, len(hidden))
    found = {}
    for row in rows:
        for value, feature in zip(values[row].tolist(), indices[row].tolist()):
            if value > 0:
                found[feature] = max(found.get(feature, 0.0), value)
    return found


# -- classifier -----------------------------------------------------------------------------------------------------
def test_deltas_and_or_rule_equal_hand_values(qwen3, tokenizer, saes):
    texts, labels = POSITIVE + NEGATIVE, [1] * 5 + [0] * 5
    features = collect_text_features(qwen3, tokenizer, saes, texts, batch_size=3, progress=False)
    deltas = feature_deltas(features, labels)
    for sae in saes:
        fired = [hand_fired(qwen3, tokenizer, sae, text) for text in texts]
        hand = torch.zeros(256)
        for found, label in zip(fired, labels):
            for feature in found:
                hand[feature] += (1 / 5) if label else -(1 / 5)
        torch.testing.assert_close(deltas[sae.layer], hand)
    best_layer = max((1, 2), key=lambda layer: float(deltas[layer].max()))
    classifier = fit_feature_classifier(features, labels, top=3, epsilon=0.05)
    assert list(classifier.features) == [best_layer]
    chosen = classifier.features[best_layer]
    assert chosen == deltas[best_layer].argsort(descending=True, stable=True)[:3].tolist()
    sae = saes[best_layer - 1]
    for text, score, predicted in zip(texts, classifier.scores(features), classifier.predict(features)):
        found = hand_fired(qwen3, tokenizer, sae, text)
        hand_score = max([found[f] for f in chosen if f in found], default=0.0)
        assert float(score) == pytest.approx(hand_score, rel=1e-4, abs=1e-6)
        assert bool(predicted) == (hand_score > 0.05)


def test_classifier_json_round_trip_and_explicit_layers(qwen3, tokenizer, saes, tmp_path):
    texts, labels = POSITIVE + NEGATIVE, [1] * 5 + [0] * 5
    features = collect_text_features(qwen3, tokenizer, saes, texts, progress=False)
    classifier = fit_feature_classifier(features, labels, top=4, layers=[1, 2], sae_sources={1: "tiny", 2: "tiny"})
    loaded = FeatureClassifier.load(classifier.save(tmp_path / "clf.json"))
    assert loaded == classifier and set(loaded.features) == {1, 2}
    assert torch.equal(loaded.predict(features), classifier.predict(features))
    assert json.loads((tmp_path / "clf.json").read_text())["type"] == "qscope.FeatureClassifier"


def separable(n=40, d=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    labels = [i % 2 for i in range(n)]
    pooled = torch.randn(n, d, generator=g) + 3.0 * torch.tensor(labels, dtype=torch.float32)[:, None] * torch.eye(d)[0]
    return TextFeatures({1: [torch.tensor([]).long()] * n}, {1: [torch.tensor([])] * n}, {1: pooled}, {1: 8}), labels


def test_baselines_on_pooled_residuals():
    features, labels = separable()
    y = torch.tensor(labels, dtype=torch.bool)
    pooled = features.pooled[1]
    means = fit_diff_means(features, labels, layer=1)
    torch.testing.assert_close(means.weight, pooled[y].mean(0) - pooled[~y].mean(0))
    projected = pooled @ means.weight
    assert means.bias == pytest.approx(-float(projected[y].median() + projected[~y].median()) / 2, rel=1e-5)
    far = pooled.clone()
    far[-1, 0] += 200.0  # one extreme positive (labels[-1] == 1) along the class direction
    shifted = fit_diff_means(TextFeatures(features.fired, features.peak, {1: far}, features.d_sae), labels, layer=1)
    assert f1_score(shifted.predict(features), labels) > 0.9
    probe = fit_logistic_probe(features, labels, layer=1)
    assert f1_score(probe.predict(features), labels) > 0.9
    assert f1_score(means.predict(features), labels) > 0.9


def test_data_efficiency_curve(qwen3, tokenizer, saes):
    texts, labels = (POSITIVE + NEGATIVE) * 2, ([1] * 5 + [0] * 5) * 2
    features = collect_text_features(qwen3, tokenizer, saes[0], texts, progress=False)
    curve = data_efficiency_curve(features, labels, features, labels, fractions=(0.2, 1.0), repeats=2, top=2)
    full = fit_feature_classifier(features, labels, top=2)
    assert [point["fraction"] for point in curve] == [0.2, 1.0]
    assert curve[-1]["f1"] == pytest.approx(f1_score(full.predict(features), labels))


def test_classifier_errors(qwen3, tokenizer, saes):
    features = collect_text_features(qwen3, tokenizer, saes[0], POSITIVE, progress=False)
    with pytest.raises(ValueError, match="single class"):
        feature_deltas(features, [1] * 5)
    with pytest.raises(ValueError, match="no texts"):
        collect_text_features(qwen3, tokenizer, saes[0], [], progress=False)
    with pytest.raises(KeyError, match="text column 'text' not in the dataset"):
        collect_text_features(qwen3, tokenizer, saes[0], datasets.Dataset.from_dict({"body": POSITIVE}),
                              progress=False)
    with pytest.raises(ValueError, match=r"layers \[3\] are not covered"):
        fit_feature_classifier(features.subset([0, 1]), [1, 0], layers=[3])
    with pytest.raises(ValueError, match="reads layer 2"):
        FeatureClassifier({2: [1]}).scores(features)


# -- synthesis ------------------------------------------------------------------------------------------------------
def test_synthesis_keeps_exactly_the_verified_samples(qwen3, tokenizer, saes, tmp_path):
    sae = saes[0]
    seed = ["hello there", "kind regards"]
    coverage = feature_coverage(qwen3, tokenizer, sae, seed)
    hand_covered = set().union(*(hand_fired(qwen3, tokenizer, sae, t) for t in seed))
    assert set(coverage[1].nonzero().flatten().tolist()) == hand_covered
    candidates = ["an idiot", "stupid!", "lovely view", "12345", "xyz xyz", "idiots are stupid"]
    fired = [hand_fired(qwen3, tokenizer, sae, text) for text in candidates]
    uncovered = sorted({f for found in fired for f in found} - hand_covered)
    assert uncovered, "the test needs candidate features the seed corpus does not cover"
    descriptions = {1: {f: ("about insults" if f in uncovered[:2] else "about weather") for f in range(256)}}
    targets = select_targets(coverage, descriptions, KeywordJudge(["insult"]))
    assert [(t.layer, t.feature) for t in targets] == [(1, f) for f in uncovered[:2]]
    kept, report = synthesize(qwen3, tokenizer, [sae], targets, lambda prompt: candidates, threshold=0.0,
                              out=tmp_path / "samples.jsonl", seed_coverage=coverage)
    expected = [(text, t.feature) for t in targets for text, found in zip(candidates, fired) if t.feature in found]
    assert [(s.text, s.feature) for s in kept] == expected
    for sample in kept:
        assert sample.activation == pytest.approx(hand_fired(qwen3, tokenizer, sae, sample.text)[sample.feature],
                                                  rel=1e-4)
    rows = [json.loads(line) for line in (tmp_path / "samples.jsonl").read_text().splitlines()]
    assert len(rows) == len(kept) and {"text", "layer", "feature", "activation", "generator", "prompt"} <= set(rows[0])
    assert report["kept"] == len(kept) and report["target_coverage_before"] == 0.0
    assert report["target_coverage_after"] == len({s.feature for s in kept}) / len(targets)


def test_select_targets_needs_coverage_of_the_layer():
    with pytest.raises(ValueError, match="no seed coverage for layer 2"):
        select_targets({1: torch.zeros(4, dtype=torch.bool)}, {2: {0: "x"}}, KeywordJudge(["x"]))
    assert KeywordJudge(["cat", "dog"])("A Cat sat") == 0.5
    assert Target(1, 2, 0.5, "d").feature == 2


# -- evaluation analysis --------------------------------------------------------------------------------------------
def test_overlap_and_coverage_on_hand_footprints():
    a = [frozenset({1, 2}), frozenset({2, 3})]
    b = a + [frozenset({4, 5, 6, 7, 8, 9})]
    assert overlap(a, a) == 1.0 and overlap(a, a, symmetric=True) == 1.0
    assert overlap(a, b) == 1.0 and overlap(b, a) == pytest.approx(3 / 9)
    assert overlap_matrix({"a": a, "b": b}) == [[1.0, 1.0], [pytest.approx(3 / 9), 1.0]]
    curve = coverage_curve([frozenset({1}), frozenset({2}), frozenset({1, 2})], points=3, draws=400, seed=1)
    assert curve.n == [1, 2, 3] and curve.mean[-1] == 1.0
    assert curve.mean[0] == pytest.approx((0.5 + 0.5 + 1.0) / 3, abs=0.05)
    assert kendall_tau([1, 2, 3], [1, 2, 3]) == 1.0 and kendall_tau([1, 2, 3], [3, 2, 1]) == -1.0
    assert ranking_redundancy({"m1": [1.0] * 20, "m2": [0.0] * 20}, draws=5) == 1.0


def test_real_footprints_nesting_and_redundancy(qwen3, tokenizer, saes):
    sae = saes[0]
    texts = POSITIVE + NEGATIVE
    prints = footprints(qwen3, tokenizer, sae, texts, batch_size=4)
    assert list(prints) == [frozenset(hand_fired(qwen3, tokenizer, sae, t)) for t in texts]
    last = footprints(qwen3, tokenizer, sae, texts, mode="last")
    assert list(last) == [frozenset(hand_fired(qwen3, tokenizer, sae, t, last=True)) for t in texts]
    small = prints[:4]
    assert overlap(small, prints) == 1.0 and overlap(prints, small) < 1.0
    padded = prints + footprints(qwen3, tokenizer, sae, [t + "." for t in texts] + [t + "!" for t in texts])
    assert redundancy(padded, seed=0) > redundancy(prints, seed=0)


def test_analyze_command_writes_report_with_plots(tmp_path):
    for name, texts in (("toxic", POSITIVE), ("polite", NEGATIVE)):
        (tmp_path / f"{name}.jsonl").write_text("\n".join(json.dumps({"prompt": t}) for t in texts))
    scores = {"toxic": {"m1": [1, 0, 1, 1, 0], "m2": [0, 0, 1, 0, 0]}}
    (tmp_path / "scores.json").write_text(json.dumps(scores))
    out = tmp_path / "analysis.html"
    main(["analyze", "--benchmarks", str(tmp_path / "toxic.jsonl"), str(tmp_path / "polite.jsonl"),
          "--text-column", "prompt", "--scores", str(tmp_path / "scores.json"), "--out", str(out)])
    images = []

    class Images(HTMLParser):
        def handle_starttag(self, tag, attrs):
            if tag == "img":
                images.append(dict(attrs)["src"])

    Images().feed(out.read_text())
    assert len(images) == 2 and all(src.startswith("data:image/png;base64,") for src in images)
    assert (tmp_path / "analysis.coverage.png").stat().st_size > 1000
    assert "Ranking-stability redundancy" in out.read_text()
