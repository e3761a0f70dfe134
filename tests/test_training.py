"""The SAE trainer on the tiny model: it learns, AuxK revives dead latents, resume is exact, outputs load."""

from __future__ import annotations

import json
import random

import pytest
import torch

from qscope_hf import SparseAutoencoder
from qscope_hf.hooks import layer_outputs
from qscope_hf.tiny import tiny_model, tiny_tokenizer
from qscope_hf.training import SAETrainer, TrainConfig, evaluate_saes

WORDS = ("the cat dog sat ran on a mat big small red blue one two three house tree river stone light dark "
         "quickly slowly and or but when where why how").split()


def texts(n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(4, 12))) for _ in range(n)]


SILENCED = 4.0


def config(**overrides) -> TrainConfig:
    base = dict(layers=[1, 2], d_sae=256, k=8, batch_tokens=256, total_tokens=60_000, buffer_tokens=2048,
                text_batch_size=16, context_length=64, log_every=10, seed=0, dead_after_tokens=20_000, lr=3e-3)
    return TrainConfig(**{**base, **overrides})


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    model, tokenizer = tiny_model("qwen3"), tiny_tokenizer()
    trainer = SAETrainer(model, tokenizer, config())
    out = tmp_path_factory.mktemp("saes")
    trainer.fit(texts(400), out, progress=False)
    return model, tokenizer, trainer, out


def test_training_reduces_fvu(trained):
    model, tokenizer, trainer, _ = trained
    first = trainer.history[0]
    metrics = evaluate_saes(model, tokenizer, list(trainer.saes.values()), texts(40, seed=1))
    for layer in (1, 2):
        assert metrics[layer].fvu < 0.5 * first[f"sae/L{layer}/fvu"]
        assert metrics[layer].explained > 0.6
        assert metrics[layer].l0 <= 8
    assert trainer.tokens >= 60_000


def test_outputs_load_in_every_layout(trained):
    _, _, trainer, out = trained
    for layer, sae in trainer.saes.items():
        for source in (out, out / "saelens" / f"layer{layer}"):
            loaded = SparseAutoencoder.from_pretrained(source, layer=layer)
            assert torch.equal(loaded.W_enc, sae.W_enc.detach()) and torch.equal(loaded.W_dec, sae.W_dec.detach())
            assert loaded.k == 8
    assert (out / "training.json").exists()


def test_saelens_reads_the_trained_saes(trained):
    import sae_lens  # the interop extra, installed with dev

    _, _, trainer, out = trained
    theirs = sae_lens.SAE.load_from_disk(str(out / "saelens" / "layer1"))
    ours = trainer.saes[1]
    x = torch.randn(5, 64)
    with torch.no_grad():
        torch.testing.assert_close(theirs.encode(x), ours.encode(x), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(theirs.decode(theirs.encode(x)), ours(x), rtol=1e-5, atol=1e-5)


def test_auxk_revives_dead_latents():
    model, tokenizer = tiny_model("qwen3"), tiny_tokenizer()
    revived, logged_dead = {}, {}
    for coef in (0.0, 1 / 32):
        trainer = SAETrainer(model, tokenizer, config(layers=[1], total_tokens=100_000, aux_coef=coef,
                                                       dead_after_tokens=2_000))
        with torch.no_grad():  # half the latents start dead (normalised inputs: pre-activations are ~N(0, 1))
            trainer.working[1].b_enc[:128] = -SILENCED
        trainer.fit(texts(400), progress=False)
        sample = layer_outputs(model, [1], **tokenizer(texts(200, seed=2), return_tensors="pt", padding=True))[1]
        values, indices = trainer.saes[1].encode_topk(sample.reshape(-1, 64))
        revived[coef] = len(set(indices[values > 0].tolist()) & set(range(128))) / 128
        logged_dead[coef] = trainer.history[-1]["sae/L1/dead"]
    assert revived[0.0] < 0.05  # without AuxK the silenced latents stay dead
    assert logged_dead[0.0] >= 0.45  # and the log says so (they never fired: dead from the first step)
    assert revived[1 / 32] > 0.3


class Interrupted(SAETrainer):
    """Stops (as a crash or Ctrl-C would) after 25 steps, once the checkpoint of step 25 is written."""

    def _train_batch(self, batch, bar):
        if self.step == 25:
            raise KeyboardInterrupt
        super()._train_batch(batch, bar)


def test_resume_equals_an_uninterrupted_run(tmp_path):
    model, tokenizer = tiny_model("qwen3"), tiny_tokenizer()
    data = texts(300)
    full = SAETrainer(model, tokenizer, config(total_tokens=12_800, dead_after_tokens=2_000))
    full.fit(data, progress=False)
    first = Interrupted(model, tokenizer, config(total_tokens=12_800, checkpoint_every=25, dead_after_tokens=2_000))
    with pytest.raises(KeyboardInterrupt):
        first.fit(data, tmp_path, progress=False)
    assert first.step == 25
    second = SAETrainer(model, tokenizer, config(total_tokens=12_800, checkpoint_every=25, dead_after_tokens=2_000))
    second.fit(data, tmp_path, resume=True, progress=False)
    assert second.step == full.step == 50
    for layer in (1, 2):
        for name in ("W_enc", "W_dec", "b_enc", "b_dec"):
            torch.testing.assert_close(getattr(second.saes[layer], name), getattr(full.saes[layer], name),
                                       rtol=0, atol=0)
    with pytest.raises(FileNotFoundError, match="nothing to resume"):
        SAETrainer(model, tokenizer, config()).fit(data, tmp_path / "empty", resume=True, progress=False)


def test_evaluation_against_an_exact_sae_and_a_hand_zero_ablation():
    model, tokenizer = tiny_model("qwen3"), tiny_tokenizer()
    eye = torch.eye(64)
    exact = SparseAutoencoder(64, 128, 128, layer=1)  # relu(x) - relu(-x) == x
    with torch.no_grad():
        exact.W_enc.copy_(torch.cat([eye, -eye]))
        exact.W_dec.copy_(torch.cat([eye, -eye]).T)
        exact.b_enc.zero_()
        exact.b_dec.zero_()
    held_out = texts(12, seed=3)
    metrics = evaluate_saes(model, tokenizer, [exact], held_out)[1]
    assert metrics.fvu == pytest.approx(0.0, abs=1e-6)
    assert metrics.ce_spliced == pytest.approx(metrics.ce_clean, rel=1e-5)
    assert metrics.loss_recovered == pytest.approx(1.0, abs=1e-4)
    inputs = tokenizer(held_out, return_tensors="pt", padding=True)
    real = inputs["attention_mask"].bool()
    keep = real & (real.long().cumsum(1) > 1)
    scored = real[:, 1:] & real[:, :-1]  # a prediction counts when its input and its target are real tokens

    def zero(module, args, output):
        output = output.clone()
        output[keep] = 0
        return output

    handle = model.model.layers[1].register_forward_hook(zero)
    try:
        with torch.no_grad():
            logits = model(**inputs).logits[:, :-1]
    finally:
        handle.remove()
    hand = torch.nn.functional.cross_entropy(logits[scored], inputs["input_ids"][:, 1:][scored])
    assert metrics.ce_zero == pytest.approx(float(hand), rel=1e-5)


def test_bad_training_configuration():
    with pytest.raises(IndexError, match="layer 9 is out of range"):
        SAETrainer(tiny_model("qwen3"), tiny_tokenizer(), config(layers=[9]))
    with pytest.raises(ValueError, match="no tokens"):
        SAETrainer(tiny_model("qwen3"), tiny_tokenizer(), config()).fit(["", ""], progress=False)


def test_training_on_cached_activations():
    model, tokenizer = tiny_model("qwen3"), tiny_tokenizer()
    acts = layer_outputs(model, [1, 2], **tokenizer(texts(300), return_tensors="pt", padding=True))
    mask = tokenizer(texts(300), return_tensors="pt", padding=True)["attention_mask"].bool()
    cached = torch.stack([acts[1][mask], acts[2][mask]], dim=1)  # [N, 2, 64]
    trainer = SAETrainer(model, tokenizer, config())
    trainer.fit_activations(cached, epochs=3, progress=False)
    assert trainer.step == 3 * (len(cached) // 256)
    assert trainer.history[-1]["sae/L1/fvu"] < 0.5 * trainer.history[0]["sae/L1/fvu"]
    with pytest.raises(ValueError, match=r"activations must be \[N, 2, 64\]"):
        trainer.fit_activations(cached[:, :1])


def planted(model, massive: float = 300.0, dimension: int = 7):
    """``model`` whose layer-1 output carries a huge constant on one dimension ("massive activations", as real
    LLMs' middle layers do): a forward hook registered before any of qscope's, so the SAE reads it."""
    def add(_module, _inputs, output):
        output = output.clone()
        output[..., dimension] += massive
        return output

    model.model.layers[1].register_forward_hook(add)
    return model


@pytest.mark.parametrize("massive", [0.0, 300.0])
def test_defaults_train_a_usable_sae_with_and_without_a_massive_dimension(massive):
    """The trainer's defaults (learning rate, dead-latent window) on a plain tiny model and on one whose residual
    has a planted massive dimension (300 against a typical token norm of ~1): explained variance >= 0.8 and at
    most 20 % dead latents on held-out text in both. Before the input normalisation the massive case gave an
    explained variance of about -5e4 with 92 % dead latents while the log said dead 0.00."""
    model, tokenizer = planted(tiny_model("qwen3"), massive) if massive else tiny_model("qwen3"), tiny_tokenizer()
    defaults = TrainConfig(layers=[1], d_sae=256, k=8, batch_tokens=256, total_tokens=60_000, buffer_tokens=2048,
                           context_length=64, seed=0)
    trainer = SAETrainer(model, tokenizer, defaults)
    trainer.fit(texts(400), progress=False)
    metrics = evaluate_saes(model, tokenizer, list(trainer.saes.values()), texts(200, seed=1))[1]
    assert metrics.explained >= 0.8 and metrics.dead <= 0.2, metrics
    assert metrics.healthy and not trainer.problems
    with torch.no_grad():  # the folded SAE reads raw activations as the working one reads normalised ones
        x = layer_outputs(model, [1], **tokenizer(texts(4, seed=5), return_tensors="pt", padding=True))[1][:, 1:]
        x = x.reshape(-1, 64)
        mean, scale = trainer.normalisation[1]
        working = trainer.working[1](((x.double() - mean) / scale).float())
        torch.testing.assert_close(trainer.saes[1](x), (working.double() * scale + mean).float(), rtol=1e-4,
                                   atol=1e-3)


def test_a_failed_run_is_flagged_in_the_log_the_warnings_and_the_metrics():
    model, tokenizer = tiny_model("qwen3"), tiny_tokenizer()
    trainer = SAETrainer(model, tokenizer, config(layers=[1], total_tokens=12_800, lr=1e-9))
    with torch.no_grad():
        trainer.working[1].b_enc.fill_(-100.0)  # no latent can fire
    with pytest.warns(UserWarning, match="layer 1: 100% of the latents never fired"):
        trainer.fit(texts(100), progress=False)
    assert trainer.history[-1]["sae/L1/dead"] == 1.0
    assert any("training FVU" in problem for problem in trainer.problems)
    with pytest.warns(UserWarning, match="never fire on the held-out text"):
        metrics = evaluate_saes(model, tokenizer, list(trainer.saes.values()), texts(20, seed=1))[1]
    assert not metrics.healthy and any("FVU" in problem for problem in metrics.problems)
    with pytest.warns(UserWarning, match="dead_after_tokens=50000 >= total_tokens=10000"):
        TrainConfig(layers=[1], total_tokens=10_000, dead_after_tokens=50_000)
    assert TrainConfig(layers=[1], total_tokens=300_000).dead_window == 30_000


@pytest.fixture(scope="module")
def distributed_runs(tmp_path_factory):
    """tests/dist_sae_training.py alone and under torchrun with 2 CPU processes (gloo): ``(one, two)`` folders."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    script = str(Path(__file__).with_name("dist_sae_training.py"))
    root = tmp_path_factory.mktemp("distributed")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).parents[1])}
    for cmd in ([sys.executable, script, str(root / "one")],
                [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", script,
                 str(root / "two")]):
        result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
        assert result.returncode == 0, result.stderr[-3000:]
    return root / "one", root / "two"


def assert_same_saes(got: dict, want: dict, **tolerance) -> None:
    assert got.keys() == want.keys() and want
    for layer, tensors in want.items():
        for name, tensor in tensors.items():
            torch.testing.assert_close(got[layer][name], tensor, **tolerance)


@pytest.mark.slow
def test_data_parallel_step_equals_one_process_on_the_same_batches(distributed_runs):
    """fit_activations with parallel="data" on 2 processes (each its half of every batch; the batch's mean and
    variance, gradients and firing counts summed) equals one process after 32 steps, AuxK and logs included."""
    one, two = (torch.load(folder / "activations.pt") for folder in distributed_runs)
    assert one["step"] == two["step"] == 32 and one["tokens"] == two["tokens"] == 32 * 256
    assert_same_saes(two["weights"], one["weights"], rtol=1e-4, atol=5e-6)
    assert any(entry["sae/L2/aux"] > 0 for entry in one["history"])  # dead latents were revived: AuxK ran
    assert len(two["history"]) == len(one["history"])
    for got, want in zip(two["history"], one["history"]):
        assert got == pytest.approx(want, rel=1e-5, abs=1e-7)


@pytest.mark.slow
def test_layer_parallel_gives_each_layer_the_one_process_sae(distributed_runs):
    """fit on text with parallel="layers": rank 0 trains layer 1, rank 1 layer 2, each from its own forward on all
    texts, and each writes its SAE: the files equal one process's training both layers; rank 0's training.json
    holds both layers' history."""
    one, two = (folder / "layers" for folder in distributed_runs)
    for layer in (1, 2):
        want, got = (SparseAutoencoder.from_pretrained(folder, layer=layer) for folder in (one, two))
        for name in ("W_enc", "W_dec", "b_enc", "b_dec"):
            torch.testing.assert_close(getattr(got, name), getattr(want, name), rtol=0, atol=0)
    history = json.loads((two / "training.json").read_text())
    assert history["processes"] == 2 and history["history"] == json.loads((one / "training.json").read_text())[
        "history"]


@pytest.mark.slow
def test_data_parallel_training_on_text_shards_resumes_and_reads_a_sharded_model(distributed_runs):
    """fit on text with parallel="data" on 2 processes: each reads its half of every pool of texts (together the
    corpus in order, cycling), both hold the same SAEs, a run stopped half-way and resumed from its per-process
    checkpoints equals the uninterrupted one, and with the model sharded by FSDP2 the trainer reads the same full
    activations (the same SAEs)."""
    _, two = distributed_runs
    data = torch.load(two / "data.pt")
    first, second = data["read"]
    assert len(first) == len(second) and data["steps"] == (50, 50) and data["tokens"] == 12_800
    corpus = texts(300)  # what tests/dist_sae_training.py trains on
    pool = 16 * 8  # text_batch_size × TEXT_POOL texts per process
    interleaved = [text for p in range(0, len(first), pool)
                   for pair in zip(first[p:p + pool], second[p:p + pool]) for text in pair]
    assert interleaved == [corpus[i % len(corpus)] for i in range(len(interleaved))]
    assert_same_saes(data["weights"][1], data["weights"][0], rtol=0, atol=0)
    assert_same_saes(data["resumed"], data["weights"][0], rtol=0, atol=0)
    assert_same_saes(torch.load(two / "sharded.pt")["weights"], data["weights"][0], rtol=1e-5, atol=1e-6)
    assert (two / "data-resumed" / "trainer_state.pt").exists() and (two / "data-resumed" /
                                                                     "trainer_state.rank1.pt").exists()


@pytest.mark.slow
@pytest.mark.parametrize("parallel", ["data", "layers"])
def test_train_sae_command_under_torchrun(tmp_path, parallel):
    """`qscope train-sae` launched by torchrun on 2 CPU processes: the SAEs of both layers are written once, they
    load, and training.json records 2 processes (with "data" both processes held the same SAEs; rank 0 wrote)."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(texts(200)))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).parents[1])}
    out = tmp_path / "saes"
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                             "-m", "qscope_hf.cli", "train-sae", "--model", "tiny", "--layers", "1", "2", "--data",
                             str(corpus), "--tokens", "2048", "--batch-tokens", "256", "--d-sae", "128",
                             "--parallel", parallel, "--out", str(out)],
                            env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    wrote = [line for line in result.stdout.splitlines() if line.startswith("wrote")]
    assert len(wrote) == (2 if parallel == "layers" else 1)  # one line per process that wrote SAEs
    record = json.loads((out / "training.json").read_text())
    assert record["processes"] == 2 and record["tokens"] == 2048 and record["config"]["parallel"] == parallel
    assert {key for entry in record["history"] for key in entry} >= {"sae/L1/fvu", "sae/L2/fvu"}
    for layer in (1, 2):
        assert SparseAutoencoder.from_pretrained(out, layer=layer).d_sae == 128
