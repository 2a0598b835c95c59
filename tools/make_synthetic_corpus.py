"""Write a large synthetic parallel corpus by perturbing a small real one, for measuring.

    python tools/make_synthetic_corpus.py --out /work/tmp_bin/synth5m            # 5M pairs
    python tools/make_synthetic_corpus.py --out /work/tmp_bin/synth300k -n 300000

writes ``{out}.en`` and ``{out}.de`` (line-aligned, UTF-8). Each pair is a random pair of the
base corpus (default: the shared 3k LibreOffice help fixture), then, independently:
with probability 0.1 another random pair is appended on both sides (longer sentences); every
number is replaced by a random one, the same on both sides; and each side gets, with
probability 0.3, word dropout (each word with probability 0.1, keeping at least one) and,
with probability 0.3, one swap of two neighbouring words. The output depends only on the
base corpus, ``-n`` and ``--seed``; it is written in chunks, never held whole.
"""

from __future__ import annotations

import argparse
import random
import re
import sys
import time
from pathlib import Path

FIXTURE = Path("/work/shared/data/lohelp.en-de.3k")
NUMBER = re.compile(r"\d+")


def read_base(prefix: Path, src_lang: str, tgt_lang: str) -> list[tuple[str, str]]:
    src = prefix.with_name(f"{prefix.name}.{src_lang}").read_text(encoding="utf-8").split("\n")
    tgt = prefix.with_name(f"{prefix.name}.{tgt_lang}").read_text(encoding="utf-8").split("\n")
    pairs = [(s.strip(), t.strip()) for s, t in zip(src, tgt) if s.strip() and t.strip()]
    if not pairs or len(src) != len(tgt):
        sys.exit(f"{prefix}.{{{src_lang},{tgt_lang}}}: need equally many lines and at least one non-empty pair")
    return pairs


def perturb_words(words: list[str], rng: random.Random) -> list[str]:
    if len(words) > 1 and rng.random() < 0.3:
        kept = [w for w in words if rng.random() >= 0.1]
        words = kept or [rng.choice(words)]
    if len(words) > 1 and rng.random() < 0.3:
        i = rng.randrange(len(words) - 1)
        words = [*words[:i], words[i + 1], words[i], *words[i + 2 :]]
    return words


def make_pair(base: list[tuple[str, str]], rng: random.Random) -> tuple[str, str]:
    src, tgt = rng.choice(base)
    if rng.random() < 0.1:
        more_src, more_tgt = rng.choice(base)
        src, tgt = f"{src} {more_src}", f"{tgt} {more_tgt}"
    if NUMBER.search(src) or NUMBER.search(tgt):
        numbers: dict[str, str] = {}
        renumber = lambda m: numbers.setdefault(m.group(), str(rng.randrange(10 ** len(m.group()))))  # noqa: E731
        src, tgt = NUMBER.sub(renumber, src), NUMBER.sub(renumber, tgt)
    return " ".join(perturb_words(src.split(), rng)), " ".join(perturb_words(tgt.split(), rng))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, required=True, help="output prefix: writes {out}.{src_lang}, {out}.{tgt_lang}")
    ap.add_argument("-n", type=int, default=5_000_000, help="pairs to write (default 5M)")
    ap.add_argument("--base", type=Path, default=FIXTURE, help=f"base corpus prefix (default {FIXTURE})")
    ap.add_argument("--src-lang", default="en")
    ap.add_argument("--tgt-lang", default="de")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    if args.n < 1:
        ap.error(f"-n must be positive, got {args.n}")
    base = read_base(args.base, args.src_lang, args.tgt_lang)
    rng = random.Random(args.seed)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    start = time.time()
    with (
        open(f"{args.out}.{args.src_lang}", "w", encoding="utf-8") as f_src,
        open(f"{args.out}.{args.tgt_lang}", "w", encoding="utf-8") as f_tgt,
    ):
        for chunk_start in range(0, args.n, 100_000):
            pairs = [make_pair(base, rng) for _ in range(min(100_000, args.n - chunk_start))]
            f_src.write("".join(s + "\n" for s, _ in pairs))
            f_tgt.write("".join(t + "\n" for _, t in pairs))
    print(
        f"wrote {args.n} pairs to {args.out}.{{{args.src_lang},{args.tgt_lang}}} in {time.time() - start:.1f} s "
        f"(from {len(base)} base pairs)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
