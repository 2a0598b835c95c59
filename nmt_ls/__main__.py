"""``nmt-ls`` (or ``python -m nmt_ls``): prepare, binarize, train, run, translate, export, score, plot, average.

nmt-ls run recipes/lohelp_en_de.yaml                 # data, training, test BLEU, plot
nmt-ls train recipes/lohelp_en_de.yaml train.lr=5e-4 --resume
nmt-ls translate runs/lohelp_en_de/checkpoint_best.pt < in.en > out.de
nmt-ls export runs/lohelp_en_de/checkpoint_best.pt --ctranslate2 runs/lohelp_en_de/ct2 --quantization int8
nmt-ls translate runs/lohelp_en_de/ct2 --engine ctranslate2 < in.en > out.de
nmt-ls score out.de --ref data/lohelp_en_de/test.de
"""

from __future__ import annotations

import os

# Before torch loads oneDNN: a small cache of its primitives. Batches of ever-changing shapes
# fill the default cache of 1024 with bf16 matmul primitives; 32 kept bf16 autocast's RSS 400 MB
# lower and its updates 7% faster on a 2-core AVX-512 BF16 CPU (tools/bench_train.py).
os.environ.setdefault("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "32")
# OpenMP threads that sleep when idle: as fast alone and 1.41x the updates per second next to one
# busy process on 2 cores, where spinning threads wait for a core (tools/bench_train.py --wait-policy).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse  # noqa: E402
import errno
import json
import logging
import sys
import time
from functools import partial
from pathlib import Path

from nmt_ls.checkpoint import CheckpointError
from nmt_ls.engines import MissingExtra
from nmt_ls.prepare import PrepareError

log = logging.getLogger("nmt_ls")
BAD_INPUT = (FileNotFoundError, FileExistsError, ValueError, CheckpointError, PrepareError, MissingExtra)


def error_line(e: Exception) -> str | None:
    """What the user reads for ``e``, in one line: for a file operation that failed, the path and
    why (``out.de: Is a directory``); for bad input, its message; None for anything else (a bug,
    shown with its traceback)."""
    if isinstance(e, OSError) and e.filename is not None and e.strerror:
        paths = e.filename if e.filename2 is None else f"{e.filename} -> {e.filename2}"
        return f"{paths}: {e.strerror}"
    return str(e) if isinstance(e, BAD_INPUT) else None


def check_writable(path: str | Path, folder: bool = False) -> Path:
    """``path``, once it is clear, before any work, that a file (with ``folder``: a folder to
    write in) can be written there: it is not a folder (not a file), and the nearest folder that
    exists at or above it is one this process may write in (the writers make the folders
    between); else the OSError that the write would end in."""
    path = Path(path)
    if path.exists() and path.is_dir() != folder:
        raise path_error(errno.ENOTDIR if folder else errno.EISDIR, path)
    above = path.absolute() if folder else path.absolute().parent
    while not above.exists():
        above = above.parent
    if not above.is_dir():
        raise path_error(errno.ENOTDIR, above)
    if not os.access(above, os.W_OK | os.X_OK):
        raise path_error(errno.EACCES, above)
    return path


def path_error(code: int, path: Path) -> OSError:
    """The OSError of ``errno`` ``code`` for ``path`` (OSError picks the subclass from the code)."""
    return OSError(code, os.strerror(code), str(path))


def _setup_logging(out_dir: Path | None = None) -> None:
    handlers = [logging.StreamHandler(sys.stderr)]
    if out_dir is not None:
        out_dir.mkdir(parents=True, exist_ok=True)
        handlers.append(logging.FileHandler(out_dir / "train.log", encoding="utf-8"))
    logging.basicConfig(
        level=logging.INFO,
        format="%(asctime)s | %(levelname)s | %(name)s | %(message)s",
        datefmt="%H:%M:%S",
        handlers=handlers,
        force=True,
    )


def cmd_prepare(args) -> int:
    from nmt_ls.prepare import main as prepare_main

    return prepare_main(args.rest)


def cmd_train(args) -> dict:
    from nmt_ls.config import load_recipe
    from nmt_ls.train import train

    started = time.time()
    cfg = load_recipe(args.recipe, args.overrides)
    _setup_logging(check_writable(cfg.out_dir, folder=True))
    return train(cfg, resume=args.resume, started=started)


def cmd_binarize(args) -> int:
    """Train the tokenizer if needed and binarize the recipe's train and valid splits."""
    from nmt_ls.binarize import binarize_recipe
    from nmt_ls.build import check_config, load_tokenizer
    from nmt_ls.config import load_recipe
    from nmt_ls.data import open_corpus
    from nmt_ls.distributed import World, resolve_device

    cfg = load_recipe(args.recipe, args.overrides)
    check_config(cfg)
    _setup_logging()
    check_writable(cfg.out_dir, folder=True).mkdir(parents=True, exist_ok=True)
    corpus = open_corpus(cfg.data)
    tok = load_tokenizer(cfg, World(0, 1, resolve_device("cpu")), None, corpus)
    for name, pairs in binarize_recipe(cfg, corpus, tok.model_path, num_workers=args.workers).items():
        print(f"{name}: {len(pairs)} pairs in {pairs.path}")
    return 0


def cmd_run(args) -> int:
    """The main job: prepare the data, train, score the test split, plot the curves."""
    from nmt_ls.config import load_recipe
    from nmt_ls.distributed import is_main_process, resolve_device
    from nmt_ls.plot import plot_log
    from nmt_ls.scoring import score_test_split, scoring_engine
    from nmt_ls.train import train

    start = time.time()
    cfg = load_recipe(args.recipe, args.overrides)
    out_dir = check_writable(cfg.out_dir, folder=True)
    _setup_logging(out_dir)
    summary = train(cfg, resume=args.resume, started=start, test_split=True)
    if not is_main_process():  # under torchrun, rank 0 alone decodes the test split, writes and prints
        return 0
    test = summary.pop("test_pairs", [])  # read once, at set-up
    chosen, probe_s = summary.pop("test_engine", ""), summary.pop("probe_s", {})  # by the decoding probe
    engine = scoring_engine(summary["checkpoint_best"], chosen, probe_s, resolve_device(cfg.train.device))
    scores = score_test_split(engine, test, cfg.eval, out_dir, cfg.data.tgt_lang)
    del engine  # CTranslate2's threads end here, not in a garbage collection that a forked child may run (a hang)
    png = plot_log(summary["log"], out_dir / "curves.png")
    minutes = (time.time() - start) / 60
    (out_dir / "summary.json").write_text(
        json.dumps({"train": summary, "test": scores, "total_minutes": minutes}, indent=2), encoding="utf-8"
    )
    beam, greedy = scores["beam"], scores["greedy"]
    updates, train_minutes = summary["updates"], summary["minutes"]
    print(f"\nrun {cfg.name} finished in {minutes:.1f} min ({updates} updates, {train_minutes:.1f} min training)")
    print(f"  test BLEU (beam {beam['beam_size']}): {beam['bleu']:.2f}   greedy: {greedy['bleu']:.2f}", end="")
    print(f"   (decoded with {scores['engine']} {scores['precision']}, {scores['engine_note']})")
    print(f"  signature:  {scores['beam']['bleu_signature']}")
    print(f"  log:        {summary['log']}")
    print(f"  plot:       {png}")
    print(f"  checkpoint: {summary['checkpoint_best']}")
    print(f"  test hyps:  {out_dir / ('test.beam.' + cfg.data.tgt_lang)}")
    print(f"  scores:     {out_dir / 'test_scores.json'}")
    return 0


def cmd_translate(args) -> int:
    from dataclasses import replace

    from nmt_ls.config import EvalConfig, from_dict
    from nmt_ls.distributed import resolve_device
    from nmt_ls.evaluate import read_lines, split_lines, write_lines

    _setup_logging()
    if args.output != "-":
        check_writable(args.output)
    if args.engine == "ctranslate2":
        from nmt_ls import ct2

        device = "auto" if args.device == "auto" else resolve_device(args.device).type  # "auto": CTranslate2's pick
        threads = dict(threads=args.threads, intra_threads=args.intra_threads)
        translator, tok, settings = ct2.load_exported(args.checkpoint, device, **threads)
        saved = from_dict(EvalConfig, settings["eval"], "eval")
        translate = partial(ct2.translate, translator, tok, max_positions=settings["max_positions"])
    else:
        import torch

        from nmt_ls import engines, inference

        if args.intra_threads != 1:
            raise ValueError("--intra-threads is for the ctranslate2 engine (torch runs one batch on --threads)")
        if args.threads < 0:
            raise ValueError(f"--threads must be >= 0 (0: every core this process may use), got {args.threads}")
        if args.threads:
            torch.set_num_threads(args.threads)
        model, tok, cfg = engines.load_for_inference(args.checkpoint, resolve_device(args.device))
        saved = from_dict(EvalConfig, cfg["eval"], "eval")
        translate = partial(inference.translate, model, tok)

    options = replace(
        saved,
        beam_size=args.beam if args.beam is not None else saved.beam_size,
        len_penalty=args.len_penalty if args.len_penalty is not None else saved.len_penalty,
        max_tokens=args.max_tokens or saved.max_tokens,
    )
    lines = read_lines(args.input) if args.input != "-" else split_lines(sys.stdin.read())
    hyps = translate(lines, options, progress=sys.stderr.isatty() or args.progress)
    write_lines(sys.stdout if args.output == "-" else args.output, hyps)
    return 0


def cmd_export(args) -> int:
    from nmt_ls import ct2

    _setup_logging()
    print(ct2.export(args.checkpoint, args.ctranslate2, args.quantization, force=args.force))
    return 0


def cmd_score(args) -> int:
    from nmt_ls.evaluate import format_scores, score_files

    paired = "bs" if args.paired_bs else "ar" if args.paired_ar else None
    n_samples = args.paired_bs_n if paired == "bs" else args.paired_ar_n
    result = score_files(args.hyp, args.ref, paired, n_samples)
    print(json.dumps(result, indent=2) if args.json else format_scores(result))
    return 0


def cmd_plot(args) -> int:
    from nmt_ls.plot import plot_log

    print(plot_log(args.log, args.out or Path(args.log).with_name("curves.png")))
    return 0


def cmd_average(args) -> int:
    from nmt_ls.checkpoint import atomic_save, average_checkpoints

    atomic_save(average_checkpoints(args.checkpoints), check_writable(args.out))
    print(args.out)
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="nmt-ls", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = p.add_subparsers(dest="command", required=True)
    _add_training_commands(sub)
    _add_model_commands(sub)
    _add_evaluation_commands(sub)
    return p


def _add_training_commands(sub) -> None:
    """prepare, train, run, binarize: the commands that take a recipe (or prepare's own arguments)."""
    s = sub.add_parser(
        "prepare", help="prepare the LibreOffice help corpus (see nmt-ls prepare --help)", add_help=False
    )
    s.add_argument("rest", nargs=argparse.REMAINDER)
    s.set_defaults(func=cmd_prepare)

    for name, func, help_ in (
        ("train", cmd_train, "train from a recipe"),
        ("run", cmd_run, "prepare, train, test BLEU and plot: the whole recipe"),
    ):
        s = sub.add_parser(name, help=help_)
        s.add_argument("recipe", help="YAML recipe under recipes/")
        s.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.lr=5e-4")
        s.add_argument("--resume", action="store_true", help="continue from out_dir/checkpoint_last.pt")
        s.set_defaults(func=func)

    s = sub.add_parser("binarize", help="encode a recipe's train/valid splits once into memory-mapped arrays")
    s.add_argument("recipe")
    s.add_argument("overrides", nargs="*", help="dotted overrides, e.g. data.dir=data/big")
    s.add_argument("--workers", type=int, default=None, help="encoding processes (default: all CPUs)")
    s.set_defaults(func=cmd_binarize)


def _add_model_commands(sub) -> None:
    """translate and export: the commands that take a checkpoint."""
    s = sub.add_parser("translate", help="translate a file or stdin with a checkpoint (or a CTranslate2 export)")
    s.add_argument("checkpoint", help="a checkpoint; with --engine ctranslate2, a directory from nmt-ls export")
    s.add_argument("--engine", choices=("torch", "ctranslate2"), default="torch")
    s.add_argument("--threads", type=int, default=0, help="CPU cores to use (default: all this process may use)")
    s.add_argument(
        "--intra-threads",
        type=int,
        default=1,
        help="ctranslate2 engine: threads per batch; --threads / this many batches run at once (default: 1)",
    )
    s.add_argument("-i", "--input", default="-", help="input file (default: stdin)")
    s.add_argument("-o", "--output", default="-", help="output file (default: stdout)")
    s.add_argument("--beam", type=int, default=None, help="beam size (1: greedy; default: the recipe's)")
    s.add_argument("--len-penalty", type=float, default=None)
    s.add_argument("--max-tokens", type=int, default=None)
    s.add_argument("--device", default="auto")
    s.add_argument("--progress", action="store_true")
    s.set_defaults(func=cmd_translate)

    s = sub.add_parser("export", help="export a checkpoint for deployment (CTranslate2 model directory)")
    s.add_argument("checkpoint")
    s.add_argument("--ctranslate2", required=True, metavar="OUT_DIR", help="the CTranslate2 model directory to write")
    s.add_argument(
        "--quantization",
        default="float32",
        help="weight type: int8, int8_float32, int16, float16, bfloat16, float32 (default: %(default)s)",
    )
    s.add_argument("--force", action="store_true", help="replace OUT_DIR if it exists")
    s.set_defaults(func=cmd_export)


def _add_evaluation_commands(sub) -> None:
    """score, plot, average: the commands on hypothesis files, logs and checkpoints' weights."""
    s = sub.add_parser("score", help="sacreBLEU BLEU, chrF++ and TER of hypothesis files, with paired tests")
    s.add_argument("hyp", nargs="+", help="hypothesis files; with a paired test the first is the baseline")
    s.add_argument("--ref", nargs="+", required=True, help="one or more reference files")
    s.add_argument("--json", action="store_true", help="print a JSON object instead of text")
    test = s.add_mutually_exclusive_group()
    test.add_argument(
        "--paired-bs",
        action="store_true",
        help="paired bootstrap resampling against the first file: 95%% CIs and p-values",
    )
    test.add_argument(
        "--paired-ar", action="store_true", help="paired approximate randomization against the first file: p-values"
    )
    s.add_argument("--paired-bs-n", type=int, default=1000, help="bootstrap resamples (default: %(default)s)")
    s.add_argument("--paired-ar-n", type=int, default=10000, help="randomization trials (default: %(default)s)")
    s.set_defaults(func=cmd_score)

    s = sub.add_parser("plot", help="PNG curves from a train_log.jsonl")
    s.add_argument("log")
    s.add_argument("--out", default=None)
    s.set_defaults(func=cmd_plot)

    s = sub.add_parser("average", help="average the parameters of checkpoints")
    s.add_argument("checkpoints", nargs="+")
    s.add_argument("--out", required=True)
    s.set_defaults(func=cmd_average)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["prepare"]:  # its own parser: argparse's REMAINDER would refuse a leading --out
        return cmd_prepare(argparse.Namespace(rest=argv[1:]))
    args = build_parser().parse_args(argv)
    try:
        result = args.func(args)
    except Exception as e:  # bad input or a path that cannot be used: one line, no traceback
        line = error_line(e)
        if line is None:
            raise
        print(f"nmt-ls {args.command}: error: {line}", file=sys.stderr)
        return 2
    finally:  # the command's process group and log handlers end with it (main() may be called again)
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()  # its groups' threads must not outlive the interpreter
        root = logging.getLogger()
        for handler in root.handlers[:]:
            root.removeHandler(handler)
            handler.close()
    return result if isinstance(result, int) else 0


if __name__ == "__main__":
    sys.exit(main())
