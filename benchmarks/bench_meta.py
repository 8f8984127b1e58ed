"""``meta_step`` and ``meta_step_scaling``: one Reverse-MAML outer step at the fixed spec.

Spec (the same as ``torch_reference``): the paper's LeNet (10 outputs) on
32x32x3 synthetic data; meta-batch 4 good + 4 bad tasks; 5-way, 10-shot support,
15-shot query; 5 inner SGD steps at lr 0.01 adapting all params; outer loss =
good query CE - 1.0 x bad query CE (ascent); outer Adam 1e-3. Tasks are sampled
once, outside the timed step (as in the PyTorch reference).
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax

from benchmarks import harness
from trm_jax import compilation, meta, models, tasks

SPEC = dict(ways=5, shots=10, queries=15, good_tasks=4, bad_tasks=4, inner_lr=0.01,
            inner_steps=5, bad_term="ascent", lam=1.0)


def _tasks(config: meta.MetaConfig, seed: int = 0) -> tuple[tasks.Task, jax.Array]:
    images, labels = harness.synthetic_cifar(seed, 2000, num_classes=10)
    pool = jax.device_put(tasks.group_by_class(images, labels, 10))
    good = tasks.sample_tasks(jax.random.key(1), jax.tree.map(lambda a: a[:5], pool),
                              config.good_tasks, config.ways, config.shots, config.queries, "fixed")
    bad = tasks.sample_tasks(jax.random.key(2), jax.tree.map(lambda a: a[5:], pool),
                             config.bad_tasks, config.ways, config.shots, config.queries, "fixed")
    both = jax.tree.map(lambda g, b: jnp.concatenate([g, b]), good, bad)
    is_good = jnp.arange(config.good_tasks + config.bad_tasks) < config.good_tasks
    return both, is_good


def meta_step_problem(meta_grad: str = "exact", remat: bool = False, task_batching: str = "auto",
                      inner_steps: int = 5, conv_impl: str = "auto", inner_unroll=None):
    """``(step, args)``: one outer step on pre-sampled tasks, not yet jitted (callers pick
    how: :func:`make_jax_meta_step`, or ``benchmarks.xla_options`` with compiler options)."""
    config = meta.MetaConfig(**{**SPEC, "inner_steps": inner_steps}, meta_grad=meta_grad,
                             remat=remat, task_batching=task_batching, inner_unroll=inner_unroll)
    model = models.lenet(10, conv_impl=conv_impl)
    optimizer = optax.adam(1e-3)
    params = model.init(jax.random.key(0))
    opt_state = optimizer.init(params)
    task_batch, is_good = _tasks(config)
    keys = jax.random.split(jax.random.key(3), is_good.shape[0])

    def step(params, opt_state, task_batch, is_good, keys):
        grads, metrics = meta.meta_gradient(params, task_batch, is_good, keys, config, model)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, metrics["objective"]

    return step, (params, opt_state, task_batch, is_good, keys)


def make_jax_meta_step(meta_grad: str = "exact", remat: bool = False, task_batching: str = "auto",
                       inner_steps: int = 5, conv_impl: str = "auto", inner_unroll=None):
    """``(jitted_step, args, run, sync)`` for one outer step on pre-sampled tasks."""
    step, args = meta_step_problem(meta_grad, remat, task_batching, inner_steps, conv_impl,
                                   inner_unroll)
    step = compilation.jit(step)
    run = lambda: step(*args)  # same state each call: timing one step, not a trajectory
    return step, args, run, jax.block_until_ready


def _row(bench, impl, made, warmup, repeats, **extra):
    step, args, run, sync = made
    harness.reset_peak_memory()
    timing = harness.time_fn(run, warmup=warmup, repeats=repeats, sync=sync)
    memory = {"peak_memory_bytes": harness.peak_memory_bytes()}
    try:
        memory["compiled_temp_bytes"] = harness.compiled_memory_bytes(step, *args)
    except NotImplementedError:
        pass
    return harness.Row.from_timing(bench, impl, timing, unit="s/step", extra={**memory, **extra})


def bench_meta_step(quick: bool = False, warmup: int = 1, repeats: int = 3) -> list[harness.Row]:
    """Exact / first-order / exact+remat, and every task-batching strategy of the exact step."""
    rows = []
    backend_default = meta.resolve_task_batching("auto")
    for batching in ("vmap", "map", "unroll"):
        rows.append(_row("meta_step", f"jax exact [{batching}]",
                         make_jax_meta_step("exact", task_batching=batching), warmup, repeats))
    best = min((r for r in rows), key=lambda r: r.median)
    rows.append(dataclasses.replace(best, impl="jax exact (best)", extra={**best.extra, "best_of": best.impl}))
    batching = best.impl.split("[")[1].rstrip("]")
    rows.append(_row("meta_step", f"jax first_order [{batching}]",
                     make_jax_meta_step("first_order", task_batching=batching), warmup, repeats))
    rows.append(_row("meta_step", f"jax exact+remat [{batching}]",
                     make_jax_meta_step("exact", remat=True, task_batching=batching), warmup, repeats))
    for r in rows:
        r.extra["auto_default"] = backend_default
    return rows


def bench_meta_step_scaling(quick: bool = False, warmup: int = 1, repeats: int = 2,
                            steps: tuple[int, ...] = (1, 5, 20, 50)) -> list[harness.Row]:
    """Exact meta-step time and memory vs inner steps K, with and without remat."""
    if quick:  # the long inner loops are for the full run
        steps, repeats = tuple(k for k in steps if k <= 5), 1
    batching = meta.resolve_task_batching("auto")
    rows = []
    for k in steps:
        for remat in (False, True):
            impl = f"K={k}" + (" remat" if remat else "")
            rows.append(_row("meta_step_scaling", impl,
                             make_jax_meta_step("exact", remat=remat, task_batching=batching,
                                                inner_steps=k), warmup, repeats,
                             inner_steps=k, remat=remat))
    return rows


if __name__ == "__main__":
    print(harness.format_table(bench_meta_step() + bench_meta_step_scaling()))
