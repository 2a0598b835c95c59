"""The training loop, written out: data -> tokenizer -> batches -> model -> criterion -> Adam.

:func:`train` is the loop; it calls :func:`setup` once, then :func:`train_step` per update,
:func:`validate_and_save` at epoch ends (and every ``validate_every_updates``), and stops when
:func:`stop_reason` says so. Under ``torchrun`` each worker trains on its shard of the batches
with DistributedDataParallel (:mod:`nmt_ls.distributed`). The loss of an update is the smoothed
loss summed over the update's target tokens on *all* workers, divided by their global count,
so K workers take the same step as one worker on the same batches.

Files in ``cfg.out_dir``: ``config.yaml``, ``spm.model`` (+ ``spm.json``, what it was trained
from), ``train_log.jsonl`` (one JSON object per logged update and per validation),
``checkpoint_last.pt``, ``checkpoint_best.pt``.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import random
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import torch
import yaml
from torch import nn
from tqdm import tqdm

from nmt_ls import checkpoint
from nmt_ls.batching import Batch, batch_by_tokens
from nmt_ls.binarize import MmapPairs, binarize_recipe, recipe_files
from nmt_ls.config import RunConfig, to_dict
from nmt_ls.criterions import CRITERIONS, build_criterion, import_user_module, reduce_metrics
from nmt_ls.data import load_splits
from nmt_ls.distributed import World, init_world
from nmt_ls.evaluate import corpus_bleu
from nmt_ls.inference import translate
from nmt_ls.model import build_model
from nmt_ls.optim import build_optimizer, build_scheduler, check_schedule, plan_total_updates
from nmt_ls.tokenizer import Tokenizer, train_spm

log = logging.getLogger(__name__)

IMPLEMENTATIONS = ("reference", "fused", "chunked")
# A wsd plan aims at this share of train.max_minutes, so that a machine that slows down a little
# during the cooldown still finishes it; once planned, the run may pass max_minutes by up to
# PLAN_OVERRUN of it to complete its plan, and stops there if it must.
PLAN_TARGET, PLAN_OVERRUN = 0.98, 0.1
BEST_METRICS = ("bleu", "ppl")
AMP = ("none", "bf16")


@dataclass
class Progress:
    """Where training stands; saved in every checkpoint, so ``--resume`` continues exactly."""

    update: int = 0
    epoch: int = 0  # finished epochs
    batch_index: int = 0  # this worker's batches of the current epoch already trained on
    best: float | None = None  # best validation value (BLEU, or -ppl)
    bad_validations: int = 0  # validations in a row without improvement
    validated_at: int = -1  # update of the last validation
    elapsed: float = 0.0  # seconds of training (set-up excluded)
    planned_updates: int = 0  # wsd: the total fixed from the measured update rate (0: not yet)


@dataclass
class Timing:
    """What a wsd plan is made from, measured in this process: seconds spent in updates since
    the warmup ended (validations and saves excluded), and the last validation's seconds."""

    updates: int = 0
    update_s: float = 0.0
    validation_s: float = 0.0
    resumed: bool = False  # a resumed run keeps the checkpoint's plan (so it replays exactly)


@dataclass
class Run:
    """Everything the loop works with, built once by :func:`setup`."""

    cfg: RunConfig
    world: World
    tok: Tokenizer
    model: nn.Module
    forward_model: nn.Module  # what runs forward: the model (or its features, for chunked), DDP-wrapped
    criterion: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    train_data: MmapPairs  # every worker maps the same binarized files
    valid_batches: list[Batch]
    bleu_src: list[str]
    bleu_ref: list[str]
    progress: Progress
    writer: object | None = None
    timing: Timing = field(default_factory=Timing)
    window: list[dict] = field(default_factory=list)  # update results since the last train line
    window_start: float = 0.0
    bad_updates: int = 0  # non-finite updates in a row

    @property
    def out_dir(self) -> Path:
        return Path(self.cfg.out_dir)

    @property
    def log_path(self) -> Path:
        return self.out_dir / "train_log.jsonl"

    def autocast(self):
        enabled = self.cfg.train.amp == "bf16"
        return torch.autocast(self.world.device.type, dtype=torch.bfloat16, enabled=enabled)


# ---- set-up -----------------------------------------------------------------------------------


def check_config(cfg: RunConfig) -> None:
    """Every option that can be checked before any data work; errors name the recipe key."""
    t, c = cfg.train, cfg.criterion
    check_schedule(t.lr_scheduler, t.max_updates, t.lr, t.end_lr)
    if t.lr_scheduler == "wsd" and t.max_updates <= 0 and t.max_minutes <= 0:
        raise ValueError("train.lr_scheduler=wsd needs train.max_updates, or train.max_minutes to plan them from")
    choices = (
        ("criterion.implementation", c.implementation, IMPLEMENTATIONS),
        ("train.amp", t.amp, AMP),
        ("train.best_metric", t.best_metric, BEST_METRICS),
    )
    for key, value, valid in choices:
        if value not in valid:
            raise ValueError(f"{key} must be one of {', '.join(valid)}, got {value!r}")
    for key in ("update_freq", "max_tokens", "log_every_updates", "max_bad_updates"):
        if getattr(t, key) < 1:
            raise ValueError(f"train.{key} must be >= 1, got {getattr(t, key)}")
    if c.user_module:
        import_user_module(c.user_module)
    if c.name not in CRITERIONS:
        raise ValueError(f"criterion.name: unknown criterion {c.name!r}; registered: {sorted(CRITERIONS)}")
    build_criterion(**criterion_kwargs(cfg, pad_id=0))  # checks label_smoothing and smoothing


def criterion_kwargs(cfg: RunConfig, pad_id: int) -> dict:
    c = cfg.criterion
    return dict(
        name=c.name,
        pad_id=pad_id,
        label_smoothing=c.label_smoothing,
        smoothing=c.smoothing,
        ignore_prefix_size=c.ignore_prefix_size,
        report_accuracy=c.report_accuracy,
        sentence_avg=c.sentence_avg,
        fused=c.implementation == "fused",
    )


def tokenizer_spec(cfg: RunConfig) -> dict:
    """What ``spm.model`` is trained from: the tokenizer options, the data settings and the train
    split's files (path, size, mtime), the identity that its binarized cache is keyed on."""
    data = {k: v for k, v in to_dict(cfg.data).items() if k != "valid_bleu_sentences"}
    train_files = recipe_files(cfg.data, cfg.data.train_split)
    return {"tokenizer": to_dict(cfg.tokenizer), "data": data, "train_files": train_files}


def load_tokenizer(cfg: RunConfig, world: World, ckpt: dict | None) -> Tokenizer:
    """The run's sentencepiece model: the checkpoint's when resuming; else ``spm.model`` in
    ``out_dir`` if it was trained from the same options and train files, else trained anew on the
    train split (read only then)."""
    path, spec_path = Path(cfg.out_dir) / "spm.model", Path(cfg.out_dir) / "spm.json"
    spec = tokenizer_spec(cfg) if world.is_main else None  # may prepare the corpus: once
    if world.is_main and ckpt is not None:
        if ckpt["config"]["tokenizer"] != spec["tokenizer"]:
            raise ValueError(
                f"--resume: the recipe's tokenizer {spec['tokenizer']} differs from the checkpoint's "
                f"{ckpt['config']['tokenizer']}; resume with the same recipe or start a new out_dir"
            )
        checkpoint.tensor_to_spm(ckpt["spm"], path)
        spec_path.write_text(json.dumps(spec), encoding="utf-8")
    elif world.is_main:
        old = json.loads(spec_path.read_text(encoding="utf-8")) if spec_path.exists() and path.exists() else None
        if old != spec:
            if path.exists():
                changed = ", ".join(k for k in spec if old is None or old.get(k) != spec[k])
                log.info("retraining %s: its %s changed since it was trained", path, changed)
            train_pairs = load_splits(cfg.data, ("train",))["train"]
            t = cfg.tokenizer
            train_spm(
                [s for s, _ in train_pairs] + [t_ for _, t_ in train_pairs],
                path.with_suffix(""),
                t.vocab_size,
                model_type=t.model_type,
            )
            spec_path.write_text(json.dumps(spec), encoding="utf-8")
    world.barrier()
    return Tokenizer(path)


def open_data(cfg: RunConfig, tok: Tokenizer, world: World) -> dict[str, MmapPairs]:
    """The train and valid splits, binarized once (by the main worker, when the cache is
    missing or stale) and memory-mapped by every worker: nothing is broadcast."""
    if world.is_main:
        binarize_recipe(cfg, tok.model_path)
    world.barrier()
    return binarize_recipe(cfg, tok.model_path, build=False)


class DecoderFeatures(nn.Module):
    """``model`` without its output layer: (src, tgt_in) -> features (B, T, D)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, src, tgt_in):
        return self.model.decoder_features(src, tgt_in)


def forward_module(cfg: RunConfig, model: nn.Module) -> nn.Module:
    """What runs forward: ``model`` (logits), or its decoder features for the chunked criterion."""
    return DecoderFeatures(model) if cfg.criterion.implementation == "chunked" else model


def valid_data(cfg: RunConfig, tok: Tokenizer, valid: MmapPairs):
    """(valid batches for the loss, source and reference strings for greedy BLEU).

    Both come from the binarized valid split, so the loss and BLEU cover the same pairs (BLEU
    the first ``data.valid_bleu_sentences`` of them): those with two non-empty sides that fit
    ``model.max_positions``. The strings are decoded from the same ids, which gives the text
    back exactly (the tokenizer round-trips stripped text)."""
    lens = (valid.src_lens, valid.tgt_lens)
    idx = batch_by_tokens(*lens, cfg.train.max_tokens, shuffle=False)
    batches = [valid.batch(i, tok.pad_id, tok.bos_id, tok.eos_id) for i in idx]
    n_bleu = min(cfg.data.valid_bleu_sentences or len(valid), len(valid))
    src_ids, tgt_ids = valid.get(range(n_bleu))
    return batches, tok.decode_batch(src_ids), tok.decode_batch(tgt_ids)


def restore(ckpt: dict | None, run: Run) -> None:
    """Resume from ``ckpt``: states, progress, the log cut at its update; else a fresh log."""
    world, log_path = run.world, run.log_path
    if ckpt is None:
        if world.is_main and log_path.exists():
            log_path.unlink()
        return
    checkpoint.restore_training(ckpt, run.model, run.optimizer, run.scheduler, world.rank, world.world_size)
    run.progress = Progress(**{f.name: ckpt[f.name] for f in dataclasses.fields(Progress) if f.name in ckpt})
    run.timing.resumed = True
    if world.is_main:
        truncate_log(log_path, run.progress.update)
        p = run.progress
        log.info("resumed at update %d (epoch %d, batch %d)", p.update, p.epoch, p.batch_index)


def setup(cfg: RunConfig, resume: bool) -> Run:
    """Process group, data, tokenizer, model, criterion, optimizer and schedule; with
    ``resume``, their states and the progress from ``out_dir/checkpoint_last.pt``."""
    t = cfg.train
    if t.num_threads > 0:
        torch.set_num_threads(t.num_threads)
    world = init_world(t.device)
    out_dir = Path(cfg.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    last_path = out_dir / "checkpoint_last.pt"
    ckpt = checkpoint.load(last_path) if resume and last_path.exists() else None
    if world.is_main:
        (out_dir / "config.yaml").write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False), encoding="utf-8")
    random.seed(t.seed)
    torch.manual_seed(t.seed)

    tok = load_tokenizer(cfg, world, ckpt)
    data = open_data(cfg, tok, world)
    valid_batches, bleu_src, bleu_ref = valid_data(cfg, tok, data["valid"])
    model = build_model(tok.vocab_size, tok.pad_id, **dataclasses.asdict(cfg.model)).to(world.device)
    criterion = build_criterion(**criterion_kwargs(cfg, tok.pad_id))
    optimizer = build_optimizer(model, t.lr, t.betas, t.adam_eps, t.weight_decay)
    wsd = (t.cooldown_fraction, t.cooldown_shape, t.stable_phase)
    scheduler = build_scheduler(optimizer, t.warmup_steps, t.lr_scheduler, t.max_updates, t.end_lr, *wsd)
    # The chunked path takes decoder features, not logits; DDP must wrap what runs forward.
    forward_model = world.wrap(forward_module(cfg, model))
    writer = tensorboard_writer(out_dir) if world.is_main else None
    run = Run(
        cfg,
        world,
        tok,
        model,
        forward_model,
        criterion,
        optimizer,
        scheduler,
        data["train"],
        valid_batches,
        bleu_src,
        bleu_ref,
        Progress(),
        writer,
    )
    restore(ckpt, run)
    if world.is_main:
        n_params = sum(q.numel() for q in model.parameters()) / 1e6
        log.info(
            "model: %.2fM parameters; %d train pairs, %d valid; %d worker(s) on %s",
            n_params,
            len(data["train"]),
            len(data["valid"]),
            world.world_size,
            world.device,
        )
        counts = data["valid"].meta["counts"]
        log.info(
            "valid loss and BLEU on the same pairs: %d of the %d read (dropped: %d with an empty side, %d over "
            "model.max_positions); BLEU on the first %d",
            len(data["valid"]),
            counts["n_read"],
            counts["n_empty"],
            counts["n_over_positions"],
            len(bleu_src),
        )
    return run


# ---- logging ----------------------------------------------------------------------------------


def append_jsonl(path: Path, record: dict) -> None:
    with path.open("a", encoding="utf-8") as f:
        f.write(json.dumps(record) + "\n")


def truncate_log(path: Path, update: int) -> None:
    """On resume: keep only log records up to the checkpoint's update (rewritten atomically)."""
    if not path.exists():
        return
    kept = [
        line for line in path.read_text(encoding="utf-8").splitlines() if line and json.loads(line)["update"] <= update
    ]
    tmp = path.with_suffix(".tmp")
    tmp.write_text("".join(line + "\n" for line in kept), encoding="utf-8")
    os.replace(tmp, path)


def tensorboard_writer(out_dir: Path):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:  # tensorboard is optional
        return None
    return SummaryWriter(str(out_dir / "tensorboard"))


def write_record(run: Run, record: dict, keys: tuple[str, ...]) -> None:
    """One line of ``train_log.jsonl`` (and its scalars in TensorBoard); main worker only."""
    append_jsonl(run.log_path, record)
    if run.writer:
        for k in keys:
            if k in record:
                run.writer.add_scalar(f"{record['kind']}/{k}", record[k], record["update"])


def log_train(run: Run, window: list[dict], seconds: float, epoch_fraction: float) -> dict:
    """Reduce the updates since the last train line into one record and write it."""
    m = reduce_metrics(window)
    p = run.progress
    record = {
        "kind": "train",
        "update": p.update,
        "epoch": p.epoch + epoch_fraction,
        "loss": m["loss"],
        "nll_loss": m["nll_loss"],
        "kl": m["kl"],
        "ppl": m["ppl"],
        "lr": window[-1]["lr"],
        "gnorm": sum(w["gnorm"] for w in window) / len(window),
        "wps": m["ntokens"] / max(seconds, 1e-9),
        "wpb": m["ntokens"] / len(window),
        "bsz": m["nsentences"] / len(window),
        "elapsed": p.elapsed,
    }
    if "accuracy" in m:
        record["accuracy"] = m["accuracy"]
    write_record(run, record, ("loss", "nll_loss", "kl", "ppl", "accuracy", "lr", "gnorm", "wps"))
    return record


# ---- one update -------------------------------------------------------------------------------


def sample_size(run: Run, batch: Batch) -> float:
    """The batch's share of the loss's denominator: its target tokens that the criterion
    counts, or its sentences with ``criterion.sentence_avg``."""
    c = run.cfg.criterion
    if c.sentence_avg:
        return float(batch.src.size(0))
    return float(batch.tgt_out[:, c.ignore_prefix_size :].ne(run.tok.pad_id).sum())


def criterion_outputs(run: Run, outputs: torch.Tensor, tgt_out: torch.Tensor):
    """Criterion outputs of what ran forward: logits (B, T, V), or for chunked decoder features
    (B, T, D), projected chunk by chunk. Returns (LossOutput, the logits or None for chunked)."""
    if run.cfg.criterion.implementation == "chunked":
        return run.criterion.compute_from_features(outputs, run.model.output_weight, tgt_out), None
    return run.criterion.compute(outputs, tgt_out), outputs


def forward_loss(run: Run, batch: Batch):
    """Criterion outputs for one batch on the run's device, and the logits (None for chunked)."""
    with run.autocast():
        outputs = run.forward_model(batch.src, batch.tgt_in)  # logits (B, T, V), or features (B, T, D)
    return criterion_outputs(run, outputs, batch.tgt_out)


def train_step(run: Run, group: list[Batch]) -> dict | None:
    """Forward/backward over the update's batches, then one optimizer step; None (and no
    step) when the loss or the gradient is not finite on some worker."""
    world, t = run.world, run.cfg.train
    local_size = sum(sample_size(run, b) for b in group)
    global_size = world.all_reduce_sum([local_size])[0]
    scale = world.world_size / max(global_size, 1.0)  # DDP averages gradients over workers
    sums = {"loss": 0.0, "nll_loss": 0.0, "kl": 0.0, "ntokens": 0.0, "nsentences": 0.0, "n_correct": 0.0, "total": 0.0}
    for i, batch in enumerate(group):
        sync = i == len(group) - 1 or world.world_size == 1
        with nullcontext() if sync else run.forward_model.no_sync():
            batch = batch.to(world.device)
            out, logits = forward_loss(run, batch)
            loss = run.criterion.training_loss(out)
            (loss * scale).backward()
        sums["loss"] += float(loss.detach())
        sums["nll_loss"] += float(out.nll.detach())
        sums["kl"] += float(out.kl.detach())
        sums["ntokens"] += out.ntokens
        sums["nsentences"] += batch.src.size(0)
        if run.criterion.report_accuracy and logits is not None:
            n_correct, total = run.criterion.accuracy(logits.detach(), batch.tgt_out)
            sums["n_correct"] += n_correct
            sums["total"] += total
    totals = dict(zip(sums, world.all_reduce_sum(list(sums.values()))))
    gnorm = float(nn.utils.clip_grad_norm_(run.model.parameters(), t.clip_norm if t.clip_norm > 0 else math.inf))
    if not (math.isfinite(totals["loss"]) and math.isfinite(gnorm)):
        run.optimizer.zero_grad(set_to_none=True)
        return None
    lr = run.optimizer.param_groups[0]["lr"]
    run.optimizer.step()
    run.scheduler.step()
    run.optimizer.zero_grad(set_to_none=True)
    if not totals["total"]:  # no accuracy this update
        del totals["n_correct"], totals["total"]
    return {**totals, "sample_size": global_size, "gnorm": gnorm, "lr": lr}


# ---- validation and checkpoints ---------------------------------------------------------------


@torch.no_grad()
def validation_loss(run: Run) -> dict:
    """Criterion outputs summed over the valid batches, reduced per target token; through the
    criterion that training uses (chunked: from decoder features, never forming the logits).
    It runs on the main worker alone, so never through DDP."""
    run.model.eval()
    forward, logs = forward_module(run.cfg, run.model), []
    for batch in run.valid_batches:
        batch = batch.to(run.world.device)
        out, logits = criterion_outputs(run, forward(batch.src, batch.tgt_in), batch.tgt_out)
        entry = {
            "loss": float(run.criterion.training_loss(out)),
            "nll_loss": float(out.nll),
            "kl": float(out.kl),
            "ntokens": out.ntokens,
            "nsentences": batch.src.size(0),
            "sample_size": out.ntokens,
        }
        if run.criterion.report_accuracy and logits is not None:
            entry["n_correct"], entry["total"] = run.criterion.accuracy(logits, batch.tgt_out)
        logs.append(entry)
    run.model.train()
    return reduce_metrics(logs)


def validate(run: Run) -> dict:
    """Valid loss, nll, KL, ppl (and accuracy), and greedy BLEU on the first valid pairs."""
    p, e = run.progress, run.cfg.eval
    m = validation_loss(run)
    hyps = translate(
        run.model,
        run.tok,
        run.bleu_src,
        beam_size=1,
        max_len_a=e.max_len_a,
        max_len_b=e.max_len_b,
        max_tokens=e.max_tokens,
    )
    bleu, signature = corpus_bleu(hyps, run.bleu_ref)
    record = {
        "kind": "valid",
        "update": p.update,
        "epoch": p.epoch,
        "loss": m["loss"],
        "nll_loss": m["nll_loss"],
        "kl": m["kl"],
        "ppl": m["ppl"],
        "bleu": bleu,
        "bleu_signature": signature,
        "bleu_sentences": len(run.bleu_src),
        "elapsed": p.elapsed,
    }
    if "accuracy" in m:
        record["accuracy"] = m["accuracy"]
    log.info(
        "valid | epoch %d | update %d | loss %.3f | nll_loss %.3f | ppl %.2f | BLEU %.2f  %s",
        p.epoch,
        p.update,
        m["loss"],
        m["nll_loss"],
        m["ppl"],
        bleu,
        signature,
    )
    if run.bleu_src:
        log.info("example | src: %s | hyp: %s | ref: %s", run.bleu_src[0], hyps[0], run.bleu_ref[0])
    return record


def save(run: Run, name: str) -> None:
    """Write ``out_dir/name`` atomically (main worker); every worker must call it, since the
    checkpoint holds every worker's RNG states."""
    rngs = run.world.gather(checkpoint.rng_state())
    if run.world.is_main:
        state = checkpoint.training_state(
            run.model,
            run.optimizer,
            run.scheduler,
            to_dict(run.cfg),
            run.out_dir / "spm.model",
            dataclasses.asdict(run.progress),
            rngs,
        )
        checkpoint.atomic_save(state, run.out_dir / name)


def validate_and_save(run: Run) -> None:
    """Validate (main worker), track the best value, save best and last (all workers)."""
    p, world = run.progress, run.world
    start, improved = time.time(), False
    if world.is_main:
        record = validate(run)
        write_record(run, record, ("loss", "nll_loss", "kl", "ppl", "accuracy", "bleu"))
        value = record["bleu"] if run.cfg.train.best_metric == "bleu" else -record["ppl"]
        improved = p.best is None or value > p.best
        p.best = value if improved else p.best
    p.best, improved = world.broadcast((p.best, improved))
    p.bad_validations = 0 if improved else p.bad_validations + 1
    p.validated_at = p.update
    if improved:
        save(run, "checkpoint_best.pt")
    save(run, "checkpoint_last.pt")
    run.timing.validation_s = world.broadcast(time.time() - start)


# ---- the loop ---------------------------------------------------------------------------------


def plan_updates(run: Run, updates_per_epoch: int) -> None:
    """wsd with a time budget: once ``plan_window_updates`` updates after the warmup are timed
    and a validation is, fix the total updates that end at ``max_minutes`` (validations at epoch
    ends counted), and fix it again at later validations while the cooldown has not begun.
    Every worker takes rank 0's plan."""
    t, p, timing = run.cfg.train, run.progress, run.timing
    if t.lr_scheduler != "wsd" or t.max_updates > 0 or timing.validation_s <= 0 or p.validated_at != p.update:
        return
    if timing.updates < t.plan_window_updates or (timing.resumed and p.planned_updates):
        return
    if p.planned_updates and p.update >= p.planned_updates - run.scheduler.cooldown_updates:
        return  # the cooldown has begun: the plan stands
    every = t.validate_every_updates or updates_per_epoch
    planned = run.world.broadcast(
        plan_total_updates(
            PLAN_TARGET * t.max_minutes,
            p.elapsed,
            p.update,
            timing.updates,
            timing.update_s,
            0.0,
            every,
            timing.validation_s,
        )
    )
    cooldown_start = planned - round(t.cooldown_fraction * planned)
    if planned == p.planned_updates or cooldown_start < max(p.update, t.warmup_steps):
        return
    run.scheduler.set_total_updates(planned)
    p.planned_updates = planned
    log.info(
        "wsd plan: %d updates in train.max_minutes=%g (%.3f s per update over %d updates, %.1f s per "
        "validation); cooldown from update %d; pin it with train.max_updates=%d",
        planned,
        t.max_minutes,
        timing.update_s / timing.updates,
        timing.updates,
        timing.validation_s,
        cooldown_start,
        planned,
    )


def stop_reason(run: Run) -> str | None:
    """Why training must stop now (the same answer on every worker), or None."""
    t, p = run.cfg.train, run.progress
    if t.max_updates > 0 and p.update >= t.max_updates:
        return f"reached train.max_updates={t.max_updates}"
    if p.planned_updates and p.update >= p.planned_updates:
        return f"reached the {p.planned_updates} updates planned for train.max_minutes={t.max_minutes}"
    if p.epoch >= t.max_epochs:
        return f"reached train.max_epochs={t.max_epochs}"
    if t.patience > 0 and p.bad_validations >= t.patience:
        return f"early stop: no improvement of {t.best_metric} in {t.patience} validations"
    cap = t.max_minutes * (1 + PLAN_OVERRUN if p.planned_updates else 1)
    if run.world.any(t.max_minutes > 0 and p.elapsed >= 60 * cap):
        if p.planned_updates:
            log.warning(
                "stopped %.0f%% past train.max_minutes=%g at update %d of the %d planned: the cooldown is cut short",
                100 * PLAN_OVERRUN,
                t.max_minutes,
                p.update,
                p.planned_updates,
            )
        return f"reached train.max_minutes={t.max_minutes}" + (f" + {PLAN_OVERRUN:.0%}" if p.planned_updates else "")
    return None


def skip_bad_update(run: Run, bad_updates: int) -> None:
    t = run.cfg.train
    log.warning(
        "update %d: non-finite loss or gradient, batch skipped (%d in a row)", run.progress.update + 1, bad_updates
    )
    if bad_updates >= t.max_bad_updates:
        raise FloatingPointError(
            f"{bad_updates} consecutive non-finite updates at update {run.progress.update + 1}; "
            "stopping (lower train.lr?)"
        )


def after_update(run: Run, result: dict, n_batches: int) -> dict | None:
    """Log, validate, plan and save as the recipe says, after update ``run.progress.update``;
    returns the train record if one was written."""
    t, p = run.cfg.train, run.progress
    record = None
    run.window.append(result)
    if run.world.is_main and (p.update % t.log_every_updates == 0 or p.batch_index >= n_batches):
        record = log_train(run, run.window, time.time() - run.window_start, p.batch_index / n_batches)
        run.window, run.window_start = [], time.time()
    if t.validate_every_updates and p.update % t.validate_every_updates == 0:
        validate_and_save(run)
        plan_updates(run, n_batches // t.update_freq)
    elif t.save_every_updates and p.update % t.save_every_updates == 0:
        save(run, "checkpoint_last.pt")
    return record


def train_epoch(run: Run, batches: list, clock: float) -> str | None:
    """Train on this worker's ``batches`` from ``progress.batch_index`` on, until the epoch
    ends or :func:`stop_reason` says stop (returned)."""
    t, p, tok = run.cfg.train, run.progress, run.tok
    bar = tqdm(
        total=math.ceil(len(batches) / t.update_freq),
        initial=p.batch_index // t.update_freq,
        desc=f"epoch {p.epoch + 1}",
        disable=not run.world.is_main,
        mininterval=2.0,
        unit="upd",
    )
    reason = None
    while p.batch_index < len(batches) and (reason := stop_reason(run)) is None:
        group = batches[p.batch_index : p.batch_index + t.update_freq]
        step_start = time.time()
        result = train_step(run, [run.train_data.batch(idx, tok.pad_id, tok.bos_id, tok.eos_id) for idx in group])
        p.batch_index += len(group)
        p.elapsed = time.time() - clock
        if p.update >= t.warmup_steps:
            run.timing.updates += 1
            run.timing.update_s += time.time() - step_start
        bar.update(1)
        run.bad_updates = 0 if result else run.bad_updates + 1
        if result is None:
            skip_bad_update(run, run.bad_updates)
            continue
        p.update += 1
        record = after_update(run, result, len(batches))
        if record:
            bar.set_postfix(loss=f"{record['loss']:.3f}", ppl=f"{record['ppl']:.2f}", lr=f"{record['lr']:.1e}")
    bar.close()
    return reason


def train(cfg: RunConfig, resume: bool = False) -> dict:
    """Train as ``cfg`` says; returns a summary (updates, best metric, paths, minutes).

    With ``resume``, continue from ``out_dir/checkpoint_last.pt`` exactly where it stopped:
    same data position, RNG states, optimizer and schedule, so the loss curve continues as
    if the run had never stopped.
    """
    check_config(cfg)  # before any data work
    run = setup(cfg, resume)
    t, p = cfg.train, run.progress
    clock, run.window_start = time.time() - p.elapsed, time.time()
    run.model.train()
    while (reason := stop_reason(run)) is None:
        lens = (run.train_data.src_lens, run.train_data.tgt_lens)
        batches = run.world.shard(batch_by_tokens(*lens, t.max_tokens, seed=t.seed, epoch=p.epoch, shuffle=True))
        reason = train_epoch(run, batches, clock)
        if p.batch_index >= len(batches):  # the epoch is over, whatever its last update did
            p.epoch, p.batch_index = p.epoch + 1, 0
            if p.validated_at != p.update:
                validate_and_save(run)
            plan_updates(run, len(batches) // t.update_freq)
        elif reason is not None:
            break
    if p.validated_at != p.update:
        validate_and_save(run)
    if run.writer:
        run.writer.close()
    return summarize(run, reason)


def summarize(run: Run, reason: str) -> dict:
    t, p, out = run.cfg.train, run.progress, run.out_dir
    summary = {
        "updates": p.update,
        "planned_updates": p.planned_updates,
        "epochs": p.epoch,
        "best": p.best,
        "best_metric": t.best_metric,
        "minutes": p.elapsed / 60,
        "stop_reason": reason,
        "final_lr": run.optimizer.param_groups[0]["lr"],
        "log": str(run.log_path),
        "checkpoint_best": str(out / "checkpoint_best.pt"),
        "checkpoint_last": str(out / "checkpoint_last.pt"),
        "params": sum(q.numel() for q in run.model.parameters()),
    }
    if run.world.is_main:
        log.info(
            "training done (%s): %d updates, %.1f minutes, lr now %.3g, best %s %s",
            reason,
            p.update,
            summary["minutes"],
            summary["final_lr"],
            t.best_metric,
            p.best,
        )
    return summary
