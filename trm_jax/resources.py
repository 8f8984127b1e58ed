"""A pre-flight estimate of a run's peak memory and step count, before any compute.

A run with ``--seeds 100000`` reached 9 GB of memory in 30 s and kept going; one with
``--attack.steps-multipliers 1000000000`` trained every method first and only then asked
for years of attack steps. :func:`estimate` reads the configs' shapes (never compiles or
runs a program: ``jax.eval_shape`` of the model's init and ``jax.make_jaxpr`` of one
example's forward pass) and gives, per phase, the bytes the phase holds and the optimizer
steps it takes one after another; :func:`check` refuses a run whose estimate exceeds the
machine's available memory or :data:`MAX_STEPS`.

The model (deliberately simple, an upper bound within the stated factor, not a simulator):

* a phase holds ``S x G`` copies (seeds x the learning-rate/optimizer grid run at once)
  of the parameters in :data:`STATE_COPIES` forms (params, gradients, Adam's two moments,
  the donated copy), plus ``S x G x batch`` examples' forward activations twice (kept for
  the backward pass, and their gradients); a second-order meta step keeps every inner
  step's parameters and activations for each task of the meta-batch;
* an attack's curves (accuracy per epoch, per seed, lr, optimizer and data budget);
* the data on the device, and the process as it is now (Python, JAX, TFDS, the data on the
  host: its resident memory when :func:`check` runs), which is most of a small run's peak.

Calibration (digits, 2 shared CPU cores, 2026-12; ``/usr/bin/time -v``'s maximum resident
set size against :attr:`Estimate.peak`; :data:`CALIBRATION`):

* ``python -m experiments.train_reference --dataset digits --train.epochs 2 --seeds S``:
  S=3 estimated 555 MiB, measured 516 MiB (x1.08); S=300: 1.9 GiB vs 1,369 MiB (x1.4);
* ``python -m experiments.reverse_maml --dataset digits --meta-steps 4 --head.epochs 1
  --reference.train.epochs 1 --seeds S``: S=3 729 MiB vs 920 MiB (x0.79); S=40 3.0 GiB vs
  1,094 MiB (x2.8: the meta phase is counted as if every task's activations were live at
  once, and XLA reuses their buffers).

So the estimate is within a factor :data:`FACTOR` (3) of the real peak either way, mostly
above it for big runs: a refused run would need at least a third of the estimate, and
``--force-resources`` runs it anyway. The default runs estimate 0.7 GiB (reverse_maml,
digits, 3 seeds), 2.1 GiB (compare, digits, 5 seeds) and 3.2 GiB (compare, mnist5k, 5 seeds).
"""
from __future__ import annotations

import dataclasses
import math
import os
from typing import Any, Iterator, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from trm_jax.errors import ConfigError

#: Parameter-shaped arrays a training phase holds per seed and grid point: params,
#: gradients, Adam's first and second moments, and the copy a donated update writes.
STATE_COPIES = 5
#: Forward activations are kept for the backward pass and their gradients made: twice.
ACTIVATION_COPIES = 2
#: XLA's compiler and runtime on top of the process at pre-flight time: the measured peak of
#: a 3-seed digits run minus the process's resident memory when it was estimated (~230 MiB).
RUNTIME_BYTES = 256 * 2**20
#: The most optimizer steps one phase may take one after another (per seed: seeds run in
#: parallel). The longest preset, CIFAR-10's 20 epochs of 625 steps or 2,000 meta-steps of
#: 5 inner steps, is ~1e4; 1e7 steps is days even on digits (~1 ms a step).
MAX_STEPS = 10_000_000
#: The module docstring's measurements: (experiment, seeds, estimated MiB, measured peak MiB).
CALIBRATION = (("train_reference", 3, 555, 516), ("train_reference", 300, 1946, 1369),
               ("reverse_maml", 3, 729, 920), ("reverse_maml", 40, 3072, 1094))
#: The estimate is within this factor of the measured peak, either way (CALIBRATION).
FACTOR = 3.0


class Phase(NamedTuple):
    """One phase of a run: ``name`` (the settings' path, e.g. ``"reference.train"``),
    ``bytes`` it holds at its peak besides the process and the data, ``steps`` taken one
    after another, and ``fields``: ``((dotted setting path, value), ...)`` that set its
    steps (named in a refusal)."""

    name: str
    bytes: int
    steps: int
    fields: tuple[tuple[str, Any], ...]


class Estimate(NamedTuple):
    """:func:`estimate`'s result: ``phases``, ``data_bytes`` (the protocol's arrays on the
    device) and ``base_bytes`` (the process's resident memory when estimated)."""

    phases: tuple[Phase, ...]
    data_bytes: int
    base_bytes: int

    @property
    def peak(self) -> int:
        """The estimated peak memory of the whole process, in bytes."""
        return (self.base_bytes + RUNTIME_BYTES + self.data_bytes
                + max((p.bytes for p in self.phases), default=0))

    @property
    def largest(self) -> Phase | None:
        return max(self.phases, key=lambda p: p.bytes, default=None)


def tree_bytes(tree: Any) -> int:
    """Bytes of every array (or ``ShapeDtypeStruct``) leaf of ``tree``."""
    return int(sum(math.prod(x.shape) * np.dtype(x.dtype).itemsize
                   for x in jax.tree.leaves(tree)))


def activation_bytes(model: Any) -> tuple[int, int]:
    """``(per example, per seed)``: bytes of the intermediate values of a forward pass (the
    outputs of every operation of its jaxpr, nested ones included: what a backward pass
    keeps), as those that grow with the batch and those that do not (a convolution's
    weight-derived blocks). Read off the jaxprs of a batch of 1 and of 2."""
    params = model.param_shapes()
    sizes = []
    for batch in (1, 2):
        x = jax.ShapeDtypeStruct((batch, *model.input_shape), jnp.uint8)
        jaxpr = jax.make_jaxpr(model.apply)(params, x).jaxpr
        sizes.append(sum(math.prod(v.aval.shape) * np.dtype(v.aval.dtype).itemsize
                         for v in _outvars(jaxpr)))
    per_example = max(0, sizes[1] - sizes[0])
    return int(per_example), int(max(0, sizes[0] - per_example))


def _outvars(jaxpr: Any) -> Iterator[Any]:
    for eqn in jaxpr.eqns:
        yield from eqn.outvars
        for sub in jax.core.jaxprs_in_params(eqn.params) if hasattr(jax.core, "jaxprs_in_params") \
                else _sub_jaxprs(eqn.params):
            yield from _outvars(sub)


def _sub_jaxprs(params: dict[str, Any]) -> Iterator[Any]:
    for value in params.values():
        for v in value if isinstance(value, (tuple, list)) else (value,):
            inner = getattr(v, "jaxpr", None)
            if inner is not None and hasattr(inner, "eqns"):
                yield inner
            elif hasattr(v, "eqns"):
                yield v


def resident_bytes() -> int:
    """This process's resident memory now (``/proc/self/status`` VmRSS; 0 where unknown)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def available_bytes() -> tuple[int | None, str]:
    """``(bytes, what)``: the memory a run may still take: on an accelerator the first
    device's ``memory_stats()`` limit minus what is in use; on CPU ``/proc/meminfo``'s
    MemAvailable (psutil where there is no /proc); ``None`` where neither says."""
    device = jax.devices()[0]
    if device.platform != "cpu":
        stats = device.memory_stats() or {}
        if "bytes_limit" in stats:
            return (int(stats["bytes_limit"]) - int(stats.get("bytes_in_use", 0)),
                    f"free on {device.device_kind}")
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024, "available (MemAvailable)"
    except OSError:
        pass
    try:
        import psutil

        return int(psutil.virtual_memory().available), "available (psutil)"
    except ImportError:
        return None, "unknown"


def _configs(config: Any, path: str = "") -> Iterator[tuple[str, Any]]:
    """Every (dotted path, dataclass) under ``config``, ``config`` itself first."""
    if not dataclasses.is_dataclass(config):
        return
    yield path, config
    for field in dataclasses.fields(config):
        yield from _configs(getattr(config, field.name), f"{path}.{field.name}".lstrip("."))


def _at(path: str, name: str) -> str:
    return f"{path}.{name}".lstrip(".")


def estimate(config: Any, *, model: Any, seeds: int, train_examples: int,
             attack_examples: int, attack_epochs: int | None = None, data_bytes: int = 0,
             suites: tuple[tuple[str, Any], ...] = (), devices: int = 1) -> Estimate:
    """The phases of an experiment ``config`` (pure: shapes only, nothing compiled or run).

    Walks ``config`` for the settings that make a phase: every ``TrainConfig`` (a supervised
    phase of ``train_examples`` examples), every config with ``meta`` and ``meta_steps``
    (meta-training; one with ``meta_steps`` alone, the simulated attack, by its steps),
    UNSIR's ``NoiseConfig`` (its steps), and each ``(path, SuiteConfig)`` of ``suites``
    (the attack suite on ``attack_examples`` malicious fine-tuning examples for
    ``attack_epochs``, its default epochs). Seeds are split over ``devices`` (the seed axis is sharded).

    Args:
      model: the architecture (:class:`trm_jax.models.Model`); its parameter and
        activation sizes scale everything.
    """
    from trm_jax import evaluation, unlearning
    from trm_jax import meta as meta_lib
    from trm_jax import train as train_lib

    per_device = -(-seeds // max(1, devices))
    acts, fixed = activation_bytes(model)
    params = tree_bytes(model.param_shapes()) + fixed  # weight-shaped values, per seed
    phases = []
    for path, cfg in _configs(config):
        if isinstance(cfg, train_lib.TrainConfig):
            steps = cfg.epochs * -(-train_examples // cfg.batch_size)
            held = per_device * (STATE_COPIES * params + ACTIVATION_COPIES * cfg.batch_size * acts)
            phases.append(Phase(path, held, steps, ((_at(path, "epochs"), cfg.epochs),)))
        meta = getattr(cfg, "meta", None)
        if isinstance(meta, meta_lib.MetaConfig) and isinstance(getattr(cfg, "meta_steps", None), int):
            tasks = meta.good_tasks + meta.bad_tasks
            examples = meta.ways * (meta.shots + meta.queries)
            kept = meta.inner_steps + 1 if meta.meta_grad == "exact" else 1
            if meta.adapt == "head":  # features once per task; only the head adapts, twice
                head = tree_bytes(model.param_shapes()["head"]) + examples * 4 * model.feature_dim
                per_task = ACTIVATION_COPIES * (examples * acts + kept * head)
            else:  # the whole net adapts: every inner step's params and activations kept
                per_task = kept * (params + ACTIVATION_COPIES * examples * acts)
            held = per_device * (STATE_COPIES * params + tasks * per_task)
            steps = cfg.meta_steps * (meta.inner_steps + 1)
            phases.append(Phase(_at(path, "meta"), held, steps,
                                ((_at(path, "meta_steps"), cfg.meta_steps),
                                 (_at(path, "meta.inner_steps"), meta.inner_steps))))
        elif isinstance(getattr(cfg, "meta_steps", None), int):  # the simulated attack's own
            # loop: its steps are bounded; its memory counted as one training state (a floor)
            phases.append(Phase(_at(path, "meta"), per_device * STATE_COPIES * params,
                                cfg.meta_steps, ((_at(path, "meta_steps"), cfg.meta_steps),)))
        if isinstance(cfg, unlearning.NoiseConfig):  # UNSIR's noise: Adam steps on noise images
            phases.append(Phase(path, 0, cfg.steps, ((_at(path, "steps"), cfg.steps),)))
    found = tuple((p, c) for p, c in _configs(config) if isinstance(c, evaluation.SuiteConfig))
    for path, suite in found + tuple(suites):
        lrs = len(suite.learning_rates or (1,) * 4)
        optimizers = len(suite.optimizers or (1,) * (2 if suite.suite == "all" else 1))
        grid = lrs * max(optimizers, len(suite.scratch_grid[1]))
        epochs = (suite.epochs or attack_epochs or 1) * max(suite.steps_multipliers)
        steps = epochs * max(1, attack_examples // suite.batch_size)
        curves = per_device * grid * len(suite.data_per_class) * epochs * 4 * 4
        held = per_device * grid * (STATE_COPIES * params + ACTIVATION_COPIES * suite.batch_size
                                    * acts) + curves
        phases.append(Phase(path, held, steps,
                            ((_at(path, "epochs"), suite.epochs or attack_epochs),
                             (_at(path, "steps_multipliers"), max(suite.steps_multipliers)))))
    return Estimate(tuple(phases), int(data_bytes), resident_bytes())


def gib(n: float) -> str:
    return f"{n / 2**30:.1f} GiB" if n >= 2**30 else f"{n / 2**20:.0f} MiB"


def check(est: Estimate, *, seeds: int, available: tuple[int | None, str] | None = None,
          flag: Any = lambda path: path, hint: str = "--force-resources runs it anyway") -> None:
    """Raises :class:`ConfigError` (one line: the settings, the estimate and the limit) when
    a phase takes more than :data:`MAX_STEPS` steps or the estimated peak exceeds the
    available memory (``available``: :func:`available_bytes` unless given). ``flag`` spells
    a setting's dotted path as the user gave it (a command line's flag)."""
    for phase in est.phases:
        if phase.steps > MAX_STEPS:
            given = " x ".join(f"{flag(path)} {value}" for path, value in phase.fields)
            raise ConfigError(f"{given}: the {phase.name} phase would take {phase.steps:.3g} "
                              f"optimizer steps one after another, over the bound {MAX_STEPS:.0e} "
                              f"(days of compute); lower them, or {hint}")
    limit, what = available_bytes() if available is None else available
    largest = est.largest
    if limit is None or largest is None:
        return
    needed = est.peak - est.base_bytes  # the process's current memory is already taken
    if needed > limit:
        raise ConfigError(f"--seeds {seeds}: the {largest.name} phase needs an estimated "
                          f"{gib(needed)} more memory (peak {gib(est.peak)}), {gib(limit)} "
                          f"{what}; lower --seeds (or the phase's sizes), or {hint}")
