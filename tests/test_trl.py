"""TRL adapters on real trainers (SFTTrainer, GRPOTrainer, PEFT LoRA) with the tiny model, against hand references."""

from __future__ import annotations

import json
import os

import pytest
import torch
from datasets import Dataset
from peft import LoraConfig, get_peft_model
from transformers import TrainerCallback
from trl import GRPOConfig, GRPOTrainer, SFTConfig, SFTTrainer

from qscope_hf import ConfigError, Steering, capture_layers, decoder_layers
from qscope_hf.testing import leaked_hooks
from qscope_hf.tiny import tiny_model, tiny_sae, tiny_tokenizer
from qscope_trl import (
    LanguageBaselines,
    LanguageFeatures,
    SAEFeatureMonitorCallback,
    SAEFeaturePenalty,
    SAEFeatureReward,
    SteeredNegativeRollouts,
    add_sae_penalty,
    code_switching_reward,
    with_sae_penalty,
)

os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
LAYER = 1
SFT_DATA = {"prompt": ["Say hi: ", "Count: ", "Name a colour: ", "Greet: "],
            "completion": ["hello there", "one two three", "blue", "good morning"],
            "language": ["en", "en", "zh", "en"]}


@pytest.fixture(scope="module")
def sae():
    return tiny_sae(64, 256, 8, layer=LAYER, seed=5)


def sft_trainer(tmp_path, model=None, *, callbacks=(), peft=True, lr=1e-2, steps=1, **config):
    model = model or tiny_model("qwen3")
    args = SFTConfig(**{"output_dir": str(tmp_path), "per_device_train_batch_size": 4, "max_steps": steps,
                        "learning_rate": lr, "use_cpu": True, "bf16": False, "report_to": "none", "logging_steps": 1,
                        "save_strategy": "no", "seed": 0, "lr_scheduler_type": "constant", **config})
    peft_config = LoraConfig(r=4, target_modules=["q_proj", "v_proj"]) if peft else None
    return SFTTrainer(model=model, args=args, train_dataset=Dataset.from_dict(SFT_DATA),
                      processing_class=tiny_tokenizer(), peft_config=peft_config, callbacks=list(callbacks))


def hand_sft_acts(model, tokenizer, sae, features):
    """ReLU(f_s(x)) on the completion tokens of each SFT sample, from output_hidden_states (layer 1 < last)."""
    rows, bias = sae.W_enc[features].detach(), sae.b_enc[features].detach()
    acts = []
    with torch.no_grad():
        for prompt, completion in zip(SFT_DATA["prompt"], SFT_DATA["completion"]):
            prompt_ids = tokenizer(prompt)["input_ids"]
            ids = tokenizer(prompt + completion + tokenizer.eos_token)["input_ids"]
            hidden = model(input_ids=torch.tensor([ids]), output_hidden_states=True).hidden_states[LAYER + 1][0]
            acts.append((hidden[len(prompt_ids):] @ rows.T + bias).relu())
    return acts


def test_monitor_callback_logs_rates_of_the_training_forward(tmp_path, sae):
    features = [3, 9, 100]
    model = tiny_model("qwen3")
    callback = SAEFeatureMonitorCallback(sae, features, log_every=1, probe_texts=["hello", "blue sky"],
                                         tokenizer=tiny_tokenizer())
    trainer = sft_trainer(tmp_path, model, callbacks=[callback], lr=0.0)
    forwards = []
    handle = decoder_layers(trainer.model)[0].register_forward_hook(lambda *a: forwards.append(1))
    try:
        trainer.train()
    finally:
        handle.remove()
    logs = next(entry for entry in trainer.state.log_history if "loss" in entry)
    acts = torch.cat(hand_sft_acts(model, tiny_tokenizer(), sae, features))  # lr=0: weights as in the forward
    probe = []  # the probe texts' activations by hand, each text's first token left out
    with torch.no_grad():
        for text in ["hello", "blue sky"]:
            ids = torch.tensor([tiny_tokenizer()(text)["input_ids"]])
            hidden = model(input_ids=ids, output_hidden_states=True).hidden_states[LAYER + 1][0, 1:]
            probe.append((hidden @ sae.W_enc[features].detach().T + sae.b_enc[features].detach()).relu())
    probe = torch.cat(probe)
    for column, feature in enumerate(features):
        assert logs[f"sae/L1/f{feature}/rate"] == pytest.approx(float((acts[:, column] > 0).float().mean()), abs=1e-6)
        assert logs[f"sae/L1/f{feature}/mean"] == pytest.approx(float(acts[:, column].mean()), rel=1e-4, abs=1e-6)
        assert logs[f"sae/probe/L1/f{feature}/rate"] == pytest.approx(float((probe[:, column] > 0).float().mean()),
                                                                      abs=1e-6)
        assert logs[f"sae/probe/L1/f{feature}/mean"] == pytest.approx(float(probe[:, column].mean()), rel=1e-4,
                                                                      abs=1e-6)
    plain = sft_trainer(tmp_path, tiny_model("qwen3"), lr=0.0)
    plain_forwards = []
    handle = decoder_layers(plain.model)[0].register_forward_hook(lambda *a: plain_forwards.append(1))
    try:
        plain.train()
    finally:
        handle.remove()
    assert len(forwards) == len(plain_forwards) + 1  # + the one probe forward, no other extra forward
    assert not leaked_hooks(trainer.model)


def penalty_for(sae, **options):
    options.setdefault("baselines", {LAYER: {"en": {3: 0.05, 9: -0.02, 100: 0.1},
                                             "zh": {3: 0.01, 9: 0.02, 100: 0.0}}})
    return SAEFeaturePenalty(sae, {"zh": [3, 9], "en": [100]}, coef=0.5, **options)


def test_sasft_loss_equals_the_hand_formula(tmp_path, sae):
    penalty = penalty_for(sae)
    trainer = add_sae_penalty(sft_trainer(tmp_path), penalty)
    plain = sft_trainer(tmp_path)
    batch = next(iter(trainer.get_train_dataloader()))
    plain_batch = {k: v for k, v in batch.items() if k != "sae_language"}
    with torch.no_grad():
        with_penalty = trainer.compute_loss(trainer.model, dict(batch))
        without = plain.compute_loss(trainer.model, dict(plain_batch))
        hidden = trainer.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                               output_hidden_states=True).hidden_states[LAYER + 1]
    tokens = batch["labels"] != -100
    alpha = penalty.baselines[LAYER]
    total, count = 0.0, 0
    for row, lang in enumerate(batch["sae_language"].tolist()):
        lang = penalty.languages[lang]
        penalised = [3, 9] if lang != "zh" else [100]  # features of the *other* language
        for feature in penalised:
            pre = hidden[row, tokens[row]] @ sae.W_enc[feature].detach() + sae.b_enc[feature].detach()
            total += float((pre - alpha[lang][feature]).relu().sum())
            count += int(tokens[row].sum())
    assert float(with_penalty - without) == pytest.approx(0.5 * total / (count + 1), rel=1e-4)


def test_sft_step_with_penalty_moves_only_lora_and_differently(tmp_path, sae):
    torch.manual_seed(0)
    plain = sft_trainer(tmp_path / "a")
    torch.manual_seed(0)
    penalised = add_sae_penalty(sft_trainer(tmp_path / "b"), penalty_for(sae, baselines=None))
    assert all(torch.equal(p, dict(plain.model.named_parameters())[n]) for n, p in penalised.model.named_parameters())
    base_before = {n: p.detach().clone() for n, p in penalised.model.named_parameters() if "lora" not in n}
    plain.train()
    penalised.train()
    lora = {n: p for n, p in penalised.model.named_parameters() if "lora" in n}
    plain_lora = dict(plain.model.named_parameters())
    assert any(not torch.allclose(p, plain_lora[n]) for n, p in lora.items())
    assert all(torch.equal(p, base_before[n]) for n, p in penalised.model.named_parameters() if "lora" not in n)
    assert any(entry.get("sae/penalty", 0) > 0 for entry in penalised.state.log_history)


def test_bad_penalty_configuration_fails_at_construction(tmp_path, sae):
    with pytest.raises(IndexError, match="feature index 256 is out of range"):
        SAEFeaturePenalty(sae, {"zh": [256]})
    with pytest.raises(ValueError, match="coef must be a finite number >= 0, got -1"):
        SAEFeaturePenalty(sae, {"zh": [3]}, coef=-1)
    for bad in (float("nan"), float("inf")):
        with pytest.raises(ConfigError, match="coef must be a finite number"):
            SAEFeaturePenalty(sae, {"zh": [3]}, coef=bad)
    with pytest.warns(FutureWarning, match=r"lam=\.\.\.\) is now coef"):
        assert SAEFeaturePenalty(sae, {"zh": [3]}, lam=0.25).coef == 0.25
    with pytest.raises(ConfigError, match="lam must be a finite number"):
        SAEFeaturePenalty(sae, {"zh": [3]}, lam=float("nan"))
    with pytest.raises(ConfigError, match="no penalised features for layer 1"):
        SAEFeaturePenalty(sae, {"zh": []})
    with pytest.raises(ConfigError, match="a sample has no language"):
        penalty_for(sae).language_ids(["en", None])
    with pytest.raises(ConfigError, match="baselines must be finite"):
        penalty_for(sae, baselines={LAYER: {"en": {3: float("nan"), 9: 0.0, 100: 0.0},
                                            "zh": {3: 0.0, 9: 0.0, 100: 0.0}}})
    with pytest.raises(ValueError, match="no baselines for language 'fr'"):
        SAEFeaturePenalty(sae, {"zh": [3], "fr": [4]}, baselines={LAYER: {"zh": {3: 0.0, 4: 0.0}}})
    wide = tiny_sae(32, 256, 8, layer=LAYER)
    with pytest.raises(ValueError, match="SAE d_model=32 does not match"):
        add_sae_penalty(sft_trainer(tmp_path), SAEFeaturePenalty(wide, {"zh": [3]}))
    with pytest.raises(IndexError, match="layer 7 is out of range"):
        add_sae_penalty(sft_trainer(tmp_path), SAEFeaturePenalty(tiny_sae(64, 256, 8, layer=7), {"zh": [3]}))
    with pytest.raises(ValueError, match="no language column 'lang'"):
        add_sae_penalty(sft_trainer(tmp_path), SAEFeaturePenalty(sae, {"zh": [3]}, language_column="lang"))
    with pytest.raises(ValueError, match="unknown language 'en'"):
        add_sae_penalty(sft_trainer(tmp_path), SAEFeaturePenalty(sae, {"zh": [3]}, baselines={LAYER: {"zh": {3: 0}}}))


# -- GRPO ---------------------------------------------------------------------------------------------------------
GRPO_PROMPTS = ["Hello", "The cat", "One two", "Red blue"]


def grpo_trainer(tmp_path, reward_funcs, *, model=None, steps=1, peft=False, rollout_func=None, greedy=False,
                 callbacks=(), lr=1e-2):
    args = GRPOConfig(output_dir=str(tmp_path), use_cpu=True, bf16=False, num_generations=4,
                      per_device_train_batch_size=8, max_completion_length=8, report_to=[], max_steps=steps,
                      logging_steps=1, save_strategy="no", seed=0, learning_rate=lr,
                      generation_kwargs={"do_sample": False} if greedy else None)
    peft_config = LoraConfig(r=4, target_modules=["q_proj", "v_proj"]) if peft else None
    data = Dataset.from_dict({"prompt": GRPO_PROMPTS, "language": ["en"] * 4})
    return GRPOTrainer(model=model or tiny_model("qwen3"), reward_funcs=reward_funcs, args=args, train_dataset=data,
                       processing_class=tiny_tokenizer(), peft_config=peft_config, rollout_func=rollout_func,
                       callbacks=list(callbacks))


def hand_reward(model, tokenizer, sae, features, prompt, completion_ids, reduce):
    ids = tokenizer(prompt)["input_ids"] + list(completion_ids)
    with torch.no_grad():
        hidden = model(input_ids=torch.tensor([ids]), output_hidden_states=True).hidden_states[LAYER + 1][0]
    acts = (hidden[len(ids) - len(completion_ids):] @ sae.W_enc[features].detach().T
            + sae.b_enc[features].detach()).relu()
    if reduce == "fraction":
        return -float((acts > 0.1).any(-1).float().mean())
    return -float(acts.max())


@pytest.mark.parametrize("reduce", ["fraction", "max"])
def test_reward_values_equal_hand_reference_under_peft(sae, reduce):
    model = tiny_model("qwen3")
    peft = get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    tokenizer = tiny_tokenizer()
    reward = SAEFeatureReward(model, tokenizer, sae, [3, 9, 100], reduce=reduce, threshold=0.1, batch_size=2)
    completions = [[104, 105, 256], [66, 67, 68, 69, 70], [65], [200, 201]]
    got = reward(prompts=GRPO_PROMPTS, completions=["x"] * 4, completion_ids=completions)
    expected = [hand_reward(peft, tokenizer, sae, [3, 9, 100], p, c, reduce) for p, c in zip(GRPO_PROMPTS, completions)]
    torch.testing.assert_close(torch.tensor(got), torch.tensor(expected), rtol=1e-4, atol=1e-5)
    with peft.disable_adapter():  # the policy's LoRA adapters are part of what is scored
        assert reward(prompts=GRPO_PROMPTS, completions=["x"] * 4, completion_ids=completions) != got


def test_rewards_in_a_grpo_run_with_peft(tmp_path, sae):
    """Inside a real GRPO run with LoRA, every reward equals the hand reference computed with the policy of that
    moment, and TRL logs their mean."""
    model, tokenizer = tiny_model("qwen3"), tiny_tokenizer()
    reward = code_switching_reward(model, tokenizer, sae, [3, 9, 100], threshold=0.1)
    calls = []

    def checked(prompts, completions, completion_ids, **kwargs):
        got = reward(prompts, completions, completion_ids, **kwargs)
        calls.append((got, [hand_reward(trainer.model, tokenizer, sae, [3, 9, 100], prompt, ids, "fraction")
                            for prompt, ids in zip(prompts, completion_ids)]))
        return got

    checked.__name__ = reward.__name__
    trainer = grpo_trainer(tmp_path, [checked], model=model, peft=True, steps=2)
    trainer.train()
    logs = [entry["rewards/sae_code_switching/mean"] for entry in trainer.state.log_history
            if "rewards/sae_code_switching/mean" in entry]
    assert len(logs) == len(calls) == 2
    for (got, expected), logged in zip(calls, logs):
        assert got == pytest.approx(expected, abs=1e-6)
        assert logged == pytest.approx(sum(got) / len(got), abs=1e-6)
    assert any(value < 0 for got, _ in calls for value in got)  # the features do fire on some completions


def test_steered_negative_rollouts_on_the_right_rows(tmp_path, sae):
    spec = Steering(sae, 9, 60.0)
    seen = []

    def task_reward(prompts, completions, completion_ids, steered, **kwargs):
        seen.append((list(prompts), [list(c) for c in completion_ids], list(steered)))
        return [float(len(c)) for c in completion_ids]

    model = tiny_model("qwen3")
    trainer = grpo_trainer(tmp_path, [task_reward], model=model, greedy=True, lr=0.0,
                           rollout_func=SteeredNegativeRollouts(spec))
    trainer.train()
    prompts, completions, steered = seen[0]
    assert steered == [True, False, False, False] * 2
    tokenizer = tiny_tokenizer()
    for group in range(2):
        rows = completions[4 * group:4 * group + 4]
        assert rows[1] == rows[2] == rows[3] != rows[0]  # greedy: only the steered row differs
        ids = tokenizer(prompts[4 * group], return_tensors="pt")
        with torch.no_grad():
            plain = model.generate(**ids, max_new_tokens=8, do_sample=False)[0, ids["input_ids"].shape[1]:].tolist()
            handle = decoder_layers(model)[LAYER].register_forward_hook(
                lambda m, i, out: out + 60.0 * sae.W_dec[:, 9].detach())
            try:
                hooked = model.generate(**ids, max_new_tokens=8, do_sample=False)[0, ids["input_ids"].shape[1]:]
            finally:
                handle.remove()
        assert rows[1] == plain[:len(rows[1])]
        assert rows[0] == hooked.tolist()[:len(rows[0])]
    assert not leaked_hooks(model)


class RecordingGRPOTrainer(GRPOTrainer):
    """Records the per-token log-probabilities the loss uses."""

    def _get_per_token_logps_and_entropies(self, model, input_ids, *args, **kwargs):
        result = super()._get_per_token_logps_and_entropies(model, input_ids, *args, **kwargs)
        if torch.is_grad_enabled():
            self.recorded = (input_ids.detach().clone(), result[0].detach().clone())
        return result


def test_loss_uses_unsteered_logprobs_of_steered_tokens(tmp_path, sae):
    model = tiny_model("qwen3")
    args = GRPOConfig(output_dir=str(tmp_path), use_cpu=True, bf16=False, num_generations=4,
                      per_device_train_batch_size=4, max_completion_length=6, report_to=[], max_steps=1,
                      save_strategy="no", learning_rate=0.0)
    trainer = RecordingGRPOTrainer(model=model, reward_funcs=lambda completion_ids, **k: [0.0] * len(completion_ids),
                                   args=args, train_dataset=Dataset.from_dict({"prompt": GRPO_PROMPTS[:1] * 4}),
                                   processing_class=tiny_tokenizer(),
                                   rollout_func=SteeredNegativeRollouts(Steering(sae, 9, 60.0)))
    trainer.train()
    input_ids, logps = trainer.recorded
    width = logps.shape[1]
    with torch.no_grad():  # the unsteered policy on the same tokens (steered row 0 included)
        logits = model(input_ids=input_ids).logits[:, -width - 1:-1]
        expected = logits.log_softmax(-1).gather(-1, input_ids[:, -width:, None])[..., 0]
    mask = input_ids[:, -width:] != tiny_tokenizer().pad_token_id
    torch.testing.assert_close(logps[mask], expected[mask], rtol=1e-4, atol=1e-4)


def test_penalty_as_grpo_auxiliary_loss(tmp_path, sae):
    penalty = SAEFeaturePenalty(sae, {"any": [3, 9, 100]}, coef=1.0, language_column=None)
    reward = lambda completion_ids, **kwargs: [float(len(c)) for c in completion_ids]  # noqa: E731
    torch.manual_seed(0)
    plain = grpo_trainer(tmp_path / "a", [reward], peft=True, greedy=True)
    torch.manual_seed(0)
    penalised = add_sae_penalty(grpo_trainer(tmp_path / "b", [reward], peft=True, greedy=True), penalty)
    assert all(torch.equal(p, dict(plain.model.named_parameters())[n]) for n, p in penalised.model.named_parameters())
    plain.train()
    penalised.train()
    assert any(entry.get("sae/penalty", 0) > 0 for entry in penalised.state.log_history)
    lora = {n: p for n, p in penalised.model.named_parameters() if "lora_B" in n}
    plain_lora = dict(plain.model.named_parameters())
    assert any(not torch.allclose(p, plain_lora[n]) for n, p in lora.items())


def test_grpo_penalty_with_a_language_column_equals_the_hand_formula(tmp_path, sae):
    """The GRPO penalty's language path (qscope's override of TRL's private _generate_and_score_completions carries
    each rollout's language into the loss): the added loss equals the SASFT formula computed by hand on the
    generated batch, with the completion tokens as the penalised ones and each rollout's own language's features
    left alone."""
    reward = lambda completion_ids, **kwargs: [float(len(c)) for c in completion_ids]  # noqa: E731
    trainer = grpo_trainer(tmp_path, [reward], greedy=True)
    trainer.train_dataset = Dataset.from_dict({"prompt": GRPO_PROMPTS, "language": ["en", "zh", "en", "zh"]})
    penalty = penalty_for(sae)
    add_sae_penalty(trainer, penalty)
    batch = trainer._generate_and_score_completions(next(iter(trainer.get_train_dataloader())))
    languages = [penalty.languages[i] for i in batch["sae_language"].tolist()]
    assert sorted(set(languages)) == ["en", "zh"]  # the dataset's column reached the generated batch
    model = trainer.model
    with torch.no_grad():
        with_penalty = trainer.compute_loss(model, dict(batch))
        without = GRPOTrainer.compute_loss(trainer, model, {k: v for k, v in batch.items() if k != "sae_language"})
        ids = torch.cat([batch["prompt_ids"], batch["completion_ids"]], dim=1)
        mask = torch.cat([batch["prompt_mask"], batch["completion_mask"]], dim=1)
        hidden = model(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states[LAYER + 1]
    completion = torch.cat([torch.zeros_like(batch["prompt_mask"]), batch["completion_mask"]], dim=1).bool()
    alpha = penalty.baselines[LAYER]
    total, count = 0.0, 0
    for row, lang in enumerate(languages):
        for feature in ([3, 9] if lang != "zh" else [100]):  # the features of the other language
            pre = hidden[row, completion[row]] @ sae.W_enc[feature].detach() + sae.b_enc[feature].detach()
            total += float((pre - alpha[lang][feature]).relu().sum())
            count += int(completion[row].sum())
    assert count > 0 and total > 0
    assert float(with_penalty - without) == pytest.approx(0.5 * total / (count + 1), rel=1e-4)


def test_monitor_callback_in_grpo(tmp_path, sae):
    """The logged firing rate of each step equals the rate computed by hand on that step's completions with the
    policy that trained on them (the reward function sees the same completions and weights)."""
    tokenizer = tiny_tokenizer()
    expected = []

    def reward(prompts, completions, completion_ids, **kwargs):
        acts = [hand_acts(trainer.model, tokenizer, sae, 3, prompt, ids)
                for prompt, ids in zip(prompts, completion_ids)]
        expected.append(float(torch.cat(acts).gt(0).float().mean()))
        return [float(len(c)) for c in completion_ids]

    callback = SAEFeatureMonitorCallback(sae, [3, 9], log_every=1)
    trainer = grpo_trainer(tmp_path, [reward], callbacks=[callback], steps=2)
    trainer.train()
    rates = [entry["sae/L1/f3/rate"] for entry in trainer.state.log_history if "sae/L1/f3/rate" in entry]
    assert len(rates) == len(expected) == 2
    assert rates == pytest.approx(expected, abs=1e-6)
    assert 0 < sum(rates) < 2  # the feature fires on some completion tokens, not on all


def hand_acts(model, tokenizer, sae, feature, prompt, completion_ids):
    """``[len(completion_ids)]``: ReLU of the feature's pre-activation at the completion tokens."""
    ids = tokenizer(prompt)["input_ids"] + list(completion_ids)
    with torch.no_grad():
        hidden = model(input_ids=torch.tensor([ids]), output_hidden_states=True).hidden_states[LAYER + 1][0]
        return (hidden[len(ids) - len(completion_ids):] @ sae.W_enc[feature] + sae.b_enc[feature]).relu()


@pytest.mark.slow
def test_two_process_sft_with_penalty_matches_one_process(tmp_path):
    """torchrun with 2 CPU processes (gloo), 2 samples each, equals 1 process with the same 4-sample batch."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    script = str(Path(__file__).with_name("dist_sasft.py"))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).parents[1])}
    single, double = tmp_path / "one", tmp_path / "two"
    for cmd, out in [([sys.executable, script, str(single), "4"], single),
                     ([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", script,
                       str(double), "2"], double)]:
        out.mkdir()
        result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
        assert result.returncode == 0, result.stderr[-3000:]
    one, two = (json.loads((d / "log.json").read_text()) for d in (single, double))
    assert (one["processes"], two["processes"]) == (1, 2)
    assert two["sae_penalty"] == pytest.approx(one["sae_penalty"], rel=1e-4)
    before = {n: p for n, p in torch.load(single / "lora.pt").items()}
    after = torch.load(double / "lora.pt")
    for name, weight in before.items():
        torch.testing.assert_close(after[name], weight, rtol=1e-4, atol=1e-5)


def test_monitor_hooks_are_removed_when_training_raises(tmp_path, sae):
    class Boom(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            raise RuntimeError("boom")

    attached = SAEFeatureMonitorCallback(sae, [3, 9], log_every=1)
    trainer = attached.attach(sft_trainer(tmp_path, callbacks=[Boom()]))
    assert trainer.callback_handler.callbacks[0] is attached
    with pytest.raises(RuntimeError, match="boom"):
        trainer.train()
    assert not leaked_hooks(trainer.model)

    passed = SAEFeatureMonitorCallback(sae, [3, 9], log_every=1)
    trainer = sft_trainer(tmp_path, callbacks=[passed, Boom()])
    with passed, pytest.raises(RuntimeError, match="boom"):
        trainer.train()
    assert not leaked_hooks(trainer.model)


def test_monitor_adds_no_graph_break_under_torch_compile(sae):
    torch.manual_seed(0)
    model = tiny_model().train()
    ids = torch.randint(0, 100, (2, 8))
    labels = ids.clone()
    labels[:, :3] = -100

    def forward(ids, labels):
        return model(input_ids=ids, attention_mask=torch.ones_like(ids), labels=labels).loss

    plain = torch._dynamo.explain(forward)(ids, labels)
    torch._dynamo.reset()
    monitor = SAEFeatureMonitorCallback(sae, [3, 9], log_every=1)
    monitor.on_train_begin(None, None, None, model=model)  # what the trainer does: install the hooks
    try:
        traced = torch._dynamo.explain(forward)(ids, labels)
    finally:
        monitor.close()
        torch._dynamo.reset()
    assert traced.graph_break_count == plain.graph_break_count == 0, traced.break_reasons
    # the traced hooks still counted: the completion tokens, and the feature's firings among them (by hand)
    with torch.no_grad(), capture_layers(model, [LAYER]) as hidden:
        model(input_ids=ids)
    fires = (sae.feature_reader([3, 9]).acts(hidden[LAYER])[labels != -100] > 0).sum(0)
    assert float(monitor.tokens) == 10
    assert monitor.counts[LAYER].tolist() == fires.double().tolist()


def test_monitor_refuses_bad_configuration(sae):
    with pytest.raises(ConfigError, match=r"features are given for layers \[3\] but the SAEs read layers \[1\]"):
        SAEFeatureMonitorCallback(sae, {3: [1]})
    with pytest.raises(ConfigError, match="no features to monitor"):
        SAEFeatureMonitorCallback(sae, [])
    with pytest.raises(ConfigError, match="log_every must be a positive integer"):
        SAEFeatureMonitorCallback(sae, [1], log_every=0)


def test_rewards_and_rollouts_refuse_bad_configuration(tmp_path, sae):
    model, tokenizer = tiny_model("qwen3"), tiny_tokenizer()
    with pytest.raises(ConfigError, match="needs at least one feature"):
        SAEFeatureReward(model, tokenizer, sae, [])
    with pytest.raises(ConfigError, match="batch_size must be a positive integer"):
        SAEFeatureReward(model, tokenizer, sae, [3], batch_size=0)
    with pytest.raises(ConfigError, match="coef must be a finite number"):
        SAEFeatureReward(model, tokenizer, sae, [3], coef=float("nan"))
    assert SAEFeatureReward(model, tokenizer, sae, [3])(prompts=[], completions=[], completion_ids=[]) == []
    spec = Steering(sae, 3, 4.0)
    for count in (4, 5):  # count == group would steer every rollout: no unsteered one left to compare with
        with pytest.raises(ConfigError, match=f"count={count} steered rollouts in groups of 4 generations leave no "
                                              "unsteered rollout"):
            SteeredNegativeRollouts(spec, count=count, num_generations=4)
    trainer = grpo_trainer(tmp_path, [lambda completion_ids, **kwargs: [0.0] * len(completion_ids)])
    for count in (4, 5):
        with pytest.raises(ConfigError, match=f"count={count} steered rollouts in groups of 4 generations"):
            SteeredNegativeRollouts(spec, count=count).attach(trainer)
    with pytest.raises(ConfigError, match="count=2 steered rollouts in groups of 2 generations"):
        SteeredNegativeRollouts(spec, count=2).steered_rows(8, 2)
    rollouts = SteeredNegativeRollouts(spec, count=1)
    assert rollouts.attach(trainer) is trainer and trainer.rollout_func is rollouts


def test_language_results_are_typed_and_plug_into_the_penalty(sae):
    found = LanguageFeatures({LAYER: {"en": [100, 7], "zh": [3, 9]}})
    assert found.languages == ["en", "zh"] and found.union() == {LAYER: [3, 7, 9, 100]}
    assert found.of("zh") == {LAYER: {"zh": [3, 9]}} and dict(found[LAYER]) == {"en": [100, 7], "zh": [3, 9]}
    with pytest.raises(ConfigError, match=r"no features for languages \['fr'\]"):
        found.of("fr")
    stored = LanguageBaselines({LAYER: {"en": {3: 0.05, 9: -0.02, 7: 0.0, 100: 0.1},
                                        "zh": {3: 0.01, 9: 0.02, 7: 0.0, 100: 0.0}}}).to_json()
    baselines = LanguageBaselines.from_json(stored)  # JSON has string keys: back to ints
    assert baselines.alpha(LAYER, "en", 9) == pytest.approx(-0.02) and baselines[LAYER]["zh"][3] == pytest.approx(0.01)
    with pytest.raises(ConfigError, match="no baseline for feature 5 of language 'en' at layer 1"):
        baselines.alpha(LAYER, "en", 5)
    from_json = SAEFeaturePenalty(sae, found.of("zh"), baselines=json.loads(stored))  # plain nested dicts work too
    typed = SAEFeaturePenalty(sae, found.of("zh"), baselines=baselines)
    assert torch.equal(from_json.terms[LAYER].alpha, typed.terms[LAYER].alpha)
    with pytest.warns(FutureWarning, match="moved to qscope_hf.languages.language_features"):
        from qscope_hf.discovery import language_features  # noqa: F401


def test_monitor_labels_follow_the_trainers_logging_and_are_saved_with_checkpoints(tmp_path, sae):
    monitor = SAEFeatureMonitorCallback(sae, {"french": 3, "other": 9})
    trainer = monitor.attach(sft_trainer(tmp_path, steps=4, logging_steps=3, save_strategy="steps", save_steps=4))
    trainer.train()
    logged = [entry["step"] for entry in trainer.state.log_history if "sae/L1/french/rate" in entry]
    assert logged == [3]  # the trainer logs at step 3 (logging_steps=3): no extra logging step is forced
    entry = next(entry for entry in trainer.state.log_history if "sae/L1/french/rate" in entry)
    assert {"sae/L1/french/mean", "sae/L1/other/rate"} <= set(entry)
    saved = json.loads((tmp_path / "checkpoint-4" / "qscope_monitor.json").read_text())
    assert saved["layers"] == {"1": {"french": 3, "other": 9}} and saved["saes"]["1"]["d_sae"] == 256


def test_penalty_as_a_trainer_subclass_logs_tags_and_checkpoints(tmp_path, sae):
    SASFTTrainer = with_sae_penalty(SFTTrainer)
    args = SFTConfig(output_dir=str(tmp_path), per_device_train_batch_size=4, max_steps=2, use_cpu=True, bf16=False,
                     report_to="none", logging_steps=1, save_strategy="steps", save_steps=2, seed=0)
    trainer = SASFTTrainer(model=tiny_model("qwen3"), args=args, train_dataset=Dataset.from_dict(SFT_DATA),
                           processing_class=tiny_tokenizer(), peft_config=LoraConfig(r=4, target_modules=["q_proj"]),
                           sae_penalty=penalty_for(sae))
    assert isinstance(trainer, SFTTrainer) and type(trainer).__name__ == "SFTTrainerWithSAEPenalty"
    trainer.train()
    entry = next(e for e in trainer.state.log_history if "sae/penalty" in e)
    assert entry["sae/penalty_scaled"] == pytest.approx(0.5 * entry["sae/penalty"], rel=1e-5)
    saved = json.loads((tmp_path / "checkpoint-2" / "qscope_sae_penalty.json").read_text())
    assert saved == json.loads(json.dumps(trainer.sae_penalty.config()))
    assert saved["coef"] == 0.5 and saved["layers"]["1"]["features"] == [3, 9, 100]
    assert {"qscope", "sae-penalty"} <= set(trainer.model.model_tags or [])
    resumed = SASFTTrainer(model=tiny_model("qwen3"), args=args, train_dataset=Dataset.from_dict(SFT_DATA),
                           processing_class=tiny_tokenizer(), peft_config=LoraConfig(r=4, target_modules=["q_proj"]),
                           sae_penalty=penalty_for(sae, baselines=None))
    resumed.args.max_steps = 3
    with pytest.warns(UserWarning, match="with a different SAE penalty than it was trained with"):
        resumed.train(resume_from_checkpoint=str(tmp_path / "checkpoint-2"))


def test_steered_rollouts_refuse_vllm_server_mode(tmp_path, sae):
    """vLLM's server mode runs the engine in another process, which qscope's hooks do not reach: refuse clearly
    (colocate mode is tested against real vLLM engines in tests/vllm_engine.py)."""
    trainer = grpo_trainer(tmp_path, [lambda completion_ids, **kwargs: [0.0] * len(completion_ids)])
    trainer.use_vllm, trainer.vllm_mode = True, "server"  # what GRPOConfig(use_vllm=True) sets (no vLLM here)
    rollouts = SteeredNegativeRollouts(Steering(sae, 9, 8.0))
    with pytest.raises(ConfigError, match="needs vllm_mode='colocate': in 'server' mode the engine runs in another"):
        rollouts.attach(trainer)
    with pytest.raises(ConfigError, match="vllm_mode='colocate'"):
        rollouts(["Hello"] * 4, trainer)


def test_rewards_and_penalty_score_externally_generated_rollouts_without_steering(tmp_path, sae):
    """The way TRL's vLLM path works: completions (and sampling log-probabilities) come from outside the trainer's
    model. The SAE reward and the GRPO penalty then score them with the trainer's own forward, and no steering hook
    is on the model during that forward."""
    tokenizer = tiny_tokenizer()
    fixed = [tokenizer("blue sky", add_special_tokens=False)["input_ids"], tokenizer("hi", add_special_tokens=False)
             ["input_ids"]]

    def external_rollouts(prompts, trainer):
        prompt_ids = [tokenizer(p)["input_ids"] for p in prompts]
        completion_ids = [fixed[i % 2] for i in range(len(prompts))]
        return {"prompt_ids": prompt_ids, "completion_ids": completion_ids,
                "logprobs": [[-1.0] * len(c) for c in completion_ids]}

    model = tiny_model("qwen3")
    reward = SAEFeatureReward(model, tokenizer, sae, [3, 9, 100], reduce="max", name="sae_max")
    hooks_seen = []
    scored = []

    def watching_reward(prompts, completions, completion_ids, **kwargs):
        hooks_seen.append(leaked_hooks(model))
        values = reward(prompts=prompts, completions=completions, completion_ids=completion_ids)
        scored.append((list(prompts), [list(c) for c in completion_ids], values))
        return values

    trainer = grpo_trainer(tmp_path, [watching_reward], model=model, lr=0.0, rollout_func=external_rollouts)
    add_sae_penalty(trainer, SAEFeaturePenalty(sae, {"any": [3, 9, 100]}, coef=1.0, language_column=None))
    trainer.train()
    assert hooks_seen and not any(hooks_seen)
    prompts, completions, values = scored[0]
    for prompt, completion, value in zip(prompts, completions, values):
        assert value == pytest.approx(hand_reward(model, tokenizer, sae, [3, 9, 100], prompt, completion, "max"),
                                      rel=1e-4, abs=1e-6)
    assert any(entry.get("sae/penalty", 0) > 0 for entry in trainer.state.log_history)


@pytest.mark.parametrize("reentrant", [True, False])
def test_penalty_is_the_same_under_gradient_checkpointing(tmp_path, sae, reentrant):
    """The checkpointed forward re-runs in backward; the penalty must be computed once, and equal the plain run."""
    runs = {}
    for name, options in (("plain", {"gradient_checkpointing": False}),
                          ("checkpointed", {"gradient_checkpointing": True,
                                            "gradient_checkpointing_kwargs": {"use_reentrant": reentrant}})):
        torch.manual_seed(0)
        trainer = add_sae_penalty(sft_trainer(tmp_path / name, lr=1e-2, steps=2, **options), penalty_for(sae))
        trainer.train()
        penalties = [entry["sae/penalty"] for entry in trainer.state.log_history if "sae/penalty" in entry]
        lora = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if "lora" in n}
        runs[name] = (penalties, lora)
    assert runs["checkpointed"][0] == pytest.approx(runs["plain"][0], rel=1e-5)
    for name, weight in runs["plain"][1].items():
        torch.testing.assert_close(runs["checkpointed"][1][name], weight, rtol=1e-5, atol=1e-6)


@pytest.mark.slow
@pytest.mark.parametrize("variant", ["lora", "full"])
def test_fsdp2_two_processes_match_one_process(tmp_path, variant):
    """FSDP2 (fully_shard per layer and at the root, 2 CPU processes, gloo) against one unsharded process on the
    same global batch: the penalty's value and gradients, the monitor's counts and the reward's scores agree, the
    hook sees each rank's full [batch, seq, hidden], and the SAE stays outside the sharded model."""
    import subprocess
    import sys
    from pathlib import Path

    script = str(Path(__file__).with_name("dist_fsdp.py"))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).parents[1])}
    single, double = tmp_path / "one", tmp_path / "two"
    for cmd in ([sys.executable, script, str(single), variant],
                [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", script,
                 str(double), variant]):
        result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
        assert result.returncode == 0, result.stderr[-3000:]
    one, two = (json.loads((d / "result.json").read_text()) for d in (single, double))
    assert (one["processes"], two["processes"]) == (1, 2)
    assert one["hidden_shape"] == [4, 20, 64] and two["hidden_shape"] == [2, 20, 64]
    assert two["sae_is_plain"] and not two["sae_in_model"]
    assert two["penalty"] == pytest.approx(one["penalty"], rel=1e-5)
    assert set(two["grads"]) == set(one["grads"]) and one["grads"]
    for name, grad in one["grads"].items():
        torch.testing.assert_close(torch.tensor(two["grads"][name]), torch.tensor(grad), rtol=1e-4, atol=1e-6)
    assert two["rewards"] == pytest.approx(one["rewards"], rel=1e-5)
    assert two["monitor"].keys() == one["monitor"].keys()
    for key, value in one["monitor"].items():
        assert two["monitor"][key] == pytest.approx(value, rel=1e-5, abs=1e-7), key
