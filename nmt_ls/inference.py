"""Inference from a checkpoint: load it, translate lines of text, score the test split.

model, tok, cfg = load_for_inference("runs/x/checkpoint_best.pt", device="cuda")
hyps = translate(model, tok, ["Click OK."], beam_size=5)
"""

from __future__ import annotations

import json
import logging
import tempfile
import time
from functools import partial
from pathlib import Path

import torch
from torch import nn
from tqdm import tqdm

from nmt_ls import checkpoint
from nmt_ls.batching import batch_by_tokens, collate
from nmt_ls.decode import beam_search, greedy_search
from nmt_ls.evaluate import corpus_bleu, corpus_chrf, write_lines
from nmt_ls.model import build_model
from nmt_ls.tokenizer import Tokenizer

log = logging.getLogger(__name__)


def load_for_inference(path: str | Path, device: torch.device | str = "cpu"):
    """(model on ``device`` in eval mode, tokenizer, config dict) from a checkpoint alone: the
    sentencepiece model it carries is unpacked to a temporary folder (never a stale spm.model
    lying beside it)."""
    ckpt = checkpoint.load(path)
    with tempfile.TemporaryDirectory() as tmp:
        tok = Tokenizer(checkpoint.tensor_to_spm(ckpt["spm"], Path(tmp) / "spm.model"))
    model = build_model(tok.vocab_size, tok.pad_id, **ckpt["config"]["model"])
    model.load_state_dict(ckpt["model"])
    return model.to(device).eval(), tok, ckpt["config"]


def encode_sources(tok: Tokenizer, lines: list[str], max_positions: int) -> list[list[int]]:
    """Source ids of ``lines`` without eos, each cut to ``max_positions - 1`` so that it fits the
    model's positions with its eos (one warning counts the cut lines); an empty list for a line
    with nothing to translate, whose hypothesis is the empty line."""
    max_src = max_positions - 1
    src_ids = [tok.encode(line) if line.strip() else [] for line in lines]
    too_long = sum(len(s) > max_src for s in src_ids)
    if too_long:
        log.warning("%d source line(s) longer than %d subwords were cut to fit the model", too_long, max_src)
    return [s[:max_src] for s in src_ids]


@torch.no_grad()
def translate(
    model: nn.Module,
    tok: Tokenizer,
    lines: list[str],
    beam_size: int = 5,
    len_penalty: float = 1.0,
    max_len_a: float = 1.2,
    max_len_b: int = 10,
    max_tokens: int = 8000,
    device: torch.device | str | None = None,
    progress: bool = False,
) -> list[str]:
    """Translate detokenized ``lines``; returns detokenized hypotheses in input order.

    Sentences are sorted by length and batched by ``max_tokens`` source tokens; beam size 1
    runs greedy search. Sources longer than the model's positions are cut (with a warning);
    empty lines stay empty. ``device`` defaults to the model's.
    """
    device = device or next(model.parameters()).device
    was_training = model.training
    model.eval()
    pieces = encode_sources(tok, lines, model.max_positions)
    todo = [i for i, p in enumerate(pieces) if p]
    src_ids = {i: pieces[i] + [tok.eos_id] for i in todo}
    batches = batch_by_tokens([len(src_ids[i]) for i in todo], [0] * len(todo), max_tokens, shuffle=False)
    batches = [[todo[j] for j in batch] for batch in batches]
    kw = dict(bos_id=tok.bos_id, eos_id=tok.eos_id, pad_id=tok.pad_id, max_len_a=max_len_a, max_len_b=max_len_b)
    hyps: list[str] = [""] * len(lines)
    for idx in tqdm(batches, desc="translate", disable=not progress, unit="batch"):
        src = collate([src_ids[i] for i in idx], [[] for _ in idx], idx, tok.pad_id, tok.bos_id, tok.eos_id).src
        src = src.to(device)  # (B, S)
        if beam_size <= 1:
            out = greedy_search(model, src, **kw)
        else:
            out = [nbest[0][0] for nbest in beam_search(model, src, beam_size=beam_size, len_penalty=len_penalty, **kw)]
        for i, ids in zip(idx, out):
            hyps[i] = tok.decode(ids)
    model.train(was_training)
    return hyps


def scoring_engine(ckpt_path: str | Path, out_dir: Path, device: torch.device | str = "cpu"):
    """(engine, precision, translate(lines, **options)) to decode the test split with: on a CPU,
    CTranslate2 in float32 (our search's ids, about twice as fast) when it is installed and the
    checkpoint exports to ``out_dir/ct2``; otherwise our torch search."""
    if torch.device(device).type == "cpu":
        from nmt_ls import ct2

        if ct2.available():
            try:
                path = ct2.export(ckpt_path, Path(out_dir) / "ct2", "float32", force=True)
                translator, tok, settings = ct2.load_exported(path, threads=torch.get_num_threads())
            except (RuntimeError, ValueError, OSError) as e:
                log.warning("CTranslate2 export failed (%s); decoding the test split with torch", e)
            else:
                max_positions = settings["max_positions"]
                return "ctranslate2", "float32", partial(ct2.translate, translator, tok, max_positions=max_positions)
    model, tok, _ = load_for_inference(ckpt_path, device)
    precision = str(next(model.parameters()).dtype).removeprefix("torch.")
    return "torch", precision, partial(translate, model, tok)


def score_test_split(
    ckpt_path: str | Path,
    src: list[str],
    ref: list[str],
    eval_cfg: dict,
    out_dir: Path,
    tgt_lang: str,
    device: torch.device | str = "cpu",
) -> dict:
    """Translate the test split greedily and with the recipe's beam, write the hypotheses to
    ``out_dir/test.{greedy,beam}.{tgt_lang}``, score them (BLEU, chrF with signatures) and
    write ``out_dir/test_scores.json``, which names the engine and precision that decoded."""
    engine, precision, translate_lines = scoring_engine(ckpt_path, out_dir, device)
    e = eval_cfg
    result = {"checkpoint": str(ckpt_path), "sentences": len(src), "engine": engine, "precision": precision}
    for name, beam in (("greedy", 1), ("beam", e["beam_size"])):
        start = time.time()
        hyps = translate_lines(
            src,
            beam_size=beam,
            len_penalty=e["len_penalty"],
            max_len_a=e["max_len_a"],
            max_len_b=e["max_len_b"],
            max_tokens=e["max_tokens"],
            progress=True,
        )
        write_lines(out_dir / f"test.{name}.{tgt_lang}", hyps)
        bleu, sig = corpus_bleu(hyps, ref)
        chrf, chrf_sig = corpus_chrf(hyps, ref)
        result[name] = {
            "beam_size": beam,
            "bleu": bleu,
            "bleu_signature": sig,
            "chrf": chrf,
            "chrf_signature": chrf_sig,
            "seconds": time.time() - start,
        }
        log.info("test %s (beam %d, %s %s): BLEU %.2f  %s | chrF %.2f", name, beam, engine, precision, bleu, sig, chrf)
    (out_dir / "test_scores.json").write_text(json.dumps(result, indent=2), encoding="utf-8")
    return result
