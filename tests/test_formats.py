"""Checkpoint formats round-trip; hub loading runs through huggingface_hub on a fake cache; bad files fail clearly."""

from __future__ import annotations

import json

import pytest
import safetensors.torch
import torch

from qscope_hf import CheckpointError, Release, SparseAutoencoder, UnknownReleaseError, register_release
from qscope_hf.testing import make_hub_cache
from qscope_hf.tiny import tiny_sae

PARAMS = ("W_enc", "W_dec", "b_enc", "b_dec")


def assert_same_sae(a, b):
    for name in PARAMS:
        assert torch.equal(getattr(a, name), getattr(b, name)), name
    assert a.cfg == b.cfg
    assert b.W_dec.T.is_contiguous()


@pytest.mark.parametrize("fmt", ["qscope", "qwen-scope", "saelens"])
@pytest.mark.parametrize("activation", ["relu_topk", "topk"])
def test_round_trip(tmp_path, fmt, activation):
    sae = tiny_sae(d_model=24, d_sae=96, k=5, layer=3, seed=1, activation=activation)
    sae.cfg.model_id = "tiny/qwen3"
    if fmt == "saelens" and activation == "topk":
        with pytest.raises(ValueError, match="SAELens' TopK applies ReLU"):
            sae.save_pretrained(tmp_path, format=fmt)
        return
    weights = sae.save_pretrained(tmp_path, format=fmt)
    assert_same_sae(sae, SparseAutoencoder.from_pretrained(tmp_path, layer=3))
    assert_same_sae(sae, SparseAutoencoder.from_pretrained(weights))
    half = SparseAutoencoder.from_pretrained(tmp_path, layer=3, dtype=torch.bfloat16)
    assert half.dtype == torch.bfloat16 and torch.equal(half.W_dec, sae.W_dec.to(torch.bfloat16))


def test_qwen_scope_file_is_the_hub_layout(tmp_path):
    sae = tiny_sae(d_model=24, d_sae=96, k=5, layer=0)
    sae.save_pretrained(tmp_path, format="qwen-scope")
    raw = torch.load(tmp_path / "layer0.sae.pt", weights_only=True)
    assert sorted(raw) == sorted(PARAMS)
    assert raw["W_enc"].shape == (96, 24) and raw["W_dec"].shape == (24, 96) and raw["W_dec"].is_contiguous()


def test_local_release_directory_needs_k_without_sidecar(tiny_release):
    sae = SparseAutoencoder.from_pretrained(tiny_release, layer=2, k=8)
    raw = torch.load(tiny_release / "layer2.sae.pt", weights_only=True)
    assert torch.equal(sae.W_enc, raw["W_enc"]) and torch.equal(sae.W_dec, raw["W_dec"])
    assert (sae.layer, sae.k, sae.d_sae) == (2, 8, 256)
    with pytest.raises(ValueError, match="k is unknown for .*layer2.sae.pt.*pass k="):
        SparseAutoencoder.from_pretrained(tiny_release, layer=2)
    with pytest.raises(FileNotFoundError, match=r"no SAE for layer 7.*layers present: \[0, 1, 2, 3\]"):
        SparseAutoencoder.from_pretrained(tiny_release, layer=7, k=8)
    with pytest.raises(ValueError, match=r"holds layers \[0, 1, 2, 3\]: pass layer="):
        SparseAutoencoder.from_pretrained(tiny_release, k=8)


@pytest.fixture(scope="module")
def tiny_hub_release(tmp_path_factory):
    """A registered tiny release and a huggingface_hub cache holding layers 0–2 of it (not layer 3)."""
    release = register_release(Release("Tiny-Qwen3-Test", 4, 64, 1024, 8, "qwen3"))
    source = tmp_path_factory.mktemp("source")
    for layer in range(3):
        tensors = {name: getattr(tiny_sae(64, 1024, 8, layer=layer, seed=layer), name).detach().contiguous()
                   for name in PARAMS}
        torch.save(tensors, source / f"layer{layer}.sae.pt")
    files = {f"layer{n}.sae.pt": source / f"layer{n}.sae.pt" for n in range(3)}
    return release, make_hub_cache(tmp_path_factory.mktemp("hub"), release.repo_id, files), source


def test_release_loads_through_the_hub_code_path(tiny_hub_release):
    release, cache, source = tiny_hub_release
    sae = SparseAutoencoder.from_pretrained(release.repo_id, layer=1, cache_dir=cache, dtype=torch.float16)
    raw = torch.load(source / "layer1.sae.pt", weights_only=True)
    assert torch.equal(sae.W_enc, raw["W_enc"].half()) and torch.equal(sae.b_dec, raw["b_dec"].half())
    assert (sae.k, sae.release, sae.layer, sae.cfg.model_id) == (8, release.repo_id, 1, "Qwen/Tiny-Qwen3-Test")


def test_missing_layer_file_names_repo_and_file(tiny_hub_release):
    release, cache, _ = tiny_hub_release
    with pytest.raises(OSError, match=rf"'layer3.sae.pt' from '{release.repo_id}'.*from_pretrained\('DIR'"):
        SparseAutoencoder.from_pretrained(release.repo_id, layer=3, cache_dir=cache)
    with pytest.raises(ValueError, match="layer 4 is out of range"):
        SparseAutoencoder.from_pretrained(release.repo_id, layer=4, cache_dir=cache)


def test_offline_published_release_says_how_to_use_a_local_copy(tmp_path):
    repo = "Qwen/SAE-Res-Qwen3-1.7B-Base-W32K-L0_50"
    with pytest.raises(OSError, match=rf"cannot fetch 'layer5.sae.pt' from '{repo}'.*hub is unreachable.*local copy"):
        SparseAutoencoder.from_pretrained(repo, layer=5, cache_dir=tmp_path)
    with pytest.raises(UnknownReleaseError, match="unknown Qwen-Scope release"):
        SparseAutoencoder.from_pretrained("Qwen/SAE-Res-Qwen3-2B-Base-W32K-L0_50", layer=5)
    with pytest.raises(FileNotFoundError, match="neither an existing path nor a hub repo id"):
        SparseAutoencoder.from_pretrained("no-such-dir", layer=5)


def test_registry_validates_shapes(tmp_path):
    release = register_release(Release("Tiny-Shape-Test", 2, 64, 1024, 8, "qwen3"))
    source = tmp_path / "src"
    tiny_sae(32, 1024, 8, layer=0).save_pretrained(source, format="qwen-scope")
    cache = make_hub_cache(tmp_path / "hub", release.repo_id, {"layer0.sae.pt": source / "layer0.sae.pt"})
    with pytest.raises(CheckpointError, match="d_model=32, d_sae=1024 do not match release"):
        SparseAutoencoder.from_pretrained(release.repo_id, layer=0, cache_dir=cache)


def test_qscope_layout_hub_repo(tmp_path):
    sae = tiny_sae(16, 64, 4, layer=1)
    sae.save_pretrained(tmp_path / "src")
    files = {name: tmp_path / "src" / name for name in ("layer1.json", "layer1.safetensors")}
    cache = make_hub_cache(tmp_path / "hub", "someone/my-saes", files)
    assert_same_sae(sae, SparseAutoencoder.from_pretrained("someone/my-saes", layer=1, cache_dir=cache))


def test_saelens_b_dec_subtraction_is_folded(tmp_path):
    sae = tiny_sae(16, 64, 4, layer=1, seed=3)
    sae.save_pretrained(tmp_path, format="saelens")
    cfg = json.loads((tmp_path / "cfg.json").read_text())
    cfg["apply_b_dec_to_input"] = True
    (tmp_path / "cfg.json").write_text(json.dumps(cfg))
    folded = SparseAutoencoder.from_pretrained(tmp_path)
    x = torch.randn(5, 16)
    with torch.no_grad():  # SAELens: encode(x - b_dec) with the original b_enc
        pre = (x - sae.b_dec) @ sae.W_enc.T + sae.b_enc
        torch.testing.assert_close(folded.pre_acts(x), pre, rtol=1e-5, atol=1e-5)


def test_malformed_checkpoints(tmp_path):
    sae = tiny_sae(16, 64, 4, layer=0)
    tensors = {name: getattr(sae, name).detach().contiguous() for name in PARAMS}
    torch.save({k: v for k, v in tensors.items() if k != "b_dec"}, tmp_path / "layer0.sae.pt")
    with pytest.raises(CheckpointError, match=r"missing \['b_dec'\]"):
        SparseAutoencoder.from_pretrained(tmp_path / "layer0.sae.pt", k=4)
    torch.save({**tensors, "W_dec": tensors["W_dec"][:, :60]}, tmp_path / "layer0.sae.pt")
    with pytest.raises(CheckpointError, match=r"W_dec has shape \(16, 60\), expected \(16, 64\)"):
        SparseAutoencoder.from_pretrained(tmp_path / "layer0.sae.pt", k=4)
    torch.save({**tensors, "extra": torch.nn.Linear(2, 2)}, tmp_path / "layer0.sae.pt")
    with pytest.raises(CheckpointError, match="not a plain tensor checkpoint"):
        SparseAutoencoder.from_pretrained(tmp_path / "layer0.sae.pt", k=4)
    sae.save_pretrained(tmp_path / "q")
    safetensors.torch.save_file({**tensors, "b_enc": tensors["b_enc"][:10]}, tmp_path / "q" / "layer0.safetensors")
    with pytest.raises(CheckpointError, match=r"b_enc has shape \(10,\)"):
        SparseAutoencoder.from_pretrained(tmp_path / "q", layer=0)
    with pytest.raises(ValueError, match="layer=2 was asked for but .* holds layer 0"):
        SparseAutoencoder.from_pretrained(tmp_path / "q" / "layer0.safetensors", layer=2)
