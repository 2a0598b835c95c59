"""The test split scored: decoded greedily and with the recipe's beam by the engine that was the
faster at beam search in the decoding probe (CTranslate2 float32 or our torch search; the one module
that knows both), BLEU and chrF written with their signatures.

probe_s = time_engines(probe_translators(model, tok, to_dict(cfg.model), device), valid_src, cfg.eval, time.time)
engine = scoring_engine("runs/x/checkpoint_best.pt", faster_engine(probe_s), probe_s)
scores = score_test_split(engine, test_pairs, cfg.eval, Path("runs/x"), "de")
"""

from __future__ import annotations

import json
import logging
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from functools import partial
from pathlib import Path

import torch

from nmt_ls import ct2, engines, inference
from nmt_ls.config import EvalConfig
from nmt_ls.evaluate import corpus_bleu, corpus_chrf, write_lines
from nmt_ls.model import Seq2Seq
from nmt_ls.tokenizer import Tokenizer

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ScoringEngine:
    """The engine that decodes the test split, and why it is the one."""

    name: str  # "torch" or "ctranslate2"
    precision: str
    translate: Callable  # translate(lines, options, progress=False) -> hypotheses
    checkpoint: str  # the checkpoint it decodes with
    note: str  # how the decoding probe ranked it, e.g. "2.4x torch in the probe"
    probe_s: dict  # {engine: {"greedy": s, "beam": s}}: each engine's seconds per sentence in the probe


def searches(options: EvalConfig) -> tuple[tuple[str, EvalConfig], ...]:
    """The two decodings of the test split (and of the probe): greedy, and ``options``' beam."""
    return ("greedy", replace(options, beam_size=1)), ("beam", options)


def time_engines(translators: dict, src: list[str], options: EvalConfig, clock: Callable[[], float]) -> dict:
    """Each engine's seconds per sentence decoding ``src`` (``{engine: {"greedy": s, "beam": s}}``,
    on ``clock``), after an untimed warm-up on the first sentence (allocations, kernel choice).
    ``translators``: ``{engine: translate(lines, options)}``, such as :func:`probe_translators`'."""
    probe_s = {}
    for name, translate in translators.items():
        translate(src[:1], options)
        probe_s[name] = {}
        for search, decoding in searches(options):
            start = clock()
            translate(src, decoding)
            probe_s[name][search] = (clock() - start) / len(src)
    return probe_s


def faster_engine(probe_s: dict) -> str:
    """The engine whose beam search, which dominates the test decoding, was the faster in the
    probe (the first listed, torch, on a tie)."""
    return min(probe_s, key=lambda name: probe_s[name]["beam"])


def probe_translators(model: Seq2Seq, tok: Tokenizer, model_cfg: dict, device: torch.device | str) -> dict:
    """The engines a decoding probe times on ``model`` as it is now (``model_cfg``: its config
    dict): our torch search on ``device`` and, on a CPU where it is installed, CTranslate2 float32
    from an export of the model's weights to a temporary folder (left out, with a warning, if the
    export fails)."""
    translators = {"torch": partial(inference.translate, model, tok)}
    if torch.device(device).type == "cpu" and engines.ctranslate2_available():
        try:
            translators["ctranslate2"] = model_translator(model, tok, model_cfg)
        except (RuntimeError, ValueError, OSError) as e:
            log.warning("CTranslate2 export failed (%s); the decoding probe times torch alone", e)
    return translators


def model_translator(model: Seq2Seq, tok: Tokenizer, model_cfg: dict):
    """:func:`ctranslate2_translator` of a model in memory (``model_cfg``: its config dict)."""
    settings = {"checkpoint": None, "quantization": "float32", "model": model_cfg, "eval": {}}
    with tempfile.TemporaryDirectory(prefix="nmt-ls-probe-") as tmp:
        return load_translator(ct2.write_export(model, tok, Path(tmp) / "ct2", settings))


def ctranslate2_translator(ckpt_path: str | Path):
    """translate(lines, options, progress=False) by CTranslate2 in float32 on ``torch.get_num_threads()``
    cores, one thread per batch (:func:`nmt_ls.ct2.thread_split`), from an export to a temporary
    folder that is removed once CTranslate2 has loaded it."""
    with tempfile.TemporaryDirectory(prefix="nmt-ls-scoring-") as tmp:
        return load_translator(ct2.export(ckpt_path, Path(tmp) / "ct2", "float32"))


def load_translator(path: Path):
    """:func:`ctranslate2_translator` of the export at ``path``, loaded into memory."""
    translator, tok, settings = ct2.load_exported(path, threads=torch.get_num_threads())
    return partial(ct2.translate, translator, tok, max_positions=settings["max_positions"])


def probe_note(engine: str, probe_s: dict) -> str:
    """How the probe ranked ``engine``: its beam search's speed over the other engine's ("2.4x
    torch in the probe"), or why it alone was probed."""
    if engine not in probe_s:
        return "no decoding probe chose it"
    others = [name for name in probe_s if name != engine]
    if not others:
        installed = engine != "torch" or engines.ctranslate2_available()
        return "the only engine probed" if installed else "ctranslate2 not installed"
    beam_s, other_s = probe_s[engine]["beam"], probe_s[others[0]]["beam"]
    return f"{other_s / beam_s if beam_s > 0 else 1.0:.1f}x {others[0]} in the probe"


def scoring_engine(ckpt_path: str | Path, chosen: str, probe_s: dict, device: torch.device | str = "cpu"):
    """The :class:`ScoringEngine` that the probe ``chosen`` (with the probe's ``probe_s``) for the
    checkpoint at ``ckpt_path``: CTranslate2 float32 from an export to a temporary folder, removed
    once CTranslate2 has loaded it (the run writes no export of its own and never touches the
    user's, ``out_dir/ct2`` in the README's Deploy); our torch search on ``device`` otherwise, or
    when CTranslate2 fails (with a warning)."""
    note = probe_note(chosen, probe_s)
    if chosen == "ctranslate2":
        try:
            return ScoringEngine(chosen, "float32", ctranslate2_translator(ckpt_path), str(ckpt_path), note, probe_s)
        except (RuntimeError, ValueError, OSError) as e:  # MissingExtra is a RuntimeError
            log.warning("CTranslate2, chosen by the probe, failed (%s); decoding the test split with torch", e)
            note = f"ctranslate2, chosen by the probe, failed: {e}"
    model, tok, _ = engines.load_for_inference(ckpt_path, device)
    precision = str(next(model.parameters()).dtype).removeprefix("torch.")
    return ScoringEngine("torch", precision, partial(inference.translate, model, tok), str(ckpt_path), note, probe_s)


def score_test_split(
    engine: ScoringEngine, pairs: list[tuple[str, str]], options: EvalConfig, out_dir: Path, tgt_lang: str
) -> dict:
    """Translate the sources of the test ``pairs`` (src, ref) with ``engine`` greedily
    (``options`` with beam size 1) and with ``options``, write the hypotheses to
    ``out_dir/test.{greedy,beam}.{tgt_lang}``, score them against the references (BLEU, chrF with
    signatures) and write ``out_dir/test_scores.json``, which names the engine, its precision,
    how the probe ranked it and each engine's seconds per sentence in the probe."""
    src, ref = [s for s, _ in pairs], [r for _, r in pairs]
    result = {"checkpoint": engine.checkpoint, "sentences": len(src), "engine": engine.name}
    result.update(precision=engine.precision, engine_note=engine.note, probe_s=engine.probe_s)
    for name, decoding in searches(options):
        beam, start = decoding.beam_size, time.time()
        hyps = engine.translate(src, decoding, progress=True)
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
        where = f"{engine.name} {engine.precision}"
        log.info("test %s (beam %d, %s): BLEU %.2f  %s | chrF %.2f", name, beam, where, bleu, sig, chrf)
    (out_dir / "test_scores.json").write_text(json.dumps(result, indent=2), encoding="utf-8")
    return result
