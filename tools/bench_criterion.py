"""Forward+backward time and peak extra memory of label-smoothed cross-entropy implementations.

    python tools/bench_criterion.py                 # N=4096 tokens, V=32000, float32, 2 threads
    python tools/bench_criterion.py --sweep         # V in {8000, 16000, 32000, 64000}
    python tools/bench_criterion.py --device cuda

Cases (one step = forward + ``loss.backward()``, until the input gradients exist):

  a        F.cross_entropy(logits, tgt, label_smoothing=eps, ignore_index=pad, reduction="sum")
  b        fairseq style: log_softmax + label_smoothed_nll_loss (nmt_ls.criterions)
  c        dense one-hot KL of the seeds: explicit q (N, V) + nn.KLDivLoss(reduction="sum")
  d        nmt_ls reference label_smoothed_cross_entropy
  e        nmt_ls fused_label_smoothed_cross_entropy
  a+proj   F.cross_entropy(hidden @ W.T, ...) with hidden (N, D), W (V, D)
  f        nmt_ls chunked_linear_cross_entropy(hidden, W, ...)

Memory method. Every case runs in a fresh subprocess (this script re-invoked with
``--worker``), so no case inherits another's heap. The worker allocates and touches its inputs,
runs one warm-up step, drops the gradients, calls ``malloc_trim(0)`` so that freed heap pages
go back to the OS, then resets the kernel's peak-RSS counter (``echo 5 >
/proc/self/clear_refs`` resets VmHWM) and records the current RSS as the baseline. It runs
one step and reads VmHWM: peak extra = VmHWM - baseline, i.e. the most memory resident at
any moment of the step beyond the inputs, the input gradients included. PyTorch's CPU
allocator is plain malloc (no caching) and large blocks are mmap'ed, so RSS tracks live
tensors; every tensor involved is written, so none hides as untouched pages. Where
/proc/self/clear_refs is not writable it falls back to ``ru_maxrss`` minus the baseline
(the lifetime peak: the inputs are made in place, without larger temporaries, and the
warm-up step peaks as high as the measured one). On CUDA it uses
``torch.cuda.max_memory_allocated()`` minus the allocated memory before the step. "grads"
is the size of the input gradients every method must produce (logits: 1x; hidden + W for
the output layer), "beyond grads" is peak extra minus that.

Time is the median of ``--repeat`` steps after ``--warmup`` steps, in the same worker. A
step includes allocating the gradients (first-touch page faults on CPU), as training does;
``--thp`` makes PyTorch back large tensors with transparent huge pages, which cuts that cost
for every case. Case e asks for huge pages for its own (N, V) buffer even without ``--thp``
(``madvise``, see nmt_ls.criterions.fused), so the default run compares it with PyTorch's
defaults and ``--thp`` compares the arithmetic alone. On a shared machine, ``--rounds R``
runs every case R times, interleaved, and reports the median of the R medians (memory: the
largest of the R peaks); the load average is printed with the table.
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import os
import resource
import statistics
import subprocess
import sys
import time

import torch
import torch.nn.functional as F
from torch import nn

from nmt_ls.criterions import label_smoothed_cross_entropy, label_smoothed_nll_loss
from nmt_ls.criterions.functional import LossSpec
from nmt_ls.criterions.fused import chunked_linear_cross_entropy, fused_label_smoothed_cross_entropy

LOGIT_CASES = ("a", "b", "c", "d", "e")
LINEAR_CASES = ("a+proj", "f")
BASELINE = {"b": "a", "c": "a", "d": "a", "e": "a", "f": "a+proj"}


def step(case: str, inputs: dict, args) -> None:
    """One forward + backward of ``case``; leaves the gradients in the inputs' ``.grad``."""
    eps, pad, tgt = args.eps, args.pad, inputs["tgt"]
    spec = LossSpec(eps, pad, args.smoothing)
    if case in LINEAR_CASES:
        h, w = inputs["hidden"], inputs["weight"]
        if case == "a+proj":
            loss = F.cross_entropy(h @ w.t(), tgt, label_smoothing=eps, ignore_index=pad, reduction="sum")
        else:
            loss = chunked_linear_cross_entropy(h, w, tgt, spec).loss
        loss.backward()
        return
    x = inputs["logits"]  # (N, V)
    if case == "a":
        loss = F.cross_entropy(x, tgt, label_smoothing=eps, ignore_index=pad, reduction="sum")
    elif case == "b":
        loss, _ = label_smoothed_nll_loss(F.log_softmax(x, -1), tgt, eps, pad)
    elif case == "c":  # JoeyNMT / Annotated Transformer: eps/(V-2) off gold, pad column and rows 0
        lprobs = F.log_softmax(x, -1)
        q = torch.full_like(lprobs, eps / (x.size(-1) - 2))  # (N, V)
        q[:, pad] = 0.0
        q.scatter_(1, tgt[:, None], 1.0 - eps)
        q.masked_fill_(tgt.eq(pad)[:, None], 0.0)
        loss = nn.KLDivLoss(reduction="sum")(lprobs, q)
    elif case == "d":
        loss = label_smoothed_cross_entropy(x, tgt, spec).loss
    else:
        chunk = args.fused_chunk or None
        loss = fused_label_smoothed_cross_entropy(x, tgt, spec, chunk_size=chunk).loss
    loss.backward()


def make_inputs(case: str, args, device) -> dict:
    """Inputs made in place (no temporaries larger than themselves), ~10% padding."""
    g = torch.Generator(device=device).manual_seed(0)
    dtype = getattr(torch, args.dtype)
    tgt = torch.randint(0, args.vocab, (args.tokens,), generator=g, device=device)
    tgt[torch.rand(args.tokens, generator=g, device=device) < args.pad_frac] = args.pad
    if case in LINEAR_CASES:
        hidden = torch.empty(args.tokens, args.dim, device=device, dtype=dtype).normal_(generator=g)
        weight = torch.empty(args.vocab, args.dim, device=device, dtype=dtype)
        weight.normal_(0, 2 * args.dim**-0.5, generator=g)
        return {"tgt": tgt, "hidden": hidden.requires_grad_(), "weight": weight.requires_grad_()}
    logits = torch.empty(args.tokens, args.vocab, device=device, dtype=dtype).normal_(0, 2, generator=g)
    return {"tgt": tgt, "logits": logits.requires_grad_()}


def clear_grads(inputs: dict) -> None:
    for t in inputs.values():
        t.grad = None


def _status_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise KeyError(field)


class PeakMemory:
    """Peak memory beyond what is resident at ``start()``, in bytes (see the module doc)."""

    def __init__(self, device: torch.device):
        self.device = device

    def start(self) -> None:
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.base = torch.cuda.memory_allocated()
            return
        try:
            ctypes.CDLL("libc.so.6").malloc_trim(0)
        except OSError:
            pass
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            self.hwm = True
        except OSError:
            self.hwm = False
        self.base = _status_kb("VmRSS") * 1024

    def stop(self) -> int:
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            return torch.cuda.max_memory_allocated() - self.base
        peak_kb = _status_kb("VmHWM") if self.hwm else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return peak_kb * 1024 - self.base


def worker(args) -> dict:
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    inputs = make_inputs(args.case, args, device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    step(args.case, inputs, args)  # warm-up: thread pools, kernels, lazy init
    clear_grads(inputs)
    meter = PeakMemory(device)
    meter.start()
    step(args.case, inputs, args)
    peak = meter.stop()
    grad_bytes = sum(t.grad.numel() * t.grad.element_size() for t in inputs.values() if t.grad is not None)
    clear_grads(inputs)
    for _ in range(args.warmup):
        step(args.case, inputs, args)
        clear_grads(inputs)
    times = []
    for _ in range(args.repeat):
        sync()
        t0 = time.perf_counter()
        step(args.case, inputs, args)
        sync()
        times.append(time.perf_counter() - t0)
        clear_grads(inputs)
    return {"time": statistics.median(times), "peak": peak, "grads": grad_bytes}


def run_case(case: str, vocab: int, args) -> dict:
    cmd = [sys.executable, __file__, "--worker", "--case", case, "--vocab", str(vocab)]
    names = (
        "tokens",
        "dim",
        "dtype",
        "threads",
        "eps",
        "pad",
        "pad_frac",
        "smoothing",
        "repeat",
        "warmup",
        "device",
        "fused_chunk",
    )
    for name in names:
        cmd += [f"--{name.replace('_', '-')}", str(getattr(args, name))]
    env = dict(os.environ, THP_MEM_ALLOC_ENABLE="1") if args.thp else None
    out = subprocess.run(cmd, check=True, capture_output=True, text=True, env=env).stdout
    return json.loads(out.strip().splitlines()[-1])


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tokens", type=int, default=4096, help="N, target tokens per batch")
    p.add_argument("--vocab", type=int, default=32000, help="V")
    p.add_argument("--dim", type=int, default=512, help="D, for the output-layer cases")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--eps", type=float, default=0.1)
    p.add_argument("--pad", type=int, default=1, help="padding id")
    p.add_argument("--pad-frac", type=float, default=0.1)
    p.add_argument("--smoothing", default="others", help="for cases d, e, f")
    p.add_argument("--repeat", type=int, default=10)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--device", default="cpu")
    p.add_argument("--fused-chunk", type=int, default=0, help="rows per chunk of case e (0: its default)")
    p.add_argument("--cases", default=",".join(LOGIT_CASES + LINEAR_CASES))
    p.add_argument(
        "--thp",
        action="store_true",
        help="THP_MEM_ALLOC_ENABLE=1 in the workers: PyTorch asks for transparent huge pages",
    )
    p.add_argument("--rounds", type=int, default=1, help="interleaved repetitions of all cases")
    p.add_argument("--sweep", action="store_true", help="V in 8000, 16000, 32000, 64000")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--case", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        print(json.dumps(worker(args)))
        return

    cases = args.cases.split(",")
    vocabs = (8000, 16000, 32000, 64000) if args.sweep else (args.vocab,)
    elem = torch.tensor([], dtype=getattr(torch, args.dtype)).element_size()
    print(
        f"N={args.tokens} D={args.dim} {args.dtype} threads={args.threads} device={args.device} "
        f"eps={args.eps} pad_frac={args.pad_frac} smoothing(d,e,f)={args.smoothing} "
        f"thp={args.thp} repeat={args.repeat} rounds={args.rounds} (median); load average {os.getloadavg()[0]:.1f}"
    )
    head = (
        f"{'V':>6} {'case':>7} {'time s':>8} {'x base':>7} {'peak MB':>8} {'x logits':>8} "
        f"{'grads MB':>8} {'beyond grads':>12}"
    )
    print(head)
    print("-" * len(head))
    for vocab in vocabs:
        logits_mb = args.tokens * vocab * elem / 2**20
        runs = {case: [] for case in cases}
        for _ in range(args.rounds):
            for case in cases:
                runs[case].append(run_case(case, vocab, args))
        res = {
            case: {
                "time": statistics.median(r["time"] for r in rs),
                "peak": max(r["peak"] for r in rs),
                "grads": rs[0]["grads"],
            }
            for case, rs in runs.items()
        }
        for case, r in res.items():
            base = res.get(BASELINE.get(case, case))
            ratio = f"{r['time'] / base['time']:7.2f}" if base else f"{'-':>7}"
            peak, grads = r["peak"] / 2**20, r["grads"] / 2**20
            print(
                f"{vocab:>6} {case:>7} {r['time']:8.3f} {ratio} {peak:8.0f} {peak / logits_mb:8.2f} "
                f"{grads:8.0f} {(peak - grads) / logits_mb:11.3f}x",
                flush=True,
            )
        print(
            f"{'':>6} logits (N, V) = {logits_mb:.0f} MB; 'x base' is vs a (vs a+proj for f); "
            f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs",
            flush=True,
        )


if __name__ == "__main__":
    main()
