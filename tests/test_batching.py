import itertools
import random

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from nmt_ls.batching import Batch, TokenBudget, batch_by_tokens, collate, shard, update_size, updates_left

PAD, BOS, EOS = 0, 2, 3


def padded_size(batch, src_lens, tgt_lens):
    return len(batch) * max(max(src_lens[i], tgt_lens[i] + 1) for i in batch)


def as_lists(batches):
    return [b.tolist() for b in batches]


def reference_batches(src_lens, tgt_lens, max_tokens, max_sentences=None, seed=0, epoch=0, shuffle=True):
    """The implementation before vectorisation (an example at a time), kept as the oracle."""
    src_lens, tgt_lens = np.asarray(src_lens, dtype=np.int64), np.asarray(tgt_lens, dtype=np.int64)
    sizes = np.maximum(src_lens, tgt_lens + 1)
    rng = np.random.default_rng(seed + epoch)
    perm = rng.permutation(len(sizes)) if shuffle else np.arange(len(sizes))
    order = perm[np.lexsort((tgt_lens[perm], src_lens[perm], sizes[perm]))]
    batches, current, current_max = [], [], 0
    for i in order.tolist():
        new_max = max(current_max, int(sizes[i]))
        full = (len(current) + 1) * new_max > max_tokens
        if max_sentences is not None and len(current) + 1 > max_sentences:
            full = True
        if current and full:
            batches.append(current)
            current, new_max = [], int(sizes[i])
        current.append(i)
        current_max = new_max
    if current:
        batches.append(current)
    if shuffle:
        batches = [batches[j] for j in rng.permutation(len(batches))]
    return batches


@st.composite
def corpora(draw):
    n = draw(st.integers(1, 200))
    src_lens = draw(st.lists(st.integers(1, 60), min_size=n, max_size=n))
    tgt_lens = draw(st.lists(st.integers(0, 60), min_size=n, max_size=n))
    max_tokens = draw(st.integers(61, 2000))
    max_sentences = draw(st.one_of(st.none(), st.integers(1, 50)))
    return src_lens, tgt_lens, max_tokens, max_sentences


@settings(max_examples=200, deadline=None)
@given(corpora(), st.integers(0, 3), st.booleans())
def test_batches_respect_budget_and_cover_every_example_once(corpus, epoch, shuffle):
    src_lens, tgt_lens, max_tokens, max_sentences = corpus
    budget = TokenBudget(max_tokens, max_sentences)
    batches = batch_by_tokens(src_lens, tgt_lens, budget, seed=1, epoch=epoch, shuffle=shuffle)
    assert sorted(i for b in batches for i in b) == list(range(len(src_lens)))
    for b in batches:
        assert b.dtype == np.int64 and len(b) and padded_size(b, src_lens, tgt_lens) <= max_tokens
        assert max_sentences is None or len(b) <= max_sentences


@st.composite
def wide_corpora(draw):
    """Lengths up to 300, so that the sort key needs two 16-bit radix passes (size > 255)."""
    n = draw(st.integers(0, 300))
    top = draw(st.integers(1, 300))
    src_lens = draw(st.lists(st.integers(0, top), min_size=n, max_size=n))
    tgt_lens = draw(st.lists(st.integers(0, top), min_size=n, max_size=n))
    max_tokens = draw(st.integers(top + 1, 4000))
    max_sentences = draw(st.one_of(st.none(), st.integers(1, 80)))
    return src_lens, tgt_lens, max_tokens, max_sentences


@settings(max_examples=150, deadline=None)
@given(st.one_of(corpora(), wide_corpora()), st.integers(0, 1000), st.integers(0, 3), st.booleans())
def test_same_batches_as_the_example_at_a_time_reference(corpus, seed, epoch, shuffle):
    src_lens, tgt_lens, max_tokens, max_sentences = corpus
    src_array = np.array(src_lens, dtype=np.uint16)  # as MmapPairs maps them
    got = batch_by_tokens(src_array, tgt_lens, TokenBudget(max_tokens, max_sentences), seed, epoch, shuffle)
    assert as_lists(got) == reference_batches(src_lens, tgt_lens, max_tokens, max_sentences, seed, epoch, shuffle)


def test_same_batches_as_the_reference_on_a_large_random_corpus():
    rng = np.random.default_rng(0)
    src_lens, tgt_lens = rng.integers(1, 257, 20_000), rng.integers(0, 256, 20_000)
    for max_sentences in (None, 7):
        got = batch_by_tokens(src_lens, tgt_lens, TokenBudget(4000, max_sentences), seed=3, epoch=1)
        assert as_lists(got) == reference_batches(src_lens, tgt_lens, 4000, max_sentences, seed=3, epoch=1)


@settings(max_examples=150, deadline=None)
@given(corpora(), st.integers(1, 60), st.booleans())
def test_an_example_over_the_budget_is_batched_alone_when_asked(corpus, max_tokens, shuffle):
    """``over_budget_alone`` (decoding): each example larger than the budget gets a batch of its
    own, the rest are packed as before; the example-at-a-time reference does just that."""
    src_lens, tgt_lens, _, max_sentences = corpus
    budget = TokenBudget(max_tokens, max_sentences, over_budget_alone=True)
    got = as_lists(batch_by_tokens(src_lens, tgt_lens, budget, seed=2, shuffle=shuffle))
    assert got == reference_batches(src_lens, tgt_lens, max_tokens, max_sentences, seed=2, shuffle=shuffle)
    for b in got:
        assert len(b) == 1 or padded_size(b, src_lens, tgt_lens) <= max_tokens


def test_empty_corpus_gives_no_batches():
    assert batch_by_tokens([], [], 10) == []


@settings(max_examples=50, deadline=None)
@given(corpora())
def test_collated_batch_fits_the_budget(corpus):
    src_lens, tgt_lens, max_tokens, _ = corpus
    for ids in batch_by_tokens(src_lens, tgt_lens, max_tokens):
        batch = collate([[5] * src_lens[i] for i in ids], [[6] * tgt_lens[i] for i in ids], ids, PAD, BOS, EOS)
        assert batch.src.numel() <= max_tokens and batch.tgt_out.numel() <= max_tokens


def lengths(n=500, seed=0):
    rng = random.Random(seed)
    return [rng.randint(1, 40) for _ in range(n)], [rng.randint(1, 40) for _ in range(n)]


def test_same_seed_and_epoch_same_batches_other_epoch_other_order():
    src_lens, tgt_lens = lengths()
    a = as_lists(batch_by_tokens(src_lens, tgt_lens, 400, seed=7, epoch=3))
    assert a == as_lists(batch_by_tokens(src_lens, tgt_lens, 400, seed=7, epoch=3))
    assert a != as_lists(batch_by_tokens(src_lens, tgt_lens, 400, seed=7, epoch=4))
    assert a != as_lists(batch_by_tokens(src_lens, tgt_lens, 400, seed=8, epoch=3))


def test_no_shuffle_keeps_size_order_and_corpus_order_on_ties():
    src_lens, tgt_lens = [3, 1, 3, 2, 1], [1, 1, 1, 1, 1]
    batches = batch_by_tokens(src_lens, tgt_lens, 6, shuffle=False, seed=123)
    assert as_lists(batches) == [[1, 4, 3], [0, 2]]  # sizes 2,2,2 | 3,3


def test_example_over_budget_is_an_error():
    with pytest.raises(ValueError, match=r"exceed max_tokens=10.*index 1"):
        batch_by_tokens([3, 12, 4], [3, 3, 3], max_tokens=10)
    with pytest.raises(ValueError, match=r"index 0 \(src 2, tgt 10"):
        batch_by_tokens([2], [10], max_tokens=10)  # tgt needs 10 + 1 positions
    with pytest.raises(ValueError, match="equal in length"):
        batch_by_tokens([1, 2], [1], max_tokens=10)
    with pytest.raises(ValueError, match="lengths must be >= 0, got src min 1, tgt min -1"):
        batch_by_tokens([1, 2], [1, -1], max_tokens=10)


def test_collate_shapes_and_contents():
    src = [[10, 11, 12], [13]]
    tgt = [[20, 21], [22, 23, 24]]
    batch = collate(src, tgt, ids=[7, 4], pad_id=PAD, bos_id=BOS, eos_id=EOS)
    assert isinstance(batch, Batch) and len(batch) == 2 and batch.ids == [7, 4]
    assert batch.src.tolist() == [[10, 11, 12], [13, PAD, PAD]]
    assert batch.tgt_in.tolist() == [[BOS, 20, 21, PAD], [BOS, 22, 23, 24]]
    assert batch.tgt_out.tolist() == [[20, 21, EOS, PAD], [22, 23, 24, EOS]]
    assert batch.src_lengths.tolist() == [3, 1]
    assert batch.ntokens == 7 == int(batch.tgt_out.ne(PAD).sum())
    assert batch.src.dtype == batch.tgt_in.dtype == batch.tgt_out.dtype == torch.long
    # teacher forcing: tgt_in is tgt_out shifted right by one, wherever tgt_in is not pad
    keep = batch.tgt_in[:, 1:].ne(PAD)
    assert torch.equal(batch.tgt_in[:, 1:][keep], batch.tgt_out[:, :-1][keep])
    from_array = collate(src, tgt, ids=np.array([7, 4]), pad_id=PAD, bos_id=BOS, eos_id=EOS)
    assert from_array.ids == [7, 4] and all(type(i) is int for i in from_array.ids)
    moved = batch.to("cpu")
    assert torch.equal(moved.src, batch.src) and moved.ntokens == batch.ntokens


def test_collate_rejects_bad_input():
    with pytest.raises(ValueError, match="empty source"):
        collate([[]], [[1]], [5], PAD, BOS, EOS)
    with pytest.raises(ValueError, match="equal"):
        collate([[1]], [[1], [2]], [0], PAD, BOS, EOS)


@pytest.mark.parametrize("n_batches,world_size", [(10, 3), (9, 3), (4, 4), (7, 2)])
def test_shard_equal_counts(n_batches, world_size):
    batches = [[i] for i in range(n_batches)]
    shards = [shard(batches, r, world_size) for r in range(world_size)]
    assert len({len(s) for s in shards}) == 1
    seen = [b[0] for s in shards for b in s]
    assert len(seen) == len(set(seen)) == n_batches - n_batches % world_size
    padded = [shard(batches, r, world_size, drop_last=False) for r in range(world_size)]
    assert len({len(s) for s in padded}) == 1
    assert {b[0] for s in padded for b in s} == set(range(n_batches))


def test_resume_on_other_world_sizes_trains_each_batch_once():
    """2 workers train 2 updates, then 1 worker 1 update, then 3 workers the rest of the epoch
    (update_freq 2): every batch is trained once, in the epoch's order, but for the last one,
    which cannot feed 3 workers (before, progress counted one worker's batches)."""
    batches, done, trained, shards = list(range(23)), 0, [], []
    for world_size, updates in ((2, 2), (1, 1), (3, -1)):
        while updates and (n := update_size(len(batches), done, world_size, update_freq=2)):
            shards.append([shard(batches[done : done + n], r, world_size) for r in range(world_size)])
            trained += sorted(b for worker in shards[-1] for b in worker)
            done, updates = done + n, updates - 1
    assert shards[0] == [[0, 2], [1, 3]]  # as one worker accumulating batches 0-3
    assert shards[2] == [[8, 9]]
    assert shards[3] == [[10, 13], [11, 14], [12, 15]]
    assert trained == list(range(22))
    assert update_size(len(batches), 22, 3, 2) == 0 and update_size(len(batches), 22, 1, 2) == 1


def test_updates_left_counts_the_updates_the_loop_makes_with_the_last_from_the_rest():
    """The planner's count of an epoch's updates is the loop's: update_size stepped to the epoch's
    end, the last update taking the batches that remain (43 batches, update_freq 64: one update,
    where 43 // 64 planned none)."""
    assert updates_left(43, 0, 1, 64) == 1 and updates_left(43, 0, 1, 2) == 22
    for n_batches, world_size, update_freq in itertools.product(range(1, 30), (1, 2, 3), (1, 2, 5, 64)):
        for done in range(n_batches + 1):
            steps, at = 0, done
            while n := update_size(n_batches, at, world_size, update_freq):
                steps, at = steps + 1, at + n
            assert updates_left(n_batches, done, world_size, update_freq) == steps


def test_shard_bad_arguments():
    with pytest.raises(ValueError, match="rank"):
        shard([[0], [1]], 2, 2)
    with pytest.raises(ValueError, match="cannot feed"):
        shard([[0]], 0, 2)
