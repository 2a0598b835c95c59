"""The training loop off the tuned path: a NaN at an epoch's end, resuming a finished run or an
old epoch-end checkpoint, checkpoints on another device, a stale sentencepiece model, and
options that must fail before any data work. Each test failed before its fix."""

import hashlib
import json
import logging
import re
import shutil
import signal
import time
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch

from nmt_ls import checkpoint
from nmt_ls.__main__ import main
from nmt_ls.binarize import binarize_recipe
from nmt_ls.build import describe, setup
from nmt_ls.config import load_recipe
from nmt_ls.criterions import reduce_metrics
from nmt_ls.data import Corpus, open_corpus, read_pairs
from nmt_ls.engines import load_for_inference
from nmt_ls.model import build_model
from nmt_ls.optim import WsdShape, build_optimizer, decay_factor, inverse_sqrt_factor, wsd_factor
from nmt_ls.planner import PLAN_TARGET, PlanState
from nmt_ls.resume import TrainState
from nmt_ls.tokenizer import train_spm
from nmt_ls.train import Trainer, train

from conftest import FIXTURE, NAN_PLUGIN, ROOT, SMOKE_RECIPE, overrides

# Few, large batches: an epoch of the fixture is a handful of updates.
FAST = ("train.max_tokens=12000", "train.log_every_updates=1", "model.dropout=0.0")


@contextmanager
def time_limit(seconds: int):
    """Turn a hang into a failure."""

    def on_alarm(signum, frame):
        raise TimeoutError(f"still training after {seconds} s: the loop does not advance")

    old = signal.signal(signal.SIGALRM, on_alarm)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


def read_log(out_dir):
    return [json.loads(line) for line in (Path(out_dir) / "train_log.jsonl").read_text().splitlines()]


def test_nan_at_the_last_update_of_an_epoch_still_ends_the_epoch(tmp_path, monkeypatch):
    one_epoch = train(load_recipe(SMOKE_RECIPE, overrides(tmp_path / "probe", *FAST, "train.max_updates=0")))
    per_epoch = one_epoch["updates"]
    (tmp_path / "nan_last.py").write_text(NAN_PLUGIN.format(name="nan_last", bad=f"{{{per_epoch}}}"))
    monkeypatch.syspath_prepend(str(tmp_path))
    cfg = load_recipe(
        SMOKE_RECIPE,
        overrides(
            tmp_path / "run",
            *FAST,
            "train.max_updates=0",
            "train.max_epochs=2",
            "criterion.name=nan_last",
            "criterion.user_module=nan_last",
        ),
    )
    with time_limit(120):
        summary = train(cfg)
    assert summary["epochs"] == 2
    assert summary["updates"] == 2 * per_epoch - 1  # one batch skipped
    valid = [r for r in read_log(tmp_path / "run") if r["kind"] == "valid"]
    assert [r["epoch"] for r in valid] == [1, 2]


def test_resume_from_a_checkpoint_at_the_end_of_an_epoch(tmp_path):
    """Checkpoints written before the fix could hold batch_index == len(epoch's batches)."""
    args = overrides(tmp_path / "run", *FAST, "train.max_updates=0")
    first = train(load_recipe(SMOKE_RECIPE, args))
    path = Path(first["checkpoint_last"])
    ckpt = checkpoint.load(path)
    ckpt.update(epoch=0, batch_index=first["updates"])  # the old layout of an epoch-end checkpoint
    checkpoint.atomic_save(ckpt, path)
    with time_limit(120):
        resumed = train(load_recipe(SMOKE_RECIPE, args + ["train.max_epochs=2"]), resume=True)
    assert resumed["epochs"] == 2 and resumed["updates"] == 2 * first["updates"]


def test_resume_of_a_finished_run_trains_nothing(tmp_path):
    args = overrides(tmp_path / "run", *FAST, "train.max_updates=3")
    train(load_recipe(SMOKE_RECIPE, args))
    before = read_log(tmp_path / "run")
    summary = train(load_recipe(SMOKE_RECIPE, args), resume=True)
    assert summary["updates"] == 3
    assert read_log(tmp_path / "run") == before  # no fourth update, no second validation
    assert checkpoint.load(summary["checkpoint_last"])["update"] == 3


@pytest.mark.filterwarnings("ignore:for .*copying from a non-meta parameter")
def test_checkpoints_load_for_any_device(tmp_path):
    """RNG states and sentencepiece bytes stay CPU tensors whatever the model's device
    (``meta`` stands in for ``cuda`` on a machine without a GPU)."""
    summary = train(load_recipe(SMOKE_RECIPE, overrides(tmp_path / "run", *FAST, "train.max_updates=2")))
    model, tok, cfg = load_for_inference(summary["checkpoint_last"], device="meta")
    assert next(model.parameters()).device.type == "meta"
    assert tok.decode(tok.encode("Click OK.")) == "Click OK."
    ckpt = checkpoint.load(summary["checkpoint_last"])
    model = build_model(tok.vocab_size, tok.pad_id, **cfg["model"]).to("meta")
    optimizer = build_optimizer(model, 1e-3, (0.9, 0.98), 1e-8, 0.0)
    checkpoint.restore_training(ckpt, model, optimizer, rank=0, world_size=1)
    assert torch.equal(torch.get_rng_state(), ckpt["rng"][0]["torch"])


def test_stale_sentencepiece_model_is_retrained(tmp_path):
    out = tmp_path / "run"
    train(load_recipe(SMOKE_RECIPE, overrides(out, *FAST, "train.max_updates=1")))
    assert load_for_inference(out / "checkpoint_last.pt")[1].vocab_size == 500
    train(load_recipe(SMOKE_RECIPE, overrides(out, *FAST, "train.max_updates=1", "tokenizer.vocab_size=400")))
    assert load_for_inference(out / "checkpoint_last.pt")[1].vocab_size == 400
    differ = r"the recipe's tokenizer differs from the checkpoint's: tokenizer.vocab_size=500 \(checkpoint: 400\)"
    with pytest.raises(ValueError, match="--resume: " + differ):
        train(load_recipe(SMOKE_RECIPE, overrides(out, *FAST, "train.max_updates=2")), resume=True)


@pytest.mark.parametrize(
    "override,match",
    [
        ("train.update_freq=0", r"train.update_freq must be >= 1, got 0"),
        ("train.best_metric='BLEU'", r"train.best_metric must be one of bleu, ppl, got 'BLEU'"),
        ("train.amp='fp8'", r"train.amp must be one of auto, none, bf16, got 'fp8'"),
        ("criterion.implementation='fast'", r"criterion.implementation must be one of reference, fused, chunked"),
        ("criterion.smoothing='gaussian'", r"smoothing must be one of .*, got 'gaussian'"),
        ("criterion.name='focal'", r"criterion.name: unknown criterion 'focal'"),
        ("criterion.path='fused'", r"criterion.path was renamed to criterion.implementation"),
        ("train.cooldown_shape='cubic'", r"train.cooldown_shape must be one of linear, 1-sqrt, got 'cubic'"),
        ("train.cooldown_fraction=1.5", r"train.cooldown_fraction must be in \[0, 1\], got 1.5"),
        ("train.stable_phase='flat'", r"train.stable_phase must be one of constant, inverse_sqrt, got 'flat'"),
        ("train.lr_scheduler='wsd' train.cooldown_fraction=0.99", r"at update 0, inside train.warmup_steps=20"),
        ("model.n_heads=3", r"d_model=64 is not divisible by n_heads=3"),
        ("model.positions='rotary'", r"positions must be 'sinusoidal' or 'learned', got 'rotary'"),
        ("tokenizer.model_type='word'", r"tokenizer.model_type must be one of unigram, bpe, got 'word'"),
        ("train.plan_window_updates=0", r"train.plan_window_updates must be >= 1, got 0"),
        ("train.warmup_steps=-1", r"train.warmup_steps must be >= 0, got -1"),
        ("eval.beam_size=0", r"eval.beam_size must be >= 1, got 0"),
        ("data.valid_bleu_sentences=-3", r"data.valid_bleu_sentences must be >= 0, got -3"),
    ],
)
def test_bad_options_fail_before_any_data_work(tmp_path, capsys, override, match):
    # The data folder does not exist: an option error must come first.
    args = overrides(tmp_path / "run", *override.split()) + [f"data.dir={str(tmp_path / 'missing')!r}"]
    assert main(["train", SMOKE_RECIPE, *args]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert len(err.strip().splitlines()) == 1
    assert re.search(match, err), err
    assert not (tmp_path / "run" / "spm.model").exists()


@pytest.mark.parametrize("value", [".inf", ".nan"])
def test_an_infinite_or_nan_max_minutes_is_refused_in_one_line_before_any_data_work(tmp_path, capsys, value):
    # inf passed the range check (its upper bound is inf) and ended in an OverflowError at the first plan
    args = overrides(tmp_path / "run", "train.lr_scheduler='wsd'", "train.max_updates=0", f"train.max_minutes={value}")
    assert main(["train", SMOKE_RECIPE, *args, f"data.dir={str(tmp_path / 'missing')!r}"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"nmt-ls train: error: train.max_minutes must be a finite number, got {value[1:]}", err


def test_prepare_without_apt_get_is_a_one_line_error(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))  # no apt-get, no dpkg-deb
    args = [f"out_dir={str(tmp_path / 'run')!r}", "data.corpus='lohelp_en_de'", f"data.dir={str(tmp_path / 'data')!r}"]
    assert main(["train", str(ROOT / "recipes" / "lohelp_en_de.yaml"), *args]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert "nmt-ls train: error:" in err and "apt-get" in err


@pytest.mark.parametrize("max_minutes", [0.2, 0.15])  # the budget, and the same cut by 25%
def test_wsd_plan_ends_its_cooldown_at_the_budget(tmp_path, clocked, max_minutes):
    """0.1 s per update and per valid batch on a fake clock: the plan fills the budget
    (PLAN_TARGET of it), the lr reaches end_lr at the last update, and the checkpoint keeps it."""
    cfg, summary = clocked(
        tmp_path / "run",
        "train.max_updates=0",
        "train.max_epochs=1000",
        f"train.max_minutes={max_minutes}",
        "train.lr_scheduler='wsd'",
        "train.warmup_steps=10",
        "train.plan_window_updates=10",
        "train.validate_every_updates=30",
        "train.log_every_updates=1",
        "train.end_lr=0.0",
        "model.dropout=0.0",
    )
    assert summary["stop_reason"].startswith(f"reached the {summary['updates']} updates planned")
    assert summary["final_lr"] == 0.0  # the cooldown ran to its end
    ckpt = checkpoint.load(summary["checkpoint_last"])
    budget_s = PLAN_TARGET * 60 * max_minutes
    within = ckpt["validation_s"] + 0.1  # within a validation and an update
    assert summary["minutes"] * 60 == pytest.approx(budget_s, abs=within)
    lrs = [r["lr"] for r in read_log(tmp_path / "run") if r["kind"] == "train"]
    assert lrs[-1] == pytest.approx(cfg.train.lr / round(0.2 * summary["updates"]), rel=1e-9)  # the last step of it
    assert ckpt["planned_updates"] == summary["updates"]


# A tiny model, an epoch of a handful of updates, and epochs enough for any run here.
TINY = (*FAST, "model.d_model=32", "train.max_epochs=20", "train.warmup_steps=2")


def train_lrs(out_dir):
    return [r["lr"] for r in read_log(out_dir) if r["kind"] == "train"]


@pytest.mark.parametrize("name", ["inverse_sqrt", "linear"])
def test_resume_with_another_lr_scheduler_goes_on_with_its_lrs(tmp_path, caplog, name):
    # issue 29 row 7: wsd -> inverse_sqrt or linear on --resume was a KeyError traceback
    out = tmp_path / "run"
    train(load_recipe(SMOKE_RECIPE, overrides(out, *TINY, "train.lr_scheduler='wsd'", "train.max_updates=3")))
    with caplog.at_level("INFO", logger="nmt_ls.resume"):
        cfg = load_recipe(SMOKE_RECIPE, overrides(out, *TINY, f"train.lr_scheduler={name!r}", "train.max_updates=7"))
        summary = train(cfg, resume=True)
    assert (
        f"--resume: train.lr_scheduler wsd -> {name}: the updates to come take its lrs from update 3 on" in caplog.text
    )
    assert summary["updates"] == 7
    if name == "inverse_sqrt":
        want = [0.002 * inverse_sqrt_factor(k, 2) for k in range(3, 7)]
    else:
        want = [0.002 * decay_factor(k, 2, 7, 0.0, "linear") for k in range(3, 7)]
    assert train_lrs(out)[3:] == pytest.approx(want, rel=1e-9)


def test_resume_applies_a_changed_weight_decay_eps_and_cooldown(tmp_path, caplog):
    # issue 29 row 14: these kept the checkpoint's values while config.yaml recorded the new ones
    out = tmp_path / "run"
    wsd = (*TINY, "train.lr_scheduler='wsd'")
    train(load_recipe(SMOKE_RECIPE, overrides(out, *wsd, "train.max_updates=4")))
    changed = (
        "train.max_updates=10",
        "train.weight_decay=0.01",
        "train.adam_eps=1e-6",
        "train.cooldown_fraction=0.5",
        "train.cooldown_shape='1-sqrt'",
    )
    with caplog.at_level("INFO", logger="nmt_ls.resume"):
        summary = train(load_recipe(SMOKE_RECIPE, overrides(out, *wsd, *changed)), resume=True)
    ckpt = checkpoint.load(summary["checkpoint_last"])
    group = ckpt["optimizer"]["param_groups"][0]
    assert (group["weight_decay"], group["eps"]) == (0.01, 1e-6)
    assert (ckpt["scheduler"]["cooldown_fraction"], ckpt["scheduler"]["cooldown_shape"]) == (0.5, "1-sqrt")
    shape = WsdShape(0.5, "constant", "1-sqrt")
    want = [0.002 * wsd_factor(k, 2, 10, 5, 0.0, shape) for k in range(4, 10)]  # as if set so from the start
    assert summary["final_lr"] == 0.0 and train_lrs(out)[4:] == pytest.approx(want, rel=1e-9)
    assert "--resume: train.adam_eps 1e-08 -> 1e-06, train.weight_decay 0.0 -> 0.01 applied" in caplog.text
    assert "--resume: train.cooldown_fraction 0.2 -> 0.5, train.cooldown_shape linear -> 1-sqrt applied" in caplog.text


@pytest.fixture(scope="module")
def small_run(tmp_path_factory):
    """A finished 3-update run (d_model 32, a train line per update) to copy and resume."""
    out = tmp_path_factory.mktemp("small") / "run"
    train(load_recipe(SMOKE_RECIPE, overrides(out, *FAST, "model.d_model=32", "train.max_updates=3")))
    return out


def copy_run(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("tensorboard", "train.log"))
    return dst


def one_line_error(capsys) -> str:
    err = capsys.readouterr().err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    return err


def test_resume_without_a_checkpoint_is_an_error_and_keeps_the_log(small_run, tmp_path, capsys):
    out = copy_run(small_run, tmp_path / "run")
    (out / "checkpoint_last.pt").unlink()
    log_before = (out / "train_log.jsonl").read_text()
    args = overrides(out, *FAST, "model.d_model=32", "train.max_updates=5")
    assert main(["train", SMOKE_RECIPE, *args, "--resume"]) == 2
    err = one_line_error(capsys)
    assert f"--resume: no checkpoint to resume from: {out / 'checkpoint_last.pt'}" in err
    assert (out / "train_log.jsonl").read_text() == log_before


def test_resume_with_another_model_shape_names_the_keys_and_rewrites_nothing(small_run, tmp_path, capsys):
    out = copy_run(small_run, tmp_path / "run")
    config_before = (out / "config.yaml").read_text()
    args = overrides(out, *FAST, "model.d_model=48", "model.ffn_dim=64", "train.max_updates=5")
    assert main(["train", SMOKE_RECIPE, *args, "--resume"]) == 2
    err = one_line_error(capsys)
    assert "the recipe's model differs from the checkpoint's: model.d_model=48 (checkpoint: 32), " in err
    assert "model.ffn_dim=64 (checkpoint: 128)" in err
    assert (out / "config.yaml").read_text() == config_before


def test_average_of_different_models_names_the_keys(small_run, tmp_path, capsys):
    ckpt = checkpoint.load(small_run / "checkpoint_last.pt")
    wide = dict(ckpt, config={**ckpt["config"], "model": {**ckpt["config"]["model"], "d_model": 48}})
    wide["model"] = build_model(500, 0, **wide["config"]["model"]).state_dict()
    checkpoint.atomic_save(wide, tmp_path / "wide.pt")
    paths = [str(small_run / "checkpoint_last.pt"), str(tmp_path / "wide.pt")]
    assert main(["average", *paths, "--out", str(tmp_path / "avg.pt")]) == 2
    err = one_line_error(capsys)
    assert f"{paths[1]}: its model differs from {paths[0]}'s: model.d_model=48 (not 32); cannot average" in err
    assert not (tmp_path / "avg.pt").exists()


def with_spm(ckpt: dict, spm_path: Path, **tokenizer) -> dict:
    """``ckpt`` with another sentencepiece model (and tokenizer options)."""
    config = {**ckpt["config"], "tokenizer": {**ckpt["config"]["tokenizer"], **tokenizer}}
    return dict(ckpt, spm=checkpoint.spm_to_tensor(spm_path), config=config)


def reversed_direction(ckpt: dict) -> dict:
    """``ckpt`` as a de-en checkpoint would be (its weights as they are)."""
    return dict(ckpt, config={**ckpt["config"], "data": {**ckpt["config"]["data"], "src_lang": "de", "tgt_lang": "en"}})


def sha12(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()[:12]


def test_average_refuses_another_sentencepiece_model_or_direction(small_run, tmp_path, capsys):
    """Issue 29 row 4: unigram + bpe, or en-de + de-en, were averaged (test ppl 89 and 118 in, 162 out)."""
    first = str(small_run / "checkpoint_last.pt")
    ckpt = checkpoint.load(first)
    bpe = train_spm(FIXTURE / "train.en", tmp_path / "bpe", 500, model_type="bpe")
    checkpoint.atomic_save(with_spm(ckpt, bpe, model_type="bpe"), tmp_path / "bpe.pt")
    checkpoint.atomic_save(reversed_direction(ckpt), tmp_path / "de-en.pt")
    expected = {
        "bpe.pt": f"tokenizer.model_type='bpe' (not 'unigram'), spm.model sha256='{sha12(bpe)}' "
        f"(not '{sha12(small_run / 'spm.model')}')",
        "de-en.pt": "data.src_lang='de' (not 'en'), data.tgt_lang='en' (not 'de')",
    }
    for name, changes in expected.items():
        other = str(tmp_path / name)
        assert main(["average", first, other, "--out", str(tmp_path / "avg.pt")]) == 2
        err = one_line_error(capsys)
        assert f"{other}: its model differs from {first}'s: {changes}; cannot average" in err
        assert not (tmp_path / "avg.pt").exists()


def test_resume_drops_a_torn_last_log_line_and_names_any_other_bad_line(small_run, tmp_path, caplog):
    out = copy_run(small_run, tmp_path / "run")
    log_path = out / "train_log.jsonl"
    lines = log_path.read_text().splitlines(keepends=True)
    log_path.write_text("".join(lines[:-1]) + lines[-1][:40])  # a crash in the middle of the last write
    args = overrides(out, *FAST, "model.d_model=32", "train.max_updates=4")
    with caplog.at_level("WARNING", logger="nmt_ls.train"):
        summary = train(load_recipe(SMOKE_RECIPE, args), resume=True)
    assert summary["updates"] == 4
    assert f"{log_path}:{len(lines)}: dropped a torn last line" in caplog.text
    records = read_log(out)
    assert records[: len(lines) - 1] == [json.loads(line) for line in lines[:-1]]
    assert [r["update"] for r in records if r["kind"] == "train"] == [1, 2, 3, 4]

    text = log_path.read_text().splitlines(keepends=True)
    log_path.write_text(text[0] + "{oops\n" + "".join(text[1:]))
    with pytest.raises(ValueError, match=re.escape(f"{log_path}:2: not a JSON record (Expecting")):
        train(load_recipe(SMOKE_RECIPE, overrides(out, *FAST, "model.d_model=32", "train.max_updates=5")), resume=True)


def set_up(cfg) -> Trainer:
    """A fresh run's trainer, set up as ``train`` sets it up, on the real clock."""
    built = setup(cfg, None)
    describe(built)
    return Trainer(built, TrainState(), PlanState(), time.time)


def test_valid_loss_and_bleu_cover_the_same_pairs(tmp_path, caplog):
    """Issue 20 row 4: with two empty-side valid pairs, the loss covered 198 pairs and BLEU 200."""
    corpus = Path(shutil.copytree(FIXTURE, tmp_path / "corpus"))
    for lang, lineno in (("en", 0), ("de", 2)):  # an empty source, then an empty target
        lines = (corpus / f"valid.{lang}").read_text(encoding="utf-8").split("\n")
        lines[lineno] = ""
        (corpus / f"valid.{lang}").write_text("\n".join(lines), encoding="utf-8")
    cfg = load_recipe(
        SMOKE_RECIPE, overrides(tmp_path / "run", *FAST, f"data.dir={str(corpus)!r}", "data.valid_bleu_sentences=0")
    )
    with caplog.at_level(logging.INFO, logger="nmt_ls.build"):
        trainer = set_up(cfg)
    valid = trainer.built.valid
    src, ref = read_pairs(Corpus(corpus, "en", "de"), "valid")  # the pairs with two sides, as read
    assert len(src) == 198
    assert (valid.bleu_src, valid.bleu_ref) == (src, ref)
    nsentences = reduce_metrics(trainer.validation_outputs())["nsentences"]
    assert sum(b.src.size(0) for b in valid.batches) == nsentences == 198
    assert "valid loss and BLEU on the same pairs: 198 of the 200 read (dropped: 2 with an empty side" in caplog.text


def test_chunked_validation_loss_never_forms_the_logits(tmp_path, monkeypatch):
    """Issue 20 row 16: training on chunked never formed the (B, T, V) logits, validation did."""
    cfg = load_recipe(SMOKE_RECIPE, overrides(tmp_path / "run", *FAST, "criterion.implementation='chunked'"))
    trainer = set_up(cfg)
    run = trainer.built
    run.model.eval()
    logs = []
    with torch.no_grad():  # the reference: the projection, then the criterion on the logits
        for b in run.valid.batches:
            out = run.criterion.compute(run.model(b.src, b.tgt_in), b.tgt_out)
            sums = {"loss": float(out.loss), "nll_loss": float(out.nll), "kl": float(out.kl)}
            logs.append({**sums, "ntokens": out.ntokens, "nsentences": len(b.src), "sample_size": out.ntokens})
    expected = reduce_metrics(logs)
    run.model.train()

    def no_logits(features):
        raise AssertionError(f"the output projection ran on features of shape {tuple(features.shape)}")

    monkeypatch.setattr(run.model, "project", no_logits)
    got = reduce_metrics(trainer.validation_outputs())
    assert got["ntokens"] == expected["ntokens"] > 0
    for key in ("loss", "nll_loss", "kl", "ppl"):
        assert got[key] == pytest.approx(expected[key], rel=1e-5)


def train_records(out_dir) -> list[tuple]:
    """(kind, update, epoch, losses, lr) of each log line: all but the timings."""
    keys = ("kind", "update", "epoch", "loss", "nll_loss", "kl", "ppl", "accuracy", "lr", "bleu")
    return [tuple(r.get(k) for k in keys) for r in read_log(out_dir)]


def test_log_of_a_run_interrupted_and_resumed_equals_an_uninterrupted_runs(tmp_path, monkeypatch):
    """Issue 29 row 10: the updates after the last train line were never logged, at the end of
    a run and before a checkpoint that a resume went on from (here: after a Ctrl-C in update 7)."""
    args = ("model.d_model=32", "model.dropout=0.0", "train.max_updates=7", "train.log_every_updates=3")
    args = overrides(tmp_path / "run", *args, "train.validate_every_updates=5")
    train(load_recipe(SMOKE_RECIPE, args))
    uninterrupted = train_records(tmp_path / "run")
    kinds = [(kind, update) for kind, update, *_ in uninterrupted]
    assert kinds == [("train", 3), ("train", 5), ("valid", 5), ("train", 6), ("train", 7), ("valid", 7)]

    step = Trainer.train_step

    def ctrl_c_in_update_7(self, samples):
        if self.state.update == 6:
            raise KeyboardInterrupt
        return step(self, samples)

    with monkeypatch.context() as m:
        m.setattr(Trainer, "train_step", ctrl_c_in_update_7)
        with pytest.raises(KeyboardInterrupt):
            train(load_recipe(SMOKE_RECIPE, args))
    train(load_recipe(SMOKE_RECIPE, args), resume=True)
    assert train_records(tmp_path / "run") == uninterrupted


def test_resume_with_another_max_tokens_mid_epoch_trains_each_pair_once(tmp_path, monkeypatch):
    """Issue 29 row 15: the position in the epoch was an index into batches of the old budget;
    under a smaller one some pairs were trained twice in the epoch and others never."""
    trained = []
    sample = Trainer.sample

    def record(self, idx):
        trained.extend(int(i) for i in idx)
        return sample(self, idx)

    monkeypatch.setattr(Trainer, "sample", record)
    out, small = tmp_path / "run", ("model.d_model=32", "model.dropout=0.0")
    train(load_recipe(SMOKE_RECIPE, overrides(out, *small, "train.max_tokens=4000", "train.max_updates=5")))
    first = len(trained)
    cfg = load_recipe(SMOKE_RECIPE, overrides(out, *small, "train.max_tokens=1500", "train.max_updates=0"))
    summary = train(cfg, resume=True)
    assert summary["epochs"] == 1
    n_pairs = len(binarize_recipe(cfg, open_corpus(cfg.data), out / "spm.model", build=False)["train"])
    assert 0 < first < n_pairs // 2
    assert sorted(trained) == list(range(n_pairs))  # every pair once, the first run's included


def test_a_run_whose_budget_is_spent_before_the_first_update_stops_in_one_line(tmp_path, capsys):
    # 3 s cannot hold the set-up and the seconds kept for the test split: before, the run trained
    # an update or none, decoded the test split with the untrained model and exited 0
    out = tmp_path / "run"
    args = overrides(out, "train.lr_scheduler='wsd'", "train.max_updates=0", "train.max_minutes=0.05")
    assert main(["run", SMOKE_RECIPE, *args]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert re.fullmatch(
        r"nmt-ls run: error: train.max_minutes=0.05 \(3 s\) leaves no time to train: the set-up took \d+ s "
        r"and \d+ s are kept for decoding the test split; raise train.max_minutes",
        err.strip().splitlines()[-1],  # after the set-up's log lines
    ), err
    assert not any((out / name).exists() for name in ("checkpoint_last.pt", "test.beam.de", "summary.json"))
    assert (out / "spm.model").exists()  # the set-up is kept for the next try
