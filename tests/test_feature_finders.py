"""Language features, language baselines, repetition features and the repetition reward, each against the formula
computed by hand on a tiny model (dense codes from ``hidden_states``, written out in the test)."""

import datasets
import pytest
import torch

from qscope_hf.languages import estimate_language_baselines, language_features
from qscope_hf.repetition import repetition_features
from qscope_hf.tiny import tiny_model, tiny_sae, tiny_tokenizer
from qscope_trl.rewards import repetition_reward

LAYER = 1
TEXTS = {"xx": ["abc abc abd abe", "bad cab dab", "a b c d e a b"],
         "nn": ["123 456 789 012", "9 8 7 6 5 4", "31 41 59 26 53"]}


@pytest.fixture(scope="module")
def setup():
    model, tokenizer = tiny_model("qwen3"), tiny_tokenizer()
    sae = tiny_sae(layer=LAYER, k=16, seed=3)
    return model, tokenizer, sae


def hand_codes(model, tokenizer, sae, text):
    """``(ids [T], dense codes [T, d_sae], pre-activations [T, d_sae])`` of one text, by the SAE formula."""
    ids = tokenizer(text, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        x = model(input_ids=ids, output_hidden_states=True).hidden_states[LAYER + 1][0].double()
        pre = x @ sae.W_enc.double().T + sae.b_enc.double()
    values, indices = pre.relu().topk(sae.k, dim=-1)
    codes = torch.zeros_like(pre).scatter(-1, indices, values)
    return ids[0].tolist(), codes, pre


def test_language_features_rank_by_mean_activation_minus_the_other_languages(setup):
    model, tokenizer, sae = setup
    rows = [{"text": t, "language": lang} for lang, texts in TEXTS.items() for t in texts]
    found = language_features(model, tokenizer, sae, datasets.Dataset.from_list(rows), top=5)
    means = {}
    for lang, texts in TEXTS.items():
        codes = torch.cat([hand_codes(model, tokenizer, sae, t)[1][1:] for t in texts])  # first tokens left out
        means[lang] = codes.mean(0)
    for lang, other in (("xx", "nn"), ("nn", "xx")):
        score = means[lang] - means[other]
        expected = score.argsort(descending=True, stable=True)[:5].tolist()
        assert found[LAYER][lang] == expected
        assert score[expected[0]] > 0


def test_language_baselines_are_mean_pre_activations_on_each_language(setup):
    model, tokenizer, sae = setup
    rows = [{"text": t, "language": lang} for lang, texts in TEXTS.items() for t in texts]
    features = {LAYER: [7, 2, 30]}
    alpha = estimate_language_baselines(model, tokenizer, sae, features, datasets.Dataset.from_list(rows),
                                        progress=False)
    for lang, texts in TEXTS.items():
        pre = torch.cat([hand_codes(model, tokenizer, sae, t)[2][1:] for t in texts])
        for feature in features[LAYER]:
            assert alpha.alpha(LAYER, lang, feature) == pytest.approx(float(pre[:, feature].mean()), rel=1e-4,
                                                                      abs=1e-6)


def test_repetition_features_average_the_rise_from_first_to_last_occurrence(setup):
    model, tokenizer, sae = setup
    degenerate = ["the the the cat cat", "ab ab ab ab ab", "no repeat here"]
    found = repetition_features(model, tokenizer, sae, degenerate, top=4)
    total, pairs = torch.zeros(sae.d_sae, dtype=torch.float64), 0
    for text in degenerate:
        ids, codes, _ = hand_codes(model, tokenizer, sae, text)
        for token in set(ids):
            where = [i for i, t in enumerate(ids) if t == token]
            if len(where) > 1:
                total += codes[where[-1]] - codes[where[0]]
                pairs += 1
    rise = total / pairs
    expected = rise.argsort(descending=True, stable=True)[:4]
    assert [f.feature for f in found] == expected.tolist()
    for item in found:
        assert item.rise == pytest.approx(float(rise[item.feature]), rel=1e-4, abs=1e-6)
    feature, value = found[0]  # still unpacks as a (feature, rise) pair
    assert value == found[0].rise


def test_repetition_reward_is_minus_the_mean_activation_over_the_completion(setup):
    model, tokenizer, sae = setup
    features = [5, 11]
    reward = repetition_reward(model, tokenizer, sae, features)
    prompts, completions = ["say it:", "count:"], [" go go go go", " 1 2 3"]
    completion_ids = [tokenizer(c, add_special_tokens=False)["input_ids"] for c in completions]
    got = reward(prompts, completions, completion_ids)
    assert reward.__name__ == "sae_repetition"
    for prompt, ids, value in zip(prompts, completion_ids, got):
        prompt_ids = tokenizer(prompt)["input_ids"]
        with torch.no_grad():
            x = model(input_ids=torch.tensor([prompt_ids + ids]), output_hidden_states=True
                      ).hidden_states[LAYER + 1][0].double()
            pre = x[len(prompt_ids):] @ sae.W_enc.double()[features].T + sae.b_enc.double()[features]
        assert value == pytest.approx(-float(pre.relu().mean()), rel=1e-4, abs=1e-7)
    assert got[0] != got[1]
