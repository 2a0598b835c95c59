"""Parallel text -> (src, tgt) string pairs, validated and length-filtered.

A run resolves its recipe's corpus once, ``corpus = open_corpus(cfg.data)``, and passes that
frozen ``Corpus`` on: ``read_split(corpus, "train")`` gives a split's pairs, ``corpus.files(name)``
the identities (path, size, mtime) of the files it is read from, ``binarize.binarize_recipe``
its binarized train and valid splits. ``load_splits(DataConfig)`` does both steps at once.
``data.corpus`` names where the pairs come from:

* ``files``: a local folder ``data.dir`` holding, per split, ``{split}.{src_lang}`` +
  ``{split}.{tgt_lang}`` (line-aligned), ``{split}.tsv`` or ``{split}.jsonl`` (read here, so
  that every error names the file and line), or a folder written by ``save_to_disk``.
  Never sent to the Hugging Face Hub: a missing folder is a ``FileNotFoundError`` naming it.
* ``hf`` (alias ``hub``): ``data.path`` as ``datasets`` takes it: a folder written by
  ``Dataset(Dict).save_to_disk``; a builder (``json``, ``csv``, ``parquet``, ``arrow``) with
  ``data.data_files = {split: file or [files]}``; a local folder of data files; or a hub
  name (with ``data.hub_config``). Rows carry a ``translation`` column (``{lang: text}``) or
  one column per language.
* a name in ``CORPORA`` (``register_corpus``): a function prepares ``data.dir`` first, which
  is then read as ``files`` (``lohelp_en_de``: ``nmt_ls.prepare``).

A hub dataset that cannot be loaded here (hub unreachable and not cached, or a loading script
that ``datasets`` >= 4 no longer runs) raises ``DatasetUnavailableError`` with one line that
says what to do. The hub is probed once (an HTTP HEAD, 3 s at most) so that an offline
machine fails at once instead of after ``huggingface_hub``'s retries (about 25 s a call);
``HF_HUB_OFFLINE=0`` skips the probe, ``HF_HUB_OFFLINE=1`` skips the hub.

``read_pairs(Corpus(path, src_lang, tgt_lang), split)`` reads one split from a file, a text
prefix, a folder or a ``datasets`` source, inferring the format (``infer_format``). Lines are split on ``\\n`` only
(``str.splitlines`` would also split on U+2028, U+0085... and misalign the sides) and stripped.

Filtering (``filter_pairs`` by a ``PairFilter``): pairs with an empty side are dropped, kept or
raise (``on_empty``); ``max_len`` and ``max_ratio`` count **whitespace tokens**. ``read_split``
filters the train split only; valid and test keep every pair, an empty side as ``""`` (with
a warning), so that hypotheses stay line-aligned with the reference files they are scored
against.
"""

from __future__ import annotations

import contextlib
import functools
import glob
import itertools
import json
import logging
import os
import urllib.error
import urllib.request
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from nmt_ls.config import DataConfig

log = logging.getLogger(__name__)

FORMATS = ("text", "tsv", "jsonl", "hf")
SPLITS = ("train", "valid", "test")
# datasets builders that take data.data_files; a path of this name is never a hub name.
BUILDERS = ("json", "csv", "parquet", "arrow")
# Suffixes that mark a path as a local file (hub names do not end like this).
_FILE_SUFFIXES = (".json", ".jsonl", ".csv", ".tsv", ".parquet", ".arrow", ".txt")

# A row: ("file:line" for error messages, src, tgt).
Row = tuple[str, str, str]
# Reads one split: (split name, recipe key naming it) -> (rows, source name for messages).
SplitReader = Callable[[str, str], tuple[list[Row], str]]


class DatasetUnavailableError(FileNotFoundError):
    """A ``datasets`` source that cannot be loaded on this machine; the message says what to do."""


@dataclass
class FilterReport:
    """What ``filter_pairs`` did; ``str()`` gives the log line."""

    source: str
    n_read: int = 0
    n_empty: int = 0
    n_too_long: int = 0
    n_bad_ratio: int = 0
    n_empty_kept: int = 0

    @property
    def n_kept(self) -> int:
        return self.n_read - self.n_empty - self.n_too_long - self.n_bad_ratio

    def __str__(self) -> str:
        with_empty = f" ({self.n_empty_kept} with an empty side)" if self.n_empty_kept else ""
        return (
            f"{self.source}: kept {self.n_kept}/{self.n_read} pairs{with_empty} | dropped: "
            f"empty {self.n_empty}, too long {self.n_too_long}, bad ratio {self.n_bad_ratio}"
        )


# ---------------------------------------------------------------------------
# Local readers
# ---------------------------------------------------------------------------


def _read_lines(path: Path, strip: bool = True) -> list[str]:
    """UTF-8 lines of ``path``, stripped (else only of a final ``\\r``); error names file and line on bad bytes."""
    if not path.is_file():
        raise FileNotFoundError(f"no such file: {path}")
    raw = path.read_bytes()
    chunks = raw.split(b"\n")
    if chunks and chunks[-1] == b"":  # final newline
        chunks.pop()
    lines = []
    for lineno, chunk in enumerate(chunks, start=1):
        try:
            line = chunk.decode("utf-8")
        except UnicodeDecodeError as err:
            raise ValueError(f"{path}:{lineno}: invalid UTF-8 ({err.reason} at byte {err.start} of the line)") from None
        lines.append(line.strip() if strip else line.removesuffix("\r"))
    return lines


def _read_text(prefix: Path, src_lang: str, tgt_lang: str) -> list[Row]:
    src_path = prefix.with_name(f"{prefix.name}.{src_lang}")
    tgt_path = prefix.with_name(f"{prefix.name}.{tgt_lang}")
    src_lines, tgt_lines = _read_lines(src_path), _read_lines(tgt_path)
    if len(src_lines) != len(tgt_lines):
        raise ValueError(f"line counts differ: {src_path} has {len(src_lines)} lines, {tgt_path} has {len(tgt_lines)}")
    return [
        (f"{src_path}:{i} and {tgt_path}:{i}", s, t)
        for i, (s, t) in enumerate(zip(src_lines, tgt_lines, strict=True), start=1)
    ]


def _read_tsv(path: Path, src_lang: str, tgt_lang: str) -> list[Row]:
    rows = []
    for lineno, line in enumerate(_read_lines(path, strip=False), start=1):  # "src\t" has an empty target
        cols = line.split("\t")
        if lineno == 1 and [c.strip() for c in cols] == [src_lang, tgt_lang]:
            continue  # header
        if len(cols) != 2:
            raise ValueError(f"{path}:{lineno}: expected 2 tab-separated columns (src, tgt), got {len(cols)}")
        rows.append((f"{path}:{lineno}", cols[0].strip(), cols[1].strip()))
    return rows


def _pair_from_record(record: dict, src_lang: str, tgt_lang: str, where: str) -> tuple[str, str]:
    """(src, tgt) of a ``{lang: text}`` record, optionally under ``translation``; None reads as ""."""
    obj = record.get("translation", record) if isinstance(record, dict) else None
    if not isinstance(obj, dict) or src_lang not in obj or tgt_lang not in obj:
        keys = sorted(obj) if isinstance(obj, dict) else type(record).__name__
        raise ValueError(
            f"{where}: expected keys {src_lang!r} and {tgt_lang!r} (optionally under 'translation'), got {keys}"
        )
    src, tgt = ("" if obj[lang] is None else obj[lang] for lang in (src_lang, tgt_lang))
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


def _has_text_pair(prefix: Path, src_lang: str, tgt_lang: str) -> bool:
    return any(prefix.with_name(f"{prefix.name}.{lang}").exists() for lang in (src_lang, tgt_lang))


def _locate(p: Path, split: str, src_lang: str, tgt_lang: str) -> tuple[Path, str] | None:
    """The local file (or text prefix) and format that ``p`` names for ``split``; None if none."""
    if p.suffix == ".tsv":
        return p, "tsv"
    if p.suffix in (".jsonl", ".json"):
        return p, "jsonl"
    if _has_text_pair(p, src_lang, tgt_lang):
        return p, "text"
    if p.is_dir():
        if _has_text_pair(p / split, src_lang, tgt_lang):
            return p / split, "text"
        for fmt in ("tsv", "jsonl"):
            if (p / f"{split}.{fmt}").is_file():
                return p / f"{split}.{fmt}", fmt
    return None


def infer_format(path: str | os.PathLike, src_lang: str, tgt_lang: str, split: str = "train") -> str:
    """Which of ``FORMATS`` ``path`` is for ``split`` (see the module docstring)."""
    found = _locate(Path(path).expanduser(), split, src_lang, tgt_lang)
    return found[1] if found is not None else "hf"


def split_path(path: str | os.PathLike, split: str, fmt: str) -> Path:
    """The file (for ``text``, the prefix) that holds ``split`` of the local corpus ``path`` in
    format ``fmt``: inside a folder ``{split}`` or ``{split}.{fmt}``, else ``path`` itself."""
    p = Path(path).expanduser()
    if fmt in ("text", "tsv", "jsonl") and p.is_dir():
        return p / split if fmt == "text" else p / f"{split}.{fmt}"
    return p


def _read_local(p: Path, fmt: str, src_lang: str, tgt_lang: str) -> tuple[list[Row], str]:
    """Rows of the text prefix / tsv / jsonl file ``p`` and its name for messages."""
    if fmt == "text":
        return _read_text(p, src_lang, tgt_lang), f"{p}.{{{src_lang},{tgt_lang}}}"
    if fmt == "tsv":
        return _read_tsv(p, src_lang, tgt_lang), str(p)
    return _read_jsonl(p, src_lang, tgt_lang), str(p)


# ---------------------------------------------------------------------------
# datasets sources
# ---------------------------------------------------------------------------


def _is_saved_dataset(p: Path) -> bool:
    """True for a folder written by ``Dataset.save_to_disk`` or ``DatasetDict.save_to_disk``."""
    return (p / "state.json").is_file() or (p / "dataset_dict.json").is_file()


def _looks_local(path: str) -> bool:
    """True if ``path`` can only be a local path (hub names are ``name`` or ``org/name``)."""
    return (
        os.path.isabs(path)
        or path.startswith(("./", "../", "~"))
        or path in (".", "..")
        or path.count("/") > 1
        or Path(path).suffix in _FILE_SUFFIXES
    )


@functools.cache
def _hub_reachable(endpoint: str, timeout_s: float = 3.0) -> bool:
    """True if ``endpoint`` answers an HTTP HEAD (any status) within ``timeout_s``, through the
    proxies the environment names. ``HF_HUB_OFFLINE=0`` set explicitly skips the probe (True)."""
    if os.environ.get("HF_HUB_OFFLINE") == "0":
        return True
    try:
        urllib.request.urlopen(urllib.request.Request(endpoint, method="HEAD"), timeout=timeout_s).close()
    except urllib.error.HTTPError:
        return True  # it answered
    except (OSError, ValueError):  # URLError, timeout, refused, TLS failure; ValueError: a malformed URL
        return False
    return True


@contextlib.contextmanager
def _hub_offline(enable: bool):
    """Within the block, ``datasets`` and ``huggingface_hub`` act as under ``HF_HUB_OFFLINE=1``.

    Both read these module flags at call time; the environment variable itself is read only at
    import, so it cannot be set here once ``datasets`` is imported.
    """
    import datasets
    from huggingface_hub import constants

    saved = datasets.config.HF_HUB_OFFLINE, constants.HF_HUB_OFFLINE
    if enable:
        datasets.config.HF_HUB_OFFLINE = constants.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        datasets.config.HF_HUB_OFFLINE, constants.HF_HUB_OFFLINE = saved


def _load_dataset(path: str, **kwargs):
    """``datasets.load_dataset(path, **kwargs)``; a loading script gives a one-line error."""
    import datasets

    try:
        return datasets.load_dataset(path, **kwargs)
    except RuntimeError as err:
        if "Dataset scripts are no longer supported" not in str(err):
            raise
        script = str(err).rsplit(" ", 1)[-1]
        raise DatasetUnavailableError(
            f"dataset {path!r} needs a loading script ({script}), which datasets {datasets.__version__} no longer "
            f"runs; load it with datasets<4 (trust_remote_code=True) and save_to_disk, then set data.path to "
            f"that folder"
        ) from err


def _load_hub(name: str, config: str | None, data_files) -> object:
    """A hub dataset (all splits); offline, only what the ``datasets`` cache holds."""
    import datasets
    from datasets.exceptions import DatasetNotFoundError

    offline = datasets.config.HF_HUB_OFFLINE or not _hub_reachable(datasets.config.HF_ENDPOINT)
    try:
        with _hub_offline(offline):
            return _load_dataset(name, name=config, data_files=data_files)
    except ConnectionError as err:
        call = f"load_dataset({name!r}{f', {config!r}' if config else ''})"
        raise DatasetUnavailableError(
            f"hub dataset {name!r} could not be reached (offline?) and is not in the datasets cache, nor is there "
            f"a local folder {name!r}; on a machine with a network run datasets.{call}.save_to_disk(DIR) "
            f"(with datasets<4 and trust_remote_code=True if it needs a loading script), copy DIR here and "
            f"set data.path to it"
        ) from err
    except DatasetNotFoundError as err:
        raise DatasetUnavailableError(f"{err} (nor is there a local folder {name!r})") from err


def _check_data_files(data_files, builder: str) -> None:
    """``data_files`` is ``{split: file or [files]}`` and its local files exist."""
    if not isinstance(data_files, dict) or not data_files:
        raise ValueError(
            f"data.path {builder!r} needs data.data_files, a mapping split -> file(s), "
            f"e.g. {{train: train.{builder}, valid: valid.{builder}, test: test.{builder}}}; got {data_files!r}"
        )
    for split, files in data_files.items():
        names = [files] if isinstance(files, str) else files
        if not isinstance(names, list) or not names or not all(isinstance(f, str) for f in names):
            raise ValueError(f"data.data_files[{split!r}]: expected a file or a list of files, got {files!r}")
        for f in names:
            if "://" not in f and not any(c in f for c in "*?[") and not Path(f).expanduser().is_file():
                raise FileNotFoundError(f"data.data_files[{split!r}]: no such file: {f}")


def _open_hf(path: str, config: str | None, data_files) -> tuple[object, str]:
    """``(dataset, source name)`` for ``data.path``; the dataset is a ``DatasetDict`` (or a
    ``Dataset`` from a single ``save_to_disk``). Local paths never go to the hub."""
    import datasets

    if path in BUILDERS:
        _check_data_files(data_files, path)
        return _load_dataset(path, data_files=data_files), path
    local = Path(path).expanduser()
    if local.is_dir():
        if _is_saved_dataset(local):
            return datasets.load_from_disk(str(local)), str(local)
        return _load_dataset(str(local), data_files=data_files), str(local)
    if local.exists():
        raise ValueError(
            f"data.path {path!r} is a file; name a folder, or set data.path to one of {BUILDERS} "
            f"and data.data_files to {{split: file}}"
        )
    if _looks_local(path) or (local.parent != Path(".") and local.parent.is_dir()):  # ./data/x, data/x, /x
        raise FileNotFoundError(f"data.path: no such folder: {path} ({local.resolve()})")
    return _load_hub(path, config, data_files), path


def _dataset_rows(ds, src_lang: str, tgt_lang: str, where: str) -> list[Row]:
    """Rows of a ``datasets.Dataset`` with a ``translation`` column or one column per language."""
    cols = ds.column_names
    if "translation" in cols:
        records = ds["translation"]
    elif src_lang in cols and tgt_lang in cols:
        records = ({src_lang: s, tgt_lang: t} for s, t in zip(ds[src_lang], ds[tgt_lang], strict=True))
    else:
        raise ValueError(
            f"{where}: expected a 'translation' column or columns {src_lang!r} and {tgt_lang!r}, got columns {cols}"
        )
    return [
        (f"{where} row {i}", *_pair_from_record(rec, src_lang, tgt_lang, f"{where} row {i}"))
        for i, rec in enumerate(records)
    ]


def _select_split(ds, split: str, source: str, key: str):
    """Split ``split`` of a ``DatasetDict``; ``key`` is the setting that named it."""
    import datasets

    if isinstance(ds, datasets.Dataset):
        raise ValueError(
            f"{source} is one Dataset saved with save_to_disk; save a DatasetDict with train, valid and test splits"
        )
    if split not in ds:
        raise ValueError(f"{source} has no split {split!r} ({key}); its splits: {sorted(ds)}")
    return ds[split]


def _hf_reader(ds, source: str, src_lang: str, tgt_lang: str, data_files=None) -> SplitReader:
    """Reads splits of ``ds``; rows are named by their file where a split is one data file."""

    def read(split: str, key: str) -> tuple[list[Row], str]:
        files = (data_files or {}).get(split)
        where = files if isinstance(files, str) else f"{source}[{split}]"
        return _dataset_rows(_select_split(ds, split, source, key), src_lang, tgt_lang, where), where

    return read


# ---------------------------------------------------------------------------
# Filtering
# ---------------------------------------------------------------------------


@dataclass(frozen=True)
class PairFilter:
    """Which pairs ``filter_pairs`` keeps.

    Attributes:
        max_len: drop a pair if either side has more than this many whitespace tokens.
        max_ratio: drop a pair if ``max(n_src, n_tgt) / min(n_src, n_tgt) > max_ratio``
            (whitespace tokens; pairs with an empty side are not ratio-tested).
        on_empty: for a pair with an empty or whitespace-only side: ``"drop"`` (count it),
            ``"keep"`` (keep it as is and log a warning naming where; for valid/test, whose
            outputs are scored line by line against reference files) or ``"error"`` (raise
            ``ValueError`` naming the file and line).
    """

    max_len: int | None = None
    max_ratio: float | None = None
    on_empty: str = "drop"

    def __post_init__(self):
        if self.on_empty not in ("drop", "keep", "error"):
            raise ValueError(f"on_empty must be 'drop', 'keep' or 'error', got {self.on_empty!r}")


def _warn_empty_kept(report: FilterReport, locations: list[str]) -> None:
    shown = "; ".join(locations[:3]) + ("; ..." if len(locations) > 3 else "")
    log.warning(
        "%s: kept %d pair(s) with an empty side as empty strings, so that outputs stay aligned with the "
        "reference lines: %s",
        report.source,
        len(locations),
        shown,
    )


def filter_pairs(
    src: list[str],
    tgt: list[str],
    rules: PairFilter = PairFilter(),
    source: str = "",
    where: list[str] | None = None,
) -> tuple[list[str], list[str], FilterReport]:
    """Drop unusable pairs.

    Args:
        src, tgt: aligned sentences.
        rules: what to drop (see ``PairFilter``). Default: only pairs with an empty side.
        source: corpus name for the report.
        where: per pair, its location ("file:line") for messages. Default: "<source> pair <i>".
    Returns:
        (src, tgt, report).
    """
    if len(src) != len(tgt):
        raise ValueError(f"{source}: {len(src)} source but {len(tgt)} target sentences")
    max_len, max_ratio = rules.max_len, rules.max_ratio
    report = FilterReport(source=source, n_read=len(src))
    src_out, tgt_out, empty_kept = [], [], []
    for i, (s, t) in enumerate(zip(src, tgt, strict=True)):
        n_src, n_tgt = len(s.split()), len(t.split())
        if n_src == 0 or n_tgt == 0:
            loc = where[i] if where is not None else f"{source} pair {i + 1}"
            side = "source" if n_src == 0 else "target"
            if rules.on_empty == "error":
                raise ValueError(f"{loc}: empty {side} side (use on_empty='drop' to skip such pairs)")
            if rules.on_empty == "drop":
                report.n_empty += 1
                continue
            empty_kept.append(f"{loc} (empty {side})")
        elif max_len is not None and max(n_src, n_tgt) > max_len:
            report.n_too_long += 1
            continue
        elif max_ratio is not None and max(n_src, n_tgt) / min(n_src, n_tgt) > max_ratio:
            report.n_bad_ratio += 1
            continue
        src_out.append(s)
        tgt_out.append(t)
    report.n_empty_kept = len(empty_kept)
    if empty_kept:
        _warn_empty_kept(report, empty_kept)
    return src_out, tgt_out, report


def _filtered(rows: list[Row], source: str, rules: PairFilter) -> tuple[list[str], list[str]]:
    """``filter_pairs`` over ``rows``, logging the report; raises if nothing is there or left."""
    if not rows:
        raise ValueError(f"empty corpus: no sentence pairs in {source}")
    where, src, tgt = (list(col) for col in zip(*rows, strict=True))
    src, tgt, report = filter_pairs(src, tgt, rules, source=source, where=where)
    log.info("%s", report)
    if not src:
        raise ValueError(f"no pairs left in {source} after filtering ({report})")
    return src, tgt


# ---------------------------------------------------------------------------
# The corpus spec and read_pairs
# ---------------------------------------------------------------------------


def file_identities(paths: Iterable[Path]) -> list[dict]:
    """Resolved path, size and mtime (ns) of each file: what caches and tokenizers are keyed on."""
    out = []
    for path in paths:
        st = path.stat()
        out.append({"path": str(path.resolve()), "size": st.st_size, "mtime_ns": st.st_mtime_ns})
    return out


@dataclass(frozen=True)
class Corpus:
    """A parallel corpus, resolved once: where each split is read from, and how.

    ``open_corpus(DataConfig)`` makes a recipe's (preparing a registered corpus first, once);
    ``Corpus(path, src_lang, tgt_lang)`` names a file, text prefix, folder or ``datasets``
    source directly. What it learns from the disk it keeps: a split's format, its files'
    identities and an opened ``datasets`` source are taken at first use, so a corpus edited
    afterwards needs a new ``Corpus`` (each run makes one).

    Attributes:
        source: the path or name as given (``~`` allowed): ``data.dir`` for a recipe's local
            corpus, ``data.path`` (or ``data.hub_name``) for ``datasets``.
        src_lang, tgt_lang: the languages (file suffixes, columns or record keys).
        fmt: one of ``FORMATS``; None: inferred per split (``infer_format``).
        hub_config: the ``datasets`` configuration name (hub names only).
        data_files: a ``datasets`` builder's ``{split: file or [files]}``.
        recipe: the recipe's ``data.corpus``; None for a path, which is read as ``read_pairs``
            has always read one (a split found in no local file is looked for with ``datasets``).
        train_split, valid_split, test_split: the split names of the recipe's train, valid, test.
        max_len, max_ratio: the train split's filters (``read_split``).
    """

    source: str | os.PathLike
    src_lang: str
    tgt_lang: str
    fmt: str | None = None
    hub_config: str | None = None
    data_files: dict | None = None
    recipe: str | None = None
    train_split: str = "train"
    valid_split: str = "valid"
    test_split: str = "test"
    max_len: int | None = None
    max_ratio: float | None = None
    _memo: dict = field(default_factory=dict, init=False, repr=False, compare=False)

    def __post_init__(self):
        if self.fmt is not None and self.fmt not in FORMATS:
            raise ValueError(f"unknown format {self.fmt!r}; expected one of {FORMATS}")

    @property
    def kind(self) -> str:
        """``"path"`` (no recipe), ``"files"`` (a recipe's ``data.dir``) or ``"hf"`` (``datasets``)."""
        return "path" if self.recipe is None else _READ_AS.get(self.recipe, "files")

    @property
    def location(self) -> str:
        """``source`` with ``~`` expanded: what cache keys and messages name."""
        return os.path.expanduser(str(self.source))

    def split_name(self, which: str) -> str:
        """The name of the recipe's split ``which`` (one of ``SPLITS``)."""
        if which not in SPLITS:
            raise ValueError(f"splits must be among {SPLITS}, got {[which]}")
        return getattr(self, f"{which}_split")

    def _memoized(self, key, make: Callable):
        if key not in self._memo:
            self._memo[key] = make()
        return self._memo[key]

    def format(self, split: str) -> str:
        """Which of ``FORMATS`` ``split`` is read in."""
        return self._memoized(
            ("format", split), lambda: self.fmt or infer_format(self.source, self.src_lang, self.tgt_lang, split)
        )

    def text_files(self, split: str) -> tuple[Path, Path]:
        """The source and target files of a ``text`` split."""
        prefix = split_path(self.source, split, "text")
        return tuple(prefix.with_name(f"{prefix.name}.{lang}") for lang in (self.src_lang, self.tgt_lang))

    def files(self, split: str) -> list[dict]:
        """``file_identities`` of the local files ``split`` is read from, taken once."""
        return self._memoized(("files", split), lambda: file_identities(self._local_files(split)))

    def _local_files(self, split: str) -> list[Path]:
        """The local files ``split`` is read from: for ``hf``, a local folder's files or the
        split's ``data_files`` (globs expanded; URLs and hub names have none)."""
        fmt = self.format(split)
        if fmt == "text":
            files = list(self.text_files(split))
        elif fmt in ("tsv", "jsonl"):
            files = [split_path(self.source, split, fmt)]
        else:
            local = Path(self.source).expanduser()
            if local.is_dir():
                return sorted(p for p in local.rglob("*") if p.is_file())
            names = (self.data_files or {}).get(split, [])
            names = [names] if isinstance(names, str) else names
            matches = (glob.glob(os.path.expanduser(n)) for n in names if "://" not in n)
            return sorted({Path(m) for m in itertools.chain.from_iterable(matches)})
        for path in files:
            if not path.is_file():
                raise FileNotFoundError(f"no such file: {path}")
        return files

    def rows(self, split: str) -> tuple[list[Row], str]:
        """The rows of ``split`` and a short name of it for messages."""
        setting = self._setting(split)
        if self.kind == "files":
            root = self._folder()
            if not _is_saved_dataset(root):
                found = _locate(root, split, self.src_lang, self.tgt_lang)
                if found is None:
                    raise FileNotFoundError(f"{root}: no {self._expected(split)} ({setting}={split!r})")
                return _read_local(*found, self.src_lang, self.tgt_lang)
        elif self.kind == "path" and self.fmt != "hf":
            if self.fmt is None:
                found = _locate(Path(self.source).expanduser(), split, self.src_lang, self.tgt_lang)
            else:
                found = split_path(self.source, split, self.fmt), self.fmt
            if found is not None:
                return _read_local(*found, self.src_lang, self.tgt_lang)
        return self._datasets()(split, setting)

    def _setting(self, split: str) -> str:
        """What named ``split``, for messages: the recipe's ``data.{which}_split``, else ``split``."""
        for which in SPLITS if self.recipe is not None else ():
            if getattr(self, f"{which}_split") == split:
                return f"data.{which}_split"
        return "split"

    def _expected(self, split: str) -> str:
        return f"{split}.{self.src_lang} + {split}.{self.tgt_lang}, {split}.tsv or {split}.jsonl"

    def _folder(self) -> Path:
        """``data.dir``, checked to be a folder."""
        root = Path(self.source).expanduser()
        if not root.is_dir():
            what = "is a file, not a folder" if root.exists() else "does not exist"
            error = ValueError if root.exists() else FileNotFoundError
            raise error(
                f"data.dir {self.source!r} {what} ({root.resolve()}); data.corpus {self.recipe!r} reads "
                f"{self._expected('{split}')} in it"
            )
        return root

    def _datasets(self) -> SplitReader:
        """The reader of the ``datasets`` source, opened once. Local paths never go to the hub."""

        def open_source() -> SplitReader:
            path = str(self.source)
            ds, source = _open_hf(path, self.hub_config, self.data_files)
            files = self.data_files if path in BUILDERS else None
            return _hf_reader(ds, source, self.src_lang, self.tgt_lang, files)

        return self._memoized("datasets", open_source)


def read_pairs(corpus: Corpus, split: str = "train", rules: PairFilter = PairFilter()) -> tuple[list[str], list[str]]:
    """Read, validate and filter one split of a parallel corpus into two aligned lists.

    Args:
        corpus: the corpus (``Corpus(path, src_lang, tgt_lang)``: a file, prefix, directory or
            dataset name; see the module docstring).
        split: file name inside a directory (``{split}.{lang}``, ``{split}.tsv``,
            ``{split}.jsonl``) or the ``datasets`` split.
        rules: see ``PairFilter``. Default: drop pairs with an empty side.
    Returns:
        (src, tgt): equal-length lists of stripped strings (non-empty unless ``on_empty="keep"``).
    Raises:
        FileNotFoundError: a file or folder is missing (named); ``DatasetUnavailableError`` for
            a hub dataset that cannot be loaded here.
        ValueError: unequal line counts, invalid UTF-8 or malformed line (file and
            line named), empty corpus, or nothing left after filtering.
    """
    rows, source = corpus.rows(split)
    return _filtered(rows, source, rules)


def load_parallel(corpus: Corpus, split: str = "train", rules: PairFilter = PairFilter()):
    """``read_pairs`` as a ``datasets.Dataset`` with string columns ``src`` and ``tgt``."""
    import datasets

    src, tgt = read_pairs(corpus, split, rules)
    return datasets.Dataset.from_dict({"src": src, "tgt": tgt})


# ---------------------------------------------------------------------------
# Recipes: the corpus registry, open_corpus and read_split
# ---------------------------------------------------------------------------

# Corpora that are made before they are read: name -> function(DataConfig) that writes
# data.dir (idempotently); data.dir is then read as corpus: files.
CORPORA: dict[str, Callable[[DataConfig], None]] = {}
_READ_AS = {"files": "files", "hf": "hf", "hub": "hf"}


def register_corpus(name: str) -> Callable:
    """Decorator: ``@register_corpus("my_corpus")`` on ``fn(d: DataConfig) -> None``, which
    prepares ``d.dir`` so that ``data.corpus: my_corpus`` reads it as ``files``."""

    def register(fn: Callable[[DataConfig], None]) -> Callable[[DataConfig], None]:
        if name in CORPORA or name in _READ_AS:
            raise ValueError(f"corpus {name!r} is already registered")
        CORPORA[name] = fn
        return fn

    return register


@register_corpus("lohelp_en_de")
def _prepare_lohelp(d: DataConfig) -> None:
    from nmt_ls.prepare import prepare_lohelp

    prepare_lohelp(os.path.expanduser(d.dir), d.src_lang, d.tgt_lang)


def open_corpus(d: DataConfig, prepare: bool = True) -> Corpus:
    """The recipe's corpus (see the module docstring), resolved once for a run: its keys are
    checked to fit it and a corpus in ``CORPORA`` is prepared (idempotently).

    Args:
        prepare: False where another process prepares it (the main worker, for the others).
    Raises:
        ValueError: a bad setting (key named).
    """
    read_as = "files" if d.corpus in CORPORA else _READ_AS.get(d.corpus)
    if read_as is None:
        raise ValueError(f"data.corpus must be files, hf (alias hub) or one of {sorted(CORPORA)}, got {d.corpus!r}")
    if read_as == "files" and (d.path is not None or d.data_files is not None):
        raise ValueError(f"data.path and data.data_files are read with data.corpus: hf, not {d.corpus!r}")
    if read_as == "hf" and not (d.path or d.hub_name):
        raise ValueError(
            f"data.corpus: {d.corpus} needs data.path: a hub name, a save_to_disk folder, a data folder, "
            f"or one of {BUILDERS} with data.data_files"
        )
    if prepare and d.corpus in CORPORA:
        CORPORA[d.corpus](d)
    return Corpus(
        d.dir if read_as == "files" else (d.path or d.hub_name),
        d.src_lang,
        d.tgt_lang,
        fmt="hf" if read_as == "hf" else None,
        hub_config=d.hub_config,
        data_files=d.data_files,
        recipe=d.corpus,
        train_split=d.train_split,
        valid_split=d.valid_split,
        test_split=d.test_split,
        max_len=d.max_len,
        max_ratio=d.max_ratio,
    )


def read_split(corpus: Corpus, which: str) -> list[tuple[str, str]]:
    """The pairs ``(src, tgt)`` of the recipe's split ``which`` (one of ``SPLITS``).

    The train split loses pairs with an empty side and those over ``max_len`` / ``max_ratio``;
    valid and test keep every pair in order (an empty side as ``""``, with a warning naming
    where), so outputs align with the references.

    Raises:
        FileNotFoundError: a missing folder or file, named (``DatasetUnavailableError``: a hub
            dataset that cannot be loaded here, with what to do).
        ValueError: a malformed file (file and line named), a bad setting (key named).
    """
    if which == "train":
        rules = PairFilter(corpus.max_len, corpus.max_ratio, on_empty="drop")
    else:
        rules = PairFilter(on_empty="keep")
    src, tgt = read_pairs(corpus, corpus.split_name(which), rules)
    return list(zip(src, tgt, strict=True))


def load_splits(d: DataConfig, splits: Sequence[str] = SPLITS) -> dict[str, list[tuple[str, str]]]:
    """``read_split`` of each of ``splits`` (a subset of ``SPLITS``) of ``open_corpus(d)``."""
    unknown = [s for s in splits if s not in SPLITS]
    if unknown:
        raise ValueError(f"splits must be among {SPLITS}, got {unknown}")
    corpus = open_corpus(d)
    return {which: read_split(corpus, which) for which in SPLITS if which in splits}
