"""Token stats under teacher forcing: ECE on a hand-computed example, padding, accumulation,
properties, and the NLL of a model's forward against F.cross_entropy."""

import math
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from nmt_ls.binarize import EncodedPairs
from nmt_ls.build import loss_batches
from nmt_ls.calibration import TokenStats, expected_calibration_error, teacher_forced_stats, token_stats
from nmt_ls.model import build_model

# Five tokens over V=3: (probabilities, gold). Confidences .9 .7 .45 .4 .6; correct: 1st, 3rd, 5th.
PROBS = [[0.9, 0.05, 0.05], [0.7, 0.2, 0.1], [0.45, 0.35, 0.2], [0.4, 0.35, 0.25], [0.6, 0.3, 0.1]]
GOLD = [0, 1, 0, 2, 0]
IGNORE = -100


def example():
    return torch.tensor(PROBS, dtype=torch.float64).log(), torch.tensor(GOLD)  # (5, 3), (5,)


def test_hand_computed_ece_with_three_and_two_bins():
    lprobs, tgt = example()
    three = token_stats(lprobs, tgt, IGNORE, n_bins=3)
    # bins (0, 1/3], (1/3, 2/3], (2/3, 1]: {}, {.45, .4, .6} with 2 correct, {.9, .7} with 1 correct
    assert three.bin_count.tolist() == [0.0, 3.0, 2.0]
    assert three.bin_correct_sum.tolist() == [0.0, 2.0, 1.0]
    # (3/5) |2/3 - 1.45/3| + (2/5) |1/2 - 1.6/2| = (0.55 + 0.6) / 5
    assert expected_calibration_error(three) == pytest.approx(0.23, abs=1e-12)
    two = token_stats(lprobs, tgt, IGNORE, n_bins=2)
    # bins (0, 1/2], (1/2, 1]: {.45, .4} with 1 correct, {.9, .7, .6} with 2 correct: (0.15 + 0.2) / 5
    assert two.bin_count.tolist() == [2.0, 3.0]
    assert expected_calibration_error(two) == pytest.approx(0.07, abs=1e-12)
    assert three.ntokens == 5 and three.accuracy == pytest.approx(60.0)
    assert three.mean_gold_prob == pytest.approx((0.9 + 0.2 + 0.45 + 0.25 + 0.6) / 5, abs=1e-12)
    nll = -(math.log(0.9) + math.log(0.2) + math.log(0.45) + math.log(0.25) + math.log(0.6)) / 5
    assert three.nll_per_token == pytest.approx(nll, rel=1e-12)


def test_default_is_fifteen_bins():
    lprobs, tgt = example()
    stats = token_stats(lprobs[:3], tgt[:3], IGNORE)
    # bins of width 1/15: .45 -> 6, .7 -> 10, .9 -> 13, one token each
    assert len(stats.bin_count) == 15 and torch.nonzero(stats.bin_count).flatten().tolist() == [6, 10, 13]
    assert expected_calibration_error(stats) == pytest.approx((abs(1 - 0.45) + abs(0 - 0.7) + abs(1 - 0.9)) / 3)


def test_padding_is_ignored():
    """A padded (B, T, V) batch, pad rows holding other log-probabilities, gives the stats of
    its unpadded (N, V) rows; with pad_id a vocabulary id (1) that no gold token takes."""
    gen = torch.Generator().manual_seed(0)
    lprobs = torch.randn(2, 4, 6, generator=gen).log_softmax(-1)  # (B, T, V)
    tgt = torch.tensor([[0, 2, 3, 1], [4, 5, 1, 1]])  # (B, T)
    padded = token_stats(lprobs, tgt, pad_id=1)
    keep = tgt.ne(1)
    flat = token_stats(lprobs[keep], tgt[keep], pad_id=1)
    assert padded.ntokens == 5
    for name in ("bin_count", "bin_conf_sum", "bin_correct_sum"):
        assert torch.equal(getattr(padded, name), getattr(flat, name))
    assert (padded.nll_sum, padded.gold_prob_sum) == (flat.nll_sum, flat.gold_prob_sum)


def test_two_batches_add_up_to_one():
    lprobs, tgt = example()
    total = token_stats(lprobs[:2], tgt[:2], IGNORE, 3) + token_stats(lprobs[2:], tgt[2:], IGNORE, 3)
    assert total.bin_count.tolist() == [0.0, 3.0, 2.0]
    assert expected_calibration_error(total) == pytest.approx(0.23, abs=1e-12)
    assert (TokenStats.zeros(3) + total).nll_sum == pytest.approx(token_stats(lprobs, tgt, IGNORE, 3).nll_sum)


def test_bad_input_is_named():
    lprobs, tgt = example()
    with pytest.raises(ValueError, match=r"lprobs must be .* got \(5, 3\) and \(4,\)"):
        token_stats(lprobs, tgt[:4], IGNORE)
    with pytest.raises(ValueError, match="n_bins must be an integer >= 1, got 0"):
        token_stats(lprobs, tgt, IGNORE, n_bins=0)
    with pytest.raises(ValueError, match="cannot add token stats of 15 and 3 bins"):
        TokenStats.zeros() + TokenStats.zeros(3)
    with pytest.raises(ValueError, match="no tokens"):
        expected_calibration_error(token_stats(lprobs, torch.full((5,), IGNORE), IGNORE))


@settings(max_examples=30, deadline=None)
@given(n=st.integers(1, 40), v=st.integers(2, 9), n_bins=st.integers(1, 20), seed=st.integers(0, 2**16))
def test_ece_is_in_unit_interval_and_zero_when_sure_and_right(n, v, n_bins, seed):
    gen = torch.Generator().manual_seed(seed)
    lprobs = (3 * torch.randn(n, v, generator=gen)).log_softmax(-1)
    tgt = torch.randint(v, (n,), generator=gen)
    assert 0.0 <= expected_calibration_error(token_stats(lprobs, tgt, IGNORE, n_bins)) <= 1.0
    sure = F.one_hot(tgt, v).double().log()  # probability 1 on the gold token
    stats = token_stats(sure, tgt, IGNORE, n_bins)
    assert expected_calibration_error(stats) == 0.0
    assert stats.bin_count[-1].item() == n and stats.mean_gold_prob == 1.0


def test_teacher_forced_nll_is_cross_entropy_of_the_forward():
    torch.manual_seed(0)
    tok = SimpleNamespace(pad_id=0, bos_id=1, eos_id=2)
    model = build_model(12, 0, d_model=8, n_heads=2, ffn_dim=16, enc_layers=1, dec_layers=1, max_positions=16)
    src = [[5, 6, 2], [7, 2], [3, 4, 8, 9, 2]]  # sources end in eos, targets have neither bos nor eos
    tgt = [[4, 5], [6, 7, 8, 9], [10]]
    batches = loss_batches(EncodedPairs(src, tgt), tok, max_tokens=10)
    stats = teacher_forced_stats(model, batches, tok.pad_id, n_bins=4)
    assert len(batches) == 2 and stats.ntokens == 3 + 5 + 2  # each target and its eos
    assert model.training  # its mode is restored
    model.eval()
    nll_sum = sum(
        F.cross_entropy(model(b.src, b.tgt_in).flatten(0, 1), b.tgt_out.flatten(), ignore_index=0, reduction="sum")
        for b in batches
    )
    assert stats.nll_sum == pytest.approx(nll_sum.item(), rel=1e-6)
