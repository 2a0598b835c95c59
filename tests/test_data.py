import dataclasses
import json
import logging
from pathlib import Path

import pytest

from nmt_ls import data
from nmt_ls.config import DataConfig, load_recipe
from nmt_ls.data import (
    Corpus,
    DatasetUnavailableError,
    FilterReport,
    PairFilter,
    filter_pairs,
    infer_format,
    load_parallel,
    load_splits,
    read_pairs,
    register_corpus,
)

ROOT = Path(__file__).resolve().parent.parent
FIXTURE = ROOT / "tests" / "data" / "lohelp_en_de"
# A small corpus for load_splits: train has one pair over max_len=4, one over max_ratio=2 and
# one with an empty side, which train drops; test has an empty reference, which test keeps.
PAIRS = {
    "train": [("a b", "x y"), ("a b c d e", "v w x y z"), ("a", "x y z"), ("c", ""), ("d e f", "u v w")],
    "valid": [("v1 w", "p1 q")],
    "test": [("t1", "r1"), ("t2 long long", ""), ("t3", "r3")],
}
KEPT = {"train": [PAIRS["train"][0], PAIRS["train"][4]], "valid": PAIRS["valid"], "test": PAIRS["test"]}


def write(path: Path, text: str | bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(text, bytes):
        path.write_bytes(text)
    else:
        path.write_text(text, encoding="utf-8")
    return path


def test_fixture_directory_and_prefix():
    src, tgt = read_pairs(Corpus(FIXTURE, "en", "de"), "test")
    assert len(src) == len(tgt) == 200
    assert read_pairs(Corpus(FIXTURE / "test", "en", "de")) == (src, tgt)
    assert infer_format(FIXTURE, "en", "de", "train") == "text"


def test_all_local_formats_agree(tmp_path):
    pairs = [("Hello world.", "Hallo Welt."), ("Open the file.", "Öffnen Sie die Datei.")]
    write(tmp_path / "c.en", "".join(s + "\n" for s, _ in pairs))
    write(tmp_path / "c.de", "".join(t + "\r\n" for _, t in pairs))  # CRLF is fine
    write(tmp_path / "c.tsv", "en\tde\n" + "".join(f"{s}\t{t}\n" for s, t in pairs))
    write(tmp_path / "flat.jsonl", "".join(json.dumps({"en": s, "de": t}) + "\n" for s, t in pairs) + "\n")
    write(tmp_path / "nested.jsonl", "".join(json.dumps({"translation": {"en": s, "de": t}}) + "\n" for s, t in pairs))
    expected = ([s for s, _ in pairs], [t for _, t in pairs])
    for path in ("c", "c.tsv", "flat.jsonl", "nested.jsonl"):
        assert read_pairs(Corpus(tmp_path / path, "en", "de")) == expected, path
    ds = load_parallel(Corpus(tmp_path / "c.tsv", "en", "de"))
    assert ds.column_names == ["src", "tgt"] and ds[1] == {"src": pairs[1][0], "tgt": pairs[1][1]}


def test_datasets_code_path_on_local_dirs(tmp_path, monkeypatch):
    import datasets

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf_cache")

    rows = [{"translation": {"en": f"Sentence {i}.", "de": f"Satz {i}."}} for i in range(5)]
    write(tmp_path / "hub" / "test.jsonl", "".join(json.dumps(r) + "\n" for r in rows))
    src, tgt = read_pairs(Corpus(tmp_path / "hub", "en", "de", fmt="hf"), "test")
    assert src[3] == "Sentence 3." and tgt[3] == "Satz 3."

    datasets.DatasetDict({"valid": datasets.Dataset.from_list(rows)}).save_to_disk(str(tmp_path / "saved"))
    assert read_pairs(Corpus(tmp_path / "saved", "en", "de"), "valid") == (src, tgt)


def test_unicode_line_separators_do_not_split_lines(tmp_path):
    write(tmp_path / "c.en", "a\u2028b\x85c\n")
    write(tmp_path / "c.de", "x\n")
    assert read_pairs(Corpus(tmp_path / "c", "en", "de")) == (["a\u2028b\x85c"], ["x"])


def test_missing_file_names_the_path(tmp_path):
    write(tmp_path / "c.en", "a\n")
    with pytest.raises(FileNotFoundError, match=r"c\.de"):
        read_pairs(Corpus(tmp_path / "c", "en", "de", fmt="text"))
    with pytest.raises(FileNotFoundError, match="nope.tsv"):
        read_pairs(Corpus(tmp_path / "nope.tsv", "en", "de"))


def test_line_count_mismatch_names_both_files(tmp_path):
    write(tmp_path / "c.en", "a\nb\nc\n")
    write(tmp_path / "c.de", "x\ny\n")
    with pytest.raises(ValueError, match=r"c\.en has 3 lines, .*c\.de has 2"):
        read_pairs(Corpus(tmp_path / "c", "en", "de"))


def test_invalid_utf8_names_file_and_line(tmp_path):
    write(tmp_path / "c.en", "fine\nalso fine\n")
    write(tmp_path / "c.de", b"gut\nkaputt \xff\xfe\n")
    with pytest.raises(ValueError, match=r"c\.de:2: invalid UTF-8"):
        read_pairs(Corpus(tmp_path / "c", "en", "de"))


def test_empty_sides_dropped_and_counted(tmp_path, caplog):
    write(tmp_path / "c.en", "one\n   \nthree\nfour\n")
    write(tmp_path / "c.de", "eins\nzwei\n\t\nvier\n")
    with caplog.at_level(logging.INFO, logger="nmt_ls.data"):
        src, tgt = read_pairs(Corpus(tmp_path / "c", "en", "de"))
    assert (src, tgt) == (["one", "four"], ["eins", "vier"])
    assert "kept 2/4" in caplog.text and "empty 2" in caplog.text


def test_empty_side_error_names_file_and_line(tmp_path):
    write(tmp_path / "c.en", "one\ntwo\n")
    write(tmp_path / "c.de", "eins\n \n")
    with pytest.raises(ValueError, match=r"c\.de:2: empty target side"):
        read_pairs(Corpus(tmp_path / "c", "en", "de"), rules=PairFilter(on_empty="error"))
    with pytest.raises(ValueError, match="on_empty"):
        read_pairs(Corpus(tmp_path / "c", "en", "de"), rules=PairFilter(on_empty="ignore"))


def test_length_and_ratio_filters_report_counts():
    src = ["a b c", "a " * 10, "a", "a b", "a b c d"]
    tgt = ["x y z", "x", "x y z w v u", "x y", "x y z w"]
    out_src, out_tgt, report = filter_pairs(src, tgt, PairFilter(max_len=5, max_ratio=2.0))
    assert out_src == ["a b c", "a b", "a b c d"]
    assert (report.n_read, report.n_too_long, report.n_bad_ratio, report.n_kept) == (5, 2, 0, 3)
    _, _, report = filter_pairs(src, tgt, PairFilter(max_ratio=2.0))
    assert (report.n_bad_ratio, report.n_kept) == (2, 3)
    assert isinstance(report, FilterReport) and "bad ratio 2" in str(report)


def test_empty_corpus_names_the_file(tmp_path):
    write(tmp_path / "c.en", "")
    write(tmp_path / "c.de", "")
    with pytest.raises(ValueError, match=r"empty corpus.*c\.\{en,de\}"):
        read_pairs(Corpus(tmp_path / "c", "en", "de"))
    write(tmp_path / "e.jsonl", "\n")
    with pytest.raises(ValueError, match=r"empty corpus.*e\.jsonl"):
        read_pairs(Corpus(tmp_path / "e.jsonl", "en", "de"))


def test_everything_filtered_raises(tmp_path):
    write(tmp_path / "c.en", " \n")
    write(tmp_path / "c.de", "x\n")
    with pytest.raises(ValueError, match="no pairs left"):
        read_pairs(Corpus(tmp_path / "c", "en", "de"))


def test_malformed_tsv_and_jsonl_name_the_line(tmp_path):
    write(tmp_path / "bad.tsv", "a\tb\nno tab here\n")
    with pytest.raises(ValueError, match=r"bad\.tsv:2: expected 2 tab-separated columns"):
        read_pairs(Corpus(tmp_path / "bad.tsv", "en", "de"))
    write(tmp_path / "bad.jsonl", '{"en": "a", "de": "b"}\n{"en": "a",\n')
    with pytest.raises(ValueError, match=r"bad\.jsonl:2: invalid JSON"):
        read_pairs(Corpus(tmp_path / "bad.jsonl", "en", "de"))
    write(tmp_path / "keys.jsonl", '{"en": "a", "fr": "b"}\n')
    with pytest.raises(ValueError, match=r"keys\.jsonl:1: expected keys 'en' and 'de'"):
        read_pairs(Corpus(tmp_path / "keys.jsonl", "en", "de"))


def test_unknown_format(tmp_path):
    with pytest.raises(ValueError, match="unknown format"):
        read_pairs(Corpus(tmp_path / "x", "en", "de", fmt="xml"))


# ---------------------------------------------------------------------------
# load_splits: one test per source form
# ---------------------------------------------------------------------------


@pytest.fixture
def hf_cache(tmp_path, monkeypatch):
    """datasets writes its Arrow cache under tmp_path, not the user's cache."""
    import datasets

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf_cache")
    return datasets


def cfg(**kw) -> DataConfig:
    return DataConfig(**{"src_lang": "en", "tgt_lang": "de", "max_len": 4, "max_ratio": 2.0, **kw})


def rows(split: str, nested: bool) -> list[dict]:
    return [{"translation": {"en": s, "de": t}} if nested else {"en": s, "de": t} for s, t in PAIRS[split]]


def test_files_folder_text_tsv_jsonl_per_split(tmp_path, caplog):
    write(tmp_path / "c" / "train.en", "".join(s + "\n" for s, _ in PAIRS["train"]))
    write(tmp_path / "c" / "train.de", "".join(t + "\n" for _, t in PAIRS["train"]))
    write(tmp_path / "c" / "valid.tsv", "".join(f"{s}\t{t}\n" for s, t in PAIRS["valid"]))
    write(tmp_path / "c" / "test.jsonl", "".join(json.dumps(r) + "\n" for r in rows("test", nested=True)))
    with caplog.at_level(logging.INFO, logger="nmt_ls.data"):
        assert load_splits(cfg(corpus="files", dir=str(tmp_path / "c"))) == KEPT
    assert "kept 2/5 pairs | dropped: empty 1, too long 1, bad ratio 1" in caplog.text
    assert load_splits(cfg(corpus="files", dir=str(tmp_path / "c")), ("test",)) == {"test": KEPT["test"]}
    with pytest.raises(ValueError, match=r"splits must be among \('train', 'valid', 'test'\), got \['dev'\]"):
        load_splits(cfg(corpus="files", dir=str(tmp_path / "c")), ("dev",))


def test_old_recipes_load_as_before(monkeypatch):
    splits = load_splits(load_recipe(ROOT / "recipes" / "smoke.yaml").data)
    assert [len(splits[k]) for k in data.SPLITS] == [2600, 200, 200]
    assert splits["test"][0] == tuple(
        p.read_text(encoding="utf-8").split("\n")[0].strip() for p in (FIXTURE / "test.en", FIXTURE / "test.de")
    )
    calls = []
    monkeypatch.setattr("nmt_ls.prepare.prepare_lohelp", lambda *args: calls.append(args))
    lohelp = dataclasses.replace(load_recipe(ROOT / "recipes" / "lohelp_en_de.yaml").data, dir=str(FIXTURE))
    assert load_splits(lohelp)["valid"] == splits["valid"]
    assert calls == [(str(FIXTURE), "en", "de")]  # prepared (idempotently) before reading


def test_save_to_disk_folder(tmp_path, hf_cache):
    dd = hf_cache.DatasetDict({k: hf_cache.Dataset.from_list(rows(k, nested=True)) for k in PAIRS})
    dd.save_to_disk(str(tmp_path / "saved"))
    assert load_splits(cfg(corpus="hf", path=str(tmp_path / "saved"))) == KEPT
    # corpus: hub (the old name) and corpus: files read the same local folder, never the hub
    assert load_splits(cfg(corpus="hub", hub_name=str(tmp_path / "saved"))) == KEPT
    assert load_splits(cfg(corpus="files", dir=str(tmp_path / "saved"))) == KEPT


def test_json_and_jsonl_data_files(tmp_path, hf_cache):
    files = {}
    for k in PAIRS:
        files[k] = str(tmp_path / f"{k}.jsonl")
        write(Path(files[k]), "".join(json.dumps(r) + "\n" for r in rows(k, nested=True)))
    files["test"] = str(tmp_path / "test.json")  # one JSON array
    write(tmp_path / "test.json", json.dumps(rows("test", nested=True)))
    assert load_splits(cfg(corpus="hf", path="json", data_files=files)) == KEPT


def test_parquet_data_files_with_a_list_of_files(tmp_path, hf_cache):
    files = {}
    for k in PAIRS:
        files[k] = str(tmp_path / f"{k}.parquet")
        hf_cache.Dataset.from_list(rows(k, nested=False)).to_parquet(files[k])
    half = len(PAIRS["train"]) // 2
    for i, part in enumerate((PAIRS["train"][:half], PAIRS["train"][half:])):
        hf_cache.Dataset.from_dict({"en": [s for s, _ in part], "de": [t for _, t in part]}).to_parquet(
            tmp_path / f"train-{i}.parquet"
        )
    files["train"] = [str(tmp_path / "train-0.parquet"), str(tmp_path / "train-1.parquet")]
    assert load_splits(cfg(corpus="hf", path="parquet", data_files=files)) == KEPT


def test_csv_data_files_empty_cell_kept_in_test(tmp_path, hf_cache, caplog):
    files = {}
    for k in PAIRS:
        files[k] = str(tmp_path / f"{k}.csv")
        lines = ["de,en"] + [f'"{t}","{s}"' if t else f'"",{s}' for s, t in PAIRS[k]]
        write(Path(files[k]), "\n".join(lines) + "\n")  # an empty CSV cell reads as None
    with caplog.at_level(logging.WARNING, logger="nmt_ls.data"):
        assert load_splits(cfg(corpus="hf", path="csv", data_files=files)) == KEPT
    assert f"{files['test']} row 1 (empty target)" in caplog.text


# ---------------------------------------------------------------------------
# Errors: one line, naming what to fix; local paths never reach the hub
# ---------------------------------------------------------------------------


def test_unreachable_hub_dataset_fails_at_once(hf_cache, monkeypatch):
    monkeypatch.setattr(data, "_hub_reachable", lambda endpoint: False)
    d = load_recipe(ROOT / "recipes" / "iwslt_de_en.yaml").data
    with pytest.raises(
        DatasetUnavailableError,
        match=r"^hub dataset 'iwslt2017' could not be reached \(offline\?\)"
        r".*load_dataset\('iwslt2017', 'iwslt2017-de-en'\)\.save_to_disk\(DIR\).*set data\.path",
    ):
        load_splits(d)
    assert hf_cache.config.HF_HUB_OFFLINE is False  # offline only for the call


def test_loading_script_error(tmp_path, hf_cache):
    write(tmp_path / "mycorp" / "mycorp.py", "raise SystemExit('never run')\n")
    with pytest.raises(DatasetUnavailableError, match=r"needs a loading script \(mycorp\.py\).*datasets<4"):
        load_splits(cfg(corpus="hf", path=str(tmp_path / "mycorp")))


def test_mistyped_relative_dir_names_it_and_never_reaches_the_hub(tmp_path, hf_cache, monkeypatch):
    def no_hub(*args, **kwargs):
        raise AssertionError(f"sent to datasets.load_dataset: {args}")

    monkeypatch.setattr(hf_cache, "load_dataset", no_hub)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(
        FileNotFoundError, match=r"^data\.dir 'data/lohelp_en_dee' does not exist \(.*data/lohelp_en_dee\)"
    ):
        load_splits(cfg(corpus="files", dir="data/lohelp_en_dee"))
    with pytest.raises(FileNotFoundError, match=r"^data\.path: no such folder: \./data/lohelp"):
        load_splits(cfg(corpus="hf", path="./data/lohelp"))
    write(tmp_path / "data" / "c" / "train.txt", "a\n")
    with pytest.raises(FileNotFoundError, match=r"^data\.path: no such folder: data/lohelp \("):
        load_splits(cfg(corpus="hf", path="data/lohelp"))  # data/ exists, so this is no hub name
    with pytest.raises(FileNotFoundError, match=r"c: no train\.en \+ train\.de, train\.tsv or train\.jsonl"):
        load_splits(cfg(corpus="files", dir="data/c"))
    write(tmp_path / "data" / "c" / "train.en", "a\n")
    with pytest.raises(FileNotFoundError, match=r"^no such file: data/c/train\.de"):
        load_splits(cfg(corpus="files", dir="data/c"))


@pytest.mark.parametrize(
    "kw,error,match",
    [
        (
            dict(corpus="fiels"),
            ValueError,
            r"data\.corpus must be files, hf \(alias hub\) or one of \['lohelp_en_de'\]",
        ),
        (dict(corpus="files", path="json"), ValueError, "data.path and data.data_files are read with data.corpus: hf"),
        (dict(corpus="hf"), ValueError, "data.corpus: hf needs data.path"),
        (dict(corpus="hf", path="json"), ValueError, "data.path 'json' needs data.data_files"),
        (
            dict(corpus="hf", path="csv", data_files={"train": 3}),
            ValueError,
            r"data\.data_files\['train'\]: expected a",
        ),
        (dict(corpus="hf", path="csv", data_files={"train": "nope.csv"}), FileNotFoundError, "no such file: nope.csv"),
        (dict(corpus="hf", path="saved", valid_split="dev"), ValueError, r"has no split 'dev' \(data\.valid_split\)"),
        (dict(corpus="hf", path="flat.jsonl"), ValueError, "data.path 'flat.jsonl' is a file"),
        (
            dict(corpus="hf", path="csv", data_files={"train": "bad.csv", "valid": "bad.csv", "test": "bad.csv"}),
            ValueError,
            r"bad\.csv: expected a 'translation' column or columns 'en' and 'de'",
        ),
    ],
)
def test_bad_settings_name_the_key(kw, error, match, tmp_path, hf_cache, monkeypatch):
    monkeypatch.chdir(tmp_path)
    hf_cache.DatasetDict({k: hf_cache.Dataset.from_list(rows(k, nested=True)) for k in PAIRS}).save_to_disk("saved")
    write(tmp_path / "flat.jsonl", "")
    write(tmp_path / "bad.csv", "src,tgt\na,b\n")
    with pytest.raises(error, match=match):
        load_splits(cfg(**kw))


def test_empty_sides_in_valid_and_test_keep_alignment(tmp_path, caplog):
    for k in ("train", "valid", "test"):
        write(tmp_path / f"{k}.en", "one\n\nthree\n")
        write(tmp_path / f"{k}.de", "eins\nzwei\n \n")
    with caplog.at_level(logging.WARNING, logger="nmt_ls.data"):
        splits = load_splits(cfg(corpus="files", dir=str(tmp_path)))
    assert splits["train"] == [("one", "eins")]
    assert splits["valid"] == splits["test"] == [("one", "eins"), ("", "zwei"), ("three", "")]
    assert f"test.en:2 and {tmp_path / 'test.de'}:2 (empty source)" in caplog.text
    assert f"{tmp_path / 'test.de'}:3 (empty target)" in caplog.text


def test_register_corpus_prepares_then_reads_files(tmp_path, monkeypatch):
    monkeypatch.setattr(data, "CORPORA", dict(data.CORPORA))

    @register_corpus("tiny")
    def prepare(d: DataConfig) -> None:
        for k, pairs in PAIRS.items():
            write(Path(d.dir) / f"{k}.tsv", "".join(f"{s}\t{t}\n" for s, t in pairs))

    assert load_splits(cfg(corpus="tiny", dir=str(tmp_path / "tiny"))) == KEPT
    with pytest.raises(ValueError, match="corpus 'tiny' is already registered"):
        register_corpus("tiny")(prepare)
    with pytest.raises(ValueError, match="corpus 'files' is already registered"):
        register_corpus("files")(prepare)
