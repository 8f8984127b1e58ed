"""Simulated attackers: exact gradients through optax inner optimisers, masks, budgets.

Exactness in float64 on a smooth (tanh) model shaped like lenet (features layers
conv1, conv2, fc1, fc2; only the head's ReLU is a kink, and the directions below
never cross it at eps = 1e-5: a crossing would show as an O(1) error, not a
small one). Central differences have error eps^2 |f'''| / 6 + 2 u |f| / eps
(u = 1.1e-16): with |f| ~ 1 and |f'''| up to ~10 along these directions, about 2e-10
absolute. Hence atol 1e-9 (5x margin), and rtol 1e-7 for the larger derivatives.
"""
from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.flatten_util import ravel_pytree

from trm_jax import models, train
from trm_jax import simulated_attack as sa
from trm_jax.errors import ConfigError
from trm_jax.tasks import Task

CLASSES, SHOTS, QUERIES = 3, 4, 2


class SmoothFeatures(nn.Module):
    """lenet's layer names, tanh everywhere: smooth for finite differences."""

    @nn.compact
    def __call__(self, x):
        x = x.reshape(x.shape[:-3] + (-1,))
        for name in ("conv1", "conv2", "fc1"):
            x = jnp.tanh(nn.Dense(5, name=name, param_dtype=x.dtype, dtype=x.dtype)(x))
        return nn.Dense(4, name="fc2", param_dtype=x.dtype, dtype=x.dtype)(x)


def smooth_model(dtype=jnp.float64):
    return models.Model("lenet", SmoothFeatures(), CLASSES, (2, 2, 1), "fc2", param_dtype=dtype,
                        layers=models.LENET_LAYERS)


def init(model, seed):
    """``model.init`` as one jitted program (eagerly, each initialiser op compiles alone)."""
    return jax.jit(model.init)(jax.random.key(seed))


@pytest.fixture
def x64():
    with jax.enable_x64(True):
        yield


def make_task(seed=0, dtype=np.float64):
    rng = np.random.default_rng(seed)
    x = lambda n: jnp.asarray(rng.standard_normal((n, 2, 2, 1)), dtype)
    return Task(x(CLASSES * SHOTS), jnp.repeat(jnp.arange(CLASSES, dtype=jnp.int32), SHOTS),
                x(CLASSES * QUERIES), jnp.repeat(jnp.arange(CLASSES, dtype=jnp.int32), QUERIES))


@functools.lru_cache(maxsize=None)
def compiled(space, weighting="uniform", meta_grad="exact", remat=False, bad_term="uniform_kl"):
    """``(value(params, attacker), grad(params, attacker))`` from ONE jitted value_and_grad
    (one compile per setting), the attacker a traced argument (as in meta-training)."""
    model, task = smooth_model(), make_task()

    def f(params, attacker):
        logits = sa.attack_trajectory(params, task, jax.random.key(3), attacker, model=model,
                                      space=space, num_classes=CLASSES, meta_grad=meta_grad,
                                      remat=remat)
        return sa.trajectory_resistance(logits, task.query_y, bad_term=bad_term,
                                        weighting=weighting)[0]
    both = jax.jit(jax.value_and_grad(f))
    return (lambda p, a: both(p, a)[0]), (lambda p, a: both(p, a)[1])


def check_finite_differences(space, attacker, params, num_directions=3, eps=1e-5, seed=0,
                             **setting):
    value, grad_fn = compiled(space, **setting)
    flat, unravel = ravel_pytree(params)
    grad = np.asarray(ravel_pytree(grad_fn(params, attacker))[0])
    rng = np.random.default_rng(seed)
    for _ in range(num_directions):
        v = rng.standard_normal(flat.shape)
        at = lambda x: float(value(unravel(jnp.asarray(x)), attacker))
        numeric = (at(flat + eps * v) - at(flat - eps * v)) / (2 * eps)
        np.testing.assert_allclose(grad @ v, numeric, rtol=1e-7, atol=1e-9)
    return grad


def space_of(steps=3):
    """The tests' attacker space: one compiled program per setting serves every attacker."""
    return sa.AttackerSpace(steps=steps, data_per_class=(2, SHOTS), reinit_probability=0.5)


def test_exact_gradient_through_adam_matches_finite_differences(x64):
    # 3 steps: the first (Adam's near-sign update) and later ones; the same compiled program
    # as the sgd/momentum/reinit tests below (the attacker is a traced argument).
    space = space_of()
    params = init(smooth_model(), 0)
    for top in (4, 2):  # full fine-tuning, and the top two layers on frozen ones
        attacker = sa.fixed_attacker(space, "adam", 0.05, top_layers=top)
        grad = check_finite_differences(space, attacker, params)
        assert np.abs(grad).max() > 1e-4  # not a vacuous match


@pytest.mark.parametrize("optimizer", ["sgd", "momentum"])
def test_exact_gradient_through_sgd_and_momentum_matches_finite_differences(x64, optimizer):
    space = space_of()
    params = init(smooth_model(), 1)
    attacker = sa.fixed_attacker(space, optimizer, 0.3, top_layers=1, data_per_class=2)
    check_finite_differences(space, attacker, params)


def test_first_order_is_the_gradient_at_the_attacked_params(x64):
    """With the inner gradients stopped, d phi_K / d theta = I on the kept layers: the
    first-order gradient of the final step's term is its gradient at phi_K (closed form)."""
    space = space_of()
    model, task = smooth_model(), make_task()
    params = init(model, 0)
    attacker = sa.fixed_attacker(space, "adam", 0.05, top_layers=2)
    first = compiled(space, "final", "first_order")[1](params, attacker)
    exact = compiled(space, "final", "exact")[1](params, attacker)
    phi = jax.jit(lambda p: sa.attack_trajectory(p, task, jax.random.key(3), attacker, model=model,
                                                 space=space, num_classes=CLASSES,
                                                 return_params=True)[1])(params)
    at_phi = jax.jit(jax.grad(lambda p: sa.trajectory_resistance(
        model.apply(p, task.query_x)[None], task.query_y, bad_term="uniform_kl",
        weighting="final")[0]))(phi)
    for a, b in zip(jax.tree.leaves(first["features"]), jax.tree.leaves(at_phi["features"])):
        np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-14)
    assert all(np.all(h == 0) for h in jax.tree.leaves(first["head"]))  # the head is fresh
    gap = max(np.abs(a - b).max() for a, b in zip(jax.tree.leaves(first), jax.tree.leaves(exact)))
    assert gap > 1e-6  # second-order terms exist


def test_remat_equals_no_remat(x64):
    space = space_of()
    params = init(smooth_model(), 2)
    attacker = sa.fixed_attacker(space, "adam", 0.02, top_layers=4)
    plain = compiled(space)[1](params, attacker)
    remat = compiled(space, remat=True)[1](params, attacker)
    for a, b in zip(jax.tree.leaves(plain), jax.tree.leaves(remat)):
        np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-15)


def test_simulated_attacker_is_the_evaluations_optimizer():
    """Same trajectory as the evaluation's optax optimizer (train.make_optimizer) on the
    trained parts; the untrained layers stay bitwise frozen; eps_root moves nothing visible."""
    space = sa.AttackerSpace(steps=5, data_per_class=(SHOTS,))
    model, task = smooth_model(jnp.float32), make_task(dtype=np.float32)
    params = init(model, 0)
    attack = jax.jit(lambda a: sa.attack_trajectory(params, task, jax.random.key(3), a,
                                                    model=model, space=space,
                                                    num_classes=CLASSES, return_params=True))
    for name in sa.OPTIMIZERS:
        _, phi = attack(sa.fixed_attacker(space, name, 0.01, top_layers=2))
        start = {"features": params["features"],
                 "head": model.init_head(jax.random.split(jax.random.key(3))[0], CLASSES)}
        mask = train.trainable_mask(start, ("head", "features/fc1", "features/fc2"))
        opt = train.masked_optimizer(train.make_optimizer(name, 0.01), mask)
        loss = lambda p: optax.softmax_cross_entropy_with_integer_labels(
            model.apply(p, task.support_x), task.support_y).mean()

        @jax.jit  # one compilation per optimizer instead of one per eager op
        def reference(p):
            state = opt.init(p)
            for _ in range(5):
                updates, state = opt.update(jax.grad(loss)(p), state, p)
                p = optax.apply_updates(p, updates)
            return p

        p = reference(start)
        for a, b in zip(jax.tree.leaves(phi), jax.tree.leaves(p)):
            np.testing.assert_allclose(a, b, rtol=2e-5, atol=2e-6)
        for layer in ("conv1", "conv2"):
            assert jax.tree.all(jax.tree.map(lambda a, b: bool(jnp.all(a == b)),
                                             phi["features"][layer], params["features"][layer]))


def test_reinit_replaces_the_trained_layers_and_cuts_their_gradient(x64):
    space = space_of()
    params = init(smooth_model(), 0)
    attacker = sa.fixed_attacker(space, "sgd", 0.1, top_layers=2, reinit=True)
    grad = compiled(space)[1](params, attacker)
    for layer in ("fc1", "fc2"):  # replaced by fresh values: theta's never reach the attacker
        assert all(np.all(g == 0) for g in jax.tree.leaves(grad["features"][layer]))
    assert any(np.abs(g).max() > 0 for g in jax.tree.leaves(grad["features"]["conv1"]))


def test_data_budget_equals_a_smaller_support(x64):
    space = sa.AttackerSpace(steps=3, data_per_class=(2, SHOTS))
    model, task = smooth_model(), make_task()
    params = init(model, 0)
    attacker = sa.fixed_attacker(space, "adam", 0.05, top_layers=4, data_per_class=2)
    logits = sa.attack_trajectory(params, task, jax.random.key(3), attacker, model=model,
                                  space=space, num_classes=CLASSES)
    keep = np.arange(CLASSES * SHOTS) % SHOTS < 2
    small = task._replace(support_x=task.support_x[keep], support_y=task.support_y[keep])
    small_space = sa.AttackerSpace(steps=3, data_per_class=(2,))
    expected = sa.attack_trajectory(params, small, jax.random.key(3),
                                    sa.fixed_attacker(small_space, "adam", 0.05, 4),
                                    model=model, space=small_space, num_classes=CLASSES)
    np.testing.assert_allclose(logits, expected, rtol=1e-12)


def test_sampled_attackers_run_in_one_program_and_match_fixed_ones():
    """A vmap over sampled attackers (different optimizers, layers, lrs) equals each alone."""
    space = sa.AttackerSpace(steps=2, data_per_class=(2, SHOTS), reinit_probability=0.5)
    model, task = smooth_model(jnp.float32), make_task(dtype=np.float32)
    params = init(model, 0)
    attackers = jax.vmap(lambda k: sa.sample_attacker(k, space))(
        jax.random.split(jax.random.key(5), 12))
    run = lambda a: sa.attack_trajectory(params, task, jax.random.key(3), a, model=model,
                                         space=space, num_classes=CLASSES)
    batched, single = jax.jit(jax.vmap(run))(attackers), jax.jit(run)
    assert len(set(np.asarray(attackers.optimizer).tolist())) == 3
    for i in range(12):
        one = single(jax.tree.map(lambda a: a[i], attackers))
        np.testing.assert_allclose(batched[i], one, rtol=1e-5, atol=1e-6)


def test_sample_attacker_stays_in_the_space():
    space = sa.AttackerSpace(learning_rates=(1e-3, 1e-1), top_layers=(0, 3),
                             data_per_class=(5, 10), reinit_probability=0.25)
    a = jax.vmap(lambda k: sa.sample_attacker(k, space))(jax.random.split(jax.random.key(0), 400))
    lr = np.asarray(a.learning_rate)
    assert lr.min() >= 1e-3 * (1 - 1e-6) and lr.max() <= 1e-1 * (1 + 1e-6)
    assert set(np.asarray(a.top_layers).tolist()) == {0, 3}
    assert set(np.asarray(a.data_per_class).tolist()) == {5, 10}
    assert 0.15 < np.asarray(a.reinit).mean() < 0.35  # 400 draws: 5 standard deviations


def test_sample_attacker_takes_integer_probabilities():
    """reinit_probability=1 or 0 as ints (a search variant's literal) are certainties."""
    keys = jax.random.split(jax.random.key(0), 50)
    for p, expected in ((1, True), (0, False)):
        space = sa.AttackerSpace(top_layers=(2, 3), reinit_probability=p)
        a = jax.jit(jax.vmap(lambda k: sa.sample_attacker(k, space)))(keys)
        assert np.asarray(a.reinit).tolist() == [expected] * 50


def test_step_weights_and_trajectory_resistance():
    np.testing.assert_allclose(sa.step_weights("uniform", 4), [0.25] * 4)
    np.testing.assert_allclose(sa.step_weights("late", 3), [1 / 6, 2 / 6, 3 / 6])
    np.testing.assert_allclose(sa.step_weights("final", 3), [0, 0, 1])
    logits = jnp.stack([jnp.zeros((4, 3)), 5 * jax.nn.one_hot(jnp.arange(4) % 3, 3)])
    r, acc = sa.trajectory_resistance(logits, jnp.arange(4) % 3, bad_term="uniform_kl",
                                      weighting="final")
    assert float(r) < -1.0 and np.allclose(acc, [2 / 4, 1.0])  # a tie is class 0: 2 of 4
    r0, _ = sa.trajectory_resistance(logits[:1], jnp.arange(4) % 3, bad_term="uniform_kl",
                                     weighting="final")
    assert abs(float(r0)) < 1e-6  # uniform predictions: KL 0


def test_feature_anchor_is_zero_at_the_anchor_and_scale_free():
    model = smooth_model(jnp.float32)
    p, q = init(model, 0), init(model, 1)
    x = make_task(dtype=np.float32).support_x
    assert float(sa.feature_anchor(model, p["features"], p["features"], x)) == 0.0
    value = float(sa.feature_anchor(model, q["features"], p["features"], x))
    assert value > 0.01

    class Scaled:  # the same network with its penultimate features times c
        def __init__(self, c, anchor_c=None):
            self.c, self.anchor_c = c, c if anchor_c is None else anchor_c

        def features(self, params, images):
            c = self.anchor_c if params is p["features"] else self.c
            return c * model.features(params, images)

    for c in (1e-3, 7.0, 1e3):  # both feature sets scaled alike: the same value
        np.testing.assert_allclose(float(sa.feature_anchor(Scaled(c), q["features"], p["features"], x)),
                                   value, rtol=1e-5)
    # ... but not when only the moved model's features are scaled (the check is not vacuous)
    assert abs(float(sa.feature_anchor(Scaled(7.0, 1.0), q["features"], p["features"], x)) - value) > 1.0


@pytest.mark.parametrize("kwargs, match", [
    (dict(optimizers=("adamw",)), "optimizers"), (dict(learning_rates=(0.1, 0.01)), "learning_rates"),
    (dict(steps=0), "steps"), (dict(top_layers=()), "top_layers"),
    (dict(reinit_probability=1.5), "reinit_probability"), (dict(data_per_class=(0,)), "data_per_class"),
    (dict(eps_root=0.0), "eps_root")])
def test_attacker_space_errors(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        sa.AttackerSpace(**kwargs)


def test_attacker_space_check_against_model_and_support():
    model = smooth_model(jnp.float32)
    with pytest.raises(ConfigError, match="top_layers"):
        sa.AttackerSpace(top_layers=(5,)).check(model, shots=10)
    with pytest.raises(ConfigError, match="data_per_class"):
        sa.AttackerSpace(data_per_class=(20,)).check(model, shots=10)
    sa.AttackerSpace(top_layers=(0, 4), data_per_class=(10,)).check(model, shots=10)
    with pytest.raises(ConfigError, match="top_layers=3"):
        sa.fixed_attacker(sa.AttackerSpace(top_layers=(0, 2)), "adam", 0.1, top_layers=3)
    with pytest.raises(ConfigError, match="optimizer"):
        sa.fixed_attacker(sa.AttackerSpace(optimizers=("sgd",)), "adam", 0.1, top_layers=0)
