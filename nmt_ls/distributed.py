"""Device, process group and the few collective operations the training loop needs.

One process trains on CPU or one GPU. Under ``torchrun`` each worker joins the process group
(gloo on CPU, nccl on GPU) and :class:`World` carries its rank; with one worker every
collective is the identity, so the loop reads the same either way.

Collectives time out after ``train.dist_timeout_minutes``; the waits for work that rank 0 does
alone (the set-up: preparing the corpus, training the tokenizer, binarizing; the decoding probe,
validation and checkpoint writes) do not: they run in a gloo group of their own with a limit of
days (``SETUP_TIMEOUT``), since torchrun ends every worker if rank 0 fails.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist
from torch import nn

from nmt_ls.batching import shard

SETUP_TIMEOUT = timedelta(days=7)  # the limit of a wait for rank 0's work alone: none in practice


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
    setup_group: object = None  # the gloo group that waits for rank 0's work alone (several workers)

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

    def wait_for_main(self) -> None:
        """Every worker waits here until rank 0's work alone (set-up, decoding, validation, a
        checkpoint write) is done, however long it takes: this wait does not count against
        ``train.dist_timeout_minutes``, which catches workers stuck in a collective of their own."""
        if self.world_size > 1:
            dist.barrier(group=self.setup_group)

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
        """This worker's share of ``batches`` (an update's, all workers'; every worker gets as many)."""
        return shard(batches, self.rank, self.world_size)

    def wrap(self, module: nn.Module) -> nn.Module:
        """``module`` in DistributedDataParallel when there are several workers."""
        return nn.parallel.DistributedDataParallel(module) if self.world_size > 1 else module


def init_world(device_name: str, timeout_minutes: float) -> World:
    """Join the torchrun process group if there is one (WORLD_SIZE > 1); its collectives time
    out after ``timeout_minutes``."""
    device = resolve_device(device_name)
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return World(0, 1, device)
    if not dist.is_initialized():
        if device.type == "cuda":
            torch.cuda.set_device(device)
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend, timeout=timedelta(minutes=timeout_minutes))
    setup_group = dist.new_group(backend="gloo", timeout=SETUP_TIMEOUT)
    return World(dist.get_rank(), dist.get_world_size(), device, setup_group)


def is_main_process() -> bool:
    """True in a single process and in rank 0 of a process group (after training has joined it)."""
    return not dist.is_initialized() or dist.get_rank() == 0
