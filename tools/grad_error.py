"""Relative error of the logit gradients of the fused and the reference criterion.

    python tools/grad_error.py                      # 2048 x 8000, eps=0.1, others
    python tools/grad_error.py --eps 0 --smoothing uniform

For each dtype the same float64 logits are rounded to it, and both criteria differentiate the
summed ``loss``. The exact gradient of those rounded logits is ``p - q`` on kept rows, formed
in closed form with numpy: in float64, or in long double for float64 logits (where numpy's
long double is no wider than float64 that row says n/a). "exact, rounded" is the exact
gradient rounded once to the dtype: the least error any gradient held in that dtype can have.

Two measures. "batch": ||g - exact|| / ||exact|| over the whole (N, V) gradient, which the
least confident rows (the largest gradients) dominate. "per row": the same ratio for each
kept row, averaged, so that every token counts alike; confident rows (p_gold near 1, small
gradients) are where a gradient formed as ``p_gold - 1`` loses its digits.

The logits look like a trained model's: N(0, 2^2), the gold one raised so that p_gold =
sigmoid(t) with t uniform in [--t-min, --t-max] (default [-2, 12]: p_gold from 0.12 to
0.999994); a fraction --pad-frac of the rows are padding.
"""

from __future__ import annotations

import argparse

import numpy as np
import torch

from nmt_ls.criterions import label_smoothed_cross_entropy
from nmt_ls.criterions.functional import LossSpec
from nmt_ls.criterions.fused import fused_label_smoothed_cross_entropy

DTYPES = ("float32", "bfloat16", "float16", "float64")


def make_batch(args) -> tuple[torch.Tensor, torch.Tensor]:
    """float64 logits (N, V) and target (N,), as the module doc describes."""
    g = torch.Generator().manual_seed(args.seed)
    n, k = args.rows, args.vocab
    logits = torch.randn(n, k, generator=g, dtype=torch.float64) * 2
    target = torch.randint(0, k, (n,), generator=g)
    target[target == args.pad] = (args.pad + 1) % k
    rows = torch.arange(n)
    logits[rows, target] = -torch.inf
    t = args.t_min + (args.t_max - args.t_min) * torch.rand(n, generator=g, dtype=torch.float64)
    logits[rows, target] = logits.logsumexp(-1) + t  # p_gold = sigmoid(t)
    target[torch.rand(n, generator=g) < args.pad_frac] = args.pad
    return logits, target


def exact_grad(logits: np.ndarray, target: np.ndarray, args) -> np.ndarray:
    """d loss / d logits = p - q (N, V) on kept rows, 0 on padding rows, in ``logits``' dtype."""
    n, k = logits.shape
    eps, pad, rows = args.eps, args.pad, np.arange(n)
    e = np.exp(logits - logits.max(-1, keepdims=True))
    p = e / e.sum(-1, keepdims=True)
    off_gold = {"uniform": eps / k, "others": eps / (k - 1), "others_no_pad": eps / (k - 2)}[args.smoothing]
    grad = p - off_gold
    if args.smoothing == "others_no_pad":
        grad[:, pad] = p[:, pad]  # q = 0 on the pad column
    grad[rows, target] = p[rows, target] - (1 - eps + (eps / k if args.smoothing == "uniform" else 0.0))
    grad[target == pad] = 0
    return grad


def grad_of(fn, x: torch.Tensor, target: torch.Tensor, args) -> np.ndarray:
    """The gradient of ``fn``'s summed loss w.r.t. the logits ``x``, as float64 numpy."""
    leaf = x.clone().requires_grad_()
    fn(leaf, target, LossSpec(args.eps, args.pad, args.smoothing, "sum")).loss.backward()
    return leaf.grad.double().numpy()


def errors(grad: np.ndarray, exact: np.ndarray) -> tuple[float, float]:
    """(batch, per-row mean) relative error of ``grad`` (N, V) against ``exact``."""
    diff = grad.astype(exact.dtype) - exact
    norms = np.linalg.norm(exact, axis=-1)  # (N,)
    kept = norms > 0
    per_row = np.linalg.norm(diff, axis=-1)[kept] / norms[kept]
    return float(np.linalg.norm(diff) / np.linalg.norm(exact)), float(per_row.mean())


def dtype_errors(name: str, logits: torch.Tensor, target: torch.Tensor, args) -> dict | None:
    """{gradient: (batch, per-row) error} for logits rounded to ``name``; None for float64
    where numpy has no wider float."""
    dtype = getattr(torch, name)
    wide = np.longdouble if dtype == torch.float64 else np.float64
    if dtype == torch.float64 and np.finfo(wide).eps >= np.finfo(np.float64).eps:
        return None
    x = logits.to(dtype)
    exact = exact_grad(x.double().numpy().astype(wide), target.numpy(), args)
    rounded = torch.from_numpy(exact.astype(np.float64)).to(dtype).double().numpy()
    return {
        "fused": errors(grad_of(fused_label_smoothed_cross_entropy, x, target, args), exact),
        "reference": errors(grad_of(label_smoothed_cross_entropy, x, target, args), exact),
        "exact, rounded": errors(rounded, exact),
    }


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--rows", type=int, default=2048, help="N, target tokens")
    p.add_argument("--vocab", type=int, default=8000, help="V")
    p.add_argument("--eps", type=float, default=0.1)
    p.add_argument("--smoothing", default="others", choices=["uniform", "others", "others_no_pad"])
    p.add_argument("--pad", type=int, default=1, help="padding id")
    p.add_argument("--pad-frac", type=float, default=0.1)
    p.add_argument("--t-min", type=float, default=-2.0, help="least gold log-odds")
    p.add_argument("--t-max", type=float, default=12.0, help="greatest gold log-odds")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dtypes", default=",".join(DTYPES))
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    logits, target = make_batch(args)
    print(
        f"N={args.rows} V={args.vocab} eps={args.eps} smoothing={args.smoothing} pad_frac={args.pad_frac} "
        f"t in [{args.t_min}, {args.t_max}] seed={args.seed}; gradient of the summed loss"
    )
    results = {name: dtype_errors(name, logits, target, args) for name in args.dtypes.split(",")}
    cols = ("fused", "reference", "exact, rounded")
    for j, measure in enumerate(("batch", "per row")):
        print(f"\nrelative gradient error, {measure}")
        head = f"{'dtype':>9} | " + " | ".join(f"{c:>15}" for c in cols) + " | fused / reference"
        print(head)
        print("-" * len(head))
        for name, res in results.items():
            if res is None:
                print(f"{name:>9} | n/a: numpy's long double is no wider than float64 here")
                continue
            errs = [res[c][j] for c in cols]
            print(f"{name:>9} | " + " | ".join(f"{e:15.4e}" for e in errs) + f" | {errs[0] / errs[1]:17.7f}")


if __name__ == "__main__":
    main()
