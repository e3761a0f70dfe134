"""One LoRA SFT step with the SAE penalty, for the multi-process test: ``python dist_sasft.py OUT_DIR BATCH``.

Run alone or under ``torchrun --nproc_per_node 2``; rank 0 saves the LoRA weights and the logged penalty.
"""

import json
import sys
from pathlib import Path

import torch
from datasets import Dataset
from peft import LoraConfig
from trl import SFTConfig, SFTTrainer

from qscope_hf.tiny import tiny_model, tiny_sae, tiny_tokenizer
from qscope_trl import SAEFeaturePenalty, add_sae_penalty

out, batch = Path(sys.argv[1]), int(sys.argv[2])
data = Dataset.from_dict({"prompt": ["Say hi: ", "Count: ", "Name a colour: ", "Greet: "],
                          "completion": ["hello there", "one two three", "blue", "good morning"],
                          "language": ["en", "en", "zh", "en"]})
args = SFTConfig(output_dir=str(out / "run"), per_device_train_batch_size=batch, max_steps=1, learning_rate=0.5,
                 optim="sgd", use_cpu=True, bf16=False, report_to="none", logging_steps=1, save_strategy="no",
                 seed=0, lr_scheduler_type="constant")
torch.manual_seed(0)
trainer = SFTTrainer(model=tiny_model("qwen3"), args=args, train_dataset=data, processing_class=tiny_tokenizer(),
                     peft_config=LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
sae = tiny_sae(64, 256, 8, layer=1, seed=5)
add_sae_penalty(trainer, SAEFeaturePenalty(sae, {"zh": [3, 9], "en": [100]}, coef=2.0))
trainer.train()
if trainer.accelerator.is_main_process:
    lora = {n: p.detach() for n, p in trainer.model.named_parameters() if "lora" in n}
    torch.save(lora, out / "lora.pt")
    logged = next(entry for entry in trainer.state.log_history if "sae/penalty" in entry)
    (out / "log.json").write_text(json.dumps({"sae_penalty": logged["sae/penalty"], "loss": logged["loss"],
                                              "processes": trainer.accelerator.num_processes}))
