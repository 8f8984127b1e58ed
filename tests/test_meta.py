"""Tests for trm_jax.meta: exactness of the meta-gradients, variants, and the outer step.

Exactness is checked in float64 (finite differences, closed forms). The models are
tiny, test data comes from numpy (eager ``jax.random`` compiles a kernel per shape),
and compiled functions are shared between tests, so the file stays fast on 2 CPU cores.
"""
import dataclasses
import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.flatten_util import ravel_pytree

from trm_jax import meta
from trm_jax.tasks import Task, group_by_class

tree_map = jax.tree_util.tree_map
tree_leaves = jax.tree_util.tree_leaves


@pytest.fixture
def x64():
    with jax.enable_x64(True):
        yield


def assert_trees_close(a: Any, b: Any, rtol: float = 1e-12, atol: float = 1e-12) -> None:
    assert jax.tree_util.tree_structure(a) == jax.tree_util.tree_structure(b)
    for x, y in zip(tree_leaves(a), tree_leaves(b)):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=rtol, atol=atol)


def normal(rng, shape, scale=1.0, dtype=np.float64):
    return jnp.asarray(scale * rng.standard_normal(shape), dtype)


# ----------------------------------------------------------------------- tiny models


def mlp_init(seed, d_in=3, hidden=5, classes=4):
    rng = np.random.default_rng(seed)
    return {"w1": normal(rng, (d_in, hidden), 0.8), "b1": normal(rng, (hidden,), 0.3),
            "w2": normal(rng, (hidden, classes), 0.8), "b2": normal(rng, (classes,), 0.3)}


def mlp_apply(params, x):
    """Smooth (tanh) so finite differences see no kinks."""
    h = jnp.tanh(x @ params["w1"] + params["b1"][None, :])
    return h @ params["w2"] + params["b2"][None, :]


@dataclasses.dataclass(frozen=True)
class TinyNet:
    """A Model-like split net: [conv3x3 or 1x1 mix] + tanh + dense (features); ReLU + dense (head).

    ``conv=False`` replaces the conv by a channel mix (faster to compile) where per-task
    conv weights don't matter.
    """

    num_classes: int = 4
    input_shape: tuple = (4, 4, 1)
    channels: int = 2
    dim: int = 5
    dtype: Any = jnp.float32
    conv: bool = False

    def _shapes(self):
        h, w, c = self.input_shape
        return {"features": {"k": ((3, 3, c, self.channels), 0.5),
                             "kb": ((self.channels,), 0.1),
                             "w": ((h * w * self.channels, self.dim), 0.3),
                             "b": ((self.dim,), 0.1)},
                "head": {"w": ((self.dim, self.num_classes), 0.5), "b": ((self.num_classes,), 0.1)}}

    def _init(self, key, shapes):
        leaves, tree = jax.tree_util.tree_flatten(shapes, is_leaf=lambda x: isinstance(x, tuple))
        keys = jax.random.split(key, len(leaves))
        return jax.tree_util.tree_unflatten(tree, [scale * jax.random.normal(k, shape, self.dtype)
                                                   for k, (shape, scale) in zip(keys, leaves)])

    def init_head(self, key):
        return self._init(key, self._shapes()["head"])

    def init_np(self, seed):
        rng = np.random.default_rng(seed)
        return tree_map(lambda s: normal(rng, s[0], s[1], self.dtype), self._shapes(),
                        is_leaf=lambda x: isinstance(x, tuple))

    def features(self, fp, x):
        if jnp.issubdtype(x.dtype, jnp.integer):
            x = x.astype(self.dtype) / 127.5 - 1.0
        if self.conv:
            y = jax.lax.conv_general_dilated(x, fp["k"], (1, 1), "SAME",
                                             dimension_numbers=("NHWC", "HWIO", "NHWC"))
        else:
            y = x @ fp["k"][1, 1]
        y = jnp.tanh(y + fp["kb"].reshape(1, 1, 1, -1))
        return y.reshape(y.shape[0], -1) @ fp["w"] + fp["b"][None, :]

    def head(self, hp, f):
        return jax.nn.relu(f) @ hp["w"] + hp["b"][None, :]

    def apply(self, params, x):
        return self.head(params["head"], self.features(params["features"], x))


def random_tasks(seed, num_tasks, support, query, x_shape, classes=4):
    rng = np.random.default_rng(seed)
    labels = lambda n: jnp.asarray(rng.integers(0, classes, (num_tasks, n)), jnp.int32)
    return Task(normal(rng, (num_tasks, support, *x_shape)), labels(support),
                normal(rng, (num_tasks, query, *x_shape)), labels(query))


GOOD_BAD = np.array([True, True, False])  # two good tasks, one bad
KEYS3 = jax.random.split(jax.random.key(0), 3)
CFG = meta.MetaConfig(inner_steps=1, inner_lr=0.3, lam=0.7, task_batching="vmap")


@functools.partial(jax.jit, static_argnames=("config", "model"))
def value_and_grad(params, tasks, is_good, keys, config, model):
    """Shared compiled ``(J, metrics), dJ/dparams`` of the Reverse-MAML objective."""
    return jax.value_and_grad(meta.reverse_maml_loss, has_aux=True)(
        params, tasks, is_good, keys, config, model)


def check_finite_differences(f_and_grad, params, num_directions=3, eps=1e-5, seed=0):
    """<grad f, v> vs central differences (f(p + eps v) - f(p - eps v)) / 2 eps, float64."""
    flat, unravel = ravel_pytree(params)
    value = lambda x: float(f_and_grad(unravel(jnp.asarray(x)))[0])
    grad = np.asarray(ravel_pytree(f_and_grad(params)[1])[0])
    rng = np.random.default_rng(seed)
    flat = np.asarray(flat)
    for _ in range(num_directions):
        v = rng.standard_normal(flat.shape)
        numeric = (value(flat + eps * v) - value(flat - eps * v)) / (2 * eps)
        np.testing.assert_allclose(grad @ v, numeric, rtol=1e-7, atol=1e-9)


# ------------------------------------------------------- (a) finite differences


@pytest.mark.parametrize("steps", [1, 3])
def test_exact_meta_gradient_matches_finite_differences(x64, steps):
    """Good and bad tasks, lam > 0: the second-order meta-gradient is exact."""
    params, tasks = mlp_init(0), random_tasks(1, 3, 6, 5, (3,))
    config = dataclasses.replace(CFG, inner_steps=steps)
    f = lambda p: (lambda vg: (vg[0][0], vg[1]))(
        value_and_grad(p, tasks, GOOD_BAD, KEYS3, config, mlp_apply))
    check_finite_differences(f, params)
    assert np.linalg.norm(ravel_pytree(f(params)[1])[0]) > 1e-3


def test_fresh_head_mode_matches_finite_differences_and_ignores_the_head(x64):
    model = TinyNet(dtype=jnp.float64)
    params, tasks = model.init_np(4), random_tasks(5, 3, 6, 5, model.input_shape)
    config = dataclasses.replace(CFG, inner_steps=2, adapt="head", head_init="fresh")
    f = lambda p, k=KEYS3: (lambda vg: (vg[0][0], vg[1]))(
        value_and_grad(p, tasks, GOOD_BAD, k, config, model))
    check_finite_differences(f, params)
    grads = f(params)[1]
    assert all((g == 0).all() for g in tree_leaves(grads["head"]))
    assert all((g != 0).any() for g in tree_leaves(grads["features"]))
    other = f(params, KEYS3[::-1])[1]  # a fresh head per task, drawn from the task's key
    assert not np.allclose(grads["features"]["w"], other["features"]["w"])


def test_bounded_bad_terms_match_finite_differences(x64):
    logits = normal(np.random.default_rng(2), (5, 4))
    labels = jnp.arange(5) % 4
    for term in (meta.clipped_ascent, meta.inverse_ce, meta.uniform_kl, meta.max_entropy):
        f = jax.jit(jax.value_and_grad(lambda z: term(z, labels, 1.2)))
        check_finite_differences(f, logits)


# ---------------------------------------------------------------- (b) K = 0


def test_zero_steps_is_the_ordinary_gradient(x64):
    params, tasks = mlp_init(6), random_tasks(7, 3, 6, 5, (3,))
    assert meta.adapt(params, tasks.support_x[0], tasks.support_y[0], apply_fn=mlp_apply,
                      inner_lr=0.3, steps=0) is params
    config = dataclasses.replace(CFG, inner_steps=0)
    _, grad = value_and_grad(params, tasks, GOOD_BAD, KEYS3, config, mlp_apply)

    def direct(p):
        ce = [meta.softmax_cross_entropy(mlp_apply(p, x), y)
              for x, y in zip(tasks.query_x, tasks.query_y)]
        return (ce[0] + ce[1]) / 2 - 0.7 * ce[2]

    assert_trees_close(grad, jax.jit(jax.grad(direct))(params))


# ------------------------------------------------- (c, d) closed-form quadratics


def quadratic(w, a, b):
    """L(w) = 0.5 (w - b)^T A (w - b); the "inputs" are A and the "targets" b."""
    return 0.5 * (w - b) @ a @ (w - b)


def quadratic_task(seed, d=4):
    rng = np.random.default_rng(seed)
    spd = lambda m: m @ m.T / d + 0.5 * np.eye(d)
    a_s, a_q = (jnp.asarray(spd(rng.standard_normal((d, d)))) for _ in range(2))
    b_s, b_q, w = (normal(rng, (d,)) for _ in range(3))
    return w, Task(a_s[None], b_s[None], a_q[None], b_q[None]), (a_s, b_s, a_q, b_q)


@pytest.mark.parametrize("steps", [1, 3])
def test_closed_form_quadratic_meta_gradient(x64, steps):
    """w_K = b_s + (I - a A_s)^K (w - b_s);  dL_q(w_K)/dw = (I - a A_s)^K A_q (w_K - b_q)."""
    w, task, (a_s, b_s, a_q, b_q) = quadratic_task(8)
    lr = 0.3
    m_k = np.linalg.matrix_power(np.eye(4) - lr * a_s, steps)
    w_k = b_s + m_k @ (w - b_s)
    kwargs = dict(loss_fn=quadratic, inner_lr=lr, steps=steps)
    adapted, grad = jax.jit(lambda p: (meta.adapt(p, a_s, b_s, **kwargs),
                                       jax.grad(lambda q: meta.meta_loss(q, task, **kwargs))(p)))(w)
    np.testing.assert_allclose(adapted, w_k, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(grad, m_k.T @ a_q @ (w_k - b_q), rtol=1e-10, atol=1e-10)


def test_first_order_differs_by_the_hessian_term(x64):
    """K = 1: exact = (I - a A_s) g, first-order = g, difference = -a A_s g."""
    w, task, (a_s, b_s, a_q, b_q) = quadratic_task(9)
    lr = 0.3
    kwargs = dict(loss_fn=quadratic, inner_lr=lr, steps=1)
    exact, fo = jax.jit(lambda p: (
        jax.grad(lambda q: meta.meta_loss(q, task, **kwargs))(p),
        jax.grad(lambda q: meta.meta_loss(q, task, first_order=True, **kwargs))(p)))(w)
    g = a_q @ (w - lr * a_s @ (w - b_s) - b_q)  # grad of L_q at w_1
    np.testing.assert_allclose(fo, g, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(exact - fo, -lr * a_s @ g, rtol=1e-10, atol=1e-12)
    assert np.linalg.norm(lr * a_s @ g) > 1e-2  # the term is really there


def test_reptile_gradient_closed_form(x64):
    w, task, (a_s, b_s, _, _) = quadratic_task(10)
    lr = 0.3
    m2 = np.linalg.matrix_power(np.eye(4) - lr * a_s, 2)
    kwargs = dict(loss_fn=quadratic, inner_lr=lr, steps=2)
    grad, flipped = jax.jit(lambda p: (
        meta.reptile_gradient(p, task, **kwargs),
        meta.reptile_gradient(p, task, weights=jnp.array([-0.5]), **kwargs)))(w)
    np.testing.assert_allclose(grad, (w - b_s) - m2 @ (w - b_s), rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(flipped, -0.5 * grad, rtol=1e-12, atol=1e-12)


def test_adapt_recomputes_the_gradient_every_step(x64):
    params = mlp_init(11)
    x, y = normal(np.random.default_rng(12), (6, 3)), jnp.arange(6) % 4
    loss = meta.classification_loss(mlp_apply)
    grad = jax.jit(jax.grad(loss))
    manual, g0 = params, grad(params, x, y)
    for _ in range(3):
        manual = tree_map(lambda w, g: w - 0.5 * g, manual, grad(manual, x, y))
    adapted = jax.jit(lambda p: meta.adapt(p, x, y, apply_fn=mlp_apply, inner_lr=0.5, steps=3))(
        params)
    assert_trees_close(adapted, manual)
    stale = tree_map(lambda w, g: w - 1.5 * g, params, g0)  # the pitfall: one gradient, 3 times
    assert not np.allclose(adapted["w1"], stale["w1"], atol=1e-6)


# ------------------------------------------------------------ (e) remat, variants


def test_remat_gives_identical_gradients(x64):
    params, tasks = mlp_init(0), random_tasks(1, 3, 6, 5, (3,))
    plain, remat = (value_and_grad(params, tasks, GOOD_BAD, KEYS3,
                                   dataclasses.replace(CFG, inner_steps=3, remat=r), mlp_apply)
                    for r in (False, True))  # the first is shared with the K = 3 FD test
    assert_trees_close(plain, remat)


def test_first_order_flag_is_really_first_order(x64):
    params, tasks = mlp_init(0), random_tasks(1, 3, 6, 5, (3,))
    _, exact = value_and_grad(params, tasks, GOOD_BAD, KEYS3, CFG, mlp_apply)
    fo_config = dataclasses.replace(CFG, meta_grad="first_order")
    _, fo = value_and_grad(params, tasks, GOOD_BAD, KEYS3, fo_config, mlp_apply)

    def by_hand(p):  # FOMAML: the query gradient at the adapted params, d(adapted)/dp = I
        adapted = [jax.lax.stop_gradient(meta.adapt(p, sx, sy, apply_fn=mlp_apply,
                                                    inner_lr=0.3, steps=1))
                   for sx, sy in zip(tasks.support_x, tasks.support_y)]
        shifted = [tree_map(lambda a, q: a + q - jax.lax.stop_gradient(q), ad, p) for ad in adapted]
        ce = [meta.softmax_cross_entropy(mlp_apply(s, x), y)
              for s, x, y in zip(shifted, tasks.query_x, tasks.query_y)]
        return (ce[0] + ce[1]) / 2 - 0.7 * ce[2]

    assert_trees_close(fo, jax.jit(jax.grad(by_hand))(params))
    assert not np.allclose(exact["w1"], fo["w1"], atol=1e-4)


def test_task_batching_strategies_agree(x64):
    """vmap (grouped convs), lax.map and unroll: same values and gradients, both modes."""
    model = TinyNet(dtype=jnp.float64, conv=True)
    params, tasks = model.init_np(17), random_tasks(18, 2, 3, 3, model.input_shape)
    is_good, keys = GOOD_BAD[1:], KEYS3[1:]
    results = {s: value_and_grad(params, tasks, is_good, keys,
                                 dataclasses.replace(CFG, task_batching=s), model)
               for s in ("vmap", "map", "unroll")}
    assert_trees_close(results["vmap"], results["map"], rtol=1e-10, atol=1e-12)
    assert_trees_close(results["vmap"], results["unroll"], rtol=1e-10, atol=1e-12)
    head = {s: value_and_grad(params, tasks, is_good, keys, dataclasses.replace(
        CFG, adapt="head", task_batching=s), model) for s in ("vmap", "map")}
    assert_trees_close(head["vmap"], head["map"], rtol=1e-10, atol=1e-12)


def test_resolve_task_batching():
    assert meta.resolve_task_batching("auto", "gpu") == "vmap"
    assert meta.resolve_task_batching("auto", "tpu") == "vmap"
    assert meta.resolve_task_batching("auto", "cpu") in ("map", "unroll")
    assert meta.resolve_task_batching("auto", "cpu", adapt="head") in ("map", "unroll")
    assert meta.resolve_task_batching("auto", "gpu", adapt="head") == "vmap"
    assert meta.resolve_task_batching("map", "gpu") == "map"
    with pytest.raises(ValueError, match="task_batching must be one of"):
        meta.resolve_task_batching("pmap")


def test_reptile_meta_gradient_flips_bad_tasks(x64):
    params, tasks = mlp_init(20), random_tasks(21, 3, 6, 5, (3,))
    config = dataclasses.replace(CFG, inner_steps=2, meta_grad="reptile")
    (grads, metrics), expected = jax.jit(lambda p: (
        meta.meta_gradient(p, tasks, GOOD_BAD, KEYS3, config, mlp_apply),
        meta.reptile_gradient(p, tasks, loss_fn=meta.classification_loss(mlp_apply),
                              inner_lr=0.3, steps=2, weights=jnp.array([0.5, 0.5, -0.7]))))(params)
    assert_trees_close(grads, expected)
    assert set(metrics) >= {"good/post_loss", "bad/post_loss", "objective"}


# ------------------------------------------------------------------ head mode


def test_head_mode_equals_all_mode_with_features_masked(x64):
    model = TinyNet(dtype=jnp.float64)
    params, tasks = model.init_np(22), random_tasks(23, 3, 6, 5, model.input_shape)
    config = dataclasses.replace(CFG, inner_steps=3, adapt="head")
    (value, _), grad = value_and_grad(params, tasks, GOOD_BAD, KEYS3, config, model)
    mask = {"features": False, "head": True}

    def masked_all(p):
        adapted = [meta.adapt(p, sx, sy, apply_fn=model.apply, inner_lr=0.3, steps=3, mask=mask)
                   for sx, sy in zip(tasks.support_x, tasks.support_y)]
        ce = [meta.softmax_cross_entropy(model.apply(a, x), y)
              for a, x, y in zip(adapted, tasks.query_x, tasks.query_y)]
        return (ce[0] + ce[1]) / 2 - 0.7 * ce[2], adapted

    (expected, adapted), expected_grad = jax.jit(
        jax.value_and_grad(masked_all, has_aux=True))(params)
    single = jax.jit(lambda p, t, k: meta.task_logits(p, t, k, config, model))
    for i, a in enumerate(adapted):
        assert_trees_close(a["features"], params["features"], rtol=0, atol=0)  # untouched
        assert not np.allclose(a["head"]["w"], params["head"]["w"])  # the head did adapt
        pre, post, delta = single(params, tree_map(lambda x: x[i], tasks), KEYS3[i])
        np.testing.assert_allclose(post, model.apply(a, tasks.query_x[i]), rtol=1e-12)
        np.testing.assert_allclose(pre, model.apply(params, tasks.query_x[i]), rtol=1e-12)
        assert_trees_close(delta, tree_map(jnp.subtract, params["head"], a["head"]))
    np.testing.assert_allclose(value, expected, rtol=1e-12)
    assert_trees_close(grad, expected_grad)


# ------------------------------------------------------------------ bad terms


def test_bad_terms_values_signs_and_caps(x64):
    logits = normal(np.random.default_rng(26), (7, 4), 2.0)
    labels = jnp.arange(7) % 4
    p = np.asarray(jax.nn.softmax(logits))
    p_true = p[np.arange(7), labels]
    ce = -np.log(p_true)
    down = logits.at[jnp.arange(7), labels].add(-1.0)  # the true class loses probability
    flat = jnp.full((7, 4), 0.3, jnp.float64)  # uniform predictions
    cap = float(np.median(ce))
    wrong = jnp.where(jax.nn.one_hot(labels, 4) > 0, -50.0, 50.0)  # far past any cap

    @jax.jit
    def evaluate():
        terms = {name: (fn(logits, labels, cap), fn(down, labels, cap))
                 for name, fn in meta.BAD_TERMS.items()}
        grads = {"clipped": jax.grad(meta.clipped_ascent)(logits, labels, cap),
                 "ascent": jax.grad(meta.ascent)(logits, labels),
                 "clipped_wrong": jax.grad(meta.clipped_ascent)(wrong, labels),
                 "kl_flat": jax.grad(meta.uniform_kl)(flat, labels)}
        return terms, grads, meta.uniform_kl(flat, labels), meta.clipped_ascent(wrong, labels)

    terms, grads, kl_flat, clipped_wrong = evaluate()
    np.testing.assert_allclose(terms["ascent"][0], ce.mean(), rtol=1e-12)
    np.testing.assert_allclose(terms["clipped_ascent"][0], np.minimum(ce, cap).mean(), rtol=1e-12)
    np.testing.assert_allclose(terms["inverse_ce"][0], np.log1p(-p_true).mean(), rtol=1e-10)
    kl = (0.25 * (np.log(0.25) - np.log(p))).sum(-1).mean()
    np.testing.assert_allclose(terms["uniform_kl"][0], -kl, rtol=1e-10)
    assert terms["inverse_ce"][0] < 0 and terms["uniform_kl"][0] < 0  # both bounded by 0
    np.testing.assert_allclose(terms["max_entropy"][0], -(p * np.log(p)).sum(-1).mean(), rtol=1e-10)
    assert 0 < terms["max_entropy"][0] < math.log(4)  # bounded by log C (uniform)
    # Larger = more resistant: each label-aware term grows as the true class loses mass.
    for name in ("ascent", "clipped_ascent", "inverse_ce"):
        assert terms[name][1] > terms[name][0], name
    # uniform_kl: maximal (0) with zero gradient at uniform predictions.
    assert abs(kl_flat) < 1e-12
    np.testing.assert_allclose(grads["kl_flat"], 0, atol=1e-12)
    # clipped_ascent: no gradient past the cap, the ascent gradient below it.
    np.testing.assert_array_equal(grads["clipped"][ce > cap], 0)
    np.testing.assert_allclose(grads["clipped"][ce < cap], grads["ascent"][ce < cap], rtol=1e-12)
    assert clipped_wrong == pytest.approx(math.log(4))  # default cap: chance level, log C
    np.testing.assert_array_equal(grads["clipped_wrong"], 0)


def test_objective_subtracts_lambda_times_the_bad_term(x64):
    params, tasks = mlp_init(0), random_tasks(1, 3, 6, 5, (3,))
    configs = {t: dataclasses.replace(CFG, bad_term=t) for t in meta.BAD_TERMS}
    results = jax.jit(lambda p: {t: meta.reverse_maml_loss(p, tasks, GOOD_BAD, KEYS3, c, mlp_apply)
                                 for t, c in configs.items()})(params)
    for value, m in results.values():
        np.testing.assert_allclose(value, m["good/post_loss"] - 0.7 * m["bad/term"], rtol=1e-12)
        assert m["objective"] == value
    np.testing.assert_allclose(results["ascent"][1]["bad/term"],
                               results["ascent"][1]["bad/post_loss"], rtol=1e-12)
    # A descent step on the objective *raises* the bad task's post-adaptation loss (ascent).
    (_, before), grads = value_and_grad(params, tasks, GOOD_BAD, KEYS3, CFG, mlp_apply)
    stepped = tree_map(lambda w, g: w - 1e-2 * g, params, grads)
    (_, after), _ = value_and_grad(stepped, tasks, GOOD_BAD, KEYS3, CFG, mlp_apply)
    assert after["bad/post_loss"] > before["bad/post_loss"]
    assert after["good/post_loss"] < before["good/post_loss"]


# ------------------------------------------------------------------ outer step


def _pools(model, rng):
    def pool(num_classes, per_class):
        shape = (num_classes * per_class, *model.input_shape)
        images = rng.integers(0, 256, shape).astype(np.uint8)
        return jax.device_put(group_by_class(images, np.repeat(np.arange(num_classes), per_class),
                                             num_classes))
    return pool(4, 6), pool(4, 5)


METRIC_NAMES = {"objective", "meta_grad_norm", "bad/term"} | {
    f"{g}/{w}_{m}" for g in ("good", "bad") for w in ("pre", "post") for m in ("loss", "acc")}


def test_meta_step_vmapped_over_seeds_equals_separate_steps():
    model = TinyNet()
    good, bad = _pools(model, np.random.default_rng(0))
    config = meta.MetaConfig(ways=2, shots=2, queries=2, good_tasks=1, bad_tasks=1,
                             inner_steps=1, inner_lr=0.4, task_batching="vmap")
    opt = optax.adam(1e-2)
    step = meta.make_meta_step(config, model, opt)
    keys = jax.random.split(jax.random.key(30), 2)
    params = tree_map(lambda *a: jnp.stack(a), model.init_np(0), model.init_np(1))
    states = jax.vmap(opt.init)(params)
    batched_step = jax.jit(jax.vmap(step, in_axes=(0, 0, 0, None, None)))
    batched = batched_step(params, states, keys, good, bad)
    single = jax.jit(step)
    for i in range(2):
        take = lambda t: tree_map(lambda a: a[i], t)
        out = single(take(params), take(states), keys[i], good, bad)
        assert_trees_close(take(batched), out, rtol=2e-5, atol=1e-6)
    metrics = take(batched[2])
    assert set(metrics) == METRIC_NAMES
    assert all(np.isfinite(v) for v in metrics.values()) and metrics["meta_grad_norm"] > 0
    assert not np.allclose(batched[0]["head"]["w"][0], params["head"]["w"][0])  # it stepped


def test_meta_step_without_bad_tasks_is_plain_maml(x64):
    """No bad tasks: the step is one optimizer step on the exact MAML gradient of
    :func:`meta.meta_loss` over the same sampled tasks (rebuilt here from the step's key)."""
    from trm_jax.tasks import sample_tasks

    model = TinyNet(dtype=jnp.float64)
    good, _ = _pools(model, np.random.default_rng(1))
    config = meta.MetaConfig(ways=3, shots=1, queries=1, good_tasks=2, bad_tasks=0,
                             inner_steps=1, inner_lr=0.4, adapt="all", label_mode="shuffled",
                             task_batching="map")
    opt = optax.sgd(0.1)
    params, key = model.init_np(0), jax.random.key(1)
    new, _, metrics = jax.jit(meta.make_meta_step(config, model, opt))(
        params, opt.init(params), key, good, None)
    assert set(metrics) == METRIC_NAMES
    assert metrics["bad/post_loss"] == 0 and metrics["objective"] == metrics["good/post_loss"]

    tasks = sample_tasks(jax.random.split(key, 3)[0], good, 2, 3, 1, 1, "shuffled")
    ce = lambda p, x, y: optax.softmax_cross_entropy_with_integer_labels(model.apply(p, x), y).mean()
    value, grads = jax.value_and_grad(meta.meta_loss)(params, tasks, loss_fn=ce, inner_lr=0.4,
                                                      steps=1)
    want = optax.apply_updates(params, opt.update(grads, opt.init(params), params)[0])
    np.testing.assert_allclose(metrics["objective"], value, rtol=1e-12)
    assert_trees_close(new, want, rtol=1e-10, atol=1e-12)
    assert not np.allclose(new["features"]["w"], params["features"]["w"])  # the step moved


def test_meta_step_errors():
    model = TinyNet()
    good, bad = _pools(model, np.random.default_rng(2))
    opt = optax.sgd(0.1)
    params = model.init_np(0)
    step = meta.make_meta_step(meta.MetaConfig(ways=3, shots=3, queries=3), model, opt)
    with pytest.raises(ValueError, match="malicious pool: shots \\+ queries = 6"):
        step(params, opt.init(params), jax.random.key(0), good, bad)
    with pytest.raises(ValueError, match="needs a malicious pool"):
        step(params, opt.init(params), jax.random.key(0), good, None)
    with pytest.raises(ValueError, match="needs a Model-like"):
        meta.make_meta_step(meta.MetaConfig(adapt="head"), mlp_apply, opt)
    small = dataclasses.replace(model, num_classes=3)
    with pytest.raises(ValueError, match="needs 4 head outputs"):
        meta.make_meta_step(meta.MetaConfig(ways=2, shots=1, queries=1), small, opt)(
            params, opt.init(params), jax.random.key(0), good, bad)


def test_meta_config_validation_and_hashing():
    config = meta.MetaConfig()
    assert hash(config) == hash(meta.MetaConfig()) and config.label_mode == "fixed"
    for bad in [dict(bad_term="kl"), dict(meta_grad="second"), dict(adapt="body"),
                dict(ways=0), dict(inner_lr=0.0), dict(lam=-1.0), dict(loss_cap=0.0),
                dict(task_batching="pmap"), dict(label_mode="random"), dict(inner_steps=-1)]:
        with pytest.raises(ValueError, match=next(iter(bad))) as err:
            meta.MetaConfig(**bad)
        assert err.value.field == next(iter(bad))
    with pytest.raises(ValueError, match="reptile"):
        meta.MetaConfig(meta_grad="reptile", adapt="head")


# ------------------------------------------------------------ library use


def test_generic_maml_on_linear_regression_learns():
    """trm_jax.meta on its own: exact MAML with any loss_fn and an optax outer loop."""
    loss = lambda w, x, y: jnp.mean((x @ w - y) ** 2)

    def tasks(key, n=8, k=5):  # y = x . w_t with w_t = c + small noise: a good init is c
        kw, kx = jax.random.split(key)
        w_true = jnp.array([[2.0, -1.0]]) + 0.3 * jax.random.normal(kw, (n, 2))
        x = jax.random.normal(kx, (n, 2 * k, 2))
        y = jnp.einsum("tkd,td->tk", x, w_true)
        return Task(x[:, :k], y[:, :k], x[:, k:], y[:, k:])

    opt = optax.adam(0.05)

    @jax.jit
    def step(w, state, key):
        value, g = jax.value_and_grad(meta.meta_loss)(w, tasks(key), loss_fn=loss,
                                                      inner_lr=0.1, steps=2)
        updates, state = opt.update(g, state, w)
        return optax.apply_updates(w, updates), state, value

    w, state = jnp.zeros(2), opt.init(jnp.zeros(2))
    values = []
    for i in range(150):
        w, state, value = step(w, state, jax.random.key(i))
        values.append(float(value))
    assert np.mean(values[-10:]) < 0.2 * np.mean(values[:10])
    # The task weights are c + 0.3 N(0, I): by symmetry the best init is c = (2, -1) exactly,
    # so the learned init must be far closer to it than to the start (|0 - c| = 2.24). The
    # bound: the objective's gradient near c is dominated by the tasks' sampling noise of
    # w_t (std 0.3, 8 tasks a batch: 0.3 / sqrt(8) = 0.11 per coordinate); Adam's last
    # steps move w by ~lr = 0.05 each, so w sits within a few times 0.11 of c.
    np.testing.assert_array_less(np.abs(np.asarray(w) - np.array([2.0, -1.0])), 0.25)
    assert np.linalg.norm(np.asarray(w) - np.array([2.0, -1.0])) < 0.1 * np.linalg.norm([2.0, -1.0])


def test_resolve_inner_unroll_is_per_backend():
    assert meta.resolve_inner_unroll(5, "gpu") == 1
    assert meta.resolve_inner_unroll(5, "cpu") is True
    assert meta.resolve_inner_unroll(50, "cpu") == 1
    for bad in (0, -1, 1.5, "full"):
        with pytest.raises(ValueError, match="inner_unroll"):
            meta.MetaConfig(inner_unroll=bad)
    assert meta.MetaConfig(inner_unroll=True).inner_unroll is True


@pytest.mark.parametrize("unroll", [2, True, None])
def test_inner_unroll_gives_the_same_exact_meta_gradient(x64, unroll):
    """Partially and fully unrolled inner loops, and the per-backend default (3 steps):
    the same values and gradients as the rolled loop (unroll=1: a different program)."""
    model = TinyNet(dtype=jnp.float64, conv=True)
    params, tasks = model.init_np(21), random_tasks(22, 3, 4, 3, model.input_shape)
    config = dataclasses.replace(CFG, inner_steps=3, task_batching="unroll")
    want = value_and_grad(params, tasks, GOOD_BAD, KEYS3,
                          dataclasses.replace(config, inner_unroll=1), model)
    got = value_and_grad(params, tasks, GOOD_BAD, KEYS3,
                         dataclasses.replace(config, inner_unroll=unroll), model)
    assert_trees_close(got, want, rtol=1e-12, atol=1e-13)
