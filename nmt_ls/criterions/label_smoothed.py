"""Registered criteria with fairseq's calling convention.

``forward(model, sample, reduce=True)`` runs the model on ``sample["net_input"]`` and returns
``(loss, sample_size, logging_output)``; ``reduce_metrics`` turns a list of logging outputs
(from several batches or several workers; every entry is a sum) into per-token numbers.
Losses are in nats; ``ppl = exp(nll_loss)``, which equals fairseq's ``2 ** nll_loss`` in bits.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from nmt_ls.criterions import register_criterion
from nmt_ls.criterions.functional import LossOutput, LossSpec, check_smoothing, label_smoothed_cross_entropy
from nmt_ls.criterions.fused import chunked_linear_cross_entropy, fused_label_smoothed_cross_entropy

# How the loss is computed; the same values and gradients each way (see the criterion's docstring)
IMPLEMENTATIONS = ("reference", "fused", "chunked")


def safe_exp(x: float) -> float:
    """``exp(x)``, inf instead of OverflowError."""
    return math.exp(x) if x < 700 else float("inf")


@register_criterion("label_smoothed_cross_entropy")
class LabelSmoothedCrossEntropyCriterion(nn.Module):
    """Smoothed cross-entropy summed over non-pad target tokens (fairseq semantics).

    Args:
        pad_id (int): target id ignored everywhere (the tokenizer's pad id).
        label_smoothing (float): epsilon in [0, 1). Default: 0.0
        smoothing (str): ``others`` (fairseq), ``uniform`` or ``others_no_pad``. Default: the
            class's ``default_smoothing``, ``others`` here
        ignore_prefix_size (int): leading target positions left out (e.g. language tags).
        report_accuracy (bool): add ``n_correct``/``total`` to the logging output.
        sentence_avg (bool): normalise by sentences instead of target tokens.
        implementation (str): how the loss is computed, with the same values and gradients:
            ``reference`` (from the log-softmax), ``fused`` (one pass over the logits: one
            logits-sized buffer instead of about three) or ``chunked`` (from the decoder
            features, chunk by chunk: no logits at all; the model is called with
            ``features_only=True`` and must have an ``output_weight``).
    """

    default_smoothing = "others"

    def __init__(
        self,
        pad_id: int,
        label_smoothing: float = 0.0,
        smoothing: str | None = None,
        ignore_prefix_size: int = 0,
        report_accuracy: bool = False,
        sentence_avg: bool = False,
        implementation: str = "reference",
    ):
        super().__init__()
        self.smoothing = check_smoothing(label_smoothing, smoothing or self.default_smoothing)
        self.pad_id = pad_id
        self.eps = label_smoothing
        self.ignore_prefix_size = ignore_prefix_size
        self.report_accuracy = report_accuracy
        self.sentence_avg = sentence_avg
        if implementation not in IMPLEMENTATIONS:
            raise ValueError(f"implementation must be one of {', '.join(IMPLEMENTATIONS)}, got {implementation!r}")
        self.implementation = implementation

    def compute(self, logits: Tensor, target: Tensor, reduction: str = "sum") -> LossOutput:
        """Loss terms for decoder outputs ``logits`` (B, T, V) against ``target`` (B, T)."""
        if self.ignore_prefix_size > 0:
            logits = logits[..., self.ignore_prefix_size :, :]
            target = target[..., self.ignore_prefix_size :]
        loss_fn = fused_label_smoothed_cross_entropy if self.implementation == "fused" else label_smoothed_cross_entropy
        return loss_fn(logits, target, LossSpec(self.eps, self.pad_id, self.smoothing, reduction))

    def compute_from_features(
        self, features: Tensor, weight: Tensor, target: Tensor, reduction: str = "sum"
    ) -> LossOutput:
        """Loss terms from decoder features (B, T, D) and the output projection (V, D),
        chunk by chunk, without materialising the (B, T, V) logits."""
        if self.ignore_prefix_size > 0:
            features = features[..., self.ignore_prefix_size :, :]
            target = target[..., self.ignore_prefix_size :]
        spec = LossSpec(self.eps, self.pad_id, self.smoothing, reduction)
        return chunked_linear_cross_entropy(features, weight, target, spec)

    def training_loss(self, out: LossOutput) -> Tensor:
        """The term to backpropagate."""
        return out.loss

    def sample_size(self, sample: dict) -> int:
        """The sample's share of the loss's denominator: its target tokens that the loss counts,
        or its sentences with ``sentence_avg``. Known before the forward pass, so that a
        training step can scale the loss by the whole update's (all workers') size."""
        target = sample["target"]  # (B, T)
        if self.sentence_avg:
            return int(sample.get("nsentences", target.size(0)))
        return int(target[..., self.ignore_prefix_size :].ne(self.pad_id).sum())

    def forward(self, model: nn.Module, sample: dict, reduce: bool = True):
        """Run ``model`` on ``sample["net_input"]``; returns ``(loss, sample_size, logging_output)``:
        the loss to backpropagate (summed; per token with ``reduce=False``), its denominator, and
        sums for :func:`reduce_metrics`. Under autocast the model runs in the autocast precision
        and the loss in the precision of the model's outputs."""
        target = sample["target"]  # (B, T)
        logits, out = self._loss_terms(model, sample["net_input"], target, "sum" if reduce else "none")
        loss = self.training_loss(out)
        nsentences = sample.get("nsentences", target.size(0))
        logging_output = {
            "loss": float(loss.detach().sum()),
            "nll_loss": float(out.nll.detach().sum()),
            "kl": float(out.kl.detach().sum()),
            "ntokens": out.ntokens,
            "nsentences": nsentences,
            "sample_size": nsentences if self.sentence_avg else out.ntokens,
        }
        if self.report_accuracy and logits is not None:
            n_correct, total = self.accuracy(logits.detach(), target)
            logging_output.update(n_correct=n_correct, total=total)
        return loss, logging_output["sample_size"], logging_output

    def _loss_terms(self, model: nn.Module, net_input: dict, target: Tensor, reduction: str):
        """(logits or None, LossOutput): ``chunked`` asks the model for its decoder features and
        projects them chunk by chunk; the others take its logits."""
        if self.implementation == "chunked":
            features = model(**net_input, features_only=True)  # (B, T, D)
            weight = getattr(model, "module", model).output_weight  # (V, D); DDP keeps the model as .module
            with torch.autocast(target.device.type, enabled=False):
                return None, self.compute_from_features(features, weight, target, reduction)
        logits = model(**net_input)  # (B, T, V)
        with torch.autocast(target.device.type, enabled=False):
            return logits, self.compute(logits, target, reduction)

    def accuracy(self, logits: Tensor, target: Tensor) -> tuple[int, int]:
        """(correct argmax predictions, non-pad tokens)."""
        if self.ignore_prefix_size > 0:
            logits = logits[..., self.ignore_prefix_size :, :]
            target = target[..., self.ignore_prefix_size :]
        keep = target.ne(self.pad_id)
        n_correct = logits.argmax(-1).eq(target).logical_and(keep).sum()
        return int(n_correct), int(keep.sum())

    @staticmethod
    def reduce_metrics(logging_outputs: list[dict]) -> dict:
        return reduce_metrics(logging_outputs)

    @staticmethod
    def logging_outputs_can_be_summed() -> bool:
        """Every logging value is a sum, so workers' outputs reduce by addition."""
        return True


@register_criterion("label_smoothed_kl")
class LabelSmoothedKLCriterion(LabelSmoothedCrossEntropyCriterion):
    """KL(q || p) summed over non-pad tokens: the smoothed CE minus the entropy of q.

    Same gradient as the cross-entropy form; the reported loss is 0 for a model that predicts
    q exactly. Defaults to OpenNMT-py/JoeyNMT smoothing (``others_no_pad``).
    """

    default_smoothing = "others_no_pad"

    def training_loss(self, out: LossOutput) -> Tensor:
        return out.kl


def reduce_metrics(logging_outputs: list[dict]) -> dict:
    """Sum logging outputs (batches, workers) and normalise.

    Returns ``loss`` (per ``sample_size`` unit), ``nll_loss`` and ``kl`` per target token,
    ``ppl = exp(nll_loss)`` (never of the smoothed loss), sums of the counts, and
    ``accuracy`` in percent when ``n_correct`` was logged.
    """
    keys = {k for log in logging_outputs for k in log}
    total = {k: sum(float(log.get(k, 0)) for log in logging_outputs) for k in keys}
    ntokens = total.get("ntokens", 0.0)
    sample_size = total.get("sample_size", ntokens)
    nll_per_token = total.get("nll_loss", 0.0) / ntokens if ntokens else 0.0
    metrics = {
        "loss": total.get("loss", 0.0) / sample_size if sample_size else 0.0,
        "nll_loss": nll_per_token,
        "ppl": safe_exp(nll_per_token),
        "ntokens": ntokens,
        "nsentences": total.get("nsentences", 0.0),
        "sample_size": sample_size,
    }
    if "kl" in total:
        metrics["kl"] = total["kl"] / ntokens if ntokens else 0.0
    if total.get("total"):
        metrics["accuracy"] = 100.0 * total["n_correct"] / total["total"]
    return metrics


__all__ = [
    "LabelSmoothedCrossEntropyCriterion",
    "LabelSmoothedKLCriterion",
    "reduce_metrics",
    "safe_exp",
]
