"""Adam with decoupled weight decay (as fairseq's adam) and learning-rate schedules with linear
warmup: inverse square root (fairseq, JoeyNMT), and linear or cosine decay to ``end_lr`` at
``max_updates`` (fairseq's polynomial_decay with power 1, and a half cosine)."""
from __future__ import annotations

import math

import torch
from torch import nn

SCHEDULES = ("inverse_sqrt", "linear", "cosine")


def build_optimizer(
    model: nn.Module, lr: float, betas: tuple[float, float], eps: float, weight_decay: float
) -> torch.optim.Optimizer:
    return torch.optim.AdamW(model.parameters(), lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)


def inverse_sqrt_factor(step: int, warmup_steps: int) -> float:
    """Multiplier of the peak lr at update ``step`` (0-based): linear warmup to 1 at
    ``warmup_steps``, then ``sqrt(warmup_steps / step)``."""
    step = step + 1
    if warmup_steps <= 0:
        return 1.0 / step**0.5
    return min(step / warmup_steps, (warmup_steps / step) ** 0.5)


def decay_factor(step: int, warmup_steps: int, total_steps: int, end_ratio: float, shape: str) -> float:
    """Multiplier of the peak lr at update ``step`` (0-based): linear warmup to 1 at
    ``warmup_steps``, then ``shape`` (linear or cosine) decay that reaches ``end_ratio``
    after ``total_steps`` updates (as fairseq's polynomial_decay: the last update still
    moves), and ``end_ratio`` beyond."""
    if step + 1 < warmup_steps:
        return (step + 1) / warmup_steps
    progress = min(1.0, max(0, step - warmup_steps) / max(1, total_steps - warmup_steps))
    left = 1.0 - progress if shape == "linear" else 0.5 * (1.0 + math.cos(math.pi * progress))
    return end_ratio + (1.0 - end_ratio) * left


def check_schedule(name: str, max_updates: int, lr: float, end_lr: float) -> None:
    """Raise ValueError, naming the recipe key, for a schedule that cannot run."""
    if name not in SCHEDULES:
        raise ValueError(f"train.lr_scheduler must be one of {', '.join(SCHEDULES)}, got {name!r}")
    if name != "inverse_sqrt" and max_updates <= 0:
        raise ValueError(f"train.lr_scheduler={name} decays to train.end_lr at train.max_updates; set train.max_updates > 0")
    if not 0.0 <= end_lr <= lr:
        raise ValueError(f"train.end_lr must be in [0, train.lr={lr}], got {end_lr}")


def build_scheduler(
    optimizer: torch.optim.Optimizer,
    warmup_steps: int,
    name: str = "inverse_sqrt",
    max_updates: int = 0,
    end_lr: float = 0.0,
) -> torch.optim.lr_scheduler.LambdaLR:
    peak = optimizer.param_groups[0]["lr"]
    check_schedule(name, max_updates, peak, end_lr)
    if name == "inverse_sqrt":
        return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: inverse_sqrt_factor(step, warmup_steps))
    ratio = end_lr / peak if peak > 0 else 0.0
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: decay_factor(step, warmup_steps, max_updates, ratio, name))
