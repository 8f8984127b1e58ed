"""Seeds across devices: the seed axis of a sweep on a ``jax.sharding.Mesh``.

Every routine in trm_jax is written for one seed and lifted with ``jax.vmap``;
the leading seed axis ``S`` of its inputs is then placed on a one-axis mesh
``("seed",)`` over all devices with ``NamedSharding``. ``jax.jit``
propagates the sharding, so N devices run N times the seeds in the same wall
time, and shared data (the datasets) is replicated. With one device, or a seed
count the devices do not divide, everything stays as it is (one process).

Many processes (:mod:`trm_jax.distributed`): the mesh spans every process's
devices (``jax.devices()``), each process holding the whole seed stack on the host
and placing only its own devices' seeds (:func:`shard_seeds` builds the global
array with ``jax.make_array_from_callback``; typed PRNG keys through their
``key_data``); :func:`to_host` gathers a seed-sharded result onto every process
(``process_allgather``). There the devices must divide the seeds
(:func:`check_seeds`): a run cannot fall back to one device.
"""
from __future__ import annotations

from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from trm_jax.errors import ConfigError

SEED_AXIS = "seed"


def seed_mesh() -> Mesh:
    """A one-axis mesh named ``"seed"`` over all devices (of every process).

    ``AxisType.Auto``: XLA propagates the seed sharding through the vmapped
    program (the code stays sharding-agnostic; no per-op annotations).
    """
    return jax.make_mesh((jax.device_count(),), (SEED_AXIS,),
                         axis_types=(jax.sharding.AxisType.Auto,))


def multiprocess() -> bool:
    """Several processes share the mesh (``jax.distributed`` is initialized)."""
    return jax.process_count() > 1


def check_seeds(num_seeds: int) -> None:
    """Raises :class:`ConfigError` when several processes run and their devices do not divide
    ``num_seeds`` (every device holds the same number of seeds)."""
    n = jax.device_count()
    if multiprocess() and num_seeds % n:
        raise ConfigError(f"seeds {num_seeds}: a run over {jax.process_count()} processes "
                          f"shards the seeds over their {n} devices, which must divide it; "
                          f"allowed: a multiple of {n}", field="seeds")


def can_shard(num_seeds: int) -> bool:
    """True when several devices exist and they divide ``num_seeds`` evenly.

    Raises:
      ConfigError: several processes, and their devices do not divide ``num_seeds``.
    """
    check_seeds(num_seeds)
    n = jax.device_count()
    return n > 1 and num_seeds % n == 0


def is_key(x: Any) -> bool:
    """Whether ``x`` is an array of typed PRNG keys (``jax.random.key``)."""
    return isinstance(x, jax.Array) and jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key)


def _place(x: Any, sharding: NamedSharding) -> Any:
    if is_key(x):  # typed keys: place their raw data, wrap it again
        return jax.random.wrap_key_data(_place(jax.random.key_data(x), sharding),
                                        impl=jax.random.key_impl(x))
    if not multiprocess() or (isinstance(x, jax.Array) and not x.is_fully_addressable):
        return jax.device_put(x, sharding)  # one process, or already a global array
    # Every process holds the whole value; each places the slices of its own devices.
    host = np.asarray(x)
    return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])


def shard_seeds(tree: Any) -> Any:
    """Places the leading (seed) axis of every leaf across the devices.

    A no-op on one device or (one process) when the device count does not divide ``S``.
    """
    leaves = jax.tree_util.tree_leaves(tree)
    if not leaves or not can_shard(int(leaves[0].shape[0])):
        return tree
    sharding = NamedSharding(seed_mesh(), PartitionSpec(SEED_AXIS))
    return jax.tree.map(lambda x: _place(x, sharding), tree)


def replicate(tree: Any, num_seeds: int) -> Any:
    """Copies shared inputs (datasets) to every device when seeds are sharded."""
    if not can_shard(num_seeds):
        return tree
    sharding = NamedSharding(seed_mesh(), PartitionSpec())
    return jax.tree.map(lambda x: _place(x, sharding), tree)


def gather(tree: Any) -> Any:
    """A seed-sharded result as a whole on every process: one process, ``tree`` itself
    (device arrays stay on the device); several, :func:`to_host` (numpy)."""
    return to_host(tree) if multiprocess() else tree


def to_host(tree: Any) -> Any:
    """Every leaf as a numpy array with all its seeds, on every process.

    One process: ``np.asarray``. Several: a seed-sharded leaf is gathered from every
    process (``jax.experimental.multihost_utils.process_allgather``, a collective: every
    process calls it at the same point, as they run the same program).
    """
    leaves, treedef = jax.tree_util.tree_flatten(tree)
    spread = [i for i, x in enumerate(leaves)
              if isinstance(x, jax.Array) and not x.is_fully_addressable and not x.is_fully_replicated]
    out = [np.asarray(x.addressable_data(0)) if isinstance(x, jax.Array) and not x.is_fully_addressable
           else np.asarray(x) for x in leaves]
    if spread:  # one collective for all of them
        from jax.experimental import multihost_utils

        gathered = multihost_utils.process_allgather([leaves[i] for i in spread], tiled=True)
        for i, value in zip(spread, gathered):
            out[i] = np.asarray(value)
    return jax.tree_util.tree_unflatten(treedef, out)
