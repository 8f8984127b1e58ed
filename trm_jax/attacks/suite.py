"""Running a suite: the plan (what runs), and the sweeps that fill a :class:`SweepResult`.

Every attack of the plan runs ``epochs x max(steps)`` epochs ONCE per data budget
(every budget in the same compiled program: same shapes), for every seed and learning
rate (:func:`~trm_jax.attacks.program.attack_sweep`); shorter steps budgets are
prefixes. The scratch reference is ``full_finetune`` on freshly initialised models,
the same code path and compiled program.
"""
from __future__ import annotations

import concurrent.futures
import dataclasses
import os
import time
from typing import Sequence

import jax
import numpy as np

from trm_jax import data as data_lib
from trm_jax import compilation, models, streams, train
from trm_jax.attacks import specs
from trm_jax.attacks.budgets import (AttackData, Budgets, attack_data, data_budget, default_epochs,
                                     steps_per_epoch)
from trm_jax.attacks.program import attack_sweep, check_inputs
from trm_jax.attacks.result import SweepResult
from trm_jax.errors import ConfigError
from trm_jax.typing import Params

#: ``{entry name: (config, learning rates)}``, see :func:`attack_plan`.
Plan = dict[str, tuple[specs.AttackConfig, tuple[float, ...]]]


def attack_plan(attacks: str | Sequence[str] = ("linear_probe",), *,
                learning_rates: Sequence[float] | None = None,
                optimizers: Sequence[str] | None = None, num_classes: int = 5,
                epochs: int = 10, batch_size: int = 64) -> Plan:
    """What a sweep will run: ``{entry name: (config, learning rates)}``; pure, no compute.

    ``attacks="all"``: every attack with both :data:`~trm_jax.attacks.specs.SUITE_OPTIMIZERS`
    on :data:`~trm_jax.attacks.specs.LEARNING_RATE_GRID` (unless given). Otherwise adam,
    and a lone ``linear_probe`` at the paper's 0.1. Entries are named ``attack`` with one
    optimizer, ``attack/optimizer`` with several (e.g. ``"full_finetune/momentum"``).
    """
    suite = isinstance(attacks, str) and attacks == "all"
    names = specs.resolve_attacks(attacks)
    optimizers = tuple(specs.SUITE_OPTIMIZERS if optimizers is None and suite
                       else optimizers or ("adam",))
    bad = [o for o in optimizers if o not in train.OPTIMIZERS]
    if bad or not optimizers or len(set(optimizers)) != len(optimizers):
        raise ConfigError(f"bad optimizer list {list(optimizers)}; allowed (each once): "
                          f"{train.OPTIMIZERS}", field="optimizers")
    plan = {}
    for a in names:
        lrs = specs.validate_learning_rates(
            learning_rates if learning_rates is not None
            else (specs.PAPER_LEARNING_RATE,) if a == "linear_probe" and not suite
            else specs.LEARNING_RATE_GRID)
        for o in optimizers:
            name = a if len(optimizers) == 1 else f"{a}/{o}"
            plan[name] = (specs.AttackConfig(a, num_classes, o, epochs, batch_size), lrs)
    return plan


def entry_name(result: SweepResult, attack: str, optimizer: str) -> str:
    """The report name of (attack, optimizer): ``attack`` if the sweep has one optimizer."""
    return attack if len(result.optimizers) == 1 else f"{attack}/{optimizer}"


def run_plan(model: models.Model, params: Params, keys: jax.Array, plan: Plan,
             data: AttackData, budgets: Budgets, epochs: int, *, batching: str = "auto",
             workers: int | None = None, on_entry=None) -> SweepResult:
    """Runs every entry of ``plan`` at every data budget into one :class:`SweepResult`.

    Args:
      params: ``[S, ...]`` stack; keys: ``[S]``.
      plan: :func:`attack_plan` with ``epochs * max(budgets.steps_multipliers)`` epochs.
      data: all the attacker's data (:func:`~trm_jax.attacks.budgets.attack_data`).
      epochs: the 1x steps budget.
      workers: sweeps run at once (threads; default: :func:`default_workers`). The numbers
        do not depend on it.
      on_entry: ``on_entry(name, seconds)`` after each entry (progress).
    """
    workers = default_workers() if workers is None else workers
    attacks = tuple(dict.fromkeys(c.attack for c, _ in plan.values()))
    optimizers = tuple(dict.fromkeys(c.optimizer for c, _ in plan.values()))
    lrs = tuple(sorted({lr for _, ls in plan.values() for lr in ls},
                       key=lambda lr: _first_position(plan, lr)))
    budgets = budgets.resolve(np.asarray(data.finetune_labels))  # what is used is recorded
    datas = [data_budget(data, d) for d in budgets.data_per_class]
    e_max = epochs * max(budgets.steps_multipliers)
    shape = (len(attacks), len(optimizers), len(lrs), int(keys.shape[0]), len(datas))
    accuracy, finite = np.full(shape + (e_max + 1,), np.nan), np.ones(shape, bool)
    seconds = np.zeros(shape[:2])
    batch_size = next(iter(plan.values()))[0].batch_size

    def one(job: tuple[str, int]) -> tuple[str, int, object, float]:
        name, d = job
        config, entry_lrs = plan[name]
        start = time.perf_counter()
        out = jax.block_until_ready(attack_sweep(model, params, keys, entry_lrs, datas[d], config,
                                                 batching=batching))
        return name, d, out, time.perf_counter() - start

    # Sweeps are independent programs: a few at once keep every core busy while another
    # compiles or runs small ops (XLA:CPU compiles one program on one thread). Budget-major
    # order: the first jobs compile different programs, later ones reuse them.
    jobs = [(name, d) for d in range(len(datas)) for name in plan]
    with concurrent.futures.ThreadPoolExecutor(max(1, workers)) as pool:
        # Each job in this thread's context: its compilations count for the caller's phase.
        for name, d, out, took in pool.map(compilation.in_current_context(one), jobs):
            config, entry_lrs = plan[name]
            a, o = attacks.index(config.attack), optimizers.index(config.optimizer)
            cols = [lrs.index(lr) for lr in entry_lrs]
            accuracy[a, o, cols, :, d] = np.asarray(out.curve, np.float64)
            finite[a, o, cols, :, d] = np.asarray(out.finite)
            seconds[a, o] += took
            if on_entry is not None and d == len(datas) - 1:
                on_entry(name, seconds[a, o])
    return SweepResult(accuracy, finite, attacks, optimizers, lrs, budgets.data_keys, epochs,
                       tuple(budgets.steps_multipliers), steps_per_epoch(data, batch_size),
                       batch_size, tuple(specs.ATTACK_SPECS[a].reuse for a in attacks), seconds)


def default_workers() -> int:
    """Sweeps at once: the CPU cores on a CPU backend (up to 4), else 2 (overlaps host work);
    1 in a multi-process run, where every process must start the same programs in the same
    order (their collectives pair up)."""
    if jax.process_count() > 1:
        return 1
    if jax.default_backend() == "cpu":
        return max(1, min(4, os.cpu_count() or 1))
    return 2


def _first_position(plan: Plan, lr: float) -> tuple[int, int]:
    """Learning rates keep the order of their first appearance in the plan."""
    for i, (_, lrs) in enumerate(plan.values()):
        if lr in lrs:
            return i, lrs.index(lr)
    return len(plan), 0


def scratch_init(model: models.Model, keys: jax.Array) -> Params:
    """``[S]`` keys -> ``[S, ...]`` randomly initialised models (the scratch reference's
    starting point; the key stream differs from the attack's and from training's)."""
    return model.init_seeds(jax.vmap(jax.random.fold_in, in_axes=(0, None))(keys, streams.SCRATCH))


def scratch_reference(model: models.Model, keys: jax.Array, protocol: data_lib.ProtocolData, *,
                      learning_rates: Sequence[float] | None = None,
                      optimizer: str | Sequence[str] = "adam", epochs: int | None = None,
                      batch_size: int = 64, batching: str = "auto",
                      data: AttackData | None = None, budgets: Budgets = Budgets()) -> SweepResult:
    """The scratch reference: ``model``'s architecture from random init (per seed,
    :func:`scratch_init`), every parameter trained on the malicious fine-tuning split with
    the attack's budget: the ``full_finetune`` attack on random models (one code path, one
    compiled program). The same for every method under the same protocol, seeds and
    budget: compute it once and pass it to every evaluation.

    Args:
      learning_rates: default :data:`~trm_jax.attacks.specs.SCRATCH_LEARNING_RATES`.
      optimizer: one name or several (the attacker takes the best at each budget).
      epochs: default: the dataset's attack epochs (the 1x steps budget).
      budgets: the same data and steps budgets as the attacks.

    Returns:
      A :class:`SweepResult` with one attack, ``"scratch"``.
    """
    lrs = specs.validate_learning_rates(specs.SCRATCH_LEARNING_RATES if learning_rates is None
                                        else learning_rates)
    optimizers = (optimizer,) if isinstance(optimizer, str) else tuple(optimizer)
    budgets = budgets.validate()
    epochs = default_epochs(protocol) if epochs is None else epochs
    data = attack_data(protocol) if data is None else data
    num_classes = protocol.finetune.malicious.num_classes
    plan = {o: (specs.AttackConfig("full_finetune", num_classes, o,
                                   epochs * max(budgets.steps_multipliers), batch_size), lrs)
            for o in optimizers}
    params = scratch_init(model, keys)
    result = run_plan(model, params, keys, plan, data, budgets, epochs, batching=batching)
    return _as_scratch(result)


def _as_scratch(result: SweepResult) -> SweepResult:
    return dataclasses.replace(result, attacks=("scratch",), reuse=(False,))


def check_all(model: models.Model, params: Params, keys: jax.Array, plan: Plan,
              data: AttackData) -> None:
    """Every entry's input checks (:func:`~trm_jax.attacks.program.check_inputs`), no compute."""
    for config, _ in plan.values():
        check_inputs(model, params, keys, data, config)
