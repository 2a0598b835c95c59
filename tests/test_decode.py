from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F

from nmt_ls.config import EvalConfig
from nmt_ls.decode import SearchSpec, beam_search, greedy_search
from nmt_ls.model import Architecture, Seq2Seq

PAD, UNK, BOS, EOS = 0, 1, 2, 3
V = 12


def random_model(seed, **kwargs):
    torch.manual_seed(seed)
    args = dict(d_model=32, n_heads=4, ffn_dim=64, enc_layers=2, dec_layers=2, dropout=0.1, max_positions=64)
    args.update(kwargs)
    model = Seq2Seq(V, Architecture(**args), pad_id=PAD).eval()
    with torch.no_grad():
        model.output_weight[EOS] *= 3.0  # so that untrained models stop at varied lengths
    return model


def random_src(seed, batch_size=6, max_len=9):
    g = torch.Generator().manual_seed(seed)
    lens = torch.randint(1, max_len + 1, (batch_size,), generator=g)
    src = torch.full((batch_size, max_len + 1), PAD)
    for i, n in enumerate(lens.tolist()):
        src[i, :n] = torch.randint(4, V, (n,), generator=g)
        src[i, n] = EOS
    return src


def sequence_logprob(model, src_row, hyp, cut=False):
    """Sum of log p(y_t | y_<t, x) over hyp + eos (over hyp alone if it was ``cut`` at the length
    limit), by teacher forcing (the oracle); p is the distribution over the tokens that can be
    emitted (pad and bos masked before the softmax)."""
    src_row = src_row[src_row.ne(PAD)][None]
    tgt_in = torch.tensor([[BOS] + hyp])
    with torch.no_grad():
        logits = model(src_row, tgt_in)[0]  # (T, V)
        logits[:, [PAD, BOS]] = -torch.inf
        lprobs = logits.log_softmax(-1)
    tgt = hyp if cut else hyp + [EOS]
    return lprobs[torch.arange(len(tgt)), torch.tensor(tgt)].sum().item()


def max_lens(src, limits):
    """Each sentence's length limit under ``limits`` (its source length counts eos, not padding)."""
    return [int(limits.max_len_a * n + limits.max_len_b) for n in src.ne(PAD).sum(1).tolist()]


SEEDS = range(4)
MODELS = [dict(), dict(pre_norm=False), dict(positions="learned", tie_embeddings=False)]
SPEC = SearchSpec(bos_id=BOS, eos_id=EOS, pad_id=PAD)
UNCACHED = replace(SPEC, use_cache=False)
LIMITS = EvalConfig(max_len_a=1.0, max_len_b=3)


def opts(**kwargs) -> EvalConfig:
    """The tests' length limit with ``kwargs`` (beam_size, len_penalty) replaced."""
    return replace(LIMITS, **kwargs)


@pytest.mark.parametrize("kwargs", MODELS)
@pytest.mark.parametrize("seed", SEEDS)
def test_greedy_cached_equals_uncached(seed, kwargs):
    model, src = random_model(seed, **kwargs), random_src(seed)
    assert greedy_search(model, src, SPEC, LIMITS) == greedy_search(model, src, UNCACHED, LIMITS)


@pytest.mark.parametrize("kwargs", MODELS)
@pytest.mark.parametrize("seed", SEEDS)
def test_beam_cached_equals_uncached(seed, kwargs):
    model, src = random_model(seed, **kwargs), random_src(seed)
    cached = beam_search(model, src, SPEC, opts(beam_size=4), nbest=4)
    uncached = beam_search(model, src, UNCACHED, opts(beam_size=4), nbest=4)
    for hyps_c, hyps_u in zip(cached, uncached):
        assert [h for h, _ in hyps_c] == [h for h, _ in hyps_u]
        assert [s for _, s in hyps_c] == pytest.approx([s for _, s in hyps_u], abs=1e-5)


@pytest.mark.parametrize("seed", SEEDS)
def test_beam_size_one_equals_greedy(seed):
    model, src = random_model(seed), random_src(seed, batch_size=10)
    beam = beam_search(model, src, SPEC, opts(beam_size=1, len_penalty=0.0))
    assert [hyps[0][0] for hyps in beam] == greedy_search(model, src, SPEC, LIMITS)


@pytest.mark.parametrize("seed", SEEDS)
def test_beam_is_at_least_as_good_as_greedy(seed):
    # Not a theorem for beam search in general, but it holds on these fixed random models.
    model, src = random_model(seed), random_src(seed, batch_size=10)
    greedy = greedy_search(model, src, SPEC, LIMITS)
    beam = beam_search(model, src, SPEC, opts(beam_size=5, len_penalty=0.0))
    for i, (greedy_hyp, hyps, limit) in enumerate(zip(greedy, beam, max_lens(src, LIMITS))):
        best_hyp, best_score = hyps[0]
        assert best_score == pytest.approx(sequence_logprob(model, src[i], best_hyp, len(best_hyp) == limit), abs=1e-5)
        assert best_score >= sequence_logprob(model, src[i], greedy_hyp, len(greedy_hyp) == limit) - 1e-5


@pytest.mark.parametrize("style", ["fairseq", "gnmt"])
@pytest.mark.parametrize("len_penalty", [0.0, 1.0, 0.6])
def test_beam_scores_are_length_normalised_logprobs(len_penalty, style):
    model, src = random_model(0), random_src(0)
    beam = beam_search(model, src, SPEC, opts(beam_size=4, len_penalty=len_penalty), nbest=4, len_penalty_style=style)
    n_cut = 0
    for i, (hyps, limit) in enumerate(zip(beam, max_lens(src, LIMITS))):
        for hyp, score in hyps:
            cut = len(hyp) == limit  # cut at the limit: no eos; otherwise eos counts
            length = len(hyp) if cut else len(hyp) + 1
            norm = length**len_penalty if style == "fairseq" else ((5 + length) / 6) ** len_penalty
            assert score == pytest.approx(sequence_logprob(model, src[i], hyp, cut) / norm, abs=1e-5)
            n_cut += cut
    assert n_cut > 0  # hypotheses cut at the limit are among them


@pytest.mark.parametrize("seed", SEEDS)
def test_nbest_sorted_and_distinct(seed):
    model, src = random_model(seed), random_src(seed)
    for hyps in beam_search(model, src, SPEC, opts(beam_size=5), nbest=3):
        assert 1 <= len(hyps) <= 3
        scores = [s for _, s in hyps]
        assert scores == sorted(scores, reverse=True)
        assert len({tuple(h) for h, _ in hyps}) == len(hyps)


@pytest.mark.parametrize("search", ["greedy", "beam"])
def test_max_length_and_special_tokens(search):
    model, src = random_model(1), random_src(1, batch_size=10)
    limits = EvalConfig(max_len_a=0.5, max_len_b=1)
    if search == "greedy":
        nbest = [[hyp] for hyp in greedy_search(model, src, SPEC, limits)]
    else:
        beam = beam_search(model, src, SPEC, replace(limits, beam_size=3), nbest=3)
        nbest = [[hyp for hyp, _ in hyps] for hyps in beam]
    limits_per_sentence = max_lens(src, limits)
    for hyps, max_len in zip(nbest, limits_per_sentence):
        for hyp in hyps:
            assert len(hyp) <= max_len
            assert not {PAD, BOS, EOS} & set(hyp)
    assert any(len(hyp) == max_len for hyps, max_len in zip(nbest, limits_per_sentence) for hyp in hyps)  # cut there


def test_batching_does_not_change_outputs():
    model, src = random_model(3), random_src(3)
    batched = beam_search(model, src, SPEC, opts(beam_size=3), nbest=2)
    for i in range(src.size(0)):
        alone = beam_search(model, src[i : i + 1], SPEC, opts(beam_size=3), nbest=2)[0]
        assert [h for h, _ in alone] == [h for h, _ in batched[i]]
    alone = [greedy_search(model, src[i : i + 1], SPEC, LIMITS)[0] for i in range(src.size(0))]
    assert alone == greedy_search(model, src, SPEC, LIMITS)


def test_search_restores_train_mode():
    model, src = random_model(0).train(), random_src(0)
    greedy_search(model, src, SPEC, LIMITS)
    beam_search(model, src, SPEC, opts(beam_size=2))
    assert model.training


def test_bad_arguments_raise():
    model, src = random_model(0), random_src(0)
    with pytest.raises(ValueError, match="need 1 <= nbest <= beam_size, got nbest=3, beam_size=2"):
        beam_search(model, src, SPEC, opts(beam_size=2), nbest=3)
    with pytest.raises(ValueError, match="len_penalty_style must be 'fairseq' or 'gnmt', got 'google'"):
        beam_search(model, src, SPEC, LIMITS, len_penalty_style="google")


def copy_batch(batch_size, g, vocab_size, max_len=6):
    """Source: random tokens + eos; target: the same tokens between bos and eos."""
    lens = torch.randint(2, max_len + 1, (batch_size,), generator=g)
    src = torch.full((batch_size, max_len + 1), PAD)
    tgt = torch.full((batch_size, max_len + 2), PAD)
    for i, n in enumerate(lens.tolist()):
        tokens = torch.randint(4, vocab_size, (n,), generator=g)
        src[i, :n], src[i, n] = tokens, EOS
        tgt[i, 0], tgt[i, 1 : n + 1], tgt[i, n + 1] = BOS, tokens, EOS
    return src, tgt


def test_trained_copy_model_copies():
    vocab_size, steps = 20, 300
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    arch = Architecture(d_model=32, n_heads=4, ffn_dim=64, enc_layers=2, dec_layers=2, dropout=0.0, max_positions=32)
    model = Seq2Seq(vocab_size, arch, pad_id=PAD)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2, betas=(0.9, 0.98))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 20) * max(0.05, 1 - s / steps))
    for _ in range(steps):
        src, tgt = copy_batch(64, g, vocab_size)
        logits = model(src, tgt[:, :-1])  # (B, T, V)
        loss = F.cross_entropy(logits.flatten(0, 1), tgt[:, 1:].flatten(), ignore_index=PAD)
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()

    src, _ = copy_batch(32, g, vocab_size)
    expected = [[t for t in row if t not in (PAD, EOS)] for row in src.tolist()]
    limits = EvalConfig(max_len_a=1.0, max_len_b=2)
    assert greedy_search(model, src, SPEC, limits) == expected
    assert [hyps[0][0] for hyps in beam_search(model, src, SPEC, replace(limits, beam_size=4))] == expected
