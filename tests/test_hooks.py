"""Hooks read the output of decoder layer n (== hidden_states[n+1]) on every family and through wrappers."""

from __future__ import annotations

import socket

import pytest
import torch
import torch.distributed as dist
from peft import LoraConfig, get_peft_model
from torch.nn.parallel import DistributedDataParallel

from qscope_hf import (
    add_to_layers,
    capture_layers,
    check_layer,
    check_sae_fits,
    decoder_layers,
    hook_layers,
    layer_outputs,
    unwrap_model,
)
from qscope_hf.testing import leaked_hooks
from qscope_hf.tiny import tiny_model, tiny_sae


def prompt_ids():
    return torch.tensor([[5, 70, 101, 32, 200, 9, 44], [256, 256, 72, 105, 33, 10, 99]])


def assert_layers_match_hidden_states(model):
    ids = prompt_ids()
    mask = (ids != 256).long()
    count = len(decoder_layers(model))
    with torch.no_grad():
        hidden_states = model(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states
    captured = layer_outputs(model, range(count), input_ids=ids, attention_mask=mask)
    assert len(hidden_states) == count + 1
    for layer in range(count - 1):
        torch.testing.assert_close(captured[layer], hidden_states[layer + 1], rtol=0, atol=0)
    # The last entry is after the final norm: only a hook sees the last layer's own output.
    final_norm = unwrap_model(model).get_decoder().norm
    torch.testing.assert_close(final_norm(captured[count - 1]), hidden_states[-1])
    assert not torch.equal(captured[count - 1], hidden_states[-1])


def test_layer_n_is_hidden_states_n_plus_1(any_model):
    assert_layers_match_hidden_states(any_model)


@pytest.mark.parametrize("family", ["qwen3", "qwen3_5", "qwen3_5_vl"])
def test_same_under_a_peft_lora_wrapper(family):
    base = tiny_model(family)
    lora = get_peft_model(base, LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    assert decoder_layers(lora) is decoder_layers(base)
    assert_layers_match_hidden_states(lora)


def test_multimodal_class_finds_the_text_layers():
    model = tiny_model("qwen3_5_vl")
    assert decoder_layers(model) is model.model.language_model.layers


def test_through_ddp_and_torch_compile():
    model = tiny_model("qwen3")
    assert decoder_layers(torch.compile(model)) is decoder_layers(model)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    try:
        wrapped = DistributedDataParallel(model)
        assert decoder_layers(wrapped) is decoder_layers(model)
        assert_layers_match_hidden_states(wrapped)
    finally:
        dist.destroy_process_group()


def test_add_to_layers_equals_a_hand_written_hook(qwen3):
    ids = prompt_ids()
    vector = torch.randn(64)
    with add_to_layers(qwen3, {1: vector}):
        steered = qwen3(input_ids=ids).logits
    handle = qwen3.model.layers[1].register_forward_hook(lambda m, i, out: out + vector)
    try:
        expected = qwen3(input_ids=ids).logits
    finally:
        handle.remove()
    torch.testing.assert_close(steered, expected)
    assert not torch.equal(steered, qwen3(input_ids=ids).logits)


def test_hook_returning_none_leaves_output_and_capture_can_keep_graph(qwen3):
    ids = prompt_ids()
    clean = qwen3(input_ids=ids).logits
    with hook_layers(qwen3, {2: lambda hidden: None}):
        torch.testing.assert_close(qwen3(input_ids=ids).logits, clean)
    with torch.enable_grad(), capture_layers(qwen3, [0], detach=False) as captured:
        qwen3(input_ids=ids)
        assert captured[0].requires_grad


def test_hooks_removed_after_exceptions(qwen3):
    with pytest.raises(RuntimeError, match="user code failed"):
        with capture_layers(qwen3, [0, 3]):
            assert len(leaked_hooks(qwen3)) == 2
            raise RuntimeError("user code failed")

    def broken(hidden):
        raise ValueError("edit failed")

    with pytest.raises(ValueError, match="edit failed"):
        with hook_layers(qwen3, {1: broken}):
            qwen3(input_ids=prompt_ids())
    assert not leaked_hooks(qwen3)


def test_bad_layers_and_sizes(qwen3):
    with pytest.raises(IndexError, match="layer 4 is out of range: Qwen3ForCausalLM has decoder layers 0..3"):
        check_layer(qwen3, 4)
    with pytest.raises(IndexError, match="out of range"):
        with capture_layers(qwen3, [-1]):
            pass
    with pytest.raises(ValueError, match="SAE d_model=32 does not match the model's hidden size 64"):
        check_sae_fits(qwen3, tiny_sae(d_model=32, layer=1))
    with pytest.raises(ValueError, match="vector for layer 0 has size 10"):
        with add_to_layers(qwen3, {0: torch.zeros(10)}):
            pass
    assert not leaked_hooks(qwen3)


def test_capture_can_stop_the_forward_after_the_last_layer(qwen3):
    calls = []
    handle = decoder_layers(qwen3)[3].register_forward_hook(lambda *a: calls.append(1))
    try:
        ids = prompt_ids()
        full = layer_outputs(qwen3, [0, 1], input_ids=ids)
        assert not calls  # layers after 1 (and the LM head) did not run
        with torch.no_grad(), capture_layers(qwen3, [1]) as captured:
            qwen3(input_ids=ids)
        assert calls and torch.equal(full[1], captured[1])
    finally:
        handle.remove()
    assert not leaked_hooks(qwen3)
