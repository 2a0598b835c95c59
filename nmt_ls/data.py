"""Parallel text -> (src, tgt) string pairs, validated and length-filtered.

Accepted ``path`` forms (``fmt`` is inferred when None):

* ``"text"``: line-aligned plain files. ``data/train`` means ``data/train.en`` +
  ``data/train.de``; a directory ``data/lohelp_en_de`` means
  ``data/lohelp_en_de/{split}.en`` + ``.de``.
* ``"tsv"``: ``x.tsv``, two tab-separated columns ``src<TAB>tgt`` (an optional
  header line ``en<TAB>de`` is skipped).
* ``"jsonl"``: ``x.jsonl``, one object per line, ``{"en": .., "de": ..}`` or
  ``{"translation": {"en": .., "de": ..}}``.
* ``"hf"``: anything else is handed to ``datasets.load_dataset(path, config,
  split=split)`` (a hub name, or a local directory of data files); rows carry a
  ``translation`` column or ``src_lang``/``tgt_lang`` columns. A directory written
  by ``Dataset.save_to_disk`` is loaded with ``datasets.load_from_disk``.

Local files are read line by line (not through ``load_dataset``) so that every
error names the file and the 1-based line: unequal line counts, invalid UTF-8,
malformed rows. Lines are split on ``\\n`` only (``str.splitlines`` would also
split on U+2028, U+0085... and misalign the sides) and stripped of surrounding
whitespace.

Filtering (``filter_pairs``): empty/whitespace-only sides are dropped or raise
(``on_empty``); ``max_len`` and ``max_ratio`` count **whitespace tokens**.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

FORMATS = ("text", "tsv", "jsonl", "hf")

# A row: ("file:line" for error messages, src, tgt).
Row = tuple[str, str, str]


@dataclass
class FilterReport:
    """What ``filter_pairs`` did; ``str()`` gives the log line."""

    source: str
    n_read: int = 0
    n_empty: int = 0
    n_too_long: int = 0
    n_bad_ratio: int = 0

    @property
    def n_kept(self) -> int:
        return self.n_read - self.n_empty - self.n_too_long - self.n_bad_ratio

    def __str__(self) -> str:
        return (
            f"{self.source}: kept {self.n_kept}/{self.n_read} pairs | dropped: "
            f"empty {self.n_empty}, too long {self.n_too_long}, bad ratio {self.n_bad_ratio}"
        )


# ---------------------------------------------------------------------------
# Readers
# ---------------------------------------------------------------------------


def _read_lines(path: Path) -> list[str]:
    """UTF-8 lines of ``path``, stripped; error names file and line on bad bytes."""
    if not path.is_file():
        raise FileNotFoundError(f"no such file: {path}")
    raw = path.read_bytes()
    chunks = raw.split(b"\n")
    if chunks and chunks[-1] == b"":  # final newline
        chunks.pop()
    lines = []
    for lineno, chunk in enumerate(chunks, start=1):
        try:
            lines.append(chunk.decode("utf-8").strip())
        except UnicodeDecodeError as err:
            raise ValueError(f"{path}:{lineno}: invalid UTF-8 ({err.reason} at byte {err.start} of the line)") from None
    return lines


def _read_text(prefix: Path, src_lang: str, tgt_lang: str) -> list[Row]:
    src_path = prefix.with_name(f"{prefix.name}.{src_lang}")
    tgt_path = prefix.with_name(f"{prefix.name}.{tgt_lang}")
    src_lines, tgt_lines = _read_lines(src_path), _read_lines(tgt_path)
    if len(src_lines) != len(tgt_lines):
        raise ValueError(
            f"line counts differ: {src_path} has {len(src_lines)} lines, {tgt_path} has {len(tgt_lines)}"
        )
    return [(f"{src_path}:{i} and {tgt_path}:{i}", s, t) for i, (s, t) in enumerate(zip(src_lines, tgt_lines), start=1)]


def _read_tsv(path: Path, src_lang: str, tgt_lang: str) -> list[Row]:
    rows = []
    for lineno, line in enumerate(_read_lines(path), start=1):
        if lineno == 1 and line.split("\t") == [src_lang, tgt_lang]:
            continue  # header
        cols = line.split("\t")
        if len(cols) != 2:
            raise ValueError(f"{path}:{lineno}: expected 2 tab-separated columns (src, tgt), got {len(cols)}")
        rows.append((f"{path}:{lineno}", cols[0].strip(), cols[1].strip()))
    return rows


def _pair_from_record(record: dict, src_lang: str, tgt_lang: str, where: str) -> tuple[str, str]:
    obj = record.get("translation", record) if isinstance(record, dict) else None
    if not isinstance(obj, dict) or src_lang not in obj or tgt_lang not in obj:
        keys = sorted(obj) if isinstance(obj, dict) else type(record).__name__
        raise ValueError(
            f"{where}: expected keys {src_lang!r} and {tgt_lang!r} (optionally under 'translation'), got {keys}"
        )
    src, tgt = obj[src_lang], obj[tgt_lang]
    if not isinstance(src, str) or not isinstance(tgt, str):
        raise ValueError(f"{where}: {src_lang!r}/{tgt_lang!r} values must be strings")
    return src.strip(), tgt.strip()


def _read_jsonl(path: Path, src_lang: str, tgt_lang: str) -> list[Row]:
    rows = []
    for lineno, line in enumerate(_read_lines(path), start=1):
        if not line:
            continue
        where = f"{path}:{lineno}"
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise ValueError(f"{where}: invalid JSON ({err.msg})") from None
        rows.append((where, *_pair_from_record(record, src_lang, tgt_lang, where)))
    return rows


def _read_hf(name: str, src_lang: str, tgt_lang: str, split: str, config: str | None) -> list[Row]:
    import datasets

    local = Path(name)
    if local.is_dir() and ((local / "state.json").is_file() or (local / "dataset_dict.json").is_file()):
        ds = datasets.load_from_disk(str(local))
        if isinstance(ds, datasets.DatasetDict):
            ds = ds[split]
    else:
        ds = datasets.load_dataset(name, config, split=split)
    where = f"{name}[{split}]"
    return [
        (f"{where} row {i}", *_pair_from_record(rec, src_lang, tgt_lang, f"{where} row {i}"))
        for i, rec in enumerate(ds)
    ]


def infer_format(path: str | os.PathLike, src_lang: str, tgt_lang: str, split: str = "train") -> str:
    """Which of ``FORMATS`` ``path`` is (see the module docstring)."""
    p = Path(path)
    if p.suffix == ".tsv":
        return "tsv"
    if p.suffix in (".jsonl", ".json"):
        return "jsonl"
    if p.with_name(f"{p.name}.{src_lang}").exists() or p.with_name(f"{p.name}.{tgt_lang}").exists():
        return "text"
    if p.is_dir() and ((p / f"{split}.{src_lang}").exists() or (p / f"{split}.{tgt_lang}").exists()):
        return "text"
    return "hf"


def _read_rows(
    path, src_lang: str, tgt_lang: str, split: str, fmt: str | None, config: str | None
) -> tuple[list[Row], str]:
    """Rows of the corpus and a short name of it for messages."""
    fmt = fmt or infer_format(path, src_lang, tgt_lang, split)
    if fmt not in FORMATS:
        raise ValueError(f"unknown format {fmt!r}; expected one of {FORMATS}")
    p = Path(path)
    if fmt == "text":
        prefix = p / split if p.is_dir() else p
        rows = _read_text(prefix, src_lang, tgt_lang)
        source = f"{prefix}.{{{src_lang},{tgt_lang}}}"
    elif fmt == "tsv":
        rows, source = _read_tsv(p, src_lang, tgt_lang), str(p)
    elif fmt == "jsonl":
        rows, source = _read_jsonl(p, src_lang, tgt_lang), str(p)
    else:
        rows, source = _read_hf(str(path), src_lang, tgt_lang, split, config), f"{path}[{split}]"
    if not rows:
        raise ValueError(f"empty corpus: no sentence pairs in {source}")
    return rows, source


# ---------------------------------------------------------------------------
# Public API
# ---------------------------------------------------------------------------


def filter_pairs(
    src: list[str],
    tgt: list[str],
    max_len: int | None = None,
    max_ratio: float | None = None,
    on_empty: str = "drop",
    source: str = "",
    where: list[str] | None = None,
) -> tuple[list[str], list[str], FilterReport]:
    """Drop unusable pairs.

    Args:
        src, tgt: aligned sentences.
        max_len: drop a pair if either side has more than this many whitespace tokens.
        max_ratio: drop a pair if ``max(n_src, n_tgt) / min(n_src, n_tgt) > max_ratio``
            (whitespace tokens).
        on_empty: ``"drop"`` (count it) or ``"error"`` (raise ``ValueError`` naming
            the file and line) for a pair with an empty or whitespace-only side.
        source: corpus name for the report.
        where: per pair, its location ("file:line") for error messages.
            Default: "<source> pair <i>".
    Returns:
        (src, tgt, report).
    """
    if on_empty not in ("drop", "error"):
        raise ValueError(f"on_empty must be 'drop' or 'error', got {on_empty!r}")
    if len(src) != len(tgt):
        raise ValueError(f"{source}: {len(src)} source but {len(tgt)} target sentences")
    report = FilterReport(source=source, n_read=len(src))
    src_out, tgt_out = [], []
    for i, (s, t) in enumerate(zip(src, tgt)):
        if not s.strip() or not t.strip():
            if on_empty == "error":
                loc = where[i] if where is not None else f"{source} pair {i + 1}"
                side = "source" if not s.strip() else "target"
                raise ValueError(f"{loc}: empty {side} side (use on_empty='drop' to skip such pairs)")
            report.n_empty += 1
            continue
        n_src, n_tgt = len(s.split()), len(t.split())
        if max_len is not None and max(n_src, n_tgt) > max_len:
            report.n_too_long += 1
            continue
        if max_ratio is not None and max(n_src, n_tgt) / min(n_src, n_tgt) > max_ratio:
            report.n_bad_ratio += 1
            continue
        src_out.append(s)
        tgt_out.append(t)
    return src_out, tgt_out, report


def read_pairs(
    path: str | os.PathLike,
    src_lang: str,
    tgt_lang: str,
    split: str = "train",
    fmt: str | None = None,
    config: str | None = None,
    max_len: int | None = None,
    max_ratio: float | None = None,
    on_empty: str = "drop",
) -> tuple[list[str], list[str]]:
    """Read, validate and filter a parallel corpus into two aligned lists.

    Args:
        path: file, prefix, directory or dataset name (see the module docstring).
        split: file name inside a directory (``{split}.{lang}``) or the
            ``datasets`` split.
        fmt: one of ``FORMATS``; inferred from ``path`` when None.
        config: ``datasets`` configuration name (``"hf"`` only).
        max_len, max_ratio, on_empty: see ``filter_pairs``.
    Returns:
        (src, tgt): equal-length lists of stripped, non-empty strings.
    Raises:
        FileNotFoundError: a file is missing (named).
        ValueError: unequal line counts, invalid UTF-8 or malformed line (file and
            line named), empty corpus, or nothing left after filtering.
    """
    rows, source = _read_rows(path, src_lang, tgt_lang, split, fmt, config)
    where, src, tgt = (list(col) for col in zip(*rows))
    src, tgt, report = filter_pairs(
        src, tgt, max_len=max_len, max_ratio=max_ratio, on_empty=on_empty, source=source, where=where
    )
    log.info("%s", report)
    if not src:
        raise ValueError(f"no pairs left in {source} after filtering ({report})")
    return src, tgt


def load_parallel(
    path: str | os.PathLike,
    src_lang: str,
    tgt_lang: str,
    split: str = "train",
    fmt: str | None = None,
    config: str | None = None,
    **filter_kwargs,
):
    """``read_pairs`` as a ``datasets.Dataset`` with string columns ``src`` and ``tgt``."""
    import datasets

    src, tgt = read_pairs(path, src_lang, tgt_lang, split=split, fmt=fmt, config=config, **filter_kwargs)
    return datasets.Dataset.from_dict({"src": src, "tgt": tgt})


def load_splits(d, splits=("train", "valid", "test")) -> dict[str, list[tuple[str, str]]]:
    """Read train/valid/test pairs as the recipe's data section says (preparing the
    LibreOffice help corpus first when ``corpus: lohelp_en_de``)."""
    if d.corpus == "lohelp_en_de":
        from nmt_ls.prepare import prepare_lohelp

        prepare_lohelp(d.dir, d.src_lang, d.tgt_lang)
    if d.corpus not in ("lohelp_en_de", "files", "hub"):
        raise ValueError(f"data.corpus must be lohelp_en_de, files or hub, got {d.corpus!r}")
    source = d.hub_name if d.corpus == "hub" else d.dir
    if d.corpus == "hub" and not source:
        raise ValueError("data.corpus: hub needs data.hub_name")
    out = {}
    for name, split in (("train", d.train_split), ("valid", d.valid_split), ("test", d.test_split)):
        if name not in splits:
            continue
        filt = dict(max_len=d.max_len, max_ratio=d.max_ratio) if name == "train" else {}
        src, tgt = read_pairs(source, d.src_lang, d.tgt_lang, split=split, config=d.hub_config, **filt)
        out[name] = list(zip(src, tgt))
    return out
