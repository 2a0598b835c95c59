"""LibreOffice-help alignment on a tiny synthetic help tree (no apt, no network)."""

import json

import pytest

from nmt_ls import prepare
from nmt_ls.prepare import PrepareOptions, align_pages, extract_page, page_split, prepare_lohelp, split_pairs

PAGE = """<!DOCTYPE html>
<html lang="{lang}"><head><meta charset="utf-8"><title>t</title></head><body>
<aside><div id="Contents"><p id="par_side">{side}</p></div></aside>
<div id="DisplayArea" itemprop="softwareHelp">
<h1 id="hd_id1" dir="auto">{title}</h1>
<p id="par_id2" class="paragraph">{choose} <span id="swlnsys_1" class="switchinline"><span hidden="true" id="MACtext_1" class="MAC"><span class="emph">{mac}</span></span><span hidden="true" id="defaulttext_1"><span class="emph">{default}</span></span></span><span class="emph"> - {rest}</span>.</p>
<p id="par_id3" class="paragraph"><span class="avis">{a}</span> <span class="literal">ScriptForge</span>.<span class="literal">FileSystem</span>{b}</p>
<p id="par_id4" class="paragraph">{glue1}<span id="swlnsys_2" class="switchinline"><span hidden="true" id="WINtext_2" class="WIN">Win</span><span hidden="true" id="defaulttext_2">{glue2}</span></span> {glue3}</p>
<span id="swlnsys_3" class="switch"><span hidden="true" id="UNIXtext_3" class="UNIX">
<div class="tip"><p id="par_id5">{unix_only}</p></div></span>
<span hidden="true" id="defaulttext_3"></span></span>
<div class="embedded"><p id="par_id6" class="embedded">{embedded}</p></div>
<div class="embedded"><p id="par_id6" class="embedded">{embedded2}</p></div>
<p id="par_id7" class="code">x = 1</p>
<p id="par_id8">line one<br>line two</p>
<p id="par_en_only">{en_only}</p>
</div>
<footer><div id="DEBUG"><p id="bm_module">{debug}</p></div></footer>
</body></html>
"""

EN = dict(
    lang="en-US",
    side="Contents",
    title="Load/Save options",
    choose="Choose",
    mac="LibreOffice - Preferences",
    default="Tools - Options",
    rest="Load/Save",
    a="Specifies settings.",
    b=" service.",
    glue1="Enable it under",
    glue2="Tools",
    glue3="first.",
    unix_only="Only on Linux.",
    embedded="An embedded note.",
    embedded2="A second copy.",
    en_only="English only.",
    debug="debug",
)
DE = dict(
    lang="de",
    side="Inhalt",
    title="Laden/Speichern",
    choose="Wählen Sie",
    mac="LibreOffice - Einstellungen",
    default="Extras - Optionen",
    rest="Laden/Speichern",
    a="Legt Einstellungen fest.",
    b="-Dienst.",
    glue1="Aktivieren Sie es unter",
    glue2="Extras",
    glue3="zuerst.",
    unix_only="Nur unter Linux.",
    embedded="Eine eingebettete Notiz.",
    embedded2="Eine zweite Kopie.",
    en_only="",
    debug="debug",
)


def write_tree(root, pages=("shared/01/page1.html", "scalc/01/page2.html")):
    for lang, fields in (("en-US", EN), ("de", DE)):
        for page in pages:
            path = root / "usr/share/libreoffice/help" / lang / "text" / page
            path.parent.mkdir(parents=True, exist_ok=True)
            # vary the title per page so pages are not all duplicates of each other
            text = PAGE.format(**{**fields, "title": f"{fields['title']} {page}"})
            if lang == "de":
                text = text.replace('<p id="par_en_only"></p>', "")
            path.write_text(text, encoding="utf-8")
    # a page that exists only in English is skipped
    only = root / "usr/share/libreoffice/help/en-US/text/shared/only_en.html"
    only.write_text(PAGE.format(**EN), encoding="utf-8")
    return root


def test_extract_page_keeps_default_variant_and_spaces(tmp_path):
    write_tree(tmp_path)
    blocks = extract_page(tmp_path / "usr/share/libreoffice/help/en-US/text/shared/01/page1.html")
    assert blocks["hd_id1"] == "Load/Save options shared/01/page1.html"
    assert blocks["par_id2"] == "Choose Tools - Options - Load/Save."  # MAC variant dropped
    assert blocks["par_id3"] == "Specifies settings. ScriptForge.FileSystem service."  # no space invented
    assert blocks["par_id4"] == "Enable it under Tools first."  # "underTools" would be wrong
    assert "par_id5" not in blocks  # paragraph inside a hidden UNIX-only block
    assert blocks["par_id6"] == "An embedded note."
    assert blocks["par_id6#2"] == "A second copy."  # repeated id numbered in order
    assert blocks["par_id8"] == "line one line two"
    assert "par_side" not in blocks and "bm_module" not in blocks  # outside DisplayArea


def test_extract_page_without_display_area(tmp_path):
    page = tmp_path / "x.html"
    page.write_text("<html><body><p id='a'>text</p></body></html>", encoding="utf-8")
    assert extract_page(page) == {}


def test_align_pages(tmp_path):
    write_tree(tmp_path)
    triples = align_pages(tmp_path, "en", "de")
    pairs = {(src, tgt) for _, src, tgt in triples}
    assert ("Choose Tools - Options - Load/Save.", "Wählen Sie Extras - Optionen - Laden/Speichern.") in pairs
    assert ("Enable it under Tools first.", "Aktivieren Sie es unter Extras zuerst.") in pairs
    assert ("A second copy.", "Eine zweite Kopie.") in pairs
    assert not any("English only" in src for _, src, _ in triples)  # no German counterpart
    assert {page for page, _, _ in triples} == {"shared/01/page1.html", "scalc/01/page2.html"}


def test_align_pages_missing_language(tmp_path):
    write_tree(tmp_path)
    with pytest.raises(FileNotFoundError, match="'fr'"):
        align_pages(tmp_path, "en", "fr")


def test_page_split_is_deterministic():
    assert page_split("shared/01/page1.html", 0.1, 0.1) == page_split("shared/01/page1.html", 0.1, 0.1)
    splits = [page_split(f"p{i}.html", 0.1, 0.1) for i in range(2000)]
    assert 100 < splits.count("test") < 300 and 100 < splits.count("valid") < 300


def test_split_pairs_dedups_and_removes_leakage(monkeypatch):
    where = {"a.html": "train", "b.html": "valid", "c.html": "test"}
    monkeypatch.setattr(prepare, "page_split", lambda page, v, t: where[page])
    triples = [
        ("a.html", "Hello.", "Hallo."),
        ("a.html", "Hello.", "Hallo."),  # duplicate
        ("b.html", "Hello.", "Hallo."),  # same pair on a valid page -> stays in train only
        ("b.html", "Hello.", "Servus."),  # source seen in train -> dropped from valid
        ("b.html", "Bye.", "Tschüss."),
        ("c.html", "Bye.", "Auf Wiedersehen."),  # source seen in valid -> dropped from test
        ("c.html", "Open.", "Öffnen."),
        ("c.html", "x = 1", "x = 1"),  # identical sides -> dropped
    ]
    splits, counts = split_pairs(triples)
    assert splits == {
        "train": [("Hello.", "Hallo.")],
        "valid": [("Bye.", "Tschüss.")],
        "test": [("Open.", "Öffnen.")],
    }
    assert counts["valid_dropped_src_overlap"] == 1 and counts["test_dropped_src_overlap"] == 1
    assert counts["unique_identical_dropped"] == 1 and counts["total"] == 3
    splits, _ = split_pairs(triples, keep_identical=True)
    assert ("x = 1", "x = 1") in splits["test"]


def test_prepare_lohelp_writes_and_caches(tmp_path, monkeypatch):
    root = write_tree(tmp_path / "root", pages=[f"shared/p{i}.html" for i in range(40)])
    out = tmp_path / "out"
    stats = prepare_lohelp(out, options=PrepareOptions(html_root=root, valid_frac=0.2, test_frac=0.2))
    for split in ("train", "valid", "test"):
        en = (out / f"{split}.en").read_text(encoding="utf-8").splitlines()
        de = (out / f"{split}.de").read_text(encoding="utf-8").splitlines()
        assert len(en) == len(de) == stats[split] > 0
    assert stats["total"] == stats["train"] + stats["valid"] + stats["test"]
    assert json.loads((out / "stats.json").read_text()) == stats
    assert "MPL-2.0" in (out / "NOTICE").read_text()
    # disjoint sources across splits
    sources = [set((out / f"{s}.en").read_text(encoding="utf-8").splitlines()) for s in ("train", "valid", "test")]
    assert not (sources[0] & sources[1] or sources[0] & sources[2] or sources[1] & sources[2])

    # second call: cached, no parsing
    monkeypatch.setattr(prepare, "align_pages", lambda *a, **k: pytest.fail("should be cached"))
    assert prepare_lohelp(out, options=PrepareOptions(html_root=root)) == stats


def test_prepare_without_apt_gives_clear_error(tmp_path, monkeypatch):
    monkeypatch.setattr(prepare.shutil, "which", lambda name: None)
    with pytest.raises(RuntimeError, match="--html-root"):
        prepare_lohelp(tmp_path / "out")


def test_main_cli(tmp_path, capsys):
    root = write_tree(tmp_path / "root", pages=[f"shared/p{i}.html" for i in range(10)])
    assert prepare.main(["--out", str(tmp_path / "out"), "--html-root", str(root)]) == 0
    assert json.loads(capsys.readouterr().out)["total"] > 0
    assert prepare.main(["--out", str(tmp_path / "out2"), "--html-root", str(tmp_path / "nowhere")]) == 1
