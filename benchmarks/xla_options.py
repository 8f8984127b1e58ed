"""XLA:CPU compiler options, per compile, on the training step and the exact meta-step.

    python -m benchmarks.xla_options train "xla_cpu_experimental_ynn_fusion_type="
    python -m benchmarks.xla_options meta "xla_cpu_experimental_ynn_fusion_type=" --rounds 5
    python -m benchmarks.xla_options init "xla_backend_optimization_level=2"

Each argument after the step is one variant: ``option=value`` pairs joined by ``&``, passed to
``jax.jit(step, compiler_options=...)``, so the process's other programs keep XLA's defaults.
Interleaved rounds (every variant, then PyTorch, each round), medians: the fair comparison on a
shared CPU. Prints each variant's compile seconds and its largest parameter difference from the
default after one step (0: the option changed nothing XLA emitted; ~1e-7: float32 rounding). An
option this jaxlib does not know fails that variant only (``INVALID_ARGUMENT``).

Steps: ``train`` is one supervised step of ``benchmarks.bench_train`` (lenet on 32x32x3,
batch 128, Adam), timed over 10 calls per round, against PyTorch eager's same step (2 threads);
``meta`` is ``bench_meta``'s exact outer step, against PyTorch autograd with 1 thread;
``init`` is lenet's initialiser for 3 seeds (``vmap(model.init)``, what ``Model.init_seeds``
compiles), where the compile time is the point (no PyTorch row).

"default" is XLA's defaults: the library itself compiles with
``trm_jax.compilation.CPU_COMPILER_OPTIONS`` on CPU; pass them as a variant to compare.
"""
from __future__ import annotations

import argparse
import functools
import math
import statistics
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax

from benchmarks import bench_meta, harness
from trm_jax import models, train


def parse_variant(spec: str) -> dict[str, Any]:
    """``"a=1&b=true"`` -> ``{"a": "1", "b": True}``."""
    options = {}
    for part in spec.split("&"):
        name, sep, value = part.partition("=")
        if not sep or not name:
            raise SystemExit(f"variant {spec!r}: each part must be option=value")
        options[name] = {"true": True, "false": False}.get(value, value)
    return options


def train_step() -> tuple[Callable, tuple, Callable[[], Any], int]:
    """``(step, args, torch_run, calls_per_round)``."""
    from benchmarks import torch_reference

    model, optimizer = models.lenet(10), optax.adam(1e-3)
    key = jax.random.key(0)
    state = train.init_state(key, model.init(key), optimizer)
    images, labels = harness.synthetic_cifar(0, 128)
    step = functools.partial(train.train_step, loss_fn=train.classification_loss(model.apply),
                             optimizer=optimizer)
    torch_run, _ = torch_reference.make_torch_train_epoch(n_images=1280)  # 10 steps per call
    return step, (state, (jax.device_put(images), jax.device_put(labels))), torch_run, 10


def meta_step() -> tuple[Callable, tuple, Callable[[], Any], int]:
    from benchmarks import torch_reference

    step, args = bench_meta.meta_step_problem("exact")
    torch_reference.set_cpu_threads(1)  # spinning OpenMP workers distort 2 threads when busy
    return step, args, torch_reference.build_torch_meta_step("autograd").step, 1


def init_step() -> tuple[Callable, tuple, None, int]:
    model = models.lenet(10)
    return jax.vmap(model.init), (jax.random.split(jax.random.key(0), 3),), None, 1


def _repeat(fn: Callable, args: tuple, calls: int) -> None:
    jax.block_until_ready([fn(*args) for _ in range(calls)])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("step", choices=("train", "meta", "init"))
    parser.add_argument("variants", nargs="*", help="option=value[&option=value...]")
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args(argv)
    step, step_args, torch_run, calls = {"train": train_step, "meta": meta_step,
                                         "init": init_step}[args.step]()
    variants = {"default": {}, **{spec: parse_variant(spec) for spec in args.variants}}
    runs, reference = {}, None
    for name, options in variants.items():
        fn = jax.jit(step, compiler_options=options or None)
        try:
            start = time.perf_counter()
            out = jax.block_until_ready(fn(*step_args))
        except Exception as err:  # an option this jaxlib rejects: report it, keep the others
            print(f"{name}: FAILED {type(err).__name__}: {str(err)[:200]}", flush=True)
            continue
        compile_s = time.perf_counter() - start
        params = [x for x in jax.tree.leaves(out if args.step == "init" else out[0])
                  if jnp.issubdtype(x.dtype, jnp.floating)]
        reference = params if reference is None else reference
        diff = max(float(jnp.max(jnp.abs(a - b))) for a, b in zip(params, reference))
        print(f"{name}: compile + first call {compile_s:.1f} s, max |param - default| {diff:.1e}",
              flush=True)
        runs[name] = functools.partial(_repeat, fn, step_args, calls)
    if torch_run is not None:
        torch_run()  # warm-up
        runs["pytorch"] = torch_run  # `calls` steps per call, like the JAX variants
    times: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(args.rounds):
        for name, run in runs.items():
            start = time.perf_counter()
            run()
            times[name].append((time.perf_counter() - start) / calls)
    torch_median = statistics.median(times["pytorch"]) if "pytorch" in times else math.nan
    print("| variant | median s/step | min-max | PyTorch / this |")
    print("|---|---|---|---|")
    for name, samples in times.items():
        median = statistics.median(samples)
        print(f"| {name} | {median:.4f} | {min(samples):.4f}-{max(samples):.4f} | "
              f"{'-' if math.isnan(torch_median) else f'{torch_median / median:.2f}x'} |")


if __name__ == "__main__":
    main()
