"""One error family: a walk over the public API's refusals, each a new bad input a user could pass.

Every case must raise a :class:`qscope_hf.QscopeError` subclass that is also the built-in exception existing code
catches, with a message naming the problem; none may hang, pass silently or leave a hook behind.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from datasets import Dataset
from transformers import Trainer

from qscope_hf import (
    ArgumentTypeError,
    CheckpointError,
    ConfigError,
    FeatureIndexError,
    LayerError,
    MissingColumnError,
    MissingFileError,
    OutputExistsError,
    PositionError,
    QscopeError,
    SAEConfig,
    SparseAutoencoder,
    Steering,
    UnknownReleaseError,
    UnsupportedError,
    check_sae_fits,
    enable_steering,
    layer_outputs,
    ops,
    rank_features,
)
from qscope_hf.calibration import calibrate_strength
from qscope_hf.cli import main
from qscope_hf.compat import check_transformers, check_trl
from qscope_hf.demo import run_demo
from qscope_hf.export import bake_steering, export_control_vector, import_control_vector
from qscope_hf.loading import load_texts
from qscope_hf.output_scores import output_scores
from qscope_hf.testing import leaked_hooks
from qscope_hf.tiny import tiny_model, tiny_sae, tiny_tokenizer, write_tiny_release
from qscope_hf.training import TrainConfig
from qscope_hf.vectors import EffectApproximator, fit_effect_approximator, targeted_vector
from qscope_trl import (
    SAEFeatureMonitorCallback,
    SAEFeaturePenalty,
    SAEFeatureReward,
    SteeredNegativeRollouts,
    add_sae_penalty,
    with_sae_penalty,
)


@dataclass
class World:
    model: torch.nn.Module
    llama: torch.nn.Module
    sae: SparseAutoencoder
    tokenizer: object
    tmp: Path


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    model = tiny_model("qwen3")
    enable_steering(model)
    return World(model, tiny_model("llama"), tiny_sae(64, 256, 8, layer=1, seed=3), tiny_tokenizer(),
                 tmp_path_factory.mktemp("bad"))


def generate(w, **kwargs):
    inputs = w.tokenizer(["The cat sat", "Hi"], return_tensors="pt", padding=True)
    return w.model.generate(**inputs, max_new_tokens=2, do_sample=False, **kwargs)


def sidecar_release(w, name, **changes):
    directory = write_tiny_release(w.tmp / name, layers=[2])
    (directory / "layer2.json").write_text(json.dumps({"d_model": 64, "d_sae": 256, "k": 8, **changes}))
    return directory


def control_vector(w, name, tensors):
    path = w.tmp / name
    writer = gguf.GGUFWriter(path, "controlvector")
    for tensor_name, value in tensors.items():
        writer.add_tensor(tensor_name, value)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def write(w, name, content: bytes):
    path = w.tmp / name
    path.write_bytes(content)
    return path


def effect(w):
    weight = torch.randn(64, 256, generator=torch.Generator().manual_seed(0))
    return EffectApproximator(1, weight, torch.randn(256, generator=torch.Generator().manual_seed(1)), 0.5, 32, 0.0)


# (id, call(world), qscope class, built-in class, message pattern)
CASES = [
    ("nan strength", lambda w: Steering(w.sae, 3, float("nan")), ConfigError, ValueError, "finite"),
    ("unknown mode", lambda w: Steering(w.sae, 3, 1.0, mode="bogus"), ConfigError, ValueError,
     "unknown steering mode 'bogus'"),
    ("unknown positions", lambda w: Steering(w.sae, 3, 1.0, positions="middle"), ConfigError, ValueError,
     "unknown positions 'middle'"),
    ("float position", lambda w: Steering(w.sae, 3, 1.0, positions=[1.5]), ArgumentTypeError, TypeError,
     "positions must be one of"),
    ("not an SAE", lambda w: Steering("sae", 3, 1.0), ArgumentTypeError, TypeError, "needs a SparseAutoencoder"),
    ("no feature", lambda w: Steering(w.sae, [], 1.0), ConfigError, ValueError, "at least one feature"),
    ("feature out of range", lambda w: Steering(w.sae, 999, 1.0), FeatureIndexError, IndexError,
     r"feature index 999 is out of range \[0, 256\)"),
    ("float feature id", lambda w: Steering(w.sae, 3.0, 1.0), ArgumentTypeError, TypeError,
     "feature ids must be integers"),
    ("strength count", lambda w: Steering(w.sae, [1, 2], [1.0, 2.0, 3.0]), ConfigError, ValueError,
     "3 strengths for 2 features"),
    ("zero vector", lambda w: Steering.from_vector(torch.zeros(64), 1), ConfigError, ValueError, "not all zeros"),
    ("negative gate threshold", lambda w: Steering(w.sae, 3, 1.0, mode="gated", threshold=-1.0), ConfigError,
     ValueError, "below 0"),
    ("layer out of range", lambda w: Steering(w.sae, 3, 1.0, layer=9).check_fits(w.model), LayerError, IndexError,
     "layer 9 is out of range"),
    ("steering_rows not a list", lambda w: generate(w, steering_rows=Steering(w.sae, 3, 1.0)), ConfigError,
     ValueError, "per-row steering takes a list with one entry per prompt row"),
    ("steering_rows length", lambda w: generate(w, steering_rows=[None]), ConfigError, ValueError,
     "1 per-row steering specs for a batch of 2 prompts"),
    ("position past the sequence", lambda w: generate(w, steering=Steering(w.sae, 3, 1.0, positions=[50])),
     PositionError, IndexError, "position 50 is outside row"),
    ("int8 dtype", lambda w: SparseAutoencoder.from_pretrained(write_tiny_release(w.tmp / "int8", layers=[1]),
                                                               layer=1, k=8, dtype=torch.int8),
     ArgumentTypeError, TypeError, "dtype must be a floating-point torch.dtype"),
    ("bool dtype", lambda w: SparseAutoencoder.from_pretrained(write_tiny_release(w.tmp / "bool", layers=[1]),
                                                               layer=1, k=8, dtype=torch.bool),
     ArgumentTypeError, TypeError, "torch.bool"),
    ("missing SAE source", lambda w: SparseAutoencoder.from_pretrained(w.tmp / "nowhere", layer=1),
     MissingFileError, FileNotFoundError, "neither an existing path nor a hub repo id"),
    ("unknown release", lambda w: SparseAutoencoder.from_pretrained("Qwen/SAE-Res-Qwen3-1.7B-Base-W32K-L0_51",
                                                                    layer=1),
     UnknownReleaseError, KeyError, "unknown Qwen-Scope release"),
    ("sidecar k 0", lambda w: SparseAutoencoder.from_pretrained(sidecar_release(w, "k0", k=0), layer=2),
     CheckpointError, ValueError, r"k0/layer2.json: k=0 must be in \[1, d_sae=256\]"),
    ("sidecar k string", lambda w: SparseAutoencoder.from_pretrained(sidecar_release(w, "kstr", k="8"), layer=2),
     CheckpointError, ValueError, "kstr/layer2.json: k must be an integer, got '8'"),
    ("sidecar activation", lambda w: SparseAutoencoder.from_pretrained(sidecar_release(w, "gelu",
                                                                                     activation="gelu"), layer=2),
     CheckpointError, ValueError, "gelu/layer2.json: unknown activation 'gelu'"),
    ("override k 0", lambda w: SparseAutoencoder.from_pretrained(sidecar_release(w, "ok"), layer=2, k=0),
     ConfigError, ValueError, "with k=0: k=0 must be in"),
    ("wrong d_model", lambda w: w.sae.encode(torch.randn(3, 32)), ConfigError, ValueError,
     "have d_model=32, but this SAE reads d_model=64"),
    ("wrong dtype", lambda w: w.sae.encode(torch.randn(3, 64, dtype=torch.float64)), ArgumentTypeError, TypeError,
     "torch.float64 but the SAE is torch.float32"),
    ("unknown backend", lambda w: ops.topk_encode(torch.randn(2, 64), w.sae.W_enc, w.sae.b_enc, 8,
                                                  backend="bogus"), ConfigError, ValueError,
     "unknown SAE ops backend 'bogus'"),
    ("config d_model 0", lambda w: SAEConfig(d_model=0, d_sae=8, k=2), ConfigError, ValueError,
     "must be positive"),
    ("config float layer", lambda w: SAEConfig(d_model=8, d_sae=8, k=2, layer=1.0), ConfigError, ValueError,
     "layer must be an integer"),
    ("SAE width mismatch", lambda w: check_sae_fits(w.model, tiny_sae(32, 64, 4, layer=1)), ConfigError, ValueError,
     "SAE d_model=32 does not match the model's hidden size 64"),
    ("capture layer 99", lambda w: layer_outputs(w.model, [99], input_ids=torch.tensor([[1, 2]])), LayerError,
     IndexError, "layer 99 is out of range"),
    ("lens_tokens 0", lambda w: output_scores(w.model, w.tokenizer, w.sae, [3], lens_tokens=0, progress=False),
     ConfigError, ValueError, "lens_tokens must be a positive integer"),
    ("vocabulary_size 0", lambda w: output_scores(w.model, w.tokenizer, w.sae, [3], target=["hello"],
                                                  vocabulary_size=0, progress=False),
     ConfigError, ValueError, "vocabulary_size must be a positive integer"),
    ("target token out of vocabulary", lambda w: output_scores(w.model, w.tokenizer, w.sae, [3], target=[-1],
                                                               progress=False),
     ConfigError, ValueError, r"target token index -1 is out of range \[0, 259\)"),
    ("unknown ranking", lambda w: rank_features(by="bogus"), ConfigError, ValueError, "by must be one of"),
    ("calibrating zero strengths", lambda w: calibrate_strength(w.model, w.tokenizer, Steering(w.sae, 3, 0.0)),
     ConfigError, ValueError, "strengths are all zero"),
    ("effect approximator with too few vectors", lambda w: fit_effect_approximator(w.model, w.tokenizer, w.sae,
                                                                                   n_vectors=10),
     ConfigError, ValueError, r"n_vectors=10 must be in \[16, d_sae=256\]"),
    ("effect approximator with two vectors and includes",
     lambda w: fit_effect_approximator(w.model, w.tokenizer, w.sae, n_vectors=2, include=[1, 2, 3]),
     ConfigError, ValueError, "n_vectors=2 must be in"),
    ("more includes than vectors", lambda w: fit_effect_approximator(w.model, w.tokenizer, w.sae, n_vectors=16,
                                                                     include=list(range(20))),
     ConfigError, ValueError, "include lists 20 features but only n_vectors=16"),
    ("nan target weights", lambda w: targeted_vector(effect(w), [1, 2], weights=[float("nan"), 1.0]), ConfigError,
     ValueError, "one finite weight per target feature"),
    ("steer every rollout", lambda w: SteeredNegativeRollouts(Steering(w.sae, 3, 1.0), count=4, num_generations=4),
     ConfigError, ValueError, "leave no unsteered rollout"),
    ("rollout probability", lambda w: SteeredNegativeRollouts(Steering(w.sae, 3, 1.0), probability=1.5),
     ConfigError, ValueError, r"probability must be in \[0, 1\]"),
    ("monitor feature as text", lambda w: SAEFeatureMonitorCallback(w.sae, ["3"]), ArgumentTypeError, TypeError,
     "feature ids must be integers, got \\['3'\\]"),
    ("monitor of a non-SAE", lambda w: SAEFeatureMonitorCallback([w.sae, "sae"], {1: [3]}), ArgumentTypeError,
     TypeError, "takes SparseAutoencoders, got str"),
    ("reward of an unknown reduction", lambda w: SAEFeatureReward(w.model, w.tokenizer, w.sae, [3], reduce="sum"),
     ConfigError, ValueError, "unknown reduction 'sum'"),
    ("reward of an out-of-vocabulary id", lambda w: SAEFeatureReward(w.model, w.tokenizer, w.sae, [3])(
        prompts=["hi"], completions=["x"], completion_ids=[[5, 999]]), ConfigError, ValueError,
     r"token \(prompt and completion 0\) index 999 is out of range \[0, 259\)"),
    ("penalty coef nan", lambda w: SAEFeaturePenalty(w.sae, {"zh": [3]}, coef=float("nan")), ConfigError,
     ValueError, "coef must be a finite number"),
    ("penalty language None", lambda w: SAEFeaturePenalty(w.sae, {"zh": [3]}).check(
        w.model, Dataset.from_dict({"text": ["a", "b"], "language": ["en", None]})), ConfigError, ValueError,
     "a sample has no language"),
    ("penalty without the language column", lambda w: SAEFeaturePenalty(w.sae, {"zh": [3]}).check(
        w.model, Dataset.from_dict({"text": ["a"]})), MissingColumnError, KeyError, "no language column 'language'"),
    ("with_sae_penalty of a dict", lambda w: with_sae_penalty({}), ArgumentTypeError, TypeError,
     "takes a trainer class, got dict"),
    ("with_sae_penalty of a plain Trainer", lambda w: with_sae_penalty(Trainer), ArgumentTypeError, TypeError,
     "extends TRL's SFTTrainer or GRPOTrainer"),
    ("add_sae_penalty to a non-trainer", lambda w: add_sae_penalty(object(), None), ArgumentTypeError, TypeError,
     "got object"),
    ("export into a missing directory", lambda w: export_control_vector(Steering(w.sae, 3, 1.0),
                                                                        w.tmp / "nodir" / "x.gguf", model=w.llama),
     MissingFileError, FileNotFoundError, r"the directory .*nodir does not exist"),
    ("export over an existing file", lambda w: export_control_vector(Steering(w.sae, 3, 1.0),
                                                                     write(w, "exists.gguf", b"x"), model=w.llama),
     OutputExistsError, FileExistsError, "exists: pass overwrite=True"),
    ("control vector with two names for a layer", lambda w: import_control_vector(control_vector(
        w, "dup.gguf", {"direction.1": np.ones(64, np.float32), "direction.01": np.ones(64, np.float32)})),
     CheckpointError, ValueError, "unexpected tensor 'direction.01'"),
    ("control vector of a matrix", lambda w: import_control_vector(control_vector(
        w, "matrix.gguf", {"direction.1": np.ones((2, 64), np.float32)})), CheckpointError, ValueError,
     r"direction.1 has shape .*one 1-D direction per layer"),
    ("all-zero control vector", lambda w: import_control_vector(control_vector(
        w, "zero.gguf", {"direction.2": np.zeros(64, np.float32)})), CheckpointError, ValueError,
     "zero.gguf: direction.2 is all zeros"),
    ("bake None", lambda w: bake_steering(None, Steering(w.sae, 3, 1.0)), ArgumentTypeError, TypeError,
     "needs a transformers model, got NoneType"),
    ("bake without MLP bias", lambda w: bake_steering(w.model, Steering(w.sae, 3, 1.0)), UnsupportedError,
     NotImplementedError, "has no MLP bias"),
    ("malformed jsonl", lambda w: load_texts(write(w, "bad.jsonl", b'{"text": "a"}\n{bad\n')), ConfigError,
     ValueError, "bad.jsonl cannot be read as jsonl"),
    ("binary csv", lambda w: load_texts(write(w, "bin.csv", bytes(range(256)))), ConfigError, ValueError,
     "bin.csv is not UTF-8 text"),
    ("corpus without the column", lambda w: load_texts(write(w, "c.csv", b"body\nhello\n")), MissingColumnError,
     KeyError, "no text column 'text'"),
    ("demo of another model without an SAE", lambda w: run_demo("org/other-model"), ConfigError, ValueError,
     "the shipped SAEs are SmolLM2's: pass --sae"),
    ("demo of an SAE directory with two layers", lambda w: run_demo("tiny-dir", str(write_tiny_release(
        w.tmp / "two", layers=[1, 2]))), ConfigError, ValueError, r"holds SAEs for layers \[1, 2\]: pass --layer"),
    ("train config k 0", lambda w: TrainConfig(layers=[1], k=0), ConfigError, ValueError, "k"),
    ("transformers 4", lambda w: check_transformers("4.57.1"), UnsupportedError, RuntimeError,
     "found transformers 4.57.1"),
    ("TRL 2", lambda w: check_trl("2.0.0"), UnsupportedError, RuntimeError, r"supports trl>=1.16,<2.0"),
]


@pytest.mark.parametrize(("call", "error", "builtin", "message"), [case[1:] for case in CASES],
                         ids=[case[0] for case in CASES])
def test_refusal_is_a_qscope_error_naming_the_problem(world, call, error, builtin, message):
    with pytest.raises(error, match=message) as caught:
        call(world)
    assert isinstance(caught.value, QscopeError) and isinstance(caught.value, builtin)
    assert not leaked_hooks(world.model)


def test_there_are_at_least_forty_cases():
    assert len(CASES) >= 40 and len({case[0] for case in CASES}) == len(CASES)


def run_cli(capsys, *argv):
    with pytest.raises(SystemExit) as exited:
        main(list(argv))
    assert exited.value.code == 1
    return capsys.readouterr().err.strip().splitlines()[-1]


def test_command_line_errors_name_the_problem(tmp_path, capsys):
    corpus = tmp_path / "a.txt"
    corpus.write_text("hello world\nthe sea\n")
    (tmp_path / "scores.json").write_text("{not json")
    error = run_cli(capsys, "analyze", "--benchmarks", str(corpus), "--scores", str(tmp_path / "scores.json"),
                    "--out", str(tmp_path / "r.html"))
    assert "--scores" in error and "is not valid JSON" in error
    (tmp_path / "x.gguf").write_bytes(b"x")
    error = run_cli(capsys, "export", "--feature", "3", "--strength", "1", "--out", str(tmp_path / "x.gguf"))
    assert "exists: pass --overwrite" in error
    error = run_cli(capsys, "discover", "--model", str(tmp_path / "no-model"), "--a", str(corpus), "--b",
                    str(corpus))
    assert "no model directory" in error and "no-model" in error
    binary = tmp_path / "b.txt"
    binary.write_bytes(bytes(range(128, 256)))
    assert "b.txt is not UTF-8 text" in run_cli(capsys, "discover", "--a", str(binary), "--b", str(corpus))


def test_calibration_texts_follow_text_column(tmp_path, capsys):
    calibration = tmp_path / "calib.csv"
    calibration.write_text("body\n" + "\n".join(["the weather is mild today", "a short note about lunch"] * 3))
    args = ["steer", "--prompt", "Hi", "--feature", "3", "--auto-strength", "--calibration-texts", str(calibration),
            "--max-new-tokens", "2"]
    assert "calib.csv: no text column 'text'" in run_cli(capsys, *args)
    # with --text-column the texts are read and calibrated on (the tiny random model's near-uniform logits do not
    # respond to steering, so the calibration itself then reports that: it ran on the texts)
    assert "raise the cross-entropy by only" in run_cli(capsys, *args, "--text-column", "body")


def test_renamed_arguments_warn_at_the_callers_line_and_refuse_both_names():
    from qscope_hf.tiny import tiny_model, tiny_sae, tiny_tokenizer
    from qscope_hf.training import evaluate_saes
    from qscope_trl import SAEFeatureMonitorCallback, SAEFeaturePenalty, SAEFeatureReward

    model, tokenizer, sae = tiny_model("qwen3"), tiny_tokenizer(), tiny_sae(layer=1)
    shims = [  # (old call, both names, the value the new name gets)
        (lambda: SAEFeaturePenalty(sae, {"zh": [3]}, lam=0.25), lambda: SAEFeaturePenalty(sae, {"zh": [3]}, lam=0.25,
                                                                                            coef=0.1),
         lambda made: made.coef == 0.25),
        (lambda: SAEFeatureReward(model, tokenizer, sae, [3], weight=2.0),
         lambda: SAEFeatureReward(model, tokenizer, sae, [3], weight=2.0, coef=3.0), lambda made: made.coef == 2.0),
        (lambda: SAEFeatureMonitorCallback(sae, [3], every=5), lambda: SAEFeatureMonitorCallback(sae, [3], every=5,
                                                                                                  log_every=2),
         lambda made: made.log_every == 5),
        (lambda: evaluate_saes(model, tokenizer, [sae], ["one two three"], context_length=8),
         lambda: evaluate_saes(model, tokenizer, [sae], ["one two three"], context_length=8, max_length=16),
         lambda made: made[1].tokens == 7),  # truncated at 8 tokens, the first left out
    ]
    for old, both, check in shims:
        with pytest.warns(FutureWarning, match=r"\.\.\.\) is now ") as record:
            made = old()
        assert check(made)
        assert [w.filename for w in record if w.category is FutureWarning] == [__file__]  # the user's line
        with pytest.raises(ConfigError, match="pass .*= only"):
            both()


def test_plots_without_matplotlib_name_the_extra(tmp_path, monkeypatch):
    import sys

    from qscope_hf.analysis import CoverageCurve, plot_coverage
    from qscope_hf.errors import MissingDependencyError

    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)  # what an environment without matplotlib gives
    curve = CoverageCurve(n=[1, 2], mean=[0.5, 1.0], low=[0.5, 1.0], high=[0.5, 1.0])
    with pytest.raises(MissingDependencyError, match=r"pip install 'qscope\[plots\]'"):
        plot_coverage({"a": curve}, tmp_path / "c.png")
