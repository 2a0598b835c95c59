"""Learning-rate schedules: values from their closed forms, and clear errors."""
import math

import pytest
import torch

from nmt_ls.optim import build_optimizer, build_scheduler, decay_factor, inverse_sqrt_factor


def lrs(name, steps, peak=2e-3, warmup=4, max_updates=10, end_lr=0.0):
    model = torch.nn.Linear(2, 2)
    opt = build_optimizer(model, peak, (0.9, 0.98), 1e-8, 0.0)
    sched = build_scheduler(opt, warmup, name, max_updates, end_lr)
    out = []
    for _ in range(steps):
        out.append(opt.param_groups[0]["lr"])  # the lr update k is taken with
        opt.step()
        sched.step()
    return out


def test_inverse_sqrt_values():
    got = lrs("inverse_sqrt", 9)
    want = [2e-3 * min((k + 1) / 4, math.sqrt(4 / (k + 1))) for k in range(9)]
    assert got == pytest.approx(want, rel=1e-12)
    assert inverse_sqrt_factor(3, 4) == 1.0 and inverse_sqrt_factor(15, 4) == 0.5


def test_linear_decay_reaches_end_lr_at_max_updates():
    got = lrs("linear", 12, warmup=4, max_updates=10, end_lr=2e-4)
    # warmup 1/4, 2/4, 3/4, peak at updates 3 and 4, then down by (peak - end)/6 per update:
    # the 10th (last) update still has a positive step, end_lr holds after it
    want = [5e-4, 1e-3, 1.5e-3, 2e-3] + [2e-4 + 1.8e-3 * (1 - j / 6) for j in range(0, 6)] + [2e-4, 2e-4]
    assert got == pytest.approx(want, rel=1e-12)


def test_cosine_decay_midpoint_and_end():
    assert decay_factor(3, 4, 10, 0.0, "cosine") == 1.0
    assert decay_factor(7, 4, 10, 0.0, "cosine") == pytest.approx(0.5)  # halfway: (7-4)/(10-4)
    assert decay_factor(7, 4, 10, 0.1, "cosine") == pytest.approx(0.55)
    assert decay_factor(9, 4, 10, 0.0, "cosine") == pytest.approx(0.5 * (1 + math.cos(math.pi * 5 / 6)))
    assert decay_factor(10, 4, 10, 0.0, "cosine") == pytest.approx(0.0, abs=1e-15)
    assert decay_factor(50, 4, 10, 0.1, "cosine") == pytest.approx(0.1)


def test_schedule_errors_name_the_recipe_key():
    with pytest.raises(ValueError, match="train.lr_scheduler must be one of"):
        lrs("step", 1)
    with pytest.raises(ValueError, match="set train.max_updates > 0"):
        lrs("linear", 1, max_updates=0)
    with pytest.raises(ValueError, match=r"train.end_lr must be in \[0, train.lr"):
        lrs("cosine", 1, end_lr=1.0)
