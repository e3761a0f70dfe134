"""Steer model.generate with an SAE feature found by contrast: the four steps a user takes.

1. collect activation statistics of an SAE on two small corpora (here: digits vs words);
2. rank features by the difference of their firing rates (and the sign that steers towards the first corpus);
3. steer generation with the top feature through a plain LogitsProcessor;
4. compare steered and unsteered text.

Runs offline on the tiny random Qwen3 (its features mean nothing: the mechanics are what is shown). With a real
model, swap the first two lines for e.g. AutoModelForCausalLM.from_pretrained("Qwen/Qwen3-1.7B-Base") and
SparseAutoencoder.from_pretrained("Qwen/SAE-Res-Qwen3-1.7B-Base-W32K-L0_50", layer=12).
"""

from transformers import LogitsProcessorList

from qscope_hf import SAELogitsProcessor, Steering
from qscope_hf.discovery import activation_stats, contrast_features, format_contrast
from qscope_hf.tiny import tiny_model, tiny_sae, tiny_tokenizer

model, tokenizer = tiny_model("qwen3"), tiny_tokenizer()
sae = tiny_sae(d_model=64, d_sae=256, k=8, layer=2)

digits = ["1 2 3 4 5", "42 times 7 is 294", "3.14159", "2024-11-24", "100 200 300 400"]
words = ["the cat sat on the mat", "hello there", "a quiet walk", "blue sky above us", "read a book"]
stats_digits = activation_stats(model, tokenizer, sae, digits, progress=False)
stats_words = activation_stats(model, tokenizer, sae, words, progress=False)
rows = contrast_features(stats_digits, stats_words, top=3)
print(format_contrast(rows))

best = rows[0]
# Towards the digits corpus. On a real model, calibrate the strength instead of fixing it:
# calibrate_strength(model, tokenizer, Steering(sae, best.feature, best.sign)).strength (qscope_hf.calibration);
# the tiny random model's near-uniform logits do not respond to steering, so there is nothing to calibrate here.
strength = 20.0 * best.sign
steer = Steering(sae, best.feature, strength, positions="all")
processor = SAELogitsProcessor(model, steer)

inputs = tokenizer(["The answer is"], return_tensors="pt")
options = dict(max_new_tokens=16, do_sample=False)
plain = model.generate(**inputs, **options)
steered = model.generate(**inputs, **options, logits_processor=LogitsProcessorList([processor]))
length = inputs["input_ids"].shape[1]
print(f"\nfeature {best.feature} at layer {best.layer}, strength {strength:+.1f}")
print("unsteered:", repr(tokenizer.decode(plain[0, length:])))
print("steered:  ", repr(tokenizer.decode(steered[0, length:])))
