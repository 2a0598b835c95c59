"""Translation of many sentences, corpus BLEU/chrF with sacreBLEU, and validation perplexity."""
from __future__ import annotations

import logging
from pathlib import Path

import sacrebleu
import torch
from torch import nn
from tqdm import tqdm

from nmt_ls.batching import batch_by_tokens, collate
from nmt_ls.criterions import reduce_metrics
from nmt_ls.decode import beam_search, greedy_search

log = logging.getLogger(__name__)


def corpus_bleu(hyps: list[str], refs: list[str] | list[list[str]]) -> tuple[float, str]:
    """sacreBLEU corpus BLEU of detokenized ``hyps`` against one reference list or several.

    Returns:
        (score, signature), e.g. ``(31.4, "nrefs:1|case:mixed|eff:no|tok:13a|...")``.
    """
    ref_streams = [refs] if refs and isinstance(refs[0], str) else refs
    bleu = sacrebleu.BLEU()
    score = bleu.corpus_score(hyps, ref_streams)
    return score.score, str(bleu.get_signature())


def corpus_chrf(hyps: list[str], refs: list[str] | list[list[str]]) -> tuple[float, str]:
    ref_streams = [refs] if refs and isinstance(refs[0], str) else refs
    chrf = sacrebleu.CHRF()
    score = chrf.corpus_score(hyps, ref_streams)
    return score.score, str(chrf.get_signature())


def read_lines(path: str | Path) -> list[str]:
    """Lines of a UTF-8 text file without their newline; errors name the file and line."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"file not found: {path}")
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw[: e.start].count(b"\n") + 1
        raise ValueError(f"{path}:{line}: invalid UTF-8") from None
    return text.splitlines()


def score_files(hyp_path: str | Path, ref_paths: list[str | Path]) -> dict:
    """BLEU and chrF of a hypothesis file against reference files (line-aligned)."""
    hyps = read_lines(hyp_path)
    refs = []
    for p in ref_paths:
        lines = read_lines(p)
        if len(lines) != len(hyps):
            raise ValueError(f"{p} has {len(lines)} lines but {hyp_path} has {len(hyps)}")
        refs.append(lines)
    bleu, bleu_sig = corpus_bleu(hyps, refs)
    chrf, chrf_sig = corpus_chrf(hyps, refs)
    return {"bleu": bleu, "bleu_signature": bleu_sig, "chrf": chrf, "chrf_signature": chrf_sig}


@torch.no_grad()
def translate(
    model: nn.Module,
    tokenizer,
    lines: list[str],
    beam_size: int = 5,
    len_penalty: float = 1.0,
    max_len_a: float = 1.2,
    max_len_b: int = 10,
    max_tokens: int = 8000,
    device: torch.device | str = "cpu",
    progress: bool = False,
) -> list[str]:
    """Translate detokenized ``lines``; returns detokenized hypotheses in input order.

    Sentences are sorted by length and batched by ``max_tokens`` source tokens; beam size 1
    runs greedy search.
    """
    was_training = model.training
    model.eval()
    max_src = model.max_positions - 1
    src_ids = [tokenizer.encode(line)[:max_src] + [tokenizer.eos_id] for line in lines]
    lens = [len(s) for s in src_ids]
    batches = batch_by_tokens(lens, [0] * len(lens), max_tokens, shuffle=False)
    hyps: list[str] = [""] * len(lines)
    for idx in tqdm(batches, desc="translate", disable=not progress, unit="batch"):
        src = collate([src_ids[i] for i in idx], [[] for _ in idx], idx, tokenizer.pad_id, tokenizer.bos_id, tokenizer.eos_id).src.to(device)
        kw = dict(bos_id=tokenizer.bos_id, eos_id=tokenizer.eos_id, pad_id=tokenizer.pad_id, max_len_a=max_len_a, max_len_b=max_len_b)
        if beam_size <= 1:
            out = greedy_search(model, src, **kw)
        else:
            out = [nbest[0][0] for nbest in beam_search(model, src, beam_size=beam_size, len_penalty=len_penalty, **kw)]
        for i, ids in zip(idx, out):
            hyps[i] = tokenizer.decode(ids)
    model.train(was_training)
    return hyps


@torch.no_grad()
def validation_loss(model: nn.Module, criterion, batches, device) -> dict:
    """Summed criterion outputs over ``batches`` (a list of :class:`Batch`), reduced: loss,
    nll_loss and ppl per target token."""
    was_training = model.training
    model.eval()
    logs = []
    for batch in batches:
        logits = model(batch.src.to(device), batch.tgt_in.to(device))  # (B, T, V)
        out = criterion.compute(logits, batch.tgt_out.to(device))
        logs.append({"loss": float(criterion.training_loss(out)), "nll_loss": float(out.nll), "ntokens": out.ntokens,
                     "nsentences": batch.src.size(0), "sample_size": out.ntokens})
    model.train(was_training)
    return reduce_metrics(logs)
