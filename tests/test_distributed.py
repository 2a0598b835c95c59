"""torchrun + DDP on CPU (gloo): 2 workers take exactly the step of 1 worker on the same batches.

With ``update_freq=2`` one worker accumulates batches 2k and 2k+1 into update k; with two
workers, rank 0 gets batch 2k and rank 1 batch 2k+1 (``batching.shard``). Because the loss
is normalised by the global count of target tokens, both give the same parameters.
"""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from nmt_ls import checkpoint

from conftest import ROOT
from conftest import overrides as smoke_overrides

# Two gloo workers training with nmt_ls; the recipe and its overrides follow.
TORCHRUN = [
    sys.executable,
    "-m",
    "torch.distributed.run",
    "--standalone",
    "--nproc_per_node=2",
    "-m",
    "nmt_ls",
    "train",
]


def overrides(out_dir: Path, *extra: str) -> list[str]:
    return smoke_overrides(
        out_dir, "model.dropout=0.0", "train.max_updates=4", "train.log_every_updates=1", "train.device='cpu'", *extra
    )


def run(cmd: list[str], timeout=240):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def train_log(out_dir: Path):
    return [json.loads(line) for line in (out_dir / "train_log.jsonl").read_text().splitlines()]


@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed unavailable")
def test_two_workers_equal_one_worker_with_accumulation(tmp_path):
    one, two = tmp_path / "one", tmp_path / "two"
    recipe = str(ROOT / "recipes" / "smoke.yaml")
    run([sys.executable, "-m", "nmt_ls", "train", recipe, *overrides(one, "train.update_freq=2")])
    two.mkdir()
    for name in ("spm.model", "spm.json"):  # the same subword model for both runs
        shutil.copy(one / name, two / name)
    run(
        [
            *TORCHRUN,
            recipe,
            *overrides(two),
        ]
    )
    a = [r for r in train_log(one) if r["kind"] == "train"]
    b = [r for r in train_log(two) if r["kind"] == "train"]
    assert [r["update"] for r in a] == [r["update"] for r in b] == [1, 2, 3, 4]
    for ra, rb in zip(a, b):
        # logged sums are all-reduced across workers: same tokens, same loss per token
        assert ra["wpb"] == rb["wpb"] and ra["bsz"] == rb["bsz"]
        assert ra["loss"] == pytest.approx(rb["loss"], rel=1e-5)
        assert ra["nll_loss"] == pytest.approx(rb["nll_loss"], rel=1e-5)
        assert ra["gnorm"] == pytest.approx(rb["gnorm"], rel=1e-4)
    wa = checkpoint.load(one / "checkpoint_last.pt")["model"]
    wb = checkpoint.load(two / "checkpoint_last.pt")["model"]
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], rtol=1e-5, atol=1e-5)
    # only rank 0 writes: one log line per update, no second log or checkpoint
    assert len([r for r in train_log(two) if r["kind"] == "valid"]) == 1


@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed unavailable")
def test_two_worker_resume_with_dropout_is_exact(tmp_path):
    """Every worker's RNG states are saved and restored: dropout masks after a resume are
    those of the uninterrupted run (before, every rank restored rank 0's)."""
    torchrun = [*TORCHRUN, str(ROOT / "recipes" / "smoke.yaml")]
    full, cut = tmp_path / "full", tmp_path / "cut"
    dropout = ("model.dropout=0.3", "train.save_every_updates=2")
    run([*torchrun, *overrides(full, *dropout)])
    cut.mkdir()
    shutil.copy(full / "spm.model", cut / "spm.model")
    shutil.copy(full / "spm.json", cut / "spm.json")
    run([*torchrun, *overrides(cut, *dropout, "train.max_updates=2")])
    run([*torchrun, *overrides(cut, *dropout), "--resume"])
    a = [r for r in train_log(full) if r["kind"] == "train"]
    b = [r for r in train_log(cut) if r["kind"] == "train"]
    assert [r["update"] for r in b] == [1, 2, 3, 4]
    for ra, rb in zip(a, b, strict=True):
        assert ra["loss"] == pytest.approx(rb["loss"], rel=1e-6), ra["update"]
