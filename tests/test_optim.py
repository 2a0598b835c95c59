"""Learning-rate schedules: values from their closed forms, and clear errors."""

import math

import pytest
import torch

from nmt_ls.optim import (
    WarmupStableDecay,
    build_optimizer,
    build_scheduler,
    decay_factor,
    inverse_sqrt_factor,
    plan_total_updates,
    wsd_factor,
)


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


# ---- warmup-stable-decay ---------------------------------------------------------------------


def wsd_lrs(steps, total=20, set_total_at=None, **kwargs):
    """The lr of each of ``steps`` updates; the total is given at construction, or fixed by
    ``set_total_updates`` after ``set_total_at`` updates."""
    model = torch.nn.Linear(2, 2)
    opt = build_optimizer(model, 2e-3, (0.9, 0.98), 1e-8, 0.0)
    sched = WarmupStableDecay(opt, 4, 0 if set_total_at is not None else total, **kwargs)
    out = []
    for k in range(steps):
        if k == set_total_at:
            sched.set_total_updates(total)
        out.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return out


def test_wsd_constant_then_linear_cooldown():
    # warmup 4, cooldown round(0.25 * 20) = 5 updates from update index 15, down to end_lr at 20
    got = wsd_lrs(23, cooldown_fraction=0.25, end_lr=2e-4)
    want = [2e-3 * (k + 1) / 4 for k in range(3)] + [2e-3] * 12
    want += [2e-4 + 1.8e-3 * (1 - j / 5) for j in range(5)] + [2e-4] * 3
    assert got == pytest.approx(want, rel=1e-12)


def test_wsd_one_minus_sqrt_cooldown():
    got = wsd_lrs(21, cooldown_fraction=0.25, cooldown_shape="1-sqrt")
    want = [2e-3 * (k + 1) / 4 for k in range(3)] + [2e-3] * 12 + [2e-3 * (1 - math.sqrt(j / 5)) for j in range(6)]
    assert got == pytest.approx(want, rel=1e-12, abs=1e-18)


def test_wsd_inverse_sqrt_stable_phase_cools_down_from_its_level():
    got = wsd_lrs(21, cooldown_fraction=0.25, stable_phase="inverse_sqrt")
    want = [2e-3 * (k + 1) / 4 for k in range(3)] + [2e-3 * math.sqrt(4 / (k + 1)) for k in range(3, 15)]
    want += [2e-3 * math.sqrt(4 / 16) * (1 - j / 5) for j in range(6)]  # the level of update index 15
    assert got == pytest.approx(want, rel=1e-12, abs=1e-18)


def test_wsd_total_fixed_later_gives_the_same_lrs():
    kwargs = dict(cooldown_fraction=0.25, end_lr=1e-4)
    later = wsd_lrs(22, set_total_at=9, **kwargs)
    assert later == wsd_lrs(22, **kwargs)
    assert later[:9] == pytest.approx([5e-4, 1e-3, 1.5e-3] + [2e-3] * 6, rel=1e-12)


def test_wsd_total_fixed_at_the_cooldown_start_applies_to_the_next_update():
    # 15 updates done, a total of 20 starts the cooldown now: the 16th update already cools down
    assert wsd_lrs(17, set_total_at=15, cooldown_fraction=0.25)[15:] == pytest.approx([2e-3, 1.6e-3], rel=1e-12)


def test_wsd_resume_restores_the_total():
    def make():
        model = torch.nn.Linear(2, 2)
        opt = build_optimizer(model, 2e-3, (0.9, 0.98), 1e-8, 0.0)
        return opt, build_scheduler(opt, 4, "wsd", 0, 0.0, cooldown_fraction=0.5, cooldown_shape="1-sqrt")

    opt, sched = make()
    for _ in range(6):
        opt.step()
        sched.step()
    sched.set_total_updates(16)
    for _ in range(4):
        opt.step()
        sched.step()
    state = sched.state_dict()
    assert (state["total_updates"], state["cooldown_updates"], state["last_epoch"]) == (16, 8, 10)
    opt2, sched2 = make()
    opt2.load_state_dict(opt.state_dict())
    sched2.load_state_dict(state)
    resumed = []
    for _ in range(8):
        resumed.append(opt2.param_groups[0]["lr"])
        opt2.step()
        sched2.step()
    assert resumed == pytest.approx([2e-3 * (1 - math.sqrt(j / 8)) for j in range(2, 9)] + [0.0], rel=1e-12, abs=1e-18)


def test_wsd_factor_without_total_or_cooldown_stays_stable():
    assert wsd_factor(50, 4, 0, 0, 0.0) == 1.0
    assert wsd_factor(50, 4, 100, 0, 0.0) == 1.0
    assert wsd_factor(15, 4, 0, 0, 0.0, stable_phase="inverse_sqrt") == pytest.approx(0.5)
    assert wsd_factor(0, 0, 10, 2, 0.0) == 1.0  # no warmup


def test_wsd_errors_name_the_recipe_key():
    opt = build_optimizer(torch.nn.Linear(2, 2), 2e-3, (0.9, 0.98), 1e-8, 0.0)
    with pytest.raises(ValueError, match="inside train.warmup_steps=4"):
        WarmupStableDecay(opt, 4, 10, cooldown_fraction=0.7)
    with pytest.raises(ValueError, match=r"train.cooldown_fraction must be in \[0, 1\]"):
        WarmupStableDecay(opt, 4, 10, cooldown_fraction=1.5)
    with pytest.raises(ValueError, match="train.cooldown_shape must be one of linear, 1-sqrt"):
        WarmupStableDecay(opt, 4, cooldown_shape="cosine")
    with pytest.raises(ValueError, match="train.stable_phase must be one of constant, inverse_sqrt"):
        WarmupStableDecay(opt, 4, stable_phase="cosine")
    sched = WarmupStableDecay(opt, 4, cooldown_fraction=0.5)
    for _ in range(12):
        opt.step()
        sched.step()
    with pytest.raises(ValueError, match="starts the cooldown at update 10, but 12 updates are done already"):
        sched.set_total_updates(20)


def test_wsd_needs_no_max_updates():
    opt = build_optimizer(torch.nn.Linear(2, 2), 2e-3, (0.9, 0.98), 1e-8, 0.0)
    sched = build_scheduler(opt, 4, "wsd", 0, 0.0)
    assert isinstance(sched, WarmupStableDecay) and sched.total_updates == 0


# ---- planning the total from a measured rate -------------------------------------------------


def test_plan_total_updates_without_validations():
    # 600 s budget - 100 s spent - 60 s reserve = 440 s at 25 s / 50 updates: 880 more updates
    assert plan_total_updates(10, 100, 200, 50, 25.0, 60) == 1080


def test_plan_total_updates_counts_the_validations_to_come():
    # validations (10 s) every 100 updates: n = 720 ends at 920, validating at 300, ..., 900 and
    # at 920: 360 s + 8 * 10 s = 440 s; n = 721 costs 440.5 s
    assert plan_total_updates(10, 100, 200, 50, 25.0, 60, validate_every_updates=100, validation_s=10) == 920


def test_plan_total_updates_matches_enumeration():
    gen = torch.Generator().manual_seed(0)
    for _ in range(200):
        budget, elapsed, reserve = 1 + 9 * torch.rand(1, generator=gen).item(), 30.0, 20.0
        done, every = int(torch.randint(0, 300, (1,), generator=gen)), int(torch.randint(0, 80, (1,), generator=gen))
        per_update, val_s = 0.05 + torch.rand(1, generator=gen).item(), 5 * torch.rand(1, generator=gen).item()
        left = 60 * budget - elapsed - reserve

        def cost(n):
            vals = -(-(done + n) // every) - done // every if every else 0
            return n * per_update + vals * val_s

        n = 0
        while cost(n + 1) <= left:
            n += 1
        want = done + n if cost(0) <= left else done
        assert plan_total_updates(budget, elapsed, done, 40, 40 * per_update, reserve, every, val_s) == want


def test_plan_total_updates_out_of_time_and_errors():
    assert plan_total_updates(1, 70, 300, 50, 25.0, 0) == 300
    with pytest.raises(ValueError, match="window needs updates and seconds > 0"):
        plan_total_updates(10, 0, 0, 0, 25.0, 0)
    with pytest.raises(ValueError, match="must be >= 0"):
        plan_total_updates(10, 0, 0, 50, 25.0, -1)
