"""The fused criterion and the chunked output layer against the reference criterion."""

import functools

import pytest
import torch
import torch.nn.functional as F
from test_criterion import dense_q, random_batch

from nmt_ls.criterions.functional import REDUCTIONS, SMOOTHINGS, LossSpec, label_smoothed_cross_entropy
from nmt_ls.criterions.fused import chunked_linear_cross_entropy, fused_label_smoothed_cross_entropy

PAD = 1
FIELDS = ("loss", "kl", "nll")


def outputs_and_grads(fn, leaves, *args, weights=(1.3, 0.2, 0.7)):
    """(loss, kl, nll, grads of leaves) with backward from a mix of all three outputs."""
    out = fn(*leaves, *args)
    total = sum(w * getattr(out, f).sum() for w, f in zip(weights, FIELDS))
    grads = torch.autograd.grad(total, leaves)
    return [getattr(out, f).detach() for f in FIELDS] + list(grads), out.ntokens


def assert_all_close(got, want, atol, rtol=1e-5):
    assert len(got) == len(want)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, atol=atol, rtol=rtol)


# ---- fused: values and gradients equal the reference ------------------------------------------


@pytest.mark.parametrize("smoothing", SMOOTHINGS)
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("eps", [0.0, 0.1])
def test_fused_matches_reference(smoothing, reduction, eps):
    logits, target = random_batch(20, dtype=torch.float32)
    logits.requires_grad_()
    args = (target, LossSpec(eps, PAD, smoothing, reduction))
    want, n_want = outputs_and_grads(label_smoothed_cross_entropy, [logits], *args)
    for chunk_size in (None, 1, 4):  # one chunk, one row per chunk, a ragged last chunk
        got, n_got = outputs_and_grads(
            lambda *a: fused_label_smoothed_cross_entropy(*a, chunk_size=chunk_size), [logits], *args
        )
        assert n_got == n_want
        assert_all_close(got, want, atol=1e-5)


@pytest.mark.parametrize("reduction", ["sum", "mean", "none"])
def test_uniform_equals_torch_cross_entropy(reduction):
    logits, target = random_batch(28, dtype=torch.float32)
    flat, tgt = logits.view(-1, 11).requires_grad_(), target.view(-1)
    ref = F.cross_entropy(flat, tgt, ignore_index=PAD, label_smoothing=0.1, reduction=reduction)
    ours = fused_label_smoothed_cross_entropy(flat, tgt, LossSpec(0.1, PAD, "uniform", reduction)).loss
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=1e-6)
    want = torch.autograd.grad(ref.sum(), flat)[0]
    torch.testing.assert_close(torch.autograd.grad(ours.sum(), flat)[0], want, atol=1e-6, rtol=1e-5)


def test_fused_non_contiguous_logits():
    logits, target = random_batch(29)
    strided = logits.transpose(0, 1).contiguous().transpose(0, 1).requires_grad_()  # (3, 5, 11)
    assert not strided.is_contiguous()
    want, _ = outputs_and_grads(label_smoothed_cross_entropy, [strided], target, LossSpec(0.1, PAD))
    got, _ = outputs_and_grads(fused_label_smoothed_cross_entropy, [strided], target, LossSpec(0.1, PAD))
    assert_all_close(got, want, atol=1e-10)


def test_fused_gradient_is_softmax_minus_q_and_zero_on_pad_rows():
    logits, target = random_batch(21)
    logits.requires_grad_()
    for smoothing in SMOOTHINGS:
        out = fused_label_smoothed_cross_entropy(logits, target, LossSpec(0.2, PAD, smoothing))
        (grad,) = torch.autograd.grad(out.loss, logits)
        q = dense_q(target.reshape(-1), 11, 0.2, smoothing, PAD).view_as(logits)
        keep = (target != PAD)[..., None]
        expected = torch.where(keep, logits.detach().softmax(-1) - q, 0.0)
        torch.testing.assert_close(grad, expected, atol=1e-12, rtol=0)
        assert (grad[target == PAD] == 0).all()


@pytest.mark.parametrize("smoothing", SMOOTHINGS)
def test_fused_gradcheck_float64(smoothing):
    logits, target = random_batch(22, b=2, t=3, v=5)
    logits.requires_grad_()

    def fn(x):
        per_token = fused_label_smoothed_cross_entropy(x, target, LossSpec(0.3, PAD, smoothing, "none"), 2)
        summed = fused_label_smoothed_cross_entropy(x, target, LossSpec(0.3, PAD, smoothing, "sum"), 2)
        return per_token.loss, summed.kl, summed.nll

    assert torch.autograd.gradcheck(fn, (logits,))


def test_fused_gold_probability_underflow():
    """Rows whose gold probability underflows float32 take the exact logsumexp branch."""
    logits, target = random_batch(26, dtype=torch.float32)
    logits[0, 0, target[0, 0]] = -200.0  # p_gold ~ e^-200: 0 in float32
    logits[1, 2, target[1, 2]] = -90.0  # denormal
    logits.requires_grad_()
    args = (target, LossSpec(0.1, PAD, "others_no_pad", "none"))
    want, _ = outputs_and_grads(label_smoothed_cross_entropy, [logits], *args)
    got, _ = outputs_and_grads(fused_label_smoothed_cross_entropy, [logits], *args)
    assert_all_close(got, want, atol=1e-5)


def test_fused_without_grad_matches_reference():
    """Validation path: no softmax buffer is kept, chunks go through a scratch."""
    logits, target = random_batch(27, dtype=torch.float32)
    want = label_smoothed_cross_entropy(logits, target, LossSpec(0.1, PAD, "others_no_pad", "none"))
    with torch.no_grad():
        got = fused_label_smoothed_cross_entropy(logits, target, LossSpec(0.1, PAD, "others_no_pad", "none"), 4)
    for f in FIELDS:
        torch.testing.assert_close(getattr(got, f), getattr(want, f), atol=1e-5, rtol=1e-5)
    assert not got.loss.requires_grad


def test_fused_second_backward_recomputes():
    logits, target = random_batch(23)
    logits.requires_grad_()
    out = fused_label_smoothed_cross_entropy(logits, target, LossSpec(0.1, PAD))
    first = torch.autograd.grad(out.loss, logits, retain_graph=True)[0].clone()
    second = torch.autograd.grad(out.loss, logits)[0]
    torch.testing.assert_close(first, second, atol=1e-12, rtol=0)


def test_fused_huge_page_buffer_matches_reference(monkeypatch):
    """Logits of 8 MiB get a buffer marked MADV_HUGEPAGE (on Linux): values and gradients
    are the reference's, and so they are where madvise is unavailable."""
    from nmt_ls.criterions import fused

    g = torch.Generator().manual_seed(0)
    logits = torch.randn(256, 8192, generator=g) * 3  # 8 MiB of float32
    target = torch.randint(0, 8192, (256,), generator=g)
    target[::7] = PAD
    args = (target, LossSpec(0.1, PAD, "others", "sum"))
    want = outputs_and_grads(label_smoothed_cross_entropy, [logits.clone().requires_grad_()], *args)[0]
    got = outputs_and_grads(fused_label_smoothed_cross_entropy, [logits.clone().requires_grad_()], *args)[0]
    assert_all_close(got, want, atol=1e-5)
    monkeypatch.setattr(fused, "_madvise", lambda: None)
    plain = outputs_and_grads(fused_label_smoothed_cross_entropy, [logits.clone().requires_grad_()], *args)[0]
    assert_all_close(plain, got, atol=0, rtol=0)
    buf = fused._empty_huge_like(logits.t())  # any layout in, contiguous out
    assert buf.shape == (8192, 256) and buf.is_contiguous()


def test_fused_all_padding_batch_gives_zero_not_nan():
    logits = torch.randn(2, 3, 5, requires_grad=True)
    target = torch.full((2, 3), PAD)
    for smoothing in SMOOTHINGS:
        for reduction in REDUCTIONS:
            out = fused_label_smoothed_cross_entropy(logits, target, LossSpec(0.1, PAD, smoothing, reduction))
            assert out.ntokens == 0
            for f in FIELDS:
                assert (getattr(out, f) == 0).all()
            (grad,) = torch.autograd.grad(out.loss.sum() + out.nll.sum(), logits)
            assert (grad == 0).all()


def test_fused_ignore_index_outside_vocab():
    logits, target = random_batch(24)
    outside = target.masked_fill(target == PAD, -100)
    got = fused_label_smoothed_cross_entropy(logits, outside, LossSpec(0.1, -100, "others"))
    want = label_smoothed_cross_entropy(logits, target, LossSpec(0.1, PAD, "others"))
    assert got.loss.item() == pytest.approx(want.loss.item(), abs=1e-10)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_fused_half_precision(dtype):
    logits, target = random_batch(25, dtype=torch.float32)
    half = logits.to(dtype).requires_grad_()
    got, _ = outputs_and_grads(fused_label_smoothed_cross_entropy, [half], target, LossSpec(0.1, PAD))
    ref_input = half.detach().float().requires_grad_()  # same rounded values, float32 math
    want, _ = outputs_and_grads(label_smoothed_cross_entropy, [ref_input], target, LossSpec(0.1, PAD))
    assert got[0].dtype == torch.float32 and got[-1].dtype == dtype
    assert_all_close(got[:3], want[:3], atol=1e-4)
    # the float32 gradient rounded once: at most one unit in the last place away
    torch.testing.assert_close(got[-1].float(), want[-1], atol=1e-6, rtol=torch.finfo(dtype).eps)


# ---- fused: gradient accuracy against the exact gradient -----------------------------------------


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_fused_gold_gradient_of_a_confident_row(dtype):
    """V = 8000, the gold logit 15.8125 and the others 0: p_gold = 0.998915, and with eps = 0
    the gold gradient is p_gold - 1 = -0.0010846. It used to come out 0.0 in bfloat16: p_gold
    was rounded (to 1.0) before 1 was subtracted."""
    k, big = 8000, 15.8125  # exact in bfloat16 and float16
    logits = torch.zeros(2, k, dtype=dtype)
    target = torch.tensor([3, k - 1])
    logits[0, 3] = logits[1, k - 1] = big
    logits.requires_grad_()
    (grad,) = torch.autograd.grad(fused_label_smoothed_cross_entropy(logits, target, LossSpec(0.0)).loss, logits)
    denom = torch.tensor(big, dtype=torch.float64).exp() + (k - 1)
    exact = torch.full((2, k), 1 / denom.item(), dtype=torch.float64)  # p of the others
    exact[[0, 1], target] = -(k - 1) / denom  # p_gold - 1
    assert exact[0, 3].item() == pytest.approx(-0.0010846, rel=1e-4)
    gold = grad[[0, 1], target].double()
    assert (gold != 0).all()
    torch.testing.assert_close(gold, exact[[0, 1], target], rtol=1e-2, atol=0)
    # every entry within one unit in the last place of the exact value (float16 holds the
    # others' 1.36e-7 as a subnormal, in steps of 6e-8)
    info = torch.finfo(dtype)
    torch.testing.assert_close(grad.double(), exact, rtol=info.eps, atol=info.tiny * info.eps)


@functools.cache
def confident_batch(n=2048, k=8000, seed=0):
    """Float64 logits (n, k) like a trained model's and their targets: N(0, 2^2) logits, the
    gold one raised so that p_gold = sigmoid(t), t uniform in [-2, 12] (p_gold from 0.12 to
    0.999994); about 10% of the rows are padding."""
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(n, k, generator=g, dtype=torch.float64) * 2
    target = torch.randint(2, k, (n,), generator=g)  # neither PAD nor 0
    rows = torch.arange(n)
    logits[rows, target] = -torch.inf
    logits[rows, target] = logits.logsumexp(-1) + torch.rand(n, generator=g, dtype=torch.float64) * 14 - 2
    target[torch.rand(n, generator=g) < 0.1] = PAD
    return logits, target


def exact_grad(logits, target, eps, smoothing, weights=(1.3, 0.2, 0.7)):
    """The gradient :func:`outputs_and_grads` takes, in closed form and float64: on kept rows
    ``(a + b) p - a q - b onehot(y)``, ``a`` the weight of loss and kl, ``b`` that of nll."""
    a, b = weights[0] + weights[1], weights[2]
    k = logits.size(-1)
    q = dense_q(target, k, eps, smoothing, PAD)  # (N, V), zero on pad rows
    onehot = F.one_hot(target, k).double()
    grad = (a + b) * logits.double().softmax(-1) - a * q - b * onehot
    return torch.where((target != PAD)[:, None], grad, 0.0)


def grad_errors(grad, exact):
    """(whole-batch, mean per-row) relative error of ``grad`` (N, V) against ``exact``; the
    per-row mean skips the rows whose exact gradient is 0 (padding)."""
    diff = grad.double() - exact  # (N, V)
    norms = exact.norm(dim=-1)  # (N,)
    keep = norms > 0
    return (diff.norm() / exact.norm()).item(), (diff.norm(dim=-1)[keep] / norms[keep]).mean().item()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("smoothing, eps", [("others", 0.0), ("uniform", 0.1), ("others", 0.1), ("others_no_pad", 0.1)])
def test_fused_gradient_at_least_as_accurate_as_reference(dtype, smoothing, eps):
    """2,048 rows, V = 8000, p_gold from 0.12 to 0.999994, 10% padding: against the exact
    gradient of the same rounded logits the fused one errs no more than the reference's, over
    the whole batch and per row. (bfloat16 used to err 1.6x as much, float32 3x.)"""
    logits, target = confident_batch()
    x = logits.to(dtype)
    args = (target, LossSpec(eps, PAD, smoothing))
    fused = outputs_and_grads(fused_label_smoothed_cross_entropy, [x.clone().requires_grad_()], *args)[0][-1]
    ref = outputs_and_grads(label_smoothed_cross_entropy, [x.clone().requires_grad_()], *args)[0][-1]
    assert fused.dtype == dtype
    exact = exact_grad(x, target, eps, smoothing)
    (fused_whole, fused_row), (ref_whole, ref_row) = grad_errors(fused, exact), grad_errors(ref, exact)
    assert fused_whole <= ref_whole
    assert fused_row <= ref_row


# ---- chunked output layer: equals projection + reference ---------------------------------------


def linear_batch(seed, dtype=torch.float64, bias=True):
    logits, target = random_batch(seed)
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(3, 5, 7, generator=g, dtype=dtype, requires_grad=True)
    weight = torch.randn(11, 7, generator=g, dtype=dtype, requires_grad=True)
    b = torch.randn(11, generator=g, dtype=dtype, requires_grad=True) if bias else None
    return hidden, weight, b, target


def unfused(hidden, weight, bias, *args):
    return label_smoothed_cross_entropy(F.linear(hidden, weight, bias), *args)


@pytest.mark.parametrize("smoothing", SMOOTHINGS)
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_chunked_linear_matches_unfused(smoothing, reduction):
    hidden, weight, bias, target = linear_batch(30, torch.float32)
    args = (target, LossSpec(0.1, PAD, smoothing, reduction))
    for b in (bias, None):
        leaves = [hidden, weight] + ([b] if b is not None else [])
        want, _ = outputs_and_grads(lambda h, w, *bb: unfused(h, w, b, *args), leaves)
        for chunk_size in (None, 1, 4):
            fn = lambda h, w, *bb: chunked_linear_cross_entropy(h, w, *args, bias=b, chunk_size=chunk_size)
            got, _ = outputs_and_grads(fn, leaves)
            assert_all_close(got, want, atol=1e-5)


def test_chunked_linear_gradcheck_float64():
    hidden, weight, bias, target = linear_batch(31)
    hidden, weight, bias = hidden[:1, :3].detach().requires_grad_(), weight, bias
    for smoothing in SMOOTHINGS:
        fn = lambda h, w, b: (
            chunked_linear_cross_entropy(h, w, target[:1, :3], LossSpec(0.3, PAD, smoothing, "none"), b, 2).loss
        )
        assert torch.autograd.gradcheck(fn, (hidden, weight, bias), fast_mode=True)


def test_chunked_linear_all_padding_and_frozen_weight():
    hidden, weight, _, target = linear_batch(32)
    out = chunked_linear_cross_entropy(hidden, weight, torch.full_like(target, PAD), LossSpec(0.1, PAD))
    assert out.loss.item() == 0.0 and out.ntokens == 0
    gh, gw = torch.autograd.grad(out.loss, (hidden, weight))
    assert (gh == 0).all() and (gw == 0).all()
    frozen = weight.detach()
    out = chunked_linear_cross_entropy(hidden, frozen, target, LossSpec(0.1, PAD))
    (gh,) = torch.autograd.grad(out.loss, hidden)
    (want,) = torch.autograd.grad(unfused(hidden, frozen, None, target, LossSpec(0.1, PAD)).loss, hidden)
    torch.testing.assert_close(gh, want, atol=1e-10, rtol=0)


def test_chunked_linear_bfloat16():
    hidden, weight, _, target = linear_batch(33, torch.float32)
    h16, w16 = (t.detach().bfloat16().requires_grad_() for t in (hidden, weight))
    got, _ = outputs_and_grads(lambda h, w: chunked_linear_cross_entropy(h, w, target, LossSpec(0.1, PAD)), [h16, w16])
    h32, w32 = (t.detach().float().requires_grad_() for t in (h16, w16))
    want, _ = outputs_and_grads(lambda h, w: unfused(h, w, None, target, LossSpec(0.1, PAD)), [h32, w32])
    assert got[-1].dtype == torch.bfloat16 and got[-2].dtype == torch.bfloat16
    assert_all_close(got[:3], want[:3], atol=1e-4)
    for g, w in zip(got[3:], want[3:]):
        torch.testing.assert_close(g.float(), w, atol=2e-2, rtol=2e-2)


def test_chunked_linear_bad_weight_shape():
    hidden, weight, _, target = linear_batch(34)
    with pytest.raises(ValueError, match="weight must have shape"):
        chunked_linear_cross_entropy(hidden, weight.t(), target, LossSpec(0.1, PAD))
