"""trm_jax: transfer-resistant training in JAX.

Modules map to concepts:

* :mod:`~trm_jax.data` -- the protocol's beneficial/malicious splits through TFDS
* :mod:`~trm_jax.models` -- ``lenet``, ``conv4``: a features part and a head
* :mod:`~trm_jax.train` -- the one supervised training engine
* :mod:`~trm_jax.tasks`, :mod:`~trm_jax.meta` -- few-shot tasks, MAML / Reverse-MAML
* :mod:`~trm_jax.skd` -- selective knowledge distillation
* :mod:`~trm_jax.unlearning` -- the UNSIR machine-unlearning baseline
* :mod:`~trm_jax.attack`, :mod:`~trm_jax.metrics` -- the fine-tuning attack and its metrics
* :mod:`~trm_jax.checkpoint`, :mod:`~trm_jax.runs`, :mod:`~trm_jax.plots`,
  :mod:`~trm_jax.sharding` -- orbax checkpoints, run folders, figures, seeds across devices
* :mod:`~trm_jax.compilation` -- the persistent compilation cache and a compile counter

Importing ``trm_jax`` never imports TensorFlow or TFDS (only loading a dataset does).
"""
from trm_jax import (attack, checkpoint, compilation, data, meta, metrics, models, plots, presets,
                     runs, sharding, skd, tasks, train, unlearning)

__version__ = "0.1.0"
__all__ = ["attack", "checkpoint", "compilation", "data", "meta", "metrics", "models", "plots",
           "presets", "runs", "sharding", "skd", "tasks", "train", "unlearning"]
