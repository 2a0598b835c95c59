"""Device, process group and the few collective operations the training loop needs.

One process trains on CPU or one GPU. Under ``torchrun`` each worker joins the process group
(gloo on CPU, nccl on GPU) and :class:`World` carries its rank; with one worker every
collective is the identity, so the loop reads the same either way.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from nmt_ls.batching import shard


def resolve_device(name: str) -> torch.device:
    """``auto`` | ``cpu`` | ``cuda``; under torchrun, ``cuda`` is the worker's LOCAL_RANK GPU."""
    if name not in ("auto", "cpu", "cuda"):
        raise ValueError(f"train.device must be auto, cpu or cuda, got {name!r}")
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("train.device=cuda but torch sees no CUDA device")
    if name == "cuda" and "LOCAL_RANK" in os.environ:
        return torch.device("cuda", int(os.environ["LOCAL_RANK"]))
    return torch.device(name)


@dataclass(frozen=True)
class World:
    """This worker's place among ``world_size`` workers, and its device."""

    rank: int
    world_size: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def all_reduce_sum(self, values: list[float]) -> list[float]:
        """Sum a few numbers across workers (float64, so token counts stay exact)."""
        if self.world_size == 1:
            return values
        t = torch.tensor(values, dtype=torch.float64, device=self.device)
        dist.all_reduce(t)
        return t.tolist()

    def any(self, flag: bool) -> bool:
        """True on every worker if it is true on one (workers' clocks and data differ)."""
        return bool(self.all_reduce_sum([float(flag)])[0])

    def barrier(self) -> None:
        if self.world_size > 1:
            dist.barrier()

    def broadcast(self, obj):
        """Rank 0's ``obj`` on every worker (small objects only: it is pickled)."""
        if self.world_size == 1:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def gather(self, obj) -> list:
        """Every worker's ``obj``, indexed by rank, on every worker (small objects only)."""
        if self.world_size == 1:
            return [obj]
        out = [None] * self.world_size
        dist.all_gather_object(out, obj)
        return out

    def shard(self, batches: list) -> list:
        """This worker's share of an epoch's batches (all workers get the same count)."""
        return shard(batches, self.rank, self.world_size)

    def wrap(self, module: nn.Module) -> nn.Module:
        """``module`` in DistributedDataParallel when there are several workers."""
        return nn.parallel.DistributedDataParallel(module) if self.world_size > 1 else module


def init_world(device_name: str) -> World:
    """Join the torchrun process group if there is one (WORLD_SIZE > 1)."""
    device = resolve_device(device_name)
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return World(0, 1, device)
    if not dist.is_initialized():
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return World(dist.get_rank(), dist.get_world_size(), device)
