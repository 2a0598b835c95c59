"""The test split scored: decoded greedily and with the recipe's beam by the faster engine at hand
(CTranslate2 or torch, the one module that knows both), BLEU and chrF written with their signatures.

scores = score_test_split("runs/x/checkpoint_best.pt", test_pairs, cfg.eval, Path("runs/x"), "de")
"""

from __future__ import annotations

import json
import logging
import tempfile
import time
from dataclasses import replace
from functools import partial
from pathlib import Path

import torch

from nmt_ls import ct2, engines, inference
from nmt_ls.config import EvalConfig
from nmt_ls.evaluate import corpus_bleu, corpus_chrf, write_lines

log = logging.getLogger(__name__)


def scoring_engine(ckpt_path: str | Path, device: torch.device | str = "cpu"):
    """(engine, precision, translate(lines, options, progress=False)) to decode the test split
    with: on a CPU, CTranslate2 in float32 (our search's ids and strings) when it is installed
    and the checkpoint exports; otherwise our torch search. The export goes to a
    temporary folder, removed once CTranslate2 has loaded it: the run writes no export of its
    own and never touches the user's (``out_dir/ct2`` in the README's Deploy)."""
    if torch.device(device).type == "cpu" and engines.ctranslate2_available():
        try:
            return "ctranslate2", "float32", ctranslate2_translator(ckpt_path)
        except (RuntimeError, ValueError, OSError) as e:
            log.warning("CTranslate2 export failed (%s); decoding the test split with torch", e)
    model, tok, _ = engines.load_for_inference(ckpt_path, device)
    precision = str(next(model.parameters()).dtype).removeprefix("torch.")
    return "torch", precision, partial(inference.translate, model, tok)


def ctranslate2_translator(ckpt_path: str | Path):
    """translate(lines, options, progress=False) by CTranslate2 in float32 on ``torch.get_num_threads()``
    cores, one thread per batch (:func:`nmt_ls.ct2.thread_split`), from an export to a temporary
    folder that is removed once CTranslate2 has loaded it."""
    with tempfile.TemporaryDirectory(prefix="nmt-ls-scoring-") as tmp:
        path = ct2.export(ckpt_path, Path(tmp) / "ct2", "float32")
        translator, tok, settings = ct2.load_exported(path, threads=torch.get_num_threads())
    return partial(ct2.translate, translator, tok, max_positions=settings["max_positions"])


def score_test_split(
    ckpt_path: str | Path,
    pairs: list[tuple[str, str]],
    options: EvalConfig,
    out_dir: Path,
    tgt_lang: str,
    device: torch.device | str = "cpu",
) -> dict:
    """Translate the sources of the test ``pairs`` (src, ref) greedily (``options`` with beam
    size 1) and with ``options``, write the hypotheses to ``out_dir/test.{greedy,beam}.{tgt_lang}``,
    score them against the references (BLEU, chrF with signatures) and write
    ``out_dir/test_scores.json``, which names the engine and precision that decoded."""
    engine, precision, translate_lines = scoring_engine(ckpt_path, device)
    src, ref = [s for s, _ in pairs], [r for _, r in pairs]
    result = {"checkpoint": str(ckpt_path), "sentences": len(src), "engine": engine, "precision": precision}
    for name, decoding in (("greedy", replace(options, beam_size=1)), ("beam", options)):
        beam, start = decoding.beam_size, time.time()
        hyps = translate_lines(src, decoding, progress=True)
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
