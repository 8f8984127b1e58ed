"""Simulated-attack meta-training: resist the evaluation's attackers by training against them.

Starting from a trained model (the unprotected reference, or SKD's masked student:
the hybrid), each outer step minimises

.. math::
  J(\\theta) = CE_{\\mathrm{ben}}(\\theta) + \\alpha\\, A(\\theta; \\theta_0)
             - \\lambda \\frac{1}{T} \\sum_{t=1}^{T} \\sum_{k=1}^{K} w_k R(\\phi_{t,k}; Q_t)

* ``CE_ben``: beneficial cross-entropy on a batch of the beneficial pre-training split;
* ``A``: the penultimate features' relative distance to the starting model's
  (:func:`trm_jax.simulated_attack.feature_anchor`), TAR's beneficial anchor;
* ``phi_{t,k}``: the params after ``k`` steps of an attacker sampled from
  ``config.attacker`` (:class:`~trm_jax.simulated_attack.AttackerSpace`: optimizer,
  lr, trained layers, re-init, data) fine-tuning a fresh head on the support set of a
  malicious task; ``R``: a bounded bad term of its query logits, weighted over steps.

The meta-gradient is exact second order through the attacker's optax updates
(``meta_grad="exact"``) or first order. ``alternate_every = n`` makes every ``n``-th
outer step a plain beneficial step (SOPHON's alternation). All seeds train in one
vmapped program; resumable through :mod:`trm_jax.hooks` like Reverse-MAML.

Example::

  config = trm_jax.config_for("simulated_attack", "digits")
  protected = trm_jax.protect("simulated_attack", config, protocol, trm_jax.seed_keys(3))
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Literal

import jax
import jax.numpy as jnp
import numpy as np
import optax

from trm_jax import data, meta, models, tasks, train, validate
from trm_jax import simulated_attack as sa
from trm_jax.errors import ConfigError, about
from trm_jax.hooks import Hooks
from trm_jax.methods import reference, skd
from trm_jax.methods._phases import (accuracy_on, beneficial_model, check_batch, check_keys,
                                     dataset_config, device_subset, outer_loop)
from trm_jax.typing import Protected, Params, PRNGKey

NAME = "simulated_attack"
STARTS = ("reference", "skd")

Start = Literal["reference", "skd"]


@dataclasses.dataclass(frozen=True)
class SimulatedAttackConfig:
    """Meta-training against attackers sampled from the evaluation's suite.

    Attributes:
      attacker: the attackers simulated in the inner loop.
      bad_term: a term of trm_jax.meta.BAD_TERMS (uniform_kl: the attacked
        model should know nothing; max_entropy: TAR's, bounded by log C;
        inverse_ce, clipped_ascent).
      weighting: the inner steps' weights in the bad term: 'uniform' (every step alike),
        'late' (step k weighs k) or 'final' (the last step only).
      lam: weight of the bad term (>= 0; 0 = fine-tuning with the anchor only).
      anchor: weight of the feature anchor to the starting model (>= 0).
      meta_grad: 'exact' or 'first_order'.
      remat: jax.checkpoint each inner step (memory for compute; same numbers).
      bad_tasks: malicious tasks (one attacker each) per outer step.
      shots: malicious support examples per class of a task (every malicious class
        is in every task; the attacker trains on attacker.data_per_class of them).
      queries: malicious query examples per class of a task (the bad term is scored
        on them after each attacker step).
      batch_size: beneficial examples per outer step.
      meta_steps: outer steps.
      outer_lr: the outer Adam's learning rate (finite, > 0).
      alternate_every: every n-th outer step is a plain beneficial step (0: never).
      log_every: outer steps between metric records (NaN is checked there too).
      start: 'reference' (train the unprotected model first) or 'skd' (start
        from SKD's masked student: the hybrid).
      start_train: the reference's training (start="reference").
      start_skd: SKD's settings (start="skd"; trm_jax.config_for gives the
        dataset's).
      task_batching: how bad tasks are batched (trm_jax.meta.resolve_task_batching).
    """

    attacker: sa.AttackerSpace = sa.AttackerSpace()
    bad_term: meta.BadTerm = "uniform_kl"
    weighting: Literal["uniform", "late", "final"] = "late"
    lam: float = 1.0
    anchor: float = 1.0
    meta_grad: Literal["exact", "first_order"] = "exact"
    remat: bool = False
    bad_tasks: int = 2
    shots: int = 10
    queries: int = 10
    batch_size: int = 64
    meta_steps: int = 300
    outer_lr: float = 1e-3
    alternate_every: int = 0
    log_every: int = 10
    start: Start = "reference"
    start_train: train.TrainConfig = train.TrainConfig(epochs=20)
    start_skd: skd.SKDMethodConfig = skd.SKDMethodConfig()
    task_batching: meta.TaskBatching = "auto"

    DOMAINS = {"attacker": validate.Instance(sa.AttackerSpace),
               "bad_term": validate.Choice(tuple(meta.BAD_TERMS)),
               "weighting": validate.Choice(sa.STEP_WEIGHTINGS), "lam": validate.NONNEGATIVE,
               "anchor": validate.NONNEGATIVE, "meta_grad": validate.Choice(sa.META_GRADS),
               "remat": validate.Bool(), "bad_tasks": validate.COUNT, "shots": validate.COUNT,
               "queries": validate.COUNT, "batch_size": validate.COUNT,
               "meta_steps": validate.COUNT, "outer_lr": validate.POSITIVE,
               "alternate_every": validate.Int(0), "log_every": validate.COUNT,
               "start": validate.Choice(STARTS), "start_train": validate.Instance(train.TrainConfig),
               "start_skd": validate.Instance(skd.SKDMethodConfig),
               "task_batching": validate.Choice(meta.TASK_BATCHINGS)}

    def __post_init__(self) -> None:
        validate.check_fields(self)


def default_config(entry) -> SimulatedAttackConfig:
    """The dataset's training budget for the starting model and its SKD settings (the hybrid)."""
    return SimulatedAttackConfig(start_train=reference.dataset_train_config(entry),
                                 start_skd=dataset_config(skd, entry))


def check(config: SimulatedAttackConfig, protocol: data.ProtocolData,
          model: models.Model | None = None) -> None:
    """Raises :class:`ConfigError` when the settings do not fit the data or the model."""
    model = beneficial_model(protocol, model)
    pre = protocol.pretrain
    pool = _malicious_pool(protocol)
    tasks.check_task_shape(pool, pool.num_classes, config.shots, config.queries, "malicious pool")
    with about("attacker"):
        config.attacker.check(model, config.shots)
    if config.batch_size > len(pre.beneficial):
        raise ConfigError(f"batch_size={config.batch_size} exceeds the {len(pre.beneficial)} "
                          f"beneficial pre-training examples; allowed: 1..{len(pre.beneficial)}",
                          field="batch_size")
    if config.start == "reference":
        check_batch(config.start_train, pre.beneficial, "start_train")
    with about("start_skd"):
        if config.start == "skd":
            skd.check(config.start_skd, protocol)
        else:  # not used, yet a misspelt layer is a mistake to say (no data needed to see it)
            skd.check_mask_layer(config.start_skd, protocol)


def _malicious_pool(protocol: data.ProtocolData) -> tasks.ClassPool:
    m = protocol.pretrain.malicious
    return tasks.group_by_class(m.images, m.labels, m.num_classes)


#: Fields that never change the compiled step (the loop, the starting model) or enter it
#: as traced values (``lam``, ``anchor``): variants differing only in them share programs.
_NOT_IN_PROGRAM = dict(lam=1.0, anchor=1.0, meta_steps=1, log_every=1, alternate_every=0,
                       start="reference", start_train=train.TrainConfig(),
                       start_skd=skd.SKDMethodConfig())


def make_objective(config: SimulatedAttackConfig, model: models.Model, num_malicious: int):
    """``objective(params, key, ben_x, ben_y, bad_pool, anchor_features, weights, plain)
    -> (J, metrics)`` for ONE seed (pure).

    Args (of ``objective``):
      params: ``{"features", "head"}``.
      key: the step key (beneficial batch, tasks, attackers, fresh heads).
      ben_x: ``uint8[N, H, W, C]``, ben_y: ``int32[N]``: the beneficial pre-training split.
      bad_pool: the malicious pre-training split as a :class:`trm_jax.tasks.ClassPool`.
      anchor_features: the starting model's features params.
      weights: ``f32[2]``, ``(lam, anchor)``: traced, so a sweep over them compiles once.
      plain: a static bool: the beneficial terms only (an alternation step).
    """
    space = config.attacker
    strategy = meta.resolve_task_batching(config.task_batching)

    def objective(params: Params, key: PRNGKey, ben_x: jax.Array, ben_y: jax.Array,
                  bad_pool: tasks.ClassPool, anchor_features: Params, weights: jax.Array,
                  plain: bool = False) -> tuple[jax.Array, dict[str, jax.Array]]:
        lam, anchor_weight = weights[0], weights[1]
        k_batch, k_tasks, k_attackers, k_heads = jax.random.split(key, 4)
        idx = jax.random.choice(k_batch, ben_y.shape[0], (config.batch_size,), replace=False)
        x, y = ben_x[idx], ben_y[idx]
        logits = model.apply(params, x)
        good = meta.softmax_cross_entropy(logits, y)
        anchor = sa.feature_anchor(model, params["features"], anchor_features, x)
        objective = good + anchor_weight * anchor
        metrics = {"good/loss": good, "good/acc": meta.accuracy(logits, y), "anchor": anchor}
        if plain:
            return objective, {**metrics, "objective": objective}
        bad = tasks.sample_tasks(k_tasks, bad_pool, config.bad_tasks, num_malicious,
                                 config.shots, config.queries)
        attackers = jax.vmap(lambda k: sa.sample_attacker(k, space))(
            jax.random.split(k_attackers, config.bad_tasks))
        heads = jax.random.split(k_heads, config.bad_tasks)

        def one(args):
            task, attacker, k = args
            traj = sa.attack_trajectory(params, task, k, attacker, model=model, space=space,
                                        num_classes=num_malicious, meta_grad=config.meta_grad,
                                        remat=config.remat)
            return sa.trajectory_resistance(traj, task.query_y, bad_term=config.bad_term,
                                            weighting=config.weighting)

        resist, acc = meta.map_tasks(one, (bad, attackers, heads), strategy)  # [T], [T, K]
        objective = objective - lam * resist.mean()
        return objective, {**metrics, "objective": objective, "bad/term": resist.mean(),
                           "bad/final_acc": acc[:, -1].mean(), "bad/mean_acc": acc.mean()}

    return objective


@functools.lru_cache(maxsize=16)
def make_step(config: SimulatedAttackConfig, model: models.Model, num_malicious: int,
              outer_lr: float, plain: bool = False):
    """One outer step for ONE seed: ``step(params, opt_state, key, ben_x, ben_y, bad_pool,
    anchor_features, weights) -> (params, opt_state, metrics)`` (pure; vmap it over seeds).

    The outer optimizer is Adam(``outer_lr``). Cached: equal arguments give the same
    function, so JAX reuses its compiled program (call it with
    :func:`program_config` to share it across ``lam``/``anchor``/loop settings).
    """
    objective = make_objective(config, model, num_malicious)
    optimizer = optax.adam(outer_lr)

    def step(params, opt_state, key, ben_x, ben_y, bad_pool, anchor_features, weights):
        (_, metrics), grads = jax.value_and_grad(objective, has_aux=True)(
            params, key, ben_x, ben_y, bad_pool, anchor_features, weights, plain)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return (optax.apply_updates(params, updates), opt_state,
                {**metrics, "meta_grad_norm": optax.global_norm(grads)})

    return step


def program_config(config: SimulatedAttackConfig) -> SimulatedAttackConfig:
    """``config`` with every field that does not shape the compiled step set to a constant."""
    return dataclasses.replace(config, **_NOT_IN_PROGRAM)


def start_model(config: SimulatedAttackConfig, protocol: data.ProtocolData, keys: PRNGKey, *,
                hooks: Hooks | None = None, model: models.Model | None = None) -> Protected:
    """The model meta-training starts from (and anchors to): the reference or SKD's student."""
    if config.start == "reference":
        return reference.protect(reference.ReferenceConfig(config.start_train), protocol, keys,
                                 hooks=hooks, model=model, phase="start")
    return skd.protect(config.start_skd, protocol, keys, hooks=hooks, model=model)


def protect(config: SimulatedAttackConfig, protocol: data.ProtocolData, keys: PRNGKey, *,
            hooks: Hooks | None = None, model: models.Model | None = None,
            start: Protected | None = None) -> Protected:
    """Trains (or takes) the starting model, then meta-trains against simulated attackers.

    Args:
      start: a :class:`Protected` to start from (same seeds), e.g. shared by a sweep;
        default: :func:`start_model`.

    Returns:
      :class:`Protected` with per-seed ``beneficial_test_accuracy``,
      ``start_test_accuracy`` and ``meta_final_metrics``.
    """
    check_keys(keys)
    model = beneficial_model(protocol, model)
    check(config, protocol, model)
    if start is None:
        start = start_model(config, protocol, keys, hooks=hooks, model=model)
    elif start.params is None or jax.tree.leaves(start.params)[0].shape[0] != keys.shape[0]:
        raise ConfigError(f"start has {jax.tree.leaves(start.params)[0].shape[0]} seeds, "
                          f"keys {keys.shape[0]}")
    ben_x, ben_y = device_subset(protocol.pretrain.beneficial)
    bad_pool = jax.device_put(_malicious_pool(protocol))
    num_malicious = protocol.pretrain.malicious.num_classes
    anchor = start.params["features"]
    weights = jnp.broadcast_to(jnp.asarray([config.lam, config.anchor], jnp.float32),
                               (keys.shape[0], 2))
    program = program_config(config)
    step = make_step(program, model, num_malicious, config.outer_lr)
    plain = (make_step(program, model, num_malicious, config.outer_lr, plain=True)
             if config.alternate_every else None)
    params, last = outer_loop(
        "meta", step, start.params, optax.adam(config.outer_lr), keys, config.meta_steps,
        config.log_every, hooks, shared=(ben_x, ben_y, bad_pool), per_seed=(anchor, weights),
        plain_step=plain,
        plain_every=config.alternate_every, postfix=("good/loss", "bad/final_acc"),
        advice="try a smaller lam or outer_lr, or another bad_term, in a new run")
    accuracy = accuracy_on(model, params, device_subset(protocol.test.beneficial))
    return Protected(NAME, model, params, keys, {
        "beneficial_test_accuracy": accuracy,
        "start_test_accuracy": np.asarray(start.metrics["beneficial_test_accuracy"]),
        "meta_final_metrics": last})
