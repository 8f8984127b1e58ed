"""SKD's masking switches (issue 24): the mask at any features layer, the end-to-end
objective, a channel fraction, wider LeNets, and the honesty checks (dead units, gradients)."""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from trm_jax import data, methods, models, skd
from trm_jax.errors import ConfigError
from trm_jax.methods import reference
from trm_jax.methods import skd as skd_method

MODEL = models.lenet(5, (8, 8, 1), padding="SAME")
init_one = jax.jit(MODEL.init)


def params_for(seed: int = 0):
    return init_one(jax.random.key(seed))


def random_images(n: int, seed: int = 0) -> jax.Array:
    return jnp.asarray(np.random.default_rng(seed).integers(0, 256, (n, 8, 8, 1), dtype=np.uint8))


def conv(x, layer):
    out = jax.lax.conv_general_dilated(x, layer["kernel"], (1, 1), "SAME",
                                       dimension_numbers=("NHWC", "HWIO", "NHWC"))
    return out + layer["bias"].reshape(1, 1, 1, -1)


# ----------------------------------------------------------------------------- layers


def test_mask_layers_bottom_to_top_and_bad_names():
    assert skd.mask_layers(MODEL) == ("conv1", "conv2", "fc1", "fc2")
    assert skd.resolve_mask_layer(MODEL, None) == "fc2"
    assert skd.resolve_mask_layer(MODEL, "conv2") == "conv2"
    with pytest.raises(ConfigError, match=r"mask_layer 'conv9' is not a features layer of lenet; "
                                          r"allowed: \['conv1', 'conv2', 'fc1', 'fc2'\]"):
        skd.resolve_mask_layer(MODEL, "conv9")
    assert skd.head_trainable(MODEL) == ("head",)
    assert skd.head_trainable(MODEL, "conv2") == ("head", "features/fc1", "features/fc2")
    conv4 = models.conv4(5, (12, 12, 1), width=4, norm="layer")
    assert skd.mask_layers(conv4) == ("conv1", "conv2", "conv3", "conv4")


def test_layer_preactivations_are_each_layers_output_before_its_relu():
    params, images = params_for()["features"], random_images(3)
    pre = skd.layer_preactivations(MODEL, params, images, ("conv1", "conv2", "fc2"))
    x = models.to_float(images)
    conv1 = conv(x, params["conv1"])
    np.testing.assert_allclose(pre["conv1"], conv1, rtol=1e-5, atol=1e-5)
    conv2 = conv(models.max_pool(jax.nn.relu(conv1)), params["conv2"])
    np.testing.assert_allclose(pre["conv2"], conv2, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(pre["fc2"], MODEL.features(params, images))
    np.testing.assert_array_equal(skd.layer_preactivations(MODEL, params, images, "conv1"),
                                  pre["conv1"])


def test_layer_preactivations_of_conv4_read_the_norm_before_the_relu():
    model = models.conv4(5, (12, 12, 1), width=4, norm="layer")
    params = model.init(jax.random.key(0))["features"]
    pre = skd.layer_preactivations(model, params, jnp.zeros((2, 12, 12, 1)), "conv1")
    # LayerNorm over H, W, C of a constant map is 0 everywhere, then its bias (0 at init).
    np.testing.assert_allclose(pre, 0.0, atol=1e-6)


def test_masked_channels_keep_the_first_ceil_fraction():
    x = jnp.arange(2 * 3 * 16, dtype=jnp.float32).reshape(2, 3, 16)
    np.testing.assert_array_equal(skd.masked_channels(x, 0.5), x[..., :8])
    np.testing.assert_array_equal(skd.masked_channels(x, 0.3), x[..., :5])  # ceil(4.8)
    np.testing.assert_array_equal(skd.masked_channels(x), x)


# ----------------------------------------------------------------------------- regress at a layer


def test_regression_at_conv2_targets_and_gradients():
    keys = jax.vmap(jax.random.key)(jnp.arange(2))
    teachers = jax.vmap(MODEL.init)(keys)["features"]
    ben, mal = random_images(4, 1), random_images(3, 2)
    images, targets = skd.distillation_data(MODEL, teachers, ben, mal, -7.0, layer="conv2")
    assert targets.shape == (2, 7, 4, 4, 16)  # conv2 of 8x8 SAME after one pool: 4x4x16
    one = jax.tree.map(lambda x: x[0], teachers)
    np.testing.assert_allclose(targets[0, :4], skd.layer_preactivations(MODEL, one, ben, "conv2"),
                               rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(targets[:, 4:], -7.0)
    # The student's loss there is zero at the teacher on beneficial images, and reaches no layer above.
    loss_fn = skd.distillation_loss(MODEL, "conv2")
    loss, _ = loss_fn(one, (images[:4], targets[0, :4]))
    assert float(loss) < 1e-10
    grads = jax.grad(lambda p: loss_fn(p, (images, targets[0]))[0])(one)
    assert float(jnp.abs(grads["conv2"]["kernel"]).max()) > 0
    for layer in ("fc1", "fc2"):
        assert all(float(jnp.abs(g).max()) == 0.0 for g in jax.tree.leaves(grads[layer]))
    # The penultimate (or None) is the paper's loss, unchanged.
    t = jnp.zeros((7, 84))
    assert skd.distillation_loss(MODEL, "fc2")(one, (images, t))[0] == \
        skd.distillation_loss(MODEL)(one, (images, t))[0]


def test_attach_head_at_a_layer_zeroes_only_that_bias():
    features = params_for()["features"]
    masked = skd.attach_head(MODEL, jax.random.key(1), features, "conv2")["features"]
    np.testing.assert_array_equal(masked["conv2"]["bias"], 0.0)
    for layer in ("conv1", "fc1", "fc2"):
        for a, b in zip(jax.tree.leaves(masked[layer]), jax.tree.leaves(features[layer])):
            np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(masked["conv2"]["kernel"], features["conv2"]["kernel"])


# ----------------------------------------------------------------------------- end to end


def test_end_to_end_loss_is_its_three_terms():
    config = skd.SKDConfig(mask_layer="conv2", objective="end_to_end", mask_loss="mse",
                           malicious_target=-2.0, mask_weight=0.5, logits_weight=0.25)
    params = params_for()
    images = random_images(5)
    labels = jnp.array([0, 3, -1, 1, -1])
    teacher = jax.random.normal(jax.random.key(3), (5, 5))
    loss, metrics = skd.end_to_end_loss(MODEL, "conv2", config)(
        params, (images, {"label": labels, "teacher": teacher}))
    logits = MODEL.apply(params, images)
    good = np.array([0, 1, 3])
    ce = optax.softmax_cross_entropy_with_integer_labels(logits[good], labels[good]).mean()
    soft = optax.softmax_cross_entropy(logits[good], jax.nn.softmax(teacher[good])).mean()
    pre = skd.layer_preactivations(MODEL, params["features"], images[np.array([2, 4])], "conv2")
    mask = jnp.mean(jnp.square(pre + 2.0))
    np.testing.assert_allclose(metrics["cross_entropy"], ce, rtol=1e-6)
    np.testing.assert_allclose(metrics["mask"], mask, rtol=1e-5)
    np.testing.assert_allclose(loss, ce + 0.25 * soft + 0.5 * mask, rtol=1e-5)


def test_masking_term_hinge_and_channel_fraction():
    pre = jnp.zeros((3, 2, 2, 4)).at[:, :, :, 2:].set(50.0)  # channels 2, 3 far above
    is_mal = jnp.array([True, True, False])
    half = skd.SKDConfig(objective="end_to_end", mask_fraction=0.5, malicious_target=-1.0)
    np.testing.assert_allclose(skd.masking_term(pre, is_mal, half), 1.0)  # (0 - -1)^2
    hinge = dataclasses.replace(half, mask_loss="hinge")
    assert float(skd.masking_term(pre - 5.0, is_mal, hinge)) == 0.0  # below the target: no loss
    np.testing.assert_allclose(skd.masking_term(pre, is_mal, hinge), 1.0)
    full = dataclasses.replace(half, mask_fraction=1.0)
    np.testing.assert_allclose(skd.masking_term(pre, is_mal, full), (1.0 + 51.0 ** 2) / 2)
    assert float(skd.masking_term(pre, jnp.zeros(3, bool), full)) == 0.0  # no malicious images


@pytest.mark.parametrize("kwargs, message", [
    (dict(objective="joint"), r"unknown objective 'joint'; allowed: \('regress', 'end_to_end'\)"),
    (dict(mask_loss="l1", objective="end_to_end"), r"unknown mask_loss 'l1'"),
    (dict(mask_fraction=0.5), r"mask_fraction=0.5 needs objective='end_to_end'"),
    (dict(mask_fraction=0.0, objective="end_to_end"), r"mask_fraction must be finite and in \(0, 1\]"),
    (dict(logits_weight=1.0), "belong to objective='end_to_end', not 'regress'"),
    (dict(mask_weight=-1.0, objective="end_to_end"), "mask_weight must be finite and >= 0"),
    (dict(widths=(6, 16)), r"widths must be a tuple of 4 values, each an integer >= 1"),
])
def test_bad_mask_settings_are_clear_errors(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        skd.SKDConfig(**kwargs)


# ----------------------------------------------------------------------------- honesty checks


def test_dead_percent_counts_images_with_all_zero_activations():
    params = params_for()["features"]
    # conv1: the mean of each 5x5 patch. A black image (-1 after normalising, 0 in SAME's
    # padding) is dead there, an image with a white 5x5 square is not.
    params = {**params, "conv1": {"kernel": jnp.full((5, 5, 1, 6), 1 / 25), "bias": jnp.zeros(6)}}
    images = jnp.zeros((3, 8, 8, 1), jnp.uint8).at[2, 2:7, 2:7, 0].set(255)
    dead = skd.dead_percent(MODEL, params, images)
    assert set(dead) == {"conv1", "conv2", "fc1", "fc2"}
    np.testing.assert_allclose(dead["conv1"], 100 * 2 / 3, rtol=1e-6)
    # A dead conv2 (bias far below its inputs) is dead for every image, and so is nothing else
    # forced: fc1 then sees zeros and its own bias.
    dead_conv2 = {**params, "conv2": {**params["conv2"], "bias": jnp.full(16, -1e4)}}
    assert float(skd.dead_percent(MODEL, dead_conv2, random_images(4))["conv2"]) == 100.0


def test_fine_tune_gradients_stop_below_a_dead_layer():
    params = params_for()
    features = {**params["features"],
                "conv2": {**params["features"]["conv2"], "bias": jnp.full(16, -1e4)}}
    probe = skd.probe_head(MODEL, jax.random.key(0), {"features": features}, 5)
    images, labels = random_images(8), jnp.arange(8) % 5
    norms = skd.finetune_gradient_norms(MODEL, probe, images, labels)
    assert float(norms["conv1"]) == 0.0 and float(norms["conv2"]) == 0.0  # exactly: dead ReLUs
    assert float(norms["head"]) > 0  # the fresh head's bias still learns
    alive = skd.finetune_gradient_norms(MODEL, skd.probe_head(MODEL, jax.random.key(0), params, 5),
                                        images, labels)
    assert all(float(v) > 0 for v in alive.values())
    # the norm is the gradient's L2 norm over the layer's leaves
    loss = lambda p: optax.softmax_cross_entropy_with_integer_labels(
        MODEL.apply(p, images), labels).mean()
    probe = skd.probe_head(MODEL, jax.random.key(0), params, 5)
    g = jax.grad(loss)(probe)["features"]["conv1"]
    np.testing.assert_allclose(alive["conv1"], jnp.sqrt(sum(jnp.sum(x ** 2) for x in jax.tree.leaves(g))),
                               rtol=1e-5)


# ----------------------------------------------------------------------------- wider LeNet


def test_lenet_widths_are_an_option_that_round_trips():
    default = models.lenet(5, (8, 8, 1), padding="SAME")
    assert default.spec() == {"name": "lenet", "num_classes": 5, "input_shape": [8, 8, 1],
                              "padding": "SAME"}  # unchanged: old runs' specs still match
    wide = models.lenet(5, (8, 8, 1), padding="SAME", widths=(6, 32, 120, 84))
    assert wide.spec()["widths"] == (6, 32, 120, 84)
    again = models.from_spec({**wide.spec(), "widths": [6, 32, 120, 84]})  # as JSON reads it back
    shapes = jax.eval_shape(again.init, jax.random.key(0))["features"]
    assert shapes["conv2"]["kernel"].shape == (5, 5, 6, 32)
    assert shapes["fc1"]["kernel"].shape == (2 * 2 * 32, 120)
    with pytest.raises(ConfigError, match=r"lenet widths must be 4 integers >= 1"):
        models.lenet(5, (8, 8, 1), padding="SAME", widths=(6, 0, 120, 84))


# ----------------------------------------------------------------------------- protect


def tiny_config(**skd_changes):
    base = methods.config_for("skd", "digits")
    one = lambda cfg, e: dataclasses.replace(cfg, epochs=e)
    return dataclasses.replace(base, teacher=one(base.teacher, 2), distill=one(base.distill, 2),
                               head=one(base.head, 1), skd=skd.SKDConfig(**skd_changes))


def test_protect_with_a_conv2_mask_freezes_what_is_at_and_below_it_bitwise(digits_protocol):
    """End to end with 0 distillation epochs: the head phase starts from the teacher and may
    change only the head, fc1 and fc2; conv1 and conv2 stay the teacher's, bit for bit."""
    keys = methods.seed_keys(2)
    config = dataclasses.replace(tiny_config(mask_layer="conv2", objective="end_to_end"),
                                 distill=dataclasses.replace(tiny_config().distill, epochs=0))
    protected = methods.protect("skd", config, digits_protocol, keys)
    teacher = reference.protect(reference.ReferenceConfig(config.teacher), digits_protocol, keys,
                                phase="teacher-e2")
    for layer in ("conv1", "conv2"):
        for a, b in zip(jax.tree.leaves(protected.params["features"][layer]),
                        jax.tree.leaves(teacher.params["features"][layer])):
            np.testing.assert_array_equal(a, b)
    for layer in ("fc1", "fc2"):
        assert not np.array_equal(protected.params["features"][layer]["kernel"],
                                  teacher.params["features"][layer]["kernel"])
    metrics = protected.metrics
    assert set(metrics["malicious_dead_percent"]) == {"conv1", "conv2", "fc1", "fc2"}
    assert metrics["finetune_grad_norm"]["conv1"].shape == (2,)


def test_protect_regressing_at_conv2_switches_conv2_off_for_malicious_digits(digits_protocol):
    """The paper's regression at conv2 (-100 targets): the masked conv2 has a zero bias, its
    misses count conv2's activations, and where a malicious test image is dead there the
    fine-tune gradient cannot reach conv1 / conv2 through it."""
    keys = methods.seed_keys(1)
    config = dataclasses.replace(tiny_config(mask_layer="conv2"),
                                 distill=dataclasses.replace(tiny_config().distill, epochs=10))
    protected = methods.protect("skd", config, digits_protocol, keys)
    np.testing.assert_array_equal(protected.params["features"]["conv2"]["bias"], 0.0)
    metrics = protected.metrics
    dead = metrics["malicious_dead_percent"]["conv2"]
    np.testing.assert_allclose(dead, 100.0 - metrics["misses_percent"], rtol=1e-5)
    # Measured (seed 0, 2 CPU cores): 100 % of the malicious test digits dead at conv2.
    assert float(dead[0]) > 90.0


def test_skd_widths_build_a_wider_teacher_and_student(digits_protocol):
    config = tiny_config(widths=(6, 24, 120, 84))
    model = skd_method.skd_model(config, digits_protocol)
    assert model.spec()["widths"] == (6, 24, 120, 84)
    with pytest.raises(ConfigError, match=r"mask_layer 'fc3' is not a features layer"):
        methods.check("skd", tiny_config(mask_layer="fc3"), digits_protocol)


def test_the_search_grid_is_valid_for_mnist5k(mnist5k_data_dir):
    """Every variant of ``experiments.skd_mask_search`` builds and checks (no compute)."""
    from experiments import skd_mask_search
    from experiments.simulated_attack_search import variant_config

    protocol = data.validation_protocol(data.load_protocol(data.preset("mnist5k"),
                                                           data_dir=mnist5k_data_dir))
    base = methods.config_for("skd", "mnist5k")
    configs = [variant_config(base, v) for v in skd_mask_search.GRID]
    for config in configs:
        methods.check("skd", config, protocol)
    assert configs[0].skd.mask_layer == "conv2" and configs[0].skd.objective == "end_to_end"
    assert configs[2].skd.widths == (6, 32, 120, 84) and configs[2].distill.epochs == 40
    assert configs[-1] == base  # the paper's SKD


def test_the_committed_mnist5k_search_table_and_tradeoff_figure_come_from_its_records(tmp_path):
    import pathlib

    from experiments import skd_mask_search as search

    folder = pathlib.Path(__file__).resolve().parents[1] / "experiments/results/mnist5k/skd_mask_search"
    rows = search.from_records(folder / "records.jsonl", 0.982, tmp_path / "results.md")
    assert (tmp_path / "results.md").read_text() == (folder / "results.md").read_text()
    assert (tmp_path / "tradeoff.png").stat().st_size > 10_000
    table_rows = [ln for ln in (folder / "results.md").read_text().splitlines()
                  if ln.startswith("| ") and not ln.startswith("| variant")]
    assert len(table_rows) == len(rows) >= 6
    assert search.short_name(search.E2E + ",distill.epochs=40") == "E2E,epochs=40"
