"""Checkpoints round-trip with SAELens and eai-sparsify through each library's own save and load API (both are in
the ``interop`` extra, which ``dev`` installs), fp32 and bf16, on random SAEs and on the shipped SmolLM2 SAE."""

from __future__ import annotations

import pytest
import torch
from sae_lens import SAE, TopKSAE, TopKSAEConfig
from sparsify import SparseCoder, SparseCoderConfig

from qscope_hf import SparseAutoencoder
from qscope_hf.smollm2 import ASSETS
from qscope_hf.tiny import tiny_sae

DTYPES = [torch.float32, torch.bfloat16]


def tolerance(dtype):
    return {"rtol": 1e-5, "atol": 1e-5} if dtype == torch.float32 else {"rtol": 2e-2, "atol": 2e-2}


def dense(values, indices, d_sae):
    return torch.zeros(*values.shape[:-1], d_sae, dtype=values.dtype).scatter(-1, indices, values)


def inputs(d_model, dtype, seed=0):
    return torch.randn(12, d_model, generator=torch.Generator().manual_seed(seed)).to(dtype)


def saelens_codec(sae):
    """``(encode → dense codes, reconstruct)`` of a SAELens SAE."""
    return sae.encode, lambda x: sae.decode(sae.encode(x))


def sparsify_codec(coder):
    """``(encode → dense codes, reconstruct)`` of a sparsify sparse coder."""
    def encode(x):
        out = coder.encode(x)
        return dense(out.top_acts, out.top_indices, coder.num_latents)

    return encode, lambda x: coder.decode(*coder.encode(x)[:2])


def assert_same_outputs(ours, codec, dtype):
    """Our SAE and another library's agree on codes (and, in fp32, on reconstructions) of random inputs."""
    encode, reconstruct = codec
    x = inputs(ours.d_model, dtype)
    with torch.no_grad():
        assert_codes_agree(ours.encode(x), encode(x), dtype)
        if dtype == torch.float32:
            torch.testing.assert_close(ours(x), reconstruct(x), **tolerance(dtype))


def assert_codes_agree(ours, theirs, dtype):
    """Dense codes equal where both fire; in bf16 at most one near-tied feature per row may differ."""
    if dtype == torch.float32:
        torch.testing.assert_close(ours, theirs, **tolerance(dtype))
        return
    differ = ((ours != 0) != (theirs != 0)).sum(-1)
    assert int(differ.max()) <= 2, differ
    both = (ours != 0) & (theirs != 0)
    torch.testing.assert_close(ours[both].float(), theirs[both].float(), **tolerance(dtype))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("apply_b_dec", [False, True])
def test_saelens_topk_sae_loads_in_qscope(tmp_path, dtype, apply_b_dec):
    cfg = TopKSAEConfig(d_in=32, d_sae=128, k=6, apply_b_dec_to_input=apply_b_dec, dtype=str(dtype)[6:])
    theirs = TopKSAE(cfg)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for parameter in theirs.parameters():
            parameter.copy_(torch.randn(parameter.shape, generator=generator).to(parameter.dtype) * 0.3)
    theirs.cfg.metadata.hook_name = "blocks.3.hook_resid_post"
    theirs.save_model(tmp_path)
    ours = SparseAutoencoder.from_pretrained(tmp_path)
    assert (ours.layer, ours.k, ours.d_sae, ours.dtype) == (3, 6, 128, dtype)
    assert_same_outputs(ours, saelens_codec(theirs), dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_qscope_sae_loads_in_saelens(tmp_path, dtype):
    ours = tiny_sae(32, 128, 6, layer=2, seed=3).to(dtype)
    ours.save_pretrained(tmp_path, format="saelens")
    theirs = SAE.load_from_disk(str(tmp_path))
    assert theirs.cfg.metadata.hook_name == "blocks.2.hook_resid_post"
    assert_same_outputs(ours, saelens_codec(theirs), dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_sparsify_sparse_coder_loads_in_qscope(tmp_path, dtype):
    theirs = SparseCoder(32, SparseCoderConfig(num_latents=128, k=6), dtype=dtype)
    with torch.no_grad():
        theirs.b_dec.copy_(torch.randn(32, generator=torch.Generator().manual_seed(2)).to(dtype))
        theirs.encoder.bias.copy_(torch.randn(128, generator=torch.Generator().manual_seed(3)).to(dtype) * 0.1)
    theirs.save_to_disk(tmp_path / "run" / "layers.4")
    ours = SparseAutoencoder.from_pretrained(tmp_path / "run", layer=4)
    assert (ours.layer, ours.k, ours.d_sae, ours.dtype) == (4, 6, 128, dtype)
    assert_same_outputs(ours, sparsify_codec(theirs), dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_qscope_sae_loads_in_sparsify(tmp_path, dtype):
    ours = tiny_sae(32, 128, 6, layer=7, seed=4).to(dtype)
    with torch.no_grad():
        ours.b_dec.normal_()
    weights = ours.save_pretrained(tmp_path, format="sparsify")
    theirs = SparseCoder.load_from_disk(weights.parent)
    assert theirs.cfg.k == 6 and theirs.num_latents == 128
    assert_same_outputs(ours, sparsify_codec(theirs), dtype)


@pytest.mark.parametrize("fmt", ["saelens", "sparsify"])
def test_shipped_smollm2_sae_in_both_libraries(tmp_path, fmt):
    ours = SparseAutoencoder.from_pretrained(ASSETS, layer=15, dtype=torch.float32)
    weights = ours.save_pretrained(tmp_path, format=fmt)
    encode, _ = (saelens_codec(SAE.load_from_disk(str(tmp_path))) if fmt == "saelens"
                 else sparsify_codec(SparseCoder.load_from_disk(weights.parent)))
    back = SparseAutoencoder.from_pretrained(tmp_path, layer=15)
    x = inputs(576, torch.float32) * 20  # the residual stream's scale at layer 15
    with torch.no_grad():
        torch.testing.assert_close(ours.encode(x), encode(x), rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(back.encode(x), ours.encode(x), rtol=1e-5, atol=1e-5)
