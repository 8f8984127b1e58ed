"""The fine-tuning attacks: how every method in the project is judged.

An attacker takes a released model, replaces its head with a fresh one and fine-tunes on
the *malicious* fine-tuning split; we record the malicious test accuracy before
fine-tuning (epoch 0) and after every epoch (lower is better for a defence).

=====================  ===================================================================
module                 concept
=====================  ===================================================================
:mod:`.specs`          what an attack is: composable stages, :class:`AttackSpec`, the suite,
                       the learning-rate grids, :class:`AttackConfig`
:mod:`.budgets`        the attacker's data on the device and its data / steps budgets
:mod:`.fit`            one attack for one (seed, lr): the stages' interpreter, :class:`Stages`
:mod:`.program`        the compiled sweep over lrs x seeds, batching, placement
:mod:`.suite`          the plan of a suite and the sweeps that fill a :class:`SweepResult`
:mod:`.result`         :class:`SweepResult` (named axes) and the pure functions over it
:mod:`.report`         the edge: a result as the ``results.json`` report
=====================  ===================================================================

Example::

  plan = attacks.attack_plan("all", num_classes=5, epochs=10)
  result = attacks.run_plan(model, params, keys, plan, attacks.attack_data(protocol),
                            attacks.Budgets(), epochs=10)
  attacks.worst_case(result, "all", "1x", reuse_only=True).final.mean()
"""
from trm_jax.attacks.budgets import (AttackData, Budgets, attack_data, budget_indices, budget_key,
                                     data_budget, default_epochs, steps_per_epoch)
from trm_jax.attacks.fit import (AttackOutput, Stages, attack_phases, frozen_lower_half,
                                 make_attack, stage_arrays, trains_convs)
from trm_jax.attacks.program import (attack_sweep, check_inputs, compiled_sweep, place,
                                     resolve_batching)
from trm_jax.attacks.report import Report, to_json
from trm_jax.attacks.result import (AXES, SCRATCH_FRACTION, BudgetRow, Choice, SweepResult,
                                    advantage, at_steps, attacker_choice, best_lr, budget_table,
                                    final_means, scratch_choice, search_curve, steps_to_fraction,
                                    worst_case)
from trm_jax.attacks.specs import (ATTACK_SPECS, ATTACKS, BATCHINGS, LEARNING_RATE_GRID,
                                   PAPER_LEARNING_RATE, SCRATCH_LEARNING_RATES, SUITE_OPTIMIZERS,
                                   WIDE_LEARNING_RATE_GRID, WIDE_OPTIMIZERS, AttackConfig,
                                   AttackSpec, FineTune, LinearProbe, Probe, Reinit, WarmStart,
                                   register, resolve_attacks, resolve_parts, trainable_prefixes,
                                   unregister, validate_config, validate_learning_rates)
from trm_jax.attacks.suite import (Plan, attack_plan, check_all, entry_name, run_plan,
                                   scratch_init, scratch_reference)

__all__ = ["ATTACKS", "ATTACK_SPECS", "AXES", "AttackConfig", "AttackData", "AttackOutput",
           "AttackSpec", "BATCHINGS", "BudgetRow", "Budgets", "Choice", "FineTune",
           "LEARNING_RATE_GRID", "LinearProbe", "PAPER_LEARNING_RATE", "Plan", "Probe", "Reinit",
           "Report", "SCRATCH_FRACTION", "SCRATCH_LEARNING_RATES", "SUITE_OPTIMIZERS", "Stages",
           "SweepResult", "WIDE_LEARNING_RATE_GRID", "WIDE_OPTIMIZERS", "WarmStart", "advantage",
           "at_steps", "attack_data", "attack_phases", "attack_plan", "attack_sweep",
           "attacker_choice", "best_lr", "budget_indices", "budget_key", "budget_table",
           "check_all", "check_inputs", "compiled_sweep", "data_budget", "default_epochs",
           "frozen_lower_half",
           "entry_name", "final_means", "make_attack", "place", "register", "resolve_attacks",
           "resolve_batching", "resolve_parts", "run_plan", "scratch_choice", "scratch_init",
           "scratch_reference", "search_curve", "stage_arrays", "steps_per_epoch", "steps_to_fraction",
           "to_json", "trainable_prefixes", "trains_convs", "unregister", "validate_config",
           "validate_learning_rates", "worst_case"]
