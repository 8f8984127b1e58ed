"""The unprotected reference: the preset CNN trained normally on the beneficial classes.

What every defence is compared with (its beneficial accuracy, and how easily an
attacker fine-tunes it), and SKD's teacher.

Example::

  protected = reference.protect(reference.ReferenceConfig(), protocol, trm_jax.seed_keys(3))
"""
from __future__ import annotations

import dataclasses

import jax

from trm_jax import data, models, train, validate
from trm_jax.train import TrainConfig
from trm_jax.hooks import Hooks
from trm_jax.methods._phases import (accuracy_on, beneficial_model, check_batch, check_keys,
                                     device_subset, train_phase)
from trm_jax.typing import Protected, PRNGKey

NAME = "reference"


@dataclasses.dataclass(frozen=True)
class ReferenceConfig:
    """The unprotected reference: plain supervised training on the beneficial classes.

    Attributes:
      train: supervised training on the beneficial pre-training split (Adam;
        per-dataset epochs / batch / lr in trm_jax.datasets).
    """

    train: train.TrainConfig = train.TrainConfig(epochs=20, batch_size=64, learning_rate=1e-3)

    DOMAINS = {"train": validate.Instance(TrainConfig)}  # (the field hides the module here)

    def __post_init__(self) -> None:
        validate.check_fields(self)


def default_config(entry) -> ReferenceConfig:
    """The dataset's defaults (:class:`trm_jax.datasets.DatasetEntry`)."""
    return ReferenceConfig(train=dataset_train_config(entry))


def dataset_train_config(entry, **changes) -> train.TrainConfig:
    """A supervised phase with the dataset's epochs, batch size and learning rate."""
    return train.TrainConfig(epochs=entry.epochs, batch_size=entry.batch_size,
                             learning_rate=entry.learning_rate, **changes)


def check(config: ReferenceConfig, protocol: data.ProtocolData) -> None:
    """Raises :class:`ConfigError` when the settings do not fit the data."""
    check_batch(config.train, protocol.pretrain.beneficial, "train")


def protect(config: ReferenceConfig, protocol: data.ProtocolData, keys: PRNGKey, *,
            hooks: Hooks | None = None, model: models.Model | None = None,
            phase: str = NAME) -> Protected:
    """Trains one model per seed on the beneficial pre-training split.

    Args:
      config: a :class:`ReferenceConfig`.
      protocol: the data (:func:`trm_jax.data.load_protocol`).
      keys: ``[S]`` seed keys (:func:`trm_jax.seed_keys`).
      hooks: logging / checkpoints / progress (:mod:`trm_jax.hooks`).
      model: default: the dataset's preset with a beneficial head.
      phase: names checkpoints and metric records (SKD's teacher: ``"teacher-e20"``).

    Returns:
      :class:`Protected` with per-seed ``beneficial_test_accuracy``.
    """
    check_keys(keys)
    check(config, protocol)
    model = beneficial_model(protocol, model)
    test = device_subset(protocol.test.beneficial)
    params = model.init_seeds(keys)
    state = train_phase(hooks, phase, keys, params, model.apply,
                        device_subset(protocol.pretrain.beneficial), config.train, eval_data=test)
    return Protected(NAME, model, state.params, keys,
                     {"beneficial_test_accuracy": accuracy_on(model, state.params, test)})
