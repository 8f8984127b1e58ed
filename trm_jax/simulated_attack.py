r"""Simulated attackers in the inner loop, with exact gradients through optax fine-tuning.

A defence judged by fine-tuning attacks should be trained against them. Here the
inner loop of meta-learning IS an attacker from the evaluation's suite
(:mod:`trm_jax.attacks`), sampled per bad task and outer step from an
:class:`AttackerSpace`:

* which parameters it trains: a fresh head plus the top ``k`` features layers
  (``k = 0``: the linear probe, ``k = L``: full fine-tuning), optionally
  re-initialising those ``k`` layers (``reinit_top{k}``);
* its optax optimizer (sgd, momentum 0.9, adam) and a learning rate log-uniform
  over the evaluation's grid;
* how much data it has (examples per class of the support set).

The attacker takes ``K`` full-batch steps on a malicious support set, running
the optax update itself, so ``jax.grad`` of anything computed from its
trajectory is the exact second-order gradient through the attacker's gradients
AND its optimizer state (Adam's moments included). ``meta_grad="first_order"``
stops the inner gradients instead (FOMAML; with trajectory weights this is
TAR's straight-through estimator). Attackers with different optimizers and
trained parts share one compiled program: the trained parts are a traced mask
and the optimizer a ``lax.switch`` over a joint state of all three (under
``vmap`` XLA runs the branches as a select).

:func:`trajectory_resistance` scores the trajectory with a bounded bad term
(:data:`trm_jax.meta.BAD_TERMS`) summed over the inner steps with a weighting
(:data:`STEP_WEIGHTINGS`): resisting only the last step lets an attacker that
stops early win.

Adam is differentiated with ``eps_root > 0``: its update divides by
``sqrt(v + eps_root)``, and frozen (masked) parameters have ``v = 0``, where the
derivative of ``sqrt`` is infinite (optax's documentation recommends ``eps_root``
for meta-learning through Adam for the same reason).

References:
  Deng et al., 2024. *SOPHON: Non-Fine-Tunable Learning to Restrain Task Transferability
  For Pre-trained Models*. https://arxiv.org/abs/2404.12699
  Tamirisa et al., 2024. *Tamper-Resistant Safeguards for Open-Weight LLMs* (TAR).
  https://arxiv.org/abs/2408.00761
  Henderson et al., 2023. *Self-Destructing Models* (MLAC). https://arxiv.org/abs/2211.14946
"""
from __future__ import annotations

import dataclasses
import math
from typing import NamedTuple, Optional

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax

from trm_jax import meta, models, validate
from trm_jax.errors import ConfigError
from trm_jax.tasks import Task
from trm_jax.typing import Params

#: The attacker's optimizers in the order they are sampled (index = draw): the names of
#: :data:`trm_jax.train.OPTIMIZERS`, ordered from the weakest attacker up.
OPTIMIZERS = ("sgd", "momentum", "adam")
#: How the inner steps' bad terms are weighted: ``uniform`` (``1/K`` each), ``late``
#: (``k / sum k``, towards later steps, as TAR), ``final`` (the last step only, MAML).
STEP_WEIGHTINGS = ("uniform", "late", "final")
#: Meta-gradients the simulated attack supports: :data:`trm_jax.meta.META_GRADS` but Reptile
#: (its outer step is no gradient of the attacked objective).
META_GRADS = tuple(g for g in meta.META_GRADS if g != "reptile")


@dataclasses.dataclass(frozen=True)
class AttackerSpace:
    """The attackers the inner loop samples (frozen: a static argument under jit).

    Attributes:
      optimizers: names from OPTIMIZERS, sampled uniformly.
      learning_rates: (low, high), sampled log-uniformly.
      steps: inner steps K of every attacker (static; >= 1).
      top_layers: how many of the model's features layers (from the top) the
        attacker trains with its fresh head, sampled uniformly: 0 is the
        linear probe, L (4 for lenet) full fine-tuning.
      reinit_probability: the chance that an attacker re-initialises the layers it
        trains (reinit_top{k}; no effect when k = 0).
      data_per_class: support examples per class the attacker uses, sampled
        uniformly; each must be <= the support's shots.
      momentum: the momentum optimizer's coefficient (the evaluation's: 0.9).
      b1: Adam's first-moment decay (the evaluation's: 0.9).
      b2: Adam's second-moment decay (the evaluation's: 0.999).
      eps_root: Adam's eps_root (> 0: see the module docstring).
    """

    optimizers: tuple[str, ...] = OPTIMIZERS
    learning_rates: tuple[float, float] = (1e-4, 1e-1)
    steps: int = 10
    top_layers: tuple[int, ...] = (0, 1, 2, 4)
    reinit_probability: float = 0.0
    data_per_class: tuple[int, ...] = (10,)
    momentum: float = 0.9
    b1: float = 0.9
    b2: float = 0.999
    eps_root: float = 1e-12

    #: b1, b2, momentum in [0, 1) (optax's decays); eps_root > 0: Adam's sqrt(v) has an
    #: infinite derivative at v = 0 (the module docstring).
    DOMAINS = {"optimizers": validate.Tuple(validate.Choice(OPTIMIZERS)),
               "learning_rates": validate.Tuple(validate.POSITIVE, 2, 2),
               "steps": validate.COUNT, "top_layers": validate.Tuple(validate.Int(0)),
               "reinit_probability": validate.Float(0, 1),
               "data_per_class": validate.Tuple(validate.COUNT), "momentum": validate.DECAY,
               "b1": validate.DECAY, "b2": validate.DECAY, "eps_root": validate.POSITIVE}

    def __post_init__(self) -> None:
        validate.check_fields(self)
        low, high = self.learning_rates
        if not low <= high:
            raise ConfigError(f"learning_rates must be (low, high) with low <= high, got "
                              f"{self.learning_rates!r}", field="learning_rates")

    def check(self, model: models.Model, shots: int) -> None:
        """Raises :class:`ConfigError` when the space does not fit ``model`` or the support."""
        num_layers = len(layer_names(model))
        if max(self.top_layers) > num_layers:
            raise ConfigError(f"top_layers={self.top_layers} exceeds the "
                              f"{num_layers} features layers of {model.name}; allowed: "
                              f"0..{num_layers}", field="top_layers")
        if max(self.data_per_class) > shots:
            raise ConfigError(f"data_per_class={self.data_per_class} exceeds the "
                              f"support's {shots} examples per class", field="data_per_class")


class Attacker(NamedTuple):
    """One sampled attacker (traced scalars; a leading axis for a batch of them).

    Attributes:
      optimizer: ``int32[]`` index into ``space.optimizers``.
      learning_rate: ``f32[]``.
      top_layers: ``int32[]`` features layers trained (from the top).
      reinit: ``bool[]`` whether those layers are re-initialised first.
      data_per_class: ``int32[]`` support examples per class used.
    """

    optimizer: jax.Array
    learning_rate: jax.Array
    top_layers: jax.Array
    reinit: jax.Array
    data_per_class: jax.Array


def layer_names(model: models.Model) -> tuple[tuple[str, ...], ...]:
    """The features layers bottom to top, each the tuple of its param names (the evaluation's
    layer order, :attr:`trm_jax.models.Model.feature_layers`)."""
    return model.feature_layers


def sample_attacker(key: chex.PRNGKey, space: AttackerSpace) -> Attacker:
    """Draws one attacker from ``space`` (jittable)."""
    k_opt, k_lr, k_top, k_reinit, k_data = jax.random.split(key, 5)
    low, high = (math.log(v) for v in space.learning_rates)
    choice = lambda k, values: jnp.asarray(values, jnp.int32)[
        jax.random.randint(k, (), 0, len(values))]
    return Attacker(
        optimizer=jax.random.randint(k_opt, (), 0, len(space.optimizers)),
        learning_rate=jnp.exp(jax.random.uniform(k_lr, (), minval=low, maxval=high)),
        top_layers=choice(k_top, space.top_layers),
        # float: a variant's literal "reinit_probability=1" arrives as an int, which
        # bernoulli rejects
        reinit=jax.random.bernoulli(k_reinit, jnp.float32(space.reinit_probability)),
        data_per_class=choice(k_data, space.data_per_class))


def fixed_attacker(space: AttackerSpace, optimizer: str, learning_rate: float,
                   top_layers: int, reinit: bool = False,
                   data_per_class: Optional[int] = None) -> Attacker:
    """One given attacker (tests, benchmarks, and evaluating the simulation itself)."""
    if optimizer not in space.optimizers:
        raise ConfigError(f"optimizer {optimizer!r} is not in the space's {space.optimizers}")
    if not 0 <= top_layers <= max(space.top_layers):  # deeper layers are constants there
        raise ConfigError(f"top_layers={top_layers} must be in 0..{max(space.top_layers)} "
                          f"(the space's deepest attacker)")
    return Attacker(jnp.asarray(space.optimizers.index(optimizer), jnp.int32),
                    jnp.asarray(learning_rate, jnp.float32), jnp.asarray(top_layers, jnp.int32),
                    jnp.asarray(reinit), jnp.asarray(data_per_class or max(space.data_per_class),
                                                     jnp.int32))


def _layer_mask(model: models.Model, features: Params, top_layers: jax.Array) -> Params:
    """``{layer: f[]}``: 1 for the top ``top_layers`` features layers, 0 below."""
    layers = layer_names(model)
    depth = {name: len(layers) - i for i, names in enumerate(layers) for name in names}
    return {name: jax.tree.map(lambda _: (depth[name] <= top_layers), sub)
            for name, sub in features.items()}


def _optimizers(space: AttackerSpace, learning_rate: jax.Array
                ) -> tuple[optax.GradientTransformation, ...]:
    make = {"sgd": lambda: optax.sgd(learning_rate),
            "momentum": lambda: optax.sgd(learning_rate, momentum=space.momentum),
            "adam": lambda: optax.adam(learning_rate, b1=space.b1, b2=space.b2,
                                       eps_root=space.eps_root)}
    return tuple(make[name]() for name in space.optimizers)


def attack_trajectory(params: Params, task: Task, key: chex.PRNGKey, attacker: Attacker, *,
                      model: models.Model, space: AttackerSpace, num_classes: int,
                      meta_grad: str = "exact", remat: bool = False,
                      unroll: Optional[int | bool] = None, return_params: bool = False
                      ) -> chex.Array | tuple[chex.Array, Params]:
    r"""Fine-tunes ``params`` as ``attacker`` does; query logits after every step.

    .. math::
      \phi_0 = (\theta_{\mathrm{features}}\ [\text{top } k \text{ re-initialised}],\ h_0),
      \quad (u_k, s_{k+1}) = \mathrm{opt.update}(m \odot \nabla L_S(\phi_k), s_k),
      \quad \phi_{k+1} = \phi_k + m \odot u_k

    with ``h_0`` a fresh head, ``m`` the trained-parts mask and ``L_S`` the
    cross-entropy of the first ``data_per_class`` support examples of each class.

    Args:
      params: ``{"features", "head"}`` of one model (the head is replaced).
      task: one :class:`Task` (``support_x[C*shots, H, W, Ch]`` grouped by class,
        ``query_x[C*Q, ...]``), labels ``0..num_classes-1``.
      key: the fresh head's (and re-initialised layers') randomness.
      attacker: one :class:`Attacker`.
      model: the architecture.
      space: the :class:`AttackerSpace` it was drawn from (static).
      num_classes: the malicious classes (the fresh head's outputs).
      meta_grad: ``"exact"`` or ``"first_order"`` (inner gradients stopped).
      remat: ``jax.checkpoint`` each inner step (one params copy per step is kept).
      unroll: the ``lax.scan`` unroll (``None``: :func:`trm_jax.meta.resolve_inner_unroll`).
      return_params: also return the attacked params ``phi_K``.

    Returns:
      ``logits[K, C*Q, num_classes]``: the query logits after each of the ``K`` steps
      (and ``phi_K`` with ``return_params``).
    """
    if meta_grad not in META_GRADS:
        raise ConfigError(f"meta_grad must be one of {META_GRADS}, got {meta_grad!r}")
    k_head, k_reinit = jax.random.split(key)
    # Layers below the space's deepest attacker never train: constants of the inner loop
    # (statically), so it differentiates only what some attacker can change.
    names = layer_names(model)
    trainable = {n for layer in names[len(names) - max(space.top_layers):] for n in layer}
    frozen = {n: v for n, v in params["features"].items() if n not in trainable}
    features = {n: v for n, v in params["features"].items() if n in trainable}
    layers = _layer_mask(model, features, attacker.top_layers)
    if space.reinit_probability > 0 and features:  # static: no fresh init compiled otherwise
        fresh = model.init(k_reinit)["features"]
        features = jax.tree.map(lambda m, old, new: jnp.where(m & attacker.reinit, new, old),
                                layers, features, {n: fresh[n] for n in features})
    phi = {"features": features, "head": model.init_head(k_head, num_classes)}
    mask = {"features": jax.tree.map(lambda m, p: m.astype(p.dtype), layers, features),
            "head": jax.tree.map(jnp.ones_like, phi["head"])}
    apply = lambda p, x: model.apply({"features": {**frozen, **p["features"]},
                                      "head": p["head"]}, x)

    shots = task.support_x.shape[0] // num_classes
    weights = (jnp.arange(task.support_x.shape[0]) % shots < attacker.data_per_class)

    def support_loss(p: Params) -> chex.Array:
        ce = optax.softmax_cross_entropy_with_integer_labels(apply(p, task.support_x),
                                                             task.support_y)
        w = weights.astype(ce.dtype)
        return jnp.sum(w * ce) / jnp.sum(w)

    optimizers = _optimizers(space, attacker.learning_rate.astype(
        jax.tree.leaves(phi)[0].dtype))
    states = tuple(opt.init(phi) for opt in optimizers)

    def branch(i: int):
        def update(grads: Params, states: tuple, p: Params) -> tuple[Params, tuple]:
            updates, new = optimizers[i].update(grads, states[i], p)
            return updates, states[:i] + (new,) + states[i + 1:]
        return update

    branches = [branch(i) for i in range(len(optimizers))]

    def step(carry: tuple[Params, tuple], _: None) -> tuple[tuple[Params, tuple], chex.Array]:
        p, opt_states = carry
        grads = jax.grad(support_loss)(p)
        if meta_grad == "first_order":
            grads = jax.lax.stop_gradient(grads)
        grads = jax.tree.map(jnp.multiply, grads, mask)
        if len(branches) == 1:
            updates, opt_states = branches[0](grads, opt_states, p)
        else:
            updates, opt_states = jax.lax.switch(attacker.optimizer, branches, grads,
                                                 opt_states, p)
        p = jax.tree.map(lambda w, u, m: w + m * u, p, updates, mask)
        return (p, opt_states), apply(p, task.query_x)

    if remat:
        step = jax.checkpoint(step)
    if unroll is None:
        unroll = 1 if remat else meta.resolve_inner_unroll(space.steps)
    (phi, _), logits = jax.lax.scan(step, (phi, states), None, length=space.steps,
                                    unroll=unroll)
    if not return_params:
        return logits
    return logits, {"features": {**frozen, **phi["features"]}, "head": phi["head"]}


def step_weights(weighting: str, steps: int) -> np.ndarray:
    """``f64[K]`` weights of the inner steps' bad terms (sum 1), see :data:`STEP_WEIGHTINGS`."""
    if weighting not in STEP_WEIGHTINGS:
        raise ConfigError(f"step weighting must be one of {STEP_WEIGHTINGS}, got {weighting!r}")
    if weighting == "uniform":
        w = np.ones(steps)
    elif weighting == "late":
        w = np.arange(1, steps + 1, dtype=np.float64)
    else:
        w = np.zeros(steps)
        w[-1] = 1.0
    return w / w.sum()


def trajectory_resistance(logits: chex.Array, labels: chex.Array, *, bad_term: str,
                          weighting: str, cap: Optional[float] = None) -> tuple[chex.Array, chex.Array]:
    """The weighted resistance of a trajectory (larger = more resistant).

    Args:
      logits: ``[K, Q, C]`` query logits after each inner step.
      labels: ``int32[Q]``.
      bad_term: a name of :data:`trm_jax.meta.BAD_TERMS`.
      weighting: one of :data:`STEP_WEIGHTINGS`.
      cap: the ``clipped_ascent`` cap (``None``: ``log C``).

    Returns:
      ``(R, accuracy)``: ``sum_k w_k R(logits_k)`` and the query accuracy ``f[K]``
      after each step (no gradient).
    """
    chex.assert_rank(logits, 3)
    if bad_term not in meta.BAD_TERMS:
        raise ConfigError(f"bad_term must be one of {tuple(meta.BAD_TERMS)}, got {bad_term!r}")
    per_step = jax.vmap(lambda z: meta.BAD_TERMS[bad_term](z, labels, cap))(logits)
    w = jnp.asarray(step_weights(weighting, logits.shape[0]), per_step.dtype)
    acc = jax.vmap(lambda z: meta.accuracy(z, labels))(jax.lax.stop_gradient(logits))
    return jnp.sum(w * per_step), acc


def feature_anchor(model: models.Model, features: Params, anchor_features: Params,
                   images: chex.Array) -> chex.Array:
    """``mean ||f(x) - f_0(x)||^2 / mean ||f_0(x)||^2``: how far the penultimate
    features moved from the anchor model's (scale-free; no gradient to the anchor)."""
    f = model.features(features, images)
    f0 = jax.lax.stop_gradient(model.features(anchor_features, images))
    return jnp.sum((f - f0) ** 2) / jnp.maximum(jnp.sum(f0 ** 2), 1e-12)


__all__ = ["AttackerSpace", "Attacker", "OPTIMIZERS", "STEP_WEIGHTINGS", "META_GRADS",
           "sample_attacker", "fixed_attacker", "attack_trajectory", "step_weights",
           "trajectory_resistance", "feature_anchor", "layer_names"]
