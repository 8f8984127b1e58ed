"""``attack_sweep``: the linear-probe attack over seeds x learning rates, one program vs a loop.

Spec (the same as ``torch_reference.make_torch_attack_sweep``): the paper's LeNet
(VALID padding) with random frozen features on CIFAR-shaped synthetic data
(random uint8 32x32x3 images, 5 random classes: timing only, never results),
5 seeds x 4 learning rates (1e-4 .. 1e-1), Adam (b1 0.9), 5 epochs over 5,000
images in batches of 64, test accuracy on 5,000 images before fine-tuning and
after every epoch. One timed call = the whole sweep (20 attacks).

Implementations (all in this process, all compiled before timing):

* ``jax vmap (one program)`` -- :func:`trm_jax.attacks.attack_sweep`: one jitted
  program, ``vmap`` over seeds and learning rates, features computed once per seed.
* ``jax per-run loop`` -- the reference: a Python loop over (seed, lr) calling
  the same single-run attack (:func:`trm_jax.attacks.make_attack`) jitted alone.
* ``jax vmap, features not precomputed`` (``--quick`` or ``--unprecomputed``) -- the one program
  with the frozen features masked out of the optimizer instead of precomputed:
  what the precomputation saves.

    python -m benchmarks.bench_attack [--quick]
"""
from __future__ import annotations

import argparse
import dataclasses

import jax
import jax.numpy as jnp

from benchmarks import harness
from trm_jax import attacks as attack, compilation, models

BENCH = "attack_sweep"
FULL = dict(seeds=5, learning_rates=(1e-4, 1e-3, 1e-2, 1e-1), epochs=5, n_train=5000,
            n_test=5000, batch_size=64, num_classes=5)
QUICK = dict(FULL, seeds=2, learning_rates=(1e-3, 1e-1), epochs=2, n_train=640, n_test=500)


def make_problem(seeds: int, learning_rates, epochs: int, n_train: int, n_test: int,
                 batch_size: int, num_classes: int, precompute_features: bool = True):
    """``(model, params[S], keys[S], lrs, data, config)`` for the spec (setup, untimed)."""
    model = models.lenet(10, (32, 32, 3), "VALID")
    keys = jax.vmap(jax.random.key)(jnp.arange(seeds))
    params = model.init_seeds(keys)
    xtr, ytr = harness.synthetic_cifar(0, n_train, num_classes)
    xte, yte = harness.synthetic_cifar(1, n_test, num_classes)
    data = attack.AttackData(*(jax.device_put(a) for a in (xtr, ytr, xte, yte)))
    config = attack.AttackConfig("linear_probe", num_classes, "adam", epochs, batch_size,
                                 precompute_features=precompute_features)
    return model, params, keys, tuple(learning_rates), data, config


def make_vmapped(spec: dict, precompute_features: bool = True):
    """The whole sweep as one compiled program: ``run() -> curves f32[L, S, E+1]``."""
    model, params, keys, lrs, data, config = make_problem(**spec, precompute_features=precompute_features)
    return lambda: attack.attack_sweep(model, params, keys, lrs, data, config, batching="vmap").curve


def make_looped(spec: dict):
    """A Python loop over (lr, seed) of the jitted single-run attack (same maths)."""
    model, params, keys, lrs, data, config = make_problem(**spec)
    one = compilation.jit(attack.make_attack(model, config))
    per_seed = [jax.device_put(jax.tree.map(lambda x: x[s], params), jax.devices()[0])
                for s in range(keys.shape[0])]
    lr_values = [jnp.float32(lr) for lr in lrs]

    def run():
        return [[one(per_seed[s], keys[s], lr, data).curve for s in range(len(per_seed))]
                for lr in lr_values]
    return run


def bench_attack_sweep(quick: bool = False, warmup: int = 1, repeats: int | None = None, *,
                       unprecomputed: bool | None = None) -> list[harness.Row]:
    """Rows for the one-program sweep and the per-run loop (``s/sweep``, ratio vs the loop).

    Args:
      quick: the small :data:`QUICK` spec instead of :data:`FULL`.
      unprecomputed: also time the sweep with features masked instead of
        precomputed (default: only with ``quick``; at full size it runs the
        frozen convs on every step: ~10 min per call on 2 CPU cores).
    """
    spec = QUICK if quick else FULL
    repeats = repeats or (2 if quick else 3)
    unprecomputed = quick if unprecomputed is None else unprecomputed
    runs = len(spec["learning_rates"]) * spec["seeds"]
    impls = [("jax vmap (one program)", make_vmapped(spec)), ("jax per-run loop", make_looped(spec))]
    if unprecomputed:
        impls.append(("jax vmap, features not precomputed", make_vmapped(spec, precompute_features=False)))
    rows = []
    for impl, run in impls:
        timing = harness.time_fn(run, warmup=warmup, repeats=repeats, sync=jax.block_until_ready)
        rows.append(harness.Row.from_timing(BENCH, impl, timing, unit="s/sweep",
                                            extra={"runs_per_sweep": runs, **spec}))
    return harness.add_ratios(rows, "jax per-run loop")


def main(argv: list[str] | None = None) -> list[harness.Row]:
    p = argparse.ArgumentParser(prog="python -m benchmarks.bench_attack", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help=f"small sizes: {QUICK}")
    p.add_argument("--repeats", type=int, default=None)
    p.add_argument("--unprecomputed", action="store_true",
                   help="also time the sweep without precomputed features (slow at full size)")
    p.add_argument("--json", default=None, help="write rows + machine info here")
    args = p.parse_args(argv)
    rows = bench_attack_sweep(args.quick, repeats=args.repeats,
                              unprecomputed=True if args.unprecomputed else None)
    info = harness.machine_info()
    print(f"{info['device_label']}, jax {info.get('jax_version')}")
    print(harness.format_table(rows))
    if args.json:
        harness.write_json(rows, args.json, {"quick": args.quick})
    return rows


if __name__ == "__main__":
    main()
