"""Token-budget batching (fairseq style) and padding into a ``Batch``.

Sizes count padded positions: an example with ``s`` source ids and ``t`` target
ids occupies ``max(s, t + 1)`` positions (the decoder sees ``[bos] + y`` and
predicts ``y + [eos]``), and a batch of ``n`` examples costs ``n * max size``.
Source sequences are used exactly as given (append an eos yourself if the model
wants one, and count it in ``src_lens``).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import numpy as np
import torch
from torch import Tensor


@dataclass
class Batch:
    """One padded batch; right padding with ``pad_id``.

    Attributes:
        src (Tensor): source ids, shape (B, S).
        tgt_in (Tensor): ``[bos] + y``, shape (B, T).
        tgt_out (Tensor): ``y + [eos]``, shape (B, T).
        ntokens (int): non-pad positions of ``tgt_out``.
        src_lengths (Tensor): shape (B,).
        ids (list[int]): the examples' indices in the corpus, to restore order.
    """

    src: Tensor
    tgt_in: Tensor
    tgt_out: Tensor
    ntokens: int
    src_lengths: Tensor
    ids: list[int] = field(default_factory=list)

    def __len__(self) -> int:
        return self.src.size(0)

    def to(self, device, non_blocking: bool = False) -> Batch:
        move = lambda t: t.to(device, non_blocking=non_blocking)  # noqa: E731
        return replace(
            self,
            src=move(self.src),
            tgt_in=move(self.tgt_in),
            tgt_out=move(self.tgt_out),
            src_lengths=move(self.src_lengths),
        )


@dataclass(frozen=True)
class TokenBudget:
    """What one batch may hold.

    Attributes:
        max_tokens (int): padded positions (``len(batch) * max size``).
        max_sentences (int | None): examples. Default: no cap.
        over_budget_alone (bool): an example larger than ``max_tokens`` gets a batch of its own
            (decoding, as CTranslate2's token batches and fairseq's example-at-a-time batching
            do) instead of an error (training, where the budget bounds the memory). Default: False
    """

    max_tokens: int
    max_sentences: int | None = None
    over_budget_alone: bool = False


def batch_by_tokens(
    src_lens,
    tgt_lens,
    max_tokens: int | TokenBudget,
    seed: int = 0,
    epoch: int = 0,
    shuffle: bool = True,
) -> list[np.ndarray]:
    """Group example indices into batches under a padded-token budget.

    Examples are sorted by size (``max(src_len, tgt_len + 1)``, then source and
    target length), ties broken by a permutation seeded with ``seed + epoch``, and
    packed greedily so that ``len(batch) * max size <= max_tokens``. The batch order
    is then shuffled with the same seed. The result depends only on the lengths and
    (seed, epoch). With ``shuffle=False`` ties keep corpus order and batches stay
    sorted by size (for validation and decoding).

    Sorting and packing are vectorised (about a second for 5M examples): no Python
    object per example is made, and the batches are views into one index array.

    Args:
        src_lens, tgt_lens: per-example lengths (ids, without bos/eos for the target),
            sequences or 1-D integer arrays (e.g. ``MmapPairs.src_lens``).
        max_tokens: padded-token budget per batch, or a ``TokenBudget`` that also caps
            the examples per batch.
    Returns:
        list of batches, each a 1-D int64 array of example indices.
    Raises:
        ValueError: an example does not fit into ``max_tokens`` on its own (filter
            long sentences first, e.g. with ``data.PairFilter(max_len=...)``; with
            ``TokenBudget(over_budget_alone=True)`` it is batched alone), or a length is negative.
    """
    budget = max_tokens if isinstance(max_tokens, TokenBudget) else TokenBudget(max_tokens)
    src_lens, tgt_lens, sizes = _sizes(src_lens, tgt_lens, budget)
    if not sizes.size:
        return []
    rng = np.random.default_rng(seed + epoch)
    perm = rng.permutation(len(sizes)) if shuffle else np.arange(len(sizes))
    # Dense rank of (size, src_len, tgt_len): size v holds 2v keys, (s, v - 1) for s < v
    # and then (v, t) for t < v, after the v * (v - 1) keys of the smaller sizes.
    rank = sizes * (sizes - 1) + np.where(src_lens < sizes, src_lens, sizes + tgt_lens)
    order = perm[_stable_argsort(rank[perm])]
    ends = _pack(sizes[order], budget.max_tokens, budget.max_sentences)
    batches = np.split(order, ends[:-1])
    if shuffle:
        batches = [batches[j] for j in rng.permutation(len(batches))]
    return batches


def untrained_batches(src_lens, tgt_lens, max_tokens: int, seed: int, epoch: int, earlier=()) -> list[np.ndarray]:
    """Epoch ``epoch``'s batches under ``max_tokens`` of the pairs that its ``earlier`` budgets
    left untrained: ``batch_by_tokens`` of all pairs when there are none.

    ``earlier`` lists ``(max_tokens, batches)`` for each token budget that this epoch was
    trained under before (a ``--resume`` with another ``train.max_tokens``), in order: each
    trained the first ``batches`` of the batching, under it, of the pairs left by those before.
    So a changed budget skips exactly the pairs already trained in the epoch, and trains every
    other pair once.
    """
    if not earlier:
        return batch_by_tokens(src_lens, tgt_lens, max_tokens, seed=seed, epoch=epoch)
    src_lens, tgt_lens = np.asarray(src_lens), np.asarray(tgt_lens)
    pairs = np.arange(len(src_lens))  # the untrained pairs, in corpus order
    for budget, trained in earlier:
        batches = batch_by_tokens(src_lens[pairs], tgt_lens[pairs], budget, seed=seed, epoch=epoch)
        pairs = pairs[np.sort(np.concatenate([np.zeros(0, np.int64), *batches[trained:]]))]
    batches = batch_by_tokens(src_lens[pairs], tgt_lens[pairs], max_tokens, seed=seed, epoch=epoch)
    return [pairs[b] for b in batches]


def _sizes(src_lens, tgt_lens, budget: TokenBudget) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The lengths as int64 arrays and each example's size, checked against ``budget``."""
    src_lens = np.asarray(src_lens, dtype=np.int64)
    tgt_lens = np.asarray(tgt_lens, dtype=np.int64)
    if src_lens.shape != tgt_lens.shape or src_lens.ndim != 1:
        raise ValueError(
            f"src_lens and tgt_lens must be 1-D and equal in length, got {src_lens.shape} and {tgt_lens.shape}"
        )
    max_tokens, max_sentences = budget.max_tokens, budget.max_sentences
    if max_tokens < 1 or (max_sentences is not None and max_sentences < 1):
        raise ValueError(f"max_tokens and max_sentences must be positive, got {max_tokens}, {max_sentences}")
    if src_lens.size and min(src_lens.min(), tgt_lens.min()) < 0:
        raise ValueError(f"lengths must be >= 0, got src min {src_lens.min()}, tgt min {tgt_lens.min()}")
    sizes = np.maximum(src_lens, tgt_lens + 1)
    too_big = np.flatnonzero(sizes > max_tokens)
    if too_big.size and not budget.over_budget_alone:
        i = int(too_big[0])
        raise ValueError(
            f"{too_big.size} example(s) exceed max_tokens={max_tokens} on their own, e.g. index {i} "
            f"(src {src_lens[i]}, tgt {tgt_lens[i]} ids -> size {sizes[i]}); "
            "raise max_tokens or filter long sentences"
        )
    return src_lens, tgt_lens, sizes


def _stable_argsort(keys: np.ndarray) -> np.ndarray:
    """``np.argsort(keys, kind="stable")`` for non-negative ints, as one or two passes of
    numpy's radix sort on 16-bit digits (several times faster than its int64 timsort)."""
    top = int(keys.max())
    if top >= 2**32:
        return np.argsort(keys, kind="stable")
    order = np.argsort((keys & 0xFFFF).astype(np.uint16), kind="stable")
    if top >= 2**16:
        order = order[np.argsort((keys[order] >> 16).astype(np.uint16), kind="stable")]
    return order


def _pack(sorted_sizes: np.ndarray, max_tokens: int, max_sentences: int | None) -> np.ndarray:
    """End positions of the greedy batches over non-decreasing ``sorted_sizes``.

    A batch started at ``j`` takes example ``k >= j`` while ``(k - j + 1) * sorted_sizes[k] <=
    max_tokens`` (the newest example is the largest so far). The product grows with ``k``, so
    the batch is the longest prefix of ``sorted_sizes[j : j + max_tokens // sorted_sizes[j]]``
    that satisfies it. Inside a run of one size ``v`` the batches are simply
    ``min(max_tokens // v, max_sentences)`` long (1 where ``v > max_tokens``: an example over the
    budget, which only ``TokenBudget.over_budget_alone`` lets through, goes alone); only a batch
    that reaches past its run needs that search, so the loop runs once per distinct size.
    """
    n = len(sorted_sizes)
    cap = n if max_sentences is None else max_sentences
    run_ends = np.append(np.flatnonzero(np.diff(sorted_sizes)) + 1, n)
    ends = []
    j = 0
    for run_end in run_ends.tolist():
        if j >= run_end:  # a previous batch reached past this run
            continue
        step = max(1, min(max_tokens // int(sorted_sizes[j]), cap))
        whole = (run_end - j) // step  # batches that end inside the run
        ends.append(j + step * np.arange(1, whole + 1))
        j += step * whole
        if j < run_end:  # the next batch starts in this run and reaches past it
            window = sorted_sizes[j : j + step]
            j += int(np.count_nonzero(np.arange(1, len(window) + 1) * window <= max_tokens))
            ends.append(np.array([j]))
    return np.concatenate(ends)


def collate(
    src_seqs: list[list[int]],
    tgt_seqs: list[list[int]],
    ids: list[int],
    pad_id: int,
    bos_id: int,
    eos_id: int,
) -> Batch:
    """Pad a list of examples on the right into a ``Batch``.

    Args:
        src_seqs: source ids per example, used as given (must be non-empty).
        tgt_seqs: target ids per example, without bos/eos.
        ids: the examples' corpus indices (a list or a 1-D array).
    """
    if not (len(src_seqs) == len(tgt_seqs) == len(ids)) or len(ids) == 0:
        raise ValueError(
            f"need equal, non-zero numbers of src, tgt and ids, got {len(src_seqs)}, {len(tgt_seqs)}, {len(ids)}"
        )
    for seq, i in zip(src_seqs, ids):
        if len(seq) == 0:
            raise ValueError(f"example {i} has an empty source sequence")
    B = len(ids)
    S = max(len(s) for s in src_seqs)
    T = max(len(t) for t in tgt_seqs) + 1
    src = torch.full((B, S), pad_id, dtype=torch.long)  # (B, S)
    tgt_in = torch.full((B, T), pad_id, dtype=torch.long)  # (B, T)
    tgt_out = torch.full((B, T), pad_id, dtype=torch.long)  # (B, T)
    for b, (s, t) in enumerate(zip(src_seqs, tgt_seqs)):
        src[b, : len(s)] = torch.as_tensor(s, dtype=torch.long)
        tgt_in[b, : len(t) + 1] = torch.as_tensor([bos_id, *t], dtype=torch.long)
        tgt_out[b, : len(t) + 1] = torch.as_tensor([*t, eos_id], dtype=torch.long)
    return Batch(
        src=src,
        tgt_in=tgt_in,
        tgt_out=tgt_out,
        ntokens=sum(len(t) + 1 for t in tgt_seqs),
        src_lengths=torch.tensor([len(s) for s in src_seqs], dtype=torch.long),
        ids=[int(i) for i in ids],
    )


def shard(batches: list, rank: int, world_size: int, drop_last: bool = True) -> list:
    """This worker's batches: every ``world_size``-th one, starting at ``rank``.

    Every worker gets the same number of batches (needed for lock-step gradient
    all-reduce). ``drop_last=True`` drops the last ``len(batches) % world_size``
    batches (call ``batch_by_tokens`` with a new epoch to vary which);
    ``drop_last=False`` instead repeats batches from the start to fill the round.
    """
    if not 0 <= rank < world_size:
        raise ValueError(f"rank must be in [0, {world_size}), got {rank}")
    if len(batches) < world_size:
        raise ValueError(f"{len(batches)} batches cannot feed {world_size} workers")
    remainder = len(batches) % world_size
    if remainder and drop_last:
        batches = batches[: len(batches) - remainder]
    elif remainder:
        batches = batches + batches[: world_size - remainder]
    return batches[rank::world_size]


def update_size(n_batches: int, done: int, world_size: int, update_freq: int) -> int:
    """How many of an epoch's ``n_batches`` the next update trains on, all workers together,
    once its first ``done`` are trained: ``update_freq`` batches per worker (fewer at the
    epoch's end), a multiple of ``world_size``; 0 when fewer than ``world_size`` are left (that
    tail is dropped, as ``shard`` drops it). The update's batches are
    ``batches[done : done + n]``, worker r's the ``shard`` of them; so a run resumed on another
    number of workers goes on at batch ``done``, the first that no worker has trained."""
    return min(update_freq * world_size, trainable_batches(n_batches, done, world_size))


def updates_left(n_batches: int, done: int, world_size: int, update_freq: int) -> int:
    """How many updates :func:`update_size` makes of an epoch's ``n_batches`` once its first
    ``done`` are trained: ``ceil(b / (update_freq * world_size))`` of the ``b`` trainable batches
    left, the last update taking the batches that remain."""
    return -(-trainable_batches(n_batches, done, world_size) // (update_freq * world_size))


def trainable_batches(n_batches: int, done: int, world_size: int) -> int:
    """The batches left after the first ``done`` that feed ``world_size`` workers alike (the
    tail of fewer than ``world_size`` is dropped)."""
    left = n_batches - done
    return left - left % world_size
