"""Feature selection by output effect, calibrated strengths, vector steering and SAE-TS: each checked against a hand
computation on the tiny models (attribute paths written out by hand, hooks written by hand)."""

from __future__ import annotations

import math

import pytest
import torch
from peft import LoraConfig, get_peft_model

from qscope_hf import (
    SAELogitsProcessor,
    Steering,
    calibrate_strength,
    decoder_layers,
    diff_means_vector,
    logit_lens,
    output_scores,
    rank_features,
    steered,
    steered_cross_entropy,
    targeted_vector,
    unembedding,
)
from qscope_hf.discovery import ContrastRow
from qscope_hf.errors import PositionError
from qscope_hf.hooks import add_to_layers
from qscope_hf.output_scores import OutputScores, target_vocabulary
from qscope_hf.tiny import FAMILIES, tiny_model, tiny_sae
from qscope_hf.vectors import EffectApproximator, fit_effect_approximator

LAYER = 1
PROMPTS = ["The cat sat", "Hi"]
TEXTS = ["The quick brown fox jumps over the lazy dog.", "Sparse autoencoders find features.", "12 34 56 78"]


@pytest.fixture(scope="module")
def sae():
    return tiny_sae(d_model=64, d_sae=256, k=8, layer=LAYER, seed=3)


def final_norm(model):
    """The final norm by its attribute path, written out per family (the code under test finds it by a probe)."""
    inner = getattr(model, "base_model", model)
    inner = getattr(inner, "model", inner)
    return inner.language_model.norm if hasattr(inner, "language_model") else inner.norm


@pytest.mark.parametrize("family", FAMILIES)
def test_unembedding_finds_the_final_norm(family, tokenizer):
    model = tiny_model(family)
    inputs = tokenizer(PROMPTS, return_tensors="pt", padding=True)
    captured = []
    handle = decoder_layers(model)[-1].register_forward_hook(lambda m, i, out: captured.append(out))
    try:
        with torch.no_grad():
            logits = model(**inputs).logits
    finally:
        handle.remove()
    unembed = unembedding(model)
    assert unembed.norm is final_norm(model)
    with torch.no_grad():
        torch.testing.assert_close(unembed(captured[0]), logits, rtol=1e-5, atol=1e-5)


def test_logit_lens_equals_hand_formula_also_under_peft(sae):
    model = tiny_model("qwen3")
    features = [3, 9, 200]
    with torch.no_grad():
        logits = model.lm_head(model.model.norm(sae.W_dec[:, features].T))
    expected = logits.topk(5, dim=-1)
    lens = logit_lens(model, sae, features, top=5)
    assert lens.features == features
    assert torch.equal(lens.token_ids, expected.indices)
    torch.testing.assert_close(lens.scores, expected.values)
    peft = get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    assert torch.equal(logit_lens(peft, sae, features, top=5).token_ids, expected.indices)
    assert logit_lens(model, sae, None, top=2).token_ids.shape == (sae.d_sae, 2)


def hand_next_token_probs(model, tokenizer, sae, prompt, feature, amplify):
    """Next-token probabilities after ``prompt`` unsteered and with ``amplify · a_max · W_dec[:, f]`` added to the
    last position of layer ``LAYER`` (a_max from the dense §2 formula)."""
    ids = tokenizer(prompt, return_tensors="pt")
    with torch.no_grad():
        out = model(**ids, output_hidden_states=True)
        last = out.hidden_states[LAYER + 1][0, -1]
        a_max = float((last @ sae.W_enc.T + sae.b_enc).relu().topk(sae.k).values.max())
        vector = amplify * a_max * sae.W_dec[:, feature]

        def hook(_module, _inputs, output):
            output = output.clone()
            output[:, -1] += vector
            return output

        handle = decoder_layers(model)[LAYER].register_forward_hook(hook)
        try:
            steered_logits = model(**ids).logits[0, -1]
        finally:
            handle.remove()
    return out.logits[0, -1].softmax(-1), steered_logits.softmax(-1)


def test_output_scores_on_target_tokens_equal_hand_mass(qwen3, tokenizer, sae):
    features, target = [3, 17, 40], [65, 66, 67, 97]
    scores = output_scores(qwen3, tokenizer, sae, features, prompts=PROMPTS, target=target, amplify=4.0,
                           batch_size=3, progress=False)
    for i, feature in enumerate(features):
        pairs = [hand_next_token_probs(qwen3, tokenizer, sae, p, feature, 4.0) for p in PROMPTS]
        steered_mass = sum(float(s[target].sum()) for _, s in pairs) / len(PROMPTS)
        base_mass = sum(float(b[target].sum()) for b, _ in pairs) / len(PROMPTS)
        assert scores.steered[i] == pytest.approx(steered_mass, rel=1e-4, abs=1e-6)
        assert scores.scores[i] == pytest.approx(steered_mass - base_mass, rel=1e-4, abs=1e-6)
    assert scores.features == features and scores.layer == LAYER
    assert scores.top(1)[0][0] == features[int(scores.scores.argmax())]


def test_output_scores_without_target_are_the_arad_score_of_the_logit_lens_tokens(qwen3, tokenizer, sae):
    feature = 9
    scores = output_scores(qwen3, tokenizer, sae, [feature], prompts=PROMPTS, lens_tokens=4, progress=False)
    with torch.no_grad():
        lens = qwen3.lm_head(qwen3.model.norm(sae.W_dec[:, feature])).topk(4).indices

    def arad(probs):  # (1 - best rank / V) * best probability among the lens tokens
        ranks = [int((probs > probs[t]).sum()) for t in lens]
        return (1 - min(ranks) / len(probs)) * float(probs[lens].max())

    pairs = [hand_next_token_probs(qwen3, tokenizer, sae, p, feature, 10.0) for p in PROMPTS]
    expected = sum(arad(s) - arad(b) for b, s in pairs) / len(PROMPTS)
    assert float(scores.scores[0]) == pytest.approx(expected, rel=1e-4, abs=1e-6)
    assert scores.vocabulary is None


def test_target_vocabulary_keeps_frequent_tokens_the_model_rarely_says(tokenizer):
    usual = torch.full((tokenizer.vocab_size + 3,), 1e-6)
    usual[ord("a")] = 0.5  # the model says "a" a lot: never a target token
    vocabulary = target_vocabulary(tokenizer, ["abba abba", "bbb z"], usual, size=2, ratio=10.0, min_count=2)
    # counts: b 7, a 4, ' ' 2, z 1 -> 'b' and ' ' pass (a is too usual, z too rare); ' ' after 'b' by frequency
    assert vocabulary.tolist() == [ord("b"), ord(" ")]
    with pytest.raises(ValueError, match="target texts are empty"):
        target_vocabulary(tokenizer, [], usual)


def row(layer, feature, diff):
    return ContrastRow(layer, feature, 0.5 + diff / 2, 0.5 - diff / 2, 0.0, 0.0)


def test_rank_features_by_input_output_and_both():
    contrast = [row(1, 7, 0.6), row(1, 3, -0.5), row(1, 5, 0.4), row(1, 9, 0.2)]
    output = OutputScores(1, [3, 5, 7, 9, 11], torch.tensor([0.9, 0.1, -0.2, 0.3, 0.8]),
                          torch.zeros(5), None)
    assert [r.feature for r in rank_features(contrast, by="input", top=3)] == [7, 3, 5]
    assert [r.feature for r in rank_features(output=output, by="output", top=3)] == [3, 11, 9]
    both = rank_features(contrast, output, by="both")
    assert [r.feature for r in both] == [9, 5]  # fire more on A and have a positive output score, by output score
    assert both[0].input_score == pytest.approx(0.2) and both[0].output_score == pytest.approx(0.3)
    with pytest.raises(ValueError, match="needs output scores"):
        rank_features(contrast, by="both")
    with pytest.raises(ValueError, match="by must be one of"):
        rank_features(contrast, output, by="middle")


class HandHook:
    def __init__(self, model, edit):
        self.model, self.edit, self.calls = model, edit, 0

    def __enter__(self):
        def hook(_module, _inputs, output):
            new = output + self.edit(output, self.calls)
            self.calls += 1
            return new

        self.handle = decoder_layers(self.model)[LAYER].register_forward_hook(hook)
        return self

    def __exit__(self, *exc):
        self.handle.remove()


def generate(model, tokenizer, prompts=PROMPTS, **kwargs):
    inputs = tokenizer(prompts, return_tensors="pt", padding=True)
    out = model.generate(**inputs, max_new_tokens=5, do_sample=False, output_logits=True,
                         return_dict_in_generate=True, **kwargs)
    return out.sequences, torch.stack(out.logits, 1)


def test_vector_steering_equals_a_hand_hook(tokenizer):
    model = tiny_model("qwen3")
    vector = torch.randn(64, generator=torch.Generator().manual_seed(0))
    real = tokenizer(PROMPTS, return_tensors="pt", padding=True).attention_mask.bool()
    spec = Steering.from_vector(vector, LAYER, 3.0)
    got = generate(model, tokenizer, logits_processor=[SAELogitsProcessor(model, spec)])
    unit = vector / vector.norm()
    with torch.no_grad(), HandHook(model, lambda h, call: (real[..., None] if call == 0 else 1) * 3.0 * unit):
        expected = generate(model, tokenizer)
    assert torch.equal(got[0], expected[0])
    torch.testing.assert_close(got[1], expected[1], rtol=1e-4, atol=1e-4)
    raw = Steering.from_vector(vector, LAYER, 2.0, normalize=False)
    torch.testing.assert_close(raw.tensors(torch.float32, torch.device("cpu"))["vector"], 2.0 * vector)


def test_relative_strength_is_in_units_of_each_rows_centred_prompt_spread(tokenizer, sae):
    model = tiny_model("qwen3")
    prompts = ["The cat sat on the mat", "Hi there, how are you"]
    inputs = tokenizer(prompts, return_tensors="pt", padding=True)
    real = inputs.attention_mask.bool()
    with torch.no_grad():
        hidden = model(**inputs, output_hidden_states=True).hidden_states[LAYER + 1]
    units = []
    for r in range(len(prompts)):
        tokens = hidden[r][real[r]][1:]  # the row's real tokens but the first
        n = len(tokens)
        spread = (tokens - tokens.mean(0)).norm(dim=-1).median()  # torch's median: the lower middle value
        units.append(float(spread) * (n / (n - 1)) ** 0.5)
    units = torch.tensor(units)[:, None, None]
    direction = sae.W_dec[:, 9].detach()
    spec = Steering(sae, 9, 0.3, relative=True)
    got = generate(model, tokenizer, prompts, logits_processor=[SAELogitsProcessor(model, spec)])
    with torch.no_grad(), HandHook(model, lambda h, call: (real[..., None] if call == 0 else 1) * 0.3 * units
                                   * direction):
        expected = generate(model, tokenizer, prompts)
    assert torch.equal(got[0], expected[0])
    torch.testing.assert_close(got[1], expected[1], rtol=1e-4, atol=1e-4)
    with pytest.raises(PositionError, match="at least 3 real tokens; row 1 has 2"):  # "Hi"
        generate(model, tokenizer, PROMPTS, logits_processor=[SAELogitsProcessor(model, spec)])


def test_the_relative_unit_ignores_a_massive_constant_dimension(tokenizer):
    """A planted dimension holding nearly all of each token's norm (as in Gemma 3) does not change the unit."""
    from qscope_hf.corpus import residual_spread
    from qscope_hf.discovery import residual_unit

    model = tiny_model("qwen3")
    texts = ["The cat sat on the mat", "Sparse autoencoders find features in text", "one two three four"]
    massive = torch.zeros(64)
    massive[7] = 5000.0
    inputs = tokenizer(texts, return_tensors="pt", padding=True)
    real = inputs.attention_mask.bool()
    with torch.no_grad():
        hidden = model(**inputs, output_hidden_states=True).hidden_states[LAYER + 1]
    # fp32 residuals near 5000 keep ~4 significant digits of the small coordinates
    torch.testing.assert_close(residual_spread(hidden + massive, real), residual_spread(hidden, real), rtol=1e-3,
                               atol=0)
    with add_to_layers(model, {LAYER: massive}):
        planted = residual_unit(model, tokenizer, LAYER, texts)
    assert planted == pytest.approx(residual_unit(model, tokenizer, LAYER, texts), rel=1e-3)
    assert planted < 50  # the plain norm would be 5000


def hand_cross_entropy(model, tokenizer, texts, vector=None):
    total, count = 0.0, 0
    for text in texts:
        ids = tokenizer(text, return_tensors="pt")["input_ids"]
        edit = (lambda h, call: vector) if vector is not None else (lambda h, call: 0)
        with torch.no_grad(), HandHook(model, edit):
            logits = model(input_ids=ids).logits[0, :-1]
        total += float(torch.nn.functional.cross_entropy(logits, ids[0, 1:], reduction="sum"))
        count += ids.shape[1] - 1
    return total / count


@pytest.fixture(scope="module")
def sharp():
    """A tiny Qwen3 whose LM head is scaled up, so that its next-token loss responds to steering (a random tiny
    model predicts nearly uniformly whatever is added to its residual stream)."""
    model = tiny_model("qwen3")
    with torch.no_grad():
        model.lm_head.weight.mul_(30)
    return model


def test_calibrated_strength_stays_within_the_loss_budget(sharp, tokenizer, sae):
    spec = Steering(sae, 3, 1.0, positions="generated")
    calibration = calibrate_strength(sharp, tokenizer, spec, TEXTS, max_ce_increase=0.5, steps=6)
    base = hand_cross_entropy(sharp, tokenizer, TEXTS)
    assert calibration.baseline_ce == pytest.approx(base, rel=1e-4)
    direction = sae.W_dec[:, 3].detach()
    at = hand_cross_entropy(sharp, tokenizer, TEXTS, calibration.strength * direction) - base
    assert at <= 0.5 + 1e-4 and at == pytest.approx(calibration.ce_increase, abs=1e-4)
    # the bisection's bracket: the next measured scale up is over budget and within 4^(1/2^steps) of the result
    above = min(scale for scale, _ in calibration.curve if scale > calibration.scale)
    assert above / calibration.scale <= 4 ** (1 / 2 ** 6) + 1e-9
    assert hand_cross_entropy(sharp, tokenizer, TEXTS, above * direction) - base > 0.5
    assert calibration.steering.positions == "generated"  # the returned spec keeps the user's positions
    assert steered_cross_entropy(sharp, tokenizer, TEXTS, calibration.steering) == pytest.approx(base + at, rel=1e-4)
    assert [s for s, _ in calibration.curve] == sorted(s for s, _ in calibration.curve)


def test_diff_means_vector_equals_hand_means(qwen3, tokenizer):
    a, b = TEXTS[:2], TEXTS[2:] + ["Another text here."]

    def mean(texts):
        rows = []
        for text in texts:
            ids = tokenizer(text, return_tensors="pt")
            with torch.no_grad():
                rows.append(qwen3(**ids, output_hidden_states=True).hidden_states[LAYER + 1][0, 1:])
        return torch.cat(rows).double().mean(0)

    expected = (mean(a) - mean(b)).float()
    torch.testing.assert_close(diff_means_vector(qwen3, tokenizer, a, b, LAYER, batch_size=2), expected,
                               rtol=1e-4, atol=1e-5)


def test_targeted_vector_is_the_sae_ts_formula():
    weight = torch.randn(8, 5, generator=torch.Generator().manual_seed(1))
    bias = torch.randn(5, generator=torch.Generator().manual_seed(2))
    approximator = EffectApproximator(1, weight, bias, 0.5, 10, 0.0)
    towards, generic = weight[:, 3], weight @ bias
    expected = towards / towards.norm() - generic / generic.norm()
    torch.testing.assert_close(targeted_vector(approximator, 3), expected / expected.norm())
    weighted = weight @ torch.tensor([0.0, 2.0, 0.0, 1.0, 0.0])
    expected = weighted / weighted.norm() - generic / generic.norm()
    torch.testing.assert_close(targeted_vector(approximator, [1, 3], [2.0, 1.0]), expected / expected.norm())
    torch.testing.assert_close(approximator.predict(torch.ones(8)), torch.ones(8) @ weight + bias)
    with pytest.raises(IndexError, match=r"target feature index 5 is out of range \[0, 5\)"):
        targeted_vector(approximator, 5)


@pytest.mark.slow
def test_fit_effect_approximator_runs_on_the_tiny_model(sharp, tokenizer, sae):
    approximator = fit_effect_approximator(sharp, tokenizer, sae, TEXTS, profile_texts=PROMPTS, n_vectors=24,
                                           ce_increase=0.2, batch_size=16, progress=False)
    assert approximator.weight.shape == (64, 256) and approximator.bias.shape == (256,)
    assert approximator.layer == LAYER and approximator.n_vectors == 24
    assert math.isfinite(approximator.r2) and approximator.seconds > 0
    moved = approximator.weight.norm(dim=0)
    vector = targeted_vector(approximator, int(moved.argmax()))
    assert vector.shape == (64,) and float(vector.norm()) == pytest.approx(1.0, rel=1e-5)
    with pytest.raises(ValueError, match="have no measured effect"):
        targeted_vector(approximator, int(moved.argmin()))  # a feature that never fires in the profile texts


def test_bad_input_fails_before_any_forward(qwen3, tokenizer, sae):
    with pytest.raises(IndexError, match="feature index 256 is out of range"):
        output_scores(qwen3, tokenizer, sae, [1, 256], progress=False)
    with pytest.raises(ValueError, match="target texts are empty"):
        output_scores(qwen3, tokenizer, sae, [1], target=[""], progress=False)
    with pytest.raises(ValueError, match="batch_size must be a positive integer"):
        output_scores(qwen3, tokenizer, sae, [1], batch_size=0, progress=False)
    with pytest.raises(ValueError, match="max_ce_increase must be a finite number > 0"):
        calibrate_strength(qwen3, tokenizer, Steering(sae, 1, 1.0), TEXTS, max_ce_increase=0.0)
    with pytest.raises(ValueError, match="steering vector has size 32 but the model's hidden size is 64"):
        SAELogitsProcessor(qwen3, Steering.from_vector(torch.ones(32), LAYER))
    for bad in (float("nan"), float("inf")):
        with pytest.raises(ValueError, match="strengths must be finite"):
            Steering(sae, 1, bad)
        with pytest.raises(ValueError, match="finite and not all zeros"):
            Steering.from_vector(torch.tensor([1.0, bad]), LAYER)
    with pytest.raises(ValueError, match="a vector Steering only adds"):
        Steering(None, None, 1.0, layer=1, vector=torch.ones(64), mode="clamp")
    with pytest.raises(ValueError, match=r"n_vectors=1 must be in \[16, d_sae=256\]: the held-out R² needs at least 8"):
        fit_effect_approximator(qwen3, tokenizer, sae, TEXTS, n_vectors=1)
    with steered(qwen3, None):  # nothing to steer is allowed and changes nothing
        pass
