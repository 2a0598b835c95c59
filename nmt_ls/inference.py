"""Inference on torch: translate lines of text with a model loaded from a checkpoint
(:func:`nmt_ls.engines.load_for_inference`).

model, tok, cfg = load_for_inference("runs/x/checkpoint_best.pt", device="cuda")
hyps = translate(model, tok, ["Click OK."], from_dict(EvalConfig, cfg["eval"]))
"""

from __future__ import annotations

import torch
from tqdm import tqdm

from nmt_ls.batching import TokenBudget, batch_by_tokens, collate
from nmt_ls.config import EvalConfig
from nmt_ls.decode import SearchSpec, beam_search, greedy_search
from nmt_ls.engines import encode_sources
from nmt_ls.model import Seq2Seq
from nmt_ls.tokenizer import Tokenizer


@torch.no_grad()
def translate(
    model: Seq2Seq, tok: Tokenizer, lines: list[str], options: EvalConfig, progress: bool = False
) -> list[str]:
    """Translate detokenized ``lines`` on the model's device; returns detokenized hypotheses in
    input order.

    Sentences are sorted by length and batched by ``options.max_tokens`` source tokens (a sentence
    over that budget is decoded alone, as CTranslate2 does); beam size 1 runs greedy search.
    Sources longer than the model's positions are cut (with a warning); empty lines stay empty.
    """
    device = next(model.parameters()).device
    spec = SearchSpec(tok.bos_id, tok.eos_id, tok.pad_id)
    was_training = model.training
    model.eval()
    pieces = encode_sources(tok, lines, model.max_positions)
    todo = [i for i, p in enumerate(pieces) if p]
    src_ids = {i: pieces[i] + [tok.eos_id] for i in todo}
    budget = TokenBudget(options.max_tokens, over_budget_alone=True)
    batches = batch_by_tokens([len(src_ids[i]) for i in todo], [0] * len(todo), budget, shuffle=False)
    batches = [[todo[j] for j in batch] for batch in batches]
    hyps: list[str] = [""] * len(lines)
    for idx in tqdm(batches, desc="translate", disable=not progress, unit="batch"):
        src = collate([src_ids[i] for i in idx], [[] for _ in idx], idx, tok.pad_id, tok.bos_id, tok.eos_id).src
        src = src.to(device)  # (B, S)
        if options.beam_size <= 1:
            out = greedy_search(model, src, spec, options)
        else:
            out = [nbest[0][0] for nbest in beam_search(model, src, spec, options)]
        for i, ids in zip(idx, out):
            hyps[i] = tok.decode(ids)
    model.train(was_training)
    return hyps
