"""The exact meta-step, old formulation vs the new defaults vs PyTorch, in ONE process.

    python -m benchmarks.formulations [rounds]

Interleaved rounds (each round runs every variant once), medians: the fair comparison on a
shared, loaded CPU, where separate runs drift. Variants (the ``meta_step`` spec of
``bench_meta``): the old formulation (``lax.conv``, ``reduce_window`` max-pool, rolled
inner loop), the new ``auto`` defaults with ``unroll`` and ``map`` task batching, and
PyTorch's ``autograd`` step with 2 threads and with 1 (spinning OpenMP workers make
PyTorch many times slower when the cores are busy). Ratios are vs torch with 2 threads.
"""
from __future__ import annotations

import sys, time, statistics, os
import flax.linen as nn
from benchmarks import bench_meta, torch_reference as tr
from trm_jax import meta, models


def main(rounds: int = 3) -> None:
    rw = lambda x, window=2, padding="VALID": nn.max_pool(x, (window, window), (window, window), padding=padding)
    orig_pool = models.max_pool
    def build(name, conv, pool, unroll, batching):
        step, args, run, sync = bench_meta.make_jax_meta_step(
            "exact", task_batching=batching, conv_impl=conv, inner_unroll=unroll)
        models.max_pool = rw if pool == "rw" else orig_pool  # traced (compiled) on the first call
        t0 = time.perf_counter(); sync(run()); c = time.perf_counter() - t0
        models.max_pool = orig_pool
        print(f"{name}: compile+first {c:.1f}s", flush=True)
        return lambda: sync(run())
    fns = {
      "old: lax conv, reduce_window pool, rolled inner, unroll tasks": build("old", "lax", "rw", 1, "unroll"),
      "new default (auto): im2col, mask pool, unrolled inner, unroll tasks": build("new", "auto", "new", None, "unroll"),
      "new, map tasks": build("new-map", "auto", "new", None, "map"),
    }
    b = tr.build_torch_meta_step("autograd"); b.step()
    fns["torch.autograd (2 threads)"] = b.step
    tr.set_cpu_threads(1); b1 = tr.build_torch_meta_step("autograd"); b1.step()
    def t1():
        import torch; torch.set_num_threads(1); b1.step(); torch.set_num_threads(2)
    fns["torch.autograd (1 thread)"] = t1
    ts = {k: [] for k in fns}
    for r in range(rounds):  # interleaved rounds
        for k, f in fns.items():
            t0 = time.perf_counter(); f(); ts[k].append(time.perf_counter() - t0)
        print("round", r, os.getloadavg(), flush=True)
    ref = statistics.median(ts["torch.autograd (2 threads)"])
    for k, v in ts.items():
        m = statistics.median(v)
        print(f"| {k} | {m:.3f} | {min(v):.3f}-{max(v):.3f} | {ref/m:.2f}x |")


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 3)
