"""fairseq criteria computed by nmt_ls's label-smoothed cross-entropy.

Both follow fairseq 0.12's ``label_smoothed_cross_entropy`` wherever it defines something:
``forward(model, sample, reduce=True)`` scores ``model.get_normalized_probs(net_output,
log_probs=True)`` against ``model.get_targets(sample, net_output)``, pad is
``task.target_dictionary.pad()``, ``--ignore-prefix-size`` drops leading target positions,
``sample_size`` is ``sample["ntokens"]`` (``nsentences`` under ``--sentence-avg``), and the
logged ``loss``, ``nll_loss``, ``ppl`` and ``accuracy`` are fairseq's: bits per ``sample_size``
unit, bits per target token, ``2 ** nll_loss`` and percent. With ``--smoothing others`` the loss
is fairseq's own. Added: ``--smoothing`` (which classes get the mass eps), a ``kl`` column (the
loss minus the entropy of the smoothed target, bits per token) and ``--fused``, which feeds the
decoder's logits ``net_output[0]`` to
:func:`~nmt_ls.criterions.fused.fused_label_smoothed_cross_entropy` instead of taking
``get_normalized_probs`` (same values; one logits-sized buffer instead of log-probs plus their
gradient; not for an adaptive softmax).
"""

# No ``from __future__ import annotations``: fairseq builds its argparse options from the
# config dataclasses' field types, which must stay types, not strings.
import math
from dataclasses import dataclass, field

from fairseq import utils
from fairseq.criterions import FairseqCriterion, register_criterion
from fairseq.dataclass import ChoiceEnum, FairseqDataclass
from fairseq.logging import metrics
from omegaconf import II
from torch import Tensor

from nmt_ls.criterions.functional import (
    SMOOTHINGS,
    LossOutput,
    LossSpec,
    check_smoothing,
    label_smoothed_cross_entropy,
)
from nmt_ls.criterions.fused import fused_label_smoothed_cross_entropy

SMOOTHING_CHOICES = ChoiceEnum(list(SMOOTHINGS))
SMOOTHING_HELP = (
    "where the mass eps goes besides 1-eps on the gold token: others = eps/(V-1) on every other "
    "token (fairseq), uniform = eps/V on every token (PyTorch), others_no_pad = eps/(V-2) on "
    "every other token but pad (OpenNMT-py)"
)


@dataclass
class NmtLsLabelSmoothedConfig(FairseqDataclass):
    label_smoothing: float = field(default=0.0, metadata={"help": "smoothing mass eps in [0, 1); 0: plain NLL"})
    smoothing: SMOOTHING_CHOICES = field(default="others", metadata={"help": SMOOTHING_HELP})
    report_accuracy: bool = field(default=False, metadata={"help": "log the argmax accuracy on non-pad target tokens"})
    ignore_prefix_size: int = field(default=0, metadata={"help": "leave out the first N target positions (e.g. tags)"})
    sentence_avg: bool = II("optimization.sentence_avg")
    fused: bool = field(
        default=False,
        metadata={
            "help": "compute from the decoder's logits (net_output[0]) with nmt_ls's fused kernel "
            "instead of model.get_normalized_probs: same values, less memory; no adaptive softmax"
        },
    )


@dataclass
class NmtLsLabelSmoothedKLConfig(NmtLsLabelSmoothedConfig):
    smoothing: SMOOTHING_CHOICES = field(default="others_no_pad", metadata={"help": SMOOTHING_HELP})


@register_criterion("nmt_ls_label_smoothed", dataclass=NmtLsLabelSmoothedConfig)
class NmtLsLabelSmoothedCriterion(FairseqCriterion):
    """Label-smoothed cross-entropy summed over non-pad target tokens.

    Built as fairseq builds a criterion whose ``__init__`` names ``task`` and ``cfg``
    (``FairseqCriterion.build_criterion``, as fairseq's own ``CtcCriterion``): ``cfg`` is the
    registered config, whose fields are the options.

    Args:
        task (FairseqTask): gives the pad id, ``task.target_dictionary.pad()``.
        cfg (NmtLsLabelSmoothedConfig): ``sentence_avg`` (``sample_size`` is the number of
            sentences, not of tokens), ``label_smoothing`` (eps in [0, 1)), ``smoothing``
            (``others``, fairseq's, ``uniform`` or ``others_no_pad``; None: the class's
            ``default_smoothing``), ``ignore_prefix_size`` (leading target positions to leave
            out), ``report_accuracy`` (log ``n_correct``/``total`` and ``accuracy``) and
            ``fused`` (score ``net_output[0]``, the logits, with the fused kernel).
    """

    default_smoothing = "others"

    def __init__(self, task, cfg: NmtLsLabelSmoothedConfig):
        super().__init__(task)
        # fairseq hands over a ChoiceEnum member (its config's default when not on the command line)
        smoothing = self.default_smoothing if cfg.smoothing is None else str(cfg.smoothing)
        check_smoothing(cfg.label_smoothing, smoothing, names=("--label-smoothing", "--smoothing"))
        if cfg.ignore_prefix_size < 0:
            raise ValueError(f"--ignore-prefix-size must be >= 0, got {cfg.ignore_prefix_size}")
        self.sentence_avg = cfg.sentence_avg
        self.eps = cfg.label_smoothing
        self.smoothing = smoothing
        self.ignore_prefix_size = cfg.ignore_prefix_size
        self.report_accuracy = cfg.report_accuracy
        self.fused = cfg.fused

    def forward(self, model, sample: dict, reduce: bool = True):
        """Loss of ``model`` on ``sample``.

        Returns:
            (loss, sample_size, logging_output): ``loss`` is the sum over non-pad tokens if
            ``reduce``, else per-token terms of shape (B, T - ignore_prefix_size), 0 at pad.
        """
        net_output = model(**sample["net_input"])
        scores, tgt = self.scores_and_target(model, net_output, sample)  # (B, T', V), (B, T')
        out = self.loss_terms(scores, tgt, "sum" if reduce else "none")
        loss = self.training_loss(out)
        nsentences = sample["target"].size(0)
        sample_size = nsentences if self.sentence_avg else sample["ntokens"]
        logging_output = {
            "loss": loss.detach().sum(),
            "nll_loss": out.nll.detach().sum(),
            "kl": out.kl.detach().sum(),
            "ntokens": sample["ntokens"],
            "nsentences": nsentences,
            "sample_size": sample_size,
        }
        if self.report_accuracy:
            keep = tgt.ne(self.padding_idx)  # (B, T')
            n_correct = scores.argmax(-1).eq(tgt).logical_and(keep).sum()
            logging_output.update(n_correct=utils.item(n_correct), total=utils.item(keep.sum()))
        return loss, sample_size, logging_output

    def scores_and_target(self, model, net_output, sample: dict) -> tuple[Tensor, Tensor]:
        """Log-probabilities (logits if ``fused``) (B, T', V) and gold ids (B, T'), without the
        first ``ignore_prefix_size`` positions."""
        if self.fused:
            if getattr(getattr(model, "decoder", None), "adaptive_softmax", None) is not None:
                raise ValueError("--fused needs plain logits in net_output[0]; this decoder has an adaptive softmax")
            scores = net_output[0]
        else:
            scores = model.get_normalized_probs(net_output, log_probs=True)
        tgt = model.get_targets(sample, net_output)
        if self.ignore_prefix_size > 0:
            scores = scores[:, self.ignore_prefix_size :, :]
            tgt = tgt[:, self.ignore_prefix_size :]
        return scores, tgt

    def loss_terms(self, scores: Tensor, tgt: Tensor, reduction: str) -> LossOutput:
        """nmt_ls's loss, KL and NLL of ``scores`` (B, T', V) against ``tgt`` (B, T')."""
        spec = LossSpec(self.eps, self.padding_idx, self.smoothing, reduction)
        if self.fused:
            return fused_label_smoothed_cross_entropy(scores, tgt, spec)
        return label_smoothed_cross_entropy(scores, tgt, spec, log_probs=True)

    def training_loss(self, out: LossOutput) -> Tensor:
        """The term to backpropagate: the smoothed cross-entropy."""
        return out.loss

    @classmethod
    def reduce_metrics(cls, logging_outputs: list[dict]) -> None:
        """Sum the logging outputs (batches, workers) and log fairseq's base-2 metrics."""
        log_label_smoothed_metrics(logging_outputs)

    @staticmethod
    def logging_outputs_can_be_summed() -> bool:
        """Every logged value is a sum, so workers' outputs reduce by addition."""
        return True


@register_criterion("nmt_ls_label_smoothed_kl", dataclass=NmtLsLabelSmoothedKLConfig)
class NmtLsLabelSmoothedKLCriterion(NmtLsLabelSmoothedCriterion):
    """KL(q || p) summed over non-pad tokens: the smoothed cross-entropy minus the entropy of
    the smoothed target q. Same gradient; a model that predicts q exactly has loss 0.
    Arguments as :class:`NmtLsLabelSmoothedCriterion`; ``smoothing`` defaults to
    ``others_no_pad`` (OpenNMT-py, JoeyNMT)."""

    default_smoothing = "others_no_pad"

    def training_loss(self, out: LossOutput) -> Tensor:
        """The term to backpropagate: the KL form."""
        return out.kl


def log_label_smoothed_metrics(logging_outputs: list[dict]) -> None:
    """Log ``loss`` (bits per ``sample_size`` unit), ``nll_loss`` and ``kl`` (bits per target
    token), ``ppl = 2 ** nll_loss`` and, when counted, ``accuracy`` (percent), weighted by
    ``sample_size``/``ntokens`` across logging steps as fairseq does."""
    total = {
        key: sum(log.get(key, 0) for log in logging_outputs)
        for key in ("loss", "nll_loss", "kl", "ntokens", "sample_size")
    }
    sample_size, ntokens = total["sample_size"], total["ntokens"]
    metrics.log_scalar("loss", _bits_per(total["loss"], sample_size), sample_size, round=3)
    metrics.log_scalar("nll_loss", _bits_per(total["nll_loss"], ntokens), ntokens, round=3)
    metrics.log_scalar("kl", _bits_per(total["kl"], ntokens), ntokens, round=3)
    metrics.log_derived("ppl", lambda meters: utils.get_perplexity(meters["nll_loss"].avg))
    n_total = utils.item(sum(log.get("total", 0) for log in logging_outputs))
    if n_total > 0:
        metrics.log_scalar("total", n_total)
        metrics.log_scalar("n_correct", utils.item(sum(log.get("n_correct", 0) for log in logging_outputs)))
        metrics.log_derived("accuracy", _accuracy)


def _bits_per(nats_sum, count):
    """``nats_sum / count`` in bits; 0 for an empty count (logged with weight 0, so no effect)."""
    return nats_sum / count / math.log(2) if count else 0.0


def _accuracy(meters) -> float:
    n_total = meters["total"].sum
    return round(meters["n_correct"].sum * 100.0 / n_total, 3) if n_total > 0 else float("nan")
