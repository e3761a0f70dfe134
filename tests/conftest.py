"""Shared fixtures: tiny seeded models of every family, the byte tokenizer, tiny SAEs on disk, a fake hub cache.

Runs offline (``HF_HUB_OFFLINE=1``). Without CUDA, Triton kernels run in Triton's CPU interpreter; the
variable must be set before qscope imports its kernels, hence at the top of this file.
"""

from __future__ import annotations

import os

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

from qscope_hf.tiny import FAMILIES  # noqa: E402


@pytest.fixture(scope="session")
def tokenizer():
    from qscope_hf.tiny import tiny_tokenizer

    return tiny_tokenizer()


@pytest.fixture(scope="session", params=FAMILIES)
def any_model(request):
    """One tiny model per family (session-scoped: tests must not modify it)."""
    from qscope_hf.tiny import tiny_model

    return tiny_model(request.param)


@pytest.fixture(scope="session")
def qwen3():
    from qscope_hf.tiny import tiny_model

    return tiny_model("qwen3")


@pytest.fixture(scope="session")
def tiny_release(tmp_path_factory) -> Path:
    """A local directory laid out exactly like a Qwen-Scope hub repo, for the tiny Qwen3 (4 layers, d=64)."""
    from qscope_hf.tiny import write_tiny_release

    return write_tiny_release(tmp_path_factory.mktemp("release") / "SAE-Res-tiny-W256-L0_8", k=8)
