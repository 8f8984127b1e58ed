"""The simulated-attack meta-step: time and compiled memory vs inner steps, with/without remat.

    python -m benchmarks.bench_simulated_attack [--quick] [--steps 5 20 50]

One outer step of :func:`trm_jax.methods.simulated_attack.make_step` (exact second order),
one seed, digits shapes (lenet on 8x8x1, SAME padding; 5 beneficial / 5 malicious
classes), every bad task attacked by Adam fine-tuning ALL parameters with a fresh head
(the heaviest attacker of the space) for ``K`` full-batch steps: 2 bad tasks of 5 x 10
support + 5 x 10 query images, a beneficial batch of 64, feature anchor on. Synthetic
random images (timing only, not a result). ``compiled_temp_bytes`` is XLA's planned
scratch memory for the step (no run needed): it grows with ``K`` without remat, and
remat keeps one params copy per step instead of every activation. ``lower_compile_s``:
the seconds to trace, lower and compile the step (the memory analysis's compile).
"""
from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

from benchmarks import harness
from trm_jax import compilation, models, tasks
from trm_jax import simulated_attack as sa
from trm_jax.methods import simulated_attack as method

STEPS = (5, 20, 50)


def setup(seed: int = 0):
    """``(model, params, (ben_x, ben_y, bad_pool), anchor)`` on the device, digits-shaped."""
    rng = np.random.default_rng(seed)
    model = models.lenet(5, (8, 8, 1), padding="SAME")
    ben_x = rng.integers(0, 256, (400, 8, 8, 1), dtype=np.uint8)
    ben_y = rng.integers(0, 5, (400,)).astype(np.int32)
    mal_x = rng.integers(0, 256, (400, 8, 8, 1), dtype=np.uint8)
    pool = tasks.group_by_class(mal_x, np.arange(400) % 5, 5)
    params = model.init(jax.random.key(seed))
    data = jax.device_put((ben_x, ben_y, pool))
    return model, params, data, params["features"]


def bench_simulated_attack_step(quick: bool = False, warmup: int = 1, repeats: int = 3,
                                steps: tuple[int, ...] | None = None,
                                mix: bool = True) -> list[harness.Row]:
    """Rows ``K=k`` and ``K=k remat`` (Adam only) and, with ``mix``, ``K=k mix``: the
    attacker's optimizer drawn from sgd/momentum/adam (the ``lax.switch`` program the
    method compiles), lr from 1e-4..1e-1: what sampling optimizers costs in compile and
    step time."""
    steps = steps or ((5, 20) if quick else STEPS)
    model, params, (ben_x, ben_y, pool), anchor = setup()
    optimizer = optax.adam(1e-3)
    opt_state = optimizer.init(params)
    key = jax.random.key(1)
    rows = []
    variants = [("adam",), ("adam", "remat")] + ([("mix",)] if mix else [])
    for k in steps:
        for variant in variants:
            remat = "remat" in variant
            opts, lrs = (sa.OPTIMIZERS, (1e-4, 1e-1)) if "mix" in variant else (("adam",), (1e-2, 1e-2))
            space = sa.AttackerSpace(optimizers=opts, learning_rates=lrs, steps=k,
                                     top_layers=(4,), data_per_class=(10,))
            config = method.SimulatedAttackConfig(attacker=space, remat=remat, bad_tasks=2)
            step = compilation.jit(method.make_step(config, model, 5, 1e-3))
            args = (params, opt_state, key, ben_x, ben_y, pool, anchor, jnp.asarray([1.0, 1.0]))
            t0 = time.perf_counter()
            memory = harness.compiled_memory_stats(step, *args)  # lowers and compiles
            compile_s = time.perf_counter() - t0
            timing = harness.time_fn(lambda: step(*args), warmup=warmup,
                                     repeats=1 if (quick or k >= 50) else repeats,
                                     sync=jax.block_until_ready)
            rows.append(harness.Row.from_timing(
                "sim_attack_step", f"K={k}" + "".join(f" {v}" for v in variant[1:] if v)
                + (" mix" if "mix" in variant else ""), timing,
                extra={"compiled_temp_bytes": memory["temp"], "inner_steps": k, "remat": remat,
                       "lower_compile_s": compile_s}))
            print(harness.format_table(rows[-1:]), flush=True)
    return rows


def main(argv: list[str] | None = None) -> list[harness.Row]:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--steps", type=int, nargs="+", default=None)
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    rows = harness.add_ratios(bench_simulated_attack_step(args.quick, steps=args.steps),
                              f"K={(args.steps or STEPS)[0]}")
    print(harness.format_table(rows))
    if args.json:
        harness.write_json(rows, args.json, harness.machine_info())
    return rows


if __name__ == "__main__":
    main()
