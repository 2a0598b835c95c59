"""Learning-rate schedules: values from their closed forms, and clear errors."""

import math

import pytest
import torch

from nmt_ls.optim import (
    WarmupStableDecay,
    WsdShape,
    build_optimizer,
    build_scheduler,
    decay_factor,
    go_to_update,
    inverse_sqrt_factor,
    wsd_factor,
)
from nmt_ls.planner import Cadence, plan_total_updates


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


def wsd(opt, warmup, total=0, end_lr=0.0, **shape):
    """A WarmupStableDecay with the shape's fields given as keywords."""
    return WarmupStableDecay(opt, warmup, total, end_lr, WsdShape(**shape))


def wsd_lrs(steps, total=20, set_total_at=None, **kwargs):
    """The lr of each of ``steps`` updates; the total is given at construction, or fixed by
    ``set_total_updates`` after ``set_total_at`` updates."""
    model = torch.nn.Linear(2, 2)
    opt = build_optimizer(model, 2e-3, (0.9, 0.98), 1e-8, 0.0)
    sched = wsd(opt, 4, 0 if set_total_at is not None else total, **kwargs)
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
        return opt, build_scheduler(opt, 4, "wsd", 0, 0.0, WsdShape(cooldown_fraction=0.5, cooldown_shape="1-sqrt"))

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
    assert wsd_factor(15, 4, 0, 0, 0.0, WsdShape(stable_phase="inverse_sqrt")) == pytest.approx(0.5)
    assert wsd_factor(0, 0, 10, 2, 0.0) == 1.0  # no warmup


def test_wsd_errors_name_the_recipe_key():
    opt = build_optimizer(torch.nn.Linear(2, 2), 2e-3, (0.9, 0.98), 1e-8, 0.0)
    with pytest.raises(ValueError, match="inside train.warmup_steps=4"):
        wsd(opt, 4, 10, cooldown_fraction=0.7)
    with pytest.raises(ValueError, match=r"train.cooldown_fraction must be in \[0, 1\]"):
        wsd(opt, 4, 10, cooldown_fraction=1.5)
    with pytest.raises(ValueError, match="train.cooldown_shape must be one of linear, 1-sqrt"):
        wsd(opt, 4, cooldown_shape="cosine")
    with pytest.raises(ValueError, match="train.stable_phase must be one of constant, inverse_sqrt"):
        wsd(opt, 4, stable_phase="cosine")


def test_wsd_needs_no_max_updates():
    opt = build_optimizer(torch.nn.Linear(2, 2), 2e-3, (0.9, 0.98), 1e-8, 0.0)
    sched = build_scheduler(opt, 4, "wsd", 0, 0.0)
    assert isinstance(sched, WarmupStableDecay) and sched.total_updates == 0


def replanned_lrs(steps, plans, warmup=4, **kwargs):
    """The lr of each of ``steps`` updates, with ``plans[k] = total`` (or ``(total, warmup)``)
    fixed after ``k`` updates."""
    opt = build_optimizer(torch.nn.Linear(2, 2), 2e-3, (0.9, 0.98), 1e-8, 0.0)
    sched = wsd(opt, warmup, **kwargs)
    out = []
    for k in range(steps):
        if k in plans:
            sched.set_total_updates(*plans[k]) if isinstance(plans[k], tuple) else sched.set_total_updates(plans[k])
        out.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return out


def test_wsd_total_whose_cooldown_would_have_begun_cools_down_from_now():
    # 12 updates done at 2e-3; a total of 20 would have cooled down from update 10: it cools down from
    # update 12 instead, over the 8 updates left, and still reaches end_lr at update 20
    got = replanned_lrs(22, {12: 20}, cooldown_fraction=0.5)
    assert got[12:] == pytest.approx([2e-3 * (1 - j / 8) for j in range(9)] + [0.0], rel=1e-12, abs=1e-18)


def test_wsd_shorter_total_inside_the_cooldown_goes_on_from_the_lr_of_now():
    # total 20, cooldown from update 10: at update 14 the lr is 2e-3 * 0.6; a total of 16 (a machine
    # that slowed down) ends the cooldown at 16 from there; a total of 24 stretches it to 24
    shorter = replanned_lrs(18, {0: 20, 14: 16}, cooldown_fraction=0.5)
    assert shorter[14:] == pytest.approx([1.2e-3, 0.6e-3, 0.0, 0.0], rel=1e-12, abs=1e-18)
    longer = replanned_lrs(25, {0: 20, 14: 24}, cooldown_fraction=0.5)
    assert longer[14:] == pytest.approx([1.2e-3 * (1 - j / 10) for j in range(11)], rel=1e-12, abs=1e-18)
    assert all(a >= b for lrs in (shorter[3:], longer[3:]) for a, b in zip(lrs, lrs[1:]))  # after the warmup


def test_wsd_first_plan_shortens_the_warmup_from_the_lr_of_now():
    # warmup 100 asked for; after 3 updates a plan of 40 updates sets it to 6: the lr goes on
    # linearly from 8e-5 (update 4's under the old warmup) to the peak at update 6, as a warmup of 6 would
    got = replanned_lrs(8, {3: (40, 6)}, warmup=100, cooldown_fraction=0.2)
    rise = [8e-5 + (2e-3 - 8e-5) * j / 3 for j in (1, 2, 3)]
    assert got == pytest.approx([2e-5, 4e-5, 6e-5, *rise, 2e-3, 2e-3], rel=1e-12)


def test_wsd_set_peak_keeps_the_shape():
    opt = build_optimizer(torch.nn.Linear(2, 2), 2e-3, (0.9, 0.98), 1e-8, 0.0)
    sched = wsd(opt, 4, 20, end_lr=2e-4, cooldown_fraction=0.5)
    for _ in range(15):
        opt.step()
        sched.step()
    sched.set_peak(1e-3, 0.0)  # update 15 of a cooldown from 10 to 20: half way
    assert opt.param_groups[0]["lr"] == pytest.approx(1e-3 * 0.5, rel=1e-12)


def test_wsd_refit_of_a_finished_run_takes_the_new_totals_lrs():
    # issue 29 row 2: a finished 20-update run (a cooldown of 4 from update 16) re-fitted to 22 on
    # --resume: updates 20 and 21 take the lrs of a 22-update schedule (a cooldown of 4 from update
    # 18: half and a quarter of the peak), not end_lr
    got = replanned_lrs(23, {0: 20, 20: (22, None, True)})
    assert got[16:20] == pytest.approx([2e-3 * (1 - j / 4) for j in range(4)], rel=1e-12)
    assert got[20:] == pytest.approx([1e-3, 5e-4, 0.0], rel=1e-12, abs=1e-18)


def test_wsd_set_shape_takes_the_new_shapes_lrs_at_the_same_total():
    # issue 29 row 14: 12 updates into a 20-update schedule (a linear cooldown from update 16), a
    # cooldown_fraction of 0.5 and a 1-sqrt cooldown: the lrs of that schedule from update 12 on
    opt = build_optimizer(torch.nn.Linear(2, 2), 2e-3, (0.9, 0.98), 1e-8, 0.0)
    sched = wsd(opt, 4, 20)
    for _ in range(12):
        opt.step()
        sched.step()
    sched.set_shape(WsdShape(0.5, "constant", "1-sqrt"))
    got = []
    for _ in range(9):
        got.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert got == pytest.approx([2e-3 * (1 - math.sqrt((k - 10) / 10)) for k in range(12, 21)], rel=1e-12, abs=1e-18)


def test_go_to_update_puts_a_fresh_schedule_at_the_update():
    # issue 29 row 7: a schedule of another kind than a resumed checkpoint's goes on from its update
    opt = build_optimizer(torch.nn.Linear(2, 2), 2e-3, (0.9, 0.98), 1e-8, 0.0)
    sched = build_scheduler(opt, 4, "inverse_sqrt")
    go_to_update(sched, 12)
    got = []
    for _ in range(3):
        got.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert got == pytest.approx([2e-3 * math.sqrt(4 / (k + 1)) for k in (12, 13, 14)], rel=1e-12)


# ---- planning the total from a measured rate -------------------------------------------------


def test_plan_total_updates_without_validations():
    # 440 s left at 0.5 s per update: 880 more updates
    assert plan_total_updates(440, 0.5, 200) == 1080


def test_plan_total_updates_counts_the_validations_to_come():
    # validations (10 s) every 100 updates: n = 720 ends at 920, validating at 300, ..., 900 and
    # at 920: 360 s + 8 * 10 s = 440 s; n = 721 costs 440.5 s
    assert plan_total_updates(440, 0.5, 200, Cadence(every=100, validated_at=200), 10) == 920


def test_cadence_counts_epoch_ends_and_every_n_once_each():
    # every 10 updates and at epoch ends 25, 50, 75: after update 5 up to 50 come 10, 20, 25, 30, 40, 50
    cadence = Cadence(every=10, epoch_updates=25, next_epoch_end=25, validated_at=5)
    assert cadence.count(5, 50) == 6
    assert cadence.count(5, 52) == 7  # and the last one after update 52
    assert cadence.count(5, 5) == 0  # nothing to come: validated at 5 already
    assert Cadence(epoch_updates=25, next_epoch_end=25).count(30, 74) == 2  # 50, and the last at 74


def test_plan_total_updates_matches_enumeration():
    gen = torch.Generator().manual_seed(0)

    def draw(lo, hi):
        return int(torch.randint(lo, hi, (1,), generator=gen))

    for _ in range(200):
        left, done, every, epoch = (
            10 + 300 * torch.rand(1, generator=gen).item(),
            draw(0, 300),
            draw(0, 80),
            draw(0, 90),
        )
        next_end = done + draw(1, 90)
        per_update, val_s = 0.05 + torch.rand(1, generator=gen).item(), 5 * torch.rand(1, generator=gen).item()
        cadence = Cadence(every, epoch, next_end, validated_at=done)

        def cost(n):
            ends = {next_end + k * epoch for k in range(1000)} if epoch else set()
            at = [u for u in range(done + 1, done + n + 1) if (every and u % every == 0) or u in ends]
            final = n > 0 and done + n not in at
            return n * per_update + (len(at) + final) * val_s

        n = 0
        while cost(n + 1) <= left:
            n += 1
        assert plan_total_updates(left, per_update, done, cadence, val_s) == done + n
        assert plan_total_updates(left, per_update, done, cadence, val_s, max_total=done + 3) == done + min(n, 3)


def test_plan_total_updates_out_of_time_and_errors():
    assert plan_total_updates(-10, 0.5, 300) == 300
    with pytest.raises(ValueError, match="seconds per update must be > 0"):
        plan_total_updates(10, 0, 0)
    with pytest.raises(ValueError, match="must be >= 0"):
        plan_total_updates(10, 0.5, 0, Cadence(), -1)
