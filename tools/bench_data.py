"""Binarized (memory-mapped) against in-memory data: encoding throughput, time from a worker's
start to its first training update, and each worker's RSS at that update.

    python tools/bench_data.py                          # 0.3M and 5M pairs, 1 and 2 workers
    python tools/bench_data.py --sizes 300000 --keep    # quick; keep the files under --dir

Corpora ``{dir}/synth{N}.{en,de}`` are made by tools/make_synthetic_corpus.py when missing, and a
sentencepiece model of the recipe's vocabulary size is trained once on 200k sampled sentences
of the smallest one (neither is timed). Then, in this order:

1. Binarization, in a fresh process: ``binarize.open_or_build`` on an empty cache with
   ``--encode-workers`` processes (and with 1 at the smallest size), the recipe's filters;
   pairs/s and sentences/s (2 per pair read) over the whole build, reading and writing
   included; pairs per CPU second (user + sys of the process and its workers: what the wall
   figure would be per free core on a machine that others do not load); peak RSS of the main
   process and of the largest worker (``ru_maxrss``): the input is streamed, never held.
2. Start to first update: ``--workers`` fresh processes (``gloo`` process group when more
   than one) each time from just before the parent starts them (so Python start and imports
   count) to the end of ``optimizer.step()`` of the first update: open the data, batch epoch 0
   (``batch_by_tokens`` + ``shard``), collate the first batch, build the recipe's model,
   criterion and AdamW, forward, backward, step, float32. ``mmap``: ``open_or_build`` on the
   cache of step 1 (``build=False``). ``memory`` (today's path, the reference, smallest size
   only): rank 0 ``read_pairs``, ``broadcast_object_list`` to the others, every worker
   ``binarize.encode_pairs``; the strings stay alive as in the old in-memory ``train.train``. RSS is VmRSS of
   /proc/self/status right after that step (anonymous and file-backed parts shown, the file
   pages of the mapped corpus are shared by the workers), and VmHWM, the peak up to it.
3. Storage: the same ids as an Arrow table through ``datasets`` (``save_to_disk``,
   ``load_from_disk``, memory-mapped) against ``MmapPairs``: write time from the encoded
   arrays, open time, time to get the length arrays, and fetching 200 batches of epoch 0.
4. Batching at the largest size: ``batch_by_tokens`` against the example-at-a-time
   implementation of the base commit (``--base-rev``, read with ``git show``).

Files of sizes over 1M pairs (text and cache) are deleted at the end unless ``--keep``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import resource
import shutil
import subprocess
import sys
import time
import types
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
BASE_REV = "56134da"  # the commit before batching was vectorised


def rss_fields() -> dict:
    """VmRSS, RssAnon, RssFile and VmHWM of this process, in MB."""
    out = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "RssAnon", "RssFile", "VmHWM"):
            out[key] = int(value.split()[0]) / 1024
    return out


# ---- the worker: start -> first update ------------------------------------------------------


def train_split(args, cfg):
    """The train split of ``args.corpus`` with the recipe's filters."""
    from nmt_ls.binarize import CorpusSplit
    from nmt_ls.data import Corpus, PairFilter

    d = cfg.data
    return CorpusSplit(Corpus(args.corpus, d.src_lang, d.tgt_lang), "train", PairFilter(d.max_len, d.max_ratio))


def open_data(args, cfg, tok, rank: int, world_size: int):
    """The training pairs as the chosen path holds them; returns (corpus, what keeps them alive)."""
    from nmt_ls.binarize import Encoding, encode_pairs, open_or_build

    if args.mode == "mmap":
        encoding = Encoding.of(args.spm, cfg.model.max_positions)
        corpus = open_or_build(train_split(args, cfg), encoding, args.cache, build=False)
        return corpus, None
    import torch.distributed as dist

    from nmt_ls.data import read_pairs

    pairs = None
    if rank == 0:
        part = train_split(args, cfg)
        src, tgt = read_pairs(part.corpus, part.split, part.rules)
        pairs = list(zip(src, tgt))
        del src, tgt
    if world_size > 1:
        box = [pairs]
        dist.broadcast_object_list(box, src=0)
        pairs = box[0]
    return encode_pairs(tok, pairs, cfg.model.max_positions), pairs


def first_update(args) -> None:
    import torch
    import torch.distributed as dist
    from torch import nn

    from nmt_ls.batching import batch_by_tokens, shard
    from nmt_ls.config import load_recipe
    from nmt_ls.criterions import build_criterion
    from nmt_ls.model import build_model
    from nmt_ls.optim import build_optimizer
    from nmt_ls.tokenizer import Tokenizer

    marks = {"imports": time.time() - args.t0}
    rank, world_size = int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
    torch.set_num_threads(max(1, 2 // world_size))
    if world_size > 1:
        dist.init_process_group("gloo")
    cfg, tok = load_recipe(args.recipe), Tokenizer(args.spm)
    t = cfg.train
    corpus, _alive = open_data(args, cfg, tok, rank, world_size)
    marks["data"] = time.time() - args.t0
    epoch0 = batch_by_tokens(corpus.src_lens, corpus.tgt_lens, t.max_tokens, seed=t.seed, epoch=0)
    batches = shard(epoch0, rank, world_size)
    batch = corpus.batch(batches[0], tok.pad_id, tok.bos_id, tok.eos_id)
    marks["batched"] = time.time() - args.t0
    torch.manual_seed(t.seed)
    model = build_model(tok.vocab_size, tok.pad_id, **dataclasses.asdict(cfg.model))
    c = cfg.criterion
    criterion = build_criterion(
        c.name,
        pad_id=tok.pad_id,
        label_smoothing=c.label_smoothing,
        smoothing=c.smoothing,
        implementation="fused" if c.implementation == "fused" else "reference",
    )
    optimizer = build_optimizer(model, t.lr, t.betas, t.adam_eps, t.weight_decay)
    ddp = nn.parallel.DistributedDataParallel(model) if world_size > 1 else model
    marks["model"] = time.time() - args.t0
    logits = ddp(batch.src, batch.tgt_in)  # (B, T, V)
    loss = criterion.training_loss(criterion.compute(logits, batch.tgt_out)) / batch.ntokens
    loss.backward()
    optimizer.step()
    marks["first_update"] = time.time() - args.t0
    usage = resource.getrusage(resource.RUSAGE_SELF)
    marks["cpu"] = usage.ru_utime + usage.ru_stime
    print(
        json.dumps(
            {
                "rank": rank,
                "pairs": len(corpus),
                "batches": len(batches),
                "batch_sentences": len(batch),
                "loss": float(loss.detach()),
                **marks,
                **rss_fields(),
            }
        ),
        flush=True,
    )
    if world_size > 1:
        dist.destroy_process_group()


def run_workers(args, mode: str, corpus: Path, cache: Path, spm: Path, world_size: int, port: int) -> list[dict]:
    cmd = [
        sys.executable,
        __file__,
        "--worker",
        mode,
        "--corpus",
        str(corpus),
        "--cache",
        str(cache),
        "--spm",
        str(spm),
        "--recipe",
        str(args.recipe),
    ]
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "WORLD_SIZE": str(world_size),
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(port),
        "PYTHONPATH": str(ROOT),
    }
    t0 = time.time()
    procs = [
        subprocess.Popen(
            [*cmd, "--t0", repr(t0)],
            env={**env, "RANK": str(r), "LOCAL_RANK": str(r)},
            stdout=subprocess.PIPE,
            text=True,
        )
        for r in range(world_size)
    ]
    outs = [p.communicate()[0] for p in procs]
    if any(p.returncode for p in procs):
        sys.exit(f"{mode} worker failed: exit codes {[p.returncode for p in procs]}")
    return [json.loads(o.strip().splitlines()[-1]) for o in outs]


# ---- set-up and the other measurements ------------------------------------------------------


def prepare(args, cfg) -> tuple[dict[int, Path], Path]:
    sys.path.insert(0, str(ROOT / "tools"))
    import make_synthetic_corpus

    from nmt_ls.tokenizer import SpmOptions, train_spm

    args.dir.mkdir(parents=True, exist_ok=True)
    prefixes = {}
    for n in args.sizes:
        prefixes[n] = args.dir / f"synth{n}"
        if not Path(f"{prefixes[n]}.de").exists():
            make_synthetic_corpus.main(["--out", str(prefixes[n]), "-n", str(n)])
    spm = args.dir / f"spm{cfg.tokenizer.vocab_size}.model"
    if not spm.exists():
        small = prefixes[min(args.sizes)]
        train_spm(
            [Path(f"{small}.en"), Path(f"{small}.de")],
            spm.with_suffix(""),
            cfg.tokenizer.vocab_size,
            model_type=cfg.tokenizer.model_type,
            options=SpmOptions(input_sentence_size=200_000),
        )
    return prefixes, spm


def build_cache(args) -> None:
    """The worker of ``bench_binarize``: one build from scratch, timed, with CPU and memory use."""
    from nmt_ls.binarize import Encoding, open_or_build
    from nmt_ls.config import load_recipe

    cfg = load_recipe(args.recipe)
    shutil.rmtree(args.cache, ignore_errors=True)
    start = time.time()
    encoding = Encoding.of(args.spm, cfg.model.max_positions)
    corpus = open_or_build(train_split(args, cfg), encoding, args.cache, num_workers=args.encode_workers)
    seconds = time.time() - start
    main, workers = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    print(
        json.dumps(
            {
                "path": str(corpus.path),
                "seconds": seconds,
                "n_read": corpus.meta["counts"]["n_read"],
                "n_kept": len(corpus),
                "disk_mb": sum(f.stat().st_size for f in corpus.path.iterdir()) / 2**20,
                "cpu_main": main.ru_utime + main.ru_stime,
                "cpu_workers": workers.ru_utime + workers.ru_stime,
                "peak_main_mb": main.ru_maxrss / 1024,
                "peak_worker_mb": workers.ru_maxrss / 1024,
            }
        )
    )


def bench_binarize(args, prefix: Path, cache: Path, spm: Path, num_workers: int) -> dict:
    """Build the cache of ``prefix`` in a fresh process (so its peak RSS is its own)."""
    from nmt_ls.binarize import MmapPairs

    cmd = [
        sys.executable,
        __file__,
        "--worker",
        "binarize",
        "--corpus",
        str(prefix),
        "--cache",
        str(cache),
        "--spm",
        str(spm),
        "--recipe",
        str(args.recipe),
        "--encode-workers",
        str(num_workers),
    ]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
    result = json.loads(out.stdout.strip().splitlines()[-1])
    cpu = result["cpu_main"] + result["cpu_workers"]
    return {
        **result,
        "corpus": MmapPairs(result["path"]),
        "pairs_per_s": result["n_read"] / result["seconds"],
        "sentences_per_s": 2 * result["n_read"] / result["seconds"],
        "pairs_per_cpu_s": result["n_read"] / cpu,
    }


def bench_arrow(corpus, batches: list, folder: Path) -> None:
    import datasets
    import pyarrow as pa
    import pyarrow.compute as pc

    shutil.rmtree(folder, ignore_errors=True)
    start = time.time()
    columns = {
        side: pa.ListArray.from_arrays(pa.array(corpus._offsets[side]), pa.array(corpus._ids[side]))
        for side in ("src", "tgt")
    }
    datasets.Dataset(pa.table(columns)).save_to_disk(str(folder))
    write_s = time.time() - start
    start = time.time()
    ds = datasets.load_from_disk(str(folder))
    open_s = time.time() - start
    start = time.time()
    _ = [pc.list_value_length(ds.data.column(side)).to_numpy() for side in ("src", "tgt")]
    lens_s = time.time() - start
    start = time.time()
    for idx in batches:
        rows = ds[idx.tolist()]
        _ = rows["src"], rows["tgt"]
    arrow_get = (time.time() - start) / len(batches)
    start = time.time()
    for idx in batches:
        _ = corpus.get(idx)
    mmap_get = (time.time() - start) / len(batches)
    mean_bsz = sum(len(b) for b in batches) / len(batches)
    print(f"\nstorage ({len(corpus)} pairs; {len(batches)} batches of epoch 0, mean {mean_bsz:.0f} pairs):")
    print(
        f"  Arrow via datasets: write {write_s:.2f} s (from the encoded arrays), open {open_s:.2f} s, "
        f"lengths {lens_s:.3f} s, get {1e3 * arrow_get:.2f} ms/batch"
    )
    print(f"  MmapPairs:          get {1e3 * mmap_get:.2f} ms/batch -> Arrow / MmapPairs = {arrow_get / mmap_get:.1f}x")
    shutil.rmtree(folder, ignore_errors=True)


def bench_batching(corpus, base_rev: str) -> None:
    from nmt_ls.batching import batch_by_tokens

    try:
        code = subprocess.run(
            ["git", "-C", str(ROOT), "show", f"{base_rev}:nmt_ls/batching.py"],
            check=True,
            capture_output=True,
            text=True,
        ).stdout
    except (OSError, subprocess.CalledProcessError) as err:
        print(f"\nbatching: no reference ({err})")
        return
    base = types.ModuleType("base_batching")
    sys.modules[base.__name__] = base  # dataclasses look their module up
    exec(compile(code, f"{base_rev}:nmt_ls/batching.py", "exec"), base.__dict__)  # noqa: S102 (our own history)
    src_lens, tgt_lens = np.asarray(corpus.src_lens), np.asarray(corpus.tgt_lens)
    start = time.time()
    new = batch_by_tokens(src_lens, tgt_lens, 4000, seed=1, epoch=0)
    new_s = time.time() - start
    start = time.time()
    old = base.batch_by_tokens(src_lens, tgt_lens, 4000, seed=1, epoch=0)
    old_s = time.time() - start
    same = len(new) == len(old) and all(a.tolist() == b for a, b in zip(new, old))
    print(
        f"\nbatching {len(src_lens)} pairs (max_tokens 4000, {len(new)} batches): vectorised {new_s:.2f} s, "
        f"{base_rev} {old_s:.2f} s -> {old_s / new_s:.1f}x faster; identical batches: {same}"
    )


# ---- report ---------------------------------------------------------------------------------


def report(rows: list[tuple], binarized: dict) -> None:
    print(
        f"\nbinarization (whole build: read, filter, encode, write; load average {os.getloadavg()[0]:.1f}); "
        "pairs per CPU second = pairs / (user + sys of the main process and its workers); peak RSS (MB) of the "
        "main process and of the largest worker:"
    )
    for (n, workers), b in binarized.items():
        print(
            f"  {n:>8} pairs, {workers} worker(s): {b['seconds']:6.1f} s {b['pairs_per_s']:7.0f} pairs/s "
            f"{b['sentences_per_s']:7.0f} sentences/s | {b['pairs_per_cpu_s']:6.0f} pairs/CPU s | "
            f"peak {b['peak_main_mb']:.0f} + {b['peak_worker_mb']:.0f} | kept {b['n_kept']}/{b['n_read']}, "
            f"{b['disk_mb']:.0f} MB on disk"
        )
    print(
        f"\nstart -> first update, per worker (load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs). "
        "Seconds from start: imports done, data open, first batch collated, model + AdamW built, first update done; "
        "cpu = user + sys seconds of the worker; MB: RSS = anon + file-backed, peak = VmHWM"
    )
    print(
        f"  {'path':<7}{'pairs':>8}{'workers':>8}{'imports':>8}{'data':>7}{'batch':>7}{'model':>7}{'first':>7}"
        f"{'cpu':>7}{'RSS':>7}{'anon':>7}{'file':>6}{'peak':>7}"
    )
    for mode, n, world_size, results in rows:
        for r in results:
            print(
                f"  {mode:<7}{n:>8}{world_size:>8}{r['imports']:8.1f}{r['data']:7.1f}{r['batched']:7.1f}"
                f"{r['model']:7.1f}{r['first_update']:7.1f}{r['cpu']:7.1f}{r['VmRSS']:7.0f}{r['RssAnon']:7.0f}"
                f"{r['RssFile']:6.0f}{r['VmHWM']:7.0f}  rank {r['rank']}, {r['pairs']} pairs, "
                f"{r['batch_sentences']} in batch"
            )
    by_key = {(mode, n, w): max(r["VmRSS"] for r in res) for mode, n, w, res in rows}
    starts = {(mode, n, w): max(r["first_update"] for r in res) for mode, n, w, res in rows}
    ready = {(mode, n, w): max(r["batched"] for r in res) for mode, n, w, res in rows}
    sizes = sorted({n for _, n, _, _ in rows})
    small, large = sizes[0], sizes[-1]
    print("\nratios (largest RSS of the workers; slowest worker):")
    for w in sorted({w for _, _, w, _ in rows}):
        ref, mm = by_key.get(("memory", small, w)), by_key.get(("mmap", small, w))
        if ref and mm:
            print(
                f"  {w} worker(s), {small} pairs: RSS mmap / memory = {mm / ref:.2f}, "
                f"start mmap / memory = {starts[('mmap', small, w)] / starts[('memory', small, w)]:.2f}, "
                f"first batch ready mmap / memory = {ready[('mmap', small, w)] / ready[('memory', small, w)]:.2f}"
            )
        big = by_key.get(("mmap", large, w))
        if mm and big and large != small:
            print(
                f"  {w} worker(s): RSS mmap {large} / {small} = {big / mm:.2f} (target <= 1.3), {big:.0f} MB "
                f"(target <= 1536), start {starts[('mmap', large, w)]:.1f} s (target <= 30), "
                f"first batch ready {ready[('mmap', large, w)]:.1f} s "
                f"vs {ready[('mmap', small, w)]:.1f} s at {small}"
            )


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--dir", type=Path, default=Path("/work/tmp_bin"), help="corpora, model and caches")
    ap.add_argument("--sizes", type=int, nargs="+", default=[300_000, 5_000_000])
    ap.add_argument("--workers", type=int, nargs="+", default=[1, 2], help="training workers per measurement")
    ap.add_argument("--encode-workers", type=int, default=2, help="binarization processes")
    ap.add_argument("--recipe", type=Path, default=ROOT / "recipes" / "lohelp_en_de.yaml")
    ap.add_argument("--base-rev", default=BASE_REV)
    ap.add_argument("--keep", action="store_true", help="keep files of sizes over 1M pairs")
    ap.add_argument("--worker", choices=["mmap", "memory", "binarize"], help=argparse.SUPPRESS)
    for name in ("--corpus", "--cache", "--spm"):
        ap.add_argument(name, help=argparse.SUPPRESS)
    ap.add_argument("--t0", type=float, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker == "binarize":
        build_cache(args)
        return 0
    if args.worker:
        args.mode = args.worker
        first_update(args)
        return 0

    from nmt_ls.config import load_recipe

    cfg = load_recipe(args.recipe)
    prefixes, spm = prepare(args, cfg)
    binarized, rows, port = {}, [], 29611
    small = min(args.sizes)
    for n in sorted(args.sizes):
        cache = args.dir / f"bin{n}"
        binarized[(n, args.encode_workers)] = bench_binarize(args, prefixes[n], cache, spm, args.encode_workers)
        if n == small and args.encode_workers != 1:
            binarized[(n, 1)] = bench_binarize(args, prefixes[n], cache, spm, 1)
    for n in sorted(args.sizes):
        for world_size in args.workers:
            for mode in ("memory", "mmap") if n == small else ("mmap",):
                port += 1
                rows.append(
                    (
                        mode,
                        n,
                        world_size,
                        run_workers(args, mode, prefixes[n], args.dir / f"bin{n}", spm, world_size, port),
                    )
                )
    report(rows, binarized)
    corpus_small = binarized[(small, args.encode_workers)]["corpus"]
    from nmt_ls.batching import batch_by_tokens

    epoch0 = batch_by_tokens(corpus_small.src_lens, corpus_small.tgt_lens, cfg.train.max_tokens, seed=1, epoch=0)
    bench_arrow(corpus_small, epoch0[:200], args.dir / "arrow")
    bench_batching(binarized[(max(args.sizes), args.encode_workers)]["corpus"], args.base_rev)
    if not args.keep:
        for n in args.sizes:
            if n > 1_000_000:
                for path in (Path(f"{prefixes[n]}.en"), Path(f"{prefixes[n]}.de")):
                    path.unlink(missing_ok=True)
                shutil.rmtree(args.dir / f"bin{n}", ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
