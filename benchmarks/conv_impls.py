"""CPU convolution formulations (``models.resolve_conv_impl``) inside training, timed.

    python -m benchmarks.conv_impls [--rounds 3] [--quick]

Two tables, medians of interleaved rounds in one process (synthetic data: timing only):

* ``seeds``: one epoch of ``train.fit``'s compiled programs with 3 vmapped seeds, per
  ``conv_impl`` (``lax``, ``toeplitz``, ``im2col``) and strategy (``step``: one jitted call
  per step; ``scan``: the epoch as one ``lax.scan``), for lenet on digits 8x8x1, lenet
  on 32x32x3 and conv4 on 28x28x1.
* ``blocks``: lenet 32x32x3's scanned epoch (one seed, batch 128) per ``toeplitz_block``
  choice for conv1 (28 output columns) and conv2 (10).

What ``auto`` picks on CPU (banded up to 16 output channels, im2col above, the scan) was
chosen from these (BENCHMARKS.md).
"""
from __future__ import annotations

import argparse
import functools
import itertools
import time
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax

from benchmarks import harness
from trm_jax import compilation, models, train

IMPLS = ("lax", "toeplitz", "im2col")
SEED_CASES = {  # name: (model factory, batch size, images per epoch)
    "lenet digits 8x8x1": (lambda impl: models.lenet(10, (8, 8, 1), "SAME", conv_impl=impl), 32, 800),
    "lenet 32x32x3": (lambda impl: models.lenet(10, conv_impl=impl), 128, 1280),
    "conv4 28x28x1": (lambda impl: models.conv4(5, (28, 28, 1), conv_impl=impl), 32, 640),
}


def _interleaved_ms(fns: dict[str, Callable[[], object]], rounds: int) -> dict[str, float]:
    """Median ms of one call of each function, over ``rounds`` interleaved rounds."""
    for fn in fns.values():  # compile
        jax.block_until_ready(fn())
    samples = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            start = time.perf_counter()
            jax.block_until_ready(fn())
            samples[name].append(1e3 * (time.perf_counter() - start))
    return {name: float(np.median(v)) for name, v in samples.items()}


def seeds_table(rounds: int, num_seeds: int = 3) -> dict[str, dict[str, float]]:
    """``{case: {"impl/strategy": ms per epoch}}``, seeds vmapped as ``train.fit`` does."""
    optimizer = optax.adam(1e-3)
    table = {}
    for case, (make, batch_size, n) in SEED_CASES.items():
        fns = {}
        for impl in IMPLS:
            model = make(impl)
            keys = jax.random.split(jax.random.key(0), num_seeds)
            state = jax.vmap(train.init_state, in_axes=(0, 0, None))(
                keys, model.init_seeds(keys), optimizer)
            rng = np.random.default_rng(0)
            data = (jnp.asarray(rng.integers(1, 255, (n, *model.input_shape)), jnp.uint8),
                    jnp.asarray(rng.integers(0, model.num_classes, n), jnp.int32))
            loss_fn = train.classification_loss(model.apply)
            epoch = train._compiled_epoch(loss_fn, optimizer, batch_size, None)
            step = train._compiled_step(loss_fn, optimizer, None)
            fns[f"{impl}/scan"] = functools.partial(epoch, state, data)
            fns[f"{impl}/step"] = functools.partial(train._epoch_by_steps, step, state, data, n,
                                                    batch_size)
        table[case] = _interleaved_ms(fns, rounds)
    return table


def blocks_table(rounds: int, conv1=(4, 7, 14), conv2=(2, 5, 10)) -> dict[str, float]:
    """``{"conv1 block, conv2 block": ms per step}`` of lenet 32x32x3's scanned epoch."""
    images, labels = harness.synthetic_cifar(0, 1280)
    data = (jax.device_put(images), jax.device_put(labels))
    optimizer, key = optax.adam(1e-3), jax.random.key(0)
    fns, chosen = {}, models.toeplitz_block
    try:
        for b1, b2 in itertools.product(conv1, conv2):
            # the block rule is read while tracing: trace each variant under its own rule
            models.toeplitz_block = lambda width, channels, b1=b1, b2=b2: {28: b1, 10: b2}[width]
            model = models.lenet(10, conv_impl="toeplitz")
            state = train.init_state(key, jax.jit(model.init)(key), optimizer)
            epoch = compilation.jit(functools.partial(
                train.train_epoch, loss_fn=train.classification_loss(model.apply),
                optimizer=optimizer, batch_size=128))
            epoch.lower(state, data)
            fns[f"{b1}, {b2}"] = functools.partial(epoch, state, data)
            jax.block_until_ready(fns[f"{b1}, {b2}"]())  # compile under this rule
    finally:
        models.toeplitz_block = chosen
    return {name: ms / 10 for name, ms in _interleaved_ms(fns, rounds).items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="2 rounds, digits case and 2 blocks only")
    args = parser.parse_args()
    rounds = 2 if args.quick else args.rounds
    if args.quick:
        SEED_CASES.pop("lenet 32x32x3"), SEED_CASES.pop("conv4 28x28x1")
    info = harness.machine_info()
    print(f"{info.get('cpu_model')} x{info.get('cpu_count')}, jax {info.get('jax_version')}, "
          f"backend {info.get('jax_backend')}")
    print("\n| 3 vmapped seeds, ms per epoch | " + " | ".join(f"{i}/{s}" for i in IMPLS
                                                          for s in ("step", "scan")) + " |")
    print("|---" * (1 + 2 * len(IMPLS)) + "|")
    for case, row in seeds_table(rounds).items():
        print(f"| {case} | " + " | ".join(f"{row[f'{i}/{s}']:.0f}" for i in IMPLS
                                          for s in ("step", "scan")) + " |")
    blocks = blocks_table(rounds, *(((7,), (5, 10)) if args.quick else ()))
    print("\n| conv1, conv2 blocks | ms per step (scanned epoch, lenet 32x32x3, batch 128) |")
    print("|---|---|")
    for name, ms in sorted(blocks.items(), key=lambda kv: kv[1]):
        print(f"| {name} | {ms:.2f} |")


if __name__ == "__main__":
    main()
