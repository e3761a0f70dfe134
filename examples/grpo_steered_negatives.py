"""User story 4 (paper §8): one SAE-steered negative rollout per GRPO group.

Repetition features are found by how their activation rises from a repeated token's first occurrence to its last;
in each group of `num_generations` rollouts, one is generated with the top repetition feature amplified. The task
reward is unchanged: the steered, repetitive rollout earns a low reward and so a negative advantage. The loss uses
the unsteered policy's log-probabilities of the steered tokens.
"""

import os

from datasets import Dataset
from trl import GRPOConfig, GRPOTrainer

from qscope_hf import Steering, repetition_features
from qscope_hf.tiny import tiny_model, tiny_sae, tiny_tokenizer
from qscope_trl import SteeredNegativeRollouts

os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")  # rollout_func is experimental in TRL
model, tokenizer = tiny_model("qwen3"), tiny_tokenizer()
sae = tiny_sae(64, 256, 8, layer=2)

degenerate = ["the cat the cat the cat the cat", "I am here. I am here. I am here."]
feature, rise = repetition_features(model, tokenizer, sae, degenerate, top=1)[0]
print(f"repetition feature {feature} (mean rise {rise:+.3f})")


def distinct_tokens_reward(completion_ids, **kwargs):  # the task reward: penalises loops
    return [len(set(ids)) / max(len(ids), 1) for ids in completion_ids]


def steered_share(completion_ids, steered, **kwargs):  # `steered` comes from the rollout function
    print("steered rows:", [i for i, flag in enumerate(steered) if flag])
    return [0.0] * len(completion_ids)


trainer = GRPOTrainer(
    model=model, reward_funcs=[distinct_tokens_reward, steered_share], processing_class=tokenizer,
    train_dataset=Dataset.from_dict({"prompt": ["Hello", "The cat", "One two", "Red blue"] * 2}),
    rollout_func=SteeredNegativeRollouts(Steering(sae, feature, 20.0), count=1),
    args=GRPOConfig(output_dir="/tmp/qscope_grpo_steered", max_steps=2, num_generations=4,
                    per_device_train_batch_size=8, max_completion_length=8, use_cpu=True, bf16=False, report_to=[],
                    save_strategy="no", logging_steps=1),
)
trainer.train()
