"""Adam with decoupled weight decay (as fairseq's adam) and learning-rate schedules with linear
warmup: inverse square root (fairseq, JoeyNMT), linear or cosine decay to ``end_lr`` at
``max_updates`` (fairseq's polynomial_decay with power 1, and a half cosine), and
warmup-stable-decay (Hägele et al. 2024, arXiv:2405.18392), whose total number of updates may
be fixed after training has started (:mod:`nmt_ls.planner` turns a time budget into one)."""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import torch
from torch import nn

SCHEDULES = ("inverse_sqrt", "linear", "cosine", "wsd")
STABLE_PHASES = ("constant", "inverse_sqrt")
COOLDOWN_SHAPES = ("linear", "1-sqrt")


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


@dataclass(frozen=True)
class WsdShape:
    """The shape of a warmup-stable-decay schedule, whatever its length.

    Args:
        cooldown_fraction (float): share of the updates given to the cooldown, in [0, 1].
        stable_phase (str): ``constant`` or ``inverse_sqrt``.
        cooldown_shape (str): ``linear`` or ``1-sqrt``.
    """

    cooldown_fraction: float = 0.2
    stable_phase: str = "constant"
    cooldown_shape: str = "linear"

    def __post_init__(self):
        if self.stable_phase not in STABLE_PHASES:
            raise ValueError(f"train.stable_phase must be one of {', '.join(STABLE_PHASES)}, got {self.stable_phase!r}")
        if self.cooldown_shape not in COOLDOWN_SHAPES:
            shapes = ", ".join(COOLDOWN_SHAPES)
            raise ValueError(f"train.cooldown_shape must be one of {shapes}, got {self.cooldown_shape!r}")
        if not 0.0 <= self.cooldown_fraction <= 1.0:
            raise ValueError(f"train.cooldown_fraction must be in [0, 1], got {self.cooldown_fraction}")


def wsd_factor(
    step: int,
    warmup_steps: int,
    total_updates: int,
    cooldown_updates: int,
    end_ratio: float,
    shape: WsdShape = WsdShape(),
) -> float:
    """Multiplier of the peak lr at update ``step`` (0-based) under warmup-stable-decay.

    Linear warmup to 1 at ``warmup_steps``; then the stable phase ``level(step)``: 1
    (``constant``) or ``sqrt(warmup_steps / (step + 1))`` (``inverse_sqrt``, as
    :func:`inverse_sqrt_factor`); from ``start = total_updates - cooldown_updates`` on, a
    cooldown from ``level(start)`` to ``end_ratio``::

        factor = end_ratio + (level(start) - end_ratio) * (1 - f(p)),  p = (step - start) / cooldown_updates

    with ``f(p) = p`` (``linear``) or ``sqrt(p)`` (``1-sqrt``), ``p`` capped at 1. As in
    :func:`decay_factor`, ``end_ratio`` is reached at ``step = total_updates``, so the last
    update still moves. ``total_updates = 0`` (not fixed yet) or ``cooldown_updates = 0``:
    no cooldown.
    """
    start = total_updates - cooldown_updates
    if total_updates <= 0 or cooldown_updates <= 0 or step < start:
        return _stable_level(step, warmup_steps, shape.stable_phase)
    progress = min(1.0, (step - start) / cooldown_updates)
    left = 1.0 - (progress if shape.cooldown_shape == "linear" else math.sqrt(progress))
    return end_ratio + (_stable_level(start, warmup_steps, shape.stable_phase) - end_ratio) * left


def _stable_level(step: int, warmup_steps: int, stable_phase: str) -> float:
    """Warmup, then 1 (``constant``) or the inverse square root, at update ``step`` (0-based)."""
    if stable_phase == "inverse_sqrt":
        return inverse_sqrt_factor(step, warmup_steps)
    return min(1.0, (step + 1) / warmup_steps) if warmup_steps > 0 else 1.0


class WarmupStableDecay(torch.optim.lr_scheduler.LRScheduler):
    """Warmup-stable-decay schedule (Hägele et al. 2024): the lrs of :func:`wsd_factor`.

    The cooldown covers the last ``round(cooldown_fraction * total_updates)`` updates. The
    total may be left at 0 (warmup, then the stable phase, with no end in sight) and fixed
    later with :meth:`set_total_updates`, e.g. from :func:`plan_total_updates` once the
    update rate is measured, and fixed again as often as the rate changes. A total whose
    cooldown would have begun already starts it now, from the lr of now, so the lr never
    jumps up and still reaches ``end_lr`` at the new total. A re-fit (``--resume`` with a new
    total, budget or shape) takes the new schedule's lrs instead. It is all part of
    :meth:`state_dict`, so a resumed run keeps it.

    Args:
        optimizer: its param groups' lrs are the peaks.
        warmup_steps (int): linear warmup updates.
        total_updates (int): updates of the whole run, cooldown included; 0: not fixed yet.
            Default: 0
        end_lr (float): lr after the last update, in [0, peak] (of the first group; the
            other groups keep the same ratio). Default: 0.0
        shape (WsdShape): the cooldown's share and shape, the stable phase. Default: a 20%
            linear cooldown after a constant stable phase

    The shape's fields are kept as plain attributes, so that the state dict holds only numbers
    and strings (checkpoints load with ``weights_only=True``).
    """

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        warmup_steps: int,
        total_updates: int = 0,
        end_lr: float = 0.0,
        shape: WsdShape = WsdShape(),
        last_epoch: int = -1,
    ):
        peak = optimizer.param_groups[0]["lr"]
        self.warmup_steps, self.cooldown_fraction = warmup_steps, shape.cooldown_fraction
        self.stable_phase, self.cooldown_shape = shape.stable_phase, shape.cooldown_shape
        self.end_ratio = end_lr / peak if peak > 0 else 0.0
        self.cooldown_from = None  # the factor the cooldown starts from; None: the stable level there
        self.warmup_from = None  # (update, factor) the warmup goes on from after a change of its length
        self.total_updates, self.cooldown_updates = self._checked_total(total_updates)
        super().__init__(optimizer, last_epoch)

    def _checked_total(self, total_updates: int) -> tuple[int, int]:
        """(total_updates, cooldown_updates), or ValueError if the cooldown would start inside the warmup."""
        if total_updates < 0:
            raise ValueError(f"total_updates must be >= 0, got {total_updates}")
        cooldown = round(self.cooldown_fraction * total_updates)
        start = total_updates - cooldown
        if total_updates and start < self.warmup_steps:
            raise ValueError(
                f"train.cooldown_fraction={self.cooldown_fraction} of {total_updates} updates starts the "
                f"cooldown at update {start}, inside train.warmup_steps={self.warmup_steps}"
            )
        return total_updates, cooldown

    @property
    def cooldown_start(self) -> int:
        """The first update of the cooldown (0-based index), or a huge number before a total is fixed."""
        return self.total_updates - self.cooldown_updates if self.total_updates else 2**62

    def factor(self, step: int) -> float:
        """Multiplier of the peak lr at update ``step`` (0-based)."""
        if self.warmup_from is not None and self.warmup_from[0] <= step < self.warmup_steps <= self.cooldown_start:
            start, level = self.warmup_from
            return level + (1.0 - level) * (step + 1 - start) / (self.warmup_steps - start)
        if self.cooldown_from is None or step < self.cooldown_start:
            return wsd_factor(
                step, self.warmup_steps, self.total_updates, self.cooldown_updates, self.end_ratio, self.shape
            )
        progress = min(1.0, (step - self.cooldown_start) / max(1, self.cooldown_updates))
        left = 1.0 - (progress if self.cooldown_shape == "linear" else math.sqrt(progress))
        return self.end_ratio + (self.cooldown_from - self.end_ratio) * left

    @property
    def shape(self) -> WsdShape:
        return WsdShape(self.cooldown_fraction, self.stable_phase, self.cooldown_shape)

    def get_lr(self) -> list[float]:
        return [base * self.factor(self.last_epoch) for base in self.base_lrs]

    def set_total_updates(self, total_updates: int, warmup_steps: int | None = None, refit: bool = False) -> None:
        """Fix the run's length (cooldown included) now, and the warmup if given; the next update
        already takes its lr.

        A plan that changes while the run trains (``refit`` False): if the cooldown in force has
        begun, or that of ``total_updates`` would have begun before now, the cooldown runs from
        the lr of now to ``end_lr`` at ``total_updates``, so the lr never rises after the warmup;
        otherwise the stable phase goes on to the new total's cooldown. With ``refit`` (``--resume``
        with a new total, budget or shape: the recipe's schedule changed), the updates to come take
        the lrs the new total gives from the start, wherever its cooldown starts: a finished run
        extended goes on at the new total's lr of now, not at ``end_lr``."""
        done = max(self.last_epoch, 0)
        now = self.factor(done)
        began = self.total_updates and done > self.cooldown_start
        if warmup_steps is not None and warmup_steps != self.warmup_steps:
            # a warmup of another length goes on from the lr of now, linearly to the peak
            self.warmup_from = (done, now) if done < warmup_steps else None
            self.warmup_steps = warmup_steps
        cooldown = round(self.cooldown_fraction * total_updates)
        if total_updates and not refit and (began or total_updates - cooldown < done):
            total = max(total_updates, done)
            self.total_updates, self.cooldown_updates, self.cooldown_from = total, total - done, now
        else:
            self.total_updates, self.cooldown_updates = self._checked_total(total_updates)
            self.cooldown_from = None
        self.set_peak(self.base_lrs[0], self.end_ratio * self.base_lrs[0])

    def set_shape(self, shape: WsdShape) -> None:
        """Change the cooldown's share and shape and the stable phase (``--resume`` with a new
        recipe): the updates to come take the lrs of the new shape at the same total, as a re-fit
        of :meth:`set_total_updates`."""
        self.cooldown_fraction, self.stable_phase = shape.cooldown_fraction, shape.stable_phase
        self.cooldown_shape = shape.cooldown_shape
        self.set_total_updates(self.total_updates, refit=True)

    def set_peak(self, lr: float, end_lr: float) -> None:
        """Change the peak lr and ``end_lr`` (e.g. on resume with a new recipe); the schedule's
        shape is kept and the next update takes the lr it gives."""
        ratios = [base / self.base_lrs[0] if self.base_lrs[0] > 0 else 1.0 for base in self.base_lrs]
        self.base_lrs = [lr * r for r in ratios]
        self.end_ratio = end_lr / lr if lr > 0 else 0.0
        for group, base in zip(self.optimizer.param_groups, self.base_lrs):
            group["initial_lr"] = base
            group["lr"] = base * self.factor(max(self.last_epoch, 0))
        self._last_lr = [group["lr"] for group in self.optimizer.param_groups]


def go_to_update(scheduler: torch.optim.lr_scheduler.LRScheduler, update: int) -> None:
    """Put ``scheduler`` at update ``update`` (the 0-based index of the next update), as if it had
    run from the start: its param groups take its peak lrs and its lr there. For a schedule built
    afresh on ``--resume``, of another kind than the checkpoint's."""
    for group, base in zip(scheduler.optimizer.param_groups, scheduler.base_lrs):
        group["initial_lr"] = base
    scheduler.last_epoch = update - 1
    with warnings.catch_warnings():  # no update is skipped: the next optimizer step takes this lr
        warnings.filterwarnings("ignore", r"Detected call of `lr_scheduler\.step\(\)` before")
        scheduler.step()


def check_schedule(name: str, max_updates: int, lr: float, end_lr: float) -> None:
    """Raise ValueError, naming the recipe key, for a schedule that cannot run."""
    if name not in SCHEDULES:
        raise ValueError(f"train.lr_scheduler must be one of {', '.join(SCHEDULES)}, got {name!r}")
    if name in ("linear", "cosine") and max_updates <= 0:
        raise ValueError(
            f"train.lr_scheduler={name} decays to train.end_lr at train.max_updates; set train.max_updates > 0"
        )
    if not 0.0 <= end_lr <= lr:
        raise ValueError(f"train.end_lr must be in [0, train.lr={lr}], got {end_lr}")


def build_scheduler(
    optimizer: torch.optim.Optimizer,
    warmup_steps: int,
    name: str = "inverse_sqrt",
    max_updates: int = 0,
    end_lr: float = 0.0,
    shape: WsdShape = WsdShape(),
) -> torch.optim.lr_scheduler.LRScheduler:
    """The schedule ``name``; for ``wsd``, ``max_updates = 0`` leaves the total to
    :meth:`WarmupStableDecay.set_total_updates`, and ``shape`` applies to ``wsd`` only."""
    peak = optimizer.param_groups[0]["lr"]
    check_schedule(name, max_updates, peak, end_lr)
    if name == "wsd":
        return WarmupStableDecay(optimizer, warmup_steps, max_updates, end_lr, shape)
    if name == "inverse_sqrt":
        return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: inverse_sqrt_factor(step, warmup_steps))
    ratio = end_lr / peak if peak > 0 else 0.0
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: decay_factor(step, warmup_steps, max_updates, ratio, name)
    )
