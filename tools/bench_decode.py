"""Decoding speed and test BLEU: our torch search (float32, and int8 by torch's dynamic quantization)
against CTranslate2 float32 and int8 as nmt_ls.ct2 calls it, with each split of the CPU threads.

    python tools/bench_decode.py runs/lohelp_en_de/checkpoint_best.pt         # the recipe's test split
    python tools/bench_decode.py CKPT --src test.en --ref test.de --single 200 --threads 2

The test split is ``{data.dir}/test.{src_lang,tgt_lang}`` of the checkpoint's recipe unless
``--src``/``--ref`` name files. Each row translates it with the checkpoint's eval settings (``--beam``
overrides the beam size): all at once (in batches of ``eval.max_tokens`` source tokens), then one
sentence at a time (the first ``--single`` sentences). Rows:

- torch float32, and torch int8: ``torch.ao.quantization.quantize_dynamic`` on the encoder's and
  decoder's linears (int8 weights, activations quantized per batch; the output projection stays
  float32), on ``--threads`` threads;
- CTranslate2 float32 and int8 (``nmt_ls.ct2.translate``: all sentences in flight at once, one call
  per length limit), with ``inter_threads=N, intra_threads=1`` (the default) and
  ``inter_threads=1, intra_threads=N`` (N = ``--threads``);
- CTranslate2 int8 with ``CT2_FORCE_CPU_ISA=AVX512`` where the CPU has AVX-512 (the variable is read
  once per process: the row runs in a child process);
- CTranslate2 int8 in one ``translate_batch`` with one length limit for all (the longest sentence's):
  the price of one call per limit, not our outputs.

Printed: sentences/s, speed-up over torch float32, test BLEU of the batched run, and how many
batched outputs are identical to torch float32's, after the CPU (model, cores, torch's and
CTranslate2's instruction sets, CT2_USE_MKL). Exports go to a temporary folder; loading, exporting
and one warm-up sentence per row are not timed.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
import warnings
from dataclasses import replace
from functools import partial
from pathlib import Path

import torch

from nmt_ls import ct2
from nmt_ls.config import EvalConfig, from_dict, to_dict
from nmt_ls.engines import encode_sources, import_ctranslate2, load_for_inference, max_output_len
from nmt_ls.evaluate import corpus_bleu, read_lines
from nmt_ls.hardware import usable_cores
from nmt_ls.inference import translate
from nmt_ls.model import Seq2Seq

AVX512 = {"CT2_FORCE_CPU_ISA": "AVX512"}


def cpu_flags() -> tuple[str, set[str]]:
    """(model name, instruction-set flags) from /proc/cpuinfo."""
    model, flags = platform.processor() or "unknown CPU", set()
    if Path("/proc/cpuinfo").is_file():
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
            if line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
    return model, flags


def cpu_line() -> str:
    model, flags = cpu_flags()
    isa = ",".join(f for f in ("avx2", "avx512f", "avx512_vnni", "avx_vnni") if f in flags) or "no AVX2"
    env = {name: os.environ.get(name, "unset") for name in ("CT2_USE_MKL", "CT2_FORCE_CPU_ISA")}
    return (
        f"CPU: {model}, {usable_cores()} usable cores ({isa}); torch {torch.__version__} "
        f"{torch.backends.cpu.get_cpu_capability()}, {torch.get_num_threads()} threads; "
        f"ctranslate2 {import_ctranslate2().__version__}, " + ", ".join(f"{k}={v}" for k, v in env.items())
    )


def quantize_int8(model: Seq2Seq) -> Seq2Seq:
    """A copy of ``model`` whose encoder and decoder linears run in int8 (torch's dynamic
    quantization, the baseline a torch user would try; the output projection, the embedding
    matrix when tied, stays float32). torch.ao.quantization is deprecated in favour of torchao:
    its warnings are silenced here."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the deprecations of torch.ao and of quantized tensors
        return torch.ao.quantization.quantize_dynamic(model, {"encoder", "decoder"}, dtype=torch.qint8)


def timed(fn, lines: list[str], single: int) -> dict:
    """{"hyps": batched hypotheses, "batch": batched sentences/s, "single": one-at-a-time sentences/s}."""
    fn(lines[:1])  # warm-up: lazy initialisation is not timed
    start = time.perf_counter()
    hyps = fn(lines)
    batch_rate = len(lines) / (time.perf_counter() - start)
    start = time.perf_counter()
    for line in lines[:single]:
        fn([line])
    return {"hyps": hyps, "batch": batch_rate, "single": min(single, len(lines)) / (time.perf_counter() - start)}


def one_call(translator, tok, lines: list[str], options: EvalConfig, max_positions: int) -> list[str]:
    """All ``lines`` in one synchronous ``translate_batch`` whose length limit is the longest
    sentence's (how CTranslate2 is usually called; outputs differ from ours where a limit binds)."""
    src_ids = encode_sources(tok, lines, max_positions)
    todo = [i for i, ids in enumerate(src_ids) if ids]
    limit = max((max_output_len(len(src_ids[i]) + 1, options, max_positions) for i in todo), default=1)
    search = ct2.search_args(tok, options, with_scores=False) | {"asynchronous": False}
    pieces = [[tok.sp.id_to_piece(t) for t in src_ids[i]] for i in todo]
    hyps = [""] * len(lines)
    for i, result in zip(todo, translator.translate_batch(pieces, max_decoding_length=limit, **search)):
        ids = [tok.sp.piece_to_id(p) for p in result.hypotheses[0]]
        hyps[i] = tok.decode(ids[:-1] if ids and ids[-1] == tok.eos_id else ids)
    return hyps


def ct2_row(job: dict) -> dict:
    """:func:`timed` CTranslate2 on ``job``: "export", "threads", "intra_threads", "lines",
    "options" (an EvalConfig dict), "single", and "one_call" (:func:`one_call` instead of ours)."""
    translator, tok, settings = ct2.load_exported(job["export"], threads=job["threads"], intra_threads=job["intra"])
    options = from_dict(EvalConfig, job["options"], "eval")
    run = partial(one_call if job["one_call"] else ct2.translate, translator, tok)
    return timed(partial(run, options=options, max_positions=settings["max_positions"]), job["lines"], job["single"])


def ct2_row_in_child(job: dict, env: dict[str, str]) -> dict:
    """:func:`ct2_row` in a child process with ``env`` added to its environment (CTranslate2 reads
    CT2_FORCE_CPU_ISA once per process)."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "job.json"
        path.write_text(json.dumps(job), encoding="utf-8")
        subprocess.run([sys.executable, __file__, "--job", str(path)], env={**os.environ, **env}, check=True)
        return json.loads(path.with_suffix(".out.json").read_text(encoding="utf-8"))


def ct2_rows(args, exports: dict[str, Path], src: list[str], options: EvalConfig) -> list[tuple[str, dict]]:
    """(label, :func:`timed` result) of each CTranslate2 row."""
    n = args.threads
    splits = [(n, 1), (1, n)] if n > 1 else [(1, 1)]
    base = {"lines": src, "options": to_dict(options), "single": args.single, "one_call": False}
    rows = []
    for quantization in ("float32", "int8"):
        for inter, intra in splits:
            job = {**base, "export": str(exports[quantization]), "threads": inter * intra, "intra": intra}
            rows.append((f"ctranslate2 {quantization} {inter}x{intra}", ct2_row(job)))
    int8 = {**base, "export": str(exports["int8"]), "threads": n, "intra": 1}
    if "avx512f" in cpu_flags()[1]:
        rows.append((f"ctranslate2 int8 {n}x1 AVX512", ct2_row_in_child(int8, AVX512)))
    rows.append((f"ctranslate2 int8 {n}x1 one-call", ct2_row({**int8, "one_call": True})))
    return rows


def print_rows(rows: list[tuple[str, dict]], ref: list[str]) -> None:
    """The table: each row's speeds, their ratio to the first row's (torch float32), BLEU and the
    outputs identical to the first row's."""
    first = rows[0][1]
    header = ("engine weights threads", "batch sent/s", "x torch", "single sent/s", "x torch", "BLEU", "same as torch")
    print("\n{:<36} {:>12} {:>8} {:>13} {:>8} {:>6} {:>14}".format(*header))
    for label, r in rows:
        same = f"{sum(h == t for h, t in zip(r['hyps'], first['hyps']))}/{len(ref)}" if r is not first else "-"
        print(
            f"{label:<36} {r['batch']:>12.1f} {r['batch'] / first['batch']:>8.2f} {r['single']:>13.1f} "
            f"{r['single'] / first['single']:>8.2f} {corpus_bleu(r['hyps'], ref)[0]:>6.2f} {same:>14}"
        )


def test_split(args, cfg: dict) -> tuple[list[str], list[str]]:
    """(sources, references): ``--src``/``--ref``, else the recipe's test split; ``--limit`` first lines."""
    d = cfg.get("data", {})
    paths = [
        given or Path(d["dir"]) / f"test.{d[lang]}" for given, lang in ((args.src, "src_lang"), (args.ref, "tgt_lang"))
    ]
    src, ref = (read_lines(path) for path in paths)
    return (src[: args.limit], ref[: args.limit]) if args.limit else (src, ref)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoint", nargs="?")
    p.add_argument("--src", help="source file (default: the recipe's test split)")
    p.add_argument("--ref", help="reference file (default: the recipe's test split)")
    p.add_argument("--beam", type=int, help="beam size (default: the checkpoint's eval.beam_size)")
    p.add_argument("--single", type=int, default=500, help="sentences translated one at a time (default: 500)")
    p.add_argument("--limit", type=int, default=0, help="only the first N sentences (default: all)")
    p.add_argument("--threads", type=int, default=usable_cores(), help="CPU cores for every engine (default: all)")
    p.add_argument("--job", help=argparse.SUPPRESS)  # a child process's row (ct2_row_in_child)
    args = p.parse_args(argv)
    if args.job:
        result = ct2_row(json.loads(Path(args.job).read_text(encoding="utf-8")))
        Path(args.job).with_suffix(".out.json").write_text(json.dumps(result), encoding="utf-8")
        return 0
    if args.checkpoint is None:
        p.error("the checkpoint argument is required")
    if args.threads < 1:
        p.error(f"--threads must be >= 1, got {args.threads}")

    torch.set_num_threads(args.threads)
    model, tok, cfg = load_for_inference(args.checkpoint)
    src, ref = test_split(args, cfg)
    options = from_dict(EvalConfig, cfg["eval"], "eval")
    options = replace(options, beam_size=args.beam or options.beam_size)
    print(cpu_line())
    print(f"{len(src)} test sentences, beam {options.beam_size}, one at a time: first {min(args.single, len(src))}")

    rows = [(f"torch float32 {args.threads}", timed(partial(translate, model, tok, options=options), src, args.single))]
    int8 = partial(translate, quantize_int8(model), tok, options=options)
    rows.append((f"torch int8 {args.threads}", timed(int8, src, args.single)))
    with tempfile.TemporaryDirectory() as tmp:
        exports = {q: ct2.export(args.checkpoint, Path(tmp) / q, q) for q in ("float32", "int8")}
        rows += ct2_rows(args, exports, src, options)
    print_rows(rows, ref)
    return 0


if __name__ == "__main__":
    sys.exit(main())
