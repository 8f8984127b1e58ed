"""SKD distillation throughput: images/s of the student's MSE epochs through the engine.

    python -m benchmarks.bench_skd [--quick] [--json out.json]

The spec matches ``benchmarks.torch_reference.make_torch_distill_epoch``: the
paper's LeNet on CIFAR-shaped synthetic data (random uint8 pixels, never zero;
timing only, not a result), batch 128, Adam 1e-3, 40,000 images per epoch
(``--quick``: 1,280), half with a (random) teacher's penultimate targets and half
with the constant -100. The timed unit is one epoch of :func:`trm_jax.train.fit`
with :func:`trm_jax.skd.distillation_loss` and ``per_seed_data=(False, True)``,
exactly the experiment's path, under both execution strategies: ``scan`` (the
epoch as one ``lax.scan``) and ``step`` (one jitted call per step). The first
epoch (compilation included) is reported as ``compile_s``; the others are the samples.
"""
from __future__ import annotations

import argparse
import time
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

from benchmarks import harness
from trm_jax import models, skd, train

STRATEGIES = ("scan", "step")


def distill_setup(n_images: int, seed: int = 0):
    """Model, ``(images[N], targets f32[1, N, 84])`` on the device, and a fresh student stack."""
    model = models.lenet(10, (32, 32, 3))
    images, _ = harness.synthetic_cifar(seed, n_images)
    images = np.maximum(images, 1)  # never zero
    keys = jax.random.split(jax.random.key(seed), 1)
    teacher = model.init_seeds(keys)["features"]
    half = n_images // 2
    data = skd.distillation_data(model, teacher, images[:half], images[half:])
    student = jax.vmap(lambda k: skd.init_student(model, k, None, "fresh"))(keys)
    return model, keys, jax.block_until_ready(data), student


def time_epochs(model, keys, data, student, *, strategy: str, batch_size: int,
                epochs: int) -> harness.Timing:
    """Runs ``epochs`` epochs of ``train.fit`` and times each one (on_epoch stamps).

    ``on_epoch`` runs after the epoch's metrics reached the host, so every stamp
    follows a synchronisation. Epoch 1 includes compilation (``compile_s``).
    """
    optimizer = optax.adam(1e-3)
    state = jax.vmap(train.init_state, in_axes=(0, 0, None))(keys, student, optimizer)
    stamps = [time.perf_counter()]
    train.fit(state, data, loss_fn=skd.distillation_loss(model), optimizer=optimizer,
              epochs=epochs, batch_size=batch_size, strategy=strategy, progress=False,
              per_seed_data=(False, True), on_epoch=lambda *_: stamps.append(time.perf_counter()))
    seconds = np.diff(stamps)
    samples = tuple(float(s) for s in seconds[1:])
    return harness.Timing(median=float(np.median(samples)), min=min(samples), max=max(samples),
                          samples=samples, compile_s=float(seconds[0]))


def bench_distill_throughput(quick: bool = False, *, repeats: int | None = None,
                             batch_size: int = 128,
                             strategies: Sequence[str] = STRATEGIES) -> list[harness.Row]:
    """Distillation images/s for each execution strategy (one row each).

    Args:
      quick: 1,280 images per epoch instead of 40,000 (a smoke test).
      repeats: timed epochs after the compiling one (default 2 quick, 3 full).
    """
    n_images = 1280 if quick else 40_000
    repeats = repeats or (2 if quick else 3)
    model, keys, data, student = distill_setup(n_images)
    images_per_epoch = (n_images // batch_size) * batch_size
    rows = []
    for strategy in strategies:
        timing = time_epochs(model, keys, data, student, strategy=strategy,
                             batch_size=batch_size, epochs=repeats + 1)
        rows.append(harness.Row.from_timing(
            "distill_epoch", f"jax {strategy}", timing, unit="images/s",
            items_per_call=images_per_epoch,
            extra={"n_images": n_images, "batch_size": batch_size, "seeds": 1,
                   "backend": jax.default_backend()}))
    return rows


def main(argv: Sequence[str] | None = None) -> list[harness.Row]:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="1,280 images per epoch (smoke test)")
    p.add_argument("--repeats", type=int, default=None)
    p.add_argument("--json", default=None, help="write rows + machine info here")
    a = p.parse_args(argv)
    rows = bench_distill_throughput(a.quick, repeats=a.repeats)
    print(harness.format_table(rows))
    if a.json:
        harness.write_json(rows, a.json, {"quick": a.quick, "framework": "jax"})
    return rows


if __name__ == "__main__":
    main()
