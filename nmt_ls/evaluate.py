"""Corpus metrics with sacreBLEU (BLEU, chrF) and reading/writing line-aligned text files."""
from __future__ import annotations

import logging
from pathlib import Path

import sacrebleu

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
    return split_lines(text)


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


def split_lines(text: str) -> list[str]:
    """Lines split on ``\n`` only (``str.splitlines`` also splits on U+2028, U+0085, \x0c, ...,
    which would misalign a file with its reference); a final newline ends the last line."""
    lines = text.split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    return [line[:-1] if line.endswith("\r") else line for line in lines]


def write_lines(dest, lines: list[str]) -> None:
    """One line per entry to a path or an open text stream; a line break inside an entry (a
    decoded ``<0x0A>`` byte piece) becomes a space, so line i is always entry i."""
    text = "".join(" ".join(line.splitlines()) + "\n" for line in lines)
    if hasattr(dest, "write"):
        dest.write(text)
    else:
        Path(dest).write_text(text, encoding="utf-8")
