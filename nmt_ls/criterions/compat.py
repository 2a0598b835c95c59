"""The label-smoothing classes people already import, with their known bugs fixed.

Each keeps its original name, arguments and smoothing distribution; none builds an (N, V)
target (except :func:`smooth_one_hot`, whose job is to return one).

* :class:`LabelSmoothingCrossEntropy` (fastai/timm style, uniform over all K classes):
  the smoothing term now skips ``ignore_index`` positions too (it used to average them in,
  as pytorch#73205 did for ``F.cross_entropy``).
* :class:`LabelSmoothingLoss` (the common ``classes, smoothing, dim`` snippet): eps/(K-1)
  on the non-gold classes, mean over rows; optional ``ignore_index``.
* :class:`LabelSmoothingKLDivLoss` (Annotated Transformer / OpenNMT-py): KL divergence
  summed, eps/(K-2) off gold, pad column and pad rows zero; accepts decoder outputs of
  any shape (B, T, V) via ``_bottle``.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from nmt_ls.criterions.functional import LossSpec, label_smoothed_cross_entropy


class LabelSmoothingCrossEntropy(nn.Module):
    """Cross-entropy of logits against (1-eps)*one_hot + eps/K.

    Args:
        eps (float): smoothing mass. Default: 0.1
        reduction (str): ``mean`` (over non-ignored tokens), ``sum`` or ``none``.
        ignore_index (int): target id to skip in both terms. Default: -100
    """

    def __init__(self, eps: float = 0.1, reduction: str = "mean", ignore_index: int = -100):
        super().__init__()
        self.eps, self.reduction, self.ignore_index = eps, reduction, ignore_index

    def forward(self, output: Tensor, target: Tensor) -> Tensor:
        spec = LossSpec(self.eps, self.ignore_index, "uniform", self.reduction)
        return label_smoothed_cross_entropy(output, target, spec).loss


class LabelSmoothingLoss(nn.Module):
    """Mean cross-entropy of logits against 1-eps on gold and eps/(classes-1) elsewhere.

    Args:
        classes (int): number of classes K; must match ``pred.size(dim)``.
        smoothing (float): smoothing mass. Default: 0.0
        dim (int): class dimension of ``pred``. Default: -1
        ignore_index (int, optional): target id to skip (mean over the rest). Default: None
    """

    def __init__(self, classes: int, smoothing: float = 0.0, dim: int = -1, ignore_index=None):
        super().__init__()
        self.classes, self.smoothing, self.dim, self.ignore_index = classes, smoothing, dim, ignore_index

    def forward(self, pred: Tensor, target: Tensor) -> Tensor:
        pred = pred.movedim(self.dim, -1)
        if pred.size(-1) != self.classes:
            raise ValueError(f"pred has {pred.size(-1)} classes along dim {self.dim}, expected {self.classes}")
        spec = LossSpec(self.smoothing, self.ignore_index, "others", "mean")
        return label_smoothed_cross_entropy(pred, target, spec).loss


class LabelSmoothingKLDivLoss(nn.Module):
    """KL(q || p) summed over non-pad tokens, q = 1-eps on gold, eps/(size-2) elsewhere,
    0 on the padding column; ``x`` holds log-probabilities of shape (..., size).

    Args:
        size (int): vocabulary size K.
        padding_idx (int): pad id: its column gets no mass and its rows no loss.
        smoothing (float): smoothing mass. Default: 0.0
    """

    def __init__(self, size: int, padding_idx: int, smoothing: float = 0.0):
        super().__init__()
        self.size, self.padding_idx, self.smoothing = size, padding_idx, smoothing

    def forward(self, x: Tensor, target: Tensor) -> Tensor:
        if x.size(-1) != self.size:
            raise ValueError(f"x has {x.size(-1)} classes, expected size={self.size}")
        spec = LossSpec(self.smoothing, self.padding_idx, "others_no_pad", "sum")
        return label_smoothed_cross_entropy(x, target, spec, log_probs=True).kl


LabelSmoothing = LabelSmoothingKLDivLoss  # the Annotated Transformer's name


def smooth_one_hot(labels: Tensor, epsilon: float, num_classes: int | None = None) -> Tensor:
    """``(1 - eps) * y + eps / K`` as in TensorFlow's ``label_smoothing``.

    Args:
        labels (Tensor): integer ids of shape (...) (then ``num_classes`` is required) or a
            one-hot / soft float target of shape (..., K).
        epsilon (float): smoothing mass in [0, 1].
    Returns:
        Tensor of shape (..., K), float.
    """
    if not 0.0 <= epsilon <= 1.0:
        raise ValueError(f"epsilon must be in [0, 1], got {epsilon}")
    if labels.is_floating_point():
        y = labels
    else:
        if num_classes is None:
            raise ValueError("integer labels need num_classes")
        y = nn.functional.one_hot(labels, num_classes).to(torch.get_default_dtype())
    return (1.0 - epsilon) * y + epsilon / y.size(-1)
