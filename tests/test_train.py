import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from trm_jax import models, train


def tiny_problem(n=96, seed=0):
    """A small learnable 3-class problem on 8x8x1 uint8 images (random, never zeros)."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 3, n).astype(np.int32)
    images = rng.integers(0, 256, (n, 8, 8, 1)).astype(np.uint8)
    images[:, :, :, 0] = np.clip(images[:, :, :, 0] // 4 + 60 * labels[:, None, None], 1, 255)
    return jnp.asarray(images), jnp.asarray(labels)


MODEL = models.lenet(3, (8, 8, 1), padding="SAME")
LOSS = train.classification_loss(MODEL.apply)


# Float64 and where the tolerance comes from (as in test_sharding): vmapping seeds or
# scanning an epoch may only reorder floating-point sums, which training amplifies to
# ~20-200 ulps (measured there after 2 epochs of Adam); in float32 that is the size of real
# parameter differences, so no float32 tolerance both catches a mixed-up seed and never
# flakes. In float64 1e6 ulps (2.2e-10) is far above any reordering and ~1e6x below what a
# real bug (a seed given another seed's data, key or update) produces.
TOLERANCE = 1e6 * float(np.finfo(np.float64).eps)


def stacked_state(seeds, optimizer, model=MODEL):
    keys = jax.vmap(jax.random.key)(jnp.asarray(seeds))
    params = model.init_seeds(keys)
    return jax.vmap(train.init_state, in_axes=(0, 0, None))(keys, params, optimizer)


def run(state, optimizer, epochs=3, strategy="scan", model=MODEL, **kw):
    return train.fit(state, tiny_problem(), loss_fn=train.classification_loss(model.apply),
                     optimizer=optimizer, epochs=epochs, batch_size=16, strategy=strategy,
                     progress=False, **kw)


@pytest.fixture
def model64():
    with jax.enable_x64(True):
        yield models.lenet(3, (8, 8, 1), padding="SAME", param_dtype=jnp.float64)


def assert_float64_close(a, b):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        assert x.dtype == y.dtype == jnp.float64
        np.testing.assert_allclose(x, y, rtol=0, atol=TOLERANCE)


def test_vmapped_seeds_equal_separate_runs(model64):
    opt = optax.adam(1e-2)
    together, _ = run(stacked_state([0, 1, 2], opt, model64), opt, model=model64)
    for i, seed in enumerate([0, 1, 2]):
        alone, _ = run(stacked_state([seed], opt, model64), opt, model=model64)
        assert_float64_close(jax.tree.map(lambda x: x[i], together.params),
                             jax.tree.map(lambda x: x[0], alone.params))
    # and the seeds really differ (a mix-up would make two of them equal)
    w = together.params["head"]["dense"]["kernel"]
    assert np.abs(w[0] - w[1]).max() > 1e-3


def test_scan_and_step_strategies_agree_and_learn(model64):
    opt = optax.adam(1e-2)
    scanned, hist_scan = run(stacked_state([0, 1], opt, model64), opt, epochs=4, strategy="scan",
                             model=model64)
    stepped, hist_step = run(stacked_state([0, 1], opt, model64), opt, epochs=4, strategy="step",
                             model=model64)
    assert_float64_close(scanned.params, stepped.params)
    assert np.all(hist_scan[-1]["loss"] < hist_scan[0]["loss"])
    np.testing.assert_allclose(hist_scan[-1]["loss"], hist_step[-1]["loss"], rtol=0, atol=TOLERANCE)
    assert int(scanned.step[0]) == 4 * (96 // 16)


@pytest.mark.parametrize("strategy", ["scan", "step"])
def test_head_only_training_leaves_features_bitwise_unchanged(strategy):
    params0 = MODEL.init_seeds(jax.vmap(jax.random.key)(jnp.arange(2)))
    config = train.TrainConfig(epochs=2, batch_size=16, learning_rate=0.05,
                               trainable=("head",), strategy=strategy)
    state, _ = train.fit_classifier(jax.vmap(jax.random.key)(jnp.arange(2)), params0, MODEL.apply,
                                    *tiny_problem(), config, progress=False)
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(a, b),
                 state.params["features"], params0["features"])
    assert not np.allclose(state.params["head"]["dense"]["kernel"], params0["head"]["dense"]["kernel"])


def test_trainable_mask_prefixes():
    params = MODEL.init(jax.random.key(0))
    mask = train.trainable_mask(params, ("head", "features/fc2"))
    assert mask["head"]["dense"]["kernel"] and mask["features"]["fc2"]["bias"]
    assert not mask["features"]["fc1"]["kernel"]
    with pytest.raises(ValueError, match="'features/fc9' matches no parameter"):
        train.trainable_mask(params, ("features/fc9",))


def test_nan_stops_training_naming_the_epoch_and_keeps_last_good_state():
    opt = optax.sgd(1e-2)
    state = stacked_state([0, 1], opt)
    images, labels = tiny_problem()

    calls = {"n": 0}

    def on_epoch(epoch, state, metrics):
        calls["n"] = epoch

    good, _ = train.fit(state, (images, labels), loss_fn=LOSS, optimizer=opt, epochs=2,
                        batch_size=16, strategy="scan", progress=False)
    bad_images = images.astype(jnp.float32).at[0].set(jnp.nan)  # poisons epoch 3
    with pytest.raises(train.NonFiniteError, match=r"at epoch 3 .*state after epoch 2") as err:
        train.fit(good, (bad_images, labels), loss_fn=LOSS, optimizer=opt, epochs=5,
                  batch_size=96, start_epoch=2, strategy="scan", on_epoch=on_epoch, progress=False)
    assert err.value.epoch == 2 and calls["n"] == 0
    jax.tree.map(np.testing.assert_array_equal, err.value.state.params, good.params)


def test_evaluate_handles_sizes_that_do_not_divide_the_chunk():
    images, labels = tiny_problem(n=50)
    params = jax.jit(MODEL.init)(jax.random.key(0))
    logits = jax.jit(MODEL.apply)(params, images)
    expected = float(np.mean(np.argmax(logits, -1) == np.asarray(labels)))
    got = train.evaluate(MODEL.apply, params, images, labels, batch_size=16)
    np.testing.assert_allclose(float(got["accuracy"]), expected, rtol=1e-6)
    ce = jax.jit(optax.softmax_cross_entropy_with_integer_labels)(logits, labels).mean()
    np.testing.assert_allclose(float(got["loss"]), float(ce), rtol=1e-5)


@pytest.mark.parametrize("change, message", [
    (dict(learning_rate=0.0), "learning_rate must be finite and > 0, got 0.0"),
    (dict(learning_rate=-1e-3), "learning_rate must be finite and > 0"),
    (dict(batch_size=0), "batch_size must be an integer >= 1"),
    (dict(optimizer="adamw2"), r"unknown optimizer 'adamw2'; allowed: \('adam', 'sgd', 'momentum'\)"),
    (dict(strategy="fast"), "unknown strategy 'fast'"),
    (dict(epochs=-1), "epochs must be an integer >= 0"),
])
def test_bad_train_config_is_rejected(change, message):
    with pytest.raises(ValueError, match=message):
        dataclasses.replace(train.TrainConfig(), **change)


def test_batch_larger_than_data_is_rejected_before_compiling():
    opt = optax.adam(1e-3)
    with pytest.raises(ValueError, match="batch_size=500 exceeds the 96 examples"):
        train.fit(stacked_state([0], opt), tiny_problem(), loss_fn=LOSS, optimizer=opt, epochs=1,
                  batch_size=500, progress=False)


def test_auto_strategy_is_the_epoch_as_one_scan():
    assert train.resolve_strategy("auto") == "scan"
    assert train.resolve_strategy("step") == "step"


def test_equal_pieces_give_the_same_programs_and_a_second_fit_compiles_nothing():
    """SKD's teacher ablation calls fit 15 times with 3 settings: equal models, settings
    and masks give the same loss, optimizer and epoch program, so later fits neither
    trace nor compile (they did both before: 128 -> 69 programs for 5 budgets)."""
    from trm_jax import compilation

    a, b = (models.lenet(3, (8, 8, 1), padding="SAME") for _ in range(2))
    assert a is not b and a == b and a.apply != b.apply  # Python: bound methods by identity
    assert train.classification_loss(a.apply) is train.classification_loss(b.apply)
    assert train.make_optimizer("adam", 1e-3) is train.make_optimizer("adam", np.float64(1e-3))
    assert train.make_optimizer("adam", 1e-3) is not train.make_optimizer("adam", 2e-3)
    mask = train.trainable_mask(MODEL.init(jax.random.key(0)), ("head",))
    base = train.make_optimizer("sgd", 0.1)
    assert train.masked_optimizer(base, mask) is train.masked_optimizer(base, dict(mask))
    key = train.static_key(mask)
    assert train.from_static_key(key) == mask and train.static_key(None) == (None, ())
    assert train.static_key({"w": jnp.ones(2)}) is None  # an array is no static key

    images, labels = tiny_problem(48, seed=3)
    config = train.TrainConfig(epochs=2, batch_size=16, trainable=("head",))

    def fit(model):
        keys = jax.vmap(jax.random.key)(jnp.arange(2))
        return train.fit_classifier(keys, model.init_seeds(keys), model.apply, images, labels,
                                    config, eval_data=(images, labels), progress=False)

    first, _ = fit(a)
    with compilation.count_compilations() as stats:
        second, _ = fit(b)
    assert stats.total.compilations == 0 and stats.total.trace_seconds == 0
    for x, y in zip(jax.tree.leaves(first.params), jax.tree.leaves(second.params)):
        np.testing.assert_array_equal(x, y)


def test_a_callable_without_hash_still_trains():
    """An unhashable apply_fn (a callable object with __eq__ only) is built afresh each
    time instead of failing in the cache."""
    class Apply:
        __hash__ = None

        def __call__(self, params, images):
            return MODEL.apply(params, images)

        def __eq__(self, other):
            return isinstance(other, Apply)

    loss = train.classification_loss(Apply())
    params = MODEL.init(jax.random.key(0))
    value, metrics = loss(params, tiny_problem(16))
    assert np.isfinite(float(value)) and set(metrics) == {"loss", "accuracy"}
