"""Binarized, memory-mapped corpora: the same ids and batches as the in-memory path, and a
cache that is rebuilt when its inputs change and never read when incomplete."""

import dataclasses
import json
import os
import pickle
import shutil
import threading
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch

from nmt_ls import binarize as binarize_module
from nmt_ls.batching import batch_by_tokens
from nmt_ls.binarize import (
    CorpusSplit,
    EncodedPairs,
    Encoding,
    MmapPairs,
    binarize,
    binarize_recipe,
    encode_pairs,
    open_or_build,
)
from nmt_ls.config import load_recipe
from nmt_ls.data import Corpus, PairFilter, load_splits, open_corpus, read_pairs
from nmt_ls.tokenizer import Tokenizer, train_spm

ROOT = Path(__file__).parent.parent
FIXTURE = ROOT / "tests" / "data" / "lohelp_en_de"
# Each filter drops some of the fixture's 2600 train pairs (counts asserted below).
FILTERS = {"max_len": 25, "max_ratio": 1.6, "max_positions": 40}


@pytest.fixture(scope="module")
def spm_path(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("spm")
    return train_spm([FIXTURE / "train.en", FIXTURE / "train.de"], tmp / "spm", 1000)


@pytest.fixture()
def corpus_dir(tmp_path):
    """A copy of the fixture that a test may edit."""
    return Path(shutil.copytree(FIXTURE, tmp_path / "corpus"))


def in_memory(spm_path, source, split="train", max_len=None, max_ratio=None, max_positions=1024):
    """The in-memory path: read_pairs (with its filters), then encode_pairs."""
    src, tgt = read_pairs(Corpus(source, "en", "de"), split, PairFilter(max_len=max_len, max_ratio=max_ratio))
    encoded = encode_pairs(Tokenizer(spm_path), list(zip(src, tgt)), max_positions)
    return encoded.get(range(len(encoded)))


def build(spm_path, source, cache_dir, max_positions=1024, max_len=None, max_ratio=None, fmt=None, **kwargs):
    """``open_or_build`` of the train split of ``source``; ``kwargs``: ``build``, ``num_workers``."""
    part = CorpusSplit(Corpus(source, "en", "de", fmt=fmt), "train", PairFilter(max_len, max_ratio))
    return open_or_build(part, Encoding.of(spm_path, max_positions), cache_dir, **kwargs)


@pytest.mark.parametrize("num_workers", [1, 2])
def test_binarized_ids_equal_the_in_memory_encoding(spm_path, tmp_path, num_workers):
    src_ids, tgt_ids = in_memory(spm_path, FIXTURE, **FILTERS)
    corpus = build(spm_path, FIXTURE, tmp_path, num_workers=num_workers, **FILTERS)
    assert corpus.get(range(len(corpus))) == (src_ids, tgt_ids)
    assert corpus.src_lens.tolist() == [len(s) for s in src_ids]
    assert corpus.tgt_lens.tolist() == [len(t) for t in tgt_ids]
    assert all(s[-1] == Tokenizer(spm_path).eos_id for s in src_ids)
    counts = corpus.meta["counts"]
    assert counts["n_read"] == 2600 and len(corpus) == 2600 - sum(v for k, v in counts.items() if k != "n_read")
    assert min(counts["n_too_long"], counts["n_bad_ratio"], counts["n_over_positions"]) > 0
    assert corpus.meta["id_dtype"] == corpus.meta["len_dtype"] == "uint16"


def test_streamed_lines_are_read_as_data_reads_them(spm_path, tmp_path):
    """Whitespace, CR, empty sides, a unicode line separator, no final newline, tiny chunks."""
    src = ["  Click OK. ", "", "a\r", "x\u2028y", "Only here", "last one"]
    tgt = ["Klicken Sie OK.", "leer", "b\r", "x\u2028y", " ", "letzte"]
    (tmp_path / "c.en").write_text("\n".join(src), encoding="utf-8")
    (tmp_path / "c.de").write_text("\n".join(tgt) + "\n", encoding="utf-8")
    expected = in_memory(spm_path, tmp_path / "c")
    part = CorpusSplit(Corpus(tmp_path / "c", "en", "de"))
    corpus = MmapPairs(binarize(part, Encoding.of(spm_path), tmp_path / "bin", num_workers=1, chunk_size=4))
    assert len(corpus) == len(expected[0]) == 4 and corpus.get([0, 1, 2, 3]) == expected
    assert corpus.meta["counts"]["n_empty"] == 2


def test_mmap_batches_equal_encoded_pairs_batches(spm_path, tmp_path):
    mmap = build(spm_path, FIXTURE, tmp_path, **FILTERS)
    memory = EncodedPairs(*in_memory(spm_path, FIXTURE, **FILTERS))
    tok = Tokenizer(spm_path)
    for epoch in (0, 1):
        batches = batch_by_tokens(mmap.src_lens, mmap.tgt_lens, 300, seed=1, epoch=epoch)
        reference = batch_by_tokens(memory.src_lens, memory.tgt_lens, 300, seed=1, epoch=epoch)
        assert [b.tolist() for b in batches] == [b.tolist() for b in reference] and len(batches) > 10
        for idx in batches:
            a = mmap.batch(idx, tok.pad_id, tok.bos_id, tok.eos_id)
            b = memory.batch(idx, tok.pad_id, tok.bos_id, tok.eos_id)
            for name in ("src", "tgt_in", "tgt_out", "src_lengths"):
                assert torch.equal(getattr(a, name), getattr(b, name))
            assert a.ntokens == b.ntokens and a.ids == b.ids == idx.tolist()


def test_cache_is_reused_and_pickles_as_its_path(spm_path, tmp_path, monkeypatch):
    first = build(spm_path, FIXTURE, tmp_path, **FILTERS)

    def no_build(*args, **kwargs):
        raise AssertionError("rebuilt an up-to-date cache")

    monkeypatch.setattr(binarize_module, "binarize", no_build)
    again = build(spm_path, FIXTURE, tmp_path, **FILTERS)
    assert again.path == first.path and again.path.name.startswith("train.")
    copy = pickle.loads(pickle.dumps(again))
    assert isinstance(copy, MmapPairs) and copy.get([3, 1]) == first.get([3, 1])


def test_changed_file_tokenizer_or_filter_changes_the_key_and_rebuilds(spm_path, corpus_dir, tmp_path):
    before = build(spm_path, corpus_dir, tmp_path / "cache", **FILTERS)
    for lang, line in (("en", "Click the Apply button."), ("de", "Klicken Sie auf Anwenden.")):
        with open(corpus_dir / f"train.{lang}", "a", encoding="utf-8") as f:
            f.write(line + "\n")
    after = build(spm_path, corpus_dir, tmp_path / "cache", **FILTERS)
    assert after.path != before.path and len(after) == len(before) + 1
    assert after.get([len(after) - 1]) == (
        [Tokenizer(spm_path).encode("Click the Apply button.") + [3]],
        [Tokenizer(spm_path).encode("Klicken Sie auf Anwenden.")],
    )
    other_spm = train_spm([corpus_dir / "train.en", corpus_dir / "train.de"], tmp_path / "other", 800)
    assert build(other_spm, corpus_dir, tmp_path / "cache", **FILTERS).path not in (before.path, after.path)
    looser = build(spm_path, corpus_dir, tmp_path / "cache", **{**FILTERS, "max_ratio": 2.0})
    assert looser.path != after.path and len(looser) > len(after)


def test_truncated_or_half_written_cache_is_never_used(spm_path, tmp_path):
    corpus = build(spm_path, FIXTURE, tmp_path, **FILTERS)
    expected = corpus.get(range(len(corpus)))
    path = corpus.path
    del corpus
    with open(path / "tgt.bin", "r+b") as f:
        f.truncate(os.path.getsize(path / "tgt.bin") - 2)
    with pytest.raises(ValueError, match=r"tgt\.bin: \d+ bytes, expected \d+ bytes: truncated or incomplete"):
        MmapPairs(path)
    assert build(spm_path, FIXTURE, tmp_path, **FILTERS).get(range(len(expected[0]))) == expected
    (path / "meta.json").unlink()  # e.g. a cache copied by hand, half done
    with pytest.raises(FileNotFoundError, match="no meta.json"):
        MmapPairs(path)
    assert build(spm_path, FIXTURE, tmp_path, **FILTERS).get(range(len(expected[0]))) == expected


def test_killed_build_leaves_no_cache_and_its_leftovers_are_removed(spm_path, corpus_dir, tmp_path):
    with open(corpus_dir / "train.de", "r+b") as f:  # bad bytes at line 2500, past the first chunks
        lines = f.read().split(b"\n")
        lines[2499] = b"\xff\xfe"
        f.seek(0)
        f.write(b"\n".join(lines))
        f.truncate()
    with pytest.raises(ValueError, match=r"train\.de:2500: invalid UTF-8 \(invalid start byte at byte 0"):
        part = CorpusSplit(Corpus(corpus_dir, "en", "de"))
        binarize(part, Encoding.of(spm_path), tmp_path / "train.x", num_workers=2, chunk_size=500)
    assert list(tmp_path.iterdir()) == [corpus_dir]  # neither a cache nor its temporary directory
    with pytest.raises(ValueError, match=r"train\.de:2500: invalid UTF-8"):
        read_pairs(Corpus(corpus_dir, "en", "de"))  # the message of the in-memory path
    corpus = build(spm_path, FIXTURE, tmp_path / "cache")
    leftover = tmp_path / "cache" / f".tmp.{corpus.path.name}.99999"
    shutil.copytree(corpus.path, leftover)  # a build killed before its rename
    shutil.rmtree(corpus.path)
    assert len(build(spm_path, FIXTURE, tmp_path / "cache")) == 2600 and not leftover.exists()


def test_bad_corpora_name_the_file(spm_path, corpus_dir, tmp_path):
    with open(corpus_dir / "train.en", "a", encoding="utf-8") as f:
        f.write("one more\n")
    with pytest.raises(ValueError, match=r"line counts differ: .*train\.en has 2601 lines, .*train\.de has 2600"):
        build(spm_path, corpus_dir, tmp_path, num_workers=1)
    with pytest.raises(FileNotFoundError, match=r"no such file: .*missing\.en"):
        build(spm_path, tmp_path / "missing", tmp_path, fmt="text")
    (tmp_path / "e.en").write_text(" \n", encoding="utf-8")
    (tmp_path / "e.de").write_text("x\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"no pairs left in .*e\[train\] after filtering \(\{'n_read': 1, 'n_empty"):
        build(spm_path, tmp_path / "e", tmp_path)
    with pytest.raises(FileNotFoundError, match="no binarized corpus for .* run `nmt-ls binarize` first"):
        build(spm_path, FIXTURE, tmp_path / "none", build=False)


def test_workers_calling_at_once_build_once(spm_path, tmp_path, monkeypatch):
    calls = []
    real = binarize_module.binarize

    def counting(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(binarize_module, "binarize", counting)
    results = [None, None]

    def worker(rank):
        results[rank] = build(spm_path, FIXTURE, tmp_path, num_workers=1, **FILTERS)

    threads = [threading.Thread(target=worker, args=(rank,)) for rank in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(calls) == 1 and results[0].path == results[1].path


def test_binarize_recipe_matches_load_splits(spm_path, tmp_path):
    overrides = [
        f"out_dir={str(tmp_path / 'run')!r}",
        f"data.dir={str(FIXTURE)!r}",
        "data.max_len=30",
        "model.max_positions=48",
    ]
    cfg = load_recipe(ROOT / "recipes" / "smoke.yaml", overrides)
    splits = load_splits(cfg.data)
    corpora = binarize_recipe(cfg, open_corpus(cfg.data), spm_path, num_workers=1)
    assert set(corpora) == {"train", "valid"}
    for name in ("train", "valid"):
        expected = encode_pairs(Tokenizer(spm_path), splits[name], cfg.model.max_positions)
        corpus = corpora[name]
        assert corpus.get(np.arange(len(corpus))) == expected.get(range(len(expected)))
        assert corpus.path.parent == tmp_path / "run" / "data-bin"


def test_binarize_command_then_training_maps_the_same_cache(tmp_path, capsys):
    from nmt_ls.__main__ import main

    from conftest import SMOKE_RECIPE, overrides

    args = overrides(tmp_path / "run", "train.max_updates=2")
    assert main(["binarize", SMOKE_RECIPE, *args, "--workers", "1"]) == 0
    out = capsys.readouterr().out
    assert "train: 2600 pairs in" in out and "valid: 200 pairs in" in out
    built = sorted(p.name for p in (tmp_path / "run" / "data-bin").iterdir() if not p.name.startswith("."))
    assert main(["train", SMOKE_RECIPE, *args]) == 0
    assert sorted(p.name for p in (tmp_path / "run" / "data-bin").iterdir() if not p.name.startswith(".")) == built


def recipe(tmp_path, *extra):
    return load_recipe(ROOT / "recipes" / "smoke.yaml", [f"out_dir={str(tmp_path / 'run')!r}", *extra])


def binarized(cfg, spm_path):
    """``binarize_recipe`` as a run calls it, with the corpus it opens."""
    return binarize_recipe(cfg, open_corpus(cfg.data), spm_path, num_workers=1)


def texts(corpus):
    return corpus.get(np.arange(len(corpus)))


def jsonl_lines(split, n=None):
    en, de = (read_pairs(Corpus(FIXTURE, "en", "de"), split, PairFilter(on_empty="keep"))[i][:n] for i in (0, 1))
    return "".join(json.dumps({"en": s, "de": t}) + "\n" for s, t in zip(en, de))


@pytest.mark.parametrize("fmt", ["tsv", "jsonl"])
def test_folder_of_tsv_or_jsonl_binarizes_as_the_text_folder(spm_path, tmp_path, fmt):
    """Issue 20 row 1: a folder of {split}.tsv / {split}.jsonl failed with 'no such file: <folder>'."""
    folder = tmp_path / "corpus"
    folder.mkdir()
    for split in ("train", "valid"):
        en, de = read_pairs(Corpus(FIXTURE, "en", "de"), split, PairFilter(on_empty="keep"))
        rows = [f"{s}\t{t}\n" for s, t in zip(en, de)] if fmt == "tsv" else [jsonl_lines(split)]
        (folder / f"{split}.{fmt}").write_text("".join(rows), encoding="utf-8")
    text = binarized(recipe(tmp_path / "text", f"data.dir={str(FIXTURE)!r}"), spm_path)
    other = binarized(recipe(tmp_path / fmt, f"data.dir={str(folder)!r}"), spm_path)
    assert [len(other[k]) for k in ("train", "valid")] == [2600, 200]
    assert all(texts(other[k]) == texts(text[k]) for k in ("train", "valid"))
    assert [f["path"] for f in other["train"].meta["key_inputs"]["files"]] == [str(folder / f"train.{fmt}")]


def test_rewritten_data_files_rebuild_the_cache(spm_path, tmp_path, monkeypatch):
    """Issue 20 row 2: a json builder's cache was keyed by file names only and reused after an edit."""
    import datasets

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf_cache")
    files = {split: str(tmp_path / f"{split}.jsonl") for split in ("train", "valid")}
    for split, name in files.items():
        Path(name).write_text(jsonl_lines(split), encoding="utf-8")
    cfg = recipe(tmp_path)
    cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, corpus="hf", path="json", data_files=files))
    first = binarized(cfg, spm_path)["train"]
    assert len(first) == 2600
    assert [f["path"] for f in first.meta["key_inputs"]["files"]] == [files["train"]]
    Path(files["train"]).write_text(jsonl_lines("train", 400), encoding="utf-8")
    assert len(load_splits(cfg.data, ("train",))["train"]) == 400
    again = binarized(cfg, spm_path)["train"]  # a new run: a new corpus, its files stat'ed anew
    assert len(again) == 400 and again.path != first.path


def test_home_relative_data_dir_is_expanded(spm_path, tmp_path, monkeypatch):
    """Issue 20 row 3: data.dir=~/corpus was read by load_splits but binarize inferred 'hf'."""
    monkeypatch.setenv("HOME", str(tmp_path))
    shutil.copytree(FIXTURE, tmp_path / "corpus")
    corpora = binarized(recipe(tmp_path, "data.dir='~/corpus'"), spm_path)
    assert [len(corpora[k]) for k in ("train", "valid")] == [2600, 200]
    assert corpora["train"].meta["key_inputs"]["fmt"] == "text"
    assert corpora["train"].meta["key_inputs"]["files"][0]["path"] == str(tmp_path / "corpus" / "train.en")


def test_a_run_sets_its_corpus_up_once(spm_path, tmp_path, monkeypatch):
    """Issue 26, set-up once: one corpus per run, prepared once; each split's files stat'ed once
    (for the tokenizer's identity and both binarize calls); spm.model hashed once per binarize."""
    from nmt_ls import data

    calls = Counter()

    def count(name, module, attr):
        real = getattr(module, attr)

        def counted(*args, **kwargs):
            calls[name] += 1
            return real(*args, **kwargs)

        monkeypatch.setattr(module, attr, counted)

    monkeypatch.setattr(data, "CORPORA", dict(data.CORPORA))
    data.register_corpus("counted")(lambda d: calls.update(["prepare"]))
    count("stat", data, "file_identities")
    count("hash", binarize_module, "spm_sha256")
    cfg = recipe(tmp_path, f"data.dir={str(FIXTURE)!r}", "data.corpus='counted'")
    corpus = open_corpus(cfg.data)
    train_files = corpus.files(corpus.train_split)  # what train.tokenizer_spec keys spm.model on
    built = binarize_recipe(cfg, corpus, spm_path, num_workers=1)  # the main worker builds
    mapped = binarize_recipe(cfg, corpus, spm_path, build=False)  # then maps, as every worker does
    assert calls == {"prepare": 1, "stat": 2, "hash": 2}
    assert built["train"].meta["key_inputs"]["files"] == train_files
    assert [c.path for c in built.values()] == [c.path for c in mapped.values()]
