"""Careless input, broken files and other libraries' checkpoints: a clear error naming the problem, never a hang,
a silent wrong answer or a leaked hook (each test failed before its fix)."""

from __future__ import annotations

import copy
import io
import json
import pickle
import subprocess
import sys

import pytest
import safetensors.torch
import torch

from qscope_hf import (
    CheckpointError,
    ConfigError,
    SAELogitsProcessor,
    SparseAutoencoder,
    Steering,
    enable_steering,
    ops,
)
from qscope_hf.analysis import coverage_curve, footprints
from qscope_hf.classify import collect_text_features
from qscope_hf.discovery import activation_stats, contrast_features, residual_norm
from qscope_hf.formats import hook_layer
from qscope_hf.testing import leaked_hooks
from qscope_hf.tiny import tiny_model, tiny_sae
from qscope_hf.training import TrainConfig

TEXTS = ["The quick brown fox.", "12345 67890", "jumps over the lazy dog"]
PARAMS = ("W_enc", "W_dec", "b_enc", "b_dec")


@pytest.fixture(scope="module")
def sae():
    return tiny_sae(64, 256, 8, layer=1, seed=1)


@pytest.mark.parametrize("batch_size", [0, -1, 2.5])
def test_batch_sizes_are_validated_before_any_forward(qwen3, tokenizer, sae, batch_size):
    message = "batch_size must be a positive integer"
    for call in (lambda: activation_stats(qwen3, tokenizer, sae, TEXTS, batch_size=batch_size, progress=False),
                 lambda: collect_text_features(qwen3, tokenizer, sae, TEXTS, batch_size=batch_size, progress=False),
                 lambda: footprints(qwen3, tokenizer, sae, TEXTS, batch_size=batch_size),
                 lambda: residual_norm(qwen3, tokenizer, 1, TEXTS, batch_size=batch_size)):
        with pytest.raises(ConfigError, match=message):
            call()


def test_counts_are_validated(qwen3, tokenizer, sae):
    with pytest.raises(ConfigError, match="n_contexts must be an integer >= 0"):
        activation_stats(qwen3, tokenizer, sae, TEXTS, n_contexts=-1, progress=False)
    stats = activation_stats(qwen3, tokenizer, sae, TEXTS, progress=False)
    with pytest.raises(ConfigError, match="top must be a positive integer"):
        contrast_features(stats, stats, top=-2)
    with pytest.raises(ConfigError, match="draws must be a positive integer"):
        coverage_curve([frozenset({1})], draws=0)
    with pytest.raises(ConfigError, match="batch_tokens must be a positive integer"):
        TrainConfig(layers=[1], batch_tokens=0)
    with pytest.raises(ConfigError, match="layers must be a non-empty list"):
        TrainConfig(layers=[])
    with pytest.raises(ConfigError, match="lr must be a finite number"):
        TrainConfig(layers=[1], lr=float("nan"))


@pytest.mark.parametrize("k", [2.5, "8", True])
def test_k_must_be_an_integer(k):
    with pytest.raises(ConfigError, match="k must be an integer"):
        SparseAutoencoder(16, 64, k)


def test_encode_of_a_0d_tensor_and_float_feature_ids(sae):
    with pytest.raises(ValueError, match="must be a tensor"):
        sae.encode_topk(torch.tensor(1.0))
    with pytest.raises(TypeError, match="feature ids must be integers"):
        sae.feature_index([1.5])


def test_non_finite_rows_encode_the_same_on_every_backend():
    sae = tiny_sae(16, 64, 4, layer=0, seed=2)
    x = torch.randn(5, 16)
    x[1, 3], x[3, 0] = float("nan"), float("inf")
    results = {b: ops.topk_encode(x, sae.W_enc.detach(), sae.b_enc.detach(), 4, backend=b)
               for b in ops.available_backends()}
    for values, indices in results.values():
        assert bool(values[[1, 3]].isnan().all()) and indices[[1, 3]].tolist() == [[0, 1, 2, 3]] * 2
        assert bool(values[[0, 2, 4]].isfinite().all())
        torch.testing.assert_close(values[[0, 2, 4]], results["reference"][0][[0, 2, 4]])


def test_steering_refuses_non_finite_values_and_non_specs(qwen3, tokenizer, sae):
    for bad in (float("nan"), float("inf")):
        with pytest.raises(ValueError, match="strengths must be finite"):
            Steering(sae, 3, bad)
        with pytest.raises(ValueError, match="threshold must be a finite number"):
            Steering(sae, 3, 1.0, mode="gated", threshold=bad)
    inputs = tokenizer(["Hi"], return_tensors="pt")
    with pytest.raises(TypeError, match="expected a Steering spec or a list of them, got int"):
        enable_steering(tiny_model("qwen3")).generate(**inputs, steering=5, max_new_tokens=2)


def test_a_steered_model_pickles_copies_and_saves(tmp_path, tokenizer, sae):
    model = tiny_model("qwen3")
    SAELogitsProcessor(model, Steering(sae, 3, 2.0))  # gives the instance its steerable class
    ids = tokenizer(["Hello"], return_tensors="pt")["input_ids"]
    expected = model(input_ids=ids).logits
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    copies = [pickle.loads(pickle.dumps(model)), copy.deepcopy(model), torch.load(buffer, weights_only=False)]
    model.save_pretrained(tmp_path)
    copies.append(type(copies[0]).from_pretrained(tmp_path))
    for other in copies:
        assert type(other).__name__ == "Qwen3ForCausalLM"
        torch.testing.assert_close(other(input_ids=ids).logits, expected)
    again = SAELogitsProcessor(copies[0], Steering(sae, 3, 2.0))  # steering works again on the copy
    assert again is not None and not leaked_hooks(copies[0])


# -- checkpoints ------------------------------------------------------------------------------------------------
def write_layer_file(tmp_path, payload: bytes) -> str:
    path = tmp_path / "layer0.sae.pt"
    path.write_bytes(payload)
    return str(path)


def tensors_of(sae):
    return {name: getattr(sae, name).detach().contiguous() for name in PARAMS}


def test_broken_layer_files_raise_checkpoint_errors_naming_the_file(tmp_path):
    sae = tiny_sae(16, 64, 4, layer=0)
    numpy_pickle = pickle.dumps({"W_enc": [[1.0]]})
    torch.save(tensors_of(sae), tmp_path / "good.pt")
    good = (tmp_path / "good.pt").read_bytes()
    safetensors_bytes = safetensors.torch.save(tensors_of(sae))
    for payload, message in [(b"", "is empty"), (b"just some text\n", "is not a torch.save checkpoint"),
                             (numpy_pickle, "not a plain tensor checkpoint: it holds Python objects"),
                             (safetensors_bytes, "looks like a safetensors file"),
                             (good[: len(good) // 2], "cannot be read as a torch.save checkpoint")]:
        path = write_layer_file(tmp_path, payload)
        with pytest.raises(CheckpointError, match=message) as error:
            SparseAutoencoder.from_pretrained(path, k=4)
        assert path in str(error.value) and "weights_only=False" not in str(error.value)


def test_malformed_tensors_and_configs(tmp_path):
    sae = tiny_sae(16, 64, 4, layer=0)
    tensors = tensors_of(sae)
    torch.save({**tensors, "W_enc": tensors["W_enc"].long()}, tmp_path / "layer0.sae.pt")
    with pytest.raises(CheckpointError, match="W_enc must be a floating-point tensor, got torch.int64"):
        SparseAutoencoder.from_pretrained(tmp_path / "layer0.sae.pt", k=4)
    torch.save({**tensors, "W_enc": tensors["W_enc"].T.contiguous()}, tmp_path / "layer0.sae.pt")
    with pytest.raises(CheckpointError, match=r"W_enc is stored transposed \(16, 64\)"):
        SparseAutoencoder.from_pretrained(tmp_path / "layer0.sae.pt", k=4)
    torch.save({**tensors, "threshold": torch.zeros(64)}, tmp_path / "layer0.sae.pt")
    with pytest.warns(UserWarning, match=r"ignoring tensors \['threshold'\]"):
        SparseAutoencoder.from_pretrained(tmp_path / "layer0.sae.pt", k=4)
    sae.save_pretrained(tmp_path / "q")
    (tmp_path / "q" / "layer0.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="layer0.json is not valid JSON"):
        SparseAutoencoder.from_pretrained(tmp_path / "q", layer=0)
    sae.save_pretrained(tmp_path / "q")
    weights = tmp_path / "q" / "layer0.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    with pytest.raises(CheckpointError, match=r"layer0.safetensors cannot be read as a safetensors file"):
        SparseAutoencoder.from_pretrained(tmp_path / "q", layer=0)
    sae.save_pretrained(tmp_path / "s", format="saelens")
    cfg = json.loads((tmp_path / "s" / "cfg.json").read_text())
    (tmp_path / "s" / "cfg.json").write_text(json.dumps({**cfg, "k": 0}))
    with pytest.raises(CheckpointError, match="a TopK SAE needs an integer k >= 1, cfg.json says k=0"):
        SparseAutoencoder.from_pretrained(tmp_path / "s")


@pytest.mark.parametrize("name, layer", [("blocks.3.hook_resid_post", 3), ("blocks.3.hook_resid_pre", 2),
                                         ("model.layers.4", 4), ("layers.10", 10), ("transformer.h.2", 2),
                                         ("model.language_model.layers.5", 5)])
def test_hook_names_that_read_a_layer_output(name, layer):
    assert hook_layer(name, "cfg") == layer


@pytest.mark.parametrize("name", ["blocks.3.hook_resid_mid", "blocks.3.hook_mlp_out", "blocks.3.attn.hook_z",
                                  "blocks.0.hook_resid_pre", "model.layers.3.mlp", "model.layers.3.self_attn"])
def test_hook_names_that_read_elsewhere_are_refused(tmp_path, name):
    sae = tiny_sae(16, 64, 4, layer=3)
    sae.save_pretrained(tmp_path, format="saelens")
    cfg = json.loads((tmp_path / "cfg.json").read_text())
    cfg["metadata"]["hook_name"] = name
    (tmp_path / "cfg.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match=f"{name!r}"):
        SparseAutoencoder.from_pretrained(tmp_path)


def test_saelens_resid_pre_maps_to_the_previous_layer_and_the_sidecar_agrees(tmp_path):
    sae = tiny_sae(16, 64, 4, layer=3)
    sae.save_pretrained(tmp_path / "lens", format="saelens")
    cfg = json.loads((tmp_path / "lens" / "cfg.json").read_text())
    cfg["metadata"]["hook_name"] = "blocks.4.hook_resid_pre"
    (tmp_path / "lens" / "cfg.json").write_text(json.dumps(cfg))
    assert SparseAutoencoder.from_pretrained(tmp_path / "lens").layer == 3
    sae.save_pretrained(tmp_path / "side")
    sidecar = json.loads((tmp_path / "side" / "layer3.json").read_text())
    for hook, ok in (("blocks.4.hook_resid_pre", True), ("model.layers.3", True), ("blocks.3.hook_resid_pre", False)):
        (tmp_path / "side" / "layer3.json").write_text(json.dumps({**sidecar, "hook_point": hook}))
        if ok:
            assert SparseAutoencoder.from_pretrained(tmp_path / "side", layer=3).layer == 3
        else:
            with pytest.raises(CheckpointError, match="reads layer 2, but the weights file is for layer 3"):
                SparseAutoencoder.from_pretrained(tmp_path / "side", layer=3)


def test_bf16_b_dec_fold_is_done_in_fp32(tmp_path):
    sae = tiny_sae(64, 512, 8, layer=1, seed=4).to(torch.bfloat16)
    with torch.no_grad():
        sae.b_dec.copy_(torch.randn(64) * 3)
        sae.b_enc.copy_(torch.randn(512))
    sae.save_pretrained(tmp_path, format="saelens")
    cfg = json.loads((tmp_path / "cfg.json").read_text())
    (tmp_path / "cfg.json").write_text(json.dumps({**cfg, "apply_b_dec_to_input": True}))
    loaded = SparseAutoencoder.from_pretrained(tmp_path, dtype=torch.float32)
    exact = (sae.b_enc.double() - sae.W_enc.double() @ sae.b_dec.double()).float()
    torch.testing.assert_close(loaded.b_enc, exact, rtol=0, atol=1e-6)  # not rounded in bf16 first
    assert not torch.allclose(loaded.b_enc, exact.bfloat16().float(), rtol=0, atol=1e-6)


# -- sparsify checkpoints ---------------------------------------------------------------------------------------
def test_sparsify_round_trip_and_layout(tmp_path):
    sae = tiny_sae(16, 64, 4, layer=5, seed=6)
    with torch.no_grad():
        sae.b_dec.normal_()
    weights = sae.save_pretrained(tmp_path, format="sparsify")
    assert weights == tmp_path / "layers.5" / "sae.safetensors"
    raw = safetensors.torch.load_file(weights)
    assert sorted(raw) == ["W_dec", "b_dec", "encoder.bias", "encoder.weight"] and raw["W_dec"].shape == (64, 16)
    for source in (tmp_path, tmp_path / "layers.5", weights):
        loaded = SparseAutoencoder.from_pretrained(source, layer=5)
        assert loaded.layer == 5 and loaded.k == 4
        x = torch.randn(7, 16)
        with torch.no_grad():
            torch.testing.assert_close(loaded.pre_acts(x), sae.pre_acts(x), rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(loaded.W_dec, sae.W_dec)
    with torch.no_grad():  # sparsify's own formula: encoder(x - b_dec)
        pre = (x - raw["b_dec"]) @ raw["encoder.weight"].T + raw["encoder.bias"]
        torch.testing.assert_close(loaded.pre_acts(x), pre, rtol=1e-5, atol=1e-5)


# -- command line -----------------------------------------------------------------------------------------------
def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "qscope_hf.cli", *args], capture_output=True, text=True, timeout=300)


def test_cli_user_errors_print_one_line_and_exit_non_zero(tmp_path):
    (tmp_path / "a.txt").write_text("one two\nthree four\n")
    (tmp_path / "empty.jsonl").write_text("")
    for args, message in [(["inspect", "--texts", str(tmp_path / "empty.jsonl")], "the corpus is empty"),
                          (["discover", "--a", str(tmp_path / "a.txt"), "--b", str(tmp_path / "a.txt"),
                            "--drop-common"], "--drop-common removed every token"),
                          (["steer", "--prompt", "hi", "--feature", "1", "--strength", "nan"], "must be finite"),
                          (["inspect", "--texts", str(tmp_path / "missing.txt")], "no corpus at")]:
        result = run_cli(*args)
        assert result.returncode == 1, result.stderr
        assert "Traceback" not in result.stderr and message in result.stderr
        assert result.stderr.strip().splitlines()[-1].startswith(f"qscope {args[0]}: error:")
    for args in (["steer", "--prompt", "", "--feature", "1"], ["inspect", "--texts", "a.txt", "--show", "0"],
                 ["discover", "--a", "a", "--b", "b", "--top", "-2"]):
        result = run_cli(*args)
        assert result.returncode == 2 and "Traceback" not in result.stderr
    debug = run_cli("--debug", "inspect", "--texts", str(tmp_path / "missing.txt"))
    assert debug.returncode == 1 and "Traceback" in debug.stderr
