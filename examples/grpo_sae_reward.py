"""User story 3: pass an SAE reward to GRPOTrainer.

The reward scores each completion by SAE feature activity of the *current* policy (LoRA adapters included) on
prompt + completion: here minus the share of completion tokens where chosen (e.g. wrong-language) features fire.
It has TRL's reward signature and a readable name, so TRL logs it as `rewards/sae_code_switching/mean`.
"""

from datasets import Dataset
from peft import LoraConfig
from trl import GRPOConfig, GRPOTrainer

from qscope_hf.tiny import tiny_model, tiny_sae, tiny_tokenizer
from qscope_trl import code_switching_reward

model, tokenizer = tiny_model("qwen3"), tiny_tokenizer()
sae = tiny_sae(64, 256, 8, layer=2)
sae_reward = code_switching_reward(model, tokenizer, sae, features=[3, 17, 42], threshold=0.1)


def length_reward(completion_ids, **kwargs):  # any task reward, TRL's signature
    return [min(len(ids), 8) / 8 for ids in completion_ids]


trainer = GRPOTrainer(
    model=model, reward_funcs=[length_reward, sae_reward], processing_class=tokenizer,
    train_dataset=Dataset.from_dict({"prompt": ["Hello", "The cat", "One two", "Red blue"] * 2}),
    args=GRPOConfig(output_dir="/tmp/qscope_grpo_reward", max_steps=2, num_generations=4,
                    per_device_train_batch_size=8, max_completion_length=8, use_cpu=True, bf16=False, report_to=[],
                    save_strategy="no", logging_steps=1),
    peft_config=LoraConfig(r=4, target_modules=["q_proj", "v_proj"]),
)
trainer.train()
for entry in trainer.state.log_history:
    if "rewards/sae_code_switching/mean" in entry:
        print(f"step {entry['step']}: SAE reward {entry['rewards/sae_code_switching/mean']:+.3f}")
