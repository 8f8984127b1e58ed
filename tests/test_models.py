import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from trm_jax import models


def test_lenet_has_the_papers_62006_parameters_on_cifar_shape():
    model = models.lenet(10, (32, 32, 3), padding="VALID")
    params = model.init(jax.random.key(0))
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
    params = model.init(jax.random.key(1))
    images = jax.random.randint(jax.random.key(2), (4, *model.input_shape), 0, 256).astype(jnp.uint8)
    features = model.features(params["features"], images)
    chex.assert_shape(features, (4, model.feature_dim))
    logits = model.head(params["head"], features)
    chex.assert_shape(logits, (4, model.num_classes))
    np.testing.assert_array_equal(logits, model.apply(params, images))


def test_head_is_swappable_and_can_change_width():
    model = models.lenet(10, (8, 8, 1), padding="SAME")
    params = model.init(jax.random.key(0))
    fresh = model.init_head(jax.random.key(5), num_classes=3)
    images = jax.random.randint(jax.random.key(2), (2, 8, 8, 1), 0, 256).astype(jnp.uint8)
    logits = model.apply({"features": params["features"], "head": fresh}, images)
    chex.assert_shape(logits, (2, 3))
    assert not np.allclose(fresh["dense"]["kernel"][:, :3], params["head"]["dense"]["kernel"][:, :3])


def test_uint8_images_are_normalised_inside_and_floats_pass_through():
    images = jnp.array([0, 255], jnp.uint8).reshape(2, 1, 1, 1)
    np.testing.assert_allclose(models.to_float(images).ravel(), [-1.0, 1.0])
    floats = jnp.array([0.3, -2.0])
    assert models.to_float(floats) is floats


def test_vmap_over_seeds_gives_different_inits():
    model = models.lenet(5, (8, 8, 1), padding="SAME")
    params = jax.vmap(model.init)(jax.random.split(jax.random.key(0), 3))
    kernels = params["features"]["conv1"]["kernel"]
    assert kernels.shape[0] == 3 and not np.allclose(kernels[0], kernels[1])


def test_spec_round_trip():
    model = models.conv4(7, (12, 12, 1), width=8, norm="layer")
    again = models.from_spec(model.spec())
    assert again.spec() == model.spec() and again.feature_dim == model.feature_dim


def test_bad_model_settings_are_rejected_with_clear_messages():
    with pytest.raises(ValueError, match="SAME"):
        models.lenet(5, (8, 8, 1), padding="VALID")
    with pytest.raises(ValueError, match="unknown model 'resnet'.*conv4.*lenet"):
        models.make_model("resnet")
    with pytest.raises(ValueError, match="input_shape"):
        models.conv4(5, (8, 8))
    with pytest.raises(ValueError, match="norm"):
        models.conv4(5, (8, 8, 1), norm="batch")
