import pytest
import torch
import torch.nn.functional as F

from nmt_ls.model import Architecture, Seq2Seq, build_model

PAD, BOS, EOS = 0, 2, 3
V = 50


def small_model(seed=0, **kwargs):
    torch.manual_seed(seed)
    args = dict(d_model=32, n_heads=4, ffn_dim=64, enc_layers=2, dec_layers=2, dropout=0.1, max_positions=64)
    args.update(kwargs)
    return Seq2Seq(V, Architecture(**args), pad_id=PAD).eval()


def random_ids(*shape, generator=None):
    return torch.randint(4, V, shape, generator=generator)


def right_pad(rows):
    """Stack lists of ids into a right-padded (B, T) tensor."""
    out = torch.full((len(rows), max(len(r) for r in rows)), PAD)
    for i, r in enumerate(rows):
        out[i, : len(r)] = torch.as_tensor(r)
    return out


VARIANTS = [
    dict(),
    dict(pre_norm=False),
    dict(positions="learned"),
    dict(tie_embeddings=False),
]


@pytest.mark.parametrize("kwargs", VARIANTS)
def test_forward_shapes(kwargs):
    model = small_model(**kwargs)
    src, tgt_in = random_ids(3, 7), random_ids(3, 5)
    memory, src_pad_mask = model.encode(src)
    assert model(src, tgt_in).shape == (3, 5, V)
    assert memory.shape == (3, 7, 32)
    assert src_pad_mask.shape == (3, 7) and src_pad_mask.dtype == torch.bool
    assert model.decoder_features(src, tgt_in).shape == (3, 5, 32)


@pytest.mark.parametrize("kwargs", VARIANTS)
def test_forward_is_project_of_decoder_features(kwargs):
    model = small_model(**kwargs)
    src, tgt_in = random_ids(2, 6), random_ids(2, 4)
    features = model.decoder_features(src, tgt_in)
    assert torch.equal(model(src, tgt_in), model.project(features))
    assert torch.allclose(model.project(features), features @ model.output_weight.T, atol=1e-6)


@pytest.mark.parametrize("kwargs", VARIANTS)
def test_features_only_gives_decoder_features(kwargs):
    model = small_model(**kwargs)
    src, tgt_in = random_ids(2, 6), random_ids(2, 4)
    features = model(src, tgt_in, features_only=True)  # (B, T, D)
    assert torch.equal(features, model.decoder_features(src, tgt_in))
    assert torch.equal(model(src, tgt_in, features_only=False), model.project(features))


def test_tied_output_weight_is_embedding():
    model = small_model()
    assert model.output_weight is model.embed.weight
    assert (
        sum(p.numel() for p in model.parameters())
        == sum(p.numel() for p in small_model(tie_embeddings=False).parameters()) - V * 32
    )
    untied = small_model(tie_embeddings=False)
    assert untied.output_weight is not untied.embed.weight
    assert untied.output_weight.shape == (V, 32)


def test_init_zeroes_pad_embedding():
    model = small_model()
    assert torch.all(model.embed.weight[PAD] == 0)
    assert model.embed.weight[4:].std().item() == pytest.approx(32**-0.5, rel=0.1)


def test_src_pad_mask_marks_pad():
    model = small_model()
    src = right_pad([[5, 6, 7], [8, 9]])
    _, src_pad_mask = model.encode(src)
    assert src_pad_mask.tolist() == [[False, False, False], [False, False, True]]


@pytest.mark.parametrize("kwargs", VARIANTS)
def test_padding_does_not_change_logits(kwargs):
    model = small_model(**kwargs)
    g = torch.Generator().manual_seed(1)
    short_src, long_src = random_ids(4, generator=g).tolist(), random_ids(9, generator=g).tolist()
    short_tgt, long_tgt = random_ids(3, generator=g).tolist(), random_ids(7, generator=g).tolist()
    alone = model(torch.tensor([short_src]), torch.tensor([short_tgt]))[0]  # (3, V)
    batched = model(right_pad([long_src, short_src]), right_pad([long_tgt, short_tgt]))[1, :3]
    torch.testing.assert_close(batched, alone, atol=1e-5, rtol=0)


@pytest.mark.parametrize("kwargs", VARIANTS)
def test_decoder_is_causal(kwargs):
    model = small_model(**kwargs)
    src, tgt_in = random_ids(2, 6), random_ids(2, 8)
    t = 5
    changed = tgt_in.clone()
    changed[:, t] = (changed[:, t] - 4 + 1) % (V - 4) + 4
    before, after = model(src, tgt_in), model(src, changed)
    torch.testing.assert_close(after[:, :t], before[:, :t], atol=1e-6, rtol=0)
    assert not torch.allclose(after[:, t:], before[:, t:])


def test_source_padding_is_masked():
    # What sits in a pad position must not matter: replace pad embeddings by garbage.
    model = small_model(tie_embeddings=False)  # tied, the pad row would also change the pad logit
    src = right_pad([[5, 6, 7, 8], [9, 10]])
    tgt_in = random_ids(2, 4)
    reference = model(src, tgt_in)
    with torch.no_grad():
        model.embed.weight[PAD] = torch.randn(32) * 10
    torch.testing.assert_close(model(src, tgt_in), reference, atol=1e-5, rtol=0)


@pytest.mark.parametrize("kwargs", VARIANTS)
def test_incremental_decoding_matches_full(kwargs):
    model = small_model(**kwargs)
    src = right_pad([random_ids(7).tolist(), random_ids(4).tolist(), random_ids(6).tolist()])
    tgt_in = torch.cat([torch.full((3, 1), BOS), random_ids(3, 9)], dim=1)  # (3, 10)
    full = model(src, tgt_in)  # (3, 10, V)
    memory, src_pad_mask = model.encode(src)
    cache = model.new_cache()
    steps = [
        model.project(model.decode(tgt_in[:, t : t + 1], memory, src_pad_mask, cache)) for t in range(tgt_in.size(1))
    ]
    torch.testing.assert_close(torch.cat(steps, dim=1), full, atol=1e-5, rtol=0)


def test_incremental_decoding_in_chunks_matches_full():
    # Several new positions at once on a non-empty cache need a shifted causal mask.
    model = small_model()
    src, tgt_in = random_ids(2, 5), random_ids(2, 9)
    full = model(src, tgt_in)
    memory, src_pad_mask = model.encode(src)
    cache = model.new_cache()
    chunks = [
        model.project(model.decode(tgt_in[:, a:b], memory, src_pad_mask, cache)) for a, b in [(0, 3), (3, 4), (4, 9)]
    ]
    torch.testing.assert_close(torch.cat(chunks, dim=1), full, atol=1e-5, rtol=0)


def test_reorder_cache_selects_rows():
    model = small_model()
    src, tgt_in = random_ids(3, 5), random_ids(3, 4)
    order = torch.tensor([2, 2, 0])
    full = model(src[order], tgt_in[order])
    memory, src_pad_mask = model.encode(src)
    cache = model.new_cache()
    first = model.project(model.decode(tgt_in[:, :2], memory, src_pad_mask, cache))
    model.reorder_cache(cache, order)
    rest = model.project(model.decode(tgt_in[order, 2:], memory[order], src_pad_mask[order], cache))
    torch.testing.assert_close(torch.cat([first[order], rest], dim=1), full, atol=1e-5, rtol=0)


def test_too_long_input_raises():
    model = small_model(max_positions=8)
    with pytest.raises(ValueError, match="max_positions"):
        model(random_ids(1, 9), random_ids(1, 3))


def test_dropout_only_in_train_mode():
    model = small_model(dropout=0.3, attn_dropout=0.3)
    src, tgt_in = random_ids(2, 5), random_ids(2, 4)
    assert torch.equal(model(src, tgt_in), model(src, tgt_in))
    model.train()
    assert not torch.equal(model(src, tgt_in), model(src, tgt_in))


def test_backward_reaches_all_parameters():
    model = small_model(tie_embeddings=False, positions="learned").train()
    src, tgt = random_ids(3, 6), random_ids(3, 5)
    F.cross_entropy(model(src, tgt[:, :-1]).flatten(0, 1), tgt[:, 1:].flatten()).backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name


def test_build_model_takes_model_config_fields():
    fields = dict(
        d_model=32,
        n_heads=2,
        ffn_dim=48,
        enc_layers=1,
        dec_layers=2,
        dropout=0.0,
        attn_dropout=0.0,
        pre_norm=False,
        positions="learned",
        tie_embeddings=False,
        max_positions=16,
    )
    model = build_model(V, PAD, **fields)
    assert isinstance(model, Seq2Seq)
    assert len(model.encoder) == 1 and len(model.decoder) == 2
    assert model.pad_id == PAD and model.max_positions == 16
    assert model.decoder[0].ffn[0].out_features == 48
    with pytest.raises(ValueError, match="positions must be 'sinusoidal' or 'learned', got 'rotary'"):
        build_model(V, PAD, positions="rotary")
