"""The processes an :class:`~qscope_hf.training.SAETrainer` shares its work with, or just this one.

Under ``torchrun`` or ``accelerate launch`` (``WORLD_SIZE`` > 1 in the environment) :meth:`Processes.current`
joins the default process group (initialising it when nobody has: gloo for CPU tensors, NCCL for CUDA ones) and
the trainer reduces its statistics, gradients and firing counts across the processes; in one process every
reduction is the identity, so the same code runs unchanged.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor


@dataclass(frozen=True)
class Processes:
    """``rank`` of this process among ``world`` processes (``0`` of ``1`` without a launcher)."""

    rank: int = 0
    world: int = 1

    @classmethod
    def current(cls) -> Processes:
        """The launcher's processes: the initialised default group, or a new one when ``WORLD_SIZE`` > 1."""
        if dist.is_available() and dist.is_initialized():
            return cls(dist.get_rank(), dist.get_world_size())
        if int(os.environ.get("WORLD_SIZE", "1")) > 1:
            if torch.cuda.is_available() and "LOCAL_RANK" in os.environ:  # NCCL reduces on the current device
                torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
            dist.init_process_group()  # env:// as the launchers set it; gloo for CPU tensors, NCCL for CUDA ones
            return cls(dist.get_rank(), dist.get_world_size())
        return cls()

    @property
    def main(self) -> bool:
        """Whether this is rank 0, which reports and writes what all processes share."""
        return self.rank == 0

    def sum(self, tensor: Tensor) -> Tensor:
        """``tensor`` summed over the processes, in place (returned)."""
        if self.world > 1:
            dist.all_reduce(tensor)
        return tensor

    def mean_rows(self, x: Tensor) -> Tensor:
        """``[d]``: the fp64 mean of the rows of every process's ``x [n, d]``."""
        total = self.sum(torch.cat([x.double().sum(0), x.new_tensor([len(x)], dtype=torch.float64)]))
        return total[:-1] / total[-1]

    def sum_gradients(self, parameters: Any) -> None:
        """Sum each parameter's gradient over the processes (each process's loss is its share of the global one)."""
        if self.world > 1:
            for parameter in parameters:
                if parameter.grad is not None:
                    dist.all_reduce(parameter.grad)

    def gather(self, value: Any) -> list[Any]:
        """Every process's ``value`` (picklable), in rank order."""
        if self.world == 1:
            return [value]
        values: list[Any] = [None] * self.world
        dist.all_gather_object(values, value)
        return values
