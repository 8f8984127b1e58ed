"""trm_jax: transfer-resistant training in JAX.

Protect a model, then attack it::

  import trm_jax
  protocol = trm_jax.data.load_protocol(trm_jax.data.preset("digits"))
  keys = trm_jax.seed_keys(2)
  protected = trm_jax.protect("reverse_maml", trm_jax.config_for("reverse_maml", "digits"),
                              protocol, keys)
  result = trm_jax.evaluate(protected, protocol)      # a trm_jax.attacks.SweepResult

Modules map to concepts:

* :mod:`~trm_jax.methods` -- ``protect``: the reference, UNSIR, SKD, Reverse-MAML
* :mod:`~trm_jax.evaluation` -- ``evaluate``: the attack suite on any protected model
* :mod:`~trm_jax.datasets` -- the one table of datasets and their defaults
* :mod:`~trm_jax.data` -- the protocol's beneficial/malicious splits through TFDS
* :mod:`~trm_jax.models` -- ``lenet``, ``conv4``: a features part and a head
* :mod:`~trm_jax.train` -- the one supervised training engine
* :mod:`~trm_jax.tasks`, :mod:`~trm_jax.meta` -- few-shot tasks, MAML / Reverse-MAML
* :mod:`~trm_jax.skd`, :mod:`~trm_jax.unlearning` -- SKD and UNSIR building blocks
* :mod:`~trm_jax.attacks`, :mod:`~trm_jax.metrics` -- the fine-tuning attacks (stages, the
  compiled sweep, budgets, :class:`~trm_jax.attacks.SweepResult`) and per-curve metrics
* :mod:`~trm_jax.hooks`, :mod:`~trm_jax.checkpoint`, :mod:`~trm_jax.runs` -- logging and
  resuming, orbax checkpoints, run folders
* :mod:`~trm_jax.errors`, :mod:`~trm_jax.typing`, :mod:`~trm_jax.streams` -- typed errors,
  shared type aliases, PRNG stream tags
* :mod:`~trm_jax.plots`, :mod:`~trm_jax.sharding` -- figures, seeds across devices
* :mod:`~trm_jax.distributed` -- one run over several processes or hosts (``jax.distributed``)
* :mod:`~trm_jax.compilation` -- the persistent compilation cache and a compile counter

Importing ``trm_jax`` never imports TensorFlow or TFDS (only loading a dataset does).
"""
from trm_jax import (attacks, checkpoint, compilation, data, datasets, distributed, errors,
                     evaluation, hooks, meta, methods, metrics, models, plots, runs, sharding, skd,
                     streams, tasks, train, unlearning)
from trm_jax.evaluation import SuiteConfig, evaluate
from trm_jax.methods import config_for, protect, seed_keys
from trm_jax.typing import Protected

__version__ = "0.2.0"
__all__ = ["attacks", "checkpoint", "compilation", "data", "datasets", "distributed", "errors",
           "evaluation", "hooks", "meta", "methods", "metrics", "models", "plots", "runs",
           "sharding", "skd", "streams", "tasks", "train", "unlearning", "Protected", "SuiteConfig",
           "config_for", "evaluate", "protect", "seed_keys"]
