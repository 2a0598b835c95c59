"""What this machine can do, measured where it matters: the cores this process may use, the
CPU's vector capability and native bf16, fp32 matmul GFLOP/s, and the precision that trains
the run's own model fastest (``train.amp: auto``).

On a CPU, bf16 autocast is a win only where the CPU computes bf16 natively (AVX-512 BF16 or
AMX); elsewhere oneDNN falls back to a slow path and an update takes 10-40x longer than in
float32. So ``auto`` picks float32 without probing where bf16 is not native, and where it is,
times a few updates of the run's own model and batches in both precisions and keeps the faster.
"""

from __future__ import annotations

import ctypes
import functools
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

log = logging.getLogger(__name__)

AMP = ("auto", "none", "bf16")
# bf16 must beat float32 by this factor in the probe to be chosen: a tie keeps float32's
# accuracy and its smaller memory.
BF16_MARGIN = 1.1


def usable_cores() -> int:
    """The cores this process may run on (its affinity mask, e.g. under taskset or a cgroup cpuset)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def cpu_capability() -> str:
    """torch's CPU kernel level: DEFAULT, AVX2, AVX512 (ATen's dispatch)."""
    return torch.backends.cpu.get_cpu_capability()


def native_bf16(device: torch.device) -> bool:
    """Does ``device`` compute bf16 natively (CUDA: sm80+; CPU: AVX-512 BF16 or AMX, as oneDNN sees it)?"""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())


def cpu_model() -> str:
    """The CPU's model name and family/model numbers from /proc/cpuinfo ("" where there is none)."""
    info = {}
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if not line.strip():
                    break
                key, _, value = line.partition(":")
                info[key.strip()] = value.strip()
    except OSError:
        return ""
    return f"{info.get('model name', '?')} (family {info.get('cpu family', '?')} model {info.get('model', '?')})"


def matmul_gflops(n: int = 1024, seconds: float = 0.5) -> float:
    """fp32 matmul GFLOP/s on this process's threads: (n x n) @ (n x n), repeated for ``seconds``."""
    gen = torch.Generator().manual_seed(0)  # not the global RNG: a resumed run's dropout masks stay exact
    a, b = torch.randn(n, n, generator=gen), torch.randn(n, n, generator=gen)
    a @ b  # first call: allocation and kernel choice
    count, start = 0, time.perf_counter()
    while (elapsed := time.perf_counter() - start) < seconds or count < 2:
        a @ b
        count += 1
    return 2 * n**3 * count / elapsed / 1e9


@dataclass(frozen=True)
class AmpChoice:
    amp: str  # none | bf16
    reason: str


def choose_amp(requested: str, device: torch.device, probe: Callable[[str], float] | None = None) -> AmpChoice:
    """Resolve ``train.amp``. ``probe(amp)`` returns the run's target tokens per second in that
    precision; it is called only for ``auto`` on a CPU with native bf16."""
    if requested not in AMP:
        raise ValueError(f"train.amp must be one of {', '.join(AMP)}, got {requested!r}")
    native = native_bf16(device)
    where = f"CUDA {torch.cuda.get_device_name(device)}" if device.type == "cuda" else f"CPU {cpu_capability()}"
    if requested == "none":
        return AmpChoice("none", "train.amp=none")
    if requested == "bf16":
        if not native:
            log.warning(
                "train.amp=bf16 on %s without native bf16: autocast falls back to a slow path "
                "(10-70x float32's time per update measured on AVX2 CPUs); train.amp=auto would pick float32",
                where,
            )
        return AmpChoice("bf16", f"train.amp=bf16 ({where}, {'native' if native else 'no native'} bf16)")
    if not native:
        return AmpChoice("none", f"float32 ({where}, no native bf16)")
    if device.type == "cuda":
        return AmpChoice("bf16", f"bf16 ({where} supports it)")
    if probe is None:
        return AmpChoice("none", f"float32 ({where}, native bf16, not probed)")
    fp32, bf16 = probe("none"), probe("bf16")
    ratio = bf16 / fp32
    amp = "bf16" if ratio >= BF16_MARGIN else "none"
    name = "bf16" if amp == "bf16" else "float32"
    return AmpChoice(amp, f"{name} ({where}, native bf16: bf16 at {ratio:.2f}x float32's tokens/s in a probe)")


@functools.cache
def _malloc_trim() -> Callable[[int], int] | None:
    try:
        return ctypes.CDLL(None).malloc_trim  # glibc
    except (OSError, AttributeError):  # another libc, or not Linux
        return None


def release_freed_memory() -> None:
    """Give the heap's free pages back to the system (glibc's ``malloc_trim``; a no-op elsewhere).

    Batches of ever-changing shapes fragment glibc's heap: under bf16 autocast, where every
    matmul also allocates bf16 copies, a 2-core run's RSS grew past 2.3 GB in 120 updates;
    trimming after every update kept it under 1.5 GB (tools/bench_train.py; README)."""
    trim = _malloc_trim()
    if trim is not None:
        trim(0)
