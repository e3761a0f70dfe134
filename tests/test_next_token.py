"""Next-token loss without full-vocabulary logits: equal to the cross-entropy of the model's own logits, by hand."""

import pytest
import torch
from transformers import Gemma3ForCausalLM, Gemma3TextConfig, GraniteConfig, GraniteForCausalLM

from qscope_hf import next_token
from qscope_hf.hooks import add_to_layers
from qscope_hf.next_token import next_token_loss
from qscope_hf.tiny import tiny_model, tiny_tokenizer

TEXTS = ["the cat sat on the mat and looked at the door", "a b", "one two three four five six seven eight nine"]


def small(config_class, model_class, **extra):
    config = config_class(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2, head_dim=16, pad_token_id=0, **extra)
    torch.manual_seed(0)
    model = model_class(config).eval()
    with torch.no_grad():
        model.get_output_embeddings().weight.mul_(50)  # logits of a few units, as in a trained model
    return model


def by_hand(model, inputs):
    """Mean CE over predictions whose input and target are real, from the model's own full logits."""
    with torch.no_grad():
        logits = model(**inputs).logits[:, :-1].float()
    real = inputs["attention_mask"].bool()
    scored = real[:, 1:] & real[:, :-1]
    return float(torch.nn.functional.cross_entropy(logits[scored], inputs["input_ids"][:, 1:][scored])), \
        int(scored.sum())


def head_outputs(model):
    """Record the size of every output the LM head produces."""
    sizes = []
    handle = model.get_output_embeddings().register_forward_hook(lambda m, a, out: sizes.append(out.numel()))
    return sizes, handle


@pytest.mark.parametrize("family", ["qwen3", "llama", "qwen3_5_vl"])
@pytest.mark.parametrize("padding", ["left", "right"])
def test_equals_cross_entropy_of_the_model_logits_in_chunks(family, padding, monkeypatch):
    model, tokenizer = tiny_model(family), tiny_tokenizer()
    tokenizer.padding_side = padding
    inputs = dict(tokenizer(TEXTS, return_tensors="pt", padding=True))
    expected, count = by_hand(model, inputs)
    vocab = model.get_output_embeddings().weight.shape[0]
    monkeypatch.setattr(next_token, "CHUNK_ELEMENTS", 5 * vocab)  # 5 positions of logits at a time
    sizes, handle = head_outputs(model)
    try:
        total, n = next_token_loss(model, inputs)
        sizes.clear()
        again, _ = next_token_loss(model, inputs)  # the head check ran on the first call only
    finally:
        handle.remove()
    assert n == count and total / n == pytest.approx(expected, rel=1e-5) and again == pytest.approx(total, rel=1e-6)
    assert sizes and max(sizes) <= 5 * vocab  # never the full [B, T, V] logits


def test_layer_hooks_apply_as_in_the_model_forward():
    model, tokenizer = tiny_model("qwen3"), tiny_tokenizer()
    inputs = dict(tokenizer(TEXTS, return_tensors="pt", padding=True))
    with add_to_layers(model, {1: torch.full((64,), 0.5)}):
        expected, _ = by_hand(model, inputs)
        total, n = next_token_loss(model, inputs)
    assert total / n == pytest.approx(expected, rel=1e-5)
    assert expected != pytest.approx(by_hand(model, inputs)[0], rel=1e-3)


def test_final_logit_softcapping_is_applied_in_the_chunks():
    model = small(Gemma3TextConfig, Gemma3ForCausalLM, final_logit_softcapping=2.0)
    inputs = {"input_ids": torch.randint(1, 512, (3, 12)), "attention_mask": torch.ones(3, 12, dtype=torch.long)}
    inputs["attention_mask"][1, :4] = 0
    expected, count = by_hand(model, inputs)
    sizes, handle = head_outputs(model)
    try:
        total, n = next_token_loss(model, inputs)
    finally:
        handle.remove()
    assert n == count and total / n == pytest.approx(expected, rel=1e-5)
    assert max(sizes) < 3 * 12 * 512  # the chunked path served it
    uncapped = by_hand(small(Gemma3TextConfig, Gemma3ForCausalLM), inputs)[0]
    assert uncapped != pytest.approx(expected, rel=1e-2)  # the cap matters on this model


def test_a_logit_transform_it_does_not_know_falls_back_to_the_model_forward():
    model = small(GraniteConfig, GraniteForCausalLM, logits_scaling=4.0)  # Granite divides its logits by 4
    inputs = {"input_ids": torch.randint(1, 512, (2, 10)), "attention_mask": torch.ones(2, 10, dtype=torch.long)}
    expected, count = by_hand(model, inputs)
    total, n = next_token_loss(model, inputs)
    assert n == count and total / n == pytest.approx(expected, rel=1e-5)
    assert next_token._HEAD_MATCHES[model] is False
