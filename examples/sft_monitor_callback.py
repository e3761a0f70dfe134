"""User story 1: add an SAE feature monitor to an existing SFT run (one line: monitor.attach(trainer)).

At the trainer's logging steps its logs get, per chosen feature, its firing rate and mean activation on the
completion tokens of the training batches (read during the training forward, no extra forward), plus the same on
a fixed probe set. They reach TensorBoard / W&B like any metric, and the monitor's hooks are removed when
training ends or raises. Offline on the tiny model.
"""

from datasets import Dataset
from peft import LoraConfig
from trl import SFTConfig, SFTTrainer

from qscope_hf.discovery import activation_stats
from qscope_hf.tiny import tiny_model, tiny_sae, tiny_tokenizer
from qscope_trl import SAEFeatureMonitorCallback

model, tokenizer = tiny_model("qwen3"), tiny_tokenizer()
sae = tiny_sae(d_model=64, d_sae=256, k=8, layer=2)  # with a real model: SparseAutoencoder.from_pretrained(...)
data = Dataset.from_dict({"prompt": ["Say hi: ", "Count: ", "Name a colour: ", "Greet: "] * 4,
                          "completion": ["hello there", "one two three", "blue", "good morning"] * 4})

# Watch the three features that fire most on the completions (any feature ids work).
stats = activation_stats(model, tokenizer, sae, data["completion"], progress=False)[2]
features = stats.fire_count.argsort(descending=True)[:3].tolist()
monitor = SAEFeatureMonitorCallback(sae, features=features, probe_texts=["hello", "one two"],
                                    tokenizer=tokenizer)
trainer = SFTTrainer(
    model=model, train_dataset=data, processing_class=tokenizer,
    args=SFTConfig(output_dir="/tmp/qscope_sft_monitor", max_steps=4, per_device_train_batch_size=4,
                   use_cpu=True, bf16=False, report_to="none", save_strategy="no", logging_steps=2),
    peft_config=LoraConfig(r=4, target_modules=["q_proj", "v_proj"]),
)
monitor.attach(trainer)  # <- the addition (callbacks=[monitor] works too)
trainer.train()
first = features[0]
for entry in trainer.state.log_history:
    if f"sae/L2/f{first}/rate" in entry:
        print(f"step {entry['step']}: feature {first} fires on {entry[f'sae/L2/f{first}/rate']:.0%} of completion "
              f"tokens, on {entry[f'sae/probe/L2/f{first}/rate']:.0%} of probe tokens")
