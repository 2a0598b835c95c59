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
from nmt_ls.build import check_config
from nmt_ls.config import load_recipe

from conftest import FIXTURE, ROOT
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


def run(cmd: list[str], timeout=240, env: dict | None = None):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", **(env or {}))
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


@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed unavailable")
def test_resume_on_another_number_of_workers_goes_on_at_the_next_batch(tmp_path):
    """2 workers (update 1), then 1 worker (update 2), then 2 workers again (update 3) train the
    updates of one worker accumulating 2 batches: each resume starts at the first batch of the
    epoch that no worker has trained (before, 2->1 repeated batch 1 and 1->2 skipped 4-5)."""
    recipe = str(ROOT / "recipes" / "smoke.yaml")
    one, cut = tmp_path / "one", tmp_path / "cut"
    single = [sys.executable, "-m", "nmt_ls", "train", recipe]
    run([*single, *overrides(one, "train.update_freq=2", "train.max_updates=3")])
    cut.mkdir()
    for name in ("spm.model", "spm.json"):
        shutil.copy(one / name, cut / name)
    run([*TORCHRUN, recipe, *overrides(cut, "train.max_updates=1")])
    run([*single, *overrides(cut, "train.update_freq=2", "train.max_updates=2"), "--resume"])
    run([*TORCHRUN, recipe, *overrides(cut, "train.max_updates=3"), "--resume"])
    a = [r for r in train_log(one) if r["kind"] == "train"]
    b = [r for r in train_log(cut) if r["kind"] == "train"]
    assert [r["update"] for r in b] == [1, 2, 3]
    for ra, rb in zip(a, b, strict=True):
        assert ra["wpb"] == rb["wpb"], ra["update"]  # the same batches
        assert ra["loss"] == pytest.approx(rb["loss"], rel=1e-5), ra["update"]
    assert checkpoint.load(cut / "checkpoint_last.pt")["global_batch"] == 6
    wa = checkpoint.load(one / "checkpoint_last.pt")["model"]
    wb = checkpoint.load(cut / "checkpoint_last.pt")["model"]
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], rtol=1e-5, atol=1e-5)


# A corpus whose preparation (rank 0's, before the tokenizer) outlasts the collective timeout, and
# a criterion whose first validation batch does too.
SLOW_CORPUS = """
import shutil, time
from pathlib import Path
from nmt_ls.criterions import LabelSmoothedCrossEntropyCriterion, register_criterion
from nmt_ls.data import register_corpus

@register_criterion("slow_validation")
class SlowValidation(LabelSmoothedCrossEntropyCriterion):
    slept = False

    def forward(self, model, sample, reduce=True):
        if not model.training and not SlowValidation.slept:
            SlowValidation.slept = True
            time.sleep({seconds})
        return super().forward(model, sample, reduce)

@register_corpus("slow_copy")
def prepare(d):
    out, fixture = Path(d.dir), Path({fixture!r})
    if out.exists():
        return
    time.sleep({seconds})
    out.mkdir()
    for name in ("train.en", "train.de", "valid.en", "valid.de"):
        shutil.copy(fixture / name, out / name)
    for lang in ("en", "de"):  # ten test lines keep decoding short
        lines = (fixture / f"test.{{lang}}").read_text().splitlines(keepends=True)
        (out / f"test.{{lang}}").write_text("".join(lines[:10]))
"""


@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed unavailable")
def test_run_under_torchrun_outlasts_a_slow_setup_and_reports_once(tmp_path):
    """Rank 0 prepares the corpus for 8 s, and later validates for 8 s more, while rank 1 waits,
    under a 6 s collective timeout; then rank 0 alone decodes the test split and prints the
    summary (before: the waits timed out, and every rank decoded, wrote and printed)."""
    (tmp_path / "slow_corpus.py").write_text(SLOW_CORPUS.format(fixture=str(FIXTURE), seconds=8))
    out = tmp_path / "run"
    args = overrides(
        out,
        f"data.dir={str(tmp_path / 'corpus')!r}",
        "data.corpus=slow_copy",
        "criterion.user_module=slow_corpus",
        "criterion.name=slow_validation",
        "train.max_updates=2",
        "train.dist_timeout_minutes=0.1",
        "eval.beam_size=2",
    )
    cmd = [*TORCHRUN[:-1], "run", str(ROOT / "recipes" / "smoke.yaml"), *args]
    proc = run(cmd, env={"PYTHONPATH": f"{tmp_path}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"})
    assert proc.stdout.count("test BLEU") == 1
    assert len((out / "test.beam.de").read_text().splitlines()) == 10
    assert json.loads((out / "summary.json").read_text())["train"]["updates"] == 2


@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed unavailable")
def test_planned_run_validating_before_its_first_plan_plans_alike_on_every_worker(tmp_path):
    """A planned `nmt-ls run` whose first validation (update 1) comes before its first plan
    (update 3): every worker knows the test split's size, so all enter the decoding probe's
    broadcast at the first plan (before, rank 0 alone did, and rank 1 took the probe for the
    planned total: TypeError)."""
    out = tmp_path / "run"
    args = overrides(
        out,
        "train.lr_scheduler='wsd'",
        "train.max_updates=0",
        "train.max_minutes=5",
        "train.max_epochs=1",
        "train.max_tokens=8000",
        "train.validate_every_updates=1",
        "train.plan_window_updates=2",
        "eval.beam_size=2",
    )
    proc = run([*TORCHRUN[:-1], "run", str(ROOT / "recipes" / "smoke.yaml"), *args])
    summary = json.loads((out / "summary.json").read_text())["train"]
    epoch = summary["planned_updates"]  # capped where max_epochs ends the run
    assert epoch > 3 and summary["updates"] == epoch and summary["epochs"] == 1
    assert proc.stdout.count("test BLEU") == 1


def test_dist_timeout_must_be_positive():
    cfg = load_recipe(str(ROOT / "recipes" / "smoke.yaml"), ["train.dist_timeout_minutes=0"])
    with pytest.raises(ValueError, match=r"train.dist_timeout_minutes must be > 0, got 0"):
        check_config(cfg)
