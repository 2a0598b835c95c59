"""Label-smoothed cross-entropy as pure functions.

Notation: K classes, gold class ``y``, smoothing mass ``eps``, log-probabilities ``lp``.
Every smoothing puts ``1 - eps`` on the gold class and spreads ``eps`` over some set of
classes; the loss of one token is ``CE(q, p) = -sum_k q_k lp_k`` and needs only four numbers
per row, never an (N, K) target:

=================  =========================  ==========================================
``smoothing``      target distribution q      used by
=================  =========================  ==========================================
``uniform``        eps/K on every class,      PyTorch ``label_smoothing``, Keras, fastai
                   plus 1-eps on gold
``others``         1-eps on gold,             fairseq (>= 0.12), the common
                   eps/(K-1) on the others    ``LabelSmoothingLoss`` snippet
``others_no_pad``  1-eps on gold, 0 on pad,   OpenNMT-py, Annotated Transformer, JoeyNMT
                   eps/(K-2) on the others
=================  =========================  ==========================================

For a row with gold ``y``: ``lp_y = x_y - lse``, ``sum_k lp_k = sum_k x_k - K * lse`` and
``lp_pad = x_pad - lse``, where ``lse`` is the log-sum-exp of the logits ``x`` (0 when the
input already holds log-probabilities). Rows whose target is ``ignore_index`` contribute
nothing, to the NLL and to the smoothing term alike. The KL form is ``CE(q, p) - H(q)``,
with the entropy ``H(q)`` in closed form (a constant per smoothing).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

SMOOTHINGS = ("uniform", "others", "others_no_pad")
REDUCTIONS = ("none", "sum", "mean", "sentence")


@dataclass
class LossOutput:
    """What a criterion hands to the trainer and the logs.

    ``loss`` is the smoothed cross-entropy (backprop this), ``kl`` the same minus the entropy
    of the smoothed target (0 when the model predicts q exactly), ``nll`` the plain negative
    log-likelihood of the gold tokens (perplexity comes from here), ``ntokens`` the number of
    non-pad target tokens. All three tensors have the shape the reduction gives.
    """

    loss: Tensor
    kl: Tensor
    nll: Tensor
    ntokens: int


@dataclass(frozen=True)
class LossSpec:
    """Which label-smoothed loss to compute, apart from its inputs.

    Args:
        epsilon (float): smoothing mass in [0, 1). Default: 0.1
        ignore_index (int, optional): padding id; its positions add nothing to any term and
            get no gradient. Default: None
        smoothing (str): ``uniform``, ``others`` or ``others_no_pad`` (see the module doc).
            Default: ``others``
        reduction (str): ``none`` | ``sum`` | ``mean`` (over non-pad tokens) | ``sentence``
            (sum over the last target dim). Default: ``sum``

    A spec is only a record: the loss functions check its values where they use them
    (``others_no_pad`` also needs the number of classes). Example:
    ``label_smoothed_cross_entropy(logits, tgt, LossSpec(0.1, pad_id, "others", "sum"))``.
    """

    epsilon: float = 0.1
    ignore_index: int | None = None
    smoothing: str = "others"
    reduction: str = "sum"

    @property
    def pad_column(self) -> int | None:
        """The class whose log-probability the loss needs besides the gold one: the pad id
        under ``others_no_pad``, else None."""
        return self.ignore_index if self.smoothing == "others_no_pad" else None


def check_smoothing(label_smoothing: float, smoothing: str, names=("label_smoothing", "smoothing")) -> str:
    """``smoothing`` if it and the mass ``label_smoothing`` are valid, else a ValueError that
    calls them by ``names`` (e.g. the command line's ``--label-smoothing``)."""
    if not 0.0 <= label_smoothing < 1.0:
        raise ValueError(f"{names[0]} must be in [0, 1), got {label_smoothing}")
    if smoothing not in SMOOTHINGS:
        raise ValueError(f"{names[1]} must be one of {SMOOTHINGS}, got {smoothing!r}")
    return smoothing


def _bottle(x: Tensor) -> Tensor:
    """(..., V) -> (N, V), with N the product of the leading dims."""
    return x.reshape(-1, x.size(-1))


def _xlogx(p: float) -> float:
    return p * math.log(p) if p > 0 else 0.0


def smoothed_target_entropy(epsilon: float, num_classes: int, smoothing: str) -> float:
    """Entropy ``H(q)`` in nats of one row of the smoothed target distribution."""
    eps, k = epsilon, num_classes
    if smoothing == "uniform":
        return -(_xlogx(1 - eps + eps / k) + (k - 1) * _xlogx(eps / k))
    n_others = k - 1 if smoothing == "others" else k - 2
    return -(_xlogx(1 - eps) + n_others * _xlogx(eps / n_others))


def check_args(num_classes: int, spec: LossSpec) -> None:
    """Raise ValueError naming the argument that makes the smoothing ill-defined."""
    epsilon, smoothing, ignore_index = spec.epsilon, spec.smoothing, spec.ignore_index
    if not 0.0 <= epsilon < 1.0:
        raise ValueError(f"epsilon must be in [0, 1), got {epsilon}")
    if smoothing not in SMOOTHINGS:
        raise ValueError(f"smoothing must be one of {SMOOTHINGS}, got {smoothing!r}")
    min_classes = {"uniform": 1, "others": 2, "others_no_pad": 3}[smoothing]
    if num_classes < min_classes:
        raise ValueError(f"smoothing={smoothing!r} needs at least {min_classes} classes, got {num_classes}")
    if smoothing == "others_no_pad" and (ignore_index is None or not 0 <= ignore_index < num_classes):
        raise ValueError(
            "smoothing='others_no_pad' zeroes the padding column, so ignore_index must be a "
            f"class index in [0, {num_classes}), got {ignore_index}"
        )


def check_target(target: Tensor, num_classes: int, keep: Tensor) -> None:
    """Raise ValueError if a non-ignored target id lies outside [0, num_classes)."""
    kept = target[keep]
    if kept.numel() and (kept.min() < 0 or kept.max() >= num_classes):
        bad = kept[(kept < 0) | (kept >= num_classes)][0].item()
        raise ValueError(f"target id {bad} is outside the vocabulary [0, {num_classes})")


def token_terms(
    input: Tensor, target: Tensor, spec: LossSpec, log_probs: bool = False
) -> tuple[Tensor, Tensor, Tensor]:
    """Per-token smoothed loss and NLL, zero at ignored positions.

    Args:
        input (Tensor): logits (or log-probabilities if ``log_probs``), shape (..., K).
        target (Tensor): gold ids, shape (...).
        spec (LossSpec): epsilon, ignore_index and smoothing (its reduction is not used here).
        log_probs (bool): ``input`` already holds log-probabilities.
    Returns:
        (loss, nll, keep): three tensors of shape (N,), N = target.numel(); ``keep`` is the
        boolean mask of non-ignored positions.
    """
    if input.shape[:-1] != target.shape:
        raise ValueError(
            f"input of shape {tuple(input.shape)} needs a target of shape "
            f"{tuple(input.shape[:-1])}, got {tuple(target.shape)}"
        )
    k = input.size(-1)
    check_args(k, spec)
    epsilon, ignore_index = spec.epsilon, spec.ignore_index
    x = _bottle(input)  # (N, K)
    if x.dtype in (torch.float16, torch.bfloat16):
        x = x.float()
    tgt = target.reshape(-1)  # (N,)
    keep = tgt.ne(ignore_index) if ignore_index is not None else torch.ones_like(tgt, dtype=torch.bool)
    check_target(tgt, k, keep)
    safe_tgt = tgt.masked_fill(~keep, 0)
    lse = x.logsumexp(-1) if not log_probs else x.new_zeros(x.size(0))  # (N,)
    lp_gold = x.gather(-1, safe_tgt[:, None]).squeeze(-1) - lse
    sum_lp = x.sum(-1) - k * lse if epsilon > 0 else None
    lp_pad = x[:, ignore_index] - lse if epsilon > 0 and spec.smoothing == "others_no_pad" else None
    loss, nll = terms_from_row_stats(lp_gold, sum_lp, lp_pad, keep, k, spec)
    return loss, nll, keep


def terms_from_row_stats(
    lp_gold: Tensor, sum_lp: Tensor | None, lp_pad: Tensor | None, keep: Tensor, k: int, spec: LossSpec
) -> tuple[Tensor, Tensor]:
    """Per-token (loss, nll), zero where ``keep`` is False, from three numbers per row: the
    gold log-prob, the sum of all log-probs and the pad log-prob (the last two unused when
    ``spec.epsilon`` is 0, the pad one unless ``others_no_pad``). All tensors have shape (N,)."""
    epsilon, smoothing = spec.epsilon, spec.smoothing
    nll = -lp_gold
    if epsilon == 0.0:
        loss = nll
    elif smoothing == "uniform":
        loss = (1 - epsilon) * nll - (epsilon / k) * sum_lp
    elif smoothing == "others":
        loss = (1 - epsilon) * nll - (epsilon / (k - 1)) * (sum_lp - lp_gold)
    else:
        loss = (1 - epsilon) * nll - (epsilon / (k - 2)) * (sum_lp - lp_gold - lp_pad)
    zero = loss.new_zeros(())
    return torch.where(keep, loss, zero), torch.where(keep, nll, zero)


def loss_output(loss: Tensor, nll: Tensor, keep: Tensor, k: int, spec: LossSpec, shape: torch.Size) -> LossOutput:
    """Add the KL form (``loss - H(q)`` on kept tokens) and reduce all three terms with
    ``spec.reduction``; ``shape`` is the target's."""
    ntokens = int(keep.sum())
    h = smoothed_target_entropy(spec.epsilon, k, spec.smoothing) if spec.epsilon > 0 else 0.0
    kl = loss - h * keep.to(loss.dtype)
    reduction = spec.reduction
    return LossOutput(
        loss=reduce_terms(loss, reduction, shape, ntokens),
        kl=reduce_terms(kl, reduction, shape, ntokens),
        nll=reduce_terms(nll, reduction, shape, ntokens),
        ntokens=ntokens,
    )


def reduce_terms(terms: Tensor, reduction: str, target_shape: torch.Size, ntokens: int) -> Tensor:
    """Reduce per-token terms of shape (N,): ``none`` keeps the target's shape, ``sum``,
    ``mean`` divides by the non-pad token count (0 for an all-pad batch), ``sentence`` sums
    over the last target dim."""
    if reduction == "none":
        return terms.view(target_shape)
    if reduction == "sum":
        return terms.sum()
    if reduction == "mean":
        return terms.sum() / max(ntokens, 1)
    if reduction == "sentence":
        return terms.view(target_shape).sum(-1)
    raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")


def label_smoothed_cross_entropy(
    input: Tensor, target: Tensor, spec: LossSpec | None = None, log_probs: bool = False
) -> LossOutput:
    """Label-smoothed cross-entropy, its KL form and the plain NLL.

    Args:
        input (Tensor): logits, or log-probabilities if ``log_probs``; shape (..., K), e.g.
            decoder outputs (B, T, V).
        target (Tensor): gold ids, shape (...); values in [0, K) except ``spec.ignore_index``.
        spec (LossSpec, optional): epsilon, ignore_index, smoothing and reduction. Default:
            ``LossSpec()``: epsilon 0.1, no ignore_index, ``others``, ``sum``
        log_probs (bool): ``input`` holds log-probabilities already. Default: False
    Returns:
        LossOutput(loss, kl, nll, ntokens).

    Example::

        >>> logits = torch.tensor([[0.1, 0.2, 0.3, 0.4], [0.1, 0.1, 0.1, 0.1]])
        >>> spec = LossSpec(0.1, smoothing="uniform", reduction="mean")
        >>> out = label_smoothed_cross_entropy(logits, torch.tensor([2, 3]), spec)
        >>> round(out.loss.item(), 6)   # == F.cross_entropy(..., label_smoothing=0.1)
        1.366915
    """
    spec = LossSpec() if spec is None else spec
    loss, nll, keep = token_terms(input, target, spec, log_probs)
    return loss_output(loss, nll, keep, input.size(-1), spec, target.shape)


def label_smoothed_nll_loss(
    lprobs: Tensor,
    target: Tensor,
    epsilon: float,
    ignore_index: int | None = None,
    reduce: bool = True,
) -> tuple[Tensor, Tensor]:
    """fairseq's ``label_smoothed_nll_loss``: same arguments, values and shapes.

    ``lprobs`` (..., K) are log-probabilities; ``target`` is (...) or (..., 1). The smoothed
    loss puts 1-eps on gold and eps/(K-1) on every other class (``smoothing="others"``).
    Returns ``(loss, nll_loss)``: scalars (sums) if ``reduce``, else per-token tensors of
    shape (..., 1) when ``ignore_index`` is given and (...) when it is not, as in fairseq.
    Unlike fairseq, an ``ignore_index`` outside [0, K) (e.g. -100) works.
    """
    if target.dim() == lprobs.dim() - 1:
        target = target.unsqueeze(-1)
    if target.shape[-1] != 1:
        raise ValueError(f"target must have shape (...) or (..., 1), got {tuple(target.shape)}")
    loss, nll, _ = token_terms(lprobs, target.squeeze(-1), LossSpec(epsilon, ignore_index), log_probs=True)
    if reduce:
        return loss.sum(), nll.sum()
    shape = target.shape if ignore_index is not None else target.shape[:-1]
    return loss.view(shape), nll.view(shape)
