"""Tiny seeded models, a byte-level tokenizer and tiny SAEs, all built offline: for the demo, examples and tests.

Nothing here downloads anything. Models have random weights (seeded), so their SAE features mean nothing; the
shapes, hook points, file formats and code paths are those of the real Qwen3 / Qwen3-MoE / Qwen3.5 / Llama
classes.
"""

from __future__ import annotations

from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import (
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedModel,
    PreTrainedTokenizerFast,
    Qwen3_5Config,
    Qwen3_5ForCausalLM,
    Qwen3_5ForConditionalGeneration,
    Qwen3_5MoeForCausalLM,
    Qwen3_5MoeTextConfig,
    Qwen3_5TextConfig,
    Qwen3Config,
    Qwen3ForCausalLM,
    Qwen3MoeConfig,
    Qwen3MoeForCausalLM,
)
from transformers.convert_slow_tokenizer import bytes_to_unicode

from .errors import ConfigError
from .sae import SparseAutoencoder

FAMILIES = ("qwen3", "qwen3_moe", "qwen3_5", "qwen3_5_moe", "qwen3_5_vl", "llama")
SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
VOCAB_SIZE = 256 + len(SPECIAL_TOKENS)
CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def tiny_tokenizer() -> PreTrainedTokenizerFast:
    """A byte-level tokenizer (one token per byte, ids 0–255, then the special tokens), ChatML template,
    ``<|endoftext|>`` as EOS and pad, left padding (as batched generation wants)."""
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    byte_chars = sorted(alphabet, key=lambda ch: _BYTE_OF_CHAR[ch])
    vocab = {ch: i for i, ch in enumerate(byte_chars)}
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.add_special_tokens(list(SPECIAL_TOKENS))
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, eos_token="<|endoftext|>", pad_token="<|endoftext|>",
        padding_side="left", chat_template=CHAT_TEMPLATE,
    )


_BYTE_OF_CHAR = {ch: byte for byte, ch in bytes_to_unicode().items()}


def tiny_config(family: str = "qwen3", *, num_layers: int = 4, hidden_size: int = 64):
    """The config of a tiny model of ``family`` (one of :data:`FAMILIES`)."""
    ids = {"vocab_size": VOCAB_SIZE, "eos_token_id": 256, "pad_token_id": 256, "bos_token_id": None}
    common = dict(hidden_size=hidden_size, intermediate_size=2 * hidden_size, num_hidden_layers=num_layers,
                  num_attention_heads=4, num_key_value_heads=2, head_dim=hidden_size // 4,
                  max_position_embeddings=1024, **ids)
    linear = dict(linear_num_key_heads=2, linear_num_value_heads=4, linear_key_head_dim=16,
                  linear_value_head_dim=16, linear_conv_kernel_dim=4)
    moe = dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=hidden_size // 2)
    if family == "qwen3":
        return Qwen3Config(**common)
    if family == "qwen3_moe":
        return Qwen3MoeConfig(**common, **moe, decoder_sparse_step=1)
    if family == "qwen3_5":
        return Qwen3_5TextConfig(**common, **linear)
    if family == "qwen3_5_moe":
        return Qwen3_5MoeTextConfig(**{k: v for k, v in common.items() if k != "intermediate_size"}, **linear, **moe,
                                    shared_expert_intermediate_size=hidden_size // 2)
    if family == "qwen3_5_vl":
        vision = dict(depth=1, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=hidden_size,
                      patch_size=4, temporal_patch_size=1, spatial_merge_size=1)
        return Qwen3_5Config(text_config=Qwen3_5TextConfig(**common, **linear).to_dict(), vision_config=vision)
    if family == "llama":
        return LlamaConfig(**common)
    raise ConfigError(f"unknown tiny model family {family!r}; choose one of {FAMILIES}")


_CLASSES = {
    "qwen3": Qwen3ForCausalLM, "qwen3_moe": Qwen3MoeForCausalLM, "qwen3_5": Qwen3_5ForCausalLM,
    "qwen3_5_moe": Qwen3_5MoeForCausalLM, "qwen3_5_vl": Qwen3_5ForConditionalGeneration, "llama": LlamaForCausalLM,
}


def tiny_model(family: str = "qwen3", *, seed: int = 0, num_layers: int = 4, hidden_size: int = 64,
               dtype: torch.dtype = torch.float32) -> PreTrainedModel:
    """A tiny randomly initialised (seeded) causal LM of ``family``, in eval mode; the global RNG is untouched."""
    config = tiny_config(family, num_layers=num_layers, hidden_size=hidden_size)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = _CLASSES[family](config)
    model.generation_config.pad_token_id = config.get_text_config().pad_token_id
    return model.to(dtype).eval()


def tiny_sae(d_model: int = 64, d_sae: int = 256, k: int = 8, *, layer: int | None = 1, seed: int = 0,
             activation: str = "relu_topk", dtype: torch.dtype = torch.float32) -> SparseAutoencoder:
    """A tiny SAE with seeded random weights (unit-norm decoder directions, small random biases)."""
    generator = torch.Generator().manual_seed(seed)
    sae = SparseAutoencoder(d_model, d_sae, k, activation, layer=layer)
    sae.reset_parameters(generator)
    with torch.no_grad():
        sae.b_enc.copy_(0.1 * torch.randn(d_sae, generator=generator))
        sae.b_dec.copy_(0.1 * torch.randn(d_model, generator=generator))
    return sae.to(dtype)


def write_tiny_release(directory: str | Path, *, d_model: int = 64, d_sae: int = 256, k: int = 8,
                       layers: range | list[int] = range(4), seed: int = 0) -> Path:
    """Write one tiny SAE per layer in exactly the Qwen-Scope hub layout (``layer{n}.sae.pt``, plain dict, fp32,
    no config file) and return the directory."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    for layer in layers:
        sae = tiny_sae(d_model, d_sae, k, layer=layer, seed=seed + layer)
        tensors = {name: getattr(sae, name).detach().contiguous() for name in ("W_enc", "W_dec", "b_enc", "b_dec")}
        torch.save(tensors, directory / f"layer{layer}.sae.pt")
    return directory
