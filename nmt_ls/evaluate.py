"""Corpus metrics with sacreBLEU (BLEU, chrF++, TER; paired significance tests) and line-aligned text files."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TextIO

import sacrebleu
from sacrebleu.metrics import BLEU, CHRF, TER
from sacrebleu.metrics.base import Metric
from sacrebleu.significance import PairedTest, Result

log = logging.getLogger(__name__)


def _ref_streams(refs: list[str] | list[list[str]]) -> list[list[str]]:
    return [refs] if refs and isinstance(refs[0], str) else refs


def corpus_bleu(hyps: list[str], refs: list[str] | list[list[str]]) -> tuple[float, str]:
    """sacreBLEU corpus BLEU of detokenized ``hyps`` against one reference list or several.

    Returns:
        (score, signature), e.g. ``(31.4, "nrefs:1|case:mixed|eff:no|tok:13a|...")``.
    """
    bleu = sacrebleu.BLEU()
    score = bleu.corpus_score(hyps, _ref_streams(refs))
    return score.score, str(bleu.get_signature())


def corpus_chrf(hyps: list[str], refs: list[str] | list[list[str]], word_order: int = 0) -> tuple[float, str]:
    """sacreBLEU corpus chrF (chrF++ with ``word_order=2``) of ``hyps``; returns (score, signature)."""
    chrf = sacrebleu.CHRF(word_order=word_order)
    score = chrf.corpus_score(hyps, _ref_streams(refs))
    return score.score, str(chrf.get_signature())


def split_lines(text: str) -> list[str]:
    """The lines of ``text``, split at "\\n" only (and a "\\r" before it dropped), unlike
    ``str.splitlines``, which also splits at U+2028, U+0085, "\\x0c" and others that can occur
    inside a sentence. A final newline ends the last line; it does not start another."""
    lines = text.split("\n")
    if lines[-1] == "":
        lines.pop()
    return [line[:-1] if line.endswith("\r") else line for line in lines]


def read_lines(path: str | Path) -> list[str]:
    """Lines of a UTF-8 text file, split as :func:`split_lines` does; errors name the file and line."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"file not found: {path}")
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw[: e.start].count(b"\n") + 1
        raise ValueError(f"{path}:{line}: invalid UTF-8") from None
    return split_lines(text)


def one_line(text: str) -> str:
    """``text`` with each "\\r\\n", "\\n" and "\\r" replaced by a space, so that it stays one line
    (a decoded byte piece such as ``<0x0A>`` can put a newline inside a hypothesis)."""
    return text.replace("\r\n", " ").replace("\n", " ").replace("\r", " ")


def write_lines(out: str | Path | TextIO, lines: list[str]) -> None:
    """Write ``lines`` one per line (UTF-8, "\\n" endings) to a path (its folders made) or an open
    text file; a newline inside a line becomes a space (:func:`one_line`), so line i of the output
    is ``lines[i]``."""
    text = "".join(one_line(line) + "\n" for line in lines)
    if isinstance(out, (str, Path)):
        path = Path(out)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8", newline="\n")
    else:
        out.write(text)


def build_metrics(refs: list[list[str]]) -> dict[str, Metric]:
    """sacreBLEU's BLEU, chrF++ and TER with the statistics of ``refs`` (one list per reference
    file) cached, as ``sacrebleu REF -m bleu chrf ter --chrf-word-order 2`` builds them."""
    return {"BLEU": BLEU(references=refs), "CHRF": CHRF(word_order=2, references=refs), "TER": TER(references=refs)}


def read_systems(hyp_paths: list[str | Path], ref_paths: list[str | Path]) -> tuple[list[list[str]], list[list[str]]]:
    """(systems, refs): the lines of each hypothesis file and each reference file, all checked
    to be non-empty and of one length; errors name the file. (The ``sacrebleu`` command line
    also strips trailing whitespace, which none of BLEU, chrF and TER counts.)"""
    systems = [read_lines(p) for p in hyp_paths]
    refs = [read_lines(p) for p in ref_paths]
    for path, lines in zip([*hyp_paths, *ref_paths], [*systems, *refs], strict=True):
        if not lines:
            raise ValueError(f"{path} is empty")
        if len(lines) != len(systems[0]):
            raise ValueError(f"{path} has {len(lines)} lines but {hyp_paths[0]} has {len(systems[0])}")
    return systems, refs


def _as_floats(result: Result) -> dict[str, float | None]:
    """A sacreBLEU ``Result`` as a dict of Python floats (bootstrap means can be numpy float32,
    which ``json`` cannot write)."""
    return {k: None if v is None else float(v) for k, v in result.__dict__.items()}


def score_systems(
    systems: list[list[str]], refs: list[list[str]], paired: str | None = None, n_samples: int = 0
) -> tuple[dict[str, str], list[dict[str, dict]]]:
    """BLEU, chrF++ and TER of each system, optionally with sacreBLEU's paired test against
    the first system (the baseline), exactly as the ``sacrebleu`` command line computes them
    (seed ``$SACREBLEU_SEED``, default 12345, the same resamples for every system).

    Args:
        systems (list[list[str]]): hypotheses, one list per system, the baseline first.
        refs (list[list[str]]): references, one list per reference set, aligned with each system.
        paired (str, optional): ``"bs"`` paired bootstrap resampling (score, bootstrap mean,
            95% CI half-width, p-value), ``"ar"`` approximate randomization (score, p-value), or
            None (scores only). Default: None
        n_samples (int): resamples (``bs``) or trials (``ar``); 0 takes sacreBLEU's defaults,
            1000 and 10000. Default: 0
    Returns:
        (signatures, scores): metric name -> signature (with the test, its size and seed when
        paired), and per system a dict metric name -> ``{"score", "p_value", "mean", "ci"}``
        (None where the test gives none; the baseline has no p-value).
    """
    if paired not in (None, "bs", "ar"):
        raise ValueError(f"paired must be 'bs', 'ar' or None, got {paired!r}")
    metrics = build_metrics(refs)
    if paired is None:
        results = {}  # metric name -> one Result per system
        signatures = {}
        for metric in metrics.values():
            scores = [metric.corpus_score(hyps, None) for hyps in systems]
            results[scores[0].name] = [Result(score.score) for score in scores]
            signatures[scores[0].name] = metric.get_signature()
    elif len(systems) < 2:
        raise ValueError("a paired test needs at least two hypothesis files, the baseline first")
    else:
        named = [(str(i), hyps) for i, hyps in enumerate(systems)]
        signatures, results = PairedTest(named, metrics, references=None, test_type=paired, n_samples=n_samples)()
        del results["System"]
    rows = [{name: _as_floats(column[i]) for name, column in results.items()} for i in range(len(systems))]
    return {name: sig.format() for name, sig in signatures.items()}, rows


def score_files(
    hyp_paths: list[str | Path], ref_paths: list[str | Path], paired: str | None = None, n_samples: int = 0
) -> dict:
    """:func:`score_systems` on files: ``{"signatures": {...}, "paired": paired, "systems":
    [{"file": path, "BLEU": {...}, "chrF2++": {...}, "TER": {...}}, ...]}``. ``hyp_paths`` may
    be a single path."""
    if isinstance(hyp_paths, (str, Path)):
        hyp_paths = [hyp_paths]
    systems, refs = read_systems(hyp_paths, ref_paths)
    signatures, scores = score_systems(systems, refs, paired, n_samples)
    rows = [{"file": str(p), **s} for p, s in zip(hyp_paths, scores, strict=True)]
    return {"signatures": signatures, "paired": paired, "systems": rows}


def _cell(result: dict) -> str:
    """ "33.41", "33.41 (33.40 ± 2.01)" with a bootstrap mean and CI, then " p=0.0010*" with a p-value."""
    text = f"{result['score']:.2f}"
    if result["mean"] is not None:
        text += f" ({result['mean']:.2f} ± {result['ci']:.2f})"
    if result["p_value"] is not None:
        text += f" p={result['p_value']:.4f}" + ("*" if result["p_value"] < 0.05 else "")
    return text


def format_scores(result: dict) -> str:
    """The text report of :func:`score_files`: ``NAME SCORE  SIGNATURE`` lines for one file
    without a test, else one row per file (the baseline first) and the signatures below."""
    rows, sigs = result["systems"], result["signatures"]
    if len(rows) == 1 and result["paired"] is None:
        return "\n".join(f"{name} {rows[0][name]['score']:.2f}  {sig}" for name, sig in sigs.items())
    header = ["system", *sigs]
    table = [header] + [[row["file"], *(_cell(row[name]) for name in sigs)] for row in rows]
    if result["paired"] is not None:
        table[1][0] = "Baseline: " + table[1][0]
    widths = [max(len(line[j]) for line in table) for j in range(len(header))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(line, widths, strict=True)).rstrip() for line in table]
    if result["paired"] == "bs":
        lines.append(
            "score (bootstrap mean ± 95% CI), p-value of the paired bootstrap test against the baseline (* p < 0.05)"
        )
    elif result["paired"] == "ar":
        lines.append("score, p-value of the approximate randomization test against the baseline (* p < 0.05)")
    lines += [f"{name} {sig}" for name, sig in sigs.items()]
    return "\n".join(lines)
