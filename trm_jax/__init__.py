"""trm_jax: transfer-resistant training in JAX.

Modules map to concepts: :mod:`~trm_jax.data` (the protocol's splits, TFDS),
:mod:`~trm_jax.models` (features + head), :mod:`~trm_jax.train` (the training
engine), :mod:`~trm_jax.checkpoint` (orbax), :mod:`~trm_jax.runs` (run folders).
Importing ``trm_jax`` never imports TensorFlow or TFDS.
"""
from trm_jax import checkpoint, data, models, runs, train

__version__ = "0.1.0"
__all__ = ["checkpoint", "data", "models", "runs", "train"]
