"""Faults and bad input: SIGKILL and resume, bad checkpoints, a malicious pickle, NaN losses,
and the CLI's one-line errors."""

import json
import math
import os
import pickle
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from nmt_ls import checkpoint
from nmt_ls.__main__ import main
from nmt_ls.build import lock_out_dir
from nmt_ls.checkpoint import CheckpointError
from nmt_ls.config import load_recipe
from nmt_ls.distributed import World
from nmt_ls.train import train

from conftest import NAN_PLUGIN, ROOT, SMOKE_RECIPE, overrides

RECIPE = SMOKE_RECIPE


def read_log(out_dir):
    return [json.loads(line) for line in (Path(out_dir) / "train_log.jsonl").read_text().splitlines()]


def log_updates(out_dir):
    return [r["update"] for r in read_log(out_dir) if r["kind"] == "train"]


def start_training(args: list[str]) -> subprocess.Popen:
    """``nmt-ls train`` of the smoke recipe with ``args``, in a process of its own."""
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "nmt_ls", "train", RECIPE, *args]
    return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def test_sigkill_then_resume_loses_only_updates_since_the_checkpoint(tmp_path):
    out = tmp_path / "run"
    extra = ("train.max_updates=30", "train.save_every_updates=4", "train.log_every_updates=1")
    args = overrides(out, *extra)
    proc = start_training(args)
    try:
        deadline = time.time() + 180
        while time.time() < deadline:  # kill it once a checkpoint exists and training went past it
            if (
                (out / "checkpoint_last.pt").exists()
                and (out / "train_log.jsonl").exists()
                and max(log_updates(out), default=0) >= 10
            ):
                break
            time.sleep(0.2)
        proc.send_signal(signal.SIGKILL)
        proc.wait(30)
    finally:
        proc.kill()
    killed_at = max(log_updates(out))
    ckpt = checkpoint.load(out / "checkpoint_last.pt")  # never half-written
    assert ckpt["update"] % 4 == 0 and killed_at - 4 <= ckpt["update"] <= killed_at
    summary = train(load_recipe(RECIPE, args), resume=True)
    assert summary["updates"] == 30
    assert log_updates(out) == list(range(1, 31))  # no gap, no duplicate
    # and the resumed losses are those of a run that was never killed
    train(load_recipe(RECIPE, overrides(tmp_path / "clean", *extra)))
    resumed = [r for r in read_log(out) if r["kind"] == "train"]
    clean = [r for r in read_log(tmp_path / "clean") if r["kind"] == "train"]
    for a, b in zip(resumed, clean, strict=True):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-6), a["update"]


def test_a_second_run_in_an_out_dir_in_use_is_refused_naming_the_process(tmp_path, capsys):
    """Issue 29 row 5: a second run in a running run's out_dir deleted its log, and both wrote
    one log and one set of checkpoints. The lock dies with its process: a later run starts."""
    out, small = tmp_path / "run", ("model.d_model=32", "train.log_every_updates=1")
    args = overrides(out, *small, "train.max_updates=100000", "train.max_epochs=1000")
    proc = start_training(args)
    try:
        deadline = time.time() + 180
        while not ((out / "train_log.jsonl").exists() and log_updates(out)) and time.time() < deadline:
            time.sleep(0.2)
        logged = (out / "train_log.jsonl").read_text()
        assert main(["train", RECIPE, *overrides(out, *small, "train.max_updates=1")]) == 2
        err = capsys.readouterr().err
        assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
        assert f"out_dir={str(out)!r} is in use by another run (host " in err
        assert f" pid {proc.pid} holds {out / '.lock'}); wait for it to end or choose another out_dir" in err
        assert (out / "train_log.jsonl").read_text().startswith(logged)  # its log goes on
    finally:
        proc.kill()
        proc.wait(30)
    summary = train(load_recipe(RECIPE, overrides(out, *small, "train.max_updates=1")))
    assert summary["updates"] == 1 and log_updates(out) == [1]


@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed unavailable")
def test_every_torchrun_worker_stops_when_the_out_dir_is_in_use(tmp_path):
    """Rank 0 alone takes the lock; the other workers get its refusal and stop with it."""
    out = tmp_path / "run"
    out.mkdir()
    held = lock_out_dir(out, World(0, 1, torch.device("cpu")))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "nmt_ls"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    try:
        proc = subprocess.run(
            [*cmd, "train", RECIPE, *overrides(out, "train.device='cpu'")],
            cwd=ROOT,
            env=env,
            capture_output=True,
            text=True,
            timeout=240,
        )
    finally:
        held.close()
    assert proc.returncode != 0
    refusal = f"nmt-ls train: error: out_dir={str(out)!r} is in use by another run (host "
    assert proc.stderr.count(refusal) == 2, proc.stderr[-3000:]  # rank 0's and rank 1's
    assert not (out / "spm.model").exists()


def test_truncated_and_foreign_checkpoints_give_clear_errors(tmp_path):
    good = tmp_path / "good.pt"
    checkpoint.atomic_save(
        {"format": checkpoint.FORMAT, "model": {"w": torch.ones(3)}, "config": {}, "update": 1}, good
    )
    assert checkpoint.load(good)["update"] == 1
    data = good.read_bytes()
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated.pt: not a readable checkpoint"):
        checkpoint.load(truncated)
    foreign = tmp_path / "foreign.pt"
    torch.save({"state_dict": {"w": torch.ones(2)}}, foreign)
    with pytest.raises(CheckpointError, match="foreign.pt: not an nmt_ls checkpoint"):
        checkpoint.load(foreign)
    text = tmp_path / "notes.pt"
    text.write_text("hello")
    with pytest.raises(CheckpointError, match="notes.pt"):
        checkpoint.load(text)
    with pytest.raises(FileNotFoundError, match="missing.pt"):
        checkpoint.load(tmp_path / "missing.pt")


class Exploit:
    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (os.system, (f"touch {self.path}",))


def test_malicious_pickle_is_not_executed(tmp_path):
    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.pt"
    torch.save({"format": checkpoint.FORMAT, "model": Exploit(marker), "config": {}, "update": 0}, evil)
    plain = tmp_path / "evil.pkl"
    plain.write_bytes(pickle.dumps(Exploit(marker)))
    for path in (evil, plain):
        with pytest.raises(CheckpointError, match="not a readable checkpoint"):
            checkpoint.load(path)
    assert not marker.exists()


def write_plugin(tmp_path, monkeypatch, module, name, bad):
    (tmp_path / f"{module}.py").write_text(NAN_PLUGIN.format(name=name, bad=bad))
    monkeypatch.syspath_prepend(str(tmp_path))


def test_nan_loss_is_skipped_and_reported(tmp_path, monkeypatch, caplog):
    write_plugin(tmp_path, monkeypatch, "nan_once", "nan_once", "{3, 4}")
    cfg = load_recipe(
        RECIPE,
        overrides(
            tmp_path / "run",
            "train.max_updates=6",
            "train.log_every_updates=1",
            "criterion.name=nan_once",
            "criterion.user_module=nan_once",
        ),
    )
    summary = train(cfg)
    assert summary["updates"] == 6  # two batches skipped, six good updates
    assert "non-finite loss or gradient, batch skipped (2 in a row)" in caplog.text
    train_lines = [r for r in read_log(tmp_path / "run") if r["kind"] == "train"]
    assert [r["update"] for r in train_lines] == [1, 2, 3, 4, 5, 6]
    assert all(math.isfinite(r["loss"]) and math.isfinite(r["gnorm"]) for r in train_lines)


def test_repeated_nan_losses_stop_training(tmp_path, monkeypatch):
    write_plugin(tmp_path, monkeypatch, "nan_always", "nan_always", "range(10**6)")
    cfg = load_recipe(
        RECIPE,
        overrides(
            tmp_path / "run",
            "train.max_updates=10",
            "train.max_bad_updates=3",
            "criterion.name=nan_always",
            "criterion.user_module=nan_always",
        ),
    )
    with pytest.raises(FloatingPointError, match="3 consecutive non-finite updates at update 1"):
        train(cfg)


@pytest.mark.parametrize(
    "argv,match",
    [
        (["train", "no/such/recipe.yaml"], "recipe not found: no/such/recipe.yaml"),
        (["train", RECIPE, "train.lrr=1"], r"unknown key\(s\) \['train.lrr'\]"),
        (["train", RECIPE, "data.dir='/nonexistent/dir'"], "/nonexistent/dir"),
        (["score", "/nonexistent/hyp.txt", "--ref", "/nonexistent/ref.txt"], "file not found: /nonexistent/hyp.txt"),
    ],
)
def test_cli_errors_are_one_clear_line(argv, match, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "error:" in err and "Traceback" not in err
    import re

    assert re.search(match, err), err


def test_cli_rejects_bad_epsilon_before_training(tmp_path, capsys):
    args = overrides(tmp_path / "run", "criterion.label_smoothing=1.5")
    assert main(["train", RECIPE, *args]) == 2
    assert "label_smoothing must be in [0, 1), got 1.5" in capsys.readouterr().err


def test_score_line_count_mismatch(tmp_path, capsys):
    (tmp_path / "h").write_text("a\nb\n")
    (tmp_path / "r").write_text("a\n")
    assert main(["score", str(tmp_path / "h"), "--ref", str(tmp_path / "r")]) == 2
    assert "has 1 lines but" in capsys.readouterr().err
