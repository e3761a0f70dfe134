"""Steering: every claim checked against an independent construction (a hand-written forward hook)."""

from __future__ import annotations

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import LogitsProcessor, LogitsProcessorList

from qscope_hf import (
    SAELogitsProcessor,
    Steering,
    SteeringGenerationMixin,
    decoder_layers,
    disable_steering,
    enable_steering,
    steered,
)
from qscope_hf.testing import leaked_hooks
from qscope_hf.tiny import tiny_model, tiny_sae

LAYER = 1
PROMPTS = ["The cat sat", "Hi"]


@pytest.fixture
def model():
    return tiny_model("qwen3")


@pytest.fixture(scope="module")
def sae():
    return tiny_sae(d_model=64, d_sae=256, k=8, layer=LAYER, seed=3)


def no_hooks(model) -> bool:
    return not leaked_hooks(model)


class HandHook:
    """Adds ``edit(hidden, call)`` to layer ``LAYER``'s output; ``call`` counts the forwards (0 = prefill)."""

    def __init__(self, model, edit, layer=LAYER):
        self.model, self.edit, self.layer, self.calls = model, edit, layer, 0

    def __enter__(self):
        def hook(_module, _inputs, output):
            new = output + self.edit(output, self.calls)
            self.calls += 1
            return new

        self.handle = decoder_layers(self.model)[self.layer].register_forward_hook(hook)
        return self

    def __exit__(self, *exc):
        self.handle.remove()


def generate(model, tokenizer, prompts=PROMPTS, **kwargs):
    inputs = tokenizer(prompts, return_tensors="pt", padding=True)
    kwargs.setdefault("max_new_tokens", 6)
    kwargs.setdefault("do_sample", False)
    out = model.generate(**inputs, output_logits=True, return_dict_in_generate=True, **kwargs)
    return out.sequences, torch.stack(out.logits, 1)


def assert_same(a, b):
    torch.testing.assert_close(a[1], b[1], rtol=1e-4, atol=1e-4)
    assert torch.equal(a[0], b[0])


def real_mask(tokenizer, prompts=PROMPTS):
    return tokenizer(prompts, return_tensors="pt", padding=True).attention_mask.bool()


@pytest.mark.parametrize("family", ["qwen3", "qwen3_moe", "qwen3_5", "qwen3_5_moe", "qwen3_5_vl", "llama"])
def test_processor_equals_hand_hook_on_every_family(family, tokenizer, sae):
    model = tiny_model(family)
    spec = Steering(sae, [5, 17], [4.0, -2.0])
    vector = 4.0 * sae.W_dec[:, 5] - 2.0 * sae.W_dec[:, 17]
    real = real_mask(tokenizer)
    proc = SAELogitsProcessor(model, spec)
    steered = generate(model, tokenizer, logits_processor=LogitsProcessorList([proc]))
    assert no_hooks(model)
    with torch.no_grad(), HandHook(model, lambda h, call: (real[..., None] if call == 0 else 1) * vector.detach()):
        expected = generate(model, tokenizer)
    assert_same(steered, expected)
    assert not torch.equal(steered[1], generate(model, tokenizer)[1])


def test_forwards_outside_generate_are_unaffected_and_processor_is_reusable(model, tokenizer, sae):
    inputs = tokenizer(PROMPTS, return_tensors="pt", padding=True)
    clean = model(**inputs).logits
    proc = SAELogitsProcessor(model, Steering(sae, 9, 8.0))
    torch.testing.assert_close(model(**inputs).logits, clean, rtol=0, atol=0)
    first = generate(model, tokenizer, logits_processor=[proc])
    torch.testing.assert_close(model(**inputs).logits, clean, rtol=0, atol=0)
    assert_same(first, generate(model, tokenizer, logits_processor=[proc]))
    assert no_hooks(model)
    assert type(model).__name__ == "Qwen3ForCausalLM" and isinstance(model, SteeringGenerationMixin)
    disable_steering(model)
    assert not isinstance(model, SteeringGenerationMixin)


@pytest.mark.parametrize("positions", ["prompt", "generated", [-1], [0, 3, 7]])
def test_positions(model, tokenizer, sae, positions):
    spec = Steering(sae, 9, 6.0, positions=positions)
    vector = 6.0 * sae.W_dec[:, 9].detach()
    real = real_mask(tokenizer)
    length, lengths, pad = real.shape[1], real.sum(1), (~real).sum(1)

    def edit(hidden, call):  # call 0 is the prefill; decode step c processes absolute position length + c - 1
        if positions == "prompt":
            return (real[..., None] if call == 0 else 0) * vector
        if positions == "generated":
            return (0 if call == 0 else 1) * vector
        mask = torch.zeros(hidden.shape[:2])
        for row in range(2):
            for index in positions:
                absolute = int(pad[row]) + (int(lengths[row]) + index if index < 0 else index)
                if call == 0 and absolute < length:
                    mask[row, absolute] = 1
                elif call > 0 and absolute == length + call - 1:
                    mask[row, 0] = 1
        return mask[..., None] * vector

    steered = generate(model, tokenizer, logits_processor=[SAELogitsProcessor(model, spec)])
    with torch.no_grad(), HandHook(model, edit):
        expected = generate(model, tokenizer)
    assert_same(steered, expected)


def test_prompt_positions_leave_generated_positions_unedited(model, tokenizer, sae):
    """The layer output after steering minus before: the vector on real prompt tokens, exactly 0 afterwards."""
    inputs = tokenizer(PROMPTS, return_tensors="pt", padding=True)
    proc = SAELogitsProcessor(model, Steering(sae, 9, 6.0, positions="prompt"))
    layer = decoder_layers(model)[LAYER]
    before, after = [], []
    first = layer.register_forward_hook(lambda m, i, out: before.append(out.detach()))
    try:
        with torch.no_grad(), proc.session(model, inputs.input_ids, inputs.attention_mask, max_new_tokens=5):
            second = layer.register_forward_hook(lambda m, i, out: after.append(out.detach()))
            try:
                model.generate(**inputs, max_new_tokens=5, do_sample=False)
            finally:
                second.remove()
    finally:
        first.remove()
    vector = 6.0 * sae.W_dec[:, 9].detach()
    torch.testing.assert_close(after[0] - before[0], inputs.attention_mask[..., None] * vector)
    assert len(after) == 5 and all(torch.equal(a, b) for a, b in zip(after[1:], before[1:]))


def test_processor_built_inside_the_generate_call_is_in_force(tokenizer, sae):
    """``model.generate(..., logits_processor=[SAELogitsProcessor(model, spec)])`` on a model never steered before:
    Python looks ``model.generate`` up before the processor is built, and steering must still cover the prefill."""
    fresh, reference = tiny_model("qwen3"), tiny_model("qwen3")
    inputs = tokenizer(PROMPTS, return_tensors="pt", padding=True)
    spec = Steering(sae, 9, 6.0)
    inline = fresh.generate(**inputs, max_new_tokens=6, do_sample=False, output_logits=True,
                            return_dict_in_generate=True, logits_processor=[SAELogitsProcessor(fresh, spec)])
    expected = generate(reference, tokenizer, logits_processor=[SAELogitsProcessor(reference, spec)])
    assert_same((inline.sequences, torch.stack(inline.logits, 1)), expected)


def test_left_padded_rows_equal_the_row_alone(model, tokenizer, sae):
    spec = Steering(sae, 9, 6.0, positions="prompt")
    proc = SAELogitsProcessor(model, spec)
    batch = generate(model, tokenizer, logits_processor=[proc])
    alone = generate(model, tokenizer, ["Hi"], logits_processor=[proc])
    new_tokens = batch[0][1, -6:]
    assert torch.equal(new_tokens, alone[0][0, -6:])
    torch.testing.assert_close(batch[1][1], alone[1][0], rtol=1e-4, atol=1e-4)


def test_sampling_beams_and_return_sequences(model, tokenizer, sae):
    spec = Steering(sae, 9, 6.0)
    vector = 6.0 * sae.W_dec[:, 9].detach()
    real = real_mask(tokenizer)
    for options, expand in [(dict(do_sample=True, num_return_sequences=3), 3), (dict(num_beams=3), 3),
                            (dict(num_beams=2, num_return_sequences=2), 2)]:
        torch.manual_seed(0)
        steered = generate(model, tokenizer, logits_processor=[SAELogitsProcessor(model, spec)], **options)
        rows = real.repeat_interleave(expand, 0)[..., None]
        torch.manual_seed(0)
        with torch.no_grad(), HandHook(model, lambda h, call, rows=rows: (rows if call == 0 else 1) * vector):
            expected = generate(model, tokenizer, **options)
        assert_same(steered, expected)


def test_per_row_specs_follow_row_expansion_and_leave_other_rows_alone(model, tokenizer, sae):
    spec = Steering(sae, 9, 8.0)
    proc = SAELogitsProcessor(model, rows=[None, spec])
    steered = generate(model, tokenizer, logits_processor=[proc], num_beams=2)
    plain = generate(model, tokenizer, num_beams=2)
    assert torch.equal(steered[0][0], plain[0][0])
    torch.testing.assert_close(steered[1][0], plain[1][0], rtol=1e-4, atol=1e-4)
    vector = 8.0 * sae.W_dec[:, 9].detach()
    real = real_mask(tokenizer)
    rows = torch.tensor([0.0, 0.0, 1.0, 1.0])[:, None, None]  # beams of prompt 1 only
    with torch.no_grad(), HandHook(model, lambda h, call: rows * (real.repeat_interleave(2, 0)[..., None]
                                                                  if call == 0 else 1) * vector):
        expected = generate(model, tokenizer, num_beams=2)
    assert_same(steered, expected)


def test_clamp_and_gated_modes_equal_hand_formulas(model, tokenizer, sae):
    direction, row, bias = (t.detach() for t in (sae.W_dec[:, 9], sae.W_enc[9], sae.b_enc[9]))
    real = real_mask(tokenizer)

    def mask(call):
        return real[..., None] if call == 0 else 1

    clamp_spec = Steering(sae, 9, 3.0, mode="clamp")
    clamp = generate(model, tokenizer, logits_processor=[SAELogitsProcessor(model, clamp_spec)])
    with torch.no_grad(), HandHook(model, lambda h, c: mask(c) * (3.0 - (h @ row + bias).relu())[..., None]
                                   * direction):
        assert_same(clamp, generate(model, tokenizer))
    gate_row, gate_bias = sae.W_enc[20].detach(), sae.b_enc[20].detach()
    spec = Steering(sae, 9, 5.0, mode="gated", gate_feature=20, threshold=0.05)
    gated = generate(model, tokenizer, logits_processor=[SAELogitsProcessor(model, spec)])
    with torch.no_grad(), HandHook(model, lambda h, c: mask(c) * ((h @ gate_row + gate_bias).relu() > 0.05)[..., None]
                                   * 5.0 * direction):
        assert_same(gated, generate(model, tokenizer))


def test_mixin_and_enable_steering(tokenizer, sae):
    model = enable_steering(tiny_model("qwen3"))
    spec = Steering(sae, 9, 6.0)
    via_kwarg = generate(model, tokenizer, steering=spec)
    via_processor = generate(model, tokenizer, logits_processor=[SAELogitsProcessor(model, spec)])
    assert_same(via_kwarg, via_processor)
    assert no_hooks(model)

    class SteerableQwen3(SteeringGenerationMixin, type(tiny_model("qwen3"))):
        pass

    subclass = tiny_model("qwen3")
    subclass.__class__ = SteerableQwen3
    assert_same(generate(subclass, tokenizer, steering=spec), via_kwarg)


def test_under_a_peft_wrapper(tokenizer, sae):
    base = tiny_model("qwen3")
    peft = get_peft_model(base, LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    spec = Steering(sae, 9, 6.0)
    vector = 6.0 * sae.W_dec[:, 9].detach()
    real = real_mask(tokenizer)
    steered = generate(peft, tokenizer, logits_processor=[SAELogitsProcessor(peft, spec)])
    with torch.no_grad(), HandHook(peft, lambda h, call: (real[..., None] if call == 0 else 1) * vector):
        expected = generate(peft, tokenizer)
    assert_same(steered, expected)
    assert no_hooks(peft)


def test_trace_records_feature_activations(model, tokenizer, sae):
    proc = SAELogitsProcessor(model, trace=[(sae, [3, 9])])
    captured = []
    handle = decoder_layers(model)[LAYER].register_forward_hook(lambda m, i, out: captured.append(out.detach()))
    try:
        generate(model, tokenizer, logits_processor=[proc], max_new_tokens=4)
    finally:
        handle.remove()
    hidden = torch.cat(captured, dim=1)
    expected = (hidden @ sae.W_enc[[3, 9]].detach().T + sae.b_enc[[3, 9]].detach()).relu()
    assert proc.traces[0].values.shape == (2, hidden.shape[1], 2)
    torch.testing.assert_close(proc.traces[0].values, expected)


def test_steering_context_for_plain_forwards(model, tokenizer, sae):
    inputs = tokenizer(PROMPTS, return_tensors="pt", padding=True)
    vector = 6.0 * sae.W_dec[:, 9].detach()
    with steered(model, Steering(sae, 9, 6.0), attention_mask=inputs.attention_mask):
        logits = model(**inputs).logits
        again = model(**inputs).logits  # each forward is a whole sequence
    with torch.no_grad(), HandHook(model, lambda h, call: inputs.attention_mask[..., None] * vector):
        expected = model(**inputs).logits
    torch.testing.assert_close(logits, expected)
    torch.testing.assert_close(again, expected)
    assert no_hooks(model)


def test_no_hooks_after_generate_raises(model, tokenizer, sae):
    class Boom(LogitsProcessor):
        def __call__(self, input_ids, scores):
            raise RuntimeError("boom")

    proc = SAELogitsProcessor(model, Steering(sae, 9, 6.0))
    with pytest.raises(RuntimeError, match="boom"):
        generate(model, tokenizer, logits_processor=[proc, Boom()])
    assert no_hooks(model)


def test_bad_specs_fail_before_generation(model, tokenizer):
    wide = tiny_sae(d_model=32, layer=1)
    with pytest.raises(ValueError, match="SAE d_model=32 does not match the model's hidden size 64"):
        SAELogitsProcessor(model, Steering(wide, 1, 1.0))
    sae = tiny_sae(d_model=64, d_sae=256, layer=1)
    with pytest.raises(IndexError, match="layer 9 is out of range"):
        SAELogitsProcessor(model, Steering(sae, 1, 1.0, layer=9))
    with pytest.raises(IndexError, match="feature index 256 is out of range"):
        Steering(sae, [1, 256], 1.0)
    with pytest.raises(ValueError, match="unknown steering mode"):
        Steering(sae, 1, 1.0, mode="boost")
    with pytest.raises(ValueError, match="threshold=-0.5 is below 0"):
        Steering(sae, 1, 1.0, mode="gated", threshold=-0.5)
    with pytest.raises(ValueError, match="3 per-row steering specs for a batch of 2 prompts"):
        generate(model, tokenizer, logits_processor=[SAELogitsProcessor(model, rows=[None, None, None])])
    with pytest.raises(IndexError, match="position 40 is outside row 0's sequence"):
        generate(model, tokenizer, logits_processor=[SAELogitsProcessor(model, Steering(sae, 1, 1.0, positions=[40]))])
    with pytest.raises(IndexError, match="position -5 is outside row 1's sequence"):
        generate(model, tokenizer, logits_processor=[SAELogitsProcessor(model, Steering(sae, 1, 1.0, positions=[-5]))])
    assert no_hooks(model)


@pytest.mark.parametrize("positions", ["all", "prompt", "generated", [0], [-1], [0, 1]])
def test_plain_forward_positions_under_left_and_right_padding_equal_each_row_alone(model, tokenizer, sae, positions):
    """Steered plain forwards: a padded batch (either side) gives each row the logits it gets alone."""
    spec = Steering(sae, 9, 6.0, positions=positions)
    alone = []
    for prompt in PROMPTS:
        ids = tokenizer([prompt], return_tensors="pt")
        with torch.no_grad(), steered(model, spec, attention_mask=ids.attention_mask):
            alone.append(model(**ids).logits[0])
    for side in ("left", "right"):
        tokenizer.padding_side = side
        try:
            inputs = tokenizer(PROMPTS, return_tensors="pt", padding=True)
        finally:
            tokenizer.padding_side = "left"
        with torch.no_grad(), steered(model, spec, attention_mask=inputs.attention_mask):
            logits = model(**inputs).logits
        for row, expected in enumerate(alone):
            real = inputs.attention_mask[row].bool()
            torch.testing.assert_close(logits[row][real], expected, rtol=1e-4, atol=1e-4)


def test_supported_transformers_versions():
    """Steering wraps transformers' decoding loops: 5.x is supported (5.24 tested), anything else fails clearly."""
    import transformers

    from qscope_hf.compat import check_transformers

    check_transformers()  # the installed release
    assert transformers.__version__.startswith("5.")
    check_transformers("5.0.0")
    for version in ("4.57.1", "6.0.0"):
        with pytest.raises(RuntimeError, match=rf"supports transformers>=5.0,<6.0 .*found transformers {version}"):
            check_transformers(version)
