"""Token predictions under teacher forcing: NLL, the mean probability of the gold token and the
expected calibration error (ECE), as sums that add up across batches.

    stats = teacher_forced_stats(model, loss_batches(pairs, tok, max_tokens), tok.pad_id)
    ppl, ece = math.exp(stats.nll_per_token), expected_calibration_error(stats)
    # or, batch by batch: total = total + token_stats(lprobs, tgt, pad_id)

A token's confidence is the probability of its argmax token, and the prediction is correct when
that token is the gold one (a tie goes to the lowest id, as ``Tensor.max`` picks). The confidences
fall into ``n_bins`` bins of equal width, bin m of M holding (m/M, (m+1)/M] (bin 0 also holds 0),
as in Guo et al. 2017 "On Calibration of Modern Neural Networks" and Kumar & Sarawagi 2019
"Calibration of Encoder Decoder Models for Neural Machine Translation" (15 bins in both), and
ECE = sum over bins of (n_bin / N) * |accuracy_bin - confidence_bin|. Müller et al. 2019 ("When
Does Label Smoothing Help?") measure how label smoothing moves it. Pad positions count nowhere.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from nmt_ls.batching import Batch
from nmt_ls.build import to_sample

N_BINS = 15  # Guo et al. 2017; Kumar & Sarawagi 2019


@dataclass(frozen=True)
class TokenStats:
    """Sums over the tokens of some batches; ``a + b`` covers the tokens of both.

    Attributes:
        bin_count (Tensor): tokens per confidence bin, float64 on the CPU, shape (M,).
        bin_conf_sum (Tensor): their confidences summed, shape (M,).
        bin_correct_sum (Tensor): their correct predictions counted, shape (M,).
        nll_sum (float): -log p(gold) summed over the tokens.
        gold_prob_sum (float): p(gold) summed over the tokens.
    """

    bin_count: Tensor
    bin_conf_sum: Tensor
    bin_correct_sum: Tensor
    nll_sum: float
    gold_prob_sum: float

    @classmethod
    def zeros(cls, n_bins: int = N_BINS) -> TokenStats:
        """The sums of no tokens, to add batches to."""
        check_bins(n_bins)
        zero = torch.zeros(n_bins, dtype=torch.float64)
        return cls(zero, zero, zero, 0.0, 0.0)

    def __add__(self, other: TokenStats) -> TokenStats:
        if len(self.bin_count) != len(other.bin_count):
            raise ValueError(f"cannot add token stats of {len(self.bin_count)} and {len(other.bin_count)} bins")
        return TokenStats(
            self.bin_count + other.bin_count,
            self.bin_conf_sum + other.bin_conf_sum,
            self.bin_correct_sum + other.bin_correct_sum,
            self.nll_sum + other.nll_sum,
            self.gold_prob_sum + other.gold_prob_sum,
        )

    @property
    def ntokens(self) -> int:
        return int(self.bin_count.sum())

    @property
    def nll_per_token(self) -> float:
        return self.nll_sum / self._checked_ntokens()

    @property
    def mean_gold_prob(self) -> float:
        return self.gold_prob_sum / self._checked_ntokens()

    @property
    def accuracy(self) -> float:
        """Correct predictions in percent, as the criterion's ``accuracy``."""
        return 100.0 * float(self.bin_correct_sum.sum()) / self._checked_ntokens()

    def _checked_ntokens(self) -> int:
        if self.ntokens == 0:
            raise ValueError("no tokens: the stats cover only padding or nothing")
        return self.ntokens


def check_bins(n_bins: int) -> None:
    if not (isinstance(n_bins, int) and n_bins >= 1):
        raise ValueError(f"n_bins must be an integer >= 1, got {n_bins!r}")


def token_stats(lprobs: Tensor, tgt: Tensor, pad_id: int, n_bins: int = N_BINS) -> TokenStats:
    """The :class:`TokenStats` of one batch of predictions.

    Args:
        lprobs (Tensor): log-probabilities, shape (N, V) or (B, T, V).
        tgt (Tensor): gold ids, shape (N,) or (B, T); ``pad_id`` positions are ignored.
        pad_id (int): the pad (ignore) index; it need not be a vocabulary id (e.g. -100).
        n_bins (int): confidence bins of equal width over [0, 1]. Default: 15
    """
    check_bins(n_bins)
    if lprobs.dim() < 2 or lprobs.shape[:-1] != tgt.shape:
        shapes = f"{tuple(lprobs.shape)} and {tuple(tgt.shape)}"
        raise ValueError(f"lprobs must be (N, V) or (B, T, V) and tgt (N,) or (B, T), got {shapes}")
    keep = tgt.ne(pad_id)  # (...)
    top_lprob, top_id = lprobs.max(dim=-1)  # (...), (...): the max over V, without copying the rows
    gold_lprob = lprobs.gather(-1, tgt.masked_fill(~keep, 0).unsqueeze(-1)).squeeze(-1)  # (...)
    conf = top_lprob[keep].double().exp()  # (N,)
    correct = top_id[keep].eq(tgt[keep]).double()  # (N,)
    gold_lprob = gold_lprob[keep].double()  # (N,)
    edges = torch.linspace(0, 1, n_bins + 1, dtype=torch.float64, device=conf.device)
    bin_id = torch.bucketize(conf, edges[1:-1])  # bin m holds (edges[m], edges[m + 1]]
    return TokenStats(
        torch.bincount(bin_id, minlength=n_bins).double().cpu(),
        torch.bincount(bin_id, weights=conf, minlength=n_bins).cpu(),
        torch.bincount(bin_id, weights=correct, minlength=n_bins).cpu(),
        -gold_lprob.sum().item(),
        gold_lprob.exp().sum().item(),
    )


def expected_calibration_error(stats: TokenStats) -> float:
    """ECE = sum over bins of (n_bin / N) * |accuracy_bin - confidence_bin|, in [0, 1]; each
    term is |correct_sum - conf_sum| / N, so an empty bin adds nothing."""
    gaps = (stats.bin_correct_sum - stats.bin_conf_sum).abs()  # (M,): n_bin * |acc_bin - conf_bin|
    return float(gaps.sum()) / stats._checked_ntokens()


@torch.no_grad()
def teacher_forced_stats(model: nn.Module, batches: Iterable[Batch], pad_id: int, n_bins: int = N_BINS) -> TokenStats:
    """The :class:`TokenStats` of ``model`` (in eval mode; its mode is restored) over
    ``batches`` under teacher forcing, on the model's device: its forward on each batch's
    sample (:func:`nmt_ls.build.to_sample`), log_softmax in float32."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    total = TokenStats.zeros(n_bins)
    for batch in batches:
        sample = to_sample(batch, device)
        logits = model(**sample["net_input"])  # (B, T, V)
        total = total + token_stats(F.log_softmax(logits.float(), dim=-1), sample["target"], pad_id, n_bins)
    model.train(was_training)
    return total
