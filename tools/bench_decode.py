"""Decoding speed and test BLEU: our torch beam search against CTranslate2 float32 and int8.

    python tools/bench_decode.py runs/lohelp_en_de/checkpoint_best.pt         # the recipe's test split
    python tools/bench_decode.py CKPT --src test.en --ref test.de --single 200 --threads 2

The test split is ``{data.dir}/test.{src_lang,tgt_lang}`` of the checkpoint's recipe unless
``--src``/``--ref`` name files. Each engine translates it twice with the checkpoint's eval settings
(``--beam`` overrides the beam size): in batches of ``eval.max_tokens`` source tokens, then one
sentence at a time (the first ``--single`` sentences). Printed: sentences/s, speed-up over torch,
test BLEU of the batched run, and how many float32 outputs are identical to torch's, after the CPU
(model, cores, torch's and CTranslate2's instruction sets, whether CT2_USE_MKL is set). Exports
go to a temporary folder; loading and exporting are not timed.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time
from dataclasses import replace
from functools import partial
from pathlib import Path

import torch

from nmt_ls import ct2
from nmt_ls.config import EvalConfig, from_dict
from nmt_ls.engines import import_ctranslate2, load_for_inference
from nmt_ls.evaluate import corpus_bleu, read_lines
from nmt_ls.inference import translate


def cpu_line() -> str:
    model = platform.processor() or "unknown CPU"
    flags: set[str] = set()
    if Path("/proc/cpuinfo").is_file():
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
            if line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
    isa = ",".join(f for f in ("avx2", "avx512f", "avx512_vnni", "avx_vnni") if f in flags) or "no AVX2"
    mkl = os.environ.get("CT2_USE_MKL", "unset")
    return (
        f"CPU: {model}, {os.cpu_count()} cores ({isa}); torch {torch.__version__} "
        f"{torch.backends.cpu.get_cpu_capability()}, {torch.get_num_threads()} threads; "
        f"ctranslate2 {import_ctranslate2().__version__}, CT2_USE_MKL={mkl}"
    )


def timed(fn, lines: list[str], single: int) -> tuple[list[str], float, float]:
    """(batched hypotheses, batched sentences/s, one-at-a-time sentences/s)."""
    start = time.perf_counter()
    hyps = fn(lines)
    batch_rate = len(lines) / (time.perf_counter() - start)
    start = time.perf_counter()
    for line in lines[:single]:
        fn([line])
    return hyps, batch_rate, min(single, len(lines)) / (time.perf_counter() - start)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoint")
    p.add_argument("--src", help="source file (default: the recipe's test split)")
    p.add_argument("--ref", help="reference file (default: the recipe's test split)")
    p.add_argument("--beam", type=int, help="beam size (default: the checkpoint's eval.beam_size)")
    p.add_argument("--single", type=int, default=500, help="sentences translated one at a time (default: 500)")
    p.add_argument("--limit", type=int, default=0, help="only the first N sentences (default: all)")
    p.add_argument("--threads", type=int, default=torch.get_num_threads(), help="CPU threads for both engines")
    args = p.parse_args(argv)

    torch.set_num_threads(args.threads)
    model, tok, cfg = load_for_inference(args.checkpoint)
    d, e = cfg["data"], cfg["eval"]
    src = read_lines(args.src or Path(d["dir"]) / f"test.{d['src_lang']}")
    ref = read_lines(args.ref or Path(d["dir"]) / f"test.{d['tgt_lang']}")
    if args.limit:
        src, ref = src[: args.limit], ref[: args.limit]
    options = from_dict(EvalConfig, e, "eval")
    options = replace(options, beam_size=args.beam or options.beam_size)
    print(cpu_line())
    print(f"{len(src)} test sentences, beam {options.beam_size}, one at a time: first {min(args.single, len(src))}")

    rows = []
    hyps, batch_rate, single_rate = timed(lambda lines: translate(model, tok, lines, options), src, args.single)
    torch_hyps = hyps
    rows.append(("torch", "float32", batch_rate, single_rate, corpus_bleu(hyps, ref)[0], ""))
    with tempfile.TemporaryDirectory() as tmp:
        for quantization in ("float32", "int8"):
            path = ct2.export(args.checkpoint, Path(tmp) / quantization, quantization)
            translator, ct2_tok, settings = ct2.load_exported(path, threads=args.threads)

            run = partial(ct2.translate, translator, ct2_tok, options=options, max_positions=settings["max_positions"])
            hyps, batch_rate, single_rate = timed(run, src, args.single)
            same = sum(h == t for h, t in zip(hyps, torch_hyps))
            rows.append(("ctranslate2", quantization, batch_rate, single_rate, corpus_bleu(hyps, ref)[0], same))

    torch_batch, torch_single = rows[0][2], rows[0][3]
    header = ("engine", "weights", "batch sent/s", "x torch", "single sent/s", "x torch", "BLEU", "same as torch")
    print("\n{:<12} {:<8} {:>13} {:>8} {:>14} {:>8} {:>6} {:>14}".format(*header))
    for engine, weights, batch_rate, single_rate, bleu, same in rows:
        same = f"{same}/{len(src)}" if same != "" else "-"
        print(
            f"{engine:<12} {weights:<8} {batch_rate:>13.1f} {batch_rate / torch_batch:>8.2f} "
            f"{single_rate:>14.1f} {single_rate / torch_single:>8.2f} {bleu:>6.2f} {same:>14}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
