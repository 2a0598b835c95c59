"""The criterion against closed-form values, dense float64 oracles and F.cross_entropy."""

import math

import pytest
import torch
import torch.nn.functional as F

from nmt_ls.criterions import (
    CRITERIONS,
    build_criterion,
    import_user_module,
    label_smoothed_cross_entropy,
    label_smoothed_nll_loss,
    reduce_metrics,
    register_criterion,
)
from nmt_ls.criterions.compat import (
    LabelSmoothing,
    LabelSmoothingCrossEntropy,
    LabelSmoothingKLDivLoss,
    LabelSmoothingLoss,
    smooth_one_hot,
)
from nmt_ls.criterions.functional import SMOOTHINGS, LossSpec, smoothed_target_entropy

PREDS = torch.tensor([[0.1, 0.2, 0.3, 0.4], [0.1, 0.1, 0.1, 0.1]], dtype=torch.float64)
TARGET = torch.tensor([2, 3])


def dense_q(target, k, eps, smoothing, pad):
    """The explicit (N, K) target distribution, the way the reference codebases build it."""
    n = target.numel()
    if smoothing == "uniform":
        q = torch.full((n, k), eps / k, dtype=torch.float64)
        q[torch.arange(n), target] += 1 - eps
    else:
        off = eps / (k - 1) if smoothing == "others" else eps / (k - 2)
        q = torch.full((n, k), off, dtype=torch.float64)
        if smoothing == "others_no_pad":
            q[:, pad] = 0.0
        q[torch.arange(n), target.clamp(0, k - 1)] = 1 - eps
    if pad is not None:
        q[target == pad] = 0.0
    return q


def dense_loss(logits, target, eps, smoothing, pad):
    """(CE, KL, NLL) sums from the dense q, in float64."""
    lp = logits.double().log_softmax(-1).reshape(-1, logits.size(-1))
    t = target.reshape(-1)
    q = dense_q(t, lp.size(-1), eps, smoothing, pad)
    ce = -(q * lp).sum()
    qlogq = torch.where(q > 0, q * q.clamp_min(1e-300).log(), torch.zeros_like(q)).sum()
    keep = t != pad if pad is not None else torch.ones_like(t, dtype=torch.bool)
    nll = -lp[keep].gather(1, t[keep][:, None]).sum()
    return ce, ce + qlogq, nll


# ---- the worked example, closed form -------------------------------------------------------


def test_worked_example_values():
    mean = dict(reduction="mean")
    assert F.cross_entropy(PREDS, TARGET).item() == pytest.approx(1.364415, abs=1e-6)
    out = label_smoothed_cross_entropy(PREDS, TARGET, LossSpec(0.0, **mean))
    assert out.loss.item() == pytest.approx(1.364415, abs=1e-6)
    uniform = LossSpec(0.1, smoothing="uniform", **mean)
    assert label_smoothed_cross_entropy(PREDS, TARGET, uniform).loss.item() == pytest.approx(1.366915, abs=1e-6)
    others = LossSpec(0.1, smoothing="others", **mean)
    assert label_smoothed_cross_entropy(PREDS, TARGET, others).loss.item() == pytest.approx(1.367748, abs=1e-6)
    padded = label_smoothed_cross_entropy(PREDS, TARGET, LossSpec(0.1, ignore_index=3, smoothing="others", **mean))
    assert padded.loss.item() == pytest.approx(1.349202, abs=1e-6)
    assert padded.ntokens == 1
    no_pad = LossSpec(0.1, ignore_index=3, smoothing="others_no_pad", **mean)
    kl = label_smoothed_cross_entropy(PREDS, TARGET, no_pad).kl
    assert kl.item() == pytest.approx(0.963138, abs=1e-6)


def test_worked_example_by_hand():
    """uniform = CE + eps * (mean over classes of -log p - CE), from the log-softmax by hand."""
    lp = PREDS.log_softmax(-1)
    nll = -lp[[0, 1], [2, 3]]
    smooth = -lp.mean(-1)
    expected = ((1 - 0.1) * nll + 0.1 * smooth).mean()
    got = label_smoothed_cross_entropy(PREDS, TARGET, LossSpec(0.1, smoothing="uniform", reduction="mean")).loss
    assert got.item() == pytest.approx(expected.item(), abs=1e-12)


@pytest.mark.parametrize("smoothing,eps,k", [("uniform", 0.1, 4), ("others", 0.2, 7), ("others_no_pad", 0.3, 5)])
def test_entropy_closed_form(smoothing, eps, k):
    q = dense_q(torch.tensor([1]), k, eps, smoothing, 0)[0]
    h = -(q[q > 0] * q[q > 0].log()).sum().item()
    assert smoothed_target_entropy(eps, k, smoothing) == pytest.approx(h, abs=1e-12)


# ---- oracles on random inputs with padding ------------------------------------------------


def random_batch(seed, b=3, t=5, v=11, pad=1, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(b, t, v, generator=g, dtype=dtype) * 3
    target = torch.randint(0, v, (b, t), generator=g)
    target[target == pad] = 0
    target[0, -2:] = pad
    target[-1, -1] = pad
    return logits, target


@pytest.mark.parametrize("smoothing", SMOOTHINGS)
@pytest.mark.parametrize("eps", [0.0, 0.1, 0.37])
def test_matches_dense_oracle(smoothing, eps):
    logits, target = random_batch(0)
    out = label_smoothed_cross_entropy(logits, target, LossSpec(eps, 1, smoothing, "sum"))
    ce, kl, nll = dense_loss(logits, target, eps, smoothing, 1)
    assert out.loss.item() == pytest.approx(ce.item(), abs=1e-9)
    assert out.kl.item() == pytest.approx(kl.item(), abs=1e-9)
    assert out.nll.item() == pytest.approx(nll.item(), abs=1e-9)
    assert out.ntokens == int((target != 1).sum())


@pytest.mark.parametrize("smoothing", SMOOTHINGS)
def test_log_probs_input_equals_logits_input(smoothing):
    logits, target = random_batch(1)
    a = label_smoothed_cross_entropy(logits, target, LossSpec(0.1, 1, smoothing))
    b = label_smoothed_cross_entropy(logits.log_softmax(-1), target, LossSpec(0.1, 1, smoothing), log_probs=True)
    for x, y in [(a.loss, b.loss), (a.kl, b.kl), (a.nll, b.nll)]:
        assert x.item() == pytest.approx(y.item(), abs=1e-10)


@pytest.mark.parametrize("smoothing", SMOOTHINGS)
def test_gradient_is_softmax_minus_q(smoothing):
    logits, target = random_batch(2)
    logits.requires_grad_(True)
    label_smoothed_cross_entropy(logits, target, LossSpec(0.2, 1, smoothing)).loss.backward()
    q = dense_q(target.reshape(-1), 11, 0.2, smoothing, 1).view(logits.shape)
    keep = (target != 1)[..., None]
    expected = (logits.detach().softmax(-1) - q) * keep
    torch.testing.assert_close(logits.grad, expected, atol=1e-12, rtol=0)
    assert logits.grad[target == 1].abs().max() == 0  # pad positions get no gradient
    # rows of the gradient sum to zero (q sums to one on kept rows)
    torch.testing.assert_close(logits.grad.sum(-1), torch.zeros_like(target, dtype=torch.float64), atol=1e-12, rtol=0)


@pytest.mark.parametrize("smoothing", SMOOTHINGS)
@pytest.mark.parametrize("log_probs", [False, True])
def test_gradcheck_float64(smoothing, log_probs):
    logits, target = random_batch(3, b=2, t=3, v=6)
    logits.requires_grad_(True)

    def f(x):
        out = label_smoothed_cross_entropy(x, target, LossSpec(0.15, 1, smoothing, "none"), log_probs=log_probs)
        return out.loss, out.kl, out.nll

    assert torch.autograd.gradcheck(f, (logits,))


@pytest.mark.parametrize("eps", [0.0, 0.1, 0.5])
@pytest.mark.parametrize("reduction", ["sum", "mean", "none"])
def test_uniform_equals_torch_cross_entropy(eps, reduction):
    logits, target = random_batch(4, dtype=torch.float32)
    ours = label_smoothed_cross_entropy(logits, target, LossSpec(eps, 1, "uniform", reduction)).loss
    ref = F.cross_entropy(
        logits.view(-1, 11), target.view(-1), ignore_index=1, label_smoothing=eps, reduction=reduction
    )
    torch.testing.assert_close(ours.reshape(ref.shape), ref, atol=1e-5, rtol=1e-6)


def test_eps_zero_is_plain_nll_and_nll_does_not_depend_on_eps():
    logits, target = random_batch(5)
    ref = F.cross_entropy(logits.view(-1, 11), target.view(-1), ignore_index=1, reduction="sum")
    for smoothing in SMOOTHINGS:
        for eps in (0.0, 0.1, 0.9):
            out = label_smoothed_cross_entropy(logits, target, LossSpec(eps, 1, smoothing))
            assert out.nll.item() == pytest.approx(ref.item(), abs=1e-9)
        assert label_smoothed_cross_entropy(logits, target, LossSpec(0.0, 1, smoothing)).loss.item() == pytest.approx(
            ref.item(), abs=1e-9
        )


@pytest.mark.parametrize("smoothing", SMOOTHINGS)
def test_padding_invariance(smoothing):
    """Loss of a padded two-sentence batch == sum of the losses of each sentence alone."""
    g = torch.Generator().manual_seed(6)
    v, pad = 9, 0
    a = torch.randn(1, 6, v, generator=g, dtype=torch.float64)
    b = torch.randn(1, 3, v, generator=g, dtype=torch.float64)
    ta, tb = torch.randint(1, v, (1, 6), generator=g), torch.randint(1, v, (1, 3), generator=g)
    batch = torch.cat([a, torch.cat([b, torch.randn(1, 3, v, generator=g, dtype=torch.float64) * 50], 1)])
    tbatch = torch.cat([ta, torch.cat([tb, torch.full((1, 3), pad)], 1)])
    both = label_smoothed_cross_entropy(batch, tbatch, LossSpec(0.1, pad, smoothing))
    alone = [label_smoothed_cross_entropy(x, t, LossSpec(0.1, pad, smoothing)) for x, t in [(a, ta), (b, tb)]]
    for field in ("loss", "kl", "nll"):
        total = sum(getattr(o, field) for o in alone)
        assert getattr(both, field).item() == pytest.approx(total.item(), abs=1e-10)


@pytest.mark.parametrize("smoothing", SMOOTHINGS)
def test_reductions_agree(smoothing):
    logits, target = random_batch(7)

    def get(reduction):
        return label_smoothed_cross_entropy(logits, target, LossSpec(0.1, 1, smoothing, reduction))

    none, total, mean, sent = get("none"), get("sum"), get("mean"), get("sentence")
    assert none.loss.shape == target.shape and sent.loss.shape == (3,)
    assert (none.loss[target == 1] == 0).all() and (none.kl[target == 1] == 0).all()
    for field in ("loss", "kl", "nll"):
        s = getattr(total, field).item()
        assert getattr(none, field).sum().item() == pytest.approx(s, abs=1e-10)
        assert getattr(sent, field).sum().item() == pytest.approx(s, abs=1e-10)
        assert getattr(mean, field).item() == pytest.approx(s / total.ntokens, abs=1e-12)


def test_any_leading_dims_are_bottled():
    logits, target = random_batch(8)
    flat = label_smoothed_cross_entropy(logits.view(-1, 11), target.view(-1), LossSpec(0.1, 1))
    deep = label_smoothed_cross_entropy(logits.view(3, 5, 1, 11), target.view(3, 5, 1), LossSpec(0.1, 1))
    assert flat.loss.item() == pytest.approx(deep.loss.item(), abs=1e-12)


def test_half_precision_inputs_are_computed_in_float32():
    logits, target = random_batch(9, dtype=torch.float32)
    ref = label_smoothed_cross_entropy(logits, target, LossSpec(0.1, 1)).loss
    half = label_smoothed_cross_entropy(logits.bfloat16(), target, LossSpec(0.1, 1)).loss
    assert half.dtype == torch.float32
    assert half.item() == pytest.approx(ref.item(), rel=2e-2)


def test_all_padding_batch_gives_zero_not_nan():
    logits = torch.randn(2, 3, 5, requires_grad=True)
    target = torch.zeros(2, 3, dtype=torch.long)
    for smoothing in SMOOTHINGS:
        for reduction in ("sum", "mean"):
            out = label_smoothed_cross_entropy(logits, target, LossSpec(0.1, 0, smoothing, reduction))
            assert out.loss.item() == 0.0 and out.kl.item() == 0.0 and out.nll.item() == 0.0
            assert out.ntokens == 0
    out.loss.backward()
    assert logits.grad.abs().sum() == 0


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(epsilon=1.0), "epsilon must be in"),
        (dict(epsilon=-0.1), "epsilon must be in"),
        (dict(smoothing="gaussian"), "smoothing must be one of"),
        (dict(reduction="avg"), "reduction must be one of"),
        (dict(smoothing="others_no_pad", ignore_index=None), "ignore_index must be a class index"),
        (dict(smoothing="others_no_pad", ignore_index=-100), "ignore_index must be a class index"),
    ],
)
def test_bad_arguments(kwargs, match):
    args = dict(epsilon=0.1, ignore_index=1, smoothing="others", reduction="sum") | kwargs
    with pytest.raises(ValueError, match=match):
        label_smoothed_cross_entropy(*random_batch(0), LossSpec(**args))


def test_bad_shapes_and_ids():
    logits, target = random_batch(0)
    with pytest.raises(ValueError, match="needs a target of shape"):
        label_smoothed_cross_entropy(logits, target[:, :-1], LossSpec(0.1, 1))
    bad = target.clone()
    bad[1, 1] = 11
    with pytest.raises(ValueError, match="target id 11 is outside the vocabulary"):
        label_smoothed_cross_entropy(logits, bad, LossSpec(0.1, 1))
    bad[1, 1] = -3
    with pytest.raises(ValueError, match="target id -3"):
        label_smoothed_cross_entropy(logits, bad, LossSpec(0.1, 1))
    with pytest.raises(ValueError, match="needs at least 3 classes"):
        label_smoothed_cross_entropy(logits[..., :2], target.clamp(0, 1), LossSpec(0.1, 1, "others_no_pad"))
    with pytest.raises(ValueError, match="needs at least 2 classes"):
        label_smoothed_cross_entropy(logits[..., :1], target * 0, LossSpec(0.1, None, "others"))


# ---- fairseq's function ----------------------------------------------------------------------


def fairseq_reference(lprobs, target, epsilon, ignore_index=None, reduce=True):
    """fairseq's formula, written out with the dense (N, K) sums."""
    if target.dim() == lprobs.dim() - 1:
        target = target.unsqueeze(-1)
    nll = -lprobs.gather(-1, target.clamp_min(0))
    smooth = -lprobs.sum(-1, keepdim=True)
    if ignore_index is not None:
        pad = target.eq(ignore_index)
        nll, smooth = nll.masked_fill(pad, 0.0), smooth.masked_fill(pad, 0.0)
    else:
        nll, smooth = nll.squeeze(-1), smooth.squeeze(-1)
    if reduce:
        nll, smooth = nll.sum(), smooth.sum()
    eps_i = epsilon / (lprobs.size(-1) - 1)
    return (1.0 - epsilon - eps_i) * nll + eps_i * smooth, nll


@pytest.mark.parametrize("ignore_index", [None, 1])
@pytest.mark.parametrize("reduce", [True, False])
def test_fairseq_function_semantics(ignore_index, reduce):
    logits, target = random_batch(10)
    lprobs = logits.log_softmax(-1).view(-1, 11)
    t = target.view(-1)
    loss, nll = label_smoothed_nll_loss(lprobs, t, 0.1, ignore_index, reduce)
    ref_loss, ref_nll = fairseq_reference(lprobs, t, 0.1, ignore_index, reduce)
    assert loss.shape == ref_loss.shape and nll.shape == ref_nll.shape
    torch.testing.assert_close(loss, ref_loss, atol=1e-10, rtol=0)
    torch.testing.assert_close(nll, ref_nll, atol=1e-10, rtol=0)
    # (N, 1) targets as fairseq passes them
    loss2, _ = label_smoothed_nll_loss(lprobs, t[:, None], 0.1, ignore_index, reduce)
    torch.testing.assert_close(loss2, ref_loss, atol=1e-10, rtol=0)


def test_fairseq_function_with_ignore_index_outside_vocab():
    logits, target = random_batch(11)
    lp = logits.log_softmax(-1)
    t = target.masked_fill(target == 1, -100)
    loss, nll = label_smoothed_nll_loss(lp, t, 0.1, -100)
    ref, ref_nll = label_smoothed_nll_loss(lp, target, 0.1, 1)
    assert loss.item() == pytest.approx(ref.item(), abs=1e-12)


# ---- registry and the fairseq-style criterion ----------------------------------------------


class TinyModel(torch.nn.Module):
    def __init__(self, logits):
        super().__init__()
        self.logits = logits

    def forward(self, src=None, tgt_in=None):
        return self.logits


def test_registry_builds_by_name_and_rejects_bad_names():
    assert {"label_smoothed_cross_entropy", "label_smoothed_kl"} <= set(CRITERIONS)
    crit = build_criterion("label_smoothed_cross_entropy", pad_id=1, label_smoothing=0.1)
    assert crit.eps == 0.1 and crit.smoothing == "others"
    with pytest.raises(ValueError, match="unknown criterion 'focal'"):
        build_criterion("focal", pad_id=1)
    with pytest.raises(ValueError, match=r"unknown argument\(s\) \['label_smothing'\]"):
        build_criterion("label_smoothed_cross_entropy", pad_id=1, label_smothing=0.1)
    with pytest.raises(ValueError, match="already registered"):
        register_criterion("label_smoothed_kl")(type("Dup", (torch.nn.Module,), {}))
    with pytest.raises(ValueError, match="label_smoothing must be in"):
        build_criterion("label_smoothed_cross_entropy", pad_id=1, label_smoothing=1.5)


def test_user_module_registers_a_plugin(tmp_path, monkeypatch):
    (tmp_path / "my_losses.py").write_text(
        "import torch\nfrom nmt_ls.criterions import register_criterion\n"
        "@register_criterion('my_plugin_loss')\nclass Mine(torch.nn.Module):\n"
        "    def __init__(self, pad_id):\n        super().__init__()\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    import_user_module("my_losses")
    assert build_criterion("my_plugin_loss", pad_id=0).__class__.__name__ == "Mine"
    CRITERIONS.pop("my_plugin_loss")


@pytest.mark.parametrize("name", ["label_smoothed_cross_entropy", "label_smoothed_kl"])
def test_criterion_forward_and_metrics(name):
    logits, target = random_batch(12)
    crit = build_criterion(name, pad_id=1, label_smoothing=0.1, report_accuracy=True)
    sample = {
        "net_input": {"src": None, "tgt_in": None},
        "target": target,
        "ntokens": int((target != 1).sum()),
        "nsentences": 3,
    }
    loss, sample_size, log = crit(TinyModel(logits), sample)
    ce, kl, nll = dense_loss(logits, target, 0.1, crit.smoothing, 1)
    expected = kl if name == "label_smoothed_kl" else ce
    assert loss.item() == pytest.approx(expected.item(), abs=1e-9)
    assert sample_size == sample["ntokens"] == log["ntokens"]
    assert log["nll_loss"] == pytest.approx(nll.item(), abs=1e-9)
    keep = target != 1
    assert log["n_correct"] == int((logits.argmax(-1) == target)[keep].sum()) and log["total"] == int(keep.sum())
    m = reduce_metrics([log])
    assert m["ppl"] == pytest.approx(math.exp(nll.item() / sample_size), rel=1e-12)
    assert m["ppl"] != pytest.approx(math.exp(m["loss"]))  # never exp of the smoothed loss


def test_metrics_reduce_by_summing_across_workers():
    logits, target = random_batch(13, b=4)
    crit = build_criterion("label_smoothed_cross_entropy", pad_id=1, label_smoothing=0.1, report_accuracy=True)
    whole = crit(TinyModel(logits), {"net_input": {}, "target": target})[2]
    parts = [crit(TinyModel(logits[i : i + 2]), {"net_input": {}, "target": target[i : i + 2]})[2] for i in (0, 2)]
    a, b = reduce_metrics([whole]), reduce_metrics(parts)
    assert crit.logging_outputs_can_be_summed()
    for key in ("loss", "nll_loss", "ppl", "kl", "accuracy", "ntokens"):
        assert a[key] == pytest.approx(b[key], rel=1e-12)


def test_sentence_avg_and_ignore_prefix():
    logits, target = random_batch(14)
    crit = build_criterion(
        "label_smoothed_cross_entropy", pad_id=1, label_smoothing=0.1, sentence_avg=True, ignore_prefix_size=1
    )
    loss, sample_size, log = crit(TinyModel(logits), {"net_input": {}, "target": target, "nsentences": 3})
    assert sample_size == 3
    ref = label_smoothed_cross_entropy(logits[:, 1:], target[:, 1:], LossSpec(0.1, 1)).loss
    assert loss.item() == pytest.approx(ref.item(), abs=1e-12)


def test_reduce_metrics_empty_and_overflow():
    assert reduce_metrics([{"loss": 0.0, "nll_loss": 0.0, "ntokens": 0, "sample_size": 0}])["ppl"] == 1.0
    assert reduce_metrics([{"loss": 1e4, "nll_loss": 1e4, "ntokens": 1, "sample_size": 1}])["ppl"] == math.inf


# ---- the classes people already use ------------------------------------------------------


def test_label_smoothing_cross_entropy_masks_padding_in_smoothing_term():
    logits, target = random_batch(15)
    t = target.masked_fill(target == 1, -100)
    crit = LabelSmoothingCrossEntropy(eps=0.1)
    ref = F.cross_entropy(logits.view(-1, 11), t.view(-1), label_smoothing=0.1)  # torch >= 1.12 masks it too
    assert crit(logits.view(-1, 11), t.view(-1)).item() == pytest.approx(ref.item(), abs=1e-10)
    # the old (fastai-style) formula averaged the smoothing term over ignored rows as well:
    lp = logits.view(-1, 11).log_softmax(-1)
    buggy = 0.1 * (-lp.sum(-1)).mean() / 11 + 0.9 * F.nll_loss(lp, t.view(-1), ignore_index=-100)
    assert crit(logits.view(-1, 11), t.view(-1)).item() != pytest.approx(buggy.item(), abs=1e-6)


def test_label_smoothing_loss_snippet():
    g = torch.Generator().manual_seed(16)
    pred = torch.randn(7, 5, generator=g, dtype=torch.float64)
    target = torch.randint(0, 5, (7,), generator=g)
    lp = pred.log_softmax(-1)
    true_dist = torch.full_like(lp, 0.2 / 4).scatter_(1, target[:, None], 0.8)
    ref = (-true_dist * lp).sum(-1).mean()
    assert LabelSmoothingLoss(5, 0.2)(pred, target).item() == pytest.approx(ref.item(), abs=1e-12)
    # class dim other than last
    assert LabelSmoothingLoss(5, 0.2, dim=1)(pred, target).item() == pytest.approx(ref.item(), abs=1e-12)
    with pytest.raises(ValueError, match="5 classes along dim -1, expected 6"):
        LabelSmoothingLoss(6, 0.2)(pred, target)


def test_kl_div_criterion_matches_dense_kldivloss_on_decoder_outputs():
    logits, target = random_batch(17)
    lp = logits.log_softmax(-1)  # (B, T, V)
    q = dense_q(target.reshape(-1), 11, 0.1, "others_no_pad", 1)
    ref = torch.nn.KLDivLoss(reduction="sum")(lp.reshape(-1, 11), q)
    assert LabelSmoothingKLDivLoss(11, 1, 0.1)(lp, target).item() == pytest.approx(ref.item(), abs=1e-9)
    assert LabelSmoothing is LabelSmoothingKLDivLoss


def test_smooth_one_hot_tensorflow_semantics():
    y = smooth_one_hot(torch.tensor([0, 2]), 0.1, num_classes=4)
    expected = torch.tensor([[0.925, 0.025, 0.025, 0.025], [0.025, 0.025, 0.925, 0.025]])
    torch.testing.assert_close(y, expected)
    torch.testing.assert_close(smooth_one_hot(F.one_hot(torch.tensor([0, 2]), 4).float(), 0.1), expected)
    with pytest.raises(ValueError, match="num_classes"):
        smooth_one_hot(torch.tensor([0]), 0.1)
