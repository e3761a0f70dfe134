"""The effect studies of ``benchmarks/effects`` in their quick mode, on SmolLM2 with the shipped SAEs (slow).

Each script runs as a user runs it (``--quick --no-write``, results into a temporary directory) and the test checks
the direction of its effect, not its size: quick runs use a dozen prompts and a few optimizer steps.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from qscope_hf.testing import needs_smollm2

EFFECTS = Path(__file__).resolve().parents[1] / "benchmarks" / "effects"

pytestmark = [pytest.mark.slow, needs_smollm2()]


def assert_png(path: Path) -> None:
    """A readable PNG of a plot's size, not blank."""
    import matplotlib.image

    pixels = matplotlib.image.imread(path)
    assert pixels.ndim == 3 and min(pixels.shape[:2]) >= 200 and float(pixels[..., :3].std()) > 0.01


def run_quick(script: str, results: Path, *options: str) -> dict:
    subprocess.run([sys.executable, str(EFFECTS / f"{script}.py"), "--quick", "--no-write", "--results",
                    str(results), *options], check=True, cwd=EFFECTS)
    return json.loads((results / f"effects_{script}_quick.json").read_text())


def test_steering_towards_french(tmp_path):
    record = run_quick("steering", tmp_path)
    french = record["concepts"]["French"]
    conditions = french["conditions"]
    methods = ["SAE feature by contrast", "SAE feature by output score", "SAE-TS targeted vector",
               "difference of means", "random feature"]
    for method in methods:
        for setting in ("", " + prompt"):
            for kind in ("calibrated", "dev-best"):
                assert f"{method}{setting}, {kind}" in conditions
        assert 0 < french["calibrated"][method] < 5  # a relative strength within the loss budget
    assert conditions["prompt only"]["concept"] > conditions["unsteered"]["concept"]
    assert conditions["difference of means, dev-best"]["concept"] > conditions["unsteered"]["concept"]
    for name, condition in conditions.items():  # headline = concept and no loop and on topic, per answer
        parts = (condition["concept"], 1 - condition["loops"], condition["on_topic"])
        assert sum(parts) - 2 - 1e-9 <= condition["headline"] <= min(parts) + 1e-9, name
    assert record["timing"]["effect_approximator_s"] > 0
    assert_png(tmp_path / "effects_steering_sweep_quick.png")


def test_classifier_beats_chance(tmp_path):
    record = run_quick("classifier", tmp_path)
    assert all(f1 > 0.5 for f1 in record["f1"].values()), record["f1"]
    assert [point["fraction"] for point in record["curve"]] == [0.1, 0.25, 0.5, 1.0]


def test_sasft_lowers_english_features(tmp_path):
    # the paper's recipe on the mixed-language set: SAEs trained on the last two layers (cached under tmp_path)
    record = run_quick("sasft", tmp_path, "--lams", "0.1", "--cache", str(tmp_path / "cache"))
    assert record["layers"] == [28, 29]
    assert all(len(features) == 2 for features in record["features"].values())  # top-2 per layer
    assert 0 < record["train_french"] < record["train_size"] / 2  # mostly English, some French
    summary = record["summary"]
    plain, penalised = summary["lora: plain SFT"], summary["lora: SASFT λ=0.1"]
    assert penalised["english_feature_excess"]["mean"] < plain["english_feature_excess"]["mean"]
    assert record["runs"]["lora: SASFT λ=0.1"][0]["penalty_log"]  # the aux loss reached the trainer's logs
    assert abs(penalised["loss_change"]) < 0.05
    assert_png(tmp_path / "effects_sasft_lambda_quick.png")
    # resuming checks that it builds the same data (the base model's answers) and keeps the runs it finds: the run
    # marked here comes back marked, so it was not trained again
    record["runs"]["lora: plain SFT"][0]["kept"] = True
    (tmp_path / "effects_sasft_quick.json").write_text(json.dumps(record))
    resumed = run_quick("sasft", tmp_path, "--lams", "0.1", "--cache", str(tmp_path / "cache"), "--resume")
    assert resumed["runs"] == record["runs"]
    assert "resumed" in resumed["provenance"]


@pytest.mark.parametrize(("script", "option", "value"), [("sasft", "--epochs", "0"), ("sasft", "--lams", "nan"),
                                                      ("sasft", "--sae-tokens", "-5"), ("repetition", "--steps", "0")])
def test_effect_scripts_refuse_counts_and_coefficients_that_are_not_positive(script, option, value):
    done = subprocess.run([sys.executable, str(EFFECTS / f"{script}.py"), "--quick", option, value], cwd=EFFECTS,
                          capture_output=True, text=True)
    assert done.returncode == 2
    assert f"argument {option}: must be finite and > 0, got {value}" in done.stderr


def test_sasft_p_value_matches_a_hand_computed_z_test(monkeypatch):
    monkeypatch.syspath_prepend(str(EFFECTS))
    from sasft import fewer_p_value

    # 10 of 100 code-switched against plain SFT's 20 of 100: pooled 0.15, standard error sqrt(0.15 · 0.85 · 0.02)
    # = 0.050498, z = 0.1 / 0.050498 = 1.98030, one-sided p = 0.02384
    assert fewer_p_value(10, 100, 20, 100) == pytest.approx(0.02384, abs=1e-5)
    assert fewer_p_value(20, 100, 10, 100) == pytest.approx(1 - 0.02384, abs=1e-5)  # more, not fewer
    assert fewer_p_value(7, 72, 7, 72) == pytest.approx(0.5)
    assert fewer_p_value(0, 72, 0, 72) == 1.0  # nothing to reduce


def test_repetition_grpo_runs_every_condition(tmp_path):
    record = run_quick("repetition", tmp_path)
    summary = record["summary"]
    assert set(summary) == {"before training", "vanilla GRPO", "SAE-penalty reward", "steered negative rollout",
                            "both"}
    before = summary["before training"]["loop_perplexity"]["mean"]
    # the steered negative is a looping rollout scored low, so training moves the policy away from loops
    for name in ("steered negative rollout", "both"):
        assert summary[name]["loop_perplexity"]["mean"] > before
