"""Binarized corpora: subword ids encoded once, then memory-mapped by every worker.

    corpus = Corpus("data/big", "en", "de")                  # or data.open_corpus(cfg.data), once a run
    encoding = Encoding.of("runs/x/spm.model", max_positions=256)   # hashes the model once
    train = CorpusSplit(corpus, "train", PairFilter(max_len=100, max_ratio=3.0))
    pairs = open_or_build(train, encoding, "runs/x/data-bin")
    batches = batch_by_tokens(pairs.src_lens, pairs.tgt_lens, 4000, seed=1, epoch=0)
    batch = pairs.batch(batches[0], tok.pad_id, tok.bos_id, tok.eos_id)

A recipe's train and valid splits: ``binarize_recipe(cfg, corpus, spm_path)``.

The ids are those of the in-memory path (``encode_pairs`` after ``data.read_pairs``):
``filter_pairs`` drops empty, too long (``max_len`` whitespace tokens) and badly proportioned
(``max_ratio``) pairs, the source gets ``encode(s) + [eos]``, the target ``encode(t)``, and
pairs with ``len(src) > max_positions`` or ``len(tgt) + 1 > max_positions`` are dropped.
Local text corpora (``{prefix}.{lang}``) are streamed in chunks of lines and encoded by a pool
of processes (each loads the sentencepiece model itself); other formats (tsv, jsonl, hub) are
read whole by ``data.read_pairs`` once, then encoded the same way.

One cache is a directory ``{cache_dir}/{split}.{key[:16]}``::

    src.bin, tgt.bin    all kept pairs' ids back to back (uint16 if the vocabulary allows, else int32)
    src.idx, tgt.idx    int64 offsets, n + 1 each: pair i is ids[idx[i]:idx[i + 1]]
    src.len, tgt.len    lengths (uint16, or int32 past 65535): what ``batch_by_tokens`` needs
    meta.json           counts, dtypes, the filter report, the key and what it was computed from

The key is a sha256 of this layout's version, each corpus file's resolved path, size and
mtime (ns), the sha256 of the tokenizer model's bytes, and the split, languages, format and
filter options. File *stats* rather than contents: hashing a 1 GB corpus costs seconds at every
start of every worker, a stat costs nothing, and any write to a file moves its mtime. The price
is a needless rebuild when a file is rewritten unchanged (or copied without keeping mtimes);
only an edit that keeps both size and mtime would go unseen. A ``datasets`` builder (``json``,
``csv``...) is keyed by the files of the split's ``data_files``; hub datasets by name, config and
split. The ``Corpus`` takes each split's file stats once and the ``Encoding`` hashes the model
once, however many keys are computed from them.

A cache is built in ``{cache_dir}/.tmp.{name}.{pid}`` and renamed into place once every file
is written and synced, so a killed build leaves at most a temporary directory (removed by the
next build) and never a directory that ``MmapPairs`` would read. Builders of one split take
an ``flock``, so workers that all call ``open_or_build`` build it once and share it.
"""

from __future__ import annotations

import fcntl
import hashlib
import itertools
import json
import logging
import multiprocessing
import os
import shutil
import time
from collections import Counter, deque
from collections.abc import Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import sentencepiece as spm

from nmt_ls.data import Corpus, PairFilter, filter_pairs, read_pairs
from nmt_ls.tokenizer import Tokenizer

log = logging.getLogger(__name__)

LAYOUT = 1  # version of the files above; part of the key
SIDES = ("src", "tgt")
COUNTS = ("n_read", "n_empty", "n_too_long", "n_bad_ratio", "n_over_positions")


def _uint_dtype(max_value: int) -> np.dtype:
    return np.dtype(np.uint16) if max_value < 2**16 else np.dtype(np.int32)


# ---- readers ------------------------------------------------------------------------------


class _Pairs:
    """What both readers share: ``src_lens``/``tgt_lens`` arrays, ``get`` and ``batch``."""

    src_lens: np.ndarray
    tgt_lens: np.ndarray

    def __len__(self) -> int:
        return len(self.src_lens)

    def get(self, idx) -> tuple[list[list[int]], list[list[int]]]:
        raise NotImplementedError

    def batch(self, idx, pad_id: int, bos_id: int, eos_id: int):
        """The examples ``idx`` padded into a ``batching.Batch``."""
        from nmt_ls.batching import collate  # torch stays out of the encoding workers

        return collate(*self.get(idx), idx, pad_id, bos_id, eos_id)


class EncodedPairs(_Pairs):
    """Encoded pairs held in memory, with the interface of ``MmapPairs``.

    Args:
        src_ids: per pair the source ids, eos included.
        tgt_ids: per pair the target ids, without bos/eos.
    Attributes:
        src_lens, tgt_lens (np.ndarray): int64 lengths, shape (n,).
    """

    def __init__(self, src_ids: Sequence[list[int]], tgt_ids: Sequence[list[int]]):
        if len(src_ids) != len(tgt_ids):
            raise ValueError(f"{len(src_ids)} source but {len(tgt_ids)} target sequences")
        self.src_ids, self.tgt_ids = src_ids, tgt_ids
        self.src_lens = np.fromiter(map(len, src_ids), dtype=np.int64, count=len(src_ids))
        self.tgt_lens = np.fromiter(map(len, tgt_ids), dtype=np.int64, count=len(tgt_ids))

    def get(self, idx) -> tuple[list[list[int]], list[list[int]]]:
        """Source and target ids of the pairs ``idx`` (a list or a 1-D int array)."""
        return [self.src_ids[i] for i in idx], [self.tgt_ids[i] for i in idx]


def encode_pairs(tok: Tokenizer, pairs, max_positions: int) -> EncodedPairs:
    """The in-memory path: ``encode(s) + [eos]`` and ``encode(t)`` per pair, dropping pairs
    whose sides need more than ``max_positions`` positions (as ``binarize`` does)."""
    src = tok.encode_batch([s for s, _ in pairs])
    tgt = tok.encode_batch([t for _, t in pairs])
    keep = [i for i in range(len(pairs)) if len(src[i]) + 1 <= max_positions and len(tgt[i]) + 1 <= max_positions]
    if len(keep) < len(pairs):
        log.info("dropped %d pairs longer than max_positions=%d", len(pairs) - len(keep), max_positions)
    return EncodedPairs([src[i] + [tok.eos_id] for i in keep], [tgt[i] for i in keep])


class MmapPairs(_Pairs):
    """A binarized corpus directory, memory-mapped read-only (see the module docstring).

    Every process that opens the same directory shares its pages through the page cache;
    nothing is read until asked for, and ``get`` touches only the pairs it returns.

    Args:
        path: a directory written by ``binarize``.
    Attributes:
        src_lens, tgt_lens (np.ndarray): lengths, shape (n,), mapped from ``{src,tgt}.len``;
            the source's include eos, the target's exclude bos/eos.
        meta (dict): the contents of ``meta.json``.
    Raises:
        FileNotFoundError: ``path`` has no ``meta.json``.
        ValueError: a file is missing or its size disagrees with ``meta.json`` (a truncated
            or incomplete cache).
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        meta_path = self.path / "meta.json"
        if not meta_path.is_file():
            raise FileNotFoundError(f"{self.path}: no meta.json, not a binarized corpus")
        self.meta = json.loads(meta_path.read_text(encoding="utf-8"))
        if self.meta.get("layout") != LAYOUT:
            raise ValueError(f"{meta_path}: layout {self.meta.get('layout')!r}, this code reads {LAYOUT}")
        n = self.meta["n"]
        self._ids, self._offsets = {}, {}
        for side in SIDES:
            tokens = self.meta[f"{side}_tokens"]
            self._ids[side] = self._map(f"{side}.bin", self.meta["id_dtype"], tokens)
            self._offsets[side] = self._map(f"{side}.idx", "int64", n + 1)
            if self._offsets[side][-1] != tokens:
                raise ValueError(
                    f"{self.path / (side + '.idx')}: last offset {self._offsets[side][-1]}, "
                    f"expected {tokens}; delete {self.path} to rebuild it"
                )
        self.src_lens = self._map("src.len", self.meta["len_dtype"], n)
        self.tgt_lens = self._map("tgt.len", self.meta["len_dtype"], n)

    def _map(self, name: str, dtype: str, count: int) -> np.ndarray:
        path = self.path / name
        expected = count * np.dtype(dtype).itemsize
        size = path.stat().st_size if path.is_file() else None
        if size != expected:
            raise ValueError(
                f"{path}: {'missing' if size is None else f'{size} bytes'}, expected {expected} bytes: "
                f"truncated or incomplete binarized corpus; delete {self.path} to rebuild it"
            )
        if count == 0:
            return np.zeros(0, dtype=dtype)
        # A plain ndarray view of the map: slicing it is several times cheaper than slicing np.memmap.
        return np.memmap(path, dtype=dtype, mode="r", shape=(count,)).view(np.ndarray)

    def __reduce__(self):  # pickles as its path (e.g. into DataLoader workers)
        return MmapPairs, (self.path,)

    def __repr__(self) -> str:
        return f"MmapPairs({str(self.path)!r}, n={len(self)})"

    def get(self, idx) -> tuple[list[list[int]], list[list[int]]]:
        """Source and target ids of the pairs ``idx`` (a list or a 1-D int array)."""
        idx = np.asarray(idx, dtype=np.int64)
        if idx.size and (idx.min() < 0 or idx.max() >= len(self)):
            raise IndexError(f"{self.path}: indices must lie in [0, {len(self)}), got {idx.min()}..{idx.max()}")
        out = []
        for side in SIDES:
            ids, offsets = self._ids[side], self._offsets[side]
            out.append([ids[a:b].tolist() for a, b in zip(offsets[idx].tolist(), offsets[idx + 1].tolist())])
        return out[0], out[1]


# ---- encoding -----------------------------------------------------------------------------

_worker_sp: spm.SentencePieceProcessor | None = None


def _init_worker(spm_path: str) -> None:
    global _worker_sp
    _worker_sp = spm.SentencePieceProcessor(model_file=spm_path)


def _decode(lines: list, path: str, first_lineno: int) -> list[str]:
    """Stripped UTF-8 text of raw lines (str lines pass through), as ``data._read_lines``."""
    if lines and isinstance(lines[0], str):
        return lines
    out = []
    for lineno, line in enumerate(lines, start=first_lineno):
        try:
            out.append(line.decode("utf-8").strip())
        except UnicodeDecodeError as err:
            raise ValueError(f"{path}:{lineno}: invalid UTF-8 ({err.reason} at byte {err.start} of the line)") from None
    return out


def _flatten(seqs: list[list[int]], keep: np.ndarray, dtype: np.dtype) -> np.ndarray:
    kept = [s for s, k in zip(seqs, keep.tolist()) if k]
    return np.fromiter(itertools.chain.from_iterable(kept), dtype=dtype, count=sum(map(len, kept)))


def _encode_chunk(task: tuple) -> dict:
    """Decode, filter and encode one chunk of aligned lines (runs in a pool worker)."""
    first_lineno, src_lines, tgt_lines, names, opts = task
    src = _decode(src_lines, names[0], first_lineno)
    tgt = _decode(tgt_lines, names[1], first_lineno)
    src, tgt, report = filter_pairs(src, tgt, opts["rules"])
    src_ids = _worker_sp.encode(src, out_type=int, add_eos=True, num_threads=1)  # encode(s) + [eos]
    tgt_ids = _worker_sp.encode(tgt, out_type=int, num_threads=1)
    src_lens = np.fromiter(map(len, src_ids), dtype=np.int64, count=len(src_ids))
    tgt_lens = np.fromiter(map(len, tgt_ids), dtype=np.int64, count=len(tgt_ids))
    keep = (src_lens <= opts["max_positions"]) & (tgt_lens + 1 <= opts["max_positions"])
    dtype = np.dtype(opts["id_dtype"])
    return {
        "src": _flatten(src_ids, keep, dtype),
        "tgt": _flatten(tgt_ids, keep, dtype),
        "src_lens": src_lens[keep],
        "tgt_lens": tgt_lens[keep],
        "counts": {
            "n_read": report.n_read,
            "n_empty": report.n_empty,
            "n_too_long": report.n_too_long,
            "n_bad_ratio": report.n_bad_ratio,
            "n_over_positions": int((~keep).sum()),
        },
    }


def _encode_all(tasks: Iterator[tuple], spm_path: str, num_workers: int) -> Iterator[dict]:
    """``_encode_chunk`` over ``tasks``, in order, on ``num_workers`` processes.

    At most two chunks per worker are in flight, so the reader never runs ahead of the
    encoders (``Pool.imap`` would read the whole corpus into its queue). The workers are
    forked: they run sentencepiece and numpy only, never the parent's torch threads, and a
    fork needs no re-import of ``__main__`` (spawn fails for ``python -`` or ``-c``
    callers). A worker that dies raises ``BrokenProcessPool`` instead of hanging.
    """
    if num_workers <= 1:
        _init_worker(spm_path)
        yield from map(_encode_chunk, tasks)
        return
    pool = ProcessPoolExecutor(
        num_workers, mp_context=multiprocessing.get_context("fork"), initializer=_init_worker, initargs=(spm_path,)
    )
    try:
        pending: deque = deque()
        for task in tasks:
            pending.append(pool.submit(_encode_chunk, task))
            if len(pending) >= 2 * num_workers:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()
    finally:
        pool.shutdown(cancel_futures=True)


# ---- what a cache holds -------------------------------------------------------------------


def spm_sha256(spm_path) -> str:
    """The sha256 of a sentencepiece model's bytes."""
    return hashlib.sha256(Path(spm_path).read_bytes()).hexdigest()


@dataclass(frozen=True)
class Encoding:
    """How pairs become ids: the sentencepiece model (pad=0, unk=1, bos=2, eos=3) and the
    model's positions (pairs that need more are dropped). ``Encoding.of`` hashes the model
    once for every key computed from it.

    Attributes:
        spm_path (str): the model file.
        spm_sha256 (str): the sha256 of its bytes.
        max_positions (int): positions of the model. Default: 1024
    """

    spm_path: str
    spm_sha256: str
    max_positions: int = 1024

    @classmethod
    def of(cls, spm_path, max_positions: int = 1024) -> Encoding:
        return cls(str(spm_path), spm_sha256(spm_path), max_positions)


@dataclass(frozen=True)
class CorpusSplit:
    """One split of a corpus and the filters it is read with: what one cache holds.

    Attributes:
        corpus (Corpus): the corpus.
        split (str): the split's name (``{split}.{lang}`` in a folder, a ``datasets`` split).
        rules (PairFilter): ``max_len``/``max_ratio`` (part of the key); pairs with an empty
            side are always dropped and counted, ``on_empty`` applies to formats read whole.
    """

    corpus: Corpus
    split: str = "train"
    rules: PairFilter = PairFilter()


def _text_chunks(src_path: Path, tgt_path: Path, chunk_size: int) -> Iterator[tuple[int, list[bytes], list[bytes]]]:
    """(first 1-based line number, src lines, tgt lines) of aligned files, ``chunk_size`` lines
    at a time; lines are split on ``\\n`` only, as ``data`` does."""
    with open(src_path, "rb") as f_src, open(tgt_path, "rb") as f_tgt:
        first = 1
        while True:
            src, tgt = list(itertools.islice(f_src, chunk_size)), list(itertools.islice(f_tgt, chunk_size))
            if len(src) != len(tgt):
                n_src = first - 1 + len(src) + sum(1 for _ in f_src)
                n_tgt = first - 1 + len(tgt) + sum(1 for _ in f_tgt)
                raise ValueError(f"line counts differ: {src_path} has {n_src} lines, {tgt_path} has {n_tgt}")
            if not src:
                return
            yield first, src, tgt
            first += len(src)


def _source_chunks(part: CorpusSplit, opts: dict, chunk_size: int) -> Iterator[tuple]:
    """Tasks for ``_encode_chunk``: streamed for text files, else via ``data.read_pairs``."""
    if part.corpus.format(part.split) == "text":
        src_path, tgt_path = part.corpus.text_files(part.split)
        names = (str(src_path), str(tgt_path))
        for first, src, tgt in _text_chunks(src_path, tgt_path, chunk_size):
            yield first, src, tgt, names, opts
        return
    src, tgt = read_pairs(part.corpus, part.split, part.rules)
    names = (part.corpus.location,) * 2
    for start in range(0, len(src), chunk_size):  # re-filtering drops only the empty sides kept
        yield start + 1, src[start : start + chunk_size], tgt[start : start + chunk_size], names, opts


def key_inputs(part: CorpusSplit, encoding: Encoding) -> dict:
    """What a cache's key is computed from (see the module docstring); ``cache_key`` hashes it."""
    c, split = part.corpus, part.split
    # a recipe's datasets corpus is also named by its configuration and data_files
    config = json.dumps([c.hub_config, c.data_files], sort_keys=True) if c.kind == "hf" else c.hub_config
    return {
        "layout": LAYOUT,
        "source": c.location,
        "split": split,
        "fmt": c.format(split),
        "config": config,
        "langs": [c.src_lang, c.tgt_lang],
        "files": c.files(split),
        "spm_sha256": encoding.spm_sha256,
        "max_len": part.rules.max_len,
        "max_ratio": part.rules.max_ratio,
        "max_positions": encoding.max_positions,
    }


def cache_key(inputs: dict) -> str:
    return hashlib.sha256(json.dumps(inputs, sort_keys=True).encode()).hexdigest()


# ---- writing ------------------------------------------------------------------------------


class _CacheWriter:
    """Appends encoded chunks to the files of a cache directory under construction."""

    def __init__(self, folder: Path, id_dtype: np.dtype, len_dtype: np.dtype):
        self.id_dtype, self.len_dtype = id_dtype, len_dtype
        names = [f"{side}.{ext}" for side in SIDES for ext in ("bin", "idx", "len")]
        self.files = {name: open(folder / name, "wb") for name in names}  # noqa: SIM115 (closed by close())
        self.n = 0
        self.tokens = {side: 0 for side in SIDES}
        for side in SIDES:
            np.zeros(1, dtype=np.int64).tofile(self.files[f"{side}.idx"])

    def append(self, chunk: dict) -> None:
        for side in SIDES:
            lens = chunk[f"{side}_lens"]
            chunk[side].astype(self.id_dtype, copy=False).tofile(self.files[f"{side}.bin"])
            lens.astype(self.len_dtype).tofile(self.files[f"{side}.len"])
            (self.tokens[side] + np.cumsum(lens, dtype=np.int64)).tofile(self.files[f"{side}.idx"])
            self.tokens[side] += int(lens.sum())
        self.n += len(chunk["src_lens"])

    def close(self) -> None:
        for f in self.files.values():
            f.flush()
            os.fsync(f.fileno())
            f.close()


def _write_json_synced(path: Path, obj: dict) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=1)
        f.flush()
        os.fsync(f.fileno())


def binarize(
    part: CorpusSplit, encoding: Encoding, out_dir, num_workers: int | None = None, chunk_size: int = 10_000
) -> Path:
    """Encode one split into the cache directory ``out_dir``, atomically.

    Args:
        part: the split and its filters.
        encoding: the sentencepiece model and ``max_positions``.
        out_dir: the directory to create; it must not exist.
        num_workers: encoding processes. Default: the CPUs this process may use.
        chunk_size: lines per task.
    Returns:
        ``out_dir``.
    Raises:
        FileExistsError: ``out_dir`` exists.
        ValueError: unequal line counts, invalid UTF-8 (file and line named), an empty
            corpus, or no pair left after filtering.
    """
    start = time.time()
    out_dir, tok = Path(out_dir), Tokenizer(encoding.spm_path)
    if out_dir.exists():
        raise FileExistsError(f"{out_dir} exists; delete it or use open_or_build")
    inputs = key_inputs(part, encoding)
    num_workers = num_workers or len(os.sched_getaffinity(0))
    tmp = out_dir.with_name(f".tmp.{out_dir.name}.{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        written = _encode_into(tmp, part, encoding, tok.vocab_size, num_workers, chunk_size)
        meta = {"layout": LAYOUT, "key": cache_key(inputs), "key_inputs": inputs, **written}
        meta.update(seconds=round(time.time() - start, 3), num_workers=num_workers)
        _write_json_synced(tmp / "meta.json", meta)
        os.rename(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    counts = meta["counts"]
    log.info(
        "binarized %s[%s] into %s: kept %d/%d pairs (%s) in %.1f s on %d worker(s)",
        part.corpus.location,
        part.split,
        out_dir,
        meta["n"],
        counts["n_read"],
        ", ".join(f"{k} {v}" for k, v in counts.items() if k != "n_read"),
        meta["seconds"],
        num_workers,
    )
    return out_dir


def _encode_into(
    folder: Path, part: CorpusSplit, encoding: Encoding, vocab_size: int, num_workers: int, chunk_size: int
) -> dict:
    """Encode ``part`` into the files of ``folder``; returns what ``meta.json`` says of them."""
    id_dtype, len_dtype = _uint_dtype(vocab_size - 1), _uint_dtype(encoding.max_positions)
    rules = replace(part.rules, on_empty="drop")
    opts = {"rules": rules, "max_positions": encoding.max_positions, "id_dtype": id_dtype.str}
    writer, counts = _CacheWriter(folder, id_dtype, len_dtype), Counter({k: 0 for k in COUNTS})
    for chunk in _encode_all(_source_chunks(part, opts, chunk_size), encoding.spm_path, num_workers):
        writer.append(chunk)
        counts.update(chunk["counts"])
    writer.close()
    _check_counts(counts, writer.n, part)
    return {
        "n": writer.n,
        "src_tokens": writer.tokens["src"],
        "tgt_tokens": writer.tokens["tgt"],
        "id_dtype": id_dtype.name,
        "len_dtype": len_dtype.name,
        "vocab_size": vocab_size,
        "counts": dict(counts),
    }


def _check_counts(counts: Counter, n_kept: int, part: CorpusSplit) -> None:
    name = f"{part.corpus.location}[{part.split}]"
    if counts["n_read"] == 0:
        raise ValueError(f"empty corpus: no sentence pairs in {name}")
    if n_kept == 0:
        raise ValueError(f"no pairs left in {name} after filtering ({dict(counts)})")


# ---- the cache ----------------------------------------------------------------------------


@contextmanager
def _locked(path: Path):
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _open_valid(path: Path, key: str) -> MmapPairs | None:
    """The cache at ``path`` if it is complete and has ``key``; None (logged why) if not."""
    if not path.exists():
        return None
    try:
        corpus = MmapPairs(path)
    except (OSError, ValueError, KeyError) as err:
        log.warning("not using %s: %s", path, err)
        return None
    if corpus.meta.get("key") != key:
        log.warning("not using %s: its key %s is not %s", path, corpus.meta.get("key"), key)
        return None
    return corpus


def open_or_build(
    part: CorpusSplit, encoding: Encoding, cache_dir, build: bool = True, num_workers: int | None = None
) -> MmapPairs:
    """The binarized split for these inputs, built first if no complete cache has their key.

    Safe to call from every worker at once: one builds (under a lock), the others wait
    and then map the same files. A cache directory that is incomplete or truncated is
    rebuilt, never read; leftovers of killed builds are removed.

    Args:
        cache_dir: where caches live (one directory per split and key).
        build: False: raise ``FileNotFoundError`` instead of building.
        others: see ``binarize``.
    """
    key = cache_key(key_inputs(part, encoding))
    cache_dir = Path(cache_dir)
    path = cache_dir / f"{part.split}.{key[:16]}"
    pairs = _open_valid(path, key)
    if pairs is not None:
        return pairs
    if not build:
        raise FileNotFoundError(
            f"no binarized corpus for {part.corpus.location}[{part.split}] at {path}; run `nmt-ls binarize` first"
        )
    cache_dir.mkdir(parents=True, exist_ok=True)
    with _locked(cache_dir / f".{part.split}.lock"):
        pairs = _open_valid(path, key)  # built by another worker while this one waited
        if pairs is None:
            shutil.rmtree(path, ignore_errors=True)
            for leftover in cache_dir.glob(f".tmp.{path.name}.*"):
                shutil.rmtree(leftover, ignore_errors=True)
            binarize(part, encoding, path, num_workers)
            pairs = MmapPairs(path)
    return pairs


def recipe_split(corpus: Corpus, which: str) -> CorpusSplit:
    """The recipe's split ``which`` (train or valid) as ``binarize_recipe`` encodes it: the length
    filters on train only, as ``data.read_split``; a ``datasets`` corpus's valid split is read as
    ``read_split`` reads it (empty sides kept, then dropped and counted by the encoding), local
    files' as ``read_pairs`` reads them (empty sides dropped on reading)."""
    if which == "train":
        rules = PairFilter(corpus.max_len, corpus.max_ratio)
    else:
        rules = PairFilter(on_empty="keep" if corpus.kind == "hf" else "drop")
    return CorpusSplit(corpus, corpus.split_name(which), rules)


def binarize_recipe(
    cfg, corpus: Corpus, spm_path, cache_dir=None, num_workers: int | None = None, build: bool = True
) -> dict[str, MmapPairs]:
    """The train and valid splits of a recipe (a ``config.RunConfig``), binarized.

    Filters as ``data.read_split`` + ``encode_pairs``: ``max_len``/``max_ratio`` on train
    only, ``model.max_positions`` on both. Local text files are streamed; other formats are
    read through ``corpus`` when a cache must be built. ``spm_path`` is hashed once for both.

    Args:
        corpus: ``data.open_corpus(cfg.data)``, made once for the run.
        cache_dir: Default: ``{out_dir}/data-bin``.
        num_workers, build: see ``open_or_build``.
    """
    encoding = Encoding.of(spm_path, cfg.model.max_positions)
    cache_dir = Path(cache_dir) if cache_dir is not None else Path(cfg.out_dir) / "data-bin"
    return {
        which: open_or_build(recipe_split(corpus, which), encoding, cache_dir, build, num_workers)
        for which in ("train", "valid")
    }
