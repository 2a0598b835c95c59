"""Greedy and beam search for :class:`nmt_ls.model.Seq2Seq`.

Shared conventions:
    * ``src`` is right-padded, shape (B, S). Outputs are token ids without bos and eos.
    * ``spec`` (:class:`SearchSpec`) gives the special ids and the decoding mode; ``options``
      (:class:`nmt_ls.config.EvalConfig`) the beam size, length penalty and length limit.
    * Sentence i has at most ``L_i = int(max_len_a * src_len_i + max_len_b)`` decoding steps
      (fairseq's limit; ``src_len_i`` excludes padding), capped so that the decoder input fits
      in ``model.max_positions`` (:func:`nmt_ls.engines.max_output_len`). The last step is
      CTranslate2's: every hypothesis it keeps ends there as it is, with eos (``L_i - 1`` tokens)
      or cut after its ``L_i``-th token, scored by its tokens' log-probabilities alone, so that
      both engines give the same hypotheses (fairseq forces eos there instead, which CTranslate2
      cannot do). Greedy ids are fairseq's either way: the greedy path cut at ``L_i`` tokens.
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
from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import Tensor

from nmt_ls.config import EvalConfig
from nmt_ls.engines import max_output_len
from nmt_ls.model import Seq2Seq


@dataclass(frozen=True)
class SearchSpec:
    """What a search needs besides the model, the source and the options.

    Args:
        bos_id, eos_id, pad_id (int): special token ids (``SearchSpec(tok.bos_id, tok.eos_id, tok.pad_id)``).
        use_cache (bool): incremental decoding with a K/V cache; False re-runs the whole prefix
            each step (the slow reference). Default: True
    """

    bos_id: int
    eos_id: int
    pad_id: int
    use_cache: bool = True


@contextmanager
def _eval_mode(model: Seq2Seq):
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


class _Active:
    """The sentences still being decoded, ``beams`` rows each (sentence-major): the prefixes,
    encoder output and K/V cache of every row; the length limit and source row of every sentence."""

    def __init__(self, model: Seq2Seq, src: Tensor, spec: SearchSpec, options: EvalConfig, beams: int = 1):
        memory, src_pad_mask = model.encode(src)  # (B, S, D), (B, S)
        limits = [max_output_len(n, options, model.max_positions) for n in src.ne(spec.pad_id).sum(1).tolist()]
        self.model, self.spec, self.beams = model, spec, beams
        self.memory = memory.repeat_interleave(beams, dim=0)  # (B*K, S, D)
        self.src_pad_mask = src_pad_mask.repeat_interleave(beams, dim=0)  # (B*K, S)
        self.max_lens = torch.tensor(limits, device=src.device)  # (B,) decoding steps allowed
        self.rows = torch.arange(src.size(0), device=src.device)  # (B,) each sentence's row of src
        self.tokens = src.new_full((src.size(0) * beams, 1), spec.bos_id)  # (B*K, 1) prefixes
        self.cache = model.new_cache() if spec.use_cache else None

    def next_lprobs(self) -> Tensor:
        """(N*K, V) log-probabilities of the token after each prefix, over the tokens that can be
        emitted: pad and bos are masked before the softmax."""
        if self.cache is not None:
            features = self.model.decode(self.tokens[:, -1:], self.memory, self.src_pad_mask, self.cache)  # (N*K, 1, D)
        else:
            features = self.model.decode(self.tokens, self.memory, self.src_pad_mask)  # (N*K, t, D)
        logits = self.model.project(features[:, -1]).float()  # (N*K, V)
        logits[:, self.spec.pad_id] = -math.inf
        logits[:, self.spec.bos_id] = -math.inf
        return torch.log_softmax(logits, dim=-1)

    def extend(self, next_tokens: Tensor, order: Tensor | None = None) -> None:
        """Append ``next_tokens`` (N'*K,) to the prefixes of the rows ``order`` (N'*K,) of the
        batch, the cache reordered alike; ``order=None``: every row, in place."""
        if order is not None:
            self.tokens = self.tokens[order]
            if self.cache is not None:
                self.model.reorder_cache(self.cache, order)
        self.tokens = torch.cat([self.tokens, next_tokens[:, None]], dim=1)  # (N'*K, t + 1)

    def keep(self, live: Tensor) -> None:
        """Keep the encoder output, limits and source rows of the sentences ``live`` (N',),
        indices among the active ones (the prefixes and cache follow :meth:`extend`)."""
        if live.numel() < self.rows.numel():
            beam_rows = (live[:, None] * self.beams + torch.arange(self.beams, device=live.device)).view(-1)
            self.memory, self.src_pad_mask = self.memory[beam_rows], self.src_pad_mask[beam_rows]
        self.max_lens, self.rows = self.max_lens[live], self.rows[live]


@torch.no_grad()
def greedy_search(model: Seq2Seq, src: Tensor, spec: SearchSpec, options: EvalConfig) -> list[list[int]]:
    """Greedy decoding, batched over sentences.

    Args:
        model (Seq2Seq): the model; run in eval mode, its mode is restored afterwards.
        src (Tensor): right-padded source ids, shape (B, S).
        spec (SearchSpec): special ids and decoding mode.
        options (EvalConfig): only the length limit ``max_len_a``, ``max_len_b`` applies.
    Returns:
        list of B token-id lists, without bos and eos.
    """
    if src.size(0) == 0:
        return []
    with _eval_mode(model):
        active = _Active(model, src, spec, options)
        hyps: list[list[int]] = [[] for _ in range(src.size(0))]
        for step in range(int(active.max_lens.max())):
            next_tokens = active.next_lprobs().argmax(dim=-1)  # (N,)
            ended = next_tokens.eq(spec.eos_id)
            done = ended | (step + 1 >= active.max_lens)  # eos, or the last step: cut after its token
            if not done.any():
                active.extend(next_tokens)
                continue
            for i in done.nonzero().squeeze(1).tolist():
                last = [] if ended[i] else [int(next_tokens[i])]
                hyps[int(active.rows[i])] = active.tokens[i, 1:].tolist() + last
            live = (~done).nonzero().squeeze(1)  # (N',)
            if live.numel() == 0:
                break
            active.extend(next_tokens[live], order=live)
            active.keep(live)
        return hyps


def _length_norm(length: int, len_penalty: float, style: str) -> float:
    if style == "fairseq":
        return length**len_penalty
    if style == "gnmt":
        return ((5 + length) / 6) ** len_penalty
    raise ValueError(f"len_penalty_style must be 'fairseq' or 'gnmt', got {style!r}")


class _Candidates(NamedTuple):
    """The top ``2 * K`` expansions of each active sentence's K beams, best first."""

    scores: Tensor  # (N, 2K) summed log-probabilities
    beams: Tensor  # (N, 2K) the beam each one extends
    tokens: Tensor  # (N, 2K) the token it appends


def _expand(lprobs: Tensor, scores: Tensor) -> _Candidates:
    """Candidates from ``lprobs`` (N*K, V) and the beams' ``scores`` (N, K)."""
    N, K = scores.shape
    lprobs = lprobs.view(N, K, -1)  # (N, K, V)
    V = lprobs.size(-1)
    cand_scores, cand_idx = (scores[:, :, None] + lprobs).view(N, K * V).topk(2 * K, dim=1)  # (N, 2K)
    return _Candidates(cand_scores, cand_idx // V, cand_idx % V)


def _finish(
    finished: list[list[tuple[list[int], float]]], active: _Active, cand: _Candidates, norm: float, last: Tensor
) -> None:
    """Add to ``finished`` (per source row) the eos expansions among each sentence's top K, and
    for the sentences at their ``last`` (N,) step all of their top K (cut after the token they
    append), scored by their log-probability over ``norm``."""
    K, eos_id = active.beams, active.spec.eos_id
    to_finish = (cand.tokens[:, :K].eq(eos_id) | last[:, None]) & cand.scores[:, :K].isfinite()
    for i, j in to_finish.nonzero().tolist():
        hyp = active.tokens[i * K + cand.beams[i, j], 1:].tolist()
        token = int(cand.tokens[i, j])
        finished[int(active.rows[i])].append(
            (hyp if token == eos_id else hyp + [token], cand.scores[i, j].item() / norm)
        )


def _best_open(cand: _Candidates, eos_id: int) -> _Candidates:
    """The first K (of 2K) candidates of each sentence that do not append eos, in score order."""
    two_k = cand.scores.size(1)
    rank = cand.tokens.eq(eos_id).long() * two_k + torch.arange(two_k, device=cand.scores.device)  # eos last
    keep_pos = rank.topk(two_k // 2, dim=1, largest=False).indices  # (N, K)
    return _Candidates(*(x.gather(1, keep_pos) for x in cand))


@torch.no_grad()
def beam_search(
    model: Seq2Seq,
    src: Tensor,
    spec: SearchSpec,
    options: EvalConfig,
    nbest: int = 1,
    len_penalty_style: str = "fairseq",
) -> list[list[tuple[list[int], float]]]:
    """Beam search, batched over sentences (all beams of all sentences in one tensor).

    Scores: a hypothesis of ``L`` tokens plus eos has log-probability ``lp_sum`` (eos
    included) and final score ``lp_sum / L' ** len_penalty`` with ``L' = L + 1`` (eos counted,
    as in fairseq and CTranslate2), or ``lp_sum / ((5 + L') / 6) ** len_penalty`` with
    ``len_penalty_style="gnmt"``; one cut at the length limit has ``L' = L`` and no eos term.
    ``len_penalty=0`` scores by the plain sum of log-probabilities.

    Search: each step takes the top ``2 * beam_size`` expansions of the active beams;
    eos expansions among the first ``beam_size`` become finished hypotheses, and the best
    ``beam_size`` non-eos expansions stay active. A sentence stops as soon as it has
    ``beam_size`` finished hypotheses (fairseq's early stop: an active beam could in principle
    still have overtaken them), or at its last step, where all of its first ``beam_size``
    expansions finish, those without eos cut there (CTranslate2's rule, see the module notes).

    Args:
        model (Seq2Seq): the model; run in eval mode, its mode is restored afterwards.
        src (Tensor): right-padded source ids, shape (B, S).
        spec (SearchSpec): special ids and decoding mode.
        options (EvalConfig): ``beam_size``, ``len_penalty`` and the length limit apply.
        nbest (int): hypotheses returned per sentence, at most ``beam_size``. Default: 1
        len_penalty_style (str): "fairseq" or "gnmt". Default: "fairseq"
    Returns:
        for each of the B sentences, up to ``nbest`` ``(tokens, score)`` pairs, best first;
        tokens exclude bos and eos.
    """
    K = options.beam_size
    if not 1 <= nbest <= K:
        raise ValueError(f"need 1 <= nbest <= beam_size, got nbest={nbest}, beam_size={K}")
    _length_norm(1, options.len_penalty, len_penalty_style)  # validate the style up front
    if src.size(0) == 0:
        return []
    with _eval_mode(model):
        active = _Active(model, src, spec, options, beams=K)
        # Only the first beam is live at the start, so the K beams do not duplicate each other.
        scores = torch.full((src.size(0), K), -math.inf, device=src.device)  # (B, K) summed log-probs
        scores[:, 0] = 0.0
        finished: list[list[tuple[list[int], float]]] = [[] for _ in range(src.size(0))]
        for step in range(int(active.max_lens.max())):
            last = step + 1 >= active.max_lens  # (N,) the sentences at their last step
            cand = _expand(active.next_lprobs(), scores)
            _finish(finished, active, cand, _length_norm(step + 1, options.len_penalty, len_penalty_style), last)
            n_finished = torch.tensor([len(finished[r]) for r in active.rows.tolist()], device=src.device)
            live = (~(last | n_finished.ge(K))).nonzero().squeeze(1)  # (N',)
            if live.numel() == 0:
                break
            scores, next_beams, next_tokens = (x[live] for x in _best_open(cand, spec.eos_id))  # (N', K) each
            active.extend(next_tokens.view(-1), order=(live[:, None] * K + next_beams).view(-1))
            active.keep(live)
        return [sorted(hyps, key=lambda h: -h[1])[:nbest] for hyps in finished]
