"""Training speed and memory of a recipe's model and batches, per precision, on this machine.

    python tools/bench_train.py [RECIPE] [k=v ...] [--updates N] [--warmup N] [--wait-policy]

Each configuration runs in a process of its own (so its peak RSS is its own): the recipe's
set-up (tokenizer and binarized data, built once in ``--out``), then ``warmup`` untimed and
``updates`` timed updates (forward, backward, Adam) on the first batches of the first epoch,
the same batches for every configuration. Printed: the CPU (model, torch's capability, native
bf16 or not), fp32 matmul GFLOP/s on the run's threads, and per configuration target tokens/s,
seconds per update, peak RSS and tokens/s as a ratio of float32's in the same run.

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
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

# as the nmt-ls command sets it before torch loads (nmt_ls/__main__.py); the wait policy is measured
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
    for sample in samples[:warmup]:
        trainer.train_step([sample])
    start, tokens = time.perf_counter(), 0.0
    for sample in samples[warmup:]:
        tokens += trainer.train_step([sample])["ntokens"]
    seconds = time.perf_counter() - start
    return {
        "amp": t.amp,
        "threads": torch.get_num_threads(),
        "tokens_per_s": tokens / seconds,
        "s_per_update": seconds / updates,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }


def run_child(args, overrides: list[str], env: dict | None = None, neighbour: bool = False) -> dict:
    cmd = [sys.executable, __file__, args.recipe, *overrides, "--child", "--updates", str(args.updates)]
    cmd += ["--warmup", str(args.warmup)]
    busy = subprocess.Popen([sys.executable, "-c", BUSY]) if neighbour else None
    try:
        child_env = {k: v for k, v in {**os.environ, **(env or {})}.items() if v is not None}  # None: unset
        out = subprocess.run(cmd, env=child_env, capture_output=True, text=True, check=True)
    except subprocess.CalledProcessError as e:
        sys.exit(f"bench_train: {' '.join(overrides)} failed:\n{e.stderr[-3000:]}")
    finally:
        if busy:
            busy.kill()
    return json.loads(out.stdout.strip().splitlines()[-1])


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


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("recipe", nargs="?", default=str(ROOT / "recipes" / "lohelp_en_de.yaml"))
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. model.d_model=512")
    p.add_argument("--updates", type=int, default=20, help="timed updates per configuration")
    p.add_argument("--warmup", type=int, default=3, help="untimed updates first")
    p.add_argument("--out", default="runs/bench_train", help="out_dir: the tokenizer and binarized data")
    p.add_argument("--wait-policy", action="store_true", help="measure the OpenMP wait policy instead")
    p.add_argument(
        "--variant",
        action="append",
        default=[],
        metavar="NAME=k=v,k=v",
        help="a model size to measure against the recipe (float32, native and AVX2); repeatable",
    )
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    base = [*args.overrides, f"out_dir={args.out!r}", "train.num_threads='auto'"]
    if args.child:
        print(json.dumps(child(args.recipe, args.overrides, args.warmup, args.updates)))
        return
    print(machine_line())
    if args.variant:
        run_ladder(args)
        return
    import torch

    from nmt_ls.hardware import native_bf16

    if args.wait_policy:
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
        return
    amps = ["none", "bf16"] if native_bf16(torch.device("cpu")) else ["none"]
    results = [run_child(args, [*base, f"train.amp={amp!r}"]) for amp in amps]
    print(f"\n{args.recipe} {' '.join(args.overrides)}: {args.updates} timed updates after {args.warmup}")
    print("| precision | threads | tokens/s | s/update | peak RSS MB | x float32 |")
    print("|---|---|---|---|---|---|")
    for r in results:
        name = "float32" if r["amp"] == "none" else "bf16 autocast"
        ratio = r["tokens_per_s"] / results[0]["tokens_per_s"]
        print(
            f"| {name} | {r['threads']} | {r['tokens_per_s']:.0f} | {r['s_per_update']:.3f} | "
            f"{r['peak_rss_mb']:.0f} | {ratio:.2f} |"
        )
    if len(amps) == 1:
        print("(bf16 not measured: this CPU has no native bf16, where autocast takes 10-70x float32's time)")


if __name__ == "__main__":
    main()
