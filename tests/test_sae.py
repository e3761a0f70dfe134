"""SparseAutoencoder: its methods equal the SAE formulas (docs/methods/sae.md) computed by hand; bad input fails
clearly."""

from __future__ import annotations

import pytest
import torch

from qscope_hf import SparseAutoencoder
from qscope_hf.tiny import tiny_sae


@pytest.fixture
def sae():
    return tiny_sae(d_model=32, d_sae=200, k=10, layer=2, seed=7)


def formula(sae, x):
    """pre = x W_enc^T + b_enc; z = TopK(ReLU(pre)); x̂ = z W_dec^T + b_dec — in fp64, by hand."""
    W_enc, b_enc, W_dec, b_dec = (p.detach().double() for p in (sae.W_enc, sae.b_enc, sae.W_dec, sae.b_dec))
    pre = x.double() @ W_enc.T + b_enc
    values, indices = pre.relu().topk(sae.k, dim=-1)
    z = torch.zeros_like(pre).scatter(-1, indices, values)
    return pre, z, z @ W_dec.T + b_dec


def test_methods_equal_the_formula(sae):
    x = torch.randn(3, 5, 32)
    pre, z, recon = formula(sae, x)
    with torch.no_grad():
        torch.testing.assert_close(sae.pre_acts(x).double(), pre, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(sae.encode(x).double(), z, rtol=1e-5, atol=1e-5)
        values, indices = sae.encode_topk(x)
        assert values.shape == indices.shape == (3, 5, 10)
        dense = torch.zeros(3, 5, 200).scatter(-1, indices, values)
        torch.testing.assert_close(dense.double(), z, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(sae(x).double(), recon, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(sae.decode(z.float()).double(), recon, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(sae.decode_topk(values, indices).double(), recon, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(sae.pre_acts(x, [4, 150]).double(), pre[..., [4, 150]], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(sae.feature_directions([4, 150]), sae.W_dec[:, [4, 150]].T)
    torch.testing.assert_close(sae.feature_directions(4), sae.W_dec[:, 4])


def test_pre_acts_of_selected_features_are_differentiable(sae):
    x = torch.randn(4, 32, requires_grad=True)
    sae.pre_acts(x, [1, 2]).sum().backward()
    torch.testing.assert_close(x.grad, (sae.W_enc[1] + sae.W_enc[2]).detach().expand(4, 32))


def test_card_variant(sae):
    card = tiny_sae(d_model=32, d_sae=200, k=10, seed=7, activation="topk")
    with torch.no_grad():
        card.b_enc.sub_(5.0)  # most pre-activations negative
    x = torch.randn(6, 32)
    values, _ = card.encode_topk(x)
    assert (values < 0).any()
    assert card.activation == "topk"


def test_decoder_stored_feature_major_and_metadata(sae):
    assert sae.W_dec.shape == (32, 200) and sae.W_dec.T.is_contiguous()
    assert sae.to(torch.bfloat16).W_dec.T.is_contiguous()
    assert (sae.layer, sae.dtype) == (2, torch.bfloat16)
    torch.testing.assert_close(sae.W_dec.float().norm(dim=0), torch.ones(200), atol=1e-2, rtol=0)


def test_bad_input(sae):
    with pytest.raises(ValueError, match="d_model=31, but this SAE reads d_model=32"):
        sae.encode(torch.randn(2, 31))
    with pytest.raises(TypeError, match=r"activations are torch.float64 but the SAE is torch.float32"):
        sae.encode(torch.randn(2, 32, dtype=torch.float64))
    with pytest.raises(ValueError, match="activations are on meta but the SAE is on cpu"):
        sae.encode(torch.randn(2, 32, device="meta"))
    with pytest.raises(IndexError, match=r"feature index 200 is out of range \[0, 200\) for an SAE with d_sae=200"):
        sae.pre_acts(torch.randn(2, 32), [3, 200])
    with pytest.raises(IndexError, match="feature index -1"):
        sae.feature_directions([-1])
    with pytest.raises(ValueError, match="k=300 must be in"):
        SparseAutoencoder(32, 200, 300)
    with pytest.raises(ValueError, match="k=0 must be in"):
        SparseAutoencoder(32, 200, 0)
    with pytest.raises(ValueError, match="codes have d_sae=199"):
        sae.decode(torch.zeros(1, 199))
    with pytest.raises(IndexError, match=r"feature indices must lie in \[0, d_sae=200\), got \[3, 200\]"):
        sae.decode_topk(torch.ones(1, 2), torch.tensor([[3, 200]]))
