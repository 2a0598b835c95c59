"""Training speed and memory of a recipe's model and batches, per precision, on this machine.

    python tools/bench_train.py [RECIPE] [k=v ...] [--updates N] [--warmup N] [--wait-policy] [--no-fairseq]

Each configuration runs in a process of its own (so its peak RSS is its own): the recipe's
set-up (tokenizer and binarized data, built once in ``--out``), then ``warmup`` untimed and
``updates`` timed updates (forward, backward, Adam) on the first batches of the first epoch,
the same batches for every configuration. Printed: the CPU (model, torch's capability, native
bf16 or not), fp32 matmul GFLOP/s on the run's threads, and per configuration target tokens/s,
seconds per update, peak RSS and tokens/s as a ratio of float32's in the same run.

Where fairseq is installed (and without ``--no-fairseq``) a fairseq row follows, and every row's
tokens/s and peak RSS as ratios of fairseq's: fairseq's own ``Trainer.train_step`` (its
transformer forward, label_smoothed_cross_entropy, backward, gradient scaling and clipping, its
Adam step and lr scheduler), in a child process of its own, float32, on our float32 row's
threads, timing the same updates after the same warmup on the same batches: our train pairs,
written once into a fairseq data-bin by fairseq's mmap builder (``OUT/fairseq-bin``), batched by
our ``batch_by_tokens`` and padded by fairseq's collater. The model is the recipe's (sizes, pre-
or post-norm, positions, dropouts, one tied joint embedding; see ``fairseq_argv``), the loss its
epsilon, Adam its betas, eps, weight decay, clip norm and lr warmup. Not timed, in either row:
building the batches (done before the first update), start-up and set-up. fairseq's row runs
as fairseq-train would, without the oneDNN primitive cache of 32 that nmt-ls sets (unless the
caller set one, which both rows then have).

``--variant NAME=k=v,k=v`` (repeatable) measures instead a ladder of model sizes in float32
against the recipe as it is (the first row), natively and as an AVX2 machine without AVX-512
would run it (``ATEN_CPU_CAPABILITY=avx2 MKL_ENABLE_INSTRUCTIONS=AVX2 ONEDNN_MAX_CPU_ISA=AVX2``),
and prints each variant's update count at the budgets of issue 27 (updates of the recipe's own
model: slow 440, mid 1,900, fast 2,700) scaled by the smaller of its two speed-ups. A variant
that changes ``tokenizer.*`` gets a tokenizer and binarized data of its own (``OUT-<setting>``).

``--wait-policy`` measures instead the OpenMP wait policy (libgomp's default spin-then-sleep,
run with the variable unset, vs ``OMP_WAIT_POLICY=PASSIVE``, which nmt-ls sets) in float32,
alone and next to one busy process.

Run it alone on the machine (e.g. under ../shared/tools/quiet): times are only comparable
within one run.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import logging
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

# as the nmt-ls command sets it before torch loads (nmt_ls/__main__.py); the wait policy is measured.
# fairseq's row runs as fairseq-train would: with the caller's setting, if any.
ONEDNN_CACHE = os.environ.get("ONEDNN_PRIMITIVE_CACHE_CAPACITY")
if "--fairseq-child" not in sys.argv:
    os.environ.setdefault("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "32")
ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

BUSY = "import time\nend = time.time() + 3600\nwhile time.time() < end:\n    pass\n"


def child(recipe: str, overrides: list[str], warmup: int, updates: int) -> dict:
    """One configuration: time ``updates`` updates after ``warmup``; the result as a dict."""
    import torch

    from nmt_ls.batching import batch_by_tokens
    from nmt_ls.build import choose_precision, setup
    from nmt_ls.config import load_recipe
    from nmt_ls.planner import PlanState
    from nmt_ls.resume import TrainState
    from nmt_ls.train import Trainer

    cfg = load_recipe(recipe, overrides)
    built = choose_precision(setup(cfg, None), None)
    trainer = Trainer(built, TrainState(), PlanState(), time.time)
    t, data = built.cfg.train, built.train_data
    order = batch_by_tokens(data.src_lens, data.tgt_lens, t.max_tokens, seed=t.seed, shuffle=True)
    samples = [trainer.sample(idx) for idx in order[: warmup + updates]]
    built.model.train()
    timed = time_updates(lambda sample: trainer.train_step([sample]), samples, warmup)
    return {"amp": t.amp, "threads": torch.get_num_threads(), "train_bin": str(data.path), **timed, **onednn_cache()}


def onednn_cache() -> dict:
    return {"onednn_cache": os.environ.get("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "default")}


def time_updates(step, samples: list[dict], warmup: int) -> dict:
    """``step(sample)`` (one update) on each sample, the first ``warmup`` untimed: the timed
    updates' target tokens (fairseq's ``ntokens``: y + eos), tokens/s, s/update, and the
    process's peak RSS so far."""
    for sample in samples[:warmup]:
        step(sample)
    start, tokens = time.perf_counter(), 0
    for sample in samples[warmup:]:
        step(sample)
        tokens += int(sample["ntokens"])
    seconds = time.perf_counter() - start
    return {
        "tokens": tokens,
        "tokens_per_s": tokens / seconds,
        "s_per_update": seconds / (len(samples) - warmup),
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }


def run_child(args, overrides: list[str], env: dict | None = None, neighbour: bool = False, mode=("--child",)) -> dict:
    """This script as a child process (``mode``: ours, or ``--fairseq-child DATA_BIN``) with
    ``overrides``, the variables ``env`` (None: unset) and optionally one busy process beside it;
    the dict it prints last."""
    cmd = [sys.executable, __file__, args.recipe, *overrides, *mode, "--updates", str(args.updates)]
    cmd += ["--warmup", str(args.warmup)]
    busy = subprocess.Popen([sys.executable, "-c", BUSY]) if neighbour else None
    try:
        child_env = {k: v for k, v in {**os.environ, **(env or {})}.items() if v is not None}  # None: unset
        out = subprocess.run(cmd, env=child_env, capture_output=True, text=True, check=True)
    except subprocess.CalledProcessError as e:
        sys.exit(f"bench_train: {' '.join([*mode, *overrides])} failed:\n{e.stderr[-3000:]}")
    finally:
        if busy:
            busy.kill()
    return json.loads(out.stdout.strip().splitlines()[-1])


# ---- fairseq's own training step on the same model, batches, loss and optimizer --------------

FAIRSEQ_LANGS = ("src", "tgt")  # the data-bin's language names: train.src-tgt.src.bin, dict.src.txt, ...


def fairseq_schedule(t) -> list[str]:
    """fairseq's lr scheduler for ``train``'s: ``wsd`` with a constant stable phase is ``fixed``
    with the same warmup (the same lrs, update for update, up to the cooldown, which fairseq
    lacks); ``linear`` is ``polynomial_decay`` of power 1; the rest ``inverse_sqrt``. fairseq's
    warmups of the last two start at 0, one update behind ours; all ramp linearly to ``train.lr``."""
    warmup = ["--warmup-updates", str(t.warmup_steps)]
    if t.lr_scheduler == "wsd" and t.stable_phase == "constant":
        return ["--lr-scheduler", "fixed", *warmup]
    if t.lr_scheduler == "linear":
        total = ["--total-num-update", str(t.max_updates), "--end-learning-rate", str(t.end_lr)]
        return ["--lr-scheduler", "polynomial_decay", "--power", "1", *total, *warmup]
    return ["--lr-scheduler", "inverse_sqrt", *warmup]


def fairseq_argv(cfg, data_bin: str, save_dir: str) -> list[str]:
    """fairseq-train's command line for the recipe ``cfg``: its transformer with the recipe's
    sizes, norm placement, positions, dropouts and tied joint embedding; label_smoothed_cross_entropy
    with its epsilon; Adam with its betas, eps, weight decay, clip norm and lr schedule; float32
    on the CPU."""
    m, c, t = cfg.model, cfg.criterion, cfg.train
    if not m.tie_embeddings:
        raise ValueError(
            "the fairseq row needs model.tie_embeddings=true (fairseq shares src and tgt "
            "embeddings only together with the output projection)"
        )
    sizes = [
        ("embed-dim", m.d_model, m.d_model),
        ("ffn-embed-dim", m.ffn_dim, m.ffn_dim),
        ("attention-heads", m.n_heads, m.n_heads),
        ("layers", m.enc_layers, m.dec_layers),
    ]
    argv = [data_bin, "--task", "translation", "--source-lang", FAIRSEQ_LANGS[0], "--target-lang", FAIRSEQ_LANGS[1]]
    argv += ["--arch", "transformer", "--share-all-embeddings", "--activation-dropout", "0"]
    for key, enc, dec in sizes:
        argv += [f"--encoder-{key}", str(enc), f"--decoder-{key}", str(dec)]
    argv += ["--dropout", str(m.dropout), "--attention-dropout", str(m.attn_dropout)]
    argv += ["--max-source-positions", str(m.max_positions), "--max-target-positions", str(m.max_positions)]
    argv += ["--encoder-normalize-before", "--decoder-normalize-before"] if m.pre_norm else []
    argv += ["--encoder-learned-pos", "--decoder-learned-pos"] if m.positions == "learned" else []
    argv += ["--criterion", "label_smoothed_cross_entropy", "--label-smoothing", str(c.label_smoothing)]
    argv += ["--ignore-prefix-size", str(c.ignore_prefix_size)]
    argv += ["--report-accuracy"] if c.report_accuracy else []
    argv += ["--sentence-avg"] if c.sentence_avg else []
    argv += ["--optimizer", "adam", "--adam-betas", str(tuple(t.betas)), "--adam-eps", str(t.adam_eps)]
    argv += ["--weight-decay", str(t.weight_decay), "--clip-norm", str(t.clip_norm), "--lr", str(t.lr)]
    argv += fairseq_schedule(t)
    argv += ["--max-tokens", str(t.max_tokens), "--seed", str(t.seed), "--cpu", "--num-workers", "0"]
    return argv + ["--disable-validation", "--no-save", "--save-dir", save_dir]


def write_fairseq_bin(pairs, vocab_size: int, folder: Path) -> None:
    """Our encoded train ``pairs`` (``MmapPairs`` or ``EncodedPairs``) as a fairseq data-bin in
    ``folder``, written by fairseq's own mmap builder: a joint dictionary of ``vocab_size`` entries
    (fairseq's four specials, then placeholders ``id4``, ``id5``, ... for our ids 4 and up) and the
    same pairs in the same order, the source with its eos, the target with eos appended (fairseq's
    layout). Our specials (pad, unk, bos, eos) become fairseq's; every other id keeps its number."""
    import numpy as np
    import torch
    from fairseq.data import Dictionary
    from fairseq.data.indexed_dataset import MMapIndexedDatasetBuilder, best_fitting_int_dtype

    from nmt_ls.tokenizer import BOS_ID, EOS_ID, PAD_ID, UNK_ID

    d = Dictionary()
    for i in range(d.nspecial, vocab_size):
        d.add_symbol(f"id{i}")
    ours, theirs = [PAD_ID, UNK_ID, BOS_ID, EOS_ID], [d.pad(), d.unk(), d.bos(), d.eos()]
    if set(ours) != set(theirs) or set(ours) != set(range(d.nspecial)):
        raise ValueError(f"special ids {ours} and fairseq's {theirs} are not the same first ids")
    to_fairseq = np.arange(vocab_size)
    to_fairseq[ours] = theirs
    folder.mkdir(parents=True)
    prefix = str(folder / "train.{}-{}.".format(*FAIRSEQ_LANGS))
    dtype = best_fitting_int_dtype(vocab_size)
    builders = [MMapIndexedDatasetBuilder(prefix + f"{lang}.bin", dtype=dtype) for lang in FAIRSEQ_LANGS]
    for start in range(0, len(pairs), 10_000):
        src_ids, tgt_ids = pairs.get(range(start, min(start + 10_000, len(pairs))))
        for src, tgt in zip(src_ids, tgt_ids):
            builders[0].add_item(torch.from_numpy(to_fairseq[src]))
            builders[1].add_item(torch.from_numpy(to_fairseq[[*tgt, EOS_ID]]))
    for builder, lang in zip(builders, FAIRSEQ_LANGS):
        builder.finalize(prefix + f"{lang}.idx")
        d.save(str(folder / f"dict.{lang}.txt"))


def fairseq_data_bin(train_bin: str, out: str) -> Path:
    """The fairseq data-bin of our binarized train split ``train_bin`` (whose name holds its
    cache key), written once under ``out/fairseq-bin``."""
    from nmt_ls.binarize import MmapPairs

    logging.getLogger("fairseq").setLevel(logging.WARNING)  # its INFO lines on import, between our lines
    pairs = MmapPairs(train_bin)
    folder = Path(out) / "fairseq-bin" / pairs.path.name
    if not folder.exists():
        tmp = folder.with_name(f".tmp.{folder.name}.{os.getpid()}")
        write_fairseq_bin(pairs, pairs.meta["vocab_size"], tmp)
        tmp.rename(folder)
    return folder


def fairseq_trainer(cfg, data_bin: str, save_dir: str):
    """fairseq's ``Trainer`` as fairseq-train builds it from :func:`fairseq_argv` (seeded; its task
    with the train split of ``data_bin`` loaded, its model and criterion), with its optimizer and
    lr scheduler built now rather than in the first update, as our set-up builds ours."""
    import numpy as np
    from fairseq import options, tasks, utils
    from fairseq.dataclass.utils import convert_namespace_to_omegaconf
    from fairseq.trainer import Trainer

    argv = fairseq_argv(cfg, data_bin, save_dir)
    fs_cfg = convert_namespace_to_omegaconf(options.parse_args_and_arch(options.get_training_parser(), argv))
    np.random.seed(cfg.train.seed)
    utils.set_torch_seed(cfg.train.seed)
    task = tasks.setup_task(fs_cfg.task)
    task.load_dataset("train")
    trainer = Trainer(fs_cfg, task, task.build_model(fs_cfg.model), task.build_criterion(fs_cfg.criterion))
    trainer.get_lr()  # builds the optimizer and the lr scheduler
    return trainer


def fairseq_child(args) -> dict:
    """fairseq's row, on ``args.threads`` threads: our first-epoch batches (the same sentences: the
    data-bin holds our pairs in our order) collated by fairseq's dataset, and fairseq's
    ``Trainer.train_step`` timed on them as :func:`child` times ours."""
    import tempfile

    import torch
    from fairseq import __version__

    from nmt_ls.batching import batch_by_tokens
    from nmt_ls.config import load_recipe

    torch.set_num_threads(args.threads)
    cfg = load_recipe(args.recipe, args.overrides)
    t = cfg.train
    with tempfile.TemporaryDirectory(prefix="bench_train_fairseq") as save_dir:  # written only on a crash
        trainer = fairseq_trainer(cfg, args.fairseq_child, save_dir)
        data = trainer.task.dataset("train")
        # fairseq's target sizes count the eos that our tgt_lens leave out
        order = batch_by_tokens(data.src_sizes, data.tgt_sizes - 1, t.max_tokens, seed=t.seed, shuffle=True)
        samples = [data.collater([data[i] for i in idx]) for idx in order[: args.warmup + args.updates]]
        timed = time_updates(lambda sample: trainer.train_step([sample]), samples, args.warmup)
    return {"fairseq": __version__, "threads": torch.get_num_threads(), **timed, **onednn_cache()}


AVX2 = {"ATEN_CPU_CAPABILITY": "avx2", "MKL_ENABLE_INSTRUCTIONS": "AVX2", "ONEDNN_MAX_CPU_ISA": "AVX2"}
BUDGETS = {"slow": 440, "mid": 1900, "fast": 2700}


def variant_overrides(spec: str, out: str) -> tuple[str, list[str]]:
    """``NAME=k=v,k=v`` -> (NAME, overrides), with an out_dir of its own where the tokenizer changes."""
    name, _, rest = spec.partition("=")
    overrides = [kv for kv in rest.split(",") if kv]
    tok = [kv.split("=", 1)[1] for kv in overrides if kv.startswith("tokenizer.")]
    out_dir = out + "".join(f"-{v}" for v in tok)
    return name, [*overrides, f"out_dir={out_dir!r}", "train.num_threads='auto'", "train.amp='none'"]


def run_ladder(args) -> None:
    """Each variant in float32, natively and as AVX2, against the recipe as it is (the first row)."""
    specs = ["recipe=", *args.variant]
    rows = []
    for spec in specs:
        name, overrides = variant_overrides(spec, args.out)
        native = run_child(args, [*args.overrides, *overrides])
        avx2 = run_child(args, [*args.overrides, *overrides], AVX2)
        rows.append((name, spec.partition("=")[2], native, avx2))
    ref_native, ref_avx2 = rows[0][2]["s_per_update"], rows[0][3]["s_per_update"]
    print(f"\n{args.recipe} {' '.join(args.overrides)}: float32, {args.updates} timed updates after {args.warmup}")
    print(
        "| variant | overrides | s/update | x recipe | s/update AVX2 | x recipe AVX2 | peak RSS MB | "
        + " | ".join(f"updates at {k} ({v})" for k, v in BUDGETS.items())
        + " |"
    )
    print("|---" * (7 + len(BUDGETS)) + "|")
    for name, spec, native, avx2 in rows:
        speedup = min(ref_native / native["s_per_update"], ref_avx2 / avx2["s_per_update"])
        counts = " | ".join(f"{round(b * speedup)}" for b in BUDGETS.values())
        print(
            f"| {name} | {spec or '-'} | {native['s_per_update']:.3f} | {ref_native / native['s_per_update']:.2f} | "
            f"{avx2['s_per_update']:.3f} | {ref_avx2 / avx2['s_per_update']:.2f} | "
            f"{max(native['peak_rss_mb'], avx2['peak_rss_mb']):.0f} | {counts} |"
        )


def machine_line() -> str:
    import torch

    from nmt_ls.hardware import cpu_capability, cpu_model, matmul_gflops, native_bf16, usable_cores

    torch.set_num_threads(usable_cores())
    bf16 = "native bf16" if native_bf16(torch.device("cpu")) else "no native bf16"
    return (
        f"CPU: {cpu_model()}, {usable_cores()} cores, torch {torch.__version__} capability {cpu_capability()}, "
        f"{bf16}; fp32 matmul {matmul_gflops(seconds=2.0):.0f} GFLOP/s on {torch.get_num_threads()} threads"
    )


def run_wait_policy(args, base: list[str]) -> None:
    """float32 with libgomp's default wait policy and with PASSIVE, alone and next to a busy process."""
    rows = []
    for neighbour in (False, True):
        for policy in ("default", "PASSIVE"):
            env = {"OMP_WAIT_POLICY": None if policy == "default" else policy}
            r = run_child(args, [*base, "train.amp='none'"], env, neighbour)
            rows.append((policy, "one busy process" if neighbour else "alone", r))
    print("\n| OMP_WAIT_POLICY | machine | s/update | tokens/s | x default alone |")
    print("|---|---|---|---|---|")
    ref = rows[0][2]["tokens_per_s"]
    for policy, where, r in rows:
        ratio = r["tokens_per_s"] / ref
        print(f"| {policy} | {where} | {r['s_per_update']:.3f} | {r['tokens_per_s']:.0f} | {ratio:.2f} |")


def run_precisions(args, base: list[str]) -> None:
    """Ours in float32 (and bf16 autocast where the CPU has it natively), then fairseq's float32
    row on the same batches and threads, unless ``--no-fairseq`` or fairseq is not installed."""
    import torch

    from nmt_ls.hardware import native_bf16

    amps = ["none", "bf16"] if native_bf16(torch.device("cpu")) else ["none"]
    results = [run_child(args, [*base, f"train.amp={amp!r}"]) for amp in amps]
    fairseq = None
    if args.fairseq and importlib.util.find_spec("fairseq") is not None:
        data_bin = fairseq_data_bin(results[0]["train_bin"], args.out)
        mode = ("--fairseq-child", str(data_bin), "--threads", str(results[0]["threads"]))
        env = {"ONEDNN_PRIMITIVE_CACHE_CAPACITY": ONEDNN_CACHE}  # as fairseq-train runs: no nmt-ls setting
        fairseq = run_child(args, [*base, "train.amp='none'"], env, mode=mode)
    print_precisions(args, results, fairseq)
    if len(amps) == 1:
        print("(bf16 not measured: this CPU has no native bf16, where autocast takes 10-70x float32's time)")


def print_precisions(args, results: list[dict], fairseq: dict | None) -> None:
    """The table of :func:`run_precisions`, and ours (float32) against fairseq."""
    print(f"\n{args.recipe} {' '.join(args.overrides)}: {args.updates} timed updates after {args.warmup}")
    print("| run | threads | tokens/s | s/update | peak RSS MB | x float32 | x fairseq tokens/s | x fairseq RSS |")
    print("|---|---|---|---|---|---|---|---|")
    rows = [("float32" if r["amp"] == "none" else "bf16 autocast", r) for r in results]
    rows += [(f"fairseq {fairseq['fairseq']} float32", fairseq)] if fairseq else []
    for name, r in rows:
        ratio = r["tokens_per_s"] / results[0]["tokens_per_s"]
        vs = "- | -"
        if fairseq:
            vs = f"{r['tokens_per_s'] / fairseq['tokens_per_s']:.2f} | {r['peak_rss_mb'] / fairseq['peak_rss_mb']:.2f}"
        print(
            f"| {name} | {r['threads']} | {r['tokens_per_s']:.0f} | {r['s_per_update']:.3f} | "
            f"{r['peak_rss_mb']:.0f} | {ratio:.2f} | {vs} |"
        )
    if not fairseq:
        print("(no fairseq row: --no-fairseq, or fairseq is not installed)")
        return
    ours = results[0]
    same = "the same batches" if ours["tokens"] == fairseq["tokens"] else "DIFFERENT batches (a bug)"
    print(
        f"ours float32 vs fairseq float32: {ours['tokens_per_s'] / fairseq['tokens_per_s']:.2f}x the tokens/s at "
        f"{ours['peak_rss_mb'] / fairseq['peak_rss_mb']:.2f}x the peak RSS; {same} "
        f"({ours['tokens']} and {fairseq['tokens']} target tokens timed); oneDNN primitive cache "
        f"{ours['onednn_cache']} and {fairseq['onednn_cache']}"
    )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("recipe", nargs="?", default=str(ROOT / "recipes" / "lohelp_en_de.yaml"))
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. model.d_model=512")
    p.add_argument("--updates", type=int, default=20, help="timed updates per configuration")
    p.add_argument("--warmup", type=int, default=3, help="untimed updates first")
    p.add_argument("--out", default="runs/bench_train", help="out_dir: the tokenizer and binarized data")
    p.add_argument("--wait-policy", action="store_true", help="measure the OpenMP wait policy instead")
    p.add_argument("--no-fairseq", dest="fairseq", action="store_false", help="no fairseq row")
    p.add_argument(
        "--variant",
        action="append",
        default=[],
        metavar="NAME=k=v,k=v",
        help="a model size to measure against the recipe (float32, native and AVX2); repeatable",
    )
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--fairseq-child", metavar="DATA_BIN", help=argparse.SUPPRESS)
    p.add_argument("--threads", type=int, help=argparse.SUPPRESS)
    args = p.parse_args()
    base = [*args.overrides, f"out_dir={args.out!r}", "train.num_threads='auto'"]
    if args.fairseq_child:
        print(json.dumps(fairseq_child(args)))
        return
    if args.child:
        print(json.dumps(child(args.recipe, args.overrides, args.warmup, args.updates)))
        return
    print(machine_line())
    if args.variant:
        run_ladder(args)
    elif args.wait_policy:
        run_wait_policy(args, base)
    else:
        run_precisions(args, base)


if __name__ == "__main__":
    main()
