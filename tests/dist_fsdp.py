"""qscope's TRL pieces on an FSDP2-sharded model, for the multi-process test: ``python dist_fsdp.py OUT VARIANT``.

Run alone (one process, no sharding) or under ``torchrun --nproc_per_node 2`` (FSDP2 ``fully_shard`` per decoder
layer and at the root, gloo on CPU). transformers' ``Trainer`` refuses FSDP on CPU (and ``use_cpu=True`` falls back
to DDP), so this drives the pieces a trainer would: the SASFT penalty's hooks and sums inside a training step
(``VARIANT`` ``lora`` or ``full``), the monitor's counting through its ``TrainerCallback`` events, and the SAE
reward's forward. Rank 0 writes what it measured to ``OUT``.
"""

import json
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from peft import LoraConfig, get_peft_model
from transformers import TrainerControl, TrainerState, TrainingArguments

from qscope_hf import decoder_layers, hook_layers, unwrap_model
from qscope_hf.tiny import tiny_model, tiny_sae, tiny_tokenizer
from qscope_trl import SAEFeatureMonitorCallback, SAEFeaturePenalty, SAEFeatureReward

out, variant = Path(sys.argv[1]), sys.argv[2]
world = int(os.environ.get("WORLD_SIZE", "1"))
rank = int(os.environ.get("RANK", "0"))
if world > 1:
    dist.init_process_group("gloo")
torch.manual_seed(0)
tokenizer = tiny_tokenizer()
model = tiny_model("qwen3")
if variant == "lora":
    model = get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
sae = tiny_sae(64, 256, 8, layer=1, seed=5)
if world > 1:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh("cpu", (world,))
    for layer in decoder_layers(model):
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)

prompts = ["Say hi: ", "Count: ", "Name a colour: ", "Greet: "]
answers = ["hello there", "one two three", "blue", "good morning"]
languages = ["en", "en", "zh", "en"]
rows = range(rank * 4 // world, (rank + 1) * 4 // world)  # this process's share of the global batch of 4
encoded = [tokenizer(prompts[i] + answers[i])["input_ids"] for i in rows]
length = max(len(ids) for ids in encoded)
input_ids = torch.full((len(encoded), length), tokenizer.pad_token_id)
mask = torch.zeros_like(input_ids)
labels = torch.full_like(input_ids, -100)
for row, (i, ids) in enumerate(zip(rows, encoded)):
    input_ids[row, :len(ids)], mask[row, :len(ids)] = torch.tensor(ids), 1
    start = len(tokenizer(prompts[i])["input_ids"])
    labels[row, start:len(ids)] = torch.tensor(ids[start:])


def global_sum(value: torch.Tensor) -> torch.Tensor:
    value = value.detach().clone()
    if world > 1:
        dist.all_reduce(value)
    return value


# -- the SASFT penalty in a training step: hooks capture the layer output, sums over this rank's tokens --------------
penalty = SAEFeaturePenalty(sae, {"zh": [3, 9], "en": [100]}, coef=2.0)
model.train()
captured = {}
with hook_layers(model, {1: lambda hidden: captured.__setitem__(1, hidden)}):
    logits = model(input_ids=input_ids, attention_mask=mask).logits
shift = labels[:, 1:] != -100
ce_sum = torch.nn.functional.cross_entropy(logits[:, :-1][shift], labels[:, 1:][shift], reduction="sum")
total, count = penalty.sums(captured, labels != -100, penalty.language_ids([languages[i] for i in rows]))
tokens, count_all = global_sum(shift.sum().double()), global_sum(count.double())
# The 1-process loss of the global batch, split so that the ranks' gradients (averaged by FSDP) add up to it.
loss = world * (ce_sum / tokens + penalty.coef * total / (count_all + 1))
loss.backward()
value = float(global_sum(total.double())) / (float(count_all) + 1)
hidden_shape = list(captured[1].shape)
grads = {}
for name, parameter in unwrap_model(model).named_parameters():
    if parameter.grad is not None and ("lora_B" in name or "layers.1.mlp" in name or "layers.0.self_attn.q" in name):
        grad = parameter.grad
        grads[name] = (grad.full_tensor() if hasattr(grad, "full_tensor") else grad).tolist()
sae_is_plain = all(type(p) is torch.nn.Parameter for p in sae.parameters())
sae_in_model = any(p is q for p in sae.parameters() for q in unwrap_model(model).parameters())

# -- the monitor, through its TrainerCallback events ----------------------------------------------------------------
monitor = SAEFeatureMonitorCallback(sae, [3, 9, 100], log_every=1)
args, state, control = TrainingArguments(output_dir=str(out / "args"), report_to=[]), TrainerState(), TrainerControl()
monitor.on_train_begin(args, state, control, model=model)
model(input_ids=input_ids, attention_mask=mask, labels=labels)  # a training forward: train mode, grad enabled
state.global_step = 1
logs = {"loss": 0.0}
monitor.on_log(args, state, control, logs=logs, model=model)
monitor.close()

# -- the SAE reward, scored by the sharded policy -------------------------------------------------------------------
reward = SAEFeatureReward(model, tokenizer, sae, [3, 9, 100], reduce="max")
prompt_ids = [tokenizer(prompts[i])["input_ids"] for i in rows]
completion_ids = [tokenizer(answers[i], add_special_tokens=False)["input_ids"] for i in rows]
scores = torch.tensor(reward.activity(prompt_ids, completion_ids), dtype=torch.float64)
if world > 1:
    gathered = [torch.zeros_like(scores) for _ in range(world)]
    dist.all_gather(gathered, scores)
    scores = torch.cat(gathered)

if rank == 0:
    out.mkdir(parents=True, exist_ok=True)
    (out / "result.json").write_text(json.dumps({
        "processes": world, "penalty": value, "grads": grads, "hidden_shape": hidden_shape,
        "sae_is_plain": sae_is_plain, "sae_in_model": sae_in_model, "rewards": scores.tolist(),
        "monitor": {key: value for key, value in logs.items() if key.startswith("sae/")}}))
if world > 1:
    dist.destroy_process_group()
