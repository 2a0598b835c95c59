"""Checkpoints: written atomically (temp file, fsync, rename), read with ``weights_only=True``.

A checkpoint is a dict of tensors and plain Python values only: model, optimizer and
scheduler state, the training progress (update, epoch, batch position, ...), every worker's
RNG states, the resolved config and the sentencepiece model bytes (as a uint8 tensor), so a
checkpoint alone can translate. It is always read onto the CPU: ``load_state_dict`` moves
parameters and optimizer state to wherever the model lives, while the RNG states and the
sentencepiece bytes must stay CPU tensors (``torch.set_rng_state`` and ``.numpy()`` refuse
anything else).
"""

from __future__ import annotations

import hashlib
import logging
import os
import random
import tempfile
from pathlib import Path

import torch
from torch import nn

from nmt_ls.config import DROPOUTS, differences

log = logging.getLogger(__name__)

FORMAT = "nmt_ls/1"
REQUIRED = ("format", "model", "config", "update")


class CheckpointError(RuntimeError):
    """A checkpoint that is truncated, foreign or otherwise unreadable."""


def atomic_save(obj, path: str | Path) -> None:
    """``torch.save`` to a temp file in the same folder, fsync, then rename over ``path``:
    a reader sees the old file or the new one, never half of one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def load(path: str | Path) -> dict:
    """Read a checkpoint onto the CPU with ``weights_only=True`` (no code runs on load); raise
    :class:`CheckpointError` naming the file if it is truncated, foreign or not ours."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises many kinds here (UnpicklingError, KeyError, RuntimeError, ...)
        raise CheckpointError(f"{path}: not a readable checkpoint (truncated, corrupt or unsafe): {e}") from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT or any(k not in ckpt for k in REQUIRED):
        raise CheckpointError(f"{path}: not an nmt_ls checkpoint (expected format {FORMAT!r})")
    return ckpt


def spm_to_tensor(model_path: str | Path) -> torch.Tensor:
    return torch.frombuffer(bytearray(Path(model_path).read_bytes()), dtype=torch.uint8)


def tensor_to_spm(tensor: torch.Tensor, model_path: str | Path) -> Path:
    """Write the sentencepiece model stored in a checkpoint to ``model_path``."""
    model_path = Path(model_path)
    model_path.parent.mkdir(parents=True, exist_ok=True)
    model_path.write_bytes(tensor.cpu().numpy().tobytes())
    return model_path


def rng_state() -> dict:
    """This process's RNG states (torch CPU, Python, and every CUDA device's)."""
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []
    return {"torch": torch.get_rng_state(), "python": random.getstate(), "cuda": cuda}


def restore_rng(rng: dict) -> None:
    torch.set_rng_state(rng["torch"].cpu())
    random.setstate(rng["python"])
    if rng.get("cuda") and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([t.cpu() for t in rng["cuda"]])


def training_state(stateful: dict, config: dict, spm_path: str | Path, progress: dict, rngs: list[dict]) -> dict:
    """Everything ``--resume`` needs, plus what inference needs.

    Args:
        stateful (dict): name -> object with a ``state_dict()``, saved under that name, in
            order: ``{"model": model, "optimizer": optimizer, "scheduler": scheduler}``.
        config (dict): the resolved run config.
        spm_path (str or Path): the sentencepiece model, stored as bytes.
        progress (dict): the loop's counters, each a top-level entry.
        rngs (list of dict): every worker's RNG states; ``rngs[r]`` is worker r's.
    """
    return {
        "format": FORMAT,
        **{name: obj.state_dict() for name, obj in stateful.items()},
        "config": config,
        "spm": spm_to_tensor(spm_path),
        "rng": rngs,
        **progress,
    }


def restore_training(ckpt: dict, model: nn.Module, optimizer, rank: int, world_size: int) -> None:
    """Load the model, the optimizer's state (:func:`load_optimizer_state`) and worker ``rank``'s
    RNG states. The schedule's state is :func:`nmt_ls.resume.restore`'s: the recipe may change it."""
    model.load_state_dict(ckpt["model"])
    load_optimizer_state(optimizer, ckpt["optimizer"])
    rngs = ckpt["rng"] if isinstance(ckpt["rng"], list) else [ckpt["rng"]]  # before nmt_ls 0.2: rank 0's only
    if len(rngs) != world_size and rank == 0:
        log.warning(
            "checkpoint saved by %d worker(s), resuming with %d: dropout masks will differ from an uninterrupted run",
            len(rngs),
            world_size,
        )
    restore_rng(rngs[rank % len(rngs)])


def load_optimizer_state(optimizer: torch.optim.Optimizer, state: dict) -> None:
    """Load ``state`` (moment estimates, step counts) into ``optimizer`` and keep the optimizer's
    own hyper-parameters (weight decay, eps, betas: the recipe's; fairseq's optimizer states the
    same preference), but for the lrs, which the loaded state and then the schedule set."""
    own = [
        {k: v for k, v in group.items() if k not in ("params", "lr", "initial_lr")} for group in optimizer.param_groups
    ]
    optimizer.load_state_dict(state)
    for group, hyper in zip(optimizer.param_groups, own):
        group.update(hyper)


def average_checkpoints(paths: list[str | Path]) -> dict:
    """Average the model parameters of several checkpoints (the last one supplies the rest);
    they must share the model's architecture, its sentencepiece model and its direction."""
    if not paths:
        raise ValueError("average_checkpoints needs at least one checkpoint")
    ckpts = [load(p) for p in paths]
    keys = ckpts[0]["model"].keys()
    for p, c in zip(paths, ckpts):
        differ = model_differences(c, ckpts[0])
        if differ:
            changes = ", ".join(f"{key}={value!r} (not {first!r})" for key, value, first in differ)
            raise CheckpointError(f"{p}: its model differs from {paths[0]}'s: {changes}; cannot average")
        if c["model"].keys() != keys:
            raise CheckpointError(f"{p}: parameters differ from {paths[0]}; cannot average")
    avg = {}
    for k in keys:
        tensors = [c["model"][k] for c in ckpts]
        if tensors[0].is_floating_point():
            avg[k] = sum(t.double() for t in tensors).div(len(tensors)).to(tensors[0].dtype)
        else:
            avg[k] = tensors[-1]
    out = dict(ckpts[-1])
    out["model"] = avg
    for k in ("optimizer", "scheduler", "rng"):
        out.pop(k, None)  # an average is for inference, not for resuming
    out["averaged_from"] = [str(p) for p in paths]
    return out


def model_differences(ckpt: dict, first: dict) -> list[tuple]:
    """``(key, ckpt's, first's)`` for what makes two checkpoints' weights mean different things:
    the architecture (dropout aside), the tokenizer options, the languages and the sentencepiece
    model's bytes (their sha256)."""
    ours, theirs = ckpt["config"], first["config"]
    differ = [
        *differences("model", ours["model"], theirs["model"], DROPOUTS),
        *differences("tokenizer", ours.get("tokenizer", {}), theirs.get("tokenizer", {})),
        *differences("data", _languages(ours), _languages(theirs)),
    ]
    spm_ours, spm_theirs = _spm_sha256(ckpt), _spm_sha256(first)
    if spm_ours != spm_theirs:
        differ.append(("spm.model sha256", spm_ours, spm_theirs))
    return differ


def _languages(config: dict) -> dict:
    return {k: config.get("data", {}).get(k) for k in ("src_lang", "tgt_lang")}


def _spm_sha256(ckpt: dict) -> str | None:
    """The first 12 hex digits of the sha256 of the checkpoint's sentencepiece model bytes."""
    spm = ckpt.get("spm")
    return None if spm is None else hashlib.sha256(spm.numpy().tobytes()).hexdigest()[:12]
