import dataclasses
import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from trm_jax import models


def test_lenet_has_the_papers_62006_parameters_on_cifar_shape():
    model = models.lenet(10, (32, 32, 3), padding="VALID")
    params = jax.eval_shape(model.init, jax.random.key(0))  # shapes only: nothing to compile
    assert models.count_params(params) == 62_006
    assert model.feature_dim == 84
    assert set(params["features"]) == {"conv1", "conv2", "fc1", "fc2"}


@pytest.mark.parametrize("make", [
    lambda: models.lenet(10, (32, 32, 3)),
    lambda: models.lenet(5, (8, 8, 1), padding="SAME"),
    lambda: models.conv4(5, (28, 28, 1)),
    lambda: models.conv4(5, (8, 8, 1), norm="layer"),
])
def test_features_then_head_equals_full_apply(make):
    model = make()
    params = jax.jit(model.init)(jax.random.key(1))  # jitted: one program, not ~20 eager ones
    images = np.random.default_rng(2).integers(0, 256, (4, *model.input_shape), np.uint8)
    split = jax.jit(lambda p, x: (f := model.features(p["features"], x), model.head(p["head"], f)))
    features, logits = split(params, images)
    chex.assert_shape(features, (4, model.feature_dim))
    chex.assert_shape(logits, (4, model.num_classes))
    np.testing.assert_array_equal(logits, jax.jit(model.apply)(params, images))


def test_head_is_swappable_and_can_change_width():
    model = models.lenet(10, (8, 8, 1), padding="SAME")
    params = jax.jit(model.init)(jax.random.key(0))
    fresh = jax.jit(model.init_head, static_argnames="num_classes")(jax.random.key(5), num_classes=3)
    images = np.random.default_rng(2).integers(0, 256, (2, 8, 8, 1), np.uint8)
    logits = jax.jit(model.apply)({"features": params["features"], "head": fresh}, images)
    chex.assert_shape(logits, (2, 3))
    assert not np.allclose(fresh["dense"]["kernel"][:, :3], params["head"]["dense"]["kernel"][:, :3])


def test_uint8_images_are_normalised_inside_and_floats_pass_through():
    images = jnp.array([0, 255], jnp.uint8).reshape(2, 1, 1, 1)
    np.testing.assert_allclose(models.to_float(images).ravel(), [-1.0, 1.0])
    floats = jnp.array([0.3, -2.0])
    assert models.to_float(floats) is floats


def test_init_seeds_is_init_per_seed_and_seeds_differ():
    model = models.lenet(3, (8, 8, 1), padding="SAME")  # as in test_train and test_checkpoint
    keys = jax.vmap(jax.random.key)(jnp.arange(2))
    params, one = model.init_seeds(keys), jax.jit(model.init)
    for seed, key in enumerate(keys):
        chex.assert_trees_all_equal(jax.tree.map(lambda x: x[seed], params), one(key))
    kernels = params["features"]["conv1"]["kernel"]
    assert kernels.shape[0] == 2 and not np.allclose(kernels[0], kernels[1])


@pytest.mark.parametrize("model", [models.conv4(7, (12, 12, 1), width=8, norm="layer"),
                                   models.lenet(3, (8, 8, 1), padding="SAME")])
def test_spec_round_trip(model):
    """The model rebuilt from its JSON spec (what model.json stores) initialises the same
    params from the same key and computes the same logits."""
    import json

    again = models.from_spec(json.loads(json.dumps(model.spec())))
    key = jax.random.key(3)
    params = jax.jit(model.init)(key)
    chex.assert_trees_all_equal(jax.jit(again.init)(key), params)
    x = jnp.asarray(np.random.default_rng(0).integers(0, 256, (4, *model.input_shape)), jnp.uint8)
    chex.assert_trees_all_equal(jax.jit(again.apply)(params, x), jax.jit(model.apply)(params, x))
    assert again.num_classes == model.num_classes and again.input_shape == model.input_shape


def test_bad_model_settings_are_rejected_with_clear_messages():
    with pytest.raises(ValueError, match="SAME"):
        models.lenet(5, (8, 8, 1), padding="VALID")
    with pytest.raises(ValueError, match="unknown model 'resnet'.*conv4.*lenet"):
        models.make_model("resnet")
    with pytest.raises(ValueError, match="input_shape"):
        models.conv4(5, (8, 8))
    with pytest.raises(ValueError, match="norm"):
        models.conv4(5, (8, 8, 1), norm="batch")


# ------------------------------------------------- conv / pool formulations (exactness)

def _f64(rng, shape, scale=1.0):
    return jnp.asarray(scale * rng.standard_normal(shape), jnp.float64)


@pytest.fixture
def x64():
    with jax.enable_x64(True):
        yield


NHWC = ("NHWC", "HWIO", "NHWC")


@pytest.mark.parametrize("formulation,x_shape,k_shape", [
    ("im2col_conv", (2, 7, 6, 3), (3, 3, 3, 4)),
    ("toeplitz_conv", (2, 7, 6, 3), (3, 3, 3, 4)),  # one block per output row
    ("toeplitz_conv", (2, 9, 16, 2), (5, 3, 2, 6)),  # SAME: 16 output columns, 2 blocks of 8
    ("toeplitz_conv", (2, 6, 15, 1), (2, 5, 1, 16)),  # VALID: 11 columns, 4 blocks of 3 (padded)
])
@pytest.mark.parametrize("padding", ["VALID", "SAME", ((1, 2), (0, 1))])
def test_conv_formulations_equal_lax_conv_with_first_and_second_derivatives(
        x64, formulation, x_shape, k_shape, padding):
    rng = np.random.default_rng(0)
    x, k = _f64(rng, x_shape), _f64(rng, k_shape, 0.5)
    lax_conv = lambda x, k: jax.lax.conv_general_dilated(x, k, (1, 1), padding,
                                                         dimension_numbers=NHWC)
    im2col = lambda x, k: getattr(models, formulation)(x, k, (1, 1), padding,
                                                       dimension_numbers=NHWC)
    vx, vk = _f64(rng, x.shape), _f64(rng, k.shape)

    @functools.partial(jax.jit, static_argnums=0)  # one program per formulation
    def derivatives(conv, x, k):
        # A smooth scalar of the output: its gradient and a Hessian-vector product in
        # both arguments exercise the transposes a second-order meta-gradient uses.
        grad = jax.grad(lambda x, k: jnp.sum(jnp.tanh(conv(x, k)) ** 2), (0, 1))
        return conv(x, k), grad(x, k), jax.jvp(grad, (x, k), (vx, vk))[1]

    ours, ref = derivatives(im2col, x, k), derivatives(lax_conv, x, k)
    np.testing.assert_allclose(ours[0], ref[0], rtol=1e-13, atol=1e-13)
    for u, v in zip(jax.tree.leaves(ours[1:]), jax.tree.leaves(ref[1:])):
        np.testing.assert_allclose(u, v, rtol=1e-11, atol=1e-12)


@pytest.mark.parametrize("formulation", ["im2col_conv", "toeplitz_conv"])
def test_conv_formulations_fall_back_to_lax_for_strides_and_groups(formulation):
    x = jnp.arange(72.0).reshape(1, 6, 6, 2)
    k = jnp.arange(36.0).reshape(3, 3, 1, 4)
    got = getattr(models, formulation)(x, k, (2, 2), "VALID", dimension_numbers=NHWC,
                                       feature_group_count=2)
    want = jax.lax.conv_general_dilated(x, k, (2, 2), "VALID", dimension_numbers=NHWC,
                                        feature_group_count=2)
    np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("formulation", ["im2col_conv", "toeplitz_conv"])
def test_conv_formulations_give_lax_conv_s_empty_output_for_a_kernel_larger_than_the_input(
        formulation):
    x, k = jnp.ones((1, 3, 3, 1)), jnp.ones((5, 5, 1, 6))
    got = getattr(models, formulation)(x, k, (1, 1), "VALID", dimension_numbers=NHWC)
    assert got.shape == (1, 0, 0, 6)


@pytest.mark.parametrize("out_width,out_channels,block", [
    (28, 6, 7), (10, 16, 5), (8, 6, 8), (4, 16, 4),  # lenet on 32x32x3 and on 8x8x1
    (28, 8, 7), (28, 16, 4), (28, 64, 1),  # conv4 widths
    (11, 16, 3), (101, 6, 7), (3, 6, 3),  # no divisor near: padded; or the whole width
])
def test_toeplitz_block_gives_the_dot_at_least_40_columns(out_width, out_channels, block):
    assert models.toeplitz_block(out_width, out_channels) == block


@pytest.mark.parametrize("shape,padding", [((2, 8, 6, 3), "VALID"), ((2, 9, 7, 3), "VALID"),
                                           ((2, 9, 7, 3), "SAME"), ((3, 5, 5, 2), "SAME")])
def test_max_pool_equals_reduce_window_with_first_and_second_derivatives(x64, shape, padding):
    import flax.linen as nn

    rng = np.random.default_rng(1)
    x, v = _f64(rng, shape), _f64(rng, shape)
    ours = lambda x: models.max_pool(x, 2, padding)
    ref = lambda x: nn.max_pool(x, (2, 2), (2, 2), padding=padding)

    @functools.partial(jax.jit, static_argnums=0)  # one program per formulation
    def derivatives(pool, x):
        grad = jax.grad(lambda x: jnp.sum(jnp.sin(pool(x)) * jnp.cos(pool(x) ** 2)))
        return pool(x), grad(x), jax.jvp(grad, (x,), (v,))[1]

    (value, grad, hvp), (value_ref, grad_ref, hvp_ref) = derivatives(ours, x), derivatives(ref, x)
    np.testing.assert_array_equal(value, value_ref)
    np.testing.assert_allclose(grad, grad_ref, rtol=1e-13, atol=1e-14)
    np.testing.assert_allclose(hvp, hvp_ref, rtol=1e-12, atol=1e-13)


def test_max_pool_gives_tied_windows_gradient_to_the_first_maximum_like_reduce_window():
    import flax.linen as nn

    x = jnp.zeros((1, 4, 4, 2)).at[0, 3, 3, 1].set(1.0)  # ReLU outputs: ties at 0 are common
    ours = jax.grad(lambda x: jnp.sum(models.max_pool(x) * jnp.arange(1.0, 9.0).reshape(1, 2, 2, 2)))
    ref = jax.grad(lambda x: jnp.sum(nn.max_pool(x, (2, 2), (2, 2))
                                     * jnp.arange(1.0, 9.0).reshape(1, 2, 2, 2)))
    np.testing.assert_array_equal(ours(x), ref(x))


def test_conv_impls_give_the_same_model_and_exact_meta_gradient(x64):
    """lax vs im2col vs toeplitz on a whole model: same init, outputs, and second-order meta-gradient
    through ``meta.adapt`` (float64), rolled and unrolled inner loops. (Rolled vs unrolled
    with ``lax`` convolutions: tests/test_meta.py; each padding's convolution and pooling,
    with first and second derivatives, above: so lenet stands for conv4 here too.) Every
    program is jitted: each eager op would be a separate XLA compilation, which is most of
    such a test's time."""
    from trm_jax import meta

    make = lambda impl: models.lenet(4, (8, 8, 1), padding="SAME", param_dtype=jnp.float64,
                                     conv_impl=impl)
    lax_model, im2col_model, toeplitz_model = make("lax"), make("im2col"), make("toeplitz")
    params = jax.jit(lax_model.init)(jax.random.key(0))
    chex.assert_trees_all_equal(params, jax.jit(im2col_model.init)(jax.random.key(0)))
    rng = np.random.default_rng(2)
    xs, xq = _f64(rng, (6, *lax_model.input_shape)), _f64(rng, (5, *lax_model.input_shape))
    ys, yq = jnp.asarray(rng.integers(0, 4, 6)), jnp.asarray(rng.integers(0, 4, 5))
    for model in (im2col_model, toeplitz_model):
        np.testing.assert_allclose(jax.jit(model.apply)(params, xq),
                                   jax.jit(lax_model.apply)(params, xq), rtol=1e-12, atol=1e-13)

    def outer(model, unroll):
        def loss(p):
            adapted = meta.adapt(p, xs, ys, apply_fn=model.apply, inner_lr=0.5, steps=2,
                                 unroll=unroll)
            return meta.softmax_cross_entropy(model.apply(adapted, xq), yq)
        return jax.jit(jax.grad(loss))(params)

    want = outer(lax_model, 1)
    for model, unroll in ((im2col_model, 1), (im2col_model, True), (toeplitz_model, True)):
        chex.assert_trees_all_close(outer(model, unroll), want, rtol=1e-10, atol=1e-12)


def test_auto_conv_impl_is_per_backend_and_layer_width():
    narrow, wide = models.TOEPLITZ_MAX_CHANNELS, models.TOEPLITZ_MAX_CHANNELS + 1
    assert models.resolve_conv_impl("auto", "gpu") == "lax"
    assert models.resolve_conv_impl("auto", "gpu", narrow) == "lax"
    assert models.resolve_conv_impl("auto", "cpu", narrow) == "toeplitz"
    assert models.resolve_conv_impl("auto", "cpu", wide) == "im2col"
    assert models.resolve_conv_impl("auto", "cpu") == "im2col"
    assert models.resolve_conv_impl("lax", "cpu", narrow) == "lax"
    assert models.resolve_conv_impl("im2col", "gpu") == "im2col"
    with pytest.raises(ValueError, match="conv_impl must be one of"):
        models.lenet(10, conv_impl="fft")


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="what 'auto' picks on cpu")
def test_auto_models_run_no_xla_convolution_on_cpu():
    """Every convolution of an ``auto`` model is a ``dot`` on cpu: LeNet's narrow layers
    as banded matmuls, Conv4's wide ones as im2col (and ``lax`` keeps XLA's)."""
    def program(model):  # the printed jaxpr, nested jaxprs included
        x = jnp.zeros((2, *model.input_shape), jnp.float32)
        return str(jax.make_jaxpr(model.apply)(jax.eval_shape(model.init, jax.random.key(0)), x))

    for model in (models.lenet(10), models.lenet(10, (8, 8, 1), "SAME"), models.conv4(5)):
        assert "conv_general_dilated" not in program(model), model.name
    assert "conv_general_dilated" in program(models.lenet(10, conv_impl="lax"))


def test_conv_impl_enters_the_spec_only_when_set():
    assert "conv_impl" not in models.lenet(10).spec()
    model = models.lenet(10, conv_impl="im2col")
    assert models.from_spec(model.spec()).spec() == model.spec()
    assert model.spec()["conv_impl"] == "im2col"


def test_param_shapes_and_feature_dim_are_traced_once_per_model():
    model = models.lenet(num_classes=5, input_shape=(8, 8, 1), padding="SAME")
    shapes = model.param_shapes()
    want = jax.eval_shape(model.init, jax.random.key(0))
    assert jax.tree.map(lambda s: (s.shape, s.dtype), shapes) == jax.tree.map(
        lambda s: (s.shape, s.dtype), want)
    # an equal model (e.g. dataclasses.replace'd back) reuses the cached trace
    assert dataclasses.replace(model, num_classes=5).param_shapes() is shapes
    assert model.feature_dim == want["head"]["dense"]["kernel"].shape[0] == 84
