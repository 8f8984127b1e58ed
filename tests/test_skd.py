"""Selective knowledge distillation: misses metric, masking, distillation step, digits run."""
from __future__ import annotations

import functools
import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from trm_jax import models, skd, train

MODEL = models.lenet(5, (8, 8, 1), padding="SAME")
# Compiling a flax init is the slowest part of small tests (~3 s on CPU): compile one
# single-seed init and stack its outputs, whatever the number of seeds.
init_one = jax.jit(MODEL.init)
with_heads = jax.jit(jax.vmap(lambda k, f: skd.attach_head(MODEL, k, f)))


def init_stack(keys: jax.Array):
    """``[S, ...]`` params, one ``MODEL.init`` per key."""
    return jax.tree.map(lambda *xs: jnp.stack(xs), *[init_one(k) for k in keys])


def random_images(n: int, seed: int = 0) -> jax.Array:
    """``uint8[n, 8, 8, 1]`` random pixels, never zero."""
    return jnp.asarray(np.random.default_rng(seed).integers(1, 256, (n, 8, 8, 1), dtype=np.uint8))


def keys_for(seeds) -> jax.Array:
    return jax.vmap(jax.random.key)(jnp.asarray(seeds))


# ----------------------------------------------------------------------------- misses


def test_misses_and_false_masks_on_hand_built_activations():
    pre = jnp.array([[-1.0, -2.0, -0.5],     # all negative: masked
                     [-1.0, 0.5, -3.0],      # one positive unit: a miss
                     [0.0, 0.0, 0.0],        # relu(0) = 0: masked
                     [-0.0, -100.0, 1e-6]])  # a tiny positive: a miss
    np.testing.assert_allclose(skd.misses(pre), 50.0)
    np.testing.assert_allclose(skd.false_masks(pre), 50.0)
    np.testing.assert_allclose(skd.misses(jnp.full((4, 84), -100.0)), 0.0)
    np.testing.assert_allclose(skd.misses(pre[1:2]), 100.0)
    np.testing.assert_allclose(skd.false_masks(pre[:1]), 100.0)
    with pytest.raises(AssertionError):
        skd.misses(pre[0])  # [D]: the image axis is missing


def test_mask_report_uses_the_models_penultimate_activations():
    params = init_one(jax.random.key(0))["features"]
    masked = skd.mask_penultimate_bias(MODEL, params)
    images = random_images(12)
    pre, chunked, report = jax.jit(lambda f: (
        MODEL.features(f, images), MODEL.features_chunked(f, images, chunk=5),  # 3 chunks, 3 padded
        skd.mask_report(MODEL, f, images[:5], images[5:])))(masked)
    np.testing.assert_allclose(chunked, pre, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(report["misses_percent"], skd.misses(pre[5:]))
    np.testing.assert_allclose(report["false_masks_percent"], skd.false_masks(pre[:5]))
    np.testing.assert_allclose(report["malicious_mean_activation"], pre[5:].mean(), rtol=1e-5)


# ----------------------------------------------------------------------------- mask + head


def test_attach_head_zeroes_only_the_penultimate_bias():
    params = init_one(jax.random.key(0))
    full = skd.attach_head(MODEL, jax.random.key(1), params["features"])
    assert np.all(np.asarray(full["features"]["fc2"]["bias"]) == 0)
    for layer in ("conv1", "conv2", "fc1"):
        jax.tree.map(np.testing.assert_array_equal, full["features"][layer], params["features"][layer])
    np.testing.assert_array_equal(full["features"]["fc2"]["kernel"], params["features"]["fc2"]["kernel"])
    assert full["head"]["dense"]["kernel"].shape == (84, 5)
    with pytest.raises(ValueError, match="no bias"):
        skd.mask_penultimate_bias(MODEL, {**params["features"], "fc2": {"kernel": jnp.ones((2, 2))}})


def test_head_only_phase_leaves_every_non_head_param_bitwise_unchanged():
    keys = keys_for([0, 1])
    features = init_stack(keys)["features"]
    params = with_heads(keys, features)
    before = jax.tree.map(np.array, params)
    images = random_images(64)
    labels = jnp.asarray(np.arange(64) % 5, jnp.int32)
    config = train.TrainConfig(epochs=2, batch_size=16, learning_rate=1e-2, trainable=("head",))
    state, _ = train.fit_classifier(keys, params, MODEL.apply, images, labels, config, progress=False)
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a).view(np.uint32),
                                                            b.view(np.uint32)),
                 state.params["features"], before["features"])
    assert not np.array_equal(state.params["head"]["dense"]["kernel"], before["head"]["dense"]["kernel"])
    assert np.all(np.asarray(state.params["features"]["fc2"]["bias"]) == 0)


# ----------------------------------------------------------------------------- distillation


def test_targets_are_teacher_activations_then_the_constant():
    keys = keys_for([0, 1])
    teachers = init_stack(keys)["features"]
    ben, mal = random_images(7, 1), random_images(3, 2)
    images, targets = skd.distillation_data(MODEL, teachers, ben, mal, -50.0)
    assert images.shape == (10, 8, 8, 1) and targets.shape == (2, 10, 84)
    np.testing.assert_array_equal(images, jnp.concatenate([ben, mal]))
    for s in range(2):
        teacher = jax.tree.map(lambda x: x[s], teachers)
        np.testing.assert_allclose(targets[s, :7], MODEL.features(teacher, ben), rtol=1e-5, atol=1e-6)
        np.testing.assert_array_equal(targets[s, 7:], np.full((3, 84), -50.0, np.float32))


def test_distillation_loss_is_the_mean_squared_error():
    params = init_one(jax.random.key(0))["features"]
    images = random_images(4)
    targets = jnp.linspace(-3.0, 3.0, 4 * 84).reshape(4, 84)
    loss, aux = skd.distillation_loss(MODEL)(params, (images, targets))
    expected = np.mean((np.asarray(MODEL.features(params, images)) - np.asarray(targets)) ** 2)
    np.testing.assert_allclose(loss, expected, rtol=1e-6)
    assert aux == {"loss": loss}


def test_distill_step_vmapped_over_seeds_equals_separate_steps():
    optimizer = optax.adam(1e-3)
    keys = keys_for([0, 1])
    students = init_stack(keys)["features"]
    images = random_images(16)
    targets = jnp.asarray(np.random.default_rng(3).normal(size=(2, 16, 84)), jnp.float32)
    # distill_step donates its state: every call gets a fresh copy.
    init = lambda: jax.tree.map(jnp.copy, jax.vmap(train.init_state, in_axes=(0, 0, None))(
        keys, students, optimizer))
    step = functools.partial(skd.distill_step, model=MODEL, optimizer=optimizer)
    vstep = jax.vmap(step, in_axes=(0, (None, 0)))

    together, metrics = vstep(init(), (images, targets))
    for s in range(2):
        alone, m = step(jax.tree.map(lambda x: x[s], init()), (images, targets[s]))
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a[s], b, rtol=1e-5, atol=1e-6),
                     together.params, alone.params)
        np.testing.assert_allclose(metrics["loss"][s], m["loss"], rtol=1e-5)
    assert together.step.tolist() == [1, 1]
    # The loss is measured before each update: the second step sees a lower loss.
    _, second = vstep(together, (images, targets))
    assert np.all(np.asarray(second["loss"]) < np.asarray(metrics["loss"]))


def test_distill_through_the_engine_equals_separate_seeds():
    """``fit`` with ``per_seed_data=(False, True)``: shared images, per-seed targets."""
    keys = keys_for([0, 1])
    students = init_stack(keys)["features"]
    images = random_images(32)
    targets = jnp.asarray(np.random.default_rng(4).normal(size=(2, 32, 84)), jnp.float32)
    config = train.TrainConfig(epochs=2, batch_size=8, learning_rate=1e-3, strategy="step")
    together, history = skd.distill(keys, students, images, targets, config, model=MODEL, progress=False)
    assert history[-1]["loss"].shape == (2,)
    alone, _ = skd.distill(keys[1:], jax.tree.map(lambda x: x[1:], students), images, targets[1:],
                           config, model=MODEL, progress=False)  # seed 1 alone
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a[1], b[0], rtol=1e-4, atol=1e-5),
                 together.params, alone.params)


def test_init_student_fresh_differs_from_the_teacher_init_and_teacher_copies():
    key = jax.random.key(0)
    teacher = init_one(key)["features"]
    init = jax.jit(skd.init_student, static_argnums=(0, 3))
    fresh, copied = init(MODEL, key, teacher, "fresh"), init(MODEL, key, teacher, "teacher")
    assert not np.array_equal(fresh["fc1"]["kernel"], teacher["fc1"]["kernel"])
    jax.tree.map(np.testing.assert_array_equal, copied, teacher)


# ----------------------------------------------------------------------------- bad inputs


@pytest.mark.parametrize("kwargs, message", [
    (dict(malicious_target=float("nan")), "malicious_target must be finite and < 0"),
    (dict(malicious_target=0.0), r"malicious_target .* got 0.0"),
    (dict(malicious_target="low"), r"got 'low'"),
    (dict(student_init="random"), r"unknown student_init 'random'; allowed: \('fresh', 'teacher'\)"),
])
def test_bad_skd_config_is_a_clear_error(kwargs, message):
    with pytest.raises(ValueError, match=message):
        skd.SKDConfig(**kwargs)


def test_bad_inputs_are_clear_errors():
    keys = keys_for([0, 1])
    teachers = init_stack(keys)["features"]
    images = random_images(8)
    with pytest.raises(ValueError, match="learning_rate must be finite and > 0, got 0.0"):
        train.TrainConfig(learning_rate=0.0)
    with pytest.raises(ValueError, match="learning_rate must be > 0, got -0.1"):
        train.make_optimizer("adam", -0.1)
    with pytest.raises(ValueError, match=r"malicious_images must be a non-empty \[N, H, W, C\]"):
        skd.distillation_data(MODEL, teachers, images, images[:0])
    with pytest.raises(ValueError, match=r"beneficial_images have shape \(4, 4, 1\) per image, "
                                         r"the model expects \(8, 8, 1\)"):
        skd.distillation_data(MODEL, teachers, images[:, :4, :4], images)
    with pytest.raises(ValueError, match="malicious_target must be finite and < 0"):
        skd.distillation_data(MODEL, teachers, images, images, float("inf"))
    one_teacher = jax.tree.map(lambda x: x[0], teachers)
    with pytest.raises(ValueError, match=r"teacher_features must be a stack \[S, ...\] of lenet"):
        skd.distillation_data(MODEL, one_teacher, images, images)
    with pytest.raises(ValueError, match=r"unknown student_init 'copy'"):
        skd.init_student(MODEL, keys[0], jax.tree.map(lambda x: x[0], teachers), "copy")
    config = train.TrainConfig(epochs=1, batch_size=4)
    with pytest.raises(ValueError, match=r"targets must be f32\[S=2, N, D=84\], got shape \(2, 8, 10\)"):
        skd.distill(keys, teachers, images, jnp.zeros((2, 8, 10)), config, model=MODEL)
    with pytest.raises(ValueError, match="student_params hold 2 seeds but there are 1 keys"):
        skd.distill(keys[:1], teachers, images, jnp.zeros((1, 8, 84)), config, model=MODEL)
    with pytest.raises(ValueError, match="8 images but 6 targets per seed"):
        skd.distill(keys, teachers, images, jnp.zeros((2, 6, 84)), config, model=MODEL)
    with pytest.raises(ValueError, match="batch_size=16 exceeds the 8 examples"):
        skd.distill(keys, teachers, images, jnp.zeros((2, 8, 84)),
                    train.TrainConfig(epochs=1, batch_size=16), model=MODEL)


# ----------------------------------------------------------------------------- digits


def test_distillation_on_digits_switches_malicious_activations_off(digits_protocol):
    """Teacher (10 epochs) -> student (teacher init, 60 epochs of MSE) on the real digits.

    Measured (seed 0): malicious test mean pre-activation -94.7, misses 0.4 % (1 of
    250 malicious test images), false masks on beneficial test images 18 %.
    """
    pre, test = digits_protocol.pretrain, digits_protocol.test
    keys = keys_for([0])
    teacher, _ = train.fit_classifier(
        keys, init_stack(keys), MODEL.apply, jnp.asarray(pre.beneficial.images),
        jnp.asarray(pre.beneficial.labels), train.TrainConfig(epochs=10, batch_size=32), progress=False)
    images, targets = skd.distillation_data(MODEL, teacher.params["features"],
                                            pre.beneficial.images, pre.malicious.images)
    students = teacher.params["features"]  # student_init="teacher": a copy
    state, history = skd.distill(keys, students, images, targets,
                                 train.TrainConfig(epochs=60, batch_size=32, learning_rate=3e-3),
                                 model=MODEL, progress=False)
    assert history[-1]["loss"][0] < 0.1 * history[0]["loss"][0]
    masked = skd.mask_penultimate_bias(MODEL, jax.tree.map(lambda x: x[0], state.params))
    report = {k: float(v) for k, v in skd.mask_report(MODEL, masked, test.beneficial.images,
                                                      test.malicious.images).items()}
    print("digits SKD:", json.dumps(report))
    assert report["malicious_mean_activation"] < -50.0
    assert report["misses_percent"] < 5.0
    assert report["false_masks_percent"] < 40.0  # a sanity bound: the full run gets ~11 %
    assert report["beneficial_mean_activation"] > -20.0
