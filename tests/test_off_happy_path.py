"""Off the happy path: threads, torch.compile, PEFT, copies, non-finite weights. Each test failed before its fix.

References are independent: sequential single-thread runs, the eager model, hand-written hooks, hand formulas.
"""

from __future__ import annotations

import copy
import os
import stat
import threading

import numpy as np
import pytest
import torch
from datasets import Dataset
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM, TrainerControl, TrainerState
from trl import SFTConfig, SFTTrainer

from qscope_hf import (
    CheckpointError,
    ConfigError,
    SAELogitsProcessor,
    SparseAutoencoder,
    Steering,
    SteeringNotActiveError,
    UnsupportedError,
    decoder_layers,
    enable_steering,
    steered,
)
from qscope_hf.atomic import atomic_write_text
from qscope_hf.export import bake_steering, export_control_vector
from qscope_hf.testing import leaked_hooks
from qscope_hf.tiny import tiny_model, tiny_sae, tiny_tokenizer
from qscope_hf.vectors import EffectApproximator, targeted_vector
from qscope_trl import SAEFeatureMonitorCallback, SAEFeaturePenalty, with_sae_penalty

LAYER = 1
PROMPTS = ["The cat sat", "Hi"]


@pytest.fixture(scope="module")
def sae():
    return tiny_sae(64, 256, 8, layer=LAYER, seed=3)


def hand_added(model, ids, vector, layer=LAYER):
    """Logits with ``vector`` added to ``layer``'s output by a hand-written hook (the independent reference)."""
    handle = decoder_layers(model)[layer].register_forward_hook(lambda m, i, out: out + vector)
    try:
        with torch.no_grad():
            return model(input_ids=ids).logits
    finally:
        handle.remove()


# -- threads ----------------------------------------------------------------------------------------------------------
def test_two_steering_threads_and_a_plain_thread_match_their_sequential_runs(sae):
    model, tokenizer = tiny_model("qwen3"), tiny_tokenizer()
    enable_steering(model)
    inputs = tokenizer(PROMPTS, return_tensors="pt", padding=True)
    specs = {"a": Steering(sae, [3, 5], 8.0), "b": Steering(sae, 7, -6.0, positions="prompt"), "plain": None}

    def generate(spec):
        return model.generate(**inputs, max_new_tokens=10, do_sample=False, steering=spec)

    references = {name: generate(spec) for name, spec in specs.items()}  # one thread, one call at a time
    assert not torch.equal(references["a"], references["plain"]) and not torch.equal(references["b"],
                                                                                      references["plain"])
    wrong, errors = [], []
    start = threading.Barrier(len(specs))

    def worker(name):
        try:
            start.wait()
            for _ in range(6):
                if not torch.equal(generate(specs[name]), references[name]):
                    wrong.append(name)
        except Exception as error:  # noqa: BLE001 - reported below
            errors.append(error)

    threads = [threading.Thread(target=worker, args=(name,)) for name in specs]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors and not wrong, (errors, wrong)
    assert not leaked_hooks(model)


def test_a_steered_block_does_not_reach_another_threads_forward(sae):
    model = tiny_model("qwen3")
    ids = torch.tensor([[5, 6, 7, 8]])
    with torch.no_grad():
        plain = model(input_ids=ids).logits
    seen = {}
    inside, release = threading.Event(), threading.Event()

    def other():
        inside.wait()
        with torch.no_grad():
            seen["logits"] = model(input_ids=ids).logits
        release.set()

    thread = threading.Thread(target=other)
    thread.start()
    with torch.no_grad(), steered(model, Steering(sae, 3, 9.0)):
        inside.set()
        release.wait()
        mine = model(input_ids=ids).logits
    thread.join()
    torch.testing.assert_close(seen["logits"], plain, rtol=0, atol=0)
    torch.testing.assert_close(mine, hand_added(model, ids, 9.0 * sae.W_dec[:, 3].detach()), rtol=1e-5, atol=1e-5)


# -- torch.compile ----------------------------------------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.parametrize("backend", ["eager", "inductor"])
def test_steering_a_compiled_model_after_its_first_call(backend, sae):
    model = tiny_model("qwen3")
    ids = torch.tensor([[5, 6, 7, 8, 9], [1, 2, 3, 4, 5]])
    vector = 6.0 * sae.W_dec[:, 3].detach()
    expected = hand_added(model, ids, vector)
    compiled = torch.compile(model, backend=backend)
    with torch.no_grad():
        plain = compiled(input_ids=ids).logits  # traced without hooks
        with steered(compiled, Steering(sae, 3, 6.0)):
            steered_logits = compiled(input_ids=ids).logits
        after = compiled(input_ids=ids).logits
    torch.testing.assert_close(steered_logits, expected, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(after, plain, rtol=0, atol=0)
    assert type(compiled.forward).__name__ != "_EagerInBlocks" and not leaked_hooks(model)


@pytest.mark.slow
def test_steering_models_compiled_in_place_and_compiled_layers(sae):
    ids = torch.tensor([[5, 6, 7, 8, 9]])
    vector = 6.0 * sae.W_dec[:, 3].detach()
    for target in ("model", "layer"):
        model = tiny_model("qwen3")
        expected = hand_added(model, ids, vector)
        (model if target == "model" else decoder_layers(model)[LAYER]).compile(backend="eager")
        with torch.no_grad():
            plain = model(input_ids=ids).logits
            with steered(model, Steering(sae, 3, 6.0)):
                got = model(input_ids=ids).logits
            torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
            torch.testing.assert_close(model(input_ids=ids).logits, plain, rtol=0, atol=0)
        spec = Steering(sae, [3, 5], 6.0)
        eager = enable_steering(tiny_model("qwen3")).generate(input_ids=ids, max_new_tokens=6, do_sample=False,
                                                              steering=spec)
        assert torch.equal(enable_steering(model).generate(input_ids=ids, max_new_tokens=6, do_sample=False,
                                                           steering=spec), eager)


@pytest.mark.slow
def test_monitor_refuses_a_model_compiled_before_its_hooks_and_counts_when_compiled_after(tmp_path, sae):
    def trainer(model, monitor, compile_model):
        data = Dataset.from_dict({"prompt": ["Say hi: ", "Count: "], "completion": ["hello there", "one two"]})
        args = SFTConfig(output_dir=str(tmp_path), per_device_train_batch_size=2, max_steps=1, learning_rate=0.0,
                         use_cpu=True, bf16=False, report_to="none", logging_steps=1, save_strategy="no",
                         gradient_checkpointing=False, torch_compile=compile_model, torch_compile_backend="eager")
        return SFTTrainer(model=model, args=args, train_dataset=data, processing_class=tiny_tokenizer(),
                          callbacks=[monitor])

    def logged(compile_model):
        run = trainer(tiny_model("qwen3"), SAEFeatureMonitorCallback(sae, [3, 9], log_every=1), compile_model)
        run.train()  # torch_compile=True compiles at train(), after the monitor added its hooks: they are traced
        return next(entry for entry in run.state.log_history if "loss" in entry)

    eager, compiled_logs = logged(False), logged(True)
    keys = [f"sae/L1/f{feature}/{stat}" for feature in (3, 9) for stat in ("rate", "mean")]
    assert [compiled_logs[key] for key in keys] == pytest.approx([eager[key] for key in keys], abs=1e-6)
    assert any(eager[key] for key in keys)
    # The silent case: a graph traced before the hooks existed, called again with the same arguments (Dynamo does
    # not guard on hooks). The monitor notices at the step's end that no training forward reached it.
    model = tiny_model("qwen3").train()
    compiled = torch.compile(model, backend="eager")
    ids = torch.tensor([[5, 6, 7, 8]])
    compiled(input_ids=ids, labels=ids)
    monitor = SAEFeatureMonitorCallback(sae, [3, 9], log_every=1)
    state, control = TrainerState(), TrainerControl()
    monitor.on_train_begin(None, state, control, model=compiled)
    compiled(input_ids=ids, labels=ids)
    state.global_step = 1
    with pytest.raises(UnsupportedError, match="saw no training forward in this step: its hooks did not run"):
        monitor.on_step_end(None, state, control)
    monitor.close()
    assert not leaked_hooks(model)


@pytest.mark.slow
def test_penalty_under_torch_compile_equals_eager(tmp_path, sae):
    data = Dataset.from_dict({"prompt": ["Say hi: ", "Count: "], "completion": ["hello there", "one two"],
                              "language": ["en", "en"]})
    penalty = SAEFeaturePenalty(sae, {"zh": [3, 9, 100]}, coef=1.0, language_column=None)
    values = []
    for compile_model in (False, True):
        args = SFTConfig(output_dir=str(tmp_path), per_device_train_batch_size=2, max_steps=1, learning_rate=0.0,
                         use_cpu=True, bf16=False, report_to="none", logging_steps=1, save_strategy="no",
                         torch_compile=compile_model, torch_compile_backend="eager")
        model = tiny_model("qwen3")
        if compile_model:  # compiled and called before the penalty's hooks exist
            torch.compile(model, backend="eager")(input_ids=torch.tensor([[5, 6, 7]]))
        run = with_sae_penalty(SFTTrainer)(model=model, args=args, train_dataset=data,
                                           processing_class=tiny_tokenizer(), sae_penalty=penalty)
        run.train()
        values.append(next(e for e in run.state.log_history if "sae/penalty" in e)["sae/penalty"])
    assert values[0] > 0 and values[1] == pytest.approx(values[0], rel=1e-5)


# -- PEFT and copies --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("targets", [["q_proj"], ["down_proj"]])
def test_bake_steering_on_a_peft_model_merges_its_adapters(tmp_path, targets, sae):
    llama = tiny_model("llama")
    peft_model = get_peft_model(llama, LoraConfig(target_modules=targets, init_lora_weights=False))
    spec = Steering(sae, [3, 5], [4.0, -2.0])
    ids = torch.tensor([[5, 6, 7, 8, 9]])
    with torch.no_grad(), steered(peft_model, spec):
        want = peft_model(input_ids=ids).logits
    bake_steering(peft_model, spec).save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=ids).logits, want, rtol=1e-4, atol=1e-4)


def test_copies_made_inside_a_steered_block_are_not_steered(sae):
    llama = tiny_model("llama")
    ids = torch.tensor([[5, 6, 7, 8]])
    spec = Steering(sae, 3, 6.0, layer=0)  # baking may steer layer 0 (only llama.cpp files cannot)
    with torch.no_grad():
        plain = llama(input_ids=ids).logits
        with steered(llama, spec):
            steered_logits = llama(input_ids=ids).logits
            copied = copy.deepcopy(llama)
            baked = bake_steering(llama, spec)
            inside_copy = copied(input_ids=ids).logits
            inside_baked = baked(input_ids=ids).logits
        torch.testing.assert_close(inside_copy, plain, rtol=0, atol=0)
        torch.testing.assert_close(inside_baked, steered_logits, rtol=1e-5, atol=1e-5)  # steered once, not twice
        torch.testing.assert_close(copied(input_ids=ids).logits, plain, rtol=0, atol=0)
    assert not leaked_hooks(copied) and not leaked_hooks(baked) and not leaked_hooks(llama)


def test_a_processor_reaching_a_loop_it_does_not_steer_raises(sae):
    model, other, tokenizer = tiny_model("qwen3"), tiny_model("qwen3", seed=1), tiny_tokenizer()
    processor = SAELogitsProcessor(model, Steering(sae, 3, 8.0))
    inputs = tokenizer(PROMPTS, return_tensors="pt", padding=True)
    with pytest.raises(SteeringNotActiveError, match="would be silently off"):
        other.generate(**inputs, max_new_tokens=3, logits_processor=[processor])
    model.generate(**inputs, max_new_tokens=3, logits_processor=[processor])  # the model it was built for steers
    assert not leaked_hooks(model) and not leaked_hooks(other)


# -- bad weights and numerics -----------------------------------------------------------------------------------------
@pytest.mark.parametrize(("tensor", "value"), [("W_enc", float("nan")), ("b_enc", float("nan")),
                                               ("W_dec", float("inf")), ("b_dec", float("-inf"))])
def test_non_finite_checkpoints_are_refused_naming_file_and_tensor(tmp_path, tensor, value):
    sae = tiny_sae(64, 256, 8, layer=2)
    weights = {name: getattr(sae, name).detach().contiguous().clone() for name in ("W_enc", "W_dec", "b_enc", "b_dec")}
    weights[tensor].view(-1)[7] = value
    torch.save(weights, tmp_path / "layer2.sae.pt")
    with pytest.raises(CheckpointError, match=rf"layer2.sae.pt: {tensor} has 1 non-finite values"):
        SparseAutoencoder.from_pretrained(tmp_path, layer=2, k=8)


def test_meta_tensor_checkpoints_are_refused(tmp_path):
    sae = tiny_sae(64, 256, 8, layer=2)
    torch.save({name: torch.empty_like(getattr(sae, name), device="meta") for name in
                ("W_enc", "W_dec", "b_enc", "b_dec")}, tmp_path / "layer2.sae.pt")
    with pytest.raises(CheckpointError, match="layer2.sae.pt"):
        SparseAutoencoder.from_pretrained(tmp_path, layer=2, k=8)


def test_a_non_finite_vector_is_never_exported(tmp_path, sae):
    broken = copy.deepcopy(sae)
    with torch.no_grad():
        broken.W_dec[5, 3] = float("nan")
    with pytest.raises(ConfigError, match="layer 1 has non-finite values"):
        export_control_vector(Steering(broken, 3, 2.0), tmp_path / "x.gguf", model=tiny_model("llama"))
    assert list(tmp_path.iterdir()) == []


def test_targeted_vector_never_returns_nan():
    generator = torch.Generator().manual_seed(0)
    weight = torch.randn(8, 16, generator=generator)
    approximator = EffectApproximator(LAYER, weight, weight[0].clone(), 0.5, 32, 0.0)  # bias = row 0's effect
    vector = targeted_vector(approximator, [2, 5], weights=[1.0, -0.5])
    assert bool(vector.isfinite().all()) and float(vector.norm()) == pytest.approx(1.0, abs=1e-5)
    with pytest.raises(ConfigError, match="not all zero"):
        targeted_vector(approximator, [2, 5], weights=[0.0, 0.0])
    with pytest.raises(ConfigError, match="points along the generic steering effect"):
        targeted_vector(EffectApproximator(LAYER, weight, torch.eye(16)[3], 0.5, 32, 0.0), [3])
    with pytest.raises(TypeError, match="target feature ids must be integers"):
        targeted_vector(approximator, [2.7])


def test_monitors_with_their_own_prefix_watch_two_saes_of_one_layer(tmp_path, sae):
    other = tiny_sae(64, 128, 8, layer=LAYER, seed=9)
    with pytest.raises(ConfigError, match="one monitor per SAE with different prefix="):
        SAEFeatureMonitorCallback([sae, other], {LAYER: [3]})
    with pytest.raises(ConfigError, match="reads one SAE per layer"):
        SAEFeaturePenalty([sae, other], {"zh": [3]})
    monitors = [SAEFeatureMonitorCallback(sae, [3], log_every=1, prefix="wide"),
                SAEFeatureMonitorCallback(other, [3], log_every=1, prefix="narrow")]
    data = Dataset.from_dict({"prompt": ["Say hi: "] * 2, "completion": ["hello there", "one two"]})
    args = SFTConfig(output_dir=str(tmp_path), per_device_train_batch_size=2, max_steps=1, learning_rate=0.0,
                     use_cpu=True, bf16=False, report_to="none", logging_steps=1, save_strategy="no")
    trainer = SFTTrainer(model=tiny_model("qwen3"), args=args, train_dataset=data,
                         processing_class=tiny_tokenizer(), callbacks=monitors)
    trainer.train()
    logs = next(entry for entry in trainer.state.log_history if "loss" in entry)
    assert {"wide/L1/f3/rate", "narrow/L1/f3/rate"} <= set(logs)


def test_saved_files_are_atomic_and_follow_the_umask(tmp_path, sae):
    previous = os.umask(0o022)
    try:
        sae.save_pretrained(tmp_path / "sae")
        path = export_control_vector(Steering(sae, 3, 2.0), tmp_path / "x.gguf", model=tiny_model("llama"))
    finally:
        os.umask(previous)
    for file in [path, *(tmp_path / "sae").iterdir()]:
        assert stat.S_IMODE(file.stat().st_mode) == 0o644, file
    target = tmp_path / "kept.json"
    atomic_write_text(target, "old")

    def half_written(temporary):
        temporary.write_text("ne")
        raise OSError("disk full")

    from qscope_hf.atomic import atomic_write

    with pytest.raises(OSError, match="disk full"):
        atomic_write(target, half_written)
    assert target.read_text() == "old" and sorted(p.name for p in tmp_path.iterdir()) == ["kept.json", "sae",
                                                                                         "x.gguf"]


def test_float_and_numpy_token_ids_in_output_scores(sae):
    from qscope_hf.output_scores import output_scores

    model, tokenizer = tiny_model("qwen3"), tiny_tokenizer()
    as_numpy = output_scores(model, tokenizer, sae, [3, 9], target=np.array([104, 105]), progress=False)
    as_list = output_scores(model, tokenizer, sae, [3, 9], target=[104, 105], progress=False)
    torch.testing.assert_close(as_numpy.scores, as_list.scores)
    with pytest.raises(TypeError, match="target token ids must be integers"):
        output_scores(model, tokenizer, sae, [3], target=[104.9], progress=False)
