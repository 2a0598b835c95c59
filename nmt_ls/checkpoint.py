"""Checkpoints: written atomically (temp file, fsync, rename), read with ``weights_only=True``.

A checkpoint is a dict of tensors and plain Python values only: model, optimizer and
scheduler state, the update/epoch/batch position, RNG states, the resolved config and the
sentencepiece model bytes (as a uint8 tensor), so a checkpoint alone can translate.
"""
from __future__ import annotations

import os
import tempfile
from pathlib import Path

import torch

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


def load(path: str | Path, map_location="cpu") -> dict:
    """Read a checkpoint with ``weights_only=True`` (no code runs on load); raise
    :class:`CheckpointError` naming the file if it is truncated, foreign or not ours."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
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
    model_path.write_bytes(tensor.numpy().tobytes())
    return model_path


def average_checkpoints(paths: list[str | Path]) -> dict:
    """Average the model parameters of several checkpoints (the last one supplies the rest)."""
    if not paths:
        raise ValueError("average_checkpoints needs at least one checkpoint")
    ckpts = [load(p) for p in paths]
    keys = ckpts[0]["model"].keys()
    for p, c in zip(paths, ckpts):
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
