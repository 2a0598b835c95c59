"""The model size a run trains, from the recipe's ladder (``sizes:``, largest first).

With ``size: auto`` and a time budget (``train.max_minutes``, no pinned ``train.max_updates``)
the main worker times a few training updates of each size on synthetic batches, estimates the
updates that the budget holds for each, and takes the first size whose estimate reaches its
``min_updates`` (the last size if none does); every worker takes its choice. Without a budget
the first size trains; a pinned ``size: NAME`` (or a resumed checkpoint's size) trains as it is,
nothing timed. The estimate is rough: the planner re-plans from the run's own update rate.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable
from dataclasses import dataclass

import torch

from nmt_ls.batching import Batch
from nmt_ls.config import RunConfig, with_size
from nmt_ls.criterions import build_criterion
from nmt_ls.distributed import World
from nmt_ls.hardware import native_bf16
from nmt_ls.model import build_model
from nmt_ls.optim import build_optimizer
from nmt_ls.planner import PLAN_TARGET

log = logging.getLogger(__name__)

SENTENCE_TOKENS = 24  # source and target length of a synthetic sentence (a batch holds max_tokens // 24)
TIMED_UPDATES = 2  # timed after one untimed warm-up update (allocations, kernel choice)


@dataclass(frozen=True)
class SizeEstimate:
    """What the budget is estimated to hold for one size."""

    name: str
    update_s: float  # seconds per update, timed on synthetic batches
    updates: int  # updates estimated to fit the budget
    min_updates: int  # the size's min_updates

    @property
    def fits(self) -> bool:
        return self.updates >= self.min_updates


def synthetic_batch(vocab_size: int, max_tokens: int) -> Batch:
    """``max_tokens // SENTENCE_TOKENS`` sentence pairs of random ids (no pad; a fixed generator,
    so the global RNG is untouched), as the loop's batches are shaped."""
    n = max(1, max_tokens // SENTENCE_TOKENS)
    gen = torch.Generator().manual_seed(0)
    src, tgt = (torch.randint(1, vocab_size, (n, SENTENCE_TOKENS), generator=gen) for _ in range(2))  # (B, T)
    lengths = torch.full((n,), SENTENCE_TOKENS)
    return Batch(src, tgt, tgt.roll(-1, dims=1), n * SENTENCE_TOKENS, lengths)


def run_amp(cfg: RunConfig, device: torch.device) -> str:
    """The precision the run trains in as far as it is known before its probe: ``train.amp``
    when pinned, bf16 on a CUDA device that supports it, else float32 (``auto`` on a CPU with
    native bf16 is decided later by probing the run's own batches)."""
    if cfg.train.amp != "auto":
        return cfg.train.amp
    return "bf16" if device.type == "cuda" and native_bf16(device) else "none"


def update_seconds(cfg: RunConfig, device: torch.device, clock: Callable[[], float]) -> float:
    """Seconds per training update (forward, backward, optimizer step) of ``cfg``'s model,
    criterion and optimizer on a synthetic batch of ``train.max_tokens`` in the run's precision
    (:func:`run_amp`) on this process's threads: the mean of ``TIMED_UPDATES`` after an untimed
    one, timed on ``clock``. The RNG states are left as they were."""
    from nmt_ls.build import criterion_kwargs, to_sample  # build calls choose_size

    t, amp = cfg.train, run_amp(cfg, device)
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        model = build_model(cfg.tokenizer.vocab_size, 0, **dataclasses.asdict(cfg.model)).to(device)
        criterion = build_criterion(**criterion_kwargs(cfg, pad_id=0))
        optimizer = build_optimizer(model, t.lr, t.betas, t.adam_eps, t.weight_decay)
        sample = to_sample(synthetic_batch(cfg.tokenizer.vocab_size, t.max_tokens), device)
        for i in range(1 + TIMED_UPDATES):
            if i == 1:  # after the warm-up
                synchronize(device)
                start = clock()
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp == "bf16"):
                loss = criterion(model, sample)[0]
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        synchronize(device)
        return (clock() - start) / TIMED_UPDATES


def synchronize(device: torch.device) -> None:
    """Wait for the work queued on a CUDA ``device`` (a CPU's is done already)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def estimate_sizes(cfg: RunConfig, spent_s: Callable[[], float], time_size: Callable) -> list[SizeEstimate]:
    """Each size's estimate: ``time_size(cfg as that size)`` seconds per update, into what the
    budget leaves after ``spent_s()`` (the run so far, the timing included), as a plan aims at
    ``PLAN_TARGET`` of it; each logged."""
    update_s = {name: time_size(with_size(cfg, name)) for name in cfg.sizes}
    left_s = PLAN_TARGET * 60 * cfg.train.max_minutes - spent_s()
    estimates = []
    for name, size in cfg.sizes.items():
        updates = max(0, int(left_s / max(update_s[name], 1e-9)))
        estimates.append(SizeEstimate(name, update_s[name], updates, size.min_updates))
        log.info(
            "size %s: %.3f s per update (synthetic batches of train.max_tokens=%d), about %d updates in "
            "train.max_minutes=%g; min_updates %d",
            name,
            update_s[name],
            with_size(cfg, name).train.max_tokens,
            updates,
            cfg.train.max_minutes,
            size.min_updates,
        )
    return estimates


def pick_size(cfg: RunConfig, spent_s: Callable[[], float], time_size: Callable) -> tuple[str, str]:
    """(the size ``auto`` chooses, why): see the module's docstring. ``time_size(cfg)`` gives a
    size's seconds per update (:func:`update_seconds`; tests pass their own)."""
    t, first = cfg.train, next(iter(cfg.sizes))
    if t.max_updates > 0 or t.max_minutes <= 0:
        pinned = f"train.max_updates={t.max_updates} pinned" if t.max_updates > 0 else "train.max_minutes=0"
        return first, f"the first size, as there is no time budget to size by ({pinned})"
    estimates = estimate_sizes(cfg, spent_s, time_size)
    chosen = next((e for e in estimates if e.fits), estimates[-1])
    missed = [f"{e.name} about {e.updates} < {e.min_updates}" for e in estimates[: estimates.index(chosen) + 1]]
    if not chosen.fits:
        return chosen.name, f"the last size, as none reaches its min_updates ({', '.join(missed)})"
    reason = f"about {chosen.updates} updates in train.max_minutes={t.max_minutes:g} reach its min_updates"
    return chosen.name, f"{reason} {chosen.min_updates}" + (f" ({', '.join(missed[:-1])})" if missed[:-1] else "")


def choose_size(cfg: RunConfig, world: World, resumed: bool, spent_s: Callable[[], float], time_size: Callable):
    """``cfg`` as the size it trains (unchanged without ``sizes``): ``size: auto`` chosen by the
    main worker (:func:`pick_size`) and taken by every worker; a pinned size (or, ``resumed``,
    the checkpoint's, which :func:`nmt_ls.resume.load_last` pinned) as it is. The choice and
    its reason are logged, and the resolved config records it (``size``)."""
    if not cfg.sizes:
        return cfg
    if cfg.size != "auto":
        name, reason = cfg.size, "the checkpoint's size (--resume)" if resumed else f"pinned by size={cfg.size}"
    elif world.is_main:
        name, reason = pick_size(cfg, spent_s, time_size)
    else:
        name, reason = None, ""
    world.wait_for_main()  # the others wait while the main worker times the sizes
    name = world.broadcast(name)
    if world.is_main:
        log.info("size %s chosen: %s; pin it with size=%s", name, reason, name)
    return with_size(cfg, name)
