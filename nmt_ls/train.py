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
import functools
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
from nmt_ls.batching import Batch, batch_by_tokens, update_size
from nmt_ls.binarize import MmapPairs, binarize_recipe
from nmt_ls.config import DROPOUTS, RunConfig, differences, to_dict
from nmt_ls.criterions import CRITERIONS, build_criterion, import_user_module, reduce_metrics
from nmt_ls.data import Corpus, open_corpus, read_split
from nmt_ls.distributed import World, init_world
from nmt_ls.evaluate import corpus_bleu
from nmt_ls.hardware import (
    AMP,
    choose_amp,
    cpu_capability,
    cpu_model,
    matmul_gflops,
    native_bf16,
    release_freed_memory,
    usable_cores,
)
from nmt_ls.inference import translate
from nmt_ls.model import build_model
from nmt_ls.optim import (
    COOLDOWN_SHAPES,
    STABLE_PHASES,
    Cadence,
    WarmupStableDecay,
    build_optimizer,
    build_scheduler,
    plan_total_updates,
)
from nmt_ls.tokenizer import MODEL_TYPES, Tokenizer, train_spm

log = logging.getLogger(__name__)

IMPLEMENTATIONS = ("reference", "fused", "chunked")
# A wsd plan aims at this share of train.max_minutes (less the test decoding's reserve), so that
# the estimates may be off a little and the run still ends inside the budget; past the budget it
# stops, cooldown done or not. The plan is fixed again from every new measurement (the update rate
# over each window of plan_window_updates updates, each validation) when it moves by PLAN_SLACK.
PLAN_TARGET, PLAN_SLACK = 0.97, 0.005
# Seconds kept after test decoding for loading the best checkpoint, scoring and the plot.
RUN_TAIL_S = 20.0
# Valid sentences decoded (greedy and beam) to estimate decoding speed before the first validation.
DECODE_PROBE_SENTENCES = 32
BEST_METRICS = ("bleu", "ppl")
# Every this many updates the heap's free pages go back to the system (see release_freed_memory):
# under bf16 autocast every update (a 2-core AVX-512 BF16 CPU: peak RSS 1.48 GB in 123 updates
# instead of 2.37 GB, at 0.91x the tokens/s; every 10 updates, a whole run still peaked at 2.42 GB).
TRIM_EVERY = {"bf16": 1, "none": 10}


@dataclass
class Progress:
    """Where training stands; saved in every checkpoint, so ``--resume`` continues exactly."""

    update: int = 0
    epoch: int = 0  # finished epochs
    # the current epoch's batches trained on by all workers together: the next update starts at
    # this index of the epoch's batch order, which is the same for any number of workers
    global_batch: int = 0
    best: float | None = None  # best validation value (BLEU, or -ppl)
    bad_validations: int = 0  # validations in a row without improvement
    validated_at: int = -1  # update of the last validation
    elapsed: float = 0.0  # seconds of the run so far: set-up, updates, validations (of every process)
    planned_updates: int = 0  # wsd: the total fixed from the measured update rate (0: not yet)
    update_s: float = 0.0  # seconds per update over the last timed window (0: not measured yet)
    validation_s: float = 0.0  # seconds of the last validation with its saves (0: not measured yet)
    greedy_s: float = 0.0  # seconds per sentence of greedy decoding, at the last validation or probe
    beam_ratio: float = 0.0  # beam decoding's seconds over greedy's on the same sentences


@dataclass
class Timing:
    """The update-rate window now being timed (validations and saves excluded)."""

    updates: int = 0
    seconds: float = 0.0
    skip: int = 1  # the first update of a process is not timed (allocations, kernel choice)
    save_s: float = 0.0  # seconds of one checkpoint save, the last measured


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
    test_sentences: int = 0  # sentences that `nmt-ls run` decodes after training: their time is reserved
    epoch_batches: int = 0  # the current epoch's batches, all workers' together
    clock: float = 0.0  # time.time() at which the run, all its processes together, would have started
    refit: bool = False  # resumed with another budget: the next plan re-fits the schedule (see set_total_updates)
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

    def autocast(self, amp: str | None = None):
        enabled = (amp or self.cfg.train.amp) == "bf16"
        return torch.autocast(self.world.device.type, dtype=torch.bfloat16, enabled=enabled)

    @property
    def planning(self) -> bool:
        """Is the number of updates planned from the time budget (wsd, no pinned max_updates)?"""
        t = self.cfg.train
        return t.lr_scheduler == "wsd" and t.max_updates <= 0 and t.max_minutes > 0

    def reserve_s(self) -> float:
        """Seconds kept for what follows training: decoding the test set greedy and with beam
        search (estimated from the decoding speed measured at the last validation or probe)."""
        p = self.progress
        if not self.test_sentences:
            return 0.0
        return self.test_sentences * p.greedy_s * (1 + p.beam_ratio) + RUN_TAIL_S

    def deadline_s(self) -> float:
        """Seconds into the run by which training must have stopped (inf without a budget)."""
        return 60 * self.cfg.train.max_minutes - self.reserve_s() if self.cfg.train.max_minutes > 0 else math.inf


# ---- set-up -----------------------------------------------------------------------------------


# The range of each count, length and rate that check_config checks: key -> (least, most).
RANGES = {
    "data.max_len": (1, math.inf),
    "data.valid_bleu_sentences": (0, math.inf),
    "tokenizer.vocab_size": (1, math.inf),
    "model.dropout": (0, 1),
    "model.attn_dropout": (0, 1),
    "train.update_freq": (1, math.inf),
    "train.max_tokens": (1, math.inf),
    "train.log_every_updates": (1, math.inf),
    "train.max_bad_updates": (1, math.inf),
    "train.plan_window_updates": (1, math.inf),
    "train.cooldown_fraction": (0, 1),
    "train.warmup_steps": (0, math.inf),
    "train.max_updates": (0, math.inf),
    "train.max_minutes": (0, math.inf),
    "train.validate_every_updates": (0, math.inf),
    "train.save_every_updates": (0, math.inf),
    "train.patience": (0, math.inf),
    "train.clip_norm": (0, math.inf),
    "train.weight_decay": (0, math.inf),
    "train.max_warmup_fraction": (0, 1),
    "eval.beam_size": (1, math.inf),
    "eval.max_tokens": (1, math.inf),
}


def check_config(cfg: RunConfig) -> None:
    """Every option that can be checked before any data work; errors name the recipe key."""
    t, c = cfg.train, cfg.criterion
    if t.lr_scheduler == "wsd" and t.max_updates <= 0 and t.max_minutes <= 0:
        raise ValueError("train.lr_scheduler=wsd needs train.max_updates, or train.max_minutes to plan them from")
    choices = (
        ("criterion.implementation", c.implementation, IMPLEMENTATIONS),
        ("train.amp", t.amp, AMP),
        ("train.best_metric", t.best_metric, BEST_METRICS),
        ("train.cooldown_shape", t.cooldown_shape, COOLDOWN_SHAPES),
        ("train.stable_phase", t.stable_phase, STABLE_PHASES),
        ("tokenizer.model_type", cfg.tokenizer.model_type, MODEL_TYPES),
    )
    for key, value, valid in choices:
        if value not in valid:
            raise ValueError(f"{key} must be one of {', '.join(valid)}, got {value!r}")
    for key, (least, most) in RANGES.items():
        section, name = key.split(".")
        value = getattr(getattr(cfg, section), name)
        if not least <= value <= most:
            bounds = f">= {least}" if most == math.inf else f"in [{least}, {most}]"
            raise ValueError(f"{key} must be {bounds}, got {value}")
    if t.num_threads != "auto" and not (isinstance(t.num_threads, int) and t.num_threads >= 0):
        raise ValueError(f"train.num_threads must be auto or a number of threads >= 1, got {t.num_threads!r}")
    if t.dist_timeout_minutes <= 0:
        raise ValueError(f"train.dist_timeout_minutes must be > 0, got {t.dist_timeout_minutes}")
    # The schedule and the model check the rest themselves: build them on nothing.
    build_schedule(cfg, torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=t.lr))
    with torch.device("meta"):
        build_model(cfg.tokenizer.vocab_size, 0, **dataclasses.asdict(cfg.model))
    if c.user_module:
        import_user_module(c.user_module)
    if c.name not in CRITERIONS:
        raise ValueError(f"criterion.name: unknown criterion {c.name!r}; registered: {sorted(CRITERIONS)}")
    build_criterion(**criterion_kwargs(cfg, pad_id=0))  # checks label_smoothing and smoothing


def build_schedule(cfg: RunConfig, optimizer: torch.optim.Optimizer) -> torch.optim.lr_scheduler.LRScheduler:
    t = cfg.train
    wsd = (t.cooldown_fraction, t.cooldown_shape, t.stable_phase)
    return build_scheduler(optimizer, t.warmup_steps, t.lr_scheduler, t.max_updates, t.end_lr, *wsd)


def check_resume(cfg: RunConfig, ckpt: dict) -> None:
    """Before anything in ``out_dir`` is rewritten: the recipe's tokenizer and model must be the
    checkpoint's (dropout may change)."""
    for section in ("tokenizer", "model"):
        differ = differences(section, to_dict(getattr(cfg, section)), ckpt["config"][section], DROPOUTS)
        if differ:
            raise ValueError(
                f"--resume: the recipe's {section} differs from the checkpoint's: "
                + ", ".join(f"{key}={ours!r} (checkpoint: {theirs!r})" for key, ours, theirs in differ)
                + "; resume with the same recipe or start a new out_dir"
            )


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


def tokenizer_spec(cfg: RunConfig, corpus: Corpus) -> dict:
    """What ``spm.model`` is trained from: the tokenizer options, the data settings and the train
    split's files (path, size, mtime), the identity that its binarized cache is keyed on."""
    data = {k: v for k, v in to_dict(cfg.data).items() if k != "valid_bleu_sentences"}
    train_files = corpus.files(corpus.train_split)
    return {"tokenizer": to_dict(cfg.tokenizer), "data": data, "train_files": train_files}


def load_tokenizer(cfg: RunConfig, world: World, ckpt: dict | None, corpus: Corpus) -> Tokenizer:
    """The run's sentencepiece model: the checkpoint's when resuming; else ``spm.model`` in
    ``out_dir`` if it was trained from the same options and train files, else trained anew on the
    train split (read only then)."""
    path, spec_path = Path(cfg.out_dir) / "spm.model", Path(cfg.out_dir) / "spm.json"
    spec = tokenizer_spec(cfg, corpus) if world.is_main else None
    if world.is_main and ckpt is not None:  # its tokenizer is the recipe's (check_resume)
        checkpoint.tensor_to_spm(ckpt["spm"], path)
        spec_path.write_text(json.dumps(spec), encoding="utf-8")
    elif world.is_main:
        old = json.loads(spec_path.read_text(encoding="utf-8")) if spec_path.exists() and path.exists() else None
        if old != spec:
            if path.exists():
                changed = ", ".join(k for k in spec if old is None or old.get(k) != spec[k])
                log.info("retraining %s: its %s changed since it was trained", path, changed)
            train_pairs = read_split(corpus, "train")
            t = cfg.tokenizer
            train_spm(
                [s for s, _ in train_pairs] + [t_ for _, t_ in train_pairs],
                path.with_suffix(""),
                t.vocab_size,
                model_type=t.model_type,
            )
            spec_path.write_text(json.dumps(spec), encoding="utf-8")
    world.wait_for_setup()
    return Tokenizer(path)


def open_data(cfg: RunConfig, tok: Tokenizer, world: World, corpus: Corpus) -> dict[str, MmapPairs]:
    """The train and valid splits, binarized once (by the main worker, when the cache is
    missing or stale) and memory-mapped by every worker: nothing is broadcast."""
    if world.is_main:
        binarize_recipe(cfg, corpus, tok.model_path)
    world.wait_for_setup()
    return binarize_recipe(cfg, corpus, tok.model_path, build=False)


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
    saved_by = len(ckpt["rng"]) if isinstance(ckpt["rng"], list) else 1  # the workers that saved it
    if "batch_index" in ckpt:  # before global_batch: each of the saved_by workers' batches, as many each
        run.progress.global_batch = ckpt["batch_index"] * saved_by
    if world.is_main:
        truncate_log(log_path, run.progress.update)
        p = run.progress
        log.info(
            "resumed at update %d (epoch %d, batch %d of the epoch; saved by %d worker(s), %d now)",
            p.update,
            p.epoch,
            p.global_batch,
            saved_by,
            world.world_size,
        )
    apply_schedule_changes(run, ckpt["config"]["train"])


def apply_schedule_changes(run: Run, old: dict) -> None:
    """On ``--resume``, apply what the recipe changed in the schedule: the peak and end lrs,
    and a pinned wsd ``max_updates`` (the cooldown re-fitted to end there; from the lr of now
    if it had begun). A changed ``max_minutes`` is re-planned at the start of the epoch."""
    t, sched = run.cfg.train, run.scheduler
    if (t.lr, t.end_lr) != (old["lr"], old["end_lr"]):
        if isinstance(sched, WarmupStableDecay):
            sched.set_peak(t.lr, t.end_lr)
        else:
            sched.base_lrs = [t.lr for _ in sched.base_lrs]
            for group, lr in zip(run.optimizer.param_groups, sched.get_lr()):
                group["initial_lr"], group["lr"] = t.lr, lr
        log.info(
            "--resume: train.lr %g -> %g and train.end_lr %g -> %g applied; the schedule goes on from update %d",
            old["lr"],
            t.lr,
            old["end_lr"],
            t.end_lr,
            run.progress.update,
        )
    if isinstance(sched, WarmupStableDecay) and t.max_updates > 0 and t.max_updates != sched.total_updates:
        sched.set_total_updates(t.max_updates, refit=True)
        log.info(
            "--resume: the wsd schedule now ends at train.max_updates=%d (was %d); cooldown from update %d",
            t.max_updates,
            old["max_updates"],
            sched.cooldown_start,
        )
    if run.planning and t.max_minutes != old["max_minutes"]:
        run.refit = True
        log.info("--resume: train.max_minutes %g -> %g: the plan is fixed again", old["max_minutes"], t.max_minutes)


def probe_batches(run: Run, count: int = 2) -> list[Batch]:
    """The first ``count`` batches of this worker's first epoch, on the run's device."""
    t, tok, data = run.cfg.train, run.tok, run.train_data
    order = run.world.shard(batch_by_tokens(data.src_lens, data.tgt_lens, t.max_tokens, seed=t.seed, shuffle=True))
    return [data.batch(idx, tok.pad_id, tok.bos_id, tok.eos_id).to(run.world.device) for idx in order[:count]]


def tokens_per_second(run: Run, batches: list[Batch], amp: str) -> float:
    """Target tokens per second of forward and backward over ``batches`` in precision ``amp``
    (after one untimed pass), leaving the model, its gradients and the RNG as they were."""
    devices = [run.world.device] if run.world.device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        for _ in range(2):  # a warm-up pass, then the timed one
            start, tokens = time.perf_counter(), 0
            for batch in batches:
                out, _ = forward_loss(run, batch, amp)
                run.criterion.training_loss(out).backward()
                tokens += out.ntokens
            if run.world.device.type == "cuda":
                torch.cuda.synchronize()
    run.model.zero_grad(set_to_none=True)
    return tokens / (time.perf_counter() - start)


def choose_precision(run: Run, ckpt: dict | None) -> None:
    """Resolve ``train.amp`` (``auto``: the checkpoint's choice when resuming, else measured on
    this machine) into ``run.cfg``; log the machine and the choice with its reason."""
    t, world = run.cfg.train, run.world
    if t.amp == "auto" and ckpt is not None and ckpt["config"]["train"].get("amp") in ("none", "bf16"):
        amp = ckpt["config"]["train"]["amp"]
        choice = (amp, f"{amp}, as the checkpoint was trained")
    else:
        batches = functools.cache(lambda: probe_batches(run))  # built once, for both precisions
        c = choose_amp(t.amp, world.device, lambda amp: tokens_per_second(run, batches(), amp))
        choice = (c.amp, c.reason)
    amp, reason = world.broadcast(choice)
    run.cfg = dataclasses.replace(run.cfg, train=dataclasses.replace(t, amp=amp))
    if not world.is_main:
        return
    if world.device.type == "cpu":
        log.info(
            "machine: %s, %s, %s bf16, %d thread(s): fp32 matmul %.0f GFLOP/s",
            cpu_model(),
            cpu_capability(),
            "native" if native_bf16(world.device) else "no native",
            t.num_threads,
            matmul_gflops(),
        )
    log.info("amp %s: %s", t.amp, reason)


def num_threads(setting: int | str) -> int:
    """``train.num_threads``: ``auto`` (or 0) is the cores this process may use, shared among
    the workers that torchrun starts on this machine."""
    if setting in ("auto", 0):
        return max(1, usable_cores() // int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    return int(setting)


def load_last(out_dir: Path) -> dict:
    """The checkpoint that ``--resume`` continues from; an error naming it if there is none."""
    path = out_dir / "checkpoint_last.pt"
    if not path.is_file():
        raise FileNotFoundError(
            f"--resume: no checkpoint to resume from: {path} (the run stopped before its first save?); "
            "run without --resume to start anew"
        )
    return checkpoint.load(path)


def setup(cfg: RunConfig, resume: bool, test_split: bool = False) -> Run:
    """Process group, data, tokenizer, model, criterion, optimizer and schedule; with
    ``resume``, their states and the progress from ``out_dir/checkpoint_last.pt``; then the
    precision (``train.amp``), chosen on this machine unless the checkpoint fixed it."""
    t = cfg.train
    threads = num_threads(t.num_threads)
    torch.set_num_threads(threads)
    cfg = dataclasses.replace(cfg, train=dataclasses.replace(t, num_threads=threads))
    world = init_world(t.device, t.dist_timeout_minutes)
    out_dir = Path(cfg.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    ckpt = load_last(out_dir) if resume else None
    if ckpt is not None:
        check_resume(cfg, ckpt)
    random.seed(t.seed)
    torch.manual_seed(t.seed)

    corpus = open_corpus(cfg.data, prepare=world.is_main)  # prepared by the main worker alone
    tok = load_tokenizer(cfg, world, ckpt, corpus)
    data = open_data(cfg, tok, world, corpus)
    valid_batches, bleu_src, bleu_ref = valid_data(cfg, tok, data["valid"])
    test_sentences = len(read_split(corpus, "test")) if test_split and world.is_main else 0
    model = build_model(tok.vocab_size, tok.pad_id, **dataclasses.asdict(cfg.model)).to(world.device)
    criterion = build_criterion(**criterion_kwargs(cfg, tok.pad_id))
    optimizer = build_optimizer(model, t.lr, t.betas, t.adam_eps, t.weight_decay)
    scheduler = build_schedule(cfg, optimizer)
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
        test_sentences,
    )
    restore(ckpt, run)
    choose_precision(run, ckpt)
    if world.is_main:
        (out_dir / "config.yaml").write_text(yaml.safe_dump(to_dict(run.cfg), sort_keys=False), encoding="utf-8")
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


def forward_loss(run: Run, batch: Batch, amp: str | None = None):
    """Criterion outputs for one batch on the run's device, and the logits (None for chunked);
    in precision ``amp`` (default: the run's)."""
    with run.autocast(amp):
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
    start = time.time()
    hyps = translate(run.model, run.tok, run.bleu_src, dataclasses.replace(e, beam_size=1))
    if run.bleu_src:
        p.greedy_s = (time.time() - start) / len(run.bleu_src)
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
    """Validate (main worker), track the best value, fix the plan again from the validation's
    time, and save best and last (all workers), so the checkpoint holds the plan in force."""
    p, world = run.progress, run.world
    start, improved = time.time(), False
    if world.is_main:
        record = validate(run)
        write_record(run, record, ("loss", "nll_loss", "kl", "ppl", "accuracy", "bleu"))
        value = record["bleu"] if run.cfg.train.best_metric == "bleu" else -record["ppl"]
        improved = p.best is None or value > p.best
        p.best = value if improved else p.best
    p.best, improved, p.greedy_s = world.broadcast((p.best, improved, p.greedy_s))
    p.bad_validations = 0 if improved else p.bad_validations + 1
    p.validated_at = p.update
    p.validation_s = world.broadcast(time.time() - start) + run.timing.save_s
    plan_updates(run)
    start = time.time()
    if improved:
        save(run, "checkpoint_best.pt")
    save(run, "checkpoint_last.pt")
    run.timing.save_s = (time.time() - start) / (1 + improved)


# ---- the loop ---------------------------------------------------------------------------------


def probe_decoding(run: Run) -> None:
    """Before the first validation, estimate what the plan needs from decoding a few valid
    sentences greedy and with beam search, and from a pass of the valid loss: the seconds per
    sentence, beam's factor over greedy, and the seconds of one validation (main worker's)."""
    p, e = run.progress, run.cfg.eval
    src = run.bleu_src[:DECODE_PROBE_SENTENCES]
    if run.world.is_main and src:
        seconds = []
        for beam in (1, e.beam_size):
            start = time.time()
            translate(run.model, run.tok, src, dataclasses.replace(e, beam_size=beam))
            seconds.append(time.time() - start)
        p.greedy_s, p.beam_ratio = seconds[0] / len(src), seconds[1] / max(seconds[0], 1e-9)
        if not p.validation_s:  # none measured yet: a pass of the valid loss and greedy BLEU's decoding
            start = time.time()
            validation_loss(run)
            p.validation_s = time.time() - start + p.greedy_s * len(run.bleu_src)
    p.greedy_s, p.beam_ratio, p.validation_s = run.world.broadcast((p.greedy_s, p.beam_ratio, p.validation_s))


def plan_updates(run: Run) -> None:
    """wsd with a time budget: fix the total updates whose cooldown ends at ``PLAN_TARGET`` of
    ``max_minutes``, less the test decoding's reserve, from the last measured update rate
    (validations to come counted, at epoch ends and every ``validate_every_updates``; capped
    where ``max_epochs`` ends the run). Called at every new measurement; a plan that moves by
    more than ``PLAN_SLACK`` replaces the one in force (from the lr of now if its cooldown has
    begun). The first plan also sizes the warmup: at most ``max_warmup_fraction`` of the run.
    Every worker takes rank 0's plan."""
    t, p, sched = run.cfg.train, run.progress, run.scheduler
    if not run.planning or p.update_s <= 0:
        return
    p.elapsed = time.time() - run.clock
    if not p.validation_s or (run.test_sentences and not p.beam_ratio):
        probe_decoding(run)
    per_epoch, epoch_left = (
        epoch_updates(run, run.epoch_batches),
        epoch_updates(run, run.epoch_batches - p.global_batch),
    )
    cadence = Cadence(t.validate_every_updates, per_epoch, p.update + epoch_left, p.validated_at)
    max_total = p.update + epoch_left + (t.max_epochs - p.epoch - 1) * per_epoch
    seconds_left = PLAN_TARGET * 60 * t.max_minutes - run.reserve_s() - p.elapsed
    total = plan_total_updates(seconds_left, p.update_s, p.update, cadence, p.validation_s, max_total)
    total = run.world.broadcast(total)
    if p.planned_updates and abs(total - p.planned_updates) <= PLAN_SLACK * p.planned_updates and not run.refit:
        return
    cooldown_start = total - round(t.cooldown_fraction * total)
    if p.planned_updates:
        warmup = min(sched.warmup_steps, cooldown_start)
    else:
        warmup = min(t.warmup_steps, max(p.update + 1, round(t.max_warmup_fraction * total)), cooldown_start)
    sched.set_total_updates(total, max(warmup, 0), refit=run.refit)
    first, p.planned_updates, run.refit = not p.planned_updates, total, False
    log.info(
        "wsd %s: %d updates in train.max_minutes=%g (%.3f s per update, %.1f s per validation, %.0f s "
        "kept for test decoding); warmup %d, cooldown from update %d; pin it with train.max_updates=%d "
        "train.warmup_steps=%d",
        "plan" if first else "re-plan",
        total,
        t.max_minutes,
        p.update_s,
        p.validation_s,
        run.reserve_s(),
        sched.warmup_steps,
        sched.cooldown_start,
        total,
        sched.warmup_steps,
    )


def measure_rate(run: Run, seconds: float) -> None:
    """Add one update's seconds to the timing window; when the window is full, its rate becomes
    the run's (every worker takes rank 0's) and the plan is fixed again."""
    timing, t = run.timing, run.cfg.train
    if timing.skip:
        timing.skip -= 1
        return
    timing.updates, timing.seconds = timing.updates + 1, timing.seconds + seconds
    if timing.updates >= t.plan_window_updates:
        run.progress.update_s = run.world.broadcast(timing.seconds / timing.updates)
        timing.updates, timing.seconds = 0, 0.0
        plan_updates(run)


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
    if run.world.any(p.elapsed >= run.deadline_s()):
        if p.planned_updates:
            log.warning(
                "stopped at train.max_minutes=%g at update %d of the %d planned: the cooldown is cut short",
                t.max_minutes,
                p.update,
                p.planned_updates,
            )
        reserve = f", less {run.reserve_s():.0f} s kept for test decoding" if run.test_sentences else ""
        return f"reached train.max_minutes={t.max_minutes}{reserve}"
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


def epoch_updates(run: Run, n_batches: int) -> int:
    """Updates in an epoch of ``n_batches`` (all workers' together)."""
    return n_batches // (run.cfg.train.update_freq * run.world.world_size)


def after_update(run: Run, result: dict, n_batches: int) -> dict | None:
    """Log, validate, plan and save as the recipe says, after update ``run.progress.update``
    of an epoch of ``n_batches``; returns the train record if one was written."""
    t, p, world = run.cfg.train, run.progress, run.world
    record = None
    run.window.append(result)
    epoch_end = update_size(n_batches, p.global_batch, world.world_size, t.update_freq) == 0
    if world.is_main and (p.update % t.log_every_updates == 0 or epoch_end):
        epoch_fraction = 1.0 if epoch_end else p.global_batch / n_batches
        record = log_train(run, run.window, time.time() - run.window_start, epoch_fraction)
        run.window, run.window_start = [], time.time()
    if t.validate_every_updates and p.update % t.validate_every_updates == 0:
        validate_and_save(run)
    elif t.save_every_updates and p.update % t.save_every_updates == 0:
        save(run, "checkpoint_last.pt")
    return record


def train_epoch(run: Run, batches: list) -> str | None:
    """Train on the epoch's ``batches`` (all workers', in the same order on each) from
    ``progress.global_batch`` on, each worker on its shard of every update's batches
    (:func:`~nmt_ls.batching.update_size`), until the epoch ends (None) or :func:`stop_reason`
    says stop (returned)."""
    t, p, tok, world = run.cfg.train, run.progress, run.tok, run.world
    per_update = t.update_freq * world.world_size
    bar = tqdm(
        total=math.ceil(len(batches) / per_update),
        initial=p.global_batch // per_update,
        desc=f"epoch {p.epoch + 1}",
        disable=not world.is_main,
        mininterval=2.0,
        unit="upd",
    )
    reason = None
    while (n := update_size(len(batches), p.global_batch, world.world_size, t.update_freq)) and (
        reason := stop_reason(run)
    ) is None:
        group = world.shard(batches[p.global_batch : p.global_batch + n])
        step_start = time.time()
        result = train_step(run, [run.train_data.batch(idx, tok.pad_id, tok.bos_id, tok.eos_id) for idx in group])
        p.global_batch += n
        p.elapsed = time.time() - run.clock
        bar.update(1)
        run.bad_updates = 0 if result else run.bad_updates + 1
        if result is None:
            skip_bad_update(run, run.bad_updates)
            continue
        p.update += 1
        if p.update % TRIM_EVERY[run.cfg.train.amp] == 0 and run.world.device.type == "cpu":
            release_freed_memory()
        measure_rate(run, time.time() - step_start)
        record = after_update(run, result, len(batches))
        if record:
            bar.set_postfix(loss=f"{record['loss']:.3f}", ppl=f"{record['ppl']:.2f}", lr=f"{record['lr']:.1e}")
    bar.close()
    return reason


def train(cfg: RunConfig, resume: bool = False, started: float | None = None, test_split: bool = False) -> dict:
    """Train as ``cfg`` says; returns a summary (updates, best metric, paths, minutes).

    With ``resume``, continue from ``out_dir/checkpoint_last.pt`` exactly where it stopped:
    same data position, RNG states, optimizer and schedule, so the loss curve continues as
    if the run had never stopped. ``train.max_minutes`` counts from ``started`` (default: now),
    set-up included; with ``test_split`` (``nmt-ls run``) the time to decode the test split
    after training is kept out of it.
    """
    started = time.time() if started is None else started
    check_config(cfg)  # before any data work
    run = setup(cfg, resume, test_split)
    t, p = run.cfg.train, run.progress
    run.clock, run.window_start = started - p.elapsed, time.time()
    run.model.train()
    while True:
        lens = (run.train_data.src_lens, run.train_data.tgt_lens)
        batches = batch_by_tokens(*lens, t.max_tokens, seed=t.seed, epoch=p.epoch, shuffle=True)
        if len(batches) < run.world.world_size:
            n, k = len(batches), run.world.world_size
            raise ValueError(f"train.max_tokens={t.max_tokens} makes {n} batches an epoch, too few for {k} workers")
        run.epoch_batches = len(batches)
        plan_updates(run)  # from the rate measured so far (e.g. the checkpoint's), for this epoch's length
        if (reason := stop_reason(run)) is not None or (reason := train_epoch(run, batches)) is not None:
            break
        p.epoch, p.global_batch = p.epoch + 1, 0  # the epoch is over, whatever its last update did
        if p.validated_at != p.update:
            validate_and_save(run)
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
