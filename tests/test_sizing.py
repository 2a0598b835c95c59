"""The model size a run trains (``size``, ``sizes``): ``auto`` picks by the updates each size's
budget is estimated to hold (the seconds per update injected here, or spent on the fake clock of
the clocked criterion end to end), a pinned size and a resumed checkpoint's size train as they
are, and the resolved config records the size."""

from pathlib import Path

import pytest
import torch
import yaml

from nmt_ls import checkpoint
from nmt_ls.build import check_config
from nmt_ls.config import load_recipe, with_size
from nmt_ls.distributed import World
from nmt_ls.resume import checkpoint_size, load_last
from nmt_ls.sizing import choose_size, pick_size, update_seconds

from conftest import SMOKE_RECIPE, FakeClock

ONE = World(0, 1, torch.device("cpu"))
# the smoke recipe with a two-size ladder, timed by d_model below
LADDER = (
    "train.max_updates=0",
    "sizes.base.min_updates=1500",
    "sizes.base.set.model.d_model=64",
    "sizes.small.min_updates=0",
    "sizes.small.set.model.d_model=32",
    "sizes.small.set.model.ffn_dim=64",
)


def ladder(*extra: str):
    return load_recipe(SMOKE_RECIPE, [*LADDER, *extra])


def timed(update_s: dict):
    """A ``time_size`` that gives each size's seconds per update by its d_model, and records the calls."""

    def time_size(cfg):
        time_size.calls.append(cfg.model.d_model)
        return update_s[cfg.model.d_model]

    time_size.calls = []
    return time_size


def not_timed(cfg):
    raise AssertionError("no size may be timed here")


@pytest.mark.parametrize("min_updates,chosen", [(285, "base"), (286, "small")])
def test_auto_takes_base_while_its_estimate_reaches_min_updates(min_updates, chosen, caplog):
    # 10 minutes, 12 s spent: 0.97 * 600 - 12 = 570 s left; base at 2 s per update holds 285 updates
    cfg = ladder("train.max_minutes=10", f"sizes.base.min_updates={min_updates}")
    time_size = timed({64: 2.0, 32: 0.5})
    with caplog.at_level("INFO", logger="nmt_ls.sizing"):
        sized = choose_size(cfg, ONE, False, lambda: 12.0, time_size)
    assert sized.size == chosen and sized.model.d_model == {"base": 64, "small": 32}[chosen]
    assert time_size.calls == [64, 32]  # every size is timed and logged
    assert (
        "size base: 2.000 s per update (synthetic batches of train.max_tokens=2000), about 285 updates" in caplog.text
    )
    assert "about 1140 updates in train.max_minutes=10; min_updates 0" in caplog.text
    if chosen == "base":
        assert "size base chosen: about 285 updates in train.max_minutes=10 reach its min_updates 285; " in caplog.text
    else:
        assert "size small chosen: about 1140 updates in train.max_minutes=10 reach its min_updates 0 " in caplog.text
        assert "(base about 285 < 286); pin it with size=small" in caplog.text


def test_no_size_reaching_its_min_updates_takes_the_last():
    cfg = ladder("train.max_minutes=10", "sizes.small.min_updates=5000")
    name, reason = pick_size(cfg, lambda: 12.0, timed({64: 2.0, 32: 0.5}))
    assert name == "small"
    assert reason == "the last size, as none reaches its min_updates (base about 285 < 1500, small about 1140 < 5000)"


@pytest.mark.parametrize(
    "budget,why",
    [(("train.max_minutes=10", "train.max_updates=30"), "train.max_updates=30 pinned"), ((), "train.max_minutes=0")],
)
def test_without_a_time_budget_the_first_size_trains_untimed(budget, why, caplog):
    with caplog.at_level("INFO", logger="nmt_ls.sizing"):
        sized = choose_size(ladder(*budget), ONE, False, lambda: 0.0, not_timed)
    assert sized.size == "base" and sized.model.d_model == 64
    assert f"size base chosen: the first size, as there is no time budget to size by ({why})" in caplog.text


def test_one_override_pins_a_size_without_timing(caplog):
    cfg = ladder("train.max_minutes=10", "size=small")
    assert cfg.size == "small" and (cfg.model.d_model, cfg.model.ffn_dim) == (32, 64)  # resolved on load
    with caplog.at_level("INFO", logger="nmt_ls.sizing"):
        sized = choose_size(cfg, ONE, False, lambda: 0.0, not_timed)
    assert (sized.size, sized.model.d_model, sized.model.ffn_dim) == ("small", 32, 64)
    assert "size small chosen: pinned by size=small; pin it with size=small" in caplog.text


def test_a_recipe_without_sizes_is_unchanged():
    cfg = load_recipe(SMOKE_RECIPE, ["train.max_minutes=10", "train.max_updates=0"])
    sized = choose_size(cfg, ONE, False, lambda: 0.0, not_timed)
    assert (sized.size, sized.sizes) == ("auto", {})
    assert (sized.model.d_model, sized.model.ffn_dim, sized.tokenizer.vocab_size, sized.train.max_tokens) == (
        64,
        128,
        1000,
        2000,
    )


def test_an_override_of_a_key_that_sizes_set_wins_over_every_size():
    cfg = ladder("model.d_model=48")
    assert "model.d_model" not in cfg.sizes["base"].set and "model.d_model" not in cfg.sizes["small"].set
    assert (with_size(cfg, "small").model.d_model, with_size(cfg, "small").model.ffn_dim) == (48, 64)


def test_check_config_checks_every_size_and_names_it():
    with pytest.raises(ValueError, match=r"^sizes.small: tokenizer.vocab_size must be >= 1, got 0$"):
        check_config(ladder("sizes.small.set.tokenizer.vocab_size=0"))
    check_config(ladder())  # both sizes train as they are


def test_update_seconds_times_updates_after_a_warm_up_and_leaves_the_rng():
    # the clock moves 0.5 s a call: a warm-up update untimed, then 2 timed between two calls
    clock, rng = FakeClock(), torch.get_rng_state()
    ticks = []

    def tick():
        clock.advance(0.5)
        ticks.append(clock.now)
        return clock.now

    cfg = with_size(ladder("sizes.small.set.train.max_tokens=240"), "small")
    assert update_seconds(cfg, torch.device("cpu"), tick) == pytest.approx(0.25)
    assert len(ticks) == 2 and torch.equal(torch.get_rng_state(), rng)


def test_checkpoint_size_is_kept_and_a_conflict_names_both():
    auto, small = ladder(), ladder("size=small")
    assert (checkpoint_size(auto, "small").size, checkpoint_size(auto, "small").model.d_model) == ("small", 32)
    with pytest.raises(ValueError, match=r"size='small' \(checkpoint: 'base'\); resume with size=base or start"):
        checkpoint_size(small, "base")
    with pytest.raises(ValueError, match=r"checkpoint's size 'huge' is not one of the recipe's sizes \(base, small\)"):
        checkpoint_size(auto, "huge")
    with pytest.raises(ValueError, match=r"checkpoint records no size; pin the one it trained with size=NAME"):
        checkpoint_size(auto, "auto")


def test_run_sizes_itself_records_the_size_and_resume_keeps_it(tmp_path, clocked, caplog):
    # both sizes time 0.1 s per update on the fake clock: 0.97 * 12 s - 0.6 s spent timing them
    # leaves 110 updates, fewer than big's 200
    out = tmp_path / "run"
    sizes = ("sizes.big.min_updates=200", "sizes.big.set.model.d_model=32", "sizes.tiny.min_updates=0")
    sizes += ("sizes.tiny.set.model.d_model=16", "sizes.tiny.set.model.ffn_dim=32")
    run = ("train.max_updates=0", "train.max_minutes=0.2", *sizes)
    with caplog.at_level("INFO", logger="nmt_ls.sizing"):
        cfg, summary = clocked(out, *run)
    assert "size big: 0.100 s per update (synthetic batches of train.max_tokens=2000), about 110 updates" in caplog.text
    assert (
        "size tiny chosen: about 110 updates in train.max_minutes=0.2 reach its min_updates 0 (big about 110 < 200)"
        in (caplog.text)
    )
    assert summary["updates"] > 0
    written = yaml.safe_load(Path(out, "config.yaml").read_text())
    saved = checkpoint.load(summary["checkpoint_last"])["config"]
    for config in (written, saved):
        assert (config["size"], config["model"]["d_model"], config["model"]["ffn_dim"]) == ("tiny", 16, 32)
    caplog.clear()
    with caplog.at_level("INFO", logger="nmt_ls.sizing"):
        clocked(out, *run, resume=True)
    assert "s per update" not in caplog.text
    assert "size tiny chosen: the checkpoint's size (--resume); pin it with size=tiny" in caplog.text
    with pytest.raises(ValueError, match=r"^--resume: the recipe's size differs from the checkpoint's: size='big'"):
        load_last(load_recipe(SMOKE_RECIPE, [f"out_dir={str(out)!r}", *run, "size=big"]))
