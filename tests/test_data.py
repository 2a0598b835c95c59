import json
import logging
from pathlib import Path

import pytest

from nmt_ls.data import FilterReport, filter_pairs, infer_format, load_parallel, read_pairs

FIXTURE = Path(__file__).parent / "data" / "lohelp_en_de"


def write(path: Path, text: str | bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(text, bytes):
        path.write_bytes(text)
    else:
        path.write_text(text, encoding="utf-8")
    return path


def test_fixture_directory_and_prefix():
    src, tgt = read_pairs(FIXTURE, "en", "de", split="test")
    assert len(src) == len(tgt) == 200
    assert read_pairs(FIXTURE / "test", "en", "de") == (src, tgt)
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
        assert read_pairs(tmp_path / path, "en", "de") == expected, path
    ds = load_parallel(tmp_path / "c.tsv", "en", "de")
    assert ds.column_names == ["src", "tgt"] and ds[1] == {"src": pairs[1][0], "tgt": pairs[1][1]}


def test_datasets_code_path_on_local_dirs(tmp_path, monkeypatch):
    import datasets

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf_cache")

    rows = [{"translation": {"en": f"Sentence {i}.", "de": f"Satz {i}."}} for i in range(5)]
    write(tmp_path / "hub" / "test.jsonl", "".join(json.dumps(r) + "\n" for r in rows))
    src, tgt = read_pairs(tmp_path / "hub", "en", "de", split="test", fmt="hf")
    assert src[3] == "Sentence 3." and tgt[3] == "Satz 3."

    datasets.DatasetDict({"valid": datasets.Dataset.from_list(rows)}).save_to_disk(str(tmp_path / "saved"))
    assert read_pairs(tmp_path / "saved", "en", "de", split="valid") == (src, tgt)


def test_unicode_line_separators_do_not_split_lines(tmp_path):
    write(tmp_path / "c.en", "a\u2028b\x85c\n")
    write(tmp_path / "c.de", "x\n")
    assert read_pairs(tmp_path / "c", "en", "de") == (["a\u2028b\x85c"], ["x"])


def test_missing_file_names_the_path(tmp_path):
    write(tmp_path / "c.en", "a\n")
    with pytest.raises(FileNotFoundError, match=r"c\.de"):
        read_pairs(tmp_path / "c", "en", "de", fmt="text")
    with pytest.raises(FileNotFoundError, match="nope.tsv"):
        read_pairs(tmp_path / "nope.tsv", "en", "de")


def test_line_count_mismatch_names_both_files(tmp_path):
    write(tmp_path / "c.en", "a\nb\nc\n")
    write(tmp_path / "c.de", "x\ny\n")
    with pytest.raises(ValueError, match=r"c\.en has 3 lines, .*c\.de has 2"):
        read_pairs(tmp_path / "c", "en", "de")


def test_invalid_utf8_names_file_and_line(tmp_path):
    write(tmp_path / "c.en", "fine\nalso fine\n")
    write(tmp_path / "c.de", b"gut\nkaputt \xff\xfe\n")
    with pytest.raises(ValueError, match=r"c\.de:2: invalid UTF-8"):
        read_pairs(tmp_path / "c", "en", "de")


def test_empty_sides_dropped_and_counted(tmp_path, caplog):
    write(tmp_path / "c.en", "one\n   \nthree\nfour\n")
    write(tmp_path / "c.de", "eins\nzwei\n\t\nvier\n")
    with caplog.at_level(logging.INFO, logger="nmt_ls.data"):
        src, tgt = read_pairs(tmp_path / "c", "en", "de")
    assert (src, tgt) == (["one", "four"], ["eins", "vier"])
    assert "kept 2/4" in caplog.text and "empty 2" in caplog.text


def test_empty_side_error_names_file_and_line(tmp_path):
    write(tmp_path / "c.en", "one\ntwo\n")
    write(tmp_path / "c.de", "eins\n \n")
    with pytest.raises(ValueError, match=r"c\.de:2: empty target side"):
        read_pairs(tmp_path / "c", "en", "de", on_empty="error")
    with pytest.raises(ValueError, match="on_empty"):
        read_pairs(tmp_path / "c", "en", "de", on_empty="ignore")


def test_length_and_ratio_filters_report_counts():
    src = ["a b c", "a " * 10, "a", "a b", "a b c d"]
    tgt = ["x y z", "x", "x y z w v u", "x y", "x y z w"]
    out_src, out_tgt, report = filter_pairs(src, tgt, max_len=5, max_ratio=2.0)
    assert out_src == ["a b c", "a b", "a b c d"]
    assert (report.n_read, report.n_too_long, report.n_bad_ratio, report.n_kept) == (5, 2, 0, 3)
    _, _, report = filter_pairs(src, tgt, max_ratio=2.0)
    assert (report.n_bad_ratio, report.n_kept) == (2, 3)
    assert isinstance(report, FilterReport) and "bad ratio 2" in str(report)


def test_empty_corpus_names_the_file(tmp_path):
    write(tmp_path / "c.en", "")
    write(tmp_path / "c.de", "")
    with pytest.raises(ValueError, match=r"empty corpus.*c\.\{en,de\}"):
        read_pairs(tmp_path / "c", "en", "de")
    write(tmp_path / "e.jsonl", "\n")
    with pytest.raises(ValueError, match=r"empty corpus.*e\.jsonl"):
        read_pairs(tmp_path / "e.jsonl", "en", "de")


def test_everything_filtered_raises(tmp_path):
    write(tmp_path / "c.en", " \n")
    write(tmp_path / "c.de", "x\n")
    with pytest.raises(ValueError, match="no pairs left"):
        read_pairs(tmp_path / "c", "en", "de")


def test_malformed_tsv_and_jsonl_name_the_line(tmp_path):
    write(tmp_path / "bad.tsv", "a\tb\nno tab here\n")
    with pytest.raises(ValueError, match=r"bad\.tsv:2: expected 2 tab-separated columns"):
        read_pairs(tmp_path / "bad.tsv", "en", "de")
    write(tmp_path / "bad.jsonl", '{"en": "a", "de": "b"}\n{"en": "a",\n')
    with pytest.raises(ValueError, match=r"bad\.jsonl:2: invalid JSON"):
        read_pairs(tmp_path / "bad.jsonl", "en", "de")
    write(tmp_path / "keys.jsonl", '{"en": "a", "fr": "b"}\n')
    with pytest.raises(ValueError, match=r"keys\.jsonl:1: expected keys 'en' and 'de'"):
        read_pairs(tmp_path / "keys.jsonl", "en", "de")


def test_unknown_format(tmp_path):
    with pytest.raises(ValueError, match="unknown format"):
        read_pairs(tmp_path / "x", "en", "de", fmt="xml")
