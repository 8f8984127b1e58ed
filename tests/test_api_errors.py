"""The library's entry points check their arguments: a wrong type or value is a
``ConfigError`` naming it (never a raw ``TypeError``/``AttributeError`` from deep inside)."""
from __future__ import annotations

import dataclasses
import math

import jax
import numpy as np
import pytest

import trm_jax
from trm_jax import errors
from trm_jax.evaluation import SuiteConfig


@pytest.mark.parametrize("seeds, message", [
    (2.5, "got float 2.5"),
    ("3", "got str '3'"),
    (-1, "count >= 1 or a list of seeds, got -1"),
    (0, "got 0"),
    (True, "got bool True"),
    ([], "non-empty list"),
    ([0, -2], "not allowed: [-2]"),
    ([0, 1.5], "not allowed: [1.5]"),
    (None, "got NoneType None"),
])
def test_seed_keys_rejects_what_is_not_seeds(seeds, message):
    with pytest.raises(errors.ConfigError) as err:
        trm_jax.seed_keys(seeds)
    assert message in str(err.value)


def test_seed_keys_of_a_count_and_of_a_list():
    data = lambda keys: np.asarray(jax.random.key_data(keys))
    np.testing.assert_array_equal(data(trm_jax.seed_keys(3)), data(trm_jax.seed_keys([0, 1, 2])))
    np.testing.assert_array_equal(data(trm_jax.seed_keys(np.array([4, 7]))),
                                  data(jax.vmap(jax.random.key)(np.array([4, 7]))))


def test_suite_config_takes_one_name_as_a_tuple_of_one_but_not_a_bare_number():
    assert SuiteConfig(attacks="linear_probe").attacks == ("linear_probe",)
    assert SuiteConfig(attacks="all").suite == "all"
    assert SuiteConfig(data_per_class=[5, None]).data_per_class == (5, None)
    for name, value in (("learning_rates", 0.1), ("steps_multipliers", 4), ("data_per_class", 5),
                        ("scratch_learning_rates", 0.1), ("optimizers", 1)):
        with pytest.raises(errors.ConfigError, match=f"{name} must be a tuple .* got {value} ") as err:
            SuiteConfig(**{name: value})
        assert err.value.field == name and "\n" not in str(err.value)


@pytest.mark.parametrize("kwargs, field, message", [
    (dict(attacks="linera_probe"), "attacks", "unknown attack(s) ['linera_probe']"),
    (dict(attacks=("linear_probe", 3)), "attacks", "each a string, got ('linear_probe', 3)"),
    (dict(batch_size=0), "batch_size", "batch_size must be an integer >= 1, got 0"),
    (dict(epochs=True), "epochs", "got True"),
    (dict(learning_rates=(0.1, math.inf)), "learning_rates", "finite and > 0"),
    (dict(scratch_learning_rates=(-1.0,)), "scratch_learning_rates", "finite and > 0"),
    (dict(batching="fast"), "batching", "unknown batching 'fast'"),
    (dict(data_per_class=(5, 5)), "data_per_class", "distinct"),
    (dict(optimizers={"adam"}), "optimizers", "must be a tuple"),
])
def test_suite_config_errors_name_the_field(kwargs, field, message):
    with pytest.raises(errors.ConfigError) as err:
        SuiteConfig(**kwargs)
    assert err.value.field == field and message in str(err.value)


def test_suite_check_against_the_data(digits_protocol):
    SuiteConfig(batch_size=262).check(digits_protocol)  # the 262 malicious fine-tuning images
    with pytest.raises(errors.ConfigError, match="batch_size=263 exceeds the 262 malicious") as err:
        SuiteConfig(batch_size=263).check(digits_protocol)
    assert err.value.field == "batch_size"
    n = len(digits_protocol.finetune.beneficial)
    SuiteConfig(attacks=("linear_probe",), batch_size=262).check(digits_protocol)
    if n < 262:  # warm_start trains on the beneficial fine-tuning half first
        with pytest.raises(errors.ConfigError, match=f"exceeds the {n} beneficial"):
            SuiteConfig(attacks=("warm_start",), batch_size=262).check(digits_protocol)
    # One malicious class: no attack can train a classifier of it.
    labels = np.arange(600, dtype=np.int32) % 10
    images = np.zeros((600, 8, 8, 1), np.uint8)
    spec = dataclasses.replace(trm_jax.data.preset("digits"), beneficial_classes=(0, 1),
                               malicious_classes=(9,), pretrain_size=300)
    single = trm_jax.data.protocol_from_arrays(spec, (images, labels), (images, labels))
    with pytest.raises(errors.ConfigError, match=r"malicious_classes=\[9\].*need at least 2") as err:
        SuiteConfig().check(single)
    assert err.value.field == "malicious_classes"


@pytest.mark.parametrize("call, message", [
    (lambda p: trm_jax.evaluate("nope", p), "evaluate needs a Protected (what trm_jax.protect "
                                            "returns), got str"),
    (lambda p: trm_jax.config_for("nope", "digits"), "unknown method 'nope'"),
    (lambda p: trm_jax.config_for(3, "digits"), "unknown method 3"),
    (lambda p: trm_jax.config_for("skd", ["digits"]), "unknown dataset ['digits']"),
    (lambda p: trm_jax.protect("skd", trm_jax.config_for("skd", "digits"), "p", trm_jax.seed_keys(1)),
     "protocol must be a trm_jax.data.ProtocolData"),
    (lambda p: trm_jax.protect("skd", trm_jax.config_for("reference", "digits"), p,
                               trm_jax.seed_keys(1)), "needs a SKDMethodConfig, got ReferenceConfig"),
    (lambda p: trm_jax.protect("reference", trm_jax.config_for("reference", "digits"), p, [0, 1]),
     "keys must be a [S] stack of typed PRNG keys"),
    (lambda p: trm_jax.protect("reference", trm_jax.config_for("reference", "digits"), p,
                               trm_jax.seed_keys(1), hooks="log"), "hooks must be a trm_jax.hooks.Hooks"),
    (lambda p: trm_jax.protect("reference", trm_jax.config_for("reference", "digits"), p,
                               trm_jax.seed_keys(1), model="lenet"), "model must be a trm_jax.models.Model"),
])
def test_entry_points_check_their_arguments(call, message, digits_protocol, monkeypatch):
    from trm_jax.methods import reference, skd

    def compute(*args, **kwargs):
        raise AssertionError("computed despite a bad argument")

    monkeypatch.setattr(reference, "protect", compute)
    monkeypatch.setattr(skd, "protect", compute)
    with pytest.raises(errors.ConfigError) as err:
        call(digits_protocol)
    assert message in str(err.value)


@pytest.mark.parametrize("change, reference, message", [
    (lambda x: x[..., :1] if x.ndim > 1 else x, None,
     "protected.params does not match the model 'lenet' for 2 seeds: leaf ['features']['conv1']['bias'] "
     "has shape (2, 1), expected (2, 6)"),
    (lambda x: x[:1], None, "has shape (1, 6), expected (2, 6)"),             # one seed short
    (lambda x: x.at[(1,) + (0,) * (x.ndim - 1)].set(float("nan")), None,
     "protected.params holds NaN/Inf (leaf ['features']['conv1']['bias'])"),
    (lambda x: x, "ref", "reference must be a model's [S, ...] params stack"),
    (lambda x: x, {"features": 1.0}, "reference must be a model's [S, ...] params stack"),
    (lambda x: x, "nan-stack", "reference holds NaN/Inf"),
])
def test_evaluate_refuses_params_that_do_not_fit_or_are_not_finite(change, reference, message,
                                                                   digits_protocol):
    import jax

    from trm_jax import models

    keys = trm_jax.seed_keys(2)
    model = models.lenet(5, digits_protocol.image_shape, padding="SAME")
    params = model.init_seeds(keys)
    if reference == "nan-stack":
        reference = jax.tree.map(lambda x: x * float("nan"), params)
    protected = trm_jax.Protected("reference", model, jax.tree.map(change, params), keys, {})
    suite = SuiteConfig(attacks=("linear_probe",), learning_rates=(0.1,), epochs=1)
    with pytest.raises(errors.ConfigError) as err:
        trm_jax.evaluate(protected, digits_protocol, suite, reference=reference)
    assert message in str(err.value)


@pytest.mark.parametrize("kwargs, message", [
    ({"spec": None},
     "spec must be a trm_jax.data.ProtocolSpec (trm_jax.data.preset(name)), got NoneType"),
    ({"spec": "digits"}, "spec must be a trm_jax.data.ProtocolSpec"),
    ({"data_dir": 3}, "data_dir must be a folder path or None, got int 3"),
    ({"download": "yes"}, "download must be True, False or None"),
    ({"download": 1}, "download must be True, False or None"),
])
def test_load_protocol_checks_its_arguments(kwargs, message, digits_data_dir):
    from trm_jax import data

    args = {"spec": data.preset("digits"), "data_dir": digits_data_dir, **kwargs}
    with pytest.raises(errors.ConfigError) as err:
        data.load_protocol(**args)
    assert message in str(err.value)


def test_a_model_whose_head_does_not_fit_the_classes_is_refused(digits_protocol, monkeypatch):
    from trm_jax import models, train

    def compute(*args, **kwargs):
        raise AssertionError("trained despite a head of the wrong size")

    monkeypatch.setattr(train, "fit_classifier", compute)
    three = models.lenet(3, digits_protocol.image_shape, padding="SAME")
    with pytest.raises(errors.ConfigError, match="the given model has 3 outputs; this method needs 5"):
        trm_jax.protect("reference", trm_jax.config_for("reference", "digits"), digits_protocol,
                        trm_jax.seed_keys(1), model=three)


def test_method_check_validates_the_config_against_the_data(digits_protocol):
    import dataclasses

    config = trm_jax.config_for("skd", "digits")
    n = len(digits_protocol.pretrain.beneficial)
    too_big = dataclasses.replace(config, head=dataclasses.replace(config.head, batch_size=n + 1))
    with pytest.raises(errors.ConfigError, match=f"head.batch_size={n + 1} exceeds the {n}") as err:
        trm_jax.methods.check("skd", too_big, digits_protocol)
    assert err.value.field == "head.batch_size"
    with pytest.raises(errors.ConfigError, match="needs a ReferenceConfig, got SKDMethodConfig"):
        trm_jax.methods.check("reference", config, digits_protocol)


@pytest.mark.parametrize("kwargs, message", [
    (dict(learning_rate="0.1"), "learning_rate must be finite and > 0, got '0.1' (str)"),
    (dict(learning_rate=None), "learning_rate must be finite and > 0, got None (NoneType)"),
    (dict(learning_rate=1e308), "(beyond float32's range"),
    (dict(epochs=True), "epochs must be an integer >= 0, got True (bool)"),
    (dict(epochs=2**63), "(beyond int64)"),
    (dict(batch_size=2.0), "batch_size must be an integer >= 1, got 2.0"),
    (dict(b1=1.0), "b1 must be finite and in [0, 1), got 1.0"),
    (dict(momentum=math.nan), "momentum must be finite and in [0, 1), got nan"),
    (dict(optimizer="lion"), "unknown optimizer 'lion'"),
])
def test_train_config_fields_are_typed_and_bounded(kwargs, message):
    """Raw TypeErrors (a str or None learning rate), a bool accepted as an epoch count, Adam's
    b1 >= 1 and a NaN momentum (silently diverging) before: each is one ConfigError now."""
    with pytest.raises(errors.ConfigError) as err:
        trm_jax.train.TrainConfig(**kwargs)
    assert message in str(err.value) and err.value.field == next(iter(kwargs))


@pytest.mark.parametrize("make, field", [
    (lambda: trm_jax.simulated_attack.AttackerSpace(b2=1.0), "b2"),
    (lambda: trm_jax.simulated_attack.AttackerSpace(momentum=-0.1), "momentum"),
    (lambda: trm_jax.simulated_attack.AttackerSpace(eps_root=0.0), "eps_root"),
    (lambda: trm_jax.simulated_attack.AttackerSpace(learning_rates=0.1), "learning_rates"),
    (lambda: trm_jax.attacks.AttackConfig(b1=1.5), "b1"),
    (lambda: trm_jax.methods.reverse_maml.ReverseMAMLConfig(meta=None), "meta"),
    (lambda: trm_jax.methods.reverse_maml.ReverseMAMLConfig(meta_steps=2**63), "meta_steps"),
    (lambda: trm_jax.methods.skd.SKDMethodConfig(skd=None), "skd"),
    (lambda: trm_jax.unlearning.UnsirConfig(noise="x"), "noise"),
    (lambda: trm_jax.meta.MetaConfig(remat="yes"), "remat"),
    (lambda: trm_jax.skd.SKDConfig(widths=4), "widths"),
])
def test_every_optimizer_and_method_config_checks_its_fields(make, field):
    with pytest.raises(errors.ConfigError) as err:
        make()
    assert err.value.field == field and "\n" not in str(err.value)
