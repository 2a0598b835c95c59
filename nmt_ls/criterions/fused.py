"""Label-smoothed cross-entropy without (N, V) temporaries.

Both functions equal :func:`~nmt_ls.criterions.functional.label_smoothed_cross_entropy` in
value and gradient. As in the reference, a row's loss and NLL need only three numbers: the sum
of its log-probabilities and the log-probabilities of the gold and the pad class. A custom
autograd function computes those three per row, walking the rows in chunks; everything after
them (smoothing, masking, KL, reduction) is ordinary autograd on (N,) tensors. Its backward
gets the upstream grads of the three and writes

    grad_x = g_sum * (1 - V p) + g_gold * (onehot(y) - p) + g_pad * (onehot(pad) - p)

for ``p = softmax(x)``, chunk by chunk. For a kept row that is ``(a + b) * p - a * q - b *
onehot(y)`` (``a`` the upstream factor of ``loss`` and ``kl``, ``b`` that of ``nll``): no row
of q is ever built.

* :func:`fused_label_smoothed_cross_entropy` takes logits (..., V). For float32/float64
  logits, forward writes the softmax into one buffer shaped like the logits; backward turns
  that buffer into the gradient in place and returns it. Extra memory: that buffer plus one
  chunk. (A second backward through the same graph recomputes the softmax from the saved
  logits.) Half-precision logits keep only the row statistics: backward recomputes each
  chunk's softmax in float32 and rounds the finished gradient once into a buffer of the
  logits' dtype, so p is never rounded before ``p - q`` is formed. On Linux the (N, V)
  buffer is marked for transparent huge pages before its first write.
* :func:`chunked_linear_cross_entropy` takes the decoder features (..., D) and the output
  projection (V, D) and never holds more than one chunk of logits: backward recomputes each
  chunk's logits (one more matmul) and accumulates the features' and the weight's gradients.

Half-precision inputs are upcast one chunk at a time (the chunked path also upcasts the
weight once); all softmax arithmetic is float32 (float64 for float64 inputs). Where
``p_gold > 1/2`` the gradient's gold column is formed from ``rest = 1 - p_gold`` summed over
the other classes, not from ``1 - p_gold``, which would cancel: at p_gold = 0.999 a float32
``1 - p_gold`` keeps at most 4 of its 7 digits.
"""

from __future__ import annotations

import ctypes
import functools
import sys
from dataclasses import dataclass

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from nmt_ls.criterions.functional import (
    REDUCTIONS,
    LossOutput,
    LossSpec,
    check_args,
    check_target,
    loss_output,
    terms_from_row_stats,
)

CHUNK_BYTES = 4 << 20  # float32 per chunk of the fused path: stays in cache across its passes
LINEAR_CHUNK_BYTES = 32 << 20  # float32 logits per chunk in the chunked output layer


HUGE_PAGE = 2 << 20  # bytes; Linux transparent huge pages on x86-64 and most arm64
MADV_HUGEPAGE = 14  # Linux only


@dataclass(frozen=True)
class _Walk:
    """How an autograd function below walks the rows: ``pad`` is the class whose statistic it
    keeps (None: none, lp_pad stays 0), ``rows`` and ``back_rows`` the rows per chunk in
    forward and in backward, ``keep_probs`` whether forward leaves the softmax for backward."""

    pad: int | None
    rows: int
    back_rows: int
    keep_probs: bool = False


@functools.cache
def _madvise():
    """libc's ``madvise``, or None where there is none to call (not Linux, no libc)."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        fn = ctypes.CDLL(None, use_errno=True).madvise
    except (OSError, AttributeError):
        return None
    fn.argtypes, fn.restype = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int], ctypes.c_int
    return fn


def _empty_huge_like(x: Tensor) -> Tensor:
    """``torch.empty_like(x)``, contiguous; on Linux CPU, its whole 2 MiB pages are first
    marked ``MADV_HUGEPAGE``. A logits-sized buffer is otherwise filled one 4 KiB page fault
    at a time, which on a 2-core machine costs more than the softmax written into it (0.13 s
    of 0.17 s at 4096 x 32000). PyTorch does the same for every allocation under
    ``THP_MEM_ALLOC_ENABLE=1``; this asks it for the one buffer only. Where the kernel says
    no (THP ``never``), nothing changes."""
    out = torch.empty_like(x, memory_format=torch.contiguous_format)
    nbytes = out.numel() * out.element_size()
    madvise = _madvise() if out.device.type == "cpu" and nbytes >= 4 * HUGE_PAGE else None
    if madvise is not None:
        start = -(-out.data_ptr() // HUGE_PAGE) * HUGE_PAGE
        end = (out.data_ptr() + nbytes) // HUGE_PAGE * HUGE_PAGE
        madvise(start, end - start, MADV_HUGEPAGE)  # advice only: a failure changes nothing
    return out


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _rows_per_chunk(chunk_size: int | None, n: int, k: int, budget: int | None) -> int:
    """``chunk_size`` if given; else all rows if ``budget`` is None, else as many rows as fit
    ``budget`` bytes of float32 but at most 1/16 of them (a chunk stays <= 1/16 of the logits)."""
    if chunk_size is not None:
        if chunk_size < 1:
            raise ValueError(f"chunk_size must be a positive number of rows, got {chunk_size}")
        return chunk_size
    if budget is None:
        return max(1, n)
    return max(1, min(budget // (4 * k), -(-n // 16)))


def _stats_and_probs(x: Tensor, tgt: Tensor, pad: int | None, probs: Tensor, out: list[Tensor]) -> None:
    """Write the row statistics of the logits chunk ``x`` (C, V) into the (C,) slices ``out`` =
    (sum_lp, lp_gold, lp_pad), and ``softmax(x)`` into ``probs`` (C, V).

    The log-sum-exp comes from the softmax itself, ``lse = x_gold - log p_gold``, which costs
    no pass over the row; rows whose gold probability underflows (``log p < -69``) get an
    exact ``logsumexp`` instead.
    """
    p = torch.softmax(x, -1, out=probs)
    x_gold = x.gather(1, tgt[:, None]).squeeze(1)  # (C,)
    p_gold = p.gather(1, tgt[:, None]).squeeze(1)
    lse = x_gold - p_gold.log()
    tiny = p_gold.lt(1e-30).nonzero().squeeze(1)
    lse[tiny] = x[tiny].logsumexp(-1)
    x_pad = x[:, pad] if pad is not None else None
    _write_stats(x.sum(-1), x_gold, x_pad, lse, x.size(-1), out)


def _stats_from_logits_(x: Tensor, tgt: Tensor, pad: int | None, out: list[Tensor]) -> Tensor:
    """Write the row statistics of ``x`` (C, V) into ``out`` as above and return the
    log-sum-exp (C,); ``x`` is overwritten."""
    x_sum, x_gold = x.sum(-1), x.gather(1, tgt[:, None]).squeeze(1)  # (C,)
    x_pad = x[:, pad].clone() if pad is not None else None
    x_max = x.amax(-1)
    lse = x.sub_(x_max[:, None]).exp_().sum(-1).log_().add_(x_max)
    _write_stats(x_sum, x_gold, x_pad, lse, x.size(-1), out)
    return lse


def _write_stats(x_sum, x_gold, x_pad, lse, k: int, out: list[Tensor]) -> None:
    """(sum_lp, lp_gold, lp_pad) = (x_sum - V lse, x_gold - lse, x_pad - lse) into ``out``;
    lp_pad is left alone if ``x_pad`` is None."""
    sum_lp, lp_gold, lp_pad = out
    torch.sub(x_sum, k * lse, out=sum_lp)
    torch.sub(x_gold, lse, out=lp_gold)
    if x_pad is not None:
        torch.sub(x_pad, lse, out=lp_pad)


def _scale_probs_(p: Tensor, tgt: Tensor, pad: int | None, c: Tensor, g_sum: Tensor):
    """Turn the probabilities ``p`` (C, V) in place into ``c * p + g_sum`` (row-wise factors
    ``c``, ``g_sum`` (C,)), the gradient everywhere but at the gold and pad columns, and return
    what those two need, each (C,): ``p_gold``, ``rest = 1 - p_gold`` summed over the other
    classes (free of the cancellation in ``1 - p_gold`` near p_gold = 1) and ``p_pad`` (None
    if ``pad`` is None)."""
    idx = tgt[:, None]  # (C, 1)
    p_gold = p.gather(1, idx).squeeze(1)
    p.scatter_(1, idx, 0.0)
    rest = p.sum(-1)
    p_pad = p[:, pad].clone() if pad is not None else None
    p.mul_(c[:, None]).add_(g_sum[:, None])  # two passes, yet faster than one addcmul on CPU
    return p_gold, rest, p_pad


def _set_gold_and_pad_(grad: Tensor, tgt: Tensor, pad: int | None, c: Tensor, grads, cols) -> None:
    """Write the gold and pad columns of ``grad`` (C, V), each once, from ``cols``, the (C,)
    tensors (p_gold, rest, p_pad) of :func:`_scale_probs_` (computed in float32 or float64 and
    rounded into ``grad``'s dtype).

    The gold one is ``g_sum + g_gold + c * p_gold``, or where p_gold > 1/2 the same value
    ``(1 - V) g_sum - g_pad - c * rest``, in which ``c * p_gold`` no longer cancels against
    ``-c``; the pad one is ``(g_sum + g_pad) + c * p_pad``.
    """
    g_sum, g_gold, g_pad = grads
    p_gold, rest, p_pad = cols
    k = grad.size(-1)
    at_gold = torch.where(rest < 0.5, (1 - k) * g_sum - g_pad - c * rest, g_sum + g_gold + c * p_gold)
    rows = torch.arange(grad.size(0), device=grad.device)
    grad.index_put_((rows, tgt), at_gold.to(grad.dtype))  # not scatter_: 0.4 s on a CPU bfloat16 (4096, 32000)
    if pad is not None:
        grad[:, pad] = (g_sum + g_pad) + c * p_pad


def _grad_from_probs_(p: Tensor, tgt: Tensor, pad: int | None, grads: list[Tensor]) -> Tensor:
    """Turn ``p = softmax(x)`` (C, V) in place into the gradient w.r.t. ``x`` of
    ``g_sum * sum_lp + g_gold * lp_gold + g_pad * lp_pad``, given the (C,) slices ``grads``.

    With ``d lp_j / dx = onehot(j) - p``: ``g_sum + c * p`` on every class, with
    ``c = -(V * g_sum + g_gold + g_pad)``, plus ``g_gold`` at the gold and ``g_pad`` at the pad
    column (:func:`_scale_probs_`, then :func:`_set_gold_and_pad_`).
    """
    g_sum, g_gold, g_pad = grads
    c = -(p.size(-1) * g_sum + g_gold + g_pad)  # (C,)
    _set_gold_and_pad_(p, tgt, pad, c, grads, _scale_probs_(p, tgt, pad, c, g_sum))
    return p


def _new_stats(n: int, dtype: torch.dtype, device) -> list[Tensor]:
    return [torch.zeros(n, dtype=dtype, device=device) for _ in range(3)]


class _RowStats(torch.autograd.Function):
    """logits (N, V) -> (sum_lp, lp_gold, lp_pad), each (N,): the sum of a row's
    log-probabilities and those of its gold and pad class (lp_pad = 0 if ``pad`` is None).

    For float32/float64 logits that need a gradient, forward leaves the softmax in a buffer
    shaped like the logits; the first backward turns it into the gradient in place and
    returns it. Half-precision logits keep no such buffer: backward recomputes each chunk's
    softmax in float32 from the logits, forms the gradient there and rounds it once, into a
    buffer of the logits' dtype. A second backward (``retain_graph``, ``gradcheck``) finds the
    buffer spent and recomputes likewise. Backward walks the rows in chunks of
    ``back_rows``, each of which stays in cache across its passes.
    """

    @staticmethod
    def forward(ctx, logits: Tensor, tgt: Tensor, walk: _Walk):
        n, k = logits.shape
        pad, rows = walk.pad, walk.rows
        cdt = _compute_dtype(logits.dtype)
        stats = _new_stats(n, cdt, logits.device)
        in_place = walk.keep_probs and logits.dtype == cdt  # else one (C, V) float scratch
        probs = _empty_huge_like(logits) if in_place else None  # (N, V): to become the gradient
        scratch = None if in_place else logits.new_empty(min(rows, n), k, dtype=cdt)
        upcast = _upcast_buffer(logits, rows)
        for i in range(0, n, rows):
            sl = slice(i, i + rows)
            x = _upcast(logits[sl], upcast)  # (C, V)
            p = probs[sl] if in_place else scratch[: x.size(0)]
            _stats_and_probs(x, tgt[sl], pad, p, [s[sl] for s in stats])
        ctx.save_for_backward(logits, tgt)
        ctx.probs, ctx.pad, ctx.back_rows = probs, pad, walk.back_rows
        return tuple(stats)

    @staticmethod
    @once_differentiable
    def backward(ctx, *grads):
        logits, tgt = ctx.saved_tensors
        grad, ctx.probs = ctx.probs, None
        recompute = grad is None
        if recompute:
            grad = _empty_huge_like(logits)  # (N, V)
        n, k = logits.shape
        rows, pad = ctx.back_rows, ctx.pad
        cdt = _compute_dtype(logits.dtype)
        direct = grad.dtype == cdt  # else each chunk is formed in a float scratch, rounded into grad once
        scratch = None if direct else logits.new_empty(min(rows, n), k, dtype=cdt)
        upcast = _upcast_buffer(logits, rows)
        g_sum, g_gold, g_pad = grads
        c = -(k * g_sum + g_gold + g_pad)  # (N,)
        cols = [torch.empty_like(c) for _ in range(3)]  # p_gold, rest, p_pad (N,): for those columns
        for i in range(0, n, rows):
            sl = slice(i, i + rows)
            p = grad[sl] if direct else scratch[: min(rows, n - i)]  # (C, V)
            if recompute:
                torch.softmax(_upcast(logits[sl], upcast), -1, out=p)
            for col, chunk_col in zip(cols, _scale_probs_(p, tgt[sl], pad, c[sl], g_sum[sl])):
                if chunk_col is not None:
                    col[sl] = chunk_col
            if not direct:
                grad[sl].copy_(p)
        _set_gold_and_pad_(grad, tgt, pad, c, grads, cols)
        return grad, None, None


def _upcast_buffer(logits: Tensor, rows: int) -> Tensor | None:
    """A (C, V) buffer for :func:`_upcast` if ``logits`` (N, V) are half precision, else None."""
    cdt = _compute_dtype(logits.dtype)
    return None if logits.dtype == cdt else logits.new_empty(min(rows, logits.size(0)), logits.size(1), dtype=cdt)


def _upcast(x: Tensor, buf: Tensor | None) -> Tensor:
    """The logits chunk ``x`` (C, V) itself, or copied into the first C rows of the float
    ``buf``: a fresh ``x.float()`` per chunk pays its page faults each time (0.3 s of a
    4096 x 32000 bfloat16 backward in 64-row chunks, against 0.02 s into one buffer)."""
    return x if buf is None else buf[: x.size(0)].copy_(x)


class _LinearRowStats(torch.autograd.Function):
    """hidden (N, D), weight (V, D), bias (V,) -> the row statistics of
    ``hidden @ weight.T + bias``, computed and differentiated one row chunk at a time in a
    single (C, V) buffer."""

    @staticmethod
    def forward(ctx, hidden: Tensor, weight: Tensor, bias: Tensor | None, tgt: Tensor, walk: _Walk):
        n, k = hidden.size(0), weight.size(0)
        pad, rows = walk.pad, walk.rows
        cdt = _compute_dtype(hidden.dtype)
        w, b = weight.to(cdt), bias.to(cdt) if bias is not None else None
        stats = _new_stats(n, cdt, hidden.device)
        lse = torch.empty(n, dtype=cdt, device=hidden.device)
        chunk = hidden.new_empty(min(rows, n), k, dtype=cdt)  # (C, V)
        for i in range(0, n, rows):
            sl = slice(i, i + rows)
            x = _linear(hidden[sl].to(cdt), w, b, chunk)
            lse[sl] = _stats_from_logits_(x, tgt[sl], pad, [s[sl] for s in stats])
        ctx.save_for_backward(hidden, weight, bias, tgt, lse)
        # backward reuses the chunk buffer: a second one, allocated while the first lingers
        # in the heap, sometimes doubled the extra memory
        ctx.pad, ctx.rows, ctx.chunk = pad, rows, chunk
        return tuple(stats)

    @staticmethod
    @once_differentiable
    def backward(ctx, *grads):
        hidden, weight, bias, tgt, lse = ctx.saved_tensors
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        n = hidden.size(0)
        cdt = _compute_dtype(hidden.dtype)
        w, b = weight.to(cdt), bias.to(cdt) if bias is not None else None
        grad_h = torch.empty(hidden.shape, dtype=cdt, device=hidden.device) if need_h else None  # (N, D)
        grad_w = torch.zeros_like(w) if need_w else None  # (V, D)
        grad_b = torch.zeros_like(b) if need_b else None  # (V,)
        chunk = ctx.chunk  # (C, V)
        for i in range(0, n, ctx.rows):
            sl = slice(i, i + ctx.rows)
            h = hidden[sl].to(cdt)  # (C, D)
            p = _linear(h, w, b, chunk).sub_(lse[sl, None]).exp_()  # softmax, (C, V)
            g = _grad_from_probs_(p, tgt[sl], ctx.pad, [g[sl] for g in grads])
            if need_h:
                torch.mm(g, w, out=grad_h[sl])
            if need_w:
                grad_w.addmm_(g.t(), h)
            if need_b:
                grad_b += g.sum(0)
        return _cast(grad_h, hidden), _cast(grad_w, weight), _cast(grad_b, bias), None, None


def _cast(grad: Tensor | None, like: Tensor | None) -> Tensor | None:
    return grad.to(like.dtype) if grad is not None else None


def _linear(h: Tensor, w: Tensor, b: Tensor | None, chunk: Tensor) -> Tensor:
    """``h @ w.T + b`` (C, V) into the first C rows of ``chunk``."""
    out = chunk[: h.size(0)]
    if b is None:
        return torch.mm(h, w.t(), out=out)
    return torch.addmm(b, h, w.t(), out=out)


def _prepare(target: Tensor, k: int, spec: LossSpec):
    """Check the arguments; return (tgt (N,) with ignored ids set to 0, keep (N,))."""
    check_args(k, spec)
    if spec.reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {spec.reduction!r}")
    tgt = target.reshape(-1)  # (N,)
    ignore_index = spec.ignore_index
    keep = tgt.ne(ignore_index) if ignore_index is not None else torch.ones_like(tgt, dtype=torch.bool)
    check_target(tgt, k, keep)
    return tgt.masked_fill(~keep, 0), keep


def _finish(stats, keep: Tensor, k: int, spec: LossSpec, shape) -> LossOutput:
    """The reference's per-token formulas (``token_terms``) on the row statistics, then the KL
    and the reduction."""
    sum_lp, lp_gold, lp_pad = stats
    loss, nll = terms_from_row_stats(lp_gold, sum_lp, lp_pad, keep, k, spec)
    return loss_output(loss, nll, keep, k, spec, shape)


def fused_label_smoothed_cross_entropy(
    logits: Tensor, target: Tensor, spec: LossSpec | None = None, chunk_size: int | None = None
) -> LossOutput:
    """:func:`label_smoothed_cross_entropy` on logits in row chunks, with a fused backward.

    Same values and gradients as the reference, the gradients at least as accurate. The only
    (N, V) tensor it allocates is a buffer in the logits' dtype that becomes the gradient of
    ``logits``: for float32/float64 forward fills it with the softmax and backward turns that
    into the gradient in place; for bfloat16/float16 backward fills it chunk by chunk with the
    gradient formed in float32 (the softmax recomputed from the logits) and rounded once.
    Under ``torch.no_grad()`` (validation) or for logits that need no gradient it holds one
    chunk only. ``logits`` are saved by reference (for the half-precision backward and a
    second backward through the same graph). Backward flows from ``loss``, ``kl`` and
    ``nll`` alike.

    Args:
        logits (Tensor): shape (..., V), e.g. (B, T, V); float32, float64, bfloat16 or float16.
        target (Tensor): gold ids, shape (...); values in [0, V) except ``spec.ignore_index``.
        spec (LossSpec, optional): epsilon, ignore_index (its positions add nothing and get
            zero gradient), smoothing and reduction. Default: ``LossSpec()``
        chunk_size (int, optional): rows per chunk, forward and backward. Default: forward
            takes all rows at once when training on float32/float64 logits (the softmax goes
            straight into the buffer, no scratch); otherwise, and always in backward, 4 MiB of
            float32 per chunk, at most 1/16 of the rows (half-precision logits are upcast
            chunk by chunk).
    Returns:
        LossOutput(loss, kl, nll, ntokens), float32 (float64 for float64 logits).
    """
    if logits.shape[:-1] != target.shape:
        raise ValueError(
            f"logits of shape {tuple(logits.shape)} need a target of shape "
            f"{tuple(logits.shape[:-1])}, got {tuple(target.shape)}"
        )
    k = logits.size(-1)
    spec = LossSpec() if spec is None else spec
    tgt, keep = _prepare(target, k, spec)
    keep_probs = torch.is_grad_enabled() and logits.requires_grad
    full = keep_probs and logits.dtype in (torch.float32, torch.float64)  # no scratch needed
    rows = _rows_per_chunk(chunk_size, tgt.numel(), k, None if full else CHUNK_BYTES)
    back_rows = _rows_per_chunk(chunk_size, tgt.numel(), k, CHUNK_BYTES)
    walk = _Walk(spec.pad_column, rows, back_rows, keep_probs)
    stats = _RowStats.apply(logits.reshape(-1, k), tgt, walk)
    return _finish(stats, keep, k, spec, target.shape)


def chunked_linear_cross_entropy(
    hidden: Tensor,
    weight: Tensor,
    target: Tensor,
    spec: LossSpec | None = None,
    bias: Tensor | None = None,
    chunk_size: int | None = None,
) -> LossOutput:
    """The output projection and :func:`label_smoothed_cross_entropy` in one, chunk by chunk.

    Equals ``label_smoothed_cross_entropy(F.linear(hidden, weight, bias), target, spec)`` in
    value and in the gradients of ``hidden``, ``weight`` and ``bias``, but the (N, V) logits
    never exist: forward keeps four numbers per row (three statistics and the log-sum-exp),
    and backward recomputes each chunk's logits to form ``grad_hidden = g @ weight`` and
    ``grad_weight = sum g.T @ hidden``.

    Args:
        hidden (Tensor): decoder features, shape (..., D), e.g. (B, T, D).
        weight (Tensor): output projection (tied embedding), shape (V, D).
        target (Tensor): gold ids, shape (...).
        spec (LossSpec, optional): epsilon, ignore_index, smoothing and reduction, as in
            :func:`fused_label_smoothed_cross_entropy`. Default: ``LossSpec()``
        bias (Tensor, optional): output bias, shape (V,). Default: None
        chunk_size (int, optional): rows per chunk, i.e. of the one (C, V) float32 logits
            buffer, kept from forward to backward. Default: 32 MiB worth (262 rows at
            V=32000), at most 1/16 of the rows.
    Returns:
        LossOutput(loss, kl, nll, ntokens).
    """
    if hidden.shape[:-1] != target.shape:
        raise ValueError(
            f"hidden of shape {tuple(hidden.shape)} needs a target of shape "
            f"{tuple(hidden.shape[:-1])}, got {tuple(target.shape)}"
        )
    if weight.dim() != 2 or weight.size(1) != hidden.size(-1):
        raise ValueError(f"weight must have shape (V, {hidden.size(-1)}), got {tuple(weight.shape)}")
    k = weight.size(0)
    spec = LossSpec() if spec is None else spec
    tgt, keep = _prepare(target, k, spec)
    rows = _rows_per_chunk(chunk_size, tgt.numel(), k, LINEAR_CHUNK_BYTES)
    walk = _Walk(spec.pad_column, rows, rows)
    stats = _LinearRowStats.apply(hidden.reshape(-1, hidden.size(-1)), weight, bias, tgt, walk)
    return _finish(stats, keep, k, spec, target.shape)
