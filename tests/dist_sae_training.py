"""SAETrainer on several processes, for the multi-process test: ``python dist_sae_training.py OUT``.

Run alone (the one-process reference) or under ``torchrun --nproc_per_node 2``. On the tiny model, each writes to
``OUT``: ``activations.pt`` (``fit_activations`` on fixed activations, ``parallel="data"``), ``layers/`` (the SAEs
of ``fit`` on text with ``parallel="layers"``), and under 2 processes also ``data.pt`` (``fit`` on text with
``parallel="data"``: uninterrupted, and stopped half-way then resumed, with the texts each process read and each
process's SAEs) and ``sharded.pt`` (the same run with the model sharded by FSDP2's ``fully_shard``).
"""

import os
import sys
from pathlib import Path

import torch
from test_training import Interrupted, config, texts  # this script's folder is on sys.path

from qscope_hf.distributed import Processes
from qscope_hf.tiny import tiny_model, tiny_tokenizer
from qscope_hf.training import SAETrainer

out = Path(sys.argv[1])
processes = Processes.current()
tokenizer = tiny_tokenizer()
corpus = texts(300)
short = dict(total_tokens=12_800, dead_after_tokens=2_000)  # 50 steps


def weights(trainer: SAETrainer) -> dict[int, dict[str, torch.Tensor]]:
    return {layer: {name: tensor.detach().clone() for name, tensor in sae.state_dict().items()}
            for layer, sae in trainer.saes.items()}


class Recording(SAETrainer):
    """Records the texts this process forwards."""

    def _texts(self, data):
        share = super()._texts(data)
        self.read = getattr(self, "read", []) + list(share)
        return share


# fit_activations with parallel="data": every process passes the same activations and takes its rows of each batch
generator = torch.Generator().manual_seed(0)
directions = torch.randn(40, 64, generator=generator)
codes = torch.rand(4096, 2, 40, generator=generator) * (torch.rand(4096, 2, 40, generator=generator) < 0.1)
activations = codes @ directions + 3.0 + 0.05 * torch.randn(4096, 2, 64, generator=generator)
trainer = SAETrainer(tiny_model("qwen3"), tokenizer, config(**short))
trainer.fit_activations(activations, epochs=2, progress=False)
if processes.main:
    out.mkdir(parents=True, exist_ok=True)
    torch.save({"weights": weights(trainer), "history": trainer.history, "step": trainer.step,
                "tokens": trainer.tokens}, out / "activations.pt")

# fit on text with parallel="layers": each process trains its layers, and writes them
trainer = SAETrainer(tiny_model("qwen3"), tokenizer, config(**short, parallel="layers"))
trainer.fit(corpus, out / "layers", progress=False)

if processes.world > 1:
    # fit on text with parallel="data": uninterrupted, then stopped half-way and resumed
    full = Recording(tiny_model("qwen3"), tokenizer, config(**short))
    full.fit(corpus, out / "data-full", progress=False)
    first = Interrupted(tiny_model("qwen3"), tokenizer, config(**short, checkpoint_every=25))
    try:
        first.fit(corpus, out / "data-resumed", progress=False)
    except KeyboardInterrupt:
        pass
    second = SAETrainer(tiny_model("qwen3"), tokenizer, config(**short, checkpoint_every=25))
    second.fit(corpus, out / "data-resumed", resume=True, progress=False)
    result = {"read": processes.gather(full.read), "weights": processes.gather(weights(full)),
              "resumed": weights(second), "steps": (full.step, second.step), "tokens": full.tokens}

    # the same uninterrupted run with the model sharded by FSDP2: the hooks must still see full activations
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    from qscope_hf import decoder_layers

    model = tiny_model("qwen3")
    mesh = init_device_mesh("cpu", (processes.world,))
    for layer in decoder_layers(model):
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    sharded = SAETrainer(model, tokenizer, config(**short))
    sharded.fit(corpus, progress=False)
    sharded_weights = weights(sharded)
    if processes.main:
        torch.save(result, out / "data.pt")
        torch.save({"weights": sharded_weights, "sharded": type(model).__name__}, out / "sharded.pt")
    torch.distributed.destroy_process_group()
print("rank", os.environ.get("RANK", "0"), "done")
