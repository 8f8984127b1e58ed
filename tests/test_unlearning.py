"""UNSIR (trm_jax.unlearning): noise objective, impair/repair on digits, bad inputs."""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from trm_jax import compilation, datasets, models, train, unlearning

SMALL = unlearning.UnsirConfig(
    noise=unlearning.NoiseConfig(steps=20, batch_size=16),
    noise_copies=2, retain_per_class=None,
    impair=train.TrainConfig(epochs=1, batch_size=16, learning_rate=0.02, strategy="step"),
    repair=train.TrainConfig(epochs=1, batch_size=16, learning_rate=0.01, strategy="step"))


@pytest.fixture(scope="module")
def digits_setup(digits_protocol):
    """A 10-way digits LeNet trained on all classes (1 seed, 6 epochs) and the test halves."""
    pre, test = digits_protocol.pretrain, digits_protocol.test
    model = datasets.model_for("digits", 10, digits_protocol.image_shape)
    keys = jax.random.key(0)[None]
    images, labels = unlearning.all_classes(pre.beneficial, pre.malicious)
    config = train.TrainConfig(epochs=6, batch_size=32, learning_rate=3e-3, strategy="step")
    state, _ = train.fit_classifier(keys, model.init_seeds(keys), model.apply,
                                    jnp.asarray(images), jnp.asarray(labels), config, progress=False)
    halves = dict(beneficial=(jnp.asarray(test.beneficial.images), jnp.asarray(test.beneficial.labels)),
                  malicious=(jnp.asarray(test.malicious.images), jnp.asarray(test.malicious.labels)),
                  offset=pre.beneficial.num_classes)
    return model, keys, state.params, halves


def test_noise_loss_is_minus_cross_entropy_plus_l2_penalty():
    w = jax.random.normal(jax.random.key(0), (12, 4))
    apply_fn = lambda p, x: x.reshape(x.shape[0], -1) @ p
    noise = jax.random.normal(jax.random.key(1), (5, 2, 2, 3))
    loss, aux = unlearning.noise_loss(noise, w, apply_fn, jnp.int32(2), 0.3)
    logits = np.asarray(noise).reshape(5, -1) @ np.asarray(w)
    log_softmax = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    ce = -log_softmax[:, 2].mean()
    l2 = (np.asarray(noise) ** 2).sum((1, 2, 3)).mean()
    np.testing.assert_allclose(aux["forget_ce"], ce, rtol=1e-5)
    np.testing.assert_allclose(aux["l2"], l2, rtol=1e-5)
    np.testing.assert_allclose(loss, -ce + 0.3 * l2, rtol=1e-5)
    grad_params = jax.grad(lambda p: unlearning.noise_loss(noise, p, apply_fn, 2, 0.3)[0])(w)
    np.testing.assert_array_equal(grad_params, 0.0)  # the model is frozen


def test_noise_step_increases_the_forget_class_loss(digits_setup):
    model, keys, params, _ = digits_setup
    params = jax.tree.map(lambda x: x[0], params)
    config = unlearning.NoiseConfig(steps=30, batch_size=16)
    label = jnp.int32(7)
    noise = jax.random.normal(jax.random.key(3), (16, 8, 8, 1))
    state = unlearning.NoiseState(noise, optax.adam(config.learning_rate).init(noise))
    step = jax.jit(lambda s: unlearning.noise_step(s, params, model.apply, label, config))
    new_state, before = step(state)
    _, after = unlearning.noise_loss(new_state.noise, params, model.apply, label, config.l2_weight)
    assert after["forget_ce"] > before["forget_ce"]
    assert after["loss"] < before["loss"]  # descent on the objective = ascent on the CE
    for _ in range(config.steps - 1):  # the rest of learn_noise's schedule
        new_state, _ = step(new_state)
    _, final = unlearning.noise_loss(new_state.noise, params, model.apply, label, config.l2_weight)
    assert final["forget_ce"] > before["forget_ce"] + 5.0
    predicted = jnp.argmax(model.apply(params, new_state.noise), -1)
    assert float(jnp.mean(predicted == 7)) == 0.0


def test_impair_set_labels_noise_with_the_forget_class_not_zero():
    noise = jnp.arange(2 * 3 * 2 * 2 * 1, dtype=jnp.float32).reshape(2, 3, 2, 2, 1)
    retain = jnp.array([[[[0], [255]], [[127], [128]]]] * 4, jnp.uint8)
    images, labels = unlearning.impair_set(noise, jnp.array([7, 9]), retain,
                                           jnp.array([0, 1, 2, 3]), copies=2)
    assert images.shape == (2 * 2 * 3 + 4, 2, 2, 1) and images.dtype == jnp.float32
    np.testing.assert_array_equal(labels, [7] * 3 + [9] * 3 + [7] * 3 + [9] * 3 + [0, 1, 2, 3])
    np.testing.assert_array_equal(images[:6], noise.reshape(6, 2, 2, 1))
    np.testing.assert_array_equal(images[6:12], noise.reshape(6, 2, 2, 1))
    np.testing.assert_array_equal(images[12:], models.to_float(retain))  # the model's [-1, 1] space


def test_retain_indices_keep_the_first_per_class_in_data_order():
    labels = np.array([1, 0, 1, 1, 0, 2, 1])
    np.testing.assert_array_equal(unlearning.retain_indices(labels, 2), [0, 1, 2, 4, 5])
    np.testing.assert_array_equal(unlearning.retain_indices(labels, None), np.arange(7))


def test_all_classes_offsets_the_malicious_labels(digits_protocol):
    pre = digits_protocol.pretrain
    images, labels = unlearning.all_classes(pre.beneficial, pre.malicious)
    assert images.shape[0] == len(pre.beneficial) + len(pre.malicious)
    assert sorted(np.unique(labels)) == list(range(10))
    np.testing.assert_array_equal(unlearning.forget_labels_for(pre.beneficial, pre.malicious),
                                  [5, 6, 7, 8, 9])


def test_fit_with_per_seed_data_equals_separate_runs():
    """The impair stage's engine path: seed s trains on data[s] (both strategies)."""
    apply_fn = lambda p, x: x @ p["w"] + p["b"][None]
    keys = jax.vmap(jax.random.key)(jnp.arange(2))
    params = {"w": jnp.zeros((2, 3, 4)), "b": jnp.zeros((2, 4))}
    x = jax.random.normal(jax.random.key(9), (2, 24, 3))
    y = jax.random.randint(jax.random.key(8), (2, 24), 0, 4)
    config = train.TrainConfig(epochs=2, batch_size=8, learning_rate=0.1, strategy="scan")
    stacked, _ = train.fit_classifier(keys, params, apply_fn, x, y, config, progress=False,
                                      per_seed_data=True)
    by_step, _ = train.fit_classifier(keys, params, apply_fn, x, y,
                                      dataclasses.replace(config, strategy="step"),
                                      progress=False, per_seed_data=True)
    alone, _ = train.fit_classifier(keys[1:], jax.tree.map(lambda a: a[1:], params),
                                    apply_fn, x[1], y[1], config, progress=False)
    close = lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    jax.tree.map(close, stacked.params, by_step.params)
    jax.tree.map(lambda a, b: close(a[1], b[0]), stacked.params, alone.params)
    assert not np.allclose(stacked.params["w"][0], stacked.params["w"][1])


def test_impair_lowers_malicious_and_repair_restores_beneficial(digits_setup, digits_protocol):
    model, keys, params, halves = digits_setup
    pre = digits_protocol.pretrain
    accuracy = lambda p: unlearning.half_accuracies(model.apply, p, halves["beneficial"],
                                                    halves["malicious"], halves["offset"])
    original = accuracy(params)
    result = unlearning.unsir(keys, params, model.apply,
                              unlearning.forget_labels_for(pre.beneficial, pre.malicious),
                              jnp.asarray(pre.beneficial.images), jnp.asarray(pre.beneficial.labels),
                              SMALL, progress=False)
    impaired = accuracy(result.impaired)
    with compilation.count_compilations() as stats:  # same shapes: one compiled program
        repaired = accuracy(result.repaired)
    assert stats.total.compilations == 0
    assert original["malicious"][0] > 0.8 and original["beneficial"][0] > 0.8
    assert impaired["malicious"][0] < 0.1  # the forget classes are gone after one impair epoch
    assert repaired["malicious"][0] < 0.1  # ... and repair does not bring them back
    assert repaired["beneficial"][0] > impaired["beneficial"][0] + 0.05
    assert repaired["beneficial"][0] > 0.75
    assert result.noise.shape == (1, 5, 16, 8, 8, 1)
    ce = result.noise_history["forget_ce"]  # [S, K, steps + 1]
    assert ce.shape == (1, 5, 21) and np.all(ce[..., -1] > ce[..., 0] + 1.0)


# ------------------------------------------------------------------ bad inputs

@pytest.mark.parametrize("kwargs, message", [
    (dict(learning_rate=0.0), "learning_rate must be finite and > 0, got 0.0"),
    (dict(learning_rate=-0.1), "learning_rate must be finite and > 0, got -0.1"),
    (dict(steps=0), "steps must be an integer >= 1, got 0"),
    (dict(l2_weight=-1.0), "l2_weight must be finite and >= 0"),
    (dict(batch_size=0), "batch_size must be an integer >= 1"),
])
def test_bad_noise_config_is_a_clear_error(kwargs, message):
    with pytest.raises(ValueError, match=message):
        unlearning.NoiseConfig(**kwargs)


def test_bad_stage_configs_are_clear_errors():
    with pytest.raises(ValueError, match="learning_rate must be finite and > 0, got 0"):
        dataclasses.replace(SMALL.impair, learning_rate=0.0)
    with pytest.raises(ValueError, match="noise_copies must be an integer >= 1, got 0"):
        dataclasses.replace(SMALL, noise_copies=0)
    with pytest.raises(ValueError, match="retain_per_class must be an integer >= 1 or None"):
        dataclasses.replace(SMALL, retain_per_class=0)
    with pytest.raises(ValueError, match="impair epochs must be >= 1, got 0"):
        dataclasses.replace(SMALL, impair=dataclasses.replace(SMALL.impair, epochs=0))


@pytest.mark.parametrize("forget, retain_labels, message", [
    ([], [0, 1], "forget_labels is empty"),
    ([3, 12], [0, 1], r"forget_labels \[12\] out of range: the head has 10 classes, allowed 0..9"),
    ([5, 5], [0, 1], "lists a class twice"),
    ([5], [0, 5], r"retain data contains forget classes \[5\]"),
    (list(range(10)), [], "would unlearn all 10 classes"),
])
def test_bad_forget_classes_are_clear_errors(forget, retain_labels, message):
    with pytest.raises(ValueError, match=message):
        unlearning.validate_forget_labels(forget, 10, np.array(retain_labels))


def test_unsir_checks_inputs_before_any_compute(monkeypatch):
    model = models.lenet(10, (8, 8, 1), padding="SAME")
    keys = jax.random.key(0)[None]
    params = model.init_seeds(keys)
    retain = jnp.zeros((20, 8, 8, 1), jnp.uint8), jnp.zeros((20,), jnp.int32)

    def compute(*args, **kwargs):
        raise AssertionError("UNSIR computed before reporting the bad input")

    # the noise learner and the stages' trainer are where UNSIR's compute starts
    monkeypatch.setattr(unlearning, "make_noise_learner", compute)
    monkeypatch.setattr(unlearning, "fit_phase", compute)
    too_big = dataclasses.replace(SMALL, repair=dataclasses.replace(SMALL.repair, batch_size=64))
    with compilation.count_compilations() as stats:
        with pytest.raises(ValueError, match="forget_labels is empty"):
            unlearning.unsir(keys, params, model.apply, [], *retain, SMALL, progress=False)
        with pytest.raises(ValueError, match="repair batch_size=64 exceeds its 20 examples"):
            unlearning.unsir(keys, params, model.apply, [5], *retain, too_big, progress=False)
    assert stats.total.compilations == 0  # not a single program built
