"""Seeds across devices: the seed axis of a sweep on a ``jax.sharding.Mesh``.

Every routine in trm_jax is written for one seed and lifted with ``jax.vmap``;
the leading seed axis ``S`` of its inputs is then placed on a one-axis mesh
``("seed",)`` over all local devices with ``NamedSharding``. ``jax.jit``
propagates the sharding, so N devices run N times the seeds in the same wall
time, and shared data (the datasets) is replicated. With one device, or a seed
count the devices do not divide, everything stays as it is.

Multi-host: call ``jax.distributed.initialize()`` first on every host; the
mesh then spans ``jax.devices()`` (all hosts), see the README.
"""
from __future__ import annotations

from typing import Any

import jax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

SEED_AXIS = "seed"


def seed_mesh() -> Mesh:
    """A one-axis mesh named ``"seed"`` over all devices.

    ``AxisType.Auto``: XLA propagates the seed sharding through the vmapped
    program (the code stays sharding-agnostic; no per-op annotations).
    """
    return jax.make_mesh((jax.device_count(),), (SEED_AXIS,),
                         axis_types=(jax.sharding.AxisType.Auto,))


def can_shard(num_seeds: int) -> bool:
    """True when several devices exist and they divide ``num_seeds`` evenly."""
    n = jax.device_count()
    return n > 1 and num_seeds % n == 0


def shard_seeds(tree: Any) -> Any:
    """Places the leading (seed) axis of every leaf across the devices.

    A no-op on one device or when the device count does not divide ``S``.
    """
    leaves = jax.tree_util.tree_leaves(tree)
    if not leaves or not can_shard(int(leaves[0].shape[0])):
        return tree
    sharding = NamedSharding(seed_mesh(), PartitionSpec(SEED_AXIS))
    return jax.tree.map(lambda x: jax.device_put(x, sharding), tree)


def replicate(tree: Any, num_seeds: int) -> Any:
    """Copies shared inputs (datasets) to every device when seeds are sharded."""
    if not can_shard(num_seeds):
        return tree
    sharding = NamedSharding(seed_mesh(), PartitionSpec())
    return jax.tree.map(lambda x: jax.device_put(x, sharding), tree)
