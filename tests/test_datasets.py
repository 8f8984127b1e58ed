"""The one table of datasets: every entry's method configs resolve."""
from __future__ import annotations

import pytest

import trm_jax
from trm_jax import datasets, methods, unlearning


@pytest.mark.parametrize("dataset", datasets.names())
def test_every_methods_config_resolves_on_every_registered_dataset(dataset):
    """An override naming no field, or a "module:attribute" string naming no library
    object, fails here instead of at the first run on that dataset."""
    for name, config_class in methods.CONFIGS.items():
        assert isinstance(trm_jax.config_for(name, dataset), config_class), (dataset, name)


def test_mnist5k_uses_its_measured_unsir_preset():
    # the notebook's sizes collapse on mnist5k (trm_jax.unlearning.MNIST5K_CONFIG)
    assert trm_jax.config_for("unsir", "mnist5k").unsir is unlearning.MNIST5K_CONFIG
    assert trm_jax.config_for("unsir", "digits").unsir is unlearning.DIGITS_CONFIG
