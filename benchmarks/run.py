"""Every benchmark in one process, one table: ``python -m benchmarks.run``.

    python -m benchmarks.run --quick                        # < 5 min on 2 CPU cores
    python -m benchmarks.run --device-label "H100 80GB" --out benchmarks/results/h100.json

Benches (synthetic CIFAR-shaped data, so it runs anywhere, TFDS or not):
``meta_step``, ``meta_step_scaling``, ``sim_attack_step`` (digits-shaped), ``attack_sweep``, ``train_epoch``,
``distill_epoch``, ``seed_sharding`` (CPU only), and the PyTorch reference of each
where torch is installed (``pip install -e '.[bench]'``). Every JAX function is
warmed up (compiled) first and synchronised with ``block_until_ready`` before
the clock is read. Ratios: ``reference time / impl time`` (> 1 = faster).
"""
from __future__ import annotations

import argparse
import sys
import time
from typing import Callable

import jax

from benchmarks import harness

BENCHES = ("meta_step", "meta_step_scaling", "sim_attack_step", "attack_sweep", "train_epoch",
           "distill_epoch", "seed_sharding", "paper_e2e")
#: Not in the default selection (minutes to hours): ask for them with --bench.
ON_REQUEST = ("paper_e2e",)
# Ratios are against PyTorch where it ran, else against the plain-JAX alternative.
TORCH_REFERENCE = {"meta_step": "torch best (2nd order)", "attack_sweep": "torch natural",
                   "train_epoch": "torch", "distill_epoch": "torch"}
JAX_REFERENCE = {"attack_sweep": "jax per-run loop", "train_epoch": "jax step",
                 "distill_epoch": "jax step", "meta_step_scaling": "K=1",
                 "sim_attack_step": "K=5",
                 "seed_sharding": "4 seeds on 1 CPU device(s)", "paper_e2e": "cold"}


def jax_benches(quick: bool, warmup: int, repeats: int, e2e_size: str = "auto",
                e2e_seeds: int = 5) -> dict[str, Callable[[], list]]:
    from benchmarks import (bench_meta, bench_paper_e2e, bench_sharding, bench_simulated_attack,
                            bench_train)

    size = e2e_size if e2e_size != "auto" else (
        "tiny" if quick or jax.default_backend() == "cpu" else "paper")

    out = {
        # seconds per call on a CPU: one timed call each in --quick keeps it under 5 minutes
        "meta_step": lambda: bench_meta.bench_meta_step(quick, warmup, 1 if quick else repeats),
        "meta_step_scaling": lambda: bench_meta.bench_meta_step_scaling(quick, warmup, min(repeats, 2)),
        "sim_attack_step": lambda: bench_simulated_attack.bench_simulated_attack_step(
            quick, warmup, repeats),
        "train_epoch": lambda: bench_train.bench_train_throughput(quick, warmup, repeats),
        "seed_sharding": lambda: bench_sharding.bench_seed_sharding(quick),
        "paper_e2e": lambda: bench_paper_e2e.bench_paper_e2e(size, e2e_seeds),
    }
    try:
        from benchmarks import bench_attack
        out["attack_sweep"] = lambda: bench_attack.bench_attack_sweep(quick)
    except ImportError as err:
        print(f"note: attack_sweep skipped ({err})")
    try:
        from benchmarks import bench_skd
        out["distill_epoch"] = lambda: bench_skd.bench_distill_throughput(quick)
    except ImportError as err:
        print(f"note: distill_epoch skipped ({err})")
    return out


def main(argv: list[str] | None = None) -> list[harness.Row]:
    p = argparse.ArgumentParser(prog="python -m benchmarks.run", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="smaller sizes and fewer repeats")
    p.add_argument("--device-label", default=None, help="e.g. 'H100 80GB HBM3' (goes in the JSON)")
    p.add_argument("--out", default=None, help="write rows + machine info as JSON here")
    p.add_argument("--bench", action="append", choices=BENCHES, help="repeatable; default: all")
    p.add_argument("--no-torch", action="store_true", help="skip the PyTorch reference")
    p.add_argument("--e2e-size", choices=("auto", "tiny", "reduced", "paper"), default="auto",
                   help="paper_e2e data and budgets (auto: paper on a GPU/TPU, tiny on CPU)")
    p.add_argument("--e2e-seeds", type=int, default=5)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--repeats", type=int, default=None, help="default 3 (2 with --quick)")
    args = p.parse_args(argv)
    repeats = args.repeats or (2 if args.quick else 3)
    selected = args.bench or [b for b in BENCHES if b not in ON_REQUEST
                              and (b != "seed_sharding" or jax.default_backend() == "cpu")]
    info = harness.machine_info(args.device_label)
    print(f"machine: {info.get('cpu_model')} x{info.get('cpu_count')}, backend "
          f"{jax.default_backend()}, device {info.get('device_kind')}", flush=True)
    start = time.perf_counter()
    rows: list[harness.Row] = []
    benches = jax_benches(args.quick, args.warmup, repeats, args.e2e_size, args.e2e_seeds)
    for name in selected:
        if name in benches:
            t0 = time.perf_counter()
            new = benches[name]()
            rows += new
            print(harness.format_table(new), f"\n({name}: {time.perf_counter() - t0:.0f}s)\n", flush=True)
    torch_rows = []
    if not args.no_torch:
        try:
            from benchmarks import torch_reference
        except ImportError as err:
            print(f"note: PyTorch reference skipped (torch not installed: {err}); "
                  "pip install -e '.[bench]' to compare")
        else:
            wanted = [b for b in selected if b in torch_reference.QUICK]
            if wanted:
                torch_rows = torch_reference.run_all(args.quick, wanted, args.warmup, repeats)
    rows += torch_rows
    have = {(r.bench, r.impl) for r in rows}
    refs = {b: TORCH_REFERENCE[b] if (b, TORCH_REFERENCE.get(b)) in have else JAX_REFERENCE.get(b)
            for b in {r.bench for r in rows}}
    for r in rows:
        r.ratio, r.reference = None, None
    harness.add_ratios(rows, {b: i for b, i in refs.items() if i})
    rows.sort(key=lambda r: (BENCHES.index(r.bench) if r.bench in BENCHES else 99))
    print("\n" + harness.format_table(rows))
    print(f"\ntotal {time.perf_counter() - start:.0f}s")
    if args.out:
        harness.write_json(rows, args.out, {**info, "quick": args.quick, "command": " ".join(sys.argv)})
        print(f"wrote {args.out}")
    return rows


if __name__ == "__main__":
    main()
