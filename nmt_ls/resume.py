"""What the loop advances and saves, and ``--resume``: :class:`TrainState` (with the planner's
:class:`~nmt_ls.planner.PlanState`) is saved flat in every checkpoint; :func:`restore` loads a
checkpoint's states into a fresh set-up and applies what the recipe changed in the optimizer and
the schedule.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

from nmt_ls import checkpoint
from nmt_ls.config import DROPOUTS, RunConfig, differences, to_dict, with_size
from nmt_ls.optim import WarmupStableDecay, WsdShape, go_to_update
from nmt_ls.planner import Budget, PlanState

log = logging.getLogger(__name__)

# The optimizer's hyper-parameters in the recipe: a resumed run takes them (and logs a change).
OPTIMIZER_KEYS = ("betas", "adam_eps", "weight_decay")


@dataclass
class TrainState:
    """Where training stands; saved in every checkpoint, so ``--resume`` continues exactly."""

    update: int = 0
    epoch: int = 0  # finished epochs
    # the current epoch's batches trained on by all workers together: the next update starts at
    # this index of the epoch's batch order, which is the same for any number of workers
    global_batch: int = 0
    best: float | None = None  # best validation value (BLEU, or -ppl)
    bad_validations: int = 0  # validations in a row without improvement
    validated_at: int = -1  # update of the last validation
    # (train.max_tokens, batches trained) under each earlier token budget of the current epoch,
    # in order: global_batch then counts the batches of the pairs they left (untrained_batches)
    earlier_budgets: list = dataclasses.field(default_factory=list)


def saved_states(state: TrainState, plan: PlanState) -> dict:
    """The two states as the checkpoint keeps them: flat, one key per field."""
    return {**dataclasses.asdict(state), **dataclasses.asdict(plan)}


def load_last(cfg: RunConfig) -> tuple[RunConfig, dict]:
    """The recipe as the checkpoint that ``--resume`` continues from trained it (its size,
    :func:`checkpoint_size`), and that checkpoint, after checking that the recipe's tokenizer and
    model are its own (dropout may change); an error naming the file or the keys otherwise."""
    path = Path(cfg.out_dir) / "checkpoint_last.pt"
    if not path.is_file():
        raise FileNotFoundError(
            f"--resume: no checkpoint to resume from: {path} (the run stopped before its first save?); "
            "run without --resume to start anew"
        )
    ckpt = checkpoint.load(path)
    cfg = checkpoint_size(cfg, ckpt["config"].get("size", "auto"))
    for section in ("tokenizer", "model"):
        differ = differences(section, to_dict(getattr(cfg, section)), ckpt["config"][section], DROPOUTS)
        if differ:
            raise ValueError(
                f"--resume: the recipe's {section} differs from the checkpoint's: "
                + ", ".join(f"{key}={ours!r} (checkpoint: {theirs!r})" for key, ours, theirs in differ)
                + "; resume with the same recipe or start a new out_dir"
            )
    return cfg, ckpt


def checkpoint_size(cfg: RunConfig, saved: str) -> RunConfig:
    """``cfg`` at the size that the checkpoint trained (``saved``; auto: a run without sizes):
    ``size: auto`` takes it; a recipe that pins another size, or lacks the checkpoint's, is an
    error naming both."""
    if not cfg.sizes or (saved == "auto" and cfg.size != "auto"):
        return cfg  # the model comparison that follows finds any difference
    listed = ", ".join(cfg.sizes)
    if saved == "auto":
        raise ValueError(f"--resume: the checkpoint records no size; pin the one it trained with size=NAME ({listed})")
    if saved not in cfg.sizes:
        raise ValueError(f"--resume: the checkpoint's size {saved!r} is not one of the recipe's sizes ({listed})")
    if cfg.size not in ("auto", saved):
        raise ValueError(
            f"--resume: the recipe's size differs from the checkpoint's: size={cfg.size!r} (checkpoint: {saved!r}); "
            f"resume with size={saved} or start a new out_dir"
        )
    return with_size(cfg, saved)


def restore(built, ckpt: dict | None) -> tuple[TrainState, PlanState, bool]:
    """(training state, plan state, whether the plan must be re-fitted) to start from: a fresh
    run's (its old log removed), or ``ckpt``'s with the model, optimizer, schedule and RNG states
    loaded into ``built`` and the log cut at its update."""
    world, log_path = built.world, built.out_dir / "train_log.jsonl"
    if ckpt is None:
        if world.is_main and log_path.exists():
            log_path.unlink()
        return TrainState(), PlanState(), False
    checkpoint.restore_training(ckpt, built.model, built.optimizer, world.rank, world.world_size)
    state = TrainState(**_fields(TrainState, ckpt))
    plan = PlanState(**_fields(PlanState, ckpt))
    saved_by = len(ckpt["rng"]) if isinstance(ckpt["rng"], list) else 1  # the workers that saved it
    if "batch_index" in ckpt:  # before global_batch: each of the saved_by workers' batches, as many each
        state.global_batch = ckpt["batch_index"] * saved_by
    change_budget(state, ckpt["config"]["train"]["max_tokens"], built.cfg.train.max_tokens)
    if world.is_main:
        truncate_log(log_path, state.update)
        log.info(
            "resumed at update %d (epoch %d, batch %d of the epoch; saved by %d worker(s), %d now)",
            state.update,
            state.epoch,
            state.global_batch,
            saved_by,
            world.world_size,
        )
        if built.test_pairs:
            log.info("--resume: %s", engine_kept(plan.test_engine))
    return state, plan, apply_schedule_changes(built, ckpt, plan, state.update)


def engine_kept(test_engine: str) -> str:
    """What a resumed run does about the engine for the test split: keep the checkpoint's choice,
    or probe decoding where the checkpoint holds none."""
    if test_engine:
        return f"the test split is decoded by {test_engine}, as the checkpoint's decoding probe chose"
    return "the checkpoint holds no engine chosen for the test split (saved before a decoding probe): probing again"


def change_budget(state: TrainState, old: int, max_tokens: int) -> None:
    """On ``--resume`` with another ``train.max_tokens`` in the middle of an epoch (after running
    out of memory, say): the epoch goes on with the pairs that ``old`` left, batched under
    ``max_tokens``, so that none is trained twice and none skipped."""
    if max_tokens == old or state.global_batch == 0:
        return
    log.info(
        "--resume: train.max_tokens %d -> %d after %d batches of epoch %d: its untrained pairs are batched anew",
        old,
        max_tokens,
        state.global_batch,
        state.epoch + 1,
    )
    state.earlier_budgets = [*state.earlier_budgets, (old, state.global_batch)]
    state.global_batch = 0


def _fields(cls, ckpt: dict) -> dict:
    return {f.name: ckpt[f.name] for f in dataclasses.fields(cls) if f.name in ckpt}


def apply_schedule_changes(built, ckpt: dict, plan: PlanState, update: int) -> bool:
    """On ``--resume``, what the recipe changed in the optimizer and the schedule applies from
    ``update`` on, each change logged: the optimizer's hyper-parameters (kept by
    :func:`~nmt_ls.checkpoint.restore_training`), another ``lr_scheduler`` (the recipe's schedule
    goes on at ``update``), or in the checkpoint's schedule the changes of :func:`refit_schedule`.
    A plan that the recipe no longer makes (a pinned ``max_updates``, no wsd, no ``max_minutes``)
    is dropped, so that it no longer stops the run. Returns whether a changed ``max_minutes`` must
    re-fit the plan."""
    t, old = built.cfg.train, ckpt["config"]["train"]
    changed = differences("train", {key: value for key, value in to_dict(t).items() if key in OPTIMIZER_KEYS}, old)
    if changed:
        log.info("--resume: %s applied", changes(changed))
    if old.get("lr_scheduler", t.lr_scheduler) == t.lr_scheduler:
        built.scheduler.load_state_dict(ckpt["scheduler"])
        refit_schedule(built, old, update)
    else:
        go_to_update(built.scheduler, update)
        log.info(
            "--resume: train.lr_scheduler %s -> %s: the updates to come take its lrs from update %d on",
            old["lr_scheduler"],
            t.lr_scheduler,
            update,
        )
    budget = Budget.of(t)
    if plan.planned_updates and not budget.planning:
        log.info(
            "--resume: the plan of %d updates no longer applies (train.lr_scheduler=%s, train.max_updates=%d, "
            "train.max_minutes=%g)",
            plan.planned_updates,
            t.lr_scheduler,
            t.max_updates,
            t.max_minutes,
        )
        plan.planned_updates = 0
    if budget.planning and t.max_minutes != old["max_minutes"]:
        log.info("--resume: train.max_minutes %g -> %g: the plan is fixed again", old["max_minutes"], t.max_minutes)
        return True
    return False


def refit_schedule(built, old: dict, update: int) -> None:
    """The recipe's peak and end lrs in the checkpoint's schedule (``old``: the checkpoint's train
    config); for wsd also its shape and a pinned ``max_updates``, which re-fit the schedule: the
    updates to come take the lrs of the new shape and total, as if set from the start
    (:meth:`~nmt_ls.optim.WarmupStableDecay.set_total_updates`)."""
    t, sched = built.cfg.train, built.scheduler
    if (t.lr, t.end_lr) != (old["lr"], old["end_lr"]):
        if isinstance(sched, WarmupStableDecay):
            sched.set_peak(t.lr, t.end_lr)
        else:
            sched.base_lrs = [t.lr for _ in sched.base_lrs]
            go_to_update(sched, update)
        log.info(
            "--resume: train.lr %g -> %g and train.end_lr %g -> %g applied; the schedule goes on from update %d",
            old["lr"],
            t.lr,
            old["end_lr"],
            t.end_lr,
            update,
        )
    if not isinstance(sched, WarmupStableDecay):
        return
    shape = WsdShape(t.cooldown_fraction, t.stable_phase, t.cooldown_shape)
    if shape != sched.shape:
        changed = differences("train", dataclasses.asdict(shape), dataclasses.asdict(sched.shape))
        sched.set_shape(shape)
        log.info("--resume: %s applied; cooldown from update %d", changes(changed), sched.cooldown_start)
    if t.max_updates > 0 and t.max_updates != sched.total_updates:
        sched.set_total_updates(t.max_updates, refit=True)
        log.info(
            "--resume: the wsd schedule now ends at train.max_updates=%d (was %d); cooldown from update %d",
            t.max_updates,
            old["max_updates"],
            sched.cooldown_start,
        )


def changes(changed: list[tuple]) -> str:
    """``differences``' triples as ``key old -> new, ...``."""
    return ", ".join(f"{key} {theirs} -> {ours}" for key, ours, theirs in changed)


def truncate_log(path: Path, update: int) -> None:
    """On resume: keep only log records up to the checkpoint's update (rewritten atomically).
    A torn last line (a crash in the middle of writing it) is dropped with a warning; any other
    line that is not a JSON record is an error naming the file and line."""
    if not path.exists():
        return
    lines = path.read_text(encoding="utf-8").splitlines()
    kept = []
    for lineno, line in enumerate(lines, 1):
        try:
            record = json.loads(line) if line else None
        except json.JSONDecodeError as e:
            if lineno < len(lines):
                raise ValueError(f"{path}:{lineno}: not a JSON record ({e})") from None
            log.warning("%s:%d: dropped a torn last line (%s): %r", path, lineno, e, line)
            continue
        if record is not None and record["update"] <= update:
            kept.append(line)
    tmp = path.with_suffix(".tmp")
    tmp.write_text("".join(line + "\n" for line in kept), encoding="utf-8")
    os.replace(tmp, path)
