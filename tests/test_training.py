"""The SAE trainer on the tiny model: it learns, AuxK revives dead latents, resume is exact, outputs load."""

from __future__ import annotations

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
    revived = {}
    for coef in (0.0, 1 / 32):
        trainer = SAETrainer(model, tokenizer, config(layers=[1], total_tokens=100_000, aux_coef=coef,
                                                       dead_after_tokens=2_000))
        with torch.no_grad():
            trainer.saes[1].b_enc[:128] = -0.5  # half the latents start dead (pre-activations are ~0.1-0.3)
        trainer.fit(texts(400), progress=False)
        sample = layer_outputs(model, [1], **tokenizer(texts(200, seed=2), return_tensors="pt", padding=True))[1]
        values, indices = trainer.saes[1].encode_topk(sample.reshape(-1, 64))
        revived[coef] = len(set(indices[values > 0].tolist()) & set(range(128))) / 128
    assert revived[0.0] < 0.05  # without AuxK the silenced latents stay dead
    assert revived[1 / 32] > 0.3


def test_resume_equals_an_uninterrupted_run(tmp_path):
    model, tokenizer = tiny_model("qwen3"), tiny_tokenizer()
    data = texts(300)
    full = SAETrainer(model, tokenizer, config(total_tokens=12_800))
    full.fit(data, progress=False)
    first = SAETrainer(model, tokenizer, config(total_tokens=6_400, checkpoint_every=25))
    first.fit(data, tmp_path, progress=False)
    second = SAETrainer(model, tokenizer, config(total_tokens=12_800, checkpoint_every=25))
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
    labels = inputs["input_ids"].masked_fill(~real, -100)

    def zero(module, args, output):
        output = output.clone()
        output[keep] = 0
        return output

    handle = model.model.layers[1].register_forward_hook(zero)
    try:
        with torch.no_grad():
            hand = model(**inputs, labels=labels).loss
    finally:
        handle.remove()
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
