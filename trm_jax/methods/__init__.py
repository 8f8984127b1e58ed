"""The methods as library calls: ``protect(config, protocol, keys, *, hooks) -> Protected``.

* ``"reference"`` (:class:`~.reference.ReferenceConfig`): unprotected, plain training
* ``"unsir"`` (:class:`~.unsir.UnsirMethodConfig`): the machine-unlearning baseline (UNSIR)
* ``"skd"`` (:class:`~.skd.SKDMethodConfig`): selective knowledge distillation
* ``"reverse_maml"`` (:class:`~.reverse_maml.ReverseMAMLConfig`): Reverse-MAML, exact
  meta-gradients
* ``"simulated_attack"`` (:class:`~.simulated_attack.SimulatedAttackConfig`): meta-training
  against the evaluation's attackers

Every config's defaults are the recommended settings; :func:`config_for` applies a
dataset's overrides from :mod:`trm_jax.datasets` (the one place for per-dataset
defaults). No method needs a run folder: logging, checkpoints, resuming and
progress come in through :mod:`trm_jax.hooks`.

Example::

  import trm_jax
  protocol = trm_jax.data.load_protocol(trm_jax.data.preset("digits"))
  keys = trm_jax.seed_keys(2)
  protected = trm_jax.protect("skd", trm_jax.config_for("skd", "digits"), protocol, keys)
  report = trm_jax.evaluate(protected, protocol)
"""
from __future__ import annotations

from types import ModuleType
from typing import Any

from trm_jax import datasets
from trm_jax.errors import ConfigError
from trm_jax.hooks import Hooks
from trm_jax.methods import reference, reverse_maml, simulated_attack, skd, unsir
from trm_jax.methods._phases import (beneficial_model, check_keys, check_trainable,
                                     dataset_config, replace_path, seed_keys, train_phase)
from trm_jax.typing import Protected

#: name -> module with ``NAME``, a config class, ``default_config(entry)`` and ``protect``.
METHODS: dict[str, ModuleType] = {m.NAME: m for m in (reference, unsir, skd, reverse_maml,
                                                         simulated_attack)}
CONFIGS: dict[str, type] = {"reference": reference.ReferenceConfig,
                            "unsir": unsir.UnsirMethodConfig, "skd": skd.SKDMethodConfig,
                            "reverse_maml": reverse_maml.ReverseMAMLConfig,
                            "simulated_attack": simulated_attack.SimulatedAttackConfig}


def method(name: str) -> ModuleType:
    """The module of method ``name``.

    Raises:
      ConfigError: ``name`` is not one of :data:`METHODS`.
    """
    if not isinstance(name, str) or name not in METHODS:
        raise ConfigError(f"unknown method {name!r}; allowed: {sorted(METHODS)}")
    return METHODS[name]


def config_for(name: str, dataset: str) -> Any:
    """The recommended config of method ``name`` on ``dataset``: the method's defaults
    with the dataset's training budget and its overrides (:mod:`trm_jax.datasets`).

    Raises:
      ConfigError: unknown method or dataset, or an override naming no field.

    Example:
      >>> import trm_jax
      >>> config = trm_jax.config_for("reverse_maml", "digits")
      >>> config.meta.adapt, config.meta.shots, config.meta_steps
      ('head', 5, 200)
    """
    return dataset_config(method(name), datasets.get(dataset))


def check(name: str, config: Any, protocol, model=None) -> None:
    """Validates ``config`` against the data of ``protocol`` and the model (``model``, or the
    dataset's preset) without computing: call it before opening a run folder; ``protect``
    calls it too."""
    module = method(name)
    if not isinstance(config, CONFIGS[name]):
        raise ConfigError(f"method {name!r} needs a {CONFIGS[name].__name__}, got "
                          f"{type(config).__name__}")
    module.check(config, protocol)
    check_trainable(config, model or beneficial_model(protocol))  # paths: any head size


def protect(name: str, config: Any, protocol, keys, *, hooks: Hooks | None = None,
            model=None) -> Protected:
    """Runs method ``name`` with ``config`` (see the table above) for every seed key.

    Raises:
      ConfigError: any argument of the wrong type or value (before any compute).
    """
    from trm_jax import data, models

    if not isinstance(protocol, data.ProtocolData):
        raise ConfigError(f"protocol must be a trm_jax.data.ProtocolData "
                          f"(trm_jax.data.load_protocol), got {type(protocol).__name__}")
    if hooks is not None and not isinstance(hooks, Hooks):
        raise ConfigError(f"hooks must be a trm_jax.hooks.Hooks or None, got {type(hooks).__name__}")
    if model is not None and not isinstance(model, models.Model):
        raise ConfigError(f"model must be a trm_jax.models.Model or None, got {type(model).__name__}")
    check_keys(keys)
    check(name, config, protocol, model)
    return method(name).protect(config, protocol, keys, hooks=hooks, model=model)


__all__ = ["METHODS", "CONFIGS", "Protected", "check", "config_for", "method", "protect", "replace_path",
           "seed_keys", "train_phase", "reference", "reverse_maml", "simulated_attack", "skd",
           "unsir"]
