"""The real pretrained model offline: SmolLM2-135M-Instruct with the SAEs qscope ships (slow: loading takes ~20 s).

Skipped where the optional model package is not installed (README's install command installs it); CI sets
QSCOPE_REQUIRE_SMOLLM2, so there a missing package fails these tests instead.
"""

from __future__ import annotations

import json

import pytest
import torch

from qscope_hf import SparseAutoencoder
from qscope_hf.smollm2 import ASSETS, load_saes, shipped_layers, shipped_metrics
from qscope_hf.testing import needs_smollm2
from qscope_hf.training import evaluate_saes

pytestmark = [pytest.mark.slow, needs_smollm2()]


@pytest.fixture(scope="module")
def smollm2():
    from qscope_hf.smollm2 import load_model

    return load_model()


def test_shipped_saes_fit_the_budget_and_load():
    layers = shipped_layers()
    assert len(layers) >= 2
    size = sum(p.stat().st_size for p in ASSETS.glob("layer*.sae.pt"))
    assert size <= 20 * 2**20
    for sae in load_saes():
        assert sae.d_model == 576 and sae.k == 32 and 8 * 512 <= sae.d_sae
        raw = torch.load(ASSETS / f"layer{sae.layer}.sae.pt", weights_only=True)
        assert raw["W_enc"].dtype == torch.float16  # shipped in half precision, loaded as fp32
        assert torch.equal(sae.W_enc, raw["W_enc"].float())
    assert isinstance(SparseAutoencoder.from_pretrained(ASSETS, layer=layers[0]), SparseAutoencoder)


def test_recorded_metrics_are_reproduced_on_held_out_text(smollm2):
    model, tokenizer = smollm2
    recorded = shipped_metrics()
    contrast = json.loads((ASSETS / "contrast.json").read_text())
    texts = contrast["en"][:12] + contrast["fr"][:12]
    measured = evaluate_saes(model, tokenizer, load_saes(), texts)
    for layer, metrics in measured.items():
        target = recorded["metrics"][str(layer)]
        assert metrics.explained >= 0.8 and target["explained"] >= 0.8
        assert abs(metrics.explained - target["explained"]) < 0.08
        assert metrics.dead <= 0.5  # a small sample leaves some latents silent; the recorded figure is < 5%
        assert target["dead"] < 0.05
        assert metrics.ce_increase < 0.10 and target["ce_increase"] < 0.10


def test_demo_runs_on_smollm2(smollm2, monkeypatch):
    from qscope_hf import demo, loading

    monkeypatch.setattr(loading, "load_model", lambda name, **kw: smollm2)
    lines = []
    result = demo.run_demo(echo=lines.append)
    text = "\n".join(lines)
    assert "French features: firing more on French than English text" in text
    assert result["instruction + steering"] != result["instruction"] != result["unsteered"]
    assert 0 < result["strength"] < result["calibrated"]  # the demo's gentle strength is within the loss budget


def test_loaded_model_is_plain_and_trainable(smollm2):
    """GGUF weights are dequantised on load, so the model must not claim to be quantized (Trainer refuses those)."""
    from transformers.trainer_utils import validate_quantization_for_training

    model, _ = smollm2
    assert not model.is_quantized and not hasattr(model.config, "quantization_config")
    assert {p.dtype for p in model.parameters()} == {torch.float32}
    validate_quantization_for_training(model)


def test_a_gguf_file_or_its_directory_loads_as_a_model_that_saves(tmp_path, smollm2):
    from transformers import AutoModelForCausalLM

    from qscope_hf.loading import load_model
    from qscope_hf.smollm2 import GGUF_FILE, model_dir

    model, tokenizer = smollm2
    ids = tokenizer(["The sea is"], return_tensors="pt")["input_ids"]
    with torch.no_grad():
        want = model(input_ids=ids).logits
    for source in (model_dir(), model_dir() / GGUF_FILE):  # `qscope ... --model DIR` or `--model FILE.gguf`
        loaded, loaded_tokenizer = load_model(str(source))
        assert loaded_tokenizer(["The sea is"])["input_ids"][0] == ids[0].tolist()
        with torch.no_grad():
            torch.testing.assert_close(loaded(input_ids=ids).logits, want)
    loaded.save_pretrained(tmp_path)  # the GGUF quantisation marker is gone: a plain checkpoint
    with torch.no_grad():
        torch.testing.assert_close(AutoModelForCausalLM.from_pretrained(tmp_path)(input_ids=ids).logits, want)
