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
            self, src=move(self.src), tgt_in=move(self.tgt_in), tgt_out=move(self.tgt_out),
            src_lengths=move(self.src_lengths),
        )


def batch_by_tokens(
    src_lens,
    tgt_lens,
    max_tokens: int,
    max_sentences: int | None = None,
    seed: int = 0,
    epoch: int = 0,
    shuffle: bool = True,
) -> list[list[int]]:
    """Group example indices into batches under a padded-token budget.

    Examples are sorted by size (``max(src_len, tgt_len + 1)``, then source and
    target length), ties broken by a permutation seeded with ``seed + epoch``, and
    packed greedily so that ``len(batch) * max size <= max_tokens``. The batch order
    is then shuffled with the same seed. The result depends only on the lengths and
    (seed, epoch). With ``shuffle=False`` ties keep corpus order and batches stay
    sorted by size (for validation and decoding).

    Args:
        src_lens, tgt_lens: per-example lengths (ids, without bos/eos for the target).
        max_tokens: padded-token budget per batch.
        max_sentences: optional cap on examples per batch.
    Returns:
        list of batches, each a list of example indices.
    Raises:
        ValueError: an example does not fit into ``max_tokens`` on its own (filter
            long sentences first, e.g. ``data.read_pairs(max_len=...)``).
    """
    src_lens = np.asarray(src_lens, dtype=np.int64)
    tgt_lens = np.asarray(tgt_lens, dtype=np.int64)
    if src_lens.shape != tgt_lens.shape or src_lens.ndim != 1:
        raise ValueError(f"src_lens and tgt_lens must be 1-D and equal in length, got {src_lens.shape} and {tgt_lens.shape}")
    if max_tokens < 1 or (max_sentences is not None and max_sentences < 1):
        raise ValueError(f"max_tokens and max_sentences must be positive, got {max_tokens}, {max_sentences}")
    sizes = np.maximum(src_lens, tgt_lens + 1)
    too_big = np.flatnonzero(sizes > max_tokens)
    if too_big.size:
        i = int(too_big[0])
        raise ValueError(
            f"{too_big.size} example(s) exceed max_tokens={max_tokens} on their own, e.g. index {i} "
            f"(src {src_lens[i]}, tgt {tgt_lens[i]} ids -> size {sizes[i]}); "
            "raise max_tokens or filter long sentences"
        )

    rng = np.random.default_rng(seed + epoch)
    perm = rng.permutation(len(sizes)) if shuffle else np.arange(len(sizes))
    # lexsort is stable and sorts by the last key first.
    order = perm[np.lexsort((tgt_lens[perm], src_lens[perm], sizes[perm]))]

    batches: list[list[int]] = []
    current: list[int] = []
    current_max = 0
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
        ids: the examples' corpus indices.
    """
    if not (len(src_seqs) == len(tgt_seqs) == len(ids)) or not ids:
        raise ValueError(f"need equal, non-zero numbers of src, tgt and ids, got {len(src_seqs)}, {len(tgt_seqs)}, {len(ids)}")
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
        ids=list(ids),
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
