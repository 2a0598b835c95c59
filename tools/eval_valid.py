"""Checkpoints measured on their recipe's valid split, for choosing settings on valid (model size,
schedule, label smoothing) and keeping the test split for the end.

    python tools/eval_valid.py runs/a/checkpoint_best.pt runs/b/checkpoint_best.pt
    python tools/eval_valid.py runs/*/checkpoint_last.pt --beam 5 --engine ctranslate2 --json valid.json
    python tools/eval_valid.py CKPT --limit 100                  # the first 100 valid pairs, a quick check

The valid split is ``{data.dir}/{data.valid_split}.{src_lang,tgt_lang}`` of the checkpoint's recipe
(``--limit N``: its first N lines). Per checkpoint:

- teacher forcing, over the pairs that validation scores (both sides non-empty, within the model's
  positions), batched by ``train.max_tokens`` as validation batches them: NLL per target token (eos
  included), ppl = exp(NLL), the expected calibration error of the token predictions (15 bins), the
  mean probability of the gold token and token accuracy in percent (:mod:`nmt_ls.calibration`);
- BLEU of greedy and of beam-``--beam`` decoding (default 5) and chrF of the beam's, on every line
  (sacreBLEU), with the checkpoint's other eval settings (len_penalty, max_len_a/b, max_tokens), by
  our torch search or CTranslate2 float32 (exported to a temporary folder).

Printed: a Markdown table, one row per checkpoint, and the sacreBLEU signatures; ``--json OUT``
writes the rows as a list of dicts. Runs on the CPU.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from functools import partial
from pathlib import Path

from nmt_ls import checkpoint
from nmt_ls.binarize import encode_pairs
from nmt_ls.build import loss_batches
from nmt_ls.calibration import expected_calibration_error, teacher_forced_stats
from nmt_ls.config import EvalConfig, from_dict
from nmt_ls.criterions.label_smoothed import safe_exp
from nmt_ls.data import PairFilter, filter_pairs
from nmt_ls.engines import MissingExtra, from_checkpoint
from nmt_ls.evaluate import corpus_bleu, corpus_chrf, read_lines
from nmt_ls.inference import translate
from nmt_ls.scoring import ctranslate2_translator, searches

COLUMNS = "checkpoint|updates|params|valid nll|ppl|ECE|mean p(gold)|greedy BLEU|beam BLEU|beam chrF".split("|")


def valid_split(cfg: dict, limit: int) -> tuple[list[str], list[str]]:
    """(sources, references): the first ``limit`` lines (all with 0) of the recipe's valid files."""
    d = cfg["data"]
    paths = [Path(d["dir"]) / f"{d.get('valid_split', 'valid')}.{d[lang]}" for lang in ("src_lang", "tgt_lang")]
    src, ref = (read_lines(path) for path in paths)
    if len(src) != len(ref):
        raise ValueError(f"{paths[0]} has {len(src)} lines but {paths[1]} has {len(ref)}")
    return (src[:limit], ref[:limit]) if limit else (src, ref)


def teacher_forced(model, tok, cfg: dict, src: list[str], ref: list[str]) -> dict:
    """NLL per token, ppl, ECE and mean p(gold) over the pairs that validation scores."""
    src, ref, _ = filter_pairs(src, ref, PairFilter(on_empty="drop"))
    pairs = encode_pairs(tok, list(zip(src, ref)), model.max_positions)
    if not len(pairs):
        raise ValueError(f"no valid pair to score: each has an empty side or exceeds {model.max_positions} positions")
    stats = teacher_forced_stats(model, loss_batches(pairs, tok, cfg["train"]["max_tokens"]), tok.pad_id)
    return {
        "loss_pairs": len(pairs),
        "ntokens": stats.ntokens,
        "nll_per_token": stats.nll_per_token,
        "ppl": safe_exp(stats.nll_per_token),
        "ece": expected_calibration_error(stats),
        "mean_p_gold": stats.mean_gold_prob,
        "accuracy": stats.accuracy,
    }


def decoded_scores(translate_lines, options: EvalConfig, src: list[str], ref: list[str]) -> dict:
    """Greedy and beam BLEU (the test split's two searches, :func:`nmt_ls.scoring.searches`), the
    beam's chrF and their signatures, on every line."""
    hyps = {name: translate_lines(src, decoding) for name, decoding in searches(options)}
    scores = {"beam_size": options.beam_size}
    for name in hyps:
        scores[f"{name}_bleu"], scores["bleu_signature"] = corpus_bleu(hyps[name], ref)  # one signature
    scores["chrf"], scores["chrf_signature"] = corpus_chrf(hyps["beam"], ref)
    return scores


def evaluate(path: str, args: argparse.Namespace) -> dict:
    """One row: what the checkpoint at ``path`` is, and its valid scores."""
    ckpt = checkpoint.load(path)
    (model, tok, cfg), update = from_checkpoint(ckpt), ckpt["update"]
    del ckpt  # the optimizer's state need not stay in memory while decoding
    src, ref = valid_split(cfg, args.limit)
    params = sum(p.numel() for p in model.parameters())
    row = {"checkpoint": path, "update": update, "params": params, "lines": len(src)}
    row.update(teacher_forced(model, tok, cfg, src, ref))
    if args.engine == "ctranslate2":
        translate_lines = ctranslate2_translator(path)
    else:
        translate_lines = partial(translate, model, tok)
    options = dataclasses.replace(from_dict(EvalConfig, cfg["eval"], "eval"), beam_size=args.beam)
    return {**row, "engine": args.engine, **decoded_scores(translate_lines, options, src, ref)}


def markdown_table(rows: list[dict]) -> str:
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    for r in rows:
        cells = [r["checkpoint"], str(r["update"]), f"{r['params']:,}", f"{r['nll_per_token']:.4f}", f"{r['ppl']:.2f}"]
        cells += [f"{r['ece']:.4f}", f"{r['mean_p_gold']:.4f}", f"{r['greedy_bleu']:.2f}", f"{r['beam_bleu']:.2f}"]
        lines.append("| " + " | ".join([*cells, f"{r['chrf']:.2f}"]) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoints", nargs="+", metavar="CKPT")
    p.add_argument("--beam", type=int, default=5, help="beam size of the beam decoding (default: 5)")
    p.add_argument("--engine", choices=("torch", "ctranslate2"), default="torch", help="decoder (default: torch)")
    p.add_argument("--json", metavar="OUT", help="write the rows to OUT as a JSON list")
    p.add_argument("--limit", type=int, default=0, metavar="N", help="only the first N valid pairs (default: all)")
    args = p.parse_args(argv)
    if args.beam < 1 or args.limit < 0:
        p.error(f"--beam must be >= 1 and --limit >= 0, got --beam {args.beam} --limit {args.limit}")
    rows = []
    for path in args.checkpoints:
        try:
            rows.append(evaluate(path, args))
        except (OSError, ValueError, checkpoint.CheckpointError, MissingExtra) as e:
            print(f"eval_valid.py: {path}: {e}", file=sys.stderr)
            return 1
    print(markdown_table(rows))
    print(f"\nBLEU {rows[0]['bleu_signature']}\nchrF {rows[0]['chrf_signature']}")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
