"""Type aliases shared by every module (declared once, like optax's ``_src/base.py``)."""
from __future__ import annotations

from typing import Any, Callable, Mapping

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
