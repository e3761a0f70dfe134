"""User story 2: LoRA fine-tuning while penalising code-switching features (SASFT, docs/methods/post-training.md).

Steps: find each language's features by monolinguality, estimate the baselines α (mean pre-activation of each
feature on each language), then add the penalty to a stock SFTTrainer with LoRA (three lines). Samples are not
penalised on their own language's features; the penalty is logged as `sae_penalty`. Offline on the tiny model
with a tiny corpus; on a real model use the Qwen-Scope SAEs of two adjacent late layers and λ ≈ 5e-4 to 1e-3.
"""

from datasets import Dataset
from peft import LoraConfig
from trl import SFTConfig, SFTTrainer

from qscope_hf import estimate_language_baselines, language_features
from qscope_hf.tiny import tiny_model, tiny_sae, tiny_tokenizer
from qscope_trl import SAEFeaturePenalty, add_sae_penalty

model, tokenizer = tiny_model("qwen3"), tiny_tokenizer()
saes = [tiny_sae(64, 256, 8, layer=2, seed=1), tiny_sae(64, 256, 8, layer=3, seed=2)]

texts = Dataset.from_dict({
    "text": ["the weather is nice today", "I read a good book", "我们今天去公园", "这本书很好看"] * 3,
    "language": ["en", "en", "zh", "zh"] * 3,
})
found = language_features(model, tokenizer, saes, texts, top=4)       # layer -> language -> feature ids
baselines = estimate_language_baselines(model, tokenizer, saes, found, texts, progress=False)   # α per language
print("Chinese features per layer:", {layer: ids["zh"] for layer, ids in found.of("zh").items()})

data = Dataset.from_dict({"prompt": ["Answer in English: ", "Describe: ", "用中文回答: ", "Translate: "] * 4,
                          "completion": ["sure, here it is", "a small house", "好的", "a red apple"] * 4,
                          "language": ["en", "en", "zh", "en"] * 4})
trainer = SFTTrainer(
    model=model, train_dataset=data, processing_class=tokenizer,
    args=SFTConfig(output_dir="/tmp/qscope_sasft", max_steps=4, per_device_train_batch_size=4, use_cpu=True,
                   bf16=False, report_to="none", save_strategy="no", logging_steps=1),
    peft_config=LoraConfig(r=4, target_modules=["q_proj", "v_proj"]),
)
penalty = SAEFeaturePenalty(saes, found.of("zh"), coef=1e-3, baselines=baselines,
                            language_column="language")                         # <- the addition (1/2)
add_sae_penalty(trainer, penalty)                                               # <- the addition (2/2)
trainer.train()
print([round(entry["sae/penalty"], 4) for entry in trainer.state.log_history if "sae/penalty" in entry])
