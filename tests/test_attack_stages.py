"""Attacks as compositions of stages, and your own Flax model under protect / evaluate."""
from __future__ import annotations

import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import trm_jax
from trm_jax import attacks, datasets, errors, models
from trm_jax.attacks import FineTune, LinearProbe, Probe, Reinit, WarmStart


def test_stages_must_be_in_order_and_end_with_one_finetune():
    with pytest.raises(errors.ConfigError, match="must end with one FineTune"):
        attacks.AttackSpec("x", (Reinit(("top:1",)),))
    with pytest.raises(errors.ConfigError, match="in the order WarmStart, Reinit, Probe, FineTune"):
        attacks.AttackSpec("x", (Probe(1), Reinit(("top:1",)), FineTune(("all",))))
    with pytest.raises(errors.ConfigError, match=r"WarmStart.epochs must be an integer >= 1, got 0"):
        attacks.AttackSpec("x", (WarmStart(0), FineTune(("all",))))
    spec = attacks.AttackSpec("x", (WarmStart(1), Reinit(("top:1",)), Probe(2), FineTune(("all",))))
    assert (spec.warm_start_epochs, spec.reinit, spec.probe_epochs, spec.trainable) == (
        1, ("top:1",), 2, ("all",))
    assert attacks.ATTACK_SPECS["standardized_probe"].stages == (LinearProbe(standardize=True),)


@pytest.fixture(scope="module")
def setup(digits_protocol):
    model = datasets.model_for("digits", 5, digits_protocol.image_shape)
    keys = jax.vmap(jax.random.key)(jnp.arange(2))
    return model, model.init_seeds(keys), keys, attacks.attack_data(digits_protocol)


def test_a_new_attack_is_a_composition_and_runs_in_the_sweep(setup):
    """A registered composition equal to a built-in attack gives its curves bitwise; a new one
    (re-init the top 2 layers, probe 1 epoch, then train them) freezes what it must."""
    model, params, keys, data = setup
    try:
        attacks.register(attacks.AttackSpec("my_reinit_top2", (Reinit(("top:2",)),
                                                               FineTune(("head", "top:2")))))
        attacks.register(attacks.AttackSpec("reinit_top2_lpft", (
            Reinit(("top:2",)), Probe(1), FineTune(("head", "top:2"))), reuse=True))
        with pytest.raises(errors.ConfigError, match="is taken"):
            attacks.register(attacks.AttackSpec("full_finetune", (FineTune(("all",)),)))
        run = lambda name, **kw: attacks.attack_sweep(
            model, params, keys, (0.01,), data, attacks.AttackConfig(name, 5, epochs=2, batch_size=64),
            batching="vmap", **kw)
        np.testing.assert_array_equal(np.asarray(run("my_reinit_top2").curve),
                                      np.asarray(run("reinit_top2").curve))
        out = run("reinit_top2_lpft", return_params=True)
        after = out.params["features"]
        for layer in ("conv1", "conv2"):  # the bottom half: bitwise as released
            for a, b in zip(jax.tree.leaves(after[layer]), jax.tree.leaves(params["features"][layer])):
                np.testing.assert_array_equal(np.asarray(a)[0], np.asarray(b))
        assert "reinit_top2_lpft" in attacks.resolve_attacks("all")
    finally:
        attacks.unregister("my_reinit_top2")
        attacks.unregister("reinit_top2_lpft")
    assert "reinit_top2_lpft" not in attacks.ATTACK_SPECS and "full_finetune" in attacks.ATTACK_SPECS


def test_what_trains_convolutions_is_read_off_the_model(setup):
    model = setup[0]
    trains = {a: attacks.trains_convs(model, attacks.AttackConfig(a)) for a in attacks.ATTACKS}
    assert {a for a, t in trains.items() if t} == {
        "reinit_top3", "full_finetune", "warm_start", "probe_then_finetune"}


class MLP(nn.Module):
    """A user's own features module (not one of the project's)."""

    @nn.compact
    def __call__(self, x):
        x = nn.relu(nn.Dense(32, name="hidden")(x.reshape(x.shape[0], -1)))
        x = nn.relu(nn.Dense(32, name="middle")(x))
        return nn.Dense(16, name="penultimate")(x)


def test_wrap_checks_the_layers_against_the_module():
    model = models.wrap(MLP(), 5, ("hidden", "middle", "penultimate"), (8, 8, 1))
    assert model.feature_layers == (("hidden",), ("middle",), ("penultimate",))
    assert model.penultimate == "penultimate" and model.feature_dim == 16
    assert attacks.resolve_parts(model, ("top:2",)) == ("features/middle", "features/penultimate")
    with pytest.raises(errors.ConfigError, match=re.escape("missing from the module: ['nope']")):
        models.wrap(MLP(), 5, ("hidden", "middle", "nope"), (8, 8, 1))
    with pytest.raises(errors.ConfigError, match=re.escape("owned by no layer: ['middle']")):
        models.wrap(MLP(), 5, ("hidden", "penultimate"), (8, 8, 1))
    with pytest.raises(errors.ConfigError, match="no layer order"):
        _ = models.Model("bare", MLP(), 5, (8, 8, 1), "penultimate").feature_layers


def test_your_own_model_is_protected_and_attacked(digits_protocol):
    model = models.wrap(MLP(), 5, ("hidden", "middle", "penultimate"), digits_protocol.image_shape)
    keys = trm_jax.seed_keys(2)
    config = trm_jax.config_for("reference", "digits")
    protected = trm_jax.protect("reference", config, digits_protocol, keys, model=model)
    assert protected.metrics["beneficial_test_accuracy"].mean() > 0.8
    suite = trm_jax.SuiteConfig(attacks=("linear_probe", "reinit_penultimate", "full_finetune"),
                                learning_rates=(1e-2,), epochs=2)
    result = trm_jax.evaluate(protected, digits_protocol, suite)
    assert result.attacks == ("linear_probe", "reinit_penultimate", "full_finetune")
    assert result.accuracy.shape == (3, 1, 1, 2, 1, 3) and np.all(result.finite)
    assert attacks.worst_case(result, "all", "1x").final.mean() > 0.5  # the attacker learns


def test_a_suite_gives_the_same_numbers_with_any_number_of_workers(setup):
    model, params, keys, data = setup
    plan = attacks.attack_plan(("linear_probe", "reinit_penultimate"), learning_rates=(0.01, 0.1),
                               epochs=2)
    budgets = attacks.Budgets((5, None), (1, 2)).validate()
    run = lambda workers: attacks.run_plan(model, params, keys, attacks.attack_plan(
        ("linear_probe", "reinit_penultimate"), learning_rates=(0.01, 0.1), epochs=4),
        data, budgets, 2, workers=workers)
    one, two = run(1), run(2)
    assert one.accuracy.shape == (2, 1, 2, 2, 2, 5) and not np.isnan(one.accuracy).any()
    np.testing.assert_array_equal(one.accuracy, two.accuracy)
    np.testing.assert_array_equal(one.finite, two.finite)
    assert set(plan) == set(one.attacks)
