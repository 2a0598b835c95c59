"""The training loop, written out: data -> tokenizer -> batches -> model -> criterion -> Adam.

One process trains on CPU or one GPU; under ``torchrun`` each worker trains on its shard of
the batches with DistributedDataParallel (gloo on CPU, nccl on GPU). The loss of an update
is the smoothed loss summed over the update's target tokens on *all* workers, divided by
their global count, so K workers take the same step as one worker on the same batches.

Files in ``cfg.out_dir``: ``config.yaml``, ``spm.model``, ``train_log.jsonl`` (one JSON
object per logged update and per validation), ``checkpoint_last.pt``, ``checkpoint_best.pt``.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import random
import tempfile
import time
from contextlib import nullcontext
from pathlib import Path

import torch
import torch.distributed as dist
import yaml
from torch import nn
from tqdm import tqdm

from nmt_ls import checkpoint
from nmt_ls.batching import Batch, batch_by_tokens, collate, shard
from nmt_ls.binarize import recipe_source
from nmt_ls.config import RunConfig, to_dict
from nmt_ls.criterions import build_criterion, import_user_module, reduce_metrics
from nmt_ls.data import read_pairs
from nmt_ls.evaluate import corpus_bleu, translate, validation_loss
from nmt_ls.model import build_model
from nmt_ls.optim import build_optimizer, build_scheduler, check_schedule
from nmt_ls.tokenizer import Tokenizer, train_spm

log = logging.getLogger(__name__)


# ---- set-up ---------------------------------------------------------------------------------

def resolve_device(name: str) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("train.device=cuda but torch sees no CUDA device")
    if name == "cuda" and "LOCAL_RANK" in os.environ:
        return torch.device("cuda", int(os.environ["LOCAL_RANK"]))
    return torch.device(name)


def init_distributed(device: torch.device) -> tuple[int, int]:
    """Join the torchrun process group if there is one; returns (rank, world_size)."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return 0, 1
    if not dist.is_initialized():
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return dist.get_rank(), dist.get_world_size()


def barrier(world_size: int) -> None:
    if world_size > 1:
        dist.barrier()


def all_reduce_sum(values: list[float], world_size: int, device: torch.device) -> list[float]:
    """Sum a few numbers across workers (float64, so token counts stay exact)."""
    if world_size == 1:
        return values
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.tolist()


def load_splits(cfg) -> dict[str, list[tuple[str, str]]]:
    """Read train/valid/test pairs as the recipe's data section says (preparing the
    LibreOffice help corpus first when ``corpus: lohelp_en_de``)."""
    d = cfg.data
    source = recipe_source(d)
    splits = {}
    for name, split in (("train", d.train_split), ("valid", d.valid_split), ("test", d.test_split)):
        filt = dict(max_len=d.max_len, max_ratio=d.max_ratio) if name == "train" else {}
        src, tgt = read_pairs(source, d.src_lang, d.tgt_lang, split=split, config=d.hub_config, **filt)
        splits[name] = list(zip(src, tgt))
    return splits


def get_tokenizer(cfg: RunConfig, train_pairs, rank: int, world_size: int) -> Tokenizer:
    """The run's sentencepiece model: trained on the train split once, then reused."""
    path = Path(cfg.out_dir) / "spm.model"
    if rank == 0 and not path.exists():
        t = cfg.tokenizer
        train_spm([s for s, _ in train_pairs] + [t_ for _, t_ in train_pairs], path.with_suffix(""),
                  t.vocab_size, model_type=t.model_type)
    barrier(world_size)
    return Tokenizer(path)


def encode_pairs(tok: Tokenizer, pairs, max_positions: int) -> tuple[list[list[int]], list[list[int]]]:
    """Subword ids with eos appended on the source (and added by ``collate`` on the target);
    pairs longer than the model's positions are dropped."""
    src = tok.encode_batch([s for s, _ in pairs])
    tgt = tok.encode_batch([t for _, t in pairs])
    keep = [i for i in range(len(pairs)) if len(src[i]) + 1 <= max_positions and len(tgt[i]) + 1 <= max_positions]
    if len(keep) < len(pairs):
        log.info("dropped %d pairs longer than max_positions=%d", len(pairs) - len(keep), max_positions)
    return [src[i] + [tok.eos_id] for i in keep], [tgt[i] for i in keep]


def make_batches(tok: Tokenizer, src, tgt, max_tokens: int, seed: int, epoch: int, shuffle: bool) -> list[list[int]]:
    return batch_by_tokens([len(s) for s in src], [len(t) for t in tgt], max_tokens, seed=seed, epoch=epoch, shuffle=shuffle)


def to_batch(tok: Tokenizer, src, tgt, idx: list[int]) -> Batch:
    return collate([src[i] for i in idx], [tgt[i] for i in idx], idx, tok.pad_id, tok.bos_id, tok.eos_id)


# ---- logging ----------------------------------------------------------------------------------

def append_jsonl(path: Path, record: dict) -> None:
    with path.open("a", encoding="utf-8") as f:
        f.write(json.dumps(record) + "\n")


def truncate_log(path: Path, update: int) -> None:
    """On resume: keep only log records up to the checkpoint's update (rewritten atomically)."""
    if not path.exists():
        return
    kept = [line for line in path.read_text(encoding="utf-8").splitlines() if line and json.loads(line)["update"] <= update]
    tmp = path.with_suffix(".tmp")
    tmp.write_text("".join(line + "\n" for line in kept), encoding="utf-8")
    os.replace(tmp, path)


def tensorboard_writer(out_dir: Path):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:  # tensorboard is optional
        return None
    return SummaryWriter(str(out_dir / "tensorboard"))


# ---- checkpoints ------------------------------------------------------------------------------

def save_checkpoint(path: Path, cfg, model, optimizer, scheduler, state: dict, spm_path: Path) -> None:
    checkpoint.atomic_save(
        {
            "format": checkpoint.FORMAT,
            "model": model.state_dict(),
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "config": to_dict(cfg),
            "spm": checkpoint.spm_to_tensor(spm_path),
            "rng": {"torch": torch.get_rng_state(), "python": random.getstate(),
                    "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []},
            **state,
        },
        path,
    )


def restore_rng(rng: dict) -> None:
    torch.set_rng_state(rng["torch"])
    random.setstate(rng["python"])
    if rng.get("cuda") and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(rng["cuda"])


# ---- the loop ---------------------------------------------------------------------------------

class DecoderFeatures(nn.Module):
    """``model`` without its output layer: (src, tgt_in) -> features (B, T, D)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, src, tgt_in):
        return self.model.decoder_features(src, tgt_in)


def train(cfg: RunConfig, resume: bool = False) -> dict:
    """Train as ``cfg`` says; returns a summary (updates, best metric, paths, minutes).

    With ``resume``, continue from ``out_dir/checkpoint_last.pt`` exactly where it stopped:
    same data position, RNG states, optimizer and schedule, so the loss curve continues as
    if the run had never stopped.
    """
    t = cfg.train
    check_schedule(t.lr_scheduler, t.max_updates, t.lr, t.end_lr)  # before any data work
    if t.num_threads > 0:
        torch.set_num_threads(t.num_threads)
    device = resolve_device(t.device)
    rank, world_size = init_distributed(device)
    is_main = rank == 0
    out_dir = Path(cfg.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    log_path, last_path, best_path = out_dir / "train_log.jsonl", out_dir / "checkpoint_last.pt", out_dir / "checkpoint_best.pt"
    if is_main:
        (out_dir / "config.yaml").write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False), encoding="utf-8")
    random.seed(t.seed)
    torch.manual_seed(t.seed)

    splits = load_splits(cfg) if is_main or world_size == 1 else None
    if world_size > 1:  # rank 0 prepares/reads once; the others receive the pairs
        box = [splits]
        dist.broadcast_object_list(box, src=0)
        splits = box[0]
    tok = get_tokenizer(cfg, splits["train"], rank, world_size)
    train_src, train_tgt = encode_pairs(tok, splits["train"], cfg.model.max_positions)
    valid_src, valid_tgt = encode_pairs(tok, splits["valid"], cfg.model.max_positions)
    if not train_src:
        raise ValueError(f"no training pairs left in {cfg.data.dir} after filtering")
    valid_batches = [to_batch(tok, valid_src, valid_tgt, idx) for idx in make_batches(tok, valid_src, valid_tgt, t.max_tokens, 0, 0, False)]
    n_bleu = cfg.data.valid_bleu_sentences or len(splits["valid"])
    bleu_src = [s for s, _ in splits["valid"][:n_bleu]]
    bleu_ref = [r for _, r in splits["valid"][:n_bleu]]

    model = build_model(tok.vocab_size, tok.pad_id, **dataclasses.asdict(cfg.model)).to(device)
    c = cfg.criterion
    if c.user_module:
        import_user_module(c.user_module)
    if c.path not in ("reference", "fused", "chunked"):
        raise ValueError(f"criterion.path must be reference, fused or chunked, got {c.path!r}")
    criterion = build_criterion(c.name, padding_idx=tok.pad_id, label_smoothing=c.label_smoothing, smoothing=c.smoothing,
                                fused=c.path == "fused")
    optimizer = build_optimizer(model, t.lr, t.betas, t.adam_eps, t.weight_decay)
    scheduler = build_scheduler(optimizer, t.warmup_steps, t.lr_scheduler, t.max_updates, t.end_lr)
    state = {"update": 0, "epoch": 0, "batch_index": 0, "best": None, "bad_validations": 0, "elapsed": 0.0}
    if resume and last_path.exists():
        ckpt = checkpoint.load(last_path, map_location=device)
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        scheduler.load_state_dict(ckpt["scheduler"])
        state = {k: ckpt[k] for k in state}
        restore_rng(ckpt["rng"])
        if is_main:
            truncate_log(log_path, state["update"])
            log.info("resumed from %s at update %d (epoch %d, batch %d)", last_path, state["update"], state["epoch"], state["batch_index"])
    elif is_main and log_path.exists():
        log_path.unlink()
    # The chunked path takes decoder features, not logits; DDP must wrap what runs forward.
    forward_model = DecoderFeatures(model) if c.path == "chunked" else model
    ddp_model = nn.parallel.DistributedDataParallel(forward_model) if world_size > 1 else forward_model
    writer = tensorboard_writer(out_dir) if is_main else None
    n_params = sum(p.numel() for p in model.parameters())
    if is_main:
        log.info("model: %.2fM parameters; %d train pairs, %d valid; %d worker(s) on %s", n_params / 1e6, len(train_src), len(valid_src), world_size, device)

    if t.amp not in ("none", "bf16"):
        raise ValueError(f"train.amp must be 'none' or 'bf16', got {t.amp!r}")
    autocast = lambda: torch.autocast(device.type, dtype=torch.bfloat16, enabled=t.amp == "bf16")  # noqa: E731

    def run_update(group: list[Batch]) -> dict | None:
        """Forward/backward over the update's batches, then one optimizer step."""
        local_ntokens = sum(b.ntokens for b in group)
        global_ntokens = all_reduce_sum([float(local_ntokens)], world_size, device)[0]
        # DDP averages gradients over workers, hence the world_size factor.
        scale = world_size / max(global_ntokens, 1.0)
        loss_sum = nll_sum = 0.0
        for i, batch in enumerate(group):
            sync = i == len(group) - 1 or world_size == 1
            with ddp_model.no_sync() if not sync else nullcontext():
                src, tgt_in, tgt_out = batch.src.to(device), batch.tgt_in.to(device), batch.tgt_out.to(device)
                with autocast():
                    outputs = ddp_model(src, tgt_in)  # logits (B, T, V), or features (B, T, D)
                if c.path == "chunked":
                    out = criterion.compute_from_features(outputs, model.output_weight, tgt_out)
                else:
                    out = criterion.compute(outputs, tgt_out)
                loss = criterion.training_loss(out)
                (loss * scale).backward()
            loss_sum += float(loss.detach())
            nll_sum += float(out.nll.detach())
        loss_sum, nll_sum, ntokens, nsentences = all_reduce_sum(
            [loss_sum, nll_sum, float(local_ntokens), float(sum(b.src.size(0) for b in group))], world_size, device)
        if not math.isfinite(loss_sum):
            optimizer.zero_grad(set_to_none=True)
            return None
        gnorm = float(nn.utils.clip_grad_norm_(model.parameters(), t.clip_norm if t.clip_norm > 0 else math.inf))
        if not math.isfinite(gnorm):
            optimizer.zero_grad(set_to_none=True)
            return None
        lr = optimizer.param_groups[0]["lr"]
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        return {"loss": loss_sum, "nll_loss": nll_sum, "ntokens": ntokens, "nsentences": nsentences, "sample_size": ntokens,
                "gnorm": gnorm, "lr": lr}

    def validate() -> dict:
        metrics = validation_loss(model, criterion, valid_batches, device)
        hyps = translate(model, tok, bleu_src, beam_size=1, max_len_a=cfg.eval.max_len_a, max_len_b=cfg.eval.max_len_b,
                         max_tokens=cfg.eval.max_tokens, device=device)
        bleu, signature = corpus_bleu(hyps, bleu_ref)
        record = {"kind": "valid", "update": state["update"], "epoch": state["epoch"], "loss": metrics["loss"],
                  "nll_loss": metrics["nll_loss"], "ppl": metrics["ppl"], "bleu": bleu, "bleu_signature": signature,
                  "bleu_sentences": len(bleu_src), "elapsed": state["elapsed"]}
        log.info("valid | epoch %d | update %d | loss %.3f | nll_loss %.3f | ppl %.2f | BLEU %.2f  %s",
                 state["epoch"], state["update"], metrics["loss"], metrics["nll_loss"], metrics["ppl"], bleu, signature)
        if bleu_src:
            log.info("example | src: %s | hyp: %s | ref: %s", bleu_src[0], hyps[0], bleu_ref[0])
        return record

    def improved(record: dict) -> bool:
        value = record["bleu"] if t.best_metric == "bleu" else -record["ppl"]
        if state["best"] is None or value > state["best"]:
            state["best"] = value
            return True
        return False

    def validate_and_save() -> bool:
        """Validate (rank 0), save last/best, and say whether to stop early."""
        stop = False
        if is_main:
            record = validate()
            append_jsonl(log_path, record)
            if writer:
                for k in ("loss", "nll_loss", "ppl", "bleu"):
                    writer.add_scalar(f"valid/{k}", record[k], state["update"])
            if improved(record):
                state["bad_validations"] = 0
                save_checkpoint(best_path, cfg, model, optimizer, scheduler, state, out_dir / "spm.model")
            else:
                state["bad_validations"] += 1
            save_checkpoint(last_path, cfg, model, optimizer, scheduler, state, out_dir / "spm.model")
            stop = t.patience > 0 and state["bad_validations"] >= t.patience
            if stop:
                log.info("early stop: no improvement of %s in %d validations", t.best_metric, t.patience)
        return bool(all_reduce_sum([float(stop)], world_size, device)[0])

    start_time = time.time() - state["elapsed"]
    window: list[dict] = []
    window_start = time.time()
    bad_updates = 0
    validated_at = -1  # update of the last validation
    done = False
    model.train()
    while not done and state["epoch"] < t.max_epochs:
        epoch_batches = shard(make_batches(tok, train_src, train_tgt, t.max_tokens, t.seed, state["epoch"], True), rank, world_size)
        bar = tqdm(total=math.ceil(len(epoch_batches) / t.update_freq), initial=state["batch_index"] // t.update_freq,
                   desc=f"epoch {state['epoch'] + 1}", disable=not is_main, mininterval=2.0, unit="upd", dynamic_ncols=True)
        while not done and state["batch_index"] < len(epoch_batches):
            group_idx = epoch_batches[state["batch_index"] : state["batch_index"] + t.update_freq]
            result = run_update([to_batch(tok, train_src, train_tgt, idx) for idx in group_idx])
            state["batch_index"] += len(group_idx)
            bar.update(1)
            if result is None:
                bad_updates += 1
                log.warning("update %d: non-finite loss or gradient, batch skipped (%d in a row)", state["update"] + 1, bad_updates)
                if bad_updates >= t.max_bad_updates:
                    raise FloatingPointError(f"{bad_updates} consecutive non-finite updates at update {state['update'] + 1}; "
                                             "stopping (lower train.lr?)")
                continue
            bad_updates = 0
            state["update"] += 1
            state["elapsed"] = time.time() - start_time
            window.append(result)
            if is_main and (state["update"] % t.log_every_updates == 0 or state["batch_index"] >= len(epoch_batches)):
                m = reduce_metrics(window)
                secs = max(time.time() - window_start, 1e-9)
                record = {"kind": "train", "update": state["update"], "epoch": state["epoch"] + state["batch_index"] / len(epoch_batches),
                          "loss": m["loss"], "nll_loss": m["nll_loss"], "ppl": m["ppl"], "lr": result["lr"],
                          "gnorm": sum(w["gnorm"] for w in window) / len(window), "wps": m["ntokens"] / secs,
                          "wpb": m["ntokens"] / len(window), "bsz": m["nsentences"] / len(window), "elapsed": state["elapsed"]}
                append_jsonl(log_path, record)
                if writer:
                    for k in ("loss", "nll_loss", "ppl", "lr", "gnorm", "wps"):
                        writer.add_scalar(f"train/{k}", record[k], state["update"])
                bar.set_postfix(loss=f"{m['loss']:.3f}", ppl=f"{m['ppl']:.2f}", lr=f"{result['lr']:.1e}", tok_s=f"{record['wps']:.0f}")
                window, window_start = [], time.time()
            out_of_time = t.max_minutes > 0 and state["elapsed"] >= 60 * t.max_minutes
            if world_size > 1:  # workers' clocks differ: stop together
                out_of_time = bool(all_reduce_sum([float(out_of_time)], world_size, device)[0])
            done = out_of_time or (t.max_updates > 0 and state["update"] >= t.max_updates)
            if state["batch_index"] >= len(epoch_batches):
                state["epoch"] += 1
                state["batch_index"] = 0
                break  # the epoch-end validation below
            if t.validate_every_updates and state["update"] % t.validate_every_updates == 0:
                validated_at = state["update"]
                done = validate_and_save() or done
            elif t.save_every_updates and state["update"] % t.save_every_updates == 0 and is_main:
                save_checkpoint(last_path, cfg, model, optimizer, scheduler, state, out_dir / "spm.model")
        bar.close()
        if validated_at != state["update"]:
            validated_at = state["update"]
            done = validate_and_save() or done
    if writer:
        writer.close()
    summary = {"updates": state["update"], "epochs": state["epoch"], "best": state["best"], "best_metric": t.best_metric,
               "minutes": state["elapsed"] / 60, "log": str(log_path), "checkpoint_best": str(best_path),
               "checkpoint_last": str(last_path), "params": n_params}
    if is_main:
        log.info("training done: %d updates, %.1f minutes, best %s %s", state["update"], summary["minutes"], t.best_metric, state["best"])
    return summary


def load_for_inference(path: str | Path, device: torch.device | str = "cpu"):
    """(model, tokenizer, config dict) from a checkpoint alone: the sentencepiece model it
    carries is unpacked to a temporary folder (never a stale spm.model lying beside it)."""
    ckpt = checkpoint.load(path, map_location=device)
    with tempfile.TemporaryDirectory() as tmp:
        tok = Tokenizer(checkpoint.tensor_to_spm(ckpt["spm"], Path(tmp) / "spm.model"))
    model = build_model(tok.vocab_size, tok.pad_id, **ckpt["config"]["model"]).to(device)
    model.load_state_dict(ckpt["model"])
    model.eval()
    return model, tok, ckpt["config"]
