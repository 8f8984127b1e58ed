"""Type aliases shared by every module (declared once, like optax's ``_src/base.py``)."""
from __future__ import annotations

from typing import Any, Callable, Mapping, NamedTuple

import jax


#: A pytree of parameters, e.g. ``{"features": {...}, "head": {...}}``; stacked
#: over seeds it has a leading ``[S]`` axis on every leaf.
Params = Any
#: Any pytree (optimizer states, metrics, data tuples).
PyTree = Any
#: A typed PRNG key (``jax.random.key``); ``[S]`` stacks are one key per seed.
PRNGKey = jax.Array
#: ``apply(params, images) -> logits``.
ApplyFn = Callable[[Params, jax.Array], jax.Array]
#: ``loss(params, inputs, targets) -> (scalar loss, metrics)``.
LossFn = Callable[..., Any]
#: A flat mapping of metric names to per-seed arrays ``f32[S]``.
Metrics = Mapping[str, Any]
ArrayLike = Any


class Protected(NamedTuple):
    """What a method returns: one protected model per seed.

    Attributes:
      method: the method's name (``"reference"``, ``"skd"``, ...).
      model: the architecture, a :class:`~trm_jax.models.Model`.
      params: ``[S, ...]`` stack of ``{"features", "head"}`` params.
      keys: ``[S]`` the seed keys it was trained with (the evaluation reuses them).
      metrics: per-seed numbers ``f[S]`` (``beneficial_test_accuracy`` always) and
        method-specific ones (SKD's misses, UNSIR's stages, meta-training metrics).
      extras: other ``[S, ...]`` params stacks worth keeping (UNSIR: ``"original"``,
        the model before unlearning, which the evaluation can attack as a reference).
    """

    method: str
    model: Any  # a trm_jax.models.Model (models imports this module)
    params: Params
    keys: PRNGKey
    metrics: dict[str, Any]
    extras: dict[str, Params] = {}
