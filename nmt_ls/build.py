"""What a training run builds once: :func:`setup` checks the recipe, joins the workers, trains or
loads the tokenizer, maps the binarized data and builds the model, criterion, optimizer and
schedule into a frozen :class:`Built`; :func:`check_config` checks a recipe before any data work.

Files in ``cfg.out_dir``: ``config.yaml`` (the resolved recipe), ``spm.model`` (+ ``spm.json``,
what it was trained from), ``train_log.jsonl``, ``checkpoint_last.pt``, ``checkpoint_best.pt``,
and ``.lock``, which a run holds for its life so that a second run there is refused.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import functools
import json
import logging
import math
import os
import random
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import IO

import torch
import yaml
from torch import nn

from nmt_ls import checkpoint
from nmt_ls.batching import Batch, batch_by_tokens
from nmt_ls.binarize import EncodedPairs, MmapPairs, binarize_recipe, spm_sha256
from nmt_ls.config import RunConfig, to_dict, with_size
from nmt_ls.criterions import CRITERIONS, build_criterion, import_user_module
from nmt_ls.criterions.label_smoothed import IMPLEMENTATIONS
from nmt_ls.data import Corpus, open_corpus, read_split
from nmt_ls.distributed import World, init_world
from nmt_ls.hardware import AMP, choose_amp, cpu_capability, cpu_model, matmul_gflops, native_bf16, usable_cores
from nmt_ls.metrics import MetricsWriter
from nmt_ls.model import build_model
from nmt_ls.optim import COOLDOWN_SHAPES, STABLE_PHASES, WsdShape, build_optimizer, build_scheduler
from nmt_ls.sizing import choose_size, update_seconds
from nmt_ls.tokenizer import MODEL_TYPES, Tokenizer, train_spm

log = logging.getLogger(__name__)

BEST_METRICS = ("bleu", "ppl")
LOCK_FILE = ".lock"  # in out_dir: held by a run for its life (lock_out_dir)
# The range of each count, length and rate that check_config checks: key -> (least, most).
RANGES = {
    **dict.fromkeys(
        ("data.max_len", "tokenizer.vocab_size", "train.update_freq", "train.max_tokens", "train.log_every_updates")
        + ("train.max_bad_updates", "train.plan_window_updates", "eval.beam_size", "eval.max_tokens"),
        (1, math.inf),
    ),
    **dict.fromkeys(
        ("data.valid_bleu_sentences", "train.warmup_steps", "train.max_updates", "train.max_minutes")
        + ("train.validate_every_updates", "train.save_every_updates", "train.patience", "train.clip_norm")
        + ("train.weight_decay",),
        (0, math.inf),
    ),
    **dict.fromkeys(
        ("model.dropout", "model.attn_dropout", "train.cooldown_fraction", "train.max_warmup_fraction"), (0, 1)
    ),
}


@dataclass(frozen=True)
class ValidSet:
    """The valid split as validation uses it: loss batches, and BLEU's sources and references."""

    batches: list[Batch]
    bleu_src: list[str]
    bleu_ref: list[str]
    counts: dict  # the binarized split's counts: pairs read, dropped empty, dropped over the positions


@dataclass(frozen=True)
class Built:
    """Everything a run builds once; the loop advances only its training and plan states."""

    cfg: RunConfig  # resolved: train.amp and train.num_threads as chosen on this machine
    world: World
    tok: Tokenizer
    model: nn.Module
    net: nn.Module  # what trains forward: the model, in DistributedDataParallel with several workers
    criterion: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    train_data: MmapPairs  # every worker maps the same binarized files
    valid: ValidSet
    test_pairs: list = dataclasses.field(default_factory=list)  # `nmt-ls run`: decoded after training (main worker)
    writer: MetricsWriter | None = None  # main worker only
    lock: IO | None = None  # out_dir/.lock, held by the main worker until release()

    @property
    def out_dir(self) -> Path:
        return Path(self.cfg.out_dir)

    def release(self) -> None:
        """Let another run use ``out_dir`` (the end of this one)."""
        if self.lock is not None:
            self.lock.close()

    def autocast(self, amp: str | None = None):
        """The training forward's precision context (``train.amp``, or ``amp``)."""
        enabled = (amp or self.cfg.train.amp) == "bf16"
        return torch.autocast(self.world.device.type, dtype=torch.bfloat16, enabled=enabled)


# ---- checks -----------------------------------------------------------------------------------


def check_config(cfg: RunConfig) -> None:
    """Every option that can be checked before any data work, for each size that ``size: auto``
    may choose (the error names the size); errors name the recipe key."""
    if not cfg.sizes or cfg.size != "auto":
        check_options(cfg)
        return
    for name in cfg.sizes:
        try:
            check_options(with_size(cfg, name))
        except ValueError as e:
            raise ValueError(f"sizes.{name}: {e}") from None


def check_options(cfg: RunConfig) -> None:
    """Every option of a recipe that trains as it is (its size resolved), on nothing."""
    t = cfg.train
    if t.lr_scheduler == "wsd" and t.max_updates <= 0 and t.max_minutes <= 0:
        raise ValueError("train.lr_scheduler=wsd needs train.max_updates, or train.max_minutes to plan them from")
    choices = (
        ("criterion.implementation", cfg.criterion.implementation, IMPLEMENTATIONS),
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
        if not math.isfinite(value):  # a bound of inf is no bound, not a value (0 is "none" where allowed)
            raise ValueError(f"{key} must be a finite number, got {value}")
        if not least <= value <= most:
            bounds = f">= {least}" if most == math.inf else f"in [{least}, {most}]"
            raise ValueError(f"{key} must be {bounds}, got {value}")
    if t.num_threads != "auto" and not (isinstance(t.num_threads, int) and t.num_threads >= 0):
        raise ValueError(f"train.num_threads must be auto or a number of threads >= 1, got {t.num_threads!r}")
    if t.dist_timeout_minutes <= 0:
        raise ValueError(f"train.dist_timeout_minutes must be > 0, got {t.dist_timeout_minutes}")
    check_builders(cfg)


def check_builders(cfg: RunConfig) -> None:
    """What the schedule, the model and the criterion check themselves, on nothing: a one-number
    optimizer, a model on the meta device, the criterion's arguments."""
    build_schedule(cfg, torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=cfg.train.lr))
    with torch.device("meta"):
        build_model(cfg.tokenizer.vocab_size, 0, **dataclasses.asdict(cfg.model))
    c = cfg.criterion
    if c.user_module:
        import_user_module(c.user_module)
    if c.name not in CRITERIONS:
        raise ValueError(f"criterion.name: unknown criterion {c.name!r}; registered: {sorted(CRITERIONS)}")
    build_criterion(**criterion_kwargs(cfg, pad_id=0))  # checks label_smoothing and smoothing


def build_schedule(cfg: RunConfig, optimizer: torch.optim.Optimizer) -> torch.optim.lr_scheduler.LRScheduler:
    t = cfg.train
    shape = WsdShape(t.cooldown_fraction, t.stable_phase, t.cooldown_shape)
    return build_scheduler(optimizer, t.warmup_steps, t.lr_scheduler, t.max_updates, t.end_lr, shape)


def criterion_kwargs(cfg: RunConfig, pad_id: int) -> dict:
    """``build_criterion``'s arguments: the recipe's criterion section, whose fields are the
    criterion's parameters, and the tokenizer's pad id."""
    kwargs = dataclasses.asdict(cfg.criterion)
    del kwargs["user_module"]  # imported by check_builders, not a parameter
    return dict(kwargs, pad_id=pad_id)


# ---- tokenizer and data -----------------------------------------------------------------------


def tokenizer_spec(cfg: RunConfig, corpus: Corpus) -> dict:
    """What ``spm.model`` is trained from: the tokenizer options, the data settings and the train
    split's files (path, size, mtime), the identity that its binarized cache is keyed on."""
    data = {k: v for k, v in to_dict(cfg.data).items() if k != "valid_bleu_sentences"}
    train_files = corpus.files(corpus.train_split)
    return {"tokenizer": to_dict(cfg.tokenizer), "data": data, "train_files": train_files}


def load_tokenizer(cfg: RunConfig, world: World, ckpt: dict | None, corpus: Corpus) -> Tokenizer:
    """The run's sentencepiece model: the checkpoint's when resuming; else ``spm.model`` in
    ``out_dir`` if ``spm.json`` says it was trained from the same options and train files, else
    trained anew on the train split (read only then). ``spm.json`` always describes the
    ``spm.model`` beside it (it records the model's sha256), or is absent."""
    path, spec_path = Path(cfg.out_dir) / "spm.model", Path(cfg.out_dir) / "spm.json"
    if world.is_main and ckpt is not None:  # its tokenizer is the recipe's (check_resume)
        checkpoint.tensor_to_spm(ckpt["spm"], path)
        if spec_path.exists() and recorded_spec(path, spec_path) is None:
            spec_path.unlink()  # it described another model; what trained this one is unknown
    elif world.is_main:
        spec, old = tokenizer_spec(cfg, corpus), recorded_spec(path, spec_path)
        if old != spec:
            if path.exists() and old is None:
                log.info("retraining %s: %s does not record what it was trained from", path, spec_path.name)
            elif path.exists():
                changed = ", ".join(k for k in spec if old.get(k) != spec[k])
                log.info("retraining %s: its %s changed since it was trained", path, changed)
            train_pairs = read_split(corpus, "train")
            t = cfg.tokenizer
            train_spm(
                [s for s, _ in train_pairs] + [t_ for _, t_ in train_pairs],
                path.with_suffix(""),
                t.vocab_size,
                model_type=t.model_type,
            )
            spec_path.write_text(json.dumps({**spec, "spm_sha256": spm_sha256(path)}), encoding="utf-8")
    world.wait_for_main()
    return Tokenizer(path)


def recorded_spec(path: Path, spec_path: Path) -> dict | None:
    """What ``spec_path`` (``spm.json``) says the model at ``path`` was trained from, if it
    describes that model (its recorded sha256 is the model's); else None."""
    if not (path.exists() and spec_path.exists()):
        return None
    spec = json.loads(spec_path.read_text(encoding="utf-8"))
    return spec if spec.pop("spm_sha256", None) == spm_sha256(path) else None


def open_data(cfg: RunConfig, tok: Tokenizer, world: World, corpus: Corpus) -> dict[str, MmapPairs]:
    """The train and valid splits, binarized once (by the main worker, when the cache is
    missing or stale) and memory-mapped by every worker: nothing is broadcast."""
    if world.is_main:
        binarize_recipe(cfg, corpus, tok.model_path)
    world.wait_for_main()
    return binarize_recipe(cfg, corpus, tok.model_path, build=False)


def valid_set(cfg: RunConfig, tok: Tokenizer, valid: MmapPairs) -> ValidSet:
    """Valid batches for the loss, and source and reference strings for greedy BLEU.

    Both come from the binarized valid split, so the loss and BLEU cover the same pairs (BLEU
    the first ``data.valid_bleu_sentences`` of them): those with two non-empty sides that fit
    ``model.max_positions``. The strings are decoded from the same ids, which gives the text
    back exactly (the tokenizer round-trips stripped text)."""
    batches = loss_batches(valid, tok, cfg.train.max_tokens)
    n_bleu = min(cfg.data.valid_bleu_sentences or len(valid), len(valid))
    src_ids, tgt_ids = valid.get(range(n_bleu))
    return ValidSet(batches, tok.decode_batch(src_ids), tok.decode_batch(tgt_ids), valid.meta["counts"])


def loss_batches(pairs: MmapPairs | EncodedPairs, tok: Tokenizer, max_tokens: int) -> list[Batch]:
    """Encoded ``pairs`` in batches of ``max_tokens`` padded positions for a loss pass, as
    validation batches them: sorted by size, unshuffled, each with ``[bos] + y`` in and ``y + [eos]``
    out."""
    idx = batch_by_tokens(pairs.src_lens, pairs.tgt_lens, max_tokens, shuffle=False)
    return [pairs.batch(i, tok.pad_id, tok.bos_id, tok.eos_id) for i in idx]


def to_sample(batch: Batch, device: torch.device) -> dict:
    """``batch`` on ``device`` as the criterion takes it (fairseq's sample layout)."""
    batch = batch.to(device)
    return {
        "net_input": {"src": batch.src, "tgt_in": batch.tgt_in},  # (B, S), (B, T)
        "target": batch.tgt_out,  # (B, T)
        "ntokens": batch.ntokens,
        "nsentences": len(batch),
    }


# ---- machine ----------------------------------------------------------------------------------


def num_threads(setting: int | str) -> int:
    """``train.num_threads``: ``auto`` (or 0) is the cores this process may use, shared among
    the workers that torchrun starts on this machine."""
    if setting in ("auto", 0):
        return max(1, usable_cores() // int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    return int(setting)


def probe_batches(built: Built, count: int = 2) -> list[Batch]:
    """The first ``count`` batches of this worker's first epoch."""
    t, tok, data = built.cfg.train, built.tok, built.train_data
    order = built.world.shard(batch_by_tokens(data.src_lens, data.tgt_lens, t.max_tokens, seed=t.seed, shuffle=True))
    return [data.batch(idx, tok.pad_id, tok.bos_id, tok.eos_id) for idx in order[:count]]


def tokens_per_second(built: Built, batches: list[Batch], amp: str) -> float:
    """Target tokens per second of forward and backward over ``batches`` in precision ``amp``
    (after one untimed pass), leaving the model, its gradients and the RNG as they were."""
    device = built.world.device
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        for _ in range(2):  # a warm-up pass, then the timed one
            start, tokens = time.perf_counter(), 0
            for batch in batches:
                with built.autocast(amp):
                    loss, _, logging_output = built.criterion(built.net, to_sample(batch, device))
                loss.backward()
                tokens += logging_output["ntokens"]
            if device.type == "cuda":
                torch.cuda.synchronize()
    built.model.zero_grad(set_to_none=True)
    return tokens / (time.perf_counter() - start)


def choose_precision(built: Built, ckpt: dict | None) -> Built:
    """``built`` with ``train.amp`` resolved (``auto``: the checkpoint's choice when resuming,
    else measured on this machine); the machine and the choice logged with its reason."""
    t, world = built.cfg.train, built.world
    if t.amp == "auto" and ckpt is not None and ckpt["config"]["train"].get("amp") in ("none", "bf16"):
        amp = ckpt["config"]["train"]["amp"]
        choice = (amp, f"{amp}, as the checkpoint was trained")
    else:
        batches = functools.cache(lambda: probe_batches(built))  # built once, for both precisions
        c = choose_amp(t.amp, world.device, lambda amp: tokens_per_second(built, batches(), amp))
        choice = (c.amp, c.reason)
    amp, reason = world.broadcast(choice)
    cfg = dataclasses.replace(built.cfg, train=dataclasses.replace(t, amp=amp))
    if world.is_main and world.device.type == "cpu":
        log.info(
            "machine: %s, %s, %s bf16, %d thread(s): fp32 matmul %.0f GFLOP/s",
            cpu_model(),
            cpu_capability(),
            "native" if native_bf16(world.device) else "no native",
            t.num_threads,
            matmul_gflops(),
        )
    if world.is_main:
        log.info("amp %s: %s", t.amp, reason)
    return dataclasses.replace(built, cfg=cfg)


# ---- set-up -----------------------------------------------------------------------------------


def setup(
    cfg: RunConfig,
    ckpt: dict | None,
    test_split: bool = False,
    clock: Callable[[], float] = time.time,
    started: float | None = None,
) -> Built:
    """Process group, ``out_dir``'s lock, corpus (resolved once), the model size
    (:func:`nmt_ls.sizing.choose_size`, timed on ``clock`` in the budget that counts from
    ``started``, default now), tokenizer, data, model, criterion, optimizer and schedule
    (``ckpt``: the checkpoint to resume from, whose states :func:`nmt_ls.resume.restore` loads
    next); with ``test_split`` the test pairs too, read once by the main worker. The caller calls
    :meth:`Built.release` when the run ends."""
    started = clock() if started is None else started
    t = cfg.train
    threads = num_threads(t.num_threads)
    torch.set_num_threads(threads)
    cfg = dataclasses.replace(cfg, train=dataclasses.replace(t, num_threads=threads))
    world = init_world(t.device, t.dist_timeout_minutes)
    out_dir = Path(cfg.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    with contextlib.ExitStack() as on_error:
        lock = lock_out_dir(out_dir, world)
        if lock is not None:
            on_error.callback(lock.close)
        random.seed(t.seed)
        torch.manual_seed(t.seed)
        corpus = open_corpus(cfg.data, prepare=world.is_main)  # prepared by the main worker alone
        time_size = functools.partial(update_seconds, device=world.device, clock=clock)
        cfg = choose_size(cfg, world, ckpt is not None, lambda: clock() - started, time_size)
        t = cfg.train  # the size may set train keys (max_tokens, lr)
        tok = load_tokenizer(cfg, world, ckpt, corpus)
        data = open_data(cfg, tok, world, corpus)
        valid = valid_set(cfg, tok, data["valid"])
        model = build_model(tok.vocab_size, tok.pad_id, **dataclasses.asdict(cfg.model)).to(world.device)
        optimizer = build_optimizer(model, t.lr, t.betas, t.adam_eps, t.weight_decay)
        built = Built(
            cfg,
            world,
            tok,
            model,
            world.wrap(model),
            build_criterion(**criterion_kwargs(cfg, tok.pad_id)),
            optimizer,
            build_schedule(cfg, optimizer),
            data["train"],
            valid,
            read_split(corpus, "test") if test_split and world.is_main else [],
            MetricsWriter(out_dir / "train_log.jsonl", out_dir / "tensorboard") if world.is_main else None,
            lock,
        )
        world.wait_for_main()  # the main worker alone read the test split and opened the log's writers
        on_error.pop_all()  # set up: the lock is the run's now
    return built


def lock_out_dir(out_dir: Path, world: World) -> IO | None:
    """The main worker's exclusive ``flock`` on ``out_dir/.lock`` (its file, holding this
    process's host and pid), or None on the other workers. The OS releases it when the process
    ends, however it ends, so no lock outlives its run. A second run in the same ``out_dir`` is
    refused on every worker with one line naming the process that holds it."""
    refusal, path, lock = None, out_dir / LOCK_FILE, None
    if world.is_main:
        lock = path.open("a+", encoding="utf-8")  # not truncated: the holder's pid stays readable
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            lock.seek(0)
            holder = lock.read().strip() or "unknown"
            lock.close()
            refusal = (
                f"out_dir={str(out_dir)!r} is in use by another run ({holder} holds {path}); "
                "wait for it to end or choose another out_dir"
            )
        else:
            lock.truncate(0)
            lock.write(f"host {socket.gethostname()} pid {os.getpid()}\n")
            lock.flush()
    refusal = world.broadcast(refusal)
    if refusal is not None:
        raise ValueError(refusal)
    return lock


def describe(built: Built) -> None:
    """Write the resolved ``config.yaml`` and log the model, data and workers (main worker)."""
    if not built.world.is_main:
        return
    config = yaml.safe_dump(to_dict(built.cfg), sort_keys=False)
    (built.out_dir / "config.yaml").write_text(config, encoding="utf-8")
    n_params = sum(q.numel() for q in built.model.parameters()) / 1e6
    train, world, valid = built.train_data, built.world, built.valid
    n_valid = sum(len(b) for b in valid.batches)
    log.info(
        "model: %.2fM parameters; %d train pairs, %d valid; %d worker(s) on %s",
        n_params,
        len(train),
        n_valid,
        world.world_size,
        world.device,
    )
    counts = valid.counts
    log.info(
        "valid loss and BLEU on the same pairs: %d of the %d read (dropped: %d with an empty side, %d over "
        "model.max_positions); BLEU on the first %d",
        n_valid,
        counts["n_read"],
        counts["n_empty"],
        counts["n_over_positions"],
        len(valid.bleu_src),
    )
