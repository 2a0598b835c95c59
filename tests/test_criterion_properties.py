"""Property tests (hypothesis) for the criterion: random shapes, padding patterns, epsilons."""

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from nmt_ls.criterions import label_smoothed_cross_entropy
from nmt_ls.criterions.functional import SMOOTHINGS, LossSpec


@st.composite
def batches(draw):
    b, t, v = draw(st.integers(1, 4)), draw(st.integers(1, 6)), draw(st.integers(3, 12))
    pad = draw(st.integers(0, v - 1))
    seed = draw(st.integers(0, 2**31 - 1))
    g = torch.Generator().manual_seed(seed)
    scale = draw(st.sampled_from([0.1, 1.0, 10.0, 100.0]))
    logits = torch.randn(b, t, v, generator=g, dtype=torch.float64) * scale
    target = torch.randint(0, v, (b, t), generator=g)
    pad_mask = torch.rand(b, t, generator=g) < draw(st.floats(0.0, 1.0))
    target = target.masked_fill(pad_mask, pad)
    eps = draw(st.floats(0.0, 0.99))
    smoothing = draw(st.sampled_from(SMOOTHINGS))
    return logits, target, pad, eps, smoothing


@settings(max_examples=150, deadline=None)
@given(batches())
def test_finite_kl_nonnegative_and_gradient_rows_sum_to_zero(case):
    logits, target, pad, eps, smoothing = case
    logits.requires_grad_(True)
    out = label_smoothed_cross_entropy(logits, target, LossSpec(eps, pad, smoothing, "none"))
    for x in (out.loss, out.kl, out.nll):
        assert torch.isfinite(x).all()
    assert (out.kl >= -1e-9).all()
    assert (out.loss >= out.kl - 1e-9).all()  # CE = KL + H(q), H >= 0
    out.loss.sum().backward()
    keep = target != pad
    assert torch.allclose(logits.grad.sum(-1)[keep], torch.zeros(()).double(), atol=1e-9)
    assert (logits.grad[~keep] == 0).all()


@settings(max_examples=100, deadline=None)
@given(batches(), st.floats(-1e3, 1e3))
def test_padding_positions_never_change_the_loss(case, junk):
    logits, target, pad, eps, smoothing = case
    out = label_smoothed_cross_entropy(logits, target, LossSpec(eps, pad, smoothing))
    noisy = logits.clone()
    noisy[target == pad] = junk  # whatever the model says at pad positions
    out2 = label_smoothed_cross_entropy(noisy, target, LossSpec(eps, pad, smoothing))
    assert torch.allclose(out.loss, out2.loss, rtol=1e-12, atol=1e-12)
    assert out.ntokens == out2.ntokens == int((target != pad).sum())
