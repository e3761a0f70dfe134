"""Serve a steered model: export steering to a llama.cpp control vector and to a baked checkpoint (offline, SmolLM2).

    python examples/export_steering.py [OUT_DIR]

Writes OUT_DIR/french.gguf (use it with `llama-cli -m SmolLM2-135M-Instruct.Q4_1.gguf --control-vector-scaled
OUT_DIR/french.gguf 1.0`) and OUT_DIR/smollm2-french/ (a checkpoint that loads with plain from_pretrained), then
checks that the baked checkpoint generates what the hooked model generates. The steering is the study's best French
vector on its own: the difference of means of French and English paragraphs at layer 15, 0.2 × the residual norm.
"""

import json
import sys
import tempfile
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM

from qscope_hf import Steering, diff_means_vector, steered
from qscope_hf.discovery import residual_norm
from qscope_hf.export import bake_steering, export_control_vector, import_control_vector
from qscope_hf.smollm2 import ASSETS, load_model

out = Path(sys.argv[1]) if len(sys.argv) > 1 else Path(tempfile.mkdtemp(prefix="qscope_export_"))
out.mkdir(parents=True, exist_ok=True)
model, tokenizer = load_model()
texts = json.loads((ASSETS / "steering_texts.json").read_text())
layer = 15
norm = residual_norm(model, tokenizer, layer, texts["en"])  # absolute strength: a control vector is a constant
spec = Steering.from_vector(diff_means_vector(model, tokenizer, texts["fr"], texts["en"], layer), layer, 0.2 * norm)

vector = export_control_vector(spec, out / "french.gguf", model=model, overwrite=True)
print(f"control vector: {vector} ({[f'direction.{s.layer}' for s in import_control_vector(vector)]})")
baked_dir = out / "smollm2-french"
bake_steering(model, spec).save_pretrained(baked_dir)
tokenizer.save_pretrained(baked_dir)
print(f"baked checkpoint: {baked_dir}")

prompt = tokenizer.apply_chat_template([{"role": "user", "content": "Tell me about trains."}], tokenize=True,
                                       add_generation_prompt=True, return_dict=True, return_tensors="pt")
with torch.no_grad(), steered(model, spec):
    hooked = model.generate(**prompt, max_new_tokens=24, do_sample=False)
baked = AutoModelForCausalLM.from_pretrained(baked_dir).generate(**prompt, max_new_tokens=24, do_sample=False)
start = prompt["input_ids"].shape[1]
print("hooked:", repr(tokenizer.decode(hooked[0, start:], skip_special_tokens=True)))
print("baked: ", repr(tokenizer.decode(baked[0, start:], skip_special_tokens=True)))
print("same tokens:", torch.equal(hooked, baked))
