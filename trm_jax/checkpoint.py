"""Orbax checkpoints of whole training states (params, optimizer state, keys, step).

``Checkpointer`` wraps ``ocp.CheckpointManager``: each checkpoint holds the
state pytree (``StandardSave``) and a JSON dict of metadata (the run's config,
the epoch). Typed PRNG keys are stored as their raw ``key_data`` and re-wrapped
on restore, so a resumed run continues exactly.
"""
from __future__ import annotations

import os
from typing import Any

import jax
import orbax.checkpoint as ocp


from trm_jax.errors import CheckpointError  # noqa: F401  (re-exported)


def _is_key(x: Any) -> bool:
    return isinstance(x, jax.Array) and jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key)


def _to_storable(tree: Any) -> Any:
    return jax.tree.map(lambda x: jax.random.key_data(x) if _is_key(x) else x, tree)


def _from_storable(stored: Any, like: Any) -> Any:
    def back(s, l):
        return jax.random.wrap_key_data(s, impl=jax.random.key_impl(l)) if _is_key(l) else s
    return jax.tree.map(back, stored, like)


class Checkpointer:
    """Saves and restores ``(state pytree, metadata dict)`` under ``directory``.

    Example::

      ckpt = Checkpointer(run.path / "checkpoints")
      ckpt.save(epoch, state, {"epoch": epoch})
      state, meta = ckpt.restore(like=state)  # latest step
    """

    def __init__(self, directory: str | os.PathLike, max_to_keep: int = 2):
        self.directory = os.path.abspath(os.fspath(directory))
        self._manager = ocp.CheckpointManager(
            self.directory, options=ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True))

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def all_steps(self) -> list[int]:
        return list(self._manager.all_steps())

    def save(self, step: int, state: Any, metadata: dict[str, Any] | None = None) -> None:
        """Saves and waits until the checkpoint is on disk (so a crash cannot lose it)."""
        self._manager.save(step, args=ocp.args.Composite(
            state=ocp.args.StandardSave(_to_storable(state)),
            metadata=ocp.args.JsonSave(metadata or {})))
        self._manager.wait_until_finished()

    def restore(self, like: Any, step: int | None = None) -> tuple[Any, dict[str, Any]]:
        """Restores the checkpoint at ``step`` (default: latest) shaped like ``like``.

        Raises:
          CheckpointError: no checkpoint, or one that cannot be read as ``like``.
        """
        step = self.latest_step() if step is None else step
        if step is None or step not in self.all_steps():
            raise CheckpointError(
                f"no checkpoint{'' if step is None else f' at step {step}'} in {self.directory} "
                f"(steps present: {self.all_steps()}); start without --resume, or point to the "
                "run folder that holds the checkpoints")
        abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, _to_storable(like))
        try:
            restored = self._manager.restore(step, args=ocp.args.Composite(
                state=ocp.args.StandardRestore(abstract), metadata=ocp.args.JsonRestore()))
        except Exception as err:  # orbax raises many types for unreadable files
            raise CheckpointError(
                f"checkpoint at step {step} in {self.directory} is corrupt or does not match the "
                f"expected state: {type(err).__name__}: {err}") from err
        return _from_storable(restored["state"], like), dict(restored["metadata"] or {})

    def close(self) -> None:
        self._manager.close()

    def __enter__(self) -> "Checkpointer":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def save_model(run_dir: str | os.PathLike, model: Any, params: Any, seeds: list[int]) -> None:
    """Stores a params stack ``[S, ...]`` in ``<run_dir>/checkpoints/model`` and the
    architecture in ``<run_dir>/model.json`` (what :func:`load_model` reads)."""
    import json
    import pathlib

    run_dir = pathlib.Path(run_dir)
    with Checkpointer(run_dir / "checkpoints" / "model", max_to_keep=1) as ckpt:
        ckpt.save(0, params, {"model": model.spec(), "seeds": list(seeds)})
    tmp = run_dir / "model.json.tmp"
    tmp.write_text(json.dumps({"model": model.spec(), "seeds": list(seeds)}, indent=2) + "\n")
    os.replace(tmp, run_dir / "model.json")


def load_model(run_dir: str | os.PathLike) -> tuple[Any, Any, list[int]]:
    """Reads the saved model of any run folder -> ``(model, params[S, ...], seeds)``.

    Raises:
      CheckpointError: no saved model (the run did not finish) or an unreadable one.
    """
    import json
    import pathlib

    import jax.numpy as jnp

    from trm_jax import models

    run_dir = pathlib.Path(run_dir)
    path = run_dir / "model.json"
    if not path.is_file():
        raise CheckpointError(f"{run_dir} has no saved model (model.json); did the run finish?")
    try:
        meta = json.loads(path.read_text())
        model, seeds = models.from_spec(meta["model"]), list(meta["seeds"])
    except (ValueError, KeyError, TypeError) as err:
        raise CheckpointError(f"{path} is corrupt ({type(err).__name__}: {err}); rerun the "
                              "experiment that wrote it") from None
    like = jax.vmap(model.init)(jax.vmap(jax.random.key)(jnp.arange(len(seeds))))
    with Checkpointer(run_dir / "checkpoints" / "model") as ckpt:
        params, _ = ckpt.restore(like)
    return model, params, seeds
