"""The demo and the examples run offline, as a newcomer would run them."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from qscope_hf.cli import main
from qscope_hf.testing import needs_smollm2

ROOT = Path(__file__).resolve().parents[1]


def test_demo_prints_features_and_reconstruction_error(capsys):
    main(["demo", "--model", "tiny", "--prompt", "hi there", "--layer", "2"])
    out = capsys.readouterr().out
    assert "layer 2: top 3 of k=8 active features per token" in out
    assert out.count("#") >= 3 * len("hi there")
    assert "fraction of variance unexplained" in out


def run_example_with(argv: list[str]) -> str:
    result = subprocess.run([sys.executable, str(ROOT / "examples" / argv[0]), *argv[1:]], capture_output=True,
                            text=True, timeout=600, env={**os.environ, "HF_HUB_OFFLINE": "1"}, cwd=ROOT)
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


def run_example(name: str) -> str:
    return run_example_with([name])


@pytest.mark.slow
def test_quickstart_example():
    out = run_example("quickstart.py")
    assert "features of the last token" in out and "relative reconstruction error" in out


@pytest.mark.slow
def test_steer_generate_example():
    out = run_example("steer_generate.py")
    assert "| layer | feature |" in out and "unsteered:" in out and "steered:" in out


@pytest.mark.slow
@pytest.mark.parametrize("name, expected", [
    ("sft_monitor_callback.py", "of completion tokens"),
    ("lora_sasft.py", "Chinese features per layer"),
    ("grpo_sae_reward.py", "SAE reward"),
    ("grpo_steered_negatives.py", "steered rows: [0, 4]"),
])
def test_trl_examples(name, expected):
    assert expected in run_example(name)


@pytest.mark.slow
@needs_smollm2()
def test_export_steering_example(tmp_path):
    out = run_example_with(["export_steering.py", str(tmp_path)])
    assert "direction.15" in out and "same tokens: True" in out
    assert (tmp_path / "french.gguf").stat().st_size > 0 and (tmp_path / "smollm2-french" / "config.json").exists()


def test_demo_questions_a_base_model_without_a_chat_template_and_finds_the_only_layer(tmp_path):
    from qscope_hf.demo import _only_layer, question_ids
    from qscope_hf.tiny import tiny_tokenizer, write_tiny_release

    chat = tiny_tokenizer()
    base = tiny_tokenizer()
    base.chat_template = None
    assert chat.decode(question_ids(chat, "Hi?")) == "<|im_start|>user\nHi?<|im_end|>\n<|im_start|>assistant\n"
    assert base.decode(question_ids(base, "Hi?")) == "Question: Hi?\nAnswer:"
    assert _only_layer(str(write_tiny_release(tmp_path, layers=[2]))) == 2
