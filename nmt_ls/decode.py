"""Greedy and beam search for :class:`nmt_ls.model.Seq2Seq`.

Shared conventions:
    * ``src`` is right-padded, shape (B, S). Outputs are token ids without bos and eos.
    * Sentence i may produce at most ``int(max_len_a * src_len_i + max_len_b)`` tokens before
      eos (fairseq semantics; ``src_len_i`` excludes padding), capped so that the decoder input
      fits in ``model.max_positions``. At that length eos is forced.
    * pad and bos are never generated: they are masked before the softmax, so the scores are
      log-probabilities over the tokens that can be emitted (as CTranslate2 computes them).
    * The search runs the model in eval mode and restores its previous mode afterwards.
    * ``use_cache=True`` runs one position per step on the incremental K/V cache;
      ``use_cache=False`` re-runs the full prefix each step (slow reference).
    * Sentences that are finished are dropped from the batch, so long and short sentences
      can share a batch without the short ones costing extra steps.
"""

import math
from contextlib import contextmanager

import torch
from torch import Tensor

from nmt_ls.model import Seq2Seq


def _max_lens(model: Seq2Seq, src: Tensor, pad_id: int, max_len_a: float, max_len_b: int) -> Tensor:
    src_lens = src.ne(pad_id).sum(dim=1)  # (B,)
    max_lens = (max_len_a * src_lens.double() + max_len_b).long()
    return max_lens.clamp(min=0, max=model.max_positions - 1)


def _next_lprobs(
    model: Seq2Seq, tokens: Tensor, memory: Tensor, src_pad_mask: Tensor, cache, bos_id: int, pad_id: int
) -> Tensor:
    """Log-probabilities of the next token given the prefix ``tokens`` (N, t): (N, V)."""
    if cache is not None:
        features = model.decode(tokens[:, -1:], memory, src_pad_mask, cache)  # (N, 1, D)
    else:
        features = model.decode(tokens, memory, src_pad_mask)  # (N, t, D)
    logits = model.project(features[:, -1]).float()  # (N, V)
    # pad and bos can never be emitted: the distribution is over the tokens that can.
    logits[:, pad_id] = -math.inf
    logits[:, bos_id] = -math.inf
    return torch.log_softmax(logits, dim=-1)


@contextmanager
def _eval_mode(model: Seq2Seq):
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


@torch.no_grad()
def greedy_search(
    model: Seq2Seq,
    src: Tensor,
    bos_id: int,
    eos_id: int,
    pad_id: int,
    max_len_a: float = 1.2,
    max_len_b: int = 10,
    use_cache: bool = True,
) -> list[list[int]]:
    """Greedy decoding, batched over sentences.

    Args:
        model (Seq2Seq): the model; run in eval mode, its mode is restored afterwards.
        src (Tensor): right-padded source ids, shape (B, S).
        bos_id, eos_id, pad_id (int): special token ids.
        max_len_a, max_len_b: at most ``int(a * src_len + b)`` tokens before eos. Default: 1.2, 10
        use_cache (bool): incremental decoding with a K/V cache. Default: True
    Returns:
        list of B token-id lists, without bos and eos.
    """
    if src.size(0) == 0:
        return []
    with _eval_mode(model):
        memory, src_pad_mask = model.encode(src)  # (B, S, D), (B, S)
        max_lens = _max_lens(model, src, pad_id, max_len_a, max_len_b)  # (B,)
        rows = torch.arange(src.size(0), device=src.device)  # original row of each active sentence
        tokens = src.new_full((src.size(0), 1), bos_id)  # (B, 1)
        cache = model.new_cache() if use_cache else None
        hyps: list[list[int]] = [[] for _ in range(src.size(0))]
        for step in range(int(max_lens.max()) + 1):
            lprobs = _next_lprobs(model, tokens, memory, src_pad_mask, cache, bos_id, pad_id)
            next_tokens = lprobs.argmax(dim=-1)  # (N,)
            next_tokens[step >= max_lens] = eos_id
            tokens = torch.cat([tokens, next_tokens[:, None]], dim=1)  # (N, step + 2)
            done = next_tokens.eq(eos_id)
            if done.any():
                for i in done.nonzero().squeeze(1).tolist():
                    hyps[int(rows[i])] = tokens[i, 1:-1].tolist()
                keep = (~done).nonzero().squeeze(1)
                if keep.numel() == 0:
                    break
                tokens, memory, src_pad_mask = tokens[keep], memory[keep], src_pad_mask[keep]
                max_lens, rows = max_lens[keep], rows[keep]
                if cache is not None:
                    model.reorder_cache(cache, keep)
        return hyps


def _length_norm(length: int, len_penalty: float, style: str) -> float:
    if style == "fairseq":
        return length**len_penalty
    if style == "gnmt":
        return ((5 + length) / 6) ** len_penalty
    raise ValueError(f"len_penalty_style must be 'fairseq' or 'gnmt', got {style!r}")


@torch.no_grad()
def beam_search(
    model: Seq2Seq,
    src: Tensor,
    bos_id: int,
    eos_id: int,
    pad_id: int,
    beam_size: int = 5,
    len_penalty: float = 1.0,
    max_len_a: float = 1.2,
    max_len_b: int = 10,
    nbest: int = 1,
    use_cache: bool = True,
    len_penalty_style: str = "fairseq",
) -> list[list[tuple[list[int], float]]]:
    """Beam search, batched over sentences (all beams of all sentences in one tensor).

    Scores: a hypothesis of ``L`` tokens plus eos has log-probability ``lp_sum`` (eos
    included) and final score ``lp_sum / L' ** len_penalty`` with ``L' = L + 1`` (eos counted,
    as in fairseq), or ``lp_sum / ((5 + L') / 6) ** len_penalty`` with ``len_penalty_style="gnmt"``.
    ``len_penalty=0`` scores by the plain sum of log-probabilities.

    Search: each step takes the top ``2 * beam_size`` expansions of the active beams;
    eos expansions among the first ``beam_size`` become finished hypotheses, and the best
    ``beam_size`` non-eos expansions stay active. A sentence stops as soon as it has
    ``beam_size`` finished hypotheses, or at its maximum length, where eos is forced
    (fairseq's early stop: an active beam could in principle still have overtaken them).

    Args:
        model (Seq2Seq): the model; run in eval mode, its mode is restored afterwards.
        src (Tensor): right-padded source ids, shape (B, S).
        bos_id, eos_id, pad_id (int): special token ids.
        beam_size (int): beams per sentence. Default: 5
        len_penalty (float): length-normalisation exponent. Default: 1.0
        max_len_a, max_len_b: at most ``int(a * src_len + b)`` tokens before eos. Default: 1.2, 10
        nbest (int): hypotheses returned per sentence, at most ``beam_size``. Default: 1
        use_cache (bool): incremental decoding with a K/V cache. Default: True
        len_penalty_style (str): "fairseq" or "gnmt". Default: "fairseq"
    Returns:
        for each of the B sentences, up to ``nbest`` ``(tokens, score)`` pairs, best first;
        tokens exclude bos and eos.
    """
    if not 1 <= nbest <= beam_size:
        raise ValueError(f"need 1 <= nbest <= beam_size, got nbest={nbest}, beam_size={beam_size}")
    _length_norm(1, len_penalty, len_penalty_style)  # validate the style up front
    if src.size(0) == 0:
        return []
    K = beam_size
    with _eval_mode(model):
        memory, src_pad_mask = model.encode(src)  # (B, S, D), (B, S)
        max_lens = _max_lens(model, src, pad_id, max_len_a, max_len_b)  # (B,)
        B = src.size(0)
        memory = memory.repeat_interleave(K, dim=0)  # (B*K, S, D)
        src_pad_mask = src_pad_mask.repeat_interleave(K, dim=0)  # (B*K, S)
        rows = torch.arange(B, device=src.device)  # original sentence of each active sentence
        tokens = src.new_full((B * K, 1), bos_id)  # (B*K, 1)
        # Only the first beam is live at the start, so the K beams do not duplicate each other.
        scores = torch.full((B, K), -math.inf, device=src.device)  # (B, K) summed log-probs
        scores[:, 0] = 0.0
        cache = model.new_cache() if use_cache else None
        finished: list[list[tuple[list[int], float]]] = [[] for _ in range(B)]
        beam_offsets = torch.arange(2 * K, device=src.device)  # (2K,)

        for step in range(int(max_lens.max()) + 1):
            N = scores.size(0)  # active sentences
            lprobs = _next_lprobs(model, tokens, memory, src_pad_mask, cache, bos_id, pad_id)  # (N*K, V)
            V = lprobs.size(-1)
            lprobs = lprobs.view(N, K, V)
            at_max = step >= max_lens  # (N,)
            if at_max.any():
                eos_lprobs = lprobs[at_max, :, eos_id]
                lprobs[at_max] = -math.inf
                lprobs[at_max, :, eos_id] = eos_lprobs
            cand_scores, cand_idx = (scores[:, :, None] + lprobs).view(N, K * V).topk(2 * K, dim=1)  # (N, 2K)
            cand_beams, cand_tokens = cand_idx // V, cand_idx % V
            cand_eos = cand_tokens.eq(eos_id)

            # Finish the eos expansions that rank among the top K.
            norm = _length_norm(step + 1, len_penalty, len_penalty_style)
            to_finish = cand_eos[:, :K] & cand_scores[:, :K].isfinite()
            for i, j in to_finish.nonzero().tolist():
                hyp = tokens[i * K + cand_beams[i, j], 1:].tolist()
                finished[int(rows[i])].append((hyp, cand_scores[i, j].item() / norm))
            n_finished = torch.tensor([len(finished[r]) for r in rows.tolist()], device=src.device)
            done = at_max | n_finished.ge(K)  # (N,)

            # Keep the first K non-eos expansions, in score order.
            rank = cand_eos.long() * (2 * K) + beam_offsets  # eos expansions sort last
            keep_pos = rank.topk(K, dim=1, largest=False).indices  # (N, K)
            scores = cand_scores.gather(1, keep_pos)
            next_beams = cand_beams.gather(1, keep_pos)
            next_tokens = cand_tokens.gather(1, keep_pos)

            live = (~done).nonzero().squeeze(1)  # (N',)
            if live.numel() == 0:
                break
            order = (live[:, None] * K + next_beams[live]).view(-1)  # (N'*K,) rows of the old batch
            tokens = torch.cat([tokens[order], next_tokens[live].view(-1, 1)], dim=1)  # (N'*K, step + 2)
            scores, max_lens, rows = scores[live], max_lens[live], rows[live]
            if live.numel() < N:
                beam_rows = (live[:, None] * K + torch.arange(K, device=src.device)).view(-1)
                memory, src_pad_mask = memory[beam_rows], src_pad_mask[beam_rows]
            if cache is not None:
                model.reorder_cache(cache, order)

        return [sorted(hyps, key=lambda h: -h[1])[:nbest] for hyps in finished]
