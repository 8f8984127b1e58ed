"""``paper_e2e``: the whole paper end to end, cold and warm compilation cache.

Runs ``experiments.compare`` (every method, the attack suite, 5 seeds by default)
on SYNTHETIC CIFAR-shaped data (random ``uint8[N, 32, 32, 3]`` images, random
labels, registered as a dataset through :mod:`trm_jax.datasets`), twice, each in
a fresh process: *cold* with an empty persistent compilation cache, *warm* with
the cache the cold run filled. Reports wall time and the compile share
(``results.json``'s ``compilation``). The data is random: these are timings,
never accuracy results.

Sizes: ``paper`` = the paper's split (40,000 pre-training / 10,000 fine-tuning /
10,000 test) and budgets (20 epochs, 2,000 meta-steps, 10 attack epochs), for a
GPU; ``reduced`` = 2,000 / 500 / 500 images, 2 epochs, 20 meta-steps, 4 attack
epochs; ``tiny`` (the CPU default) = 1,200 / 200 / 200 images, 1 epoch, 4 meta-steps, 4 attack
epochs: every phase and compiled program of the paper run with little arithmetic.

    python -m benchmarks.run --bench paper_e2e --e2e-size paper --device-label "H100"
    python -m benchmarks.bench_paper_e2e --size tiny                  # standalone, CPU
"""
from __future__ import annotations

import argparse
import json
import os
import pathlib
import subprocess
import sys
import tempfile
import time

SIZES = {
    "paper": dict(train=50_000, test=10_000, pretrain=40_000, epochs=20, meta_steps=2000,
                  attack_epochs=10, distill_epochs=20),
    "reduced": dict(train=2_500, test=500, pretrain=2_000, epochs=2, meta_steps=20,
                    attack_epochs=4, distill_epochs=2),
    # The CPU preset: every phase and program of the paper run, little arithmetic (the
    # "reduced" size did not finish in 18 minutes on 2 shared cores).
    "tiny": dict(train=1_400, test=200, pretrain=1_200, epochs=1, meta_steps=4,
                 attack_epochs=4, distill_epochs=1),
}
DATASET = "synthetic_cifar"


def register(size: str) -> None:
    """Registers the synthetic CIFAR-shaped dataset of ``size`` (timing only)."""
    import numpy as np

    from trm_jax import datasets

    spec = SIZES[size]

    def loader(split: str, data_dir: str | None):
        n = spec["train"] if split == "train" else spec["test"]
        rng = np.random.default_rng(0 if split == "train" else 1)
        return (rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8),
                rng.integers(0, 10, (n,), dtype=np.int32))

    datasets.register(datasets.DatasetEntry(
        DATASET, "", (32, 32, 3), 10, pretrain_size=spec["pretrain"], offline=True,
        epochs=spec["epochs"], attack_epochs=spec["attack_epochs"],
        overrides={"reverse_maml": {"meta_steps": spec["meta_steps"]},
                   "skd": {"distill.epochs": spec["distill_epochs"]},
                   # tiny: UNSIR's scaled-down stages (the digits preset), not CIFAR's
                   **({"unsir": {"unsir": "trm_jax.unlearning:DIGITS_CONFIG"}}
                      if size == "tiny" else {})},
        loader=loader), replace=True)


def child(size: str, seeds: int, workdir: str) -> dict:
    """One compare run in this process; returns its wall time and compile statistics."""
    register(size)
    from experiments import compare

    start = time.perf_counter()
    results = compare.main(["--dataset", DATASET, "--seeds", str(seeds), "--workdir", workdir,
                            "--no-progress"])
    return {"wall_seconds": time.perf_counter() - start, "compilation": results["compilation"],
            "failed": results["failed"]}


def run(size: str = "tiny", seeds: int = 5, cache_dir: str | None = None) -> dict[str, dict]:
    """Cold then warm, each in a fresh process: ``{"cold": {...}, "warm": {...}}``."""
    root = pathlib.Path(tempfile.mkdtemp(prefix="paper_e2e-"))
    env = {**os.environ, "TRM_JAX_CACHE_DIR": cache_dir or str(root / "cache")}
    env.pop("TRM_JAX_NO_COMPILE_CACHE", None)
    out = {}
    for phase in ("cold", "warm"):
        proc = subprocess.run(
            [sys.executable, "-m", "benchmarks.bench_paper_e2e", "--child", "--size", size,
             "--seeds", str(seeds), "--workdir", str(root / phase)],
            env=env, capture_output=True, text=True, cwd=pathlib.Path(__file__).parents[1])
        if proc.returncode != 0:
            raise RuntimeError(f"paper_e2e {phase} run failed:\n{proc.stderr[-3000:]}")
        out[phase] = json.loads(proc.stdout.strip().splitlines()[-1])
    return out


def bench_paper_e2e(size: str = "tiny", seeds: int = 5) -> list:
    """Rows for ``benchmarks.run``: cold and warm wall time (ratio: cold / warm)."""
    from benchmarks import harness

    measured = run(size, seeds)
    rows = []
    for phase, m in measured.items():
        c = m["compilation"]
        rows.append(harness.Row(
            "paper_e2e", phase, m["wall_seconds"], m["wall_seconds"], m["wall_seconds"], "s/run",
            extra={"size": size, "seeds": seeds, "compile_seconds": c["compile_seconds"],
                   "compile_share": c["compile_share"], "compilations": c["compilations"],
                   "cache_hits": c["cache_hits"], "synthetic_data": True}))
    return rows


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m benchmarks.bench_paper_e2e", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", choices=sorted(SIZES), default="tiny")
    p.add_argument("--seeds", type=int, default=5)
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--workdir", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        print(json.dumps(child(args.size, args.seeds, args.workdir)))
        return
    for phase, m in run(args.size, args.seeds).items():
        c = m["compilation"]
        print(f"{phase}: {m['wall_seconds']:.1f} s wall, {c['compilations']} compilations "
              f"({c['cache_hits']} from the cache), compile {c['compile_seconds']:.1f} s "
              f"= {100 * c['compile_share']:.0f}% of the run")


if __name__ == "__main__":
    main()
