"""DeepSpeed ZeRO-3 through transformers' Trainer: 2 CPU processes (gloo) against one process on the same batch.

Skipped without the ``deepspeed`` extra; CI installs it and sets ``QSCOPE_REQUIRE_DEEPSPEED``, so there a missing
DeepSpeed fails the test instead. Costs about 20 s on 2 idle cores once DeepSpeed's small C++ op is built (the
first run builds it: about 45 s).
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytestmark = [pytest.mark.slow, pytest.mark.skipif(
    importlib.util.find_spec("deepspeed") is None and not os.environ.get("QSCOPE_REQUIRE_DEEPSPEED"),
    reason="DeepSpeed is not installed (pip install 'qscope[deepspeed]'); CI installs it and sets "
           "QSCOPE_REQUIRE_DEEPSPEED")]


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> tuple[dict, dict]:
    """``(one process without DeepSpeed, two processes under ZeRO-3)``: what tests/dist_zero3.py measured."""
    script = str(Path(__file__).with_name("dist_zero3.py"))
    root = tmp_path_factory.mktemp("zero3")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).parents[1]),
           "DS_ACCELERATOR": "cpu"}
    one, two = root / "one", root / "two"
    for cmd in ([sys.executable, script, str(one), "all"],
                [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", script,
                 str(two), "all"]):
        result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
        assert result.returncode == 0, result.stderr[-3000:]
    return tuple(json.loads((d / "result.json").read_text()) for d in (one, two))


def assert_same_parameters(got: dict, want: dict, before: dict) -> None:
    assert got.keys() == want.keys() == before.keys() and want
    moved = max(float((torch.tensor(want[name]) - torch.tensor(before[name])).abs().max()) for name in want)
    assert moved > 1e-3  # the step did change them
    for name, weight in want.items():
        torch.testing.assert_close(torch.tensor(got[name]), torch.tensor(weight), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("variant", ["sft-lora", "sft-full"])
def test_sft_with_penalty_and_monitor_under_zero3_equals_one_process(runs, variant):
    """SFTTrainer + the SASFT penalty + the monitor, LoRA or full fine-tuning: the loss, the penalty, the monitor's
    rates and means and the parameters after an SGD step agree with one process; the model is held in ZeRO-3
    shards, the SAE is neither partitioned nor in the optimizer."""
    one, two = (run[variant] for run in runs)
    assert runs[0]["processes"] == 1 and runs[1]["processes"] == 2
    assert one["zero_stage"] is None and two["zero_stage"] == 3 and two["partitioned"]
    assert not two["sae_partitioned"] and not two["sae_in_optimizer"]
    assert two["loss"] == pytest.approx(one["loss"], rel=1e-5)
    assert two["logs"].keys() == one["logs"].keys() >= {"sae/penalty", "sae/L1/f3/rate", "sae/L1/f100/mean"}
    assert one["logs"]["sae/penalty"] > 0
    for key, value in one["logs"].items():
        assert two["logs"][key] == pytest.approx(value, rel=1e-5, abs=1e-8), key
    assert_same_parameters(two["parameters"], one["parameters"], one["before"])


def test_grpo_reward_and_steered_rollouts_under_zero3_equal_one_process(runs):
    """GRPOTrainer with an SAE reward scored by the ZeRO-3-sharded policy and SteeredNegativeRollouts generating
    through TRL's gathered ZeRO-3 generation (greedy): the same rollouts, with the first row of each group steered
    (one repeated token) and the other three identical and unsteered, the same per-row rewards, and the same
    parameters after the step."""
    one, two = (run["grpo"] for run in runs)
    assert two["zero_stage"] == 3 and two["partitioned"]
    ordered = [sorted(run, key=lambda row: (row[0], row[2], row[1])) for run in (one["rollouts"], two["rollouts"])]
    assert [row[:3] for row in ordered[1]] == [row[:3] for row in ordered[0]]
    assert [row[3] for row in ordered[1]] == pytest.approx([row[3] for row in ordered[0]], rel=1e-5)  # SAE reward
    by_prompt: dict[str, list] = {}
    for prompt, ids, steered, _ in one["rollouts"]:
        by_prompt.setdefault(prompt, []).append((steered, ids))
    assert len(by_prompt) == 2
    for group in by_prompt.values():
        assert [steered for steered, _ in group] == [True, False, False, False]
        assert group[1][1] == group[2][1] == group[3][1] != group[0][1]
        assert len(set(group[0][1])) == 1 < len(set(group[1][1]))  # feature 9 at +60 makes it repeat one token
    for key, value in one["logs"].items():
        assert two["logs"][key] == pytest.approx(value, rel=1e-5, abs=1e-7), key
    assert_same_parameters(two["parameters"], one["parameters"], one["before"])
