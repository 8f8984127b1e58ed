"""N-way K-shot task sampling on the device (jittable, vmappable).

A dataset split is stored once, host-side, as a :class:`ClassPool`: the images
of each class stacked along a class axis and padded to the largest class. A
task is then drawn inside jit from a PRNG key:

1. ``ways`` distinct classes (argsort of uniform noise over the pool's classes);
2. ``shots + queries`` distinct examples per class: argsort of uniform noise
   with the padded (invalid) slots set to ``+inf``, so they always sort last;
3. the first ``shots`` go to the support set, the rest to the query set.

Good (beneficial) tasks come from the beneficial pool and bad (malicious) tasks
from the malicious pool: just two pools.

Label modes:

* ``"fixed"``: a task's labels are its classes' *protocol* labels (the class
  index in the pool, ``0..C-1``). Every task then trains the same ``C``-way head,
  so the meta-learned params remain a working beneficial classifier of all
  ``C`` classes, which is what the evaluation measures. Default for Reverse-MAML.
* ``"shuffled"``: labels ``0..N-1`` assigned to the task's classes in random
  order (classic MAML, Finn et al. 2017): the head is re-learned per task and
  can't memorise classes.
"""
from __future__ import annotations

from typing import Literal, NamedTuple

import chex
import jax
import jax.numpy as jnp
import numpy as np
from trm_jax.errors import ConfigError

LabelMode = Literal["fixed", "shuffled"]
LABEL_MODES = ("fixed", "shuffled")


class ClassPool(NamedTuple):
    """Images grouped by class, padded to the largest class.

    Attributes:
      images: ``[C, M, H, W, Ch]`` (uint8 or float); slot ``m >= counts[c]`` of
        class ``c`` is padding and never sampled.
      counts: ``int32[C]`` number of valid examples per class.
    """

    images: chex.Array
    counts: chex.Array

    @property
    def num_classes(self) -> int:
        return int(self.images.shape[0])


class Task(NamedTuple):
    """One N-way K-shot task (add a leading task axis for a batch of tasks).

    Attributes:
      support_x: ``[N*K, H, W, Ch]``, grouped by way.
      support_y: ``int32[N*K]``.
      query_x: ``[N*Q, H, W, Ch]``, grouped by way.
      query_y: ``int32[N*Q]``.
    """

    support_x: chex.Array
    support_y: chex.Array
    query_x: chex.Array
    query_y: chex.Array


def group_by_class(images: np.ndarray, labels: np.ndarray, num_classes: int) -> ClassPool:
    """Builds a :class:`ClassPool` host-side (numpy), once per split.

    Args:
      images: ``[B, H, W, Ch]``.
      labels: ``int[B]`` in ``[0, num_classes)``.
      num_classes: ``C``; every class must have at least one example.

    Returns:
      A pool of numpy arrays ``images[C, M, H, W, Ch]`` (zero padded, ``M`` =
      largest class) and ``counts int32[C]``. Pass it to ``jax.device_put`` once.
    """
    images, labels = np.asarray(images), np.asarray(labels)
    if images.ndim < 2 or labels.shape != images.shape[:1]:
        raise ConfigError(f"group_by_class needs images [B, ...] and labels [B]; got images "
                         f"{images.shape} and labels {labels.shape}")
    if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
        raise ConfigError(f"labels must lie in [0, {num_classes}), got range "
                         f"[{labels.min()}, {labels.max()}]")
    counts = np.bincount(labels.astype(np.int64), minlength=num_classes).astype(np.int32)
    if (counts == 0).any():
        raise ConfigError(f"every class needs at least one example; empty classes: "
                         f"{np.flatnonzero(counts == 0).tolist()}")
    pooled = np.zeros((num_classes, int(counts.max()), *images.shape[1:]), images.dtype)
    for c in range(num_classes):
        pooled[c, :counts[c]] = images[labels == c]
    return ClassPool(pooled, counts)


def check_task_shape(pool: ClassPool, ways: int, shots: int, queries: int,
                     name: str = "pool") -> None:
    """Raises ``ValueError`` if tasks of this shape can't be drawn from ``pool``.

    Checks ``ways <= C`` and ``shots + queries <= M`` from the (static) shapes, and
    ``shots + queries <= min(counts)`` when the counts are concrete (not traced).
    Under jit the counts are traced: call this once on the concrete pool first
    (``make_meta_step``'s caller or the training loop), before compiling.
    """
    if ways < 1 or shots < 1 or queries < 0:
        raise ConfigError(f"need ways >= 1, shots >= 1, queries >= 0; got ways={ways}, "
                         f"shots={shots}, queries={queries}")
    num_classes, max_count = pool.images.shape[:2]
    if ways > num_classes:
        raise ConfigError(f"{name}: ways={ways} but the pool has only {num_classes} classes")
    per_class = shots + queries
    if per_class > max_count:
        raise ConfigError(f"{name}: shots + queries = {per_class} but the largest class has "
                         f"only {max_count} examples")
    try:
        counts = np.asarray(pool.counts)
    except (jax.errors.TracerArrayConversionError, jax.errors.ConcretizationTypeError):
        return  # traced under jit: checked by the caller on the concrete pool
    if per_class > counts.min():
        raise ConfigError(f"{name}: shots + queries = {per_class} but class "
                         f"{int(counts.argmin())} has only {int(counts.min())} examples; "
                         f"lower shots/queries or drop that class")


def sample_task(key: chex.PRNGKey, pool: ClassPool, ways: int, shots: int, queries: int,
                label_mode: LabelMode = "fixed") -> Task:
    """Draws one ``ways``-way ``shots``-shot task with ``queries`` queries per class.

    Classes are drawn without replacement, and examples within a class without
    replacement, so support and query never share an example.

    Args:
      key: a PRNG key.
      pool: a :class:`ClassPool` ``images[C, M, H, W, Ch]``, ``counts[C]``.
      ways, shots, queries: ``N``, ``K``, ``Q`` (static ints).
      label_mode: ``"fixed"`` (labels = pool class index) or ``"shuffled"``
        (labels ``0..N-1``; the classes come in random order, so the class to
        label map is random).

    Returns:
      :class:`Task` with ``support_x[N*K, ...]``, ``support_y int32[N*K]``,
      ``query_x[N*Q, ...]``, ``query_y int32[N*Q]``.
    """
    if label_mode not in LABEL_MODES:
        raise ConfigError(f"label_mode must be one of {LABEL_MODES}, got {label_mode!r}")
    check_task_shape(pool, ways, shots, queries)
    images, counts = jnp.asarray(pool.images), jnp.asarray(pool.counts)
    num_classes, max_count = images.shape[:2]
    # One uniform draw for both choices (each random call compiles its own threefry).
    noise = jax.random.uniform(key, (num_classes + ways * max_count,))
    classes = jnp.argsort(noise[:num_classes])[:ways]  # [N], distinct, random order
    noise = noise[num_classes:].reshape(ways, max_count)
    valid = jnp.arange(max_count)[None, :] < counts[classes][:, None]
    order = jnp.argsort(jnp.where(valid, noise, jnp.inf), axis=1)[:, :shots + queries]
    x = images[classes[:, None], order]  # [N, K+Q, H, W, Ch]
    labels = classes if label_mode == "fixed" else jnp.arange(ways)
    labels = labels.astype(jnp.int32)
    flat = lambda a: a.reshape((-1, *a.shape[2:]))
    return Task(
        support_x=flat(x[:, :shots]),
        support_y=jnp.repeat(labels, shots),
        query_x=flat(x[:, shots:]),
        query_y=jnp.repeat(labels, queries),
    )


def sample_tasks(key: chex.PRNGKey, pool: ClassPool, num_tasks: int, ways: int, shots: int,
                 queries: int, label_mode: LabelMode = "fixed") -> Task:
    """``num_tasks`` independent tasks (``jax.vmap`` of :func:`sample_task`).

    Returns:
      :class:`Task` whose arrays have a leading ``[T]`` axis, e.g. ``support_x[T, N*K, ...]``.
    """
    check_task_shape(pool, ways, shots, queries)
    sample = lambda k: sample_task(k, pool, ways, shots, queries, label_mode)
    return jax.vmap(sample)(jax.random.split(key, num_tasks))
