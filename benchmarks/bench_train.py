"""``train_throughput``: supervised LeNet training images/s, per-step jit vs epoch-as-scan.

Spec: the paper's LeNet on CIFAR-shaped synthetic data (random uint8 images,
random labels), batch 128, Adam 1e-3, one epoch per timed call.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import optax

from benchmarks import harness
from trm_jax import compilation, models, train


def make_jax_train_epoch(strategy: str, n_images: int = 5120, batch_size: int = 128):
    """``(run, sync, images_per_call)`` for one epoch with ``strategy`` "step" or "scan"."""
    images, labels = harness.synthetic_cifar(0, n_images)
    data = (jax.device_put(images), jax.device_put(labels))
    model = models.lenet(10)
    optimizer = optax.adam(1e-3)
    loss_fn = train.classification_loss(model.apply)
    key = jax.random.key(0)
    state = train.init_state(key, model.init(key), optimizer)
    steps = n_images // batch_size
    if strategy == "scan":
        epoch = compilation.jit(functools.partial(train.train_epoch, loss_fn=loss_fn, optimizer=optimizer,
                                          batch_size=batch_size))
        def run():
            nonlocal state
            state, metrics = epoch(state, data)
            return state.params
    else:
        step = compilation.jit(functools.partial(train.train_step, loss_fn=loss_fn, optimizer=optimizer))
        batches = compilation.jit(train.epoch_batches, static_argnums=(1, 2))
        def run():
            nonlocal state
            idx = batches(state.key, n_images, batch_size)
            for i in range(steps):
                batch = jax.tree.map(lambda a: a[idx[i]], data)
                state, _ = step(state, batch)
            return state.params
    return run, jax.block_until_ready, steps * batch_size


def bench_train_throughput(quick: bool = False, warmup: int = 1, repeats: int = 3) -> list[harness.Row]:
    n = 1280 if quick else 5120
    rows = []
    for strategy in ("step", "scan"):
        run, sync, items = make_jax_train_epoch(strategy, n_images=n)
        timing = harness.time_fn(run, warmup=warmup, repeats=repeats, sync=sync)
        rows.append(harness.Row.from_timing("train_epoch", f"jax {strategy}", timing,
                                            unit="images/s", items_per_call=items))
    return rows


if __name__ == "__main__":
    print(harness.format_table(bench_train_throughput()))
