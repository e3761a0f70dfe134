"""Quickstart: load an SAE in the Qwen-Scope layout, read a decoder layer, and look at its features.

Runs offline on a tiny random Qwen3 with tiny SAEs written in exactly the Qwen-Scope hub layout. With the hub
reachable, the same three calls work on a real release:

    model = AutoModelForCausalLM.from_pretrained("Qwen/Qwen3-1.7B-Base")
    sae = SparseAutoencoder.from_pretrained("Qwen/SAE-Res-Qwen3-1.7B-Base-W32K-L0_50", layer=12)
"""

import tempfile

import torch

from qscope_hf import SparseAutoencoder, check_sae_fits, layer_outputs
from qscope_hf.tiny import tiny_model, tiny_tokenizer, write_tiny_release

model, tokenizer = tiny_model("qwen3"), tiny_tokenizer()
release_dir = write_tiny_release(tempfile.mkdtemp(), d_model=64, d_sae=256, k=8)  # layer{n}.sae.pt files

sae = SparseAutoencoder.from_pretrained(release_dir, layer=2, k=8)
layer = check_sae_fits(model, sae)  # raises if the SAE cannot read this model's layer

inputs = tokenizer("The cat sat on the mat.", return_tensors="pt")
hidden = layer_outputs(model, [layer], **inputs)[layer]  # [1, T, 64], output of decoder layer 2
with torch.no_grad():
    values, indices = sae.encode_topk(hidden)  # [1, T, 8] each
    reconstruction = sae.decode_topk(values, indices)

print(sae)
print("features of the last token:", indices[0, -1].tolist())
print("their activations:", [round(v, 3) for v in values[0, -1].tolist()])
print("relative reconstruction error:", float((hidden - reconstruction).norm() / hidden.norm()))
