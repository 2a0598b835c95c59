"""The wsd planner on a fake clock: a time budget becomes a schedule that ends its cooldown in
time on a slow machine, a machine that slows down, a first epoch longer than the budget, a run
capped by max_epochs, and on resume with a new budget, total or learning rate."""

import json
from pathlib import Path

import pytest

from nmt_ls import checkpoint
from nmt_ls import train as loop
from nmt_ls.config import load_recipe
from nmt_ls.optim import wsd_factor

from conftest import SMOKE_RECIPE, FakeClock, overrides

WSD = (
    "train.lr_scheduler='wsd'",
    "train.max_updates=0",
    "train.max_epochs=1000",
    "train.plan_window_updates=5",
    "train.log_every_updates=1",
    "train.end_lr=0.0",
    "model.dropout=0.0",
)


def read_log(out_dir):
    return [json.loads(line) for line in (Path(out_dir) / "train_log.jsonl").read_text().splitlines()]


def train_lrs(out_dir):
    return [r["lr"] for r in read_log(out_dir) if r["kind"] == "train"]


@pytest.fixture
def clocked(monkeypatch):
    """Train on a fake clock: ``seconds(update)`` per update (0-based), 0.5 s per validation;
    every save asserts that the checkpoint holds the plan in force."""
    clock = FakeClock()
    monkeypatch.setattr(loop, "time", clock)
    step, validate, save = loop.train_step, loop.validate, loop.save

    def saving(run, name):
        if run.progress.planned_updates:
            assert run.scheduler.total_updates == run.progress.planned_updates
        save(run, name)

    monkeypatch.setattr(loop, "validate", lambda run: (clock.advance(0.5), validate(run))[1])
    monkeypatch.setattr(loop, "save", saving)

    def run(out_dir, *extra, seconds=lambda update: 0.1, resume=False, test_split=False):
        def timed_step(run, group):
            clock.advance(seconds(run.progress.update))
            return step(run, group)

        monkeypatch.setattr(loop, "train_step", timed_step)
        cfg = load_recipe(SMOKE_RECIPE, overrides(out_dir, *WSD, *extra))
        return cfg, loop.train(cfg, resume=resume, test_split=test_split)

    return run


def ends_its_cooldown(summary):
    return summary["stop_reason"].startswith(f"reached the {summary['updates']} updates planned") and (
        summary["final_lr"] == 0.0
    )


def test_slow_machine_plans_after_one_window_with_a_warmup_sized_to_the_budget(tmp_path, clocked, caplog):
    # 7 s per update, 7 minutes: about 58 updates. The recipe asks for a 250-update warmup, which
    # would fill the run: the plan comes after the first window (update 6) and ends the warmup at
    # 10% of the run, going on from the lr of then
    with caplog.at_level("INFO", logger="nmt_ls.train"):
        cfg, summary = clocked(tmp_path / "run", "train.max_minutes=7", "train.warmup_steps=250", seconds=lambda u: 7.0)
    assert ends_its_cooldown(summary)
    assert 50 <= summary["updates"] and summary["minutes"] <= 7
    assert "wsd plan: " in caplog.text
    state = checkpoint.load(summary["checkpoint_last"])["scheduler"]
    assert state["warmup_steps"] == max(7, round(0.1 * summary["updates"]))  # planned after update 6
    lrs = train_lrs(tmp_path / "run")
    assert lrs[:6] == pytest.approx([cfg.train.lr * (k + 1) / 250 for k in range(6)], rel=1e-9)
    assert lrs[state["warmup_steps"] - 1] == pytest.approx(cfg.train.lr, rel=1e-9)  # the peak at the warmup's end


def test_first_epoch_longer_than_the_budget_is_planned_inside_it(tmp_path, clocked):
    # 1 s per update and 12 s: the plan must come, and its cooldown end, inside the first epoch
    cfg, summary = clocked(tmp_path / "run", "train.max_minutes=0.2", "train.warmup_steps=2", seconds=lambda u: 1.0)
    assert ends_its_cooldown(summary)
    assert summary["epochs"] == 0 and 8 <= summary["updates"] <= 12


def test_machine_that_slows_down_moves_the_cooldown_earlier(tmp_path, clocked, caplog):
    # 0.1 s per update, then 0.3 s from update 40 on: the re-plans shorten the run, the cooldown
    # still ends at end_lr, and the run ends inside its 12 s
    with caplog.at_level("INFO", logger="nmt_ls.train"):
        cfg, summary = clocked(
            tmp_path / "run",
            "train.max_minutes=0.2",
            "train.warmup_steps=5",
            "train.validate_every_updates=30",
            seconds=lambda u: 0.1 if u < 40 else 0.3,
        )
    plans = [int(line.split(": ")[1].split()[0]) for line in caplog.text.splitlines() if "wsd plan: " in line]
    replans = [int(line.split(": ")[1].split()[0]) for line in caplog.text.splitlines() if "wsd re-plan: " in line]
    assert ends_its_cooldown(summary) and summary["minutes"] * 60 <= 12.0
    assert replans[-1] == summary["updates"] < plans[0]
    lrs = train_lrs(tmp_path / "run")[5:]
    assert all(a >= b for a, b in zip(lrs, lrs[1:]))  # after the warmup the lr never rises


def test_max_epochs_caps_the_plan_so_the_cooldown_still_ends(tmp_path, clocked):
    one_epoch = clocked(tmp_path / "probe", "train.max_minutes=10", "train.max_epochs=1", "train.warmup_steps=2")[1]
    cfg, summary = clocked(tmp_path / "run", "train.max_minutes=10", "train.max_epochs=2", "train.warmup_steps=2")
    assert one_epoch["final_lr"] == summary["final_lr"] == 0.0
    assert summary["updates"] == 2 * one_epoch["updates"] and summary["epochs"] == 2


def test_nmt_ls_run_keeps_the_test_decoding_time_out_of_training(tmp_path, clocked, monkeypatch):
    # decoding costs 0.05 s a sentence greedy and 0.1 s with beam (the fake clock): the fixture's
    # 200 test sentences reserve 200 * 0.05 * 3 + 20 = 50 s of a 90 s budget
    translate = loop.translate

    def timed_translate(model, tok, lines, options, *args, **kwargs):
        loop.time.advance(len(lines) * (0.05 if options.beam_size == 1 else 0.1))
        return translate(model, tok, lines, options, *args, **kwargs)

    monkeypatch.setattr(loop, "translate", timed_translate)
    summary = clocked(tmp_path / "run", "train.max_minutes=1.5", "train.warmup_steps=2", test_split=True)[1]
    assert summary["final_lr"] == 0.0
    assert 0.97 * 90 - 50 - 2 <= summary["minutes"] * 60 <= 90 - 50


def test_resume_with_a_larger_budget_extends_the_plan(tmp_path, clocked, caplog):
    out = tmp_path / "run"
    first = clocked(out, "train.max_minutes=0.1", "train.warmup_steps=2")[1]
    assert ends_its_cooldown(first)
    with caplog.at_level("INFO", logger="nmt_ls.train"):
        second = clocked(out, "train.max_minutes=0.2", "train.warmup_steps=2", resume=True)[1]
    assert "--resume: train.max_minutes 0.1 -> 0.2: the plan is fixed again" in caplog.text
    assert ends_its_cooldown(second) and second["updates"] > 1.5 * first["updates"]
    resumed = train_lrs(out)[first["updates"] :]
    assert resumed[0] > 0.0  # the stable phase again, then a cooldown to end_lr


def test_resume_with_a_larger_total_and_another_lr_refits_the_schedule(tmp_path, clocked, caplog):
    out = tmp_path / "run"
    pinned = ("train.warmup_steps=4", "train.cooldown_fraction=0.2")
    clocked(out, *pinned, "train.max_updates=20")
    assert train_lrs(out)[-1] == pytest.approx(0.002 / 4, rel=1e-9)  # the last of a 4-update cooldown
    with caplog.at_level("INFO", logger="nmt_ls.train"):
        cfg, summary = clocked(out, *pinned, "train.max_updates=30", "train.lr=0.001", resume=True)
    assert "--resume: train.lr 0.002 -> 0.001 and train.end_lr 0 -> 0 applied" in caplog.text
    assert summary["updates"] == 30 and summary["final_lr"] == 0.0
    want = [0.001 * wsd_factor(k, 4, 30, 6, 0.0) for k in range(20, 30)]  # as if pinned at 30 from the start
    assert train_lrs(out)[20:] == pytest.approx(want, rel=1e-9)
