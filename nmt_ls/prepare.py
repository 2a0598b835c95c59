"""Build a parallel corpus from the LibreOffice help pages, offline.

The Debian packages ``libreoffice-help-<lang>`` ship the same help pages in every
language. Paragraphs and headings inside ``<div id="DisplayArea">`` carry the
same ``id`` attribute in each language, so aligning by ``id`` gives sentence
pairs with essentially no misalignment::

    python -m nmt_ls.prepare --out data/lohelp_en_de

writes ``{train,valid,test}.{en,de}``, ``stats.json`` and ``NOTICE`` (the text
is LibreOffice documentation, MPL-2.0). The split is by help page, so that a
page's paragraphs never straddle train and test; valid/test additionally lose
every pair whose source sentence also occurs in train (or, for test, in valid).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import shutil
import subprocess
import sys
import time
from collections import Counter, defaultdict
from dataclasses import dataclass
from pathlib import Path

import lxml.html

log = logging.getLogger(__name__)

HELP_SUBDIR = Path("usr/share/libreoffice/help")
SPLITS = ("train", "valid", "test")
BLOCK_TAGS = frozenset({"p", "h1", "h2", "h3", "h4", "h5", "h6"})
# Package suffix per language code where it is not simply the code itself.
PACKAGE_LANG = {"en": "en-us"}

NOTICE_TEXT = """\
This corpus is extracted from the LibreOffice help pages (Debian packages
{packages}).

LibreOffice documentation, Copyright (c) The Document Foundation and contributors.
Licensed under the Mozilla Public License, v. 2.0 (MPL-2.0):
https://mozilla.org/MPL/2.0/   Source: https://help.libreoffice.org/
The files here are derived from it (paragraphs aligned by id, deduplicated, split
by help page) and are distributed under the same licence.
"""


# ---------------------------------------------------------------------------
# HTML -> {id: text}
# ---------------------------------------------------------------------------


_INLINE_TAGS = frozenset(
    {"a", "span", "em", "strong", "b", "i", "u", "code", "sub", "sup", "img", "kbd", "tt", "small", "big"}
)


def _is_dropped_variant(el) -> bool:
    """True for a hidden OS/application variant (MAC..., WIN..., CALC...).

    Each ``switch``/``switchinline`` holds ``hidden`` spans, one per platform,
    plus a ``default...`` one; we keep only the default, in every language alike.
    """
    return el.get("hidden") is not None and not el.get("id", "").startswith("default")


def _block_text(block) -> str:
    """Visible text of one paragraph/heading, whitespace collapsed.

    Where two inline elements meet with no space and the join reads "lower|Upper"
    (``unter<span>Extras</span>`` once the MAC variant is dropped), insert a space.
    """
    parts: list[str] = []

    def emit(piece: str | None, boundary: bool) -> None:
        if not piece:
            return
        if boundary and parts and parts[-1][-1:].islower() and piece[0].isupper():
            parts.append(" ")
        parts.append(piece)

    def walk(el) -> None:
        emit(el.text, boundary=True)
        for child in el:
            if not isinstance(child.tag, str):  # comment / processing instruction
                pass
            elif _is_dropped_variant(child):
                # Keep a space where the dropped variant had one at its edge, so that
                # "text<span MAC> x</span><span default>y</span>" does not glue words.
                content = child.text_content()
                if content[:1].isspace() or content[-1:].isspace():
                    parts.append(" ")
            elif child.tag == "br" or child.tag not in _INLINE_TAGS:  # a block inside a block
                parts.append(" ")
                walk(child)
                parts.append(" ")
            else:
                walk(child)
            emit(child.tail, boundary=True)

    walk(block)
    return " ".join("".join(parts).split())


def extract_page(html_path: str | os.PathLike) -> dict[str, str]:
    """Map block ``id`` -> text for one help page.

    Only ``p``/``h1``-``h6`` elements with an ``id`` inside ``#DisplayArea`` count;
    blocks inside a dropped platform variant are skipped. An ``id`` that occurs
    more than once on a page (embedded snippets) becomes ``id``, ``id#2``, ``id#3``...
    in document order, so both languages number it alike.
    """
    root = lxml.html.parse(str(html_path)).getroot()
    area = root.xpath('//*[@id="DisplayArea"]') if root is not None else []
    if not area:
        log.debug("%s: no DisplayArea, skipped", html_path)
        return {}
    out: dict[str, str] = {}
    seen: Counter[str] = Counter()
    for el in area[0].iter(*BLOCK_TAGS):
        block_id = el.get("id")
        if not block_id:
            continue
        if any(_is_dropped_variant(anc) for anc in el.iterancestors()):
            continue
        seen[block_id] += 1
        key = block_id if seen[block_id] == 1 else f"{block_id}#{seen[block_id]}"
        text = _block_text(el)
        if text:
            out[key] = text
    return out


def _lang_dir(help_root: Path, lang: str) -> Path:
    """``help/en-US`` for ``en``, ``help/de`` for ``de``."""
    exact = help_root / lang
    if exact.is_dir():
        return exact
    candidates = sorted(p for p in help_root.glob(f"{lang}-*") if p.is_dir())
    if not candidates:
        have = sorted(p.name for p in help_root.iterdir() if p.is_dir()) if help_root.is_dir() else []
        raise FileNotFoundError(f"no help pages for language {lang!r} under {help_root} (found: {have})")
    return candidates[0]


def align_pages(html_root: str | os.PathLike, src_lang: str, tgt_lang: str) -> list[tuple[str, str, str]]:
    """Align every help page present in both languages.

    Args:
        html_root: directory containing ``usr/share/libreoffice/help/<lang>/text``.
    Returns:
        (page, src, tgt) triples, ``page`` being the path under ``text/`` (e.g.
        ``scalc/01/04060185.html``); pages sorted, blocks in document order.
    """
    help_root = Path(html_root) / HELP_SUBDIR
    src_text = _lang_dir(help_root, src_lang) / "text"
    tgt_text = _lang_dir(help_root, tgt_lang) / "text"
    triples = []
    pages = sorted(p.relative_to(src_text).as_posix() for p in src_text.rglob("*.html"))
    if not pages:
        raise FileNotFoundError(f"no .html pages under {src_text}")
    for page in pages:
        tgt_path = tgt_text / page
        if not tgt_path.is_file():
            continue
        src_blocks = extract_page(src_text / page)
        tgt_blocks = extract_page(tgt_path)
        for block_id, src in src_blocks.items():
            tgt = tgt_blocks.get(block_id)
            if tgt:
                triples.append((page, src, tgt))
    return triples


# ---------------------------------------------------------------------------
# Split by page
# ---------------------------------------------------------------------------


def page_split(page: str, valid_frac: float, test_frac: float) -> str:
    """Deterministic split of a help page from the SHA-1 of its path."""
    u = int.from_bytes(hashlib.sha1(page.encode("utf-8")).digest()[:8], "big") / 2**64
    if u < test_frac:
        return "test"
    if u < test_frac + valid_frac:
        return "valid"
    return "train"


def split_pairs(
    triples: list[tuple[str, str, str]],
    valid_frac: float = 0.06,
    test_frac: float = 0.06,
    keep_identical: bool = False,
) -> tuple[dict[str, list[tuple[str, str]]], dict]:
    """Deduplicate (src, tgt) pairs and split them by page.

    Pairs with ``src == tgt`` (code lines, numbers, identifiers: about 8 %) are
    dropped unless ``keep_identical``.

    A pair seen on pages of several splits goes to the first of train, valid, test.
    Then valid drops pairs whose source occurs in train, and test drops those whose
    source occurs in train or valid, so no source sentence is shared across splits.
    Returns ({split: pairs}, counts).
    """
    rank = {name: i for i, name in enumerate(SPLITS)}
    best: dict[tuple[str, str], str] = {}
    first_seen: dict[tuple[str, str], int] = {}
    pages_per_split: dict[str, set[str]] = defaultdict(set)
    identical: set[tuple[str, str]] = set()
    for i, (page, src, tgt) in enumerate(triples):
        split = page_split(page, valid_frac, test_frac)
        pages_per_split[split].add(page)
        pair = (src, tgt)
        if src == tgt and not keep_identical:
            identical.add(pair)
            continue
        first_seen.setdefault(pair, i)
        if pair not in best or rank[split] < rank[best[pair]]:
            best[pair] = split
    out: dict[str, list[tuple[str, str]]] = {name: [] for name in SPLITS}
    for pair in sorted(best, key=first_seen.__getitem__):  # corpus order, deterministic
        out[best[pair]].append(pair)
    counts: dict = {
        "aligned_blocks": len(triples),
        "unique_identical_dropped": len(identical),
        "unique_pairs": len(best),
    }
    seen_src = {src for src, _ in out["train"]}
    for name in ("valid", "test"):
        kept = [p for p in out[name] if p[0] not in seen_src]
        counts[f"{name}_dropped_src_overlap"] = len(out[name]) - len(kept)
        out[name] = kept
        seen_src |= {src for src, _ in kept}
    counts.update({f"{name}_pages": len(pages_per_split[name]) for name in SPLITS})
    counts.update({name: len(out[name]) for name in SPLITS})
    counts["total"] = sum(len(out[name]) for name in SPLITS)
    return out, counts


# ---------------------------------------------------------------------------
# Debian packages
# ---------------------------------------------------------------------------


class PrepareError(RuntimeError):
    """The corpus could not be fetched or unpacked (no apt-get, no network, ...)."""


def _package(lang: str) -> str:
    return f"libreoffice-help-{PACKAGE_LANG.get(lang, lang.lower())}"


def _run(cmd: list[str], cwd: Path) -> None:
    if shutil.which(cmd[0]) is None:
        raise PrepareError(f"`{cmd[0]}` not found")
    proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise PrepareError(f"`{' '.join(cmd)}` failed ({proc.returncode}): {proc.stderr.strip()[-500:]}")


def fetch_html_root(cache_dir: Path, langs: list[str]) -> tuple[Path, list[str]]:
    """Download (``apt-get download``) and unpack (``dpkg-deb -x``) the help packages.

    Both steps are cached under ``cache_dir``. Returns (html_root, deb file names).
    """
    cache_dir = Path(cache_dir).resolve()  # the commands below run inside deb_dir
    deb_dir = cache_dir / "debs"
    root = cache_dir / "root"
    deb_dir.mkdir(parents=True, exist_ok=True)
    debs = []
    for lang in langs:
        pkg = _package(lang)
        found = sorted(deb_dir.glob(f"{pkg}_*.deb"))
        if not found:
            log.info("apt-get download %s", pkg)
            try:
                _run(["apt-get", "download", pkg], cwd=deb_dir)
            except PrepareError as err:
                raise PrepareError(
                    f"could not download Debian package {pkg!r}: {err}\n"
                    f"Fix one of: (1) run `sudo apt-get update` and retry; "
                    f"(2) fetch it elsewhere, unpack with `dpkg-deb -x {pkg}_*.deb DIR` and pass "
                    f"--html-root DIR (DIR contains {HELP_SUBDIR}/...); "
                    f"(3) copy already-prepared {{train,valid,test}}.{{{','.join(langs)}}} into the --out dir."
                ) from err
            found = sorted(deb_dir.glob(f"{pkg}_*.deb"))
            if not found:
                raise PrepareError(f"apt-get download {pkg} left no .deb in {deb_dir}")
        deb = found[-1]
        debs.append(deb.name)
        stamp = root / f".{deb.name}.done"
        if not stamp.exists():
            log.info("dpkg-deb -x %s", deb.name)
            root.mkdir(parents=True, exist_ok=True)
            _run(["dpkg-deb", "-x", str(deb), str(root)], cwd=deb_dir)
            stamp.touch()
    return root, debs


# ---------------------------------------------------------------------------
# Entry points
# ---------------------------------------------------------------------------


def _outputs(out_dir: Path, src_lang: str, tgt_lang: str) -> list[Path]:
    return [out_dir / f"{split}.{lang}" for split in SPLITS for lang in (src_lang, tgt_lang)]


def _write_lines(path: Path, lines: list[str]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8", newline="\n") as f:
        for line in lines:
            f.write(line + "\n")
    os.replace(tmp, path)


@dataclass(frozen=True)
class PrepareOptions:
    """Where the help pages come from and how they are split.

    Attributes:
        html_root: already-extracted packages (a directory containing
            ``usr/share/libreoffice/help/<lang>/...``); if None, the Debian packages
            are fetched with ``apt-get download`` into ``cache_dir``.
        cache_dir: Default: ``out_dir/.cache``.
        valid_frac, test_frac: fraction of help *pages* per held-out split.
    """

    html_root: str | os.PathLike | None = None
    cache_dir: str | os.PathLike | None = None
    valid_frac: float = 0.06
    test_frac: float = 0.06


def prepare_lohelp(
    out_dir: str | os.PathLike,
    src_lang: str = "en",
    tgt_lang: str = "de",
    options: PrepareOptions = PrepareOptions(),
    force: bool = False,
) -> dict:
    """Prepare the LibreOffice-help parallel corpus in ``out_dir``.

    Args:
        out_dir: where ``{train,valid,test}.{src_lang,tgt_lang}``, ``stats.json`` and
            ``NOTICE`` go.
        options: the packages' source and the split (see ``PrepareOptions``).
        force: rebuild even if the outputs exist.
    Returns:
        the statistics also written to ``stats.json``.
    """
    out_dir = Path(out_dir)
    stats_path = out_dir / "stats.json"
    outputs = _outputs(out_dir, src_lang, tgt_lang)
    if not force and stats_path.is_file() and all(p.is_file() for p in outputs):
        log.info("%s already prepared (use force=True / --force to rebuild)", out_dir)
        return json.loads(stats_path.read_text(encoding="utf-8"))

    t0 = time.perf_counter()
    out_dir.mkdir(parents=True, exist_ok=True)
    html_root, debs = options.html_root, []
    if html_root is None:
        cache = Path(options.cache_dir) if options.cache_dir is not None else out_dir / ".cache"
        html_root, debs = fetch_html_root(cache, [src_lang, tgt_lang])
    t_fetch = time.perf_counter() - t0

    triples = align_pages(html_root, src_lang, tgt_lang)
    splits, counts = split_pairs(triples, valid_frac=options.valid_frac, test_frac=options.test_frac)
    if counts["total"] == 0:
        raise ValueError(f"no aligned {src_lang}-{tgt_lang} pairs found under {html_root}")
    _write_corpus(out_dir, splits, (src_lang, tgt_lang), debs)
    stats = {
        "corpus": "libreoffice-help",
        "src_lang": src_lang,
        "tgt_lang": tgt_lang,
        "debs": debs,
        "valid_frac": options.valid_frac,
        "test_frac": options.test_frac,
        **counts,
        "fetch_s": round(t_fetch, 2),
        "total_s": round(time.perf_counter() - t0, 2),
    }
    _save_stats(stats_path, stats)
    return stats


def _save_stats(stats_path: Path, stats: dict) -> None:
    """Write ``stats.json``, last: its presence marks a complete run; log its summary."""
    tmp = stats_path.with_name("stats.json.tmp")
    tmp.write_text(json.dumps(stats, indent=2) + "\n", encoding="utf-8")
    os.replace(tmp, stats_path)
    log.info(
        "%s-%s: %d unique pairs -> train %d | valid %d | test %d (%.1f s) in %s",
        stats["src_lang"],
        stats["tgt_lang"],
        stats["total"],
        stats["train"],
        stats["valid"],
        stats["test"],
        stats["total_s"],
        stats_path.parent,
    )


def _write_corpus(out_dir: Path, splits: dict, langs: tuple[str, str], debs: list[str]) -> None:
    """Each split's ``{split}.{lang}`` files, and the ``NOTICE``."""
    src_lang, tgt_lang = langs
    for split, pairs in splits.items():
        _write_lines(out_dir / f"{split}.{src_lang}", [src for src, _ in pairs])
        _write_lines(out_dir / f"{split}.{tgt_lang}", [tgt for _, tgt in pairs])
    packages = ", ".join(debs) if debs else f"{_package(src_lang)}, {_package(tgt_lang)}"
    (out_dir / "NOTICE").write_text(NOTICE_TEXT.format(packages=packages), encoding="utf-8")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="nmt-ls prepare", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="output directory, e.g. data/lohelp_en_de")
    parser.add_argument("--src-lang", default="en")
    parser.add_argument("--tgt-lang", default="de")
    parser.add_argument(
        "--html-root", default=None, help="already-extracted packages (contains usr/share/libreoffice/help)"
    )
    parser.add_argument(
        "--cache-dir", default=None, help="where .deb files and their extraction go (default OUT/.cache)"
    )
    parser.add_argument("--valid-frac", type=float, default=0.06, help="fraction of help pages for valid")
    parser.add_argument("--test-frac", type=float, default=0.06, help="fraction of help pages for test")
    parser.add_argument("--force", action="store_true", help="rebuild even if outputs exist")
    args = parser.parse_args(argv)
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        options = PrepareOptions(args.html_root, args.cache_dir, args.valid_frac, args.test_frac)
        stats = prepare_lohelp(args.out, args.src_lang, args.tgt_lang, options, force=args.force)
    except (PrepareError, FileNotFoundError, ValueError) as err:
        log.error("%s", err)
        return 1
    print(json.dumps({k: stats[k] for k in ("total", "train", "valid", "test", "total_s")}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
