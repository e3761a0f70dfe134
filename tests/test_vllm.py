"""Steering inside vLLM: runs tests/vllm_engine.py in vLLM's own environment and reports each of its tests here.

vLLM pins its own transformers, so it lives in a second virtual environment (``bash .ci/vllm-env`` builds
``.venv-vllm``; ``QSCOPE_VLLM_PYTHON`` names another interpreter). Skipped without it; CI builds it and sets
``QSCOPE_REQUIRE_VLLM``, so there a missing environment fails instead. About 2 minutes on 2 idle cores (three
engines start: SmolLM2 eager, a tiny Qwen3 eager and compiled, one in its own process).
"""

from __future__ import annotations

import ast
import os
import subprocess
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[1]
SCRIPT = Path(__file__).with_name("vllm_engine.py")
PYTHON = Path(os.environ.get("QSCOPE_VLLM_PYTHON", ROOT / ".venv-vllm" / "bin" / "python"))
TESTS = [node.name for node in ast.parse(SCRIPT.read_text()).body
         if isinstance(node, ast.FunctionDef) and node.name.startswith("test_")]

pytestmark = [pytest.mark.slow, pytest.mark.skipif(
    not PYTHON.exists() and not os.environ.get("QSCOPE_REQUIRE_VLLM"),
    reason=f"no vLLM environment at {PYTHON} (bash .ci/vllm-env builds it); CI builds it and sets "
           f"QSCOPE_REQUIRE_VLLM")]


@pytest.fixture(scope="module")
def outcomes(tmp_path_factory) -> dict[str, list[tuple[str, str]]]:
    """``{test function: [(case, failure text or "")]}`` from one run of tests/vllm_engine.py under vLLM."""
    assert PYTHON.exists(), f"no vLLM environment at {PYTHON}: run bash .ci/vllm-env"
    report = tmp_path_factory.mktemp("vllm") / "report.xml"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    result = subprocess.run([str(PYTHON), "-m", "pytest", "-q", "-p", "no:cacheprovider", str(SCRIPT),
                             f"--junitxml={report}"], cwd=ROOT, env=env, capture_output=True, text=True,
                            timeout=1200)
    assert report.exists(), (result.stdout + result.stderr)[-4000:]
    found: dict[str, list[tuple[str, str]]] = {}
    for case in ET.parse(report).iter("testcase"):
        name = case.get("name", "")
        problems = [element.text or element.get("message", "") for element in case
                    if element.tag in ("failure", "error", "skipped")]
        found.setdefault(name.split("[")[0], []).append((name, "\n".join(problems)))
    return found


@pytest.mark.parametrize("test", TESTS)
def test_in_vllm(outcomes, test):
    cases = outcomes.get(test)
    assert cases, f"{test} did not run under vLLM"
    failed = [f"{name}:\n{text[-3000:]}" for name, text in cases if text]
    assert not failed, "\n\n".join(failed)
