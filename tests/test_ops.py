"""The op module: every backend equals the reference, the reference equals the SAE formula, gradients are right."""

from __future__ import annotations

import pytest
import torch

from qscope_hf import ops
from qscope_hf.ops import chunked, dispatch, reference
from qscope_hf.testing import TOLERANCE as TOL
from qscope_hf.testing import assert_op_matches_reference

STREAMING = ["chunked", "triton"]
#: Triton runs on the GPU when there is one, else in Triton's CPU interpreter (conftest sets TRITON_INTERPRET).
DEVICE = {"triton": "cuda" if torch.cuda.is_available() else "cpu"}


def on(backend, *tensors):
    """Move test inputs to where ``backend`` runs."""
    moved = tuple(t.to(DEVICE.get(backend, "cpu")) for t in tensors)
    return moved if len(moved) > 1 else moved[0]


def make_encoder(n, d_model, d_sae, *, seed=0, dtype=torch.float32, lead=()):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*lead, n, d_model, generator=g, dtype=torch.float64)
    W = torch.randn(d_sae, d_model, generator=g, dtype=torch.float64) / d_model**0.5
    b = 0.1 * torch.randn(d_sae, generator=g, dtype=torch.float64)
    return x.to(dtype), W.to(dtype), b.to(dtype)


def hand_topk(x, W, b, k, relu=True):
    """The SAE formula (docs/methods/sae.md) written out again, in fp64: pre = x W^T + b; z = TopK(ReLU(pre))."""
    pre = x.double() @ W.double().T + b.double()
    acts = pre.relu() if relu else pre
    values, indices = acts.topk(k, dim=-1)
    return values, indices


# -- reference vs the formula -------------------------------------------------------------------------------------
def test_reference_equals_methods_formula():
    x, W, b = make_encoder(20, 32, 200)
    values, indices = ops.topk_encode(x, W, b, 10, backend="reference")
    want_values, want_indices = hand_topk(x, W, b, 10)
    assert torch.equal(indices, want_indices)
    torch.testing.assert_close(values.double(), want_values, rtol=1e-5, atol=1e-6)
    W_dec, b_dec = torch.randn(32, 200), torch.randn(32)
    dense = torch.zeros(20, 200, dtype=torch.float64).scatter(-1, want_indices, want_values)
    want_recon = dense @ W_dec.double().T + b_dec.double()
    for backend in ["reference", "chunked"]:
        recon = ops.sparse_decode(values, indices, W_dec, b_dec, backend=backend)
        torch.testing.assert_close(recon.double(), want_recon, rtol=1e-5, atol=1e-5)


def test_relu_and_card_variant_differ_exactly_when_fewer_than_k_positive():
    x, W, b = make_encoder(64, 16, 40, seed=3)
    b -= 0.3  # about 15 of 40 pre-activations positive: some rows have fewer than k, some more
    k = 12
    relu_values, relu_indices = ops.topk_encode(x, W, b, k, "relu_topk", backend="reference")
    card_values, card_indices = ops.topk_encode(x, W, b, k, "topk", backend="reference")
    n_positive = ((x @ W.T + b) > 0).sum(-1)
    differ = (relu_values != card_values).any(-1)
    assert torch.equal(relu_indices, card_indices)
    assert torch.equal(differ, n_positive < k)
    assert differ.any() and not differ.all()
    assert (card_values[n_positive < k].min(-1).values < 0).all()


def test_reference_tie_rule_is_lower_index_first():
    W = torch.ones(50, 8)
    values, indices = ops.topk_encode(torch.ones(3, 8), W, torch.zeros(50), 7, backend="reference")
    assert torch.equal(indices, torch.arange(7).expand(3, 7))


# -- streaming backends vs reference ------------------------------------------------------------------------------
SHAPES = [  # (n, d_model, d_sae, k)
    (1, 16, 16, 16),     # k = d_sae
    (7, 40, 300, 1),     # k = 1, odd sizes
    (33, 70, 1000, 50),  # sampled threshold active in the Triton backend
    (5, 24, 130, 129),   # k close to d_sae
]


@pytest.mark.parametrize("backend", STREAMING)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_backend_equals_reference(backend, shape, dtype, monkeypatch):
    n, d_model, d_sae, k = shape
    monkeypatch.setattr(chunked, "MIN_TILE", 37)  # several tiles of odd width even at these sizes
    monkeypatch.setattr(chunked, "TILE_ELEMENTS", 37 * n)
    for activation in ops.ACTIVATIONS:
        assert_op_matches_reference("topk_encode", backend, shape, dtype, activation=activation, seed=n)
    assert_op_matches_reference("sparse_decode", backend, shape, dtype, seed=n)
    assert_op_matches_reference("feature_pre_acts", backend, shape, dtype, seed=n)


@pytest.mark.parametrize("backend", ["reference", *STREAMING])
def test_forced_ties_follow_the_documented_rule(backend, monkeypatch):
    # Features come in groups of identical encoder rows; the top-k boundary cuts through a group. Small
    # integers keep every sum exact, so ties are exact whatever the summation order of a backend.
    monkeypatch.setattr(chunked, "MIN_TILE", 8)  # chunked: tiles of 8 columns cut through the groups of 5,
    monkeypatch.setattr(chunked, "TILE_ELEMENTS", 8)  # so later tiles hold values equal to the k-th best so far
    g = torch.Generator().manual_seed(1)
    W = torch.randint(-3, 4, (8, 16), generator=g).float().repeat_interleave(5, dim=0)  # 5g..5g+4 identical
    x = torch.randint(-3, 4, (6, 16), generator=g).float()
    b = torch.zeros(40)
    x, W, b = on(backend, x, W, b)
    values, indices = ops.topk_encode(x, W, b, 7, backend=backend)
    pre = x @ W.T
    for row in range(6):
        order = sorted(range(40), key=lambda f: (-float(pre[row, f]), f))[:7]
        assert indices[row].tolist() == order
    # all pre-activations equal (zero rows, zero bias): the k lowest indices, and ReLU keeps them at 0
    values, indices = ops.topk_encode(x, torch.zeros_like(W), b, 9, backend=backend)
    assert torch.equal(indices.cpu(), torch.arange(9).expand(6, 9)) and not values.any()


@pytest.mark.parametrize("backend", STREAMING)
def test_leading_dims_noncontiguous_and_empty(backend):
    x, W, b = on(backend, *make_encoder(4, 48, 200, lead=(2, 3)))
    x_strided = torch.stack([x, -x], dim=-1).flatten(-2)[..., ::2]  # same values, non-contiguous
    assert torch.equal(x_strided, x) and not x_strided.is_contiguous()
    W_strided = W.T.contiguous().T  # transposed storage
    values, indices = ops.topk_encode(x_strided, W_strided, b, 9, backend=backend)
    want_values, want_indices = ops.topk_encode(x, W, b, 9, backend="reference")
    assert values.shape == (2, 3, 4, 9)
    assert torch.equal(indices, want_indices)
    torch.testing.assert_close(values, want_values)
    empty_values, empty_indices = ops.topk_encode(x[:, :0], W, b, 9, backend=backend)
    assert empty_values.shape == empty_indices.shape == (2, 0, 4, 9)
    W_dec, b_dec = on(backend, torch.randn(48, 200), torch.zeros(48))
    empty_recon = ops.sparse_decode(empty_values, empty_indices, W_dec, b_dec, backend=backend)
    assert empty_recon.shape == (2, 0, 4, 48)


def test_triton_threshold_fallback_rows_stay_exact():
    """Capacity too small for most rows and a sample stride that over-estimates: results are still exact."""
    triton_kernels = dispatch.triton_module()
    x, W, b = on("triton", *make_encoder(30, 32, 2048, seed=5))
    want_values, want_indices = reference.topk_encode(x, W, b, 20, "topk")
    for stride, capacity in [(4, 24), (2, 20), (64, None)]:
        values, indices = triton_kernels.select_topk(x, W, b, 20, sample_stride=stride, capacity=capacity)
        assert torch.equal(indices, want_indices)
        torch.testing.assert_close(values, want_values)


# -- sparse primitives and decode -----------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", STREAMING)
def test_sparse_primitives_match_dense_formulas(backend):
    kernels = ops.backend_kernels(backend)
    g = torch.Generator().manual_seed(0)
    values, rows = torch.randn(9, 5, generator=g), torch.randn(9, 24, generator=g)
    indices = torch.randint(0, 70, (9, 5), generator=g)
    table = torch.randn(70, 24, generator=g)
    values, rows, indices, table = on(backend, values, rows, indices, table)
    dense = values.new_zeros(9, 70).scatter_add(-1, indices, values)  # repeated indices add up
    torch.testing.assert_close(kernels.gather_sum(values, indices, table).float(), dense @ table)
    torch.testing.assert_close(kernels.gather_dot(indices, table, rows), (table[indices] * rows[:, None]).sum(-1))
    transposed = table.T.contiguous().T  # the decoder's W_dec.T: a non-contiguous table
    torch.testing.assert_close(kernels.gather_dot(indices, transposed, rows), (table[indices] * rows[:, None]).sum(-1))
    half = table.bfloat16(), rows.bfloat16()  # half tables accumulate in fp32
    torch.testing.assert_close(kernels.gather_dot(indices, *half),
                               (half[0][indices].float() * half[1][:, None].float()).sum(-1))
    torch.testing.assert_close(kernels.scatter_outer(values, indices, rows, 70), dense.T @ rows)


@pytest.mark.parametrize("backend", STREAMING)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_sparse_decode_equals_reference(backend, dtype):
    x, W, b = on(backend, *make_encoder(12, 40, 300, dtype=dtype))
    values, indices = ops.topk_encode(x, W, b, 16, backend="reference")
    W_dec, b_dec = on(backend, torch.randn(40, 300).to(dtype), torch.randn(40).to(dtype))
    want = ops.sparse_decode(values, indices, W_dec, b_dec, backend="reference")
    torch.testing.assert_close(ops.sparse_decode(values, indices, W_dec, b_dec, backend=backend), want, **TOL[dtype])
    unchecked = ops.sparse_decode(values, indices, W_dec, b_dec, backend=backend, check_indices=False)
    torch.testing.assert_close(unchecked, want, **TOL[dtype])


# -- autograd -----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", STREAMING)
@pytest.mark.parametrize("activation", ops.ACTIVATIONS)
def test_encode_gradcheck(backend, activation):
    x, W, b = on(backend, *make_encoder(3, 8, 24, dtype=torch.float64, seed=11))
    inputs = tuple(t.clone().requires_grad_() for t in (x, W, b))
    assert torch.autograd.gradcheck(lambda *t: ops.topk_encode(*t, 4, activation, backend=backend)[0], inputs)


@pytest.mark.parametrize("backend", STREAMING)
def test_decode_gradcheck(backend):
    g = torch.Generator().manual_seed(4)
    values = torch.randn(5, 4, dtype=torch.float64, generator=g)
    indices = torch.stack([torch.randperm(16, generator=g)[:4] for _ in range(5)])
    W_dec = torch.randn(8, 16, dtype=torch.float64, generator=g)
    b_dec = torch.randn(8, dtype=torch.float64, generator=g)
    values, indices, W_dec, b_dec = on(backend, values, indices, W_dec, b_dec)
    inputs = tuple(t.clone().requires_grad_() for t in (values, W_dec, b_dec))
    assert torch.autograd.gradcheck(lambda v, w, bd: ops.sparse_decode(v, indices, w, bd, backend=backend), inputs)


@pytest.mark.parametrize("backend", STREAMING)
def test_gradients_equal_reference_autograd(backend):
    x, W, b = on(backend, *make_encoder(10, 24, 120, seed=9))
    W_dec, b_dec, weight = on(backend, torch.randn(24, 120), torch.randn(24), torch.randn(10, 24))
    grads = {}
    for name in ["reference", backend]:
        leaves = [t.clone().requires_grad_() for t in (x, W, b, W_dec, b_dec)]
        values, indices = ops.topk_encode(*leaves[:3], 8, backend=name)
        recon = ops.sparse_decode(values, indices, leaves[3], leaves[4], backend=name)
        (recon * weight).sum().backward()
        grads[name] = [leaf.grad for leaf in leaves]
    for got, want in zip(grads[backend], grads["reference"]):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


def test_feature_pre_acts_uses_selected_rows_and_is_differentiable():
    x, W, b = make_encoder(6, 20, 90)
    rows = torch.tensor([3, 77, 5])
    x.requires_grad_()
    out = ops.feature_pre_acts(x, W[rows], b[rows])
    torch.testing.assert_close(out, x @ W[rows].T + b[rows])
    out.sum().backward()
    torch.testing.assert_close(x.grad, W[rows].sum(0).expand(6, 20))


# -- dispatch and bad input ---------------------------------------------------------------------------------------
def test_dispatch_defaults_env_override_and_errors(monkeypatch):
    cpu = torch.device("cpu")
    monkeypatch.delenv(dispatch.ENV_VAR, raising=False)
    assert dispatch.resolve_backend(None, cpu) == "chunked"
    monkeypatch.setenv(dispatch.ENV_VAR, "reference")
    assert dispatch.resolve_backend(None, cpu) == "reference"
    assert dispatch.resolve_backend("chunked", cpu) == "chunked"  # per call beats the environment
    with pytest.raises(ValueError, match="unknown SAE ops backend 'fast'"):
        dispatch.resolve_backend("fast", cpu)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(dispatch.BackendUnavailableError, match="needs CUDA tensors.*TRITON_INTERPRET=1"):
        dispatch.resolve_backend("triton", cpu)
    assert "triton" not in dispatch.available_backends("cpu")


def test_bad_input_errors():
    x, W, b = make_encoder(3, 16, 64)
    with pytest.raises(ValueError, match="k=0 must be in"):
        ops.topk_encode(x, W, b, 0)
    with pytest.raises(ValueError, match="k=65 must be in"):
        ops.topk_encode(x, W, b, 65)
    with pytest.raises(ValueError, match="d_model=15 but the encoder expects d_model=16"):
        ops.topk_encode(x[:, :15], W, b, 4)
    with pytest.raises(TypeError, match="dtype mismatch"):
        ops.topk_encode(x.double(), W, b, 4)
    with pytest.raises(ValueError, match="device mismatch"):
        ops.topk_encode(x.to("meta"), W, b, 4)
    with pytest.raises(ValueError, match="unknown activation"):
        ops.topk_encode(x, W, b, 4, "jumprelu")
    with pytest.raises(IndexError, match=r"must lie in \[0, d_sae=64\), got \[0, 64\]"):
        ops.sparse_decode(torch.ones(3, 2), torch.tensor([[0, 64]] * 3), torch.zeros(16, 64), torch.zeros(16))
    with pytest.raises(IndexError, match=r"got \[-1, 3\]"):
        ops.sparse_decode(torch.ones(1, 2), torch.tensor([[3, -1]]), torch.zeros(16, 64), torch.zeros(16))


def test_triton_threshold_counts_ties():
    """Sampled pre-activations with many equal values (bf16-like) still give a threshold that the expected number
    of latents exceed: the k-th largest counts ties."""
    triton_kernels = dispatch.triton_module()
    values = on("triton", torch.tensor([[3.0, 3.0, 3.0, 3.0, 2.0, 1.0, 1.0, 0.5]]))
    out = on("triton", torch.empty(1))
    triton_kernels._kth_largest_kernel[(1,)](values, out, 1, 8, 8, 5, ROWS=1, BLOCK=8)
    assert float(out[0]) == 2.0  # the 5th largest with ties, not the 5th distinct value
