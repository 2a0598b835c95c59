"""Adam with decoupled weight decay (as fairseq's adam) and an inverse-square-root schedule
with linear warmup, as in fairseq and JoeyNMT."""
from __future__ import annotations

import torch
from torch import nn


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


def build_scheduler(optimizer: torch.optim.Optimizer, warmup_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: inverse_sqrt_factor(step, warmup_steps))
