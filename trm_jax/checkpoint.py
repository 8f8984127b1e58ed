"""Orbax checkpoints of whole training states (params, optimizer state, keys, step).

``Checkpointer`` wraps ``ocp.CheckpointManager``: each checkpoint holds the
state pytree (``StandardSave``) and a JSON dict of metadata (the run's config,
the epoch). Typed PRNG keys are stored as their raw ``key_data`` and re-wrapped
on restore, so a resumed run continues exactly.

Robustness: a state with NaN/Inf is never written (``save`` raises
``NonFiniteError``), and a corrupt latest checkpoint is not a dead end:
``restore()`` falls back to the newest step that reads cleanly, says which,
and moves the corrupt newer steps aside (``<step>.corrupt``) so that training
can save those steps again.

Threads: orbax keys the signals between a save's background threads by one global
operation id, so two checkpoints written at once (``compare --workers 2`` trains two
methods in two threads) mix each other's temporary folders up (``FileExistsError``,
``FileNotFoundError``). Every orbax call here holds one process-wide lock: saves from
several threads queue (each takes ~0.1-0.3 s on digits) and training goes on beside.
"""
from __future__ import annotations

import functools
import os
import shutil
import threading
import warnings
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from trm_jax.errors import CheckpointError, NonFiniteError  # noqa: F401  (re-exported)
from trm_jax.sharding import is_key as _is_key

CORRUPT_SUFFIX = ".corrupt"

# Reentrant: ``save`` and ``restore`` call ``all_steps``. Process-wide, so it serialises
# threads only; several processes write their shards of one checkpoint together (orbax).
_ORBAX_LOCK = threading.RLock()


def _serialized(method):
    """``method`` runs holding :data:`_ORBAX_LOCK` (orbax is not safe across threads)."""
    @functools.wraps(method)
    def locked(*args, **kwargs):
        with _ORBAX_LOCK:
            return method(*args, **kwargs)
    return locked


def _to_storable(tree: Any) -> Any:
    return jax.tree.map(lambda x: jax.random.key_data(x) if _is_key(x) else x, tree)


def _all_finite(tree: Any) -> bool:
    leaves = [x for x in jax.tree_util.tree_leaves(tree)
              if jnp.issubdtype(jnp.result_type(x), jnp.inexact)]
    # A global array (several processes) is checked on the devices: its shards are not all here.
    return all(bool(jnp.all(jnp.isfinite(x))) if isinstance(x, jax.Array) and not x.is_fully_addressable
               else bool(np.all(np.isfinite(np.asarray(x)))) for x in leaves)


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

    @_serialized
    def __init__(self, directory: str | os.PathLike, max_to_keep: int = 2):
        self.directory = os.path.abspath(os.fspath(directory))
        self._manager = ocp.CheckpointManager(
            self.directory, options=ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True))

    @_serialized
    def latest_step(self) -> int | None:
        """The newest saved step, or ``None`` when there is none."""
        return self._manager.latest_step()

    @_serialized
    def all_steps(self) -> list[int]:
        return sorted(self._manager.all_steps())

    def describe_latest(self) -> str:
        """For messages: ``"step 40 in DIR"`` or ``"no checkpoint yet in DIR"``."""
        step = self.latest_step()
        return (f"no checkpoint yet in {self.directory}" if step is None
                else f"step {step} in {self.directory}")

    @_serialized
    def save(self, step: int, state: Any, metadata: dict[str, Any] | None = None) -> None:
        """Saves and waits until the checkpoint is on disk (so a crash cannot lose it).

        An existing ``step`` is replaced (a resumed run that fell back to an older
        step saves the later steps again).

        Raises:
          NonFiniteError: a float leaf of ``state`` holds NaN/Inf (nothing is written,
            so the last checkpoint stays the last good state).
          CheckpointError: orbax did not write the checkpoint.
        """
        if not _all_finite(state):
            raise NonFiniteError(
                f"refusing to checkpoint step {step}: the state holds NaN/Inf; the last good "
                f"checkpoint is {self.describe_latest()}", None, step)
        if step in self._manager.all_steps():
            self._manager.delete(step)
        saved = self._manager.save(step, args=ocp.args.Composite(
            state=ocp.args.StandardSave(_to_storable(state)),
            metadata=ocp.args.JsonSave(metadata or {})))
        self._manager.wait_until_finished()
        if not saved:
            raise CheckpointError(f"orbax declined to save step {step} in {self.directory} "
                                  f"(steps present: {self.all_steps()})")

    @_serialized
    def restore(self, like: Any, step: int | None = None) -> tuple[Any, dict[str, Any]]:
        """Restores the checkpoint at ``step`` shaped like ``like``.

        ``step=None``: the newest step that restores cleanly. When newer steps
        are corrupt, it warns naming them and the step used, and moves them aside
        (``<step>.corrupt``). The returned metadata holds the step restored as
        ``meta["restored_step"]``.

        Raises:
          CheckpointError: no checkpoint (at ``step``); the given ``step`` cannot
            be read as ``like``; or (``step=None``) no step can, listing each tried.
        """
        steps = self.all_steps()
        if step is not None or not steps:
            if step is None or step not in steps:
                raise CheckpointError(
                    f"no checkpoint{'' if step is None else f' at step {step}'} in "
                    f"{self.directory} (steps present: {steps}); start without --resume, or "
                    "point to the run folder that holds the checkpoints")
            return self._restore_step(step, like)
        failures = []
        for candidate in reversed(steps):
            try:
                state, meta = self._restore_step(candidate, like)
            except CheckpointError as err:
                cause = err.__cause__
                failures.append(f"step {candidate} is corrupt or does not match "
                                f"({type(cause).__name__}: {str(cause)[:300]})")
                continue
            if failures:
                bad = steps[steps.index(candidate) + 1:]
                self._set_aside(bad)
                warnings.warn(
                    f"checkpoint step(s) {bad} in {self.directory} are corrupt ({failures[0]}); "
                    f"restored step {candidate}, the newest that reads cleanly (the corrupt "
                    f"ones were moved to <step>{CORRUPT_SUFFIX})", stacklevel=2)
            return state, meta
        raise CheckpointError(
            f"no checkpoint in {self.directory} can be restored as the expected state; tried "
            f"steps {steps[::-1]}: " + "; ".join(failures) + ". Start a new run (another "
            "--workdir or --overwrite)")

    @_serialized
    def _restore_step(self, step: int, like: Any) -> tuple[Any, dict[str, Any]]:
        abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, _to_storable(like))
        try:
            restored = self._manager.restore(step, args=ocp.args.Composite(
                state=ocp.args.StandardRestore(abstract), metadata=ocp.args.JsonRestore()))
        except Exception as err:  # orbax raises many types for unreadable files
            raise CheckpointError(
                f"checkpoint at step {step} in {self.directory} is corrupt or does not match the "
                f"expected state: {type(err).__name__}: {err}") from err
        meta = dict(restored["metadata"] or {})
        meta["restored_step"] = step
        return _from_storable(restored["state"], like), meta

    @_serialized
    def _set_aside(self, steps: list[int]) -> None:
        """Renames corrupt step folders to ``<step>.corrupt`` (orbax ignores them)."""
        for step in steps:
            source = os.path.join(self.directory, str(step))
            target = source + CORRUPT_SUFFIX
            shutil.rmtree(target, ignore_errors=True)  # an older corrupt copy of this step
            os.replace(source, target)
        self._manager.reload()

    @_serialized
    def close(self) -> None:
        self._manager.close()

    def __enter__(self) -> "Checkpointer":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def save_model(run_dir: str | os.PathLike, model: Any, params: Any, seeds: list[int]) -> None:
    """Stores a params stack ``[S, ...]`` in ``<run_dir>/checkpoints/model`` and the
    architecture in ``<run_dir>/model.json`` (what :func:`load_model` reads). Several
    processes: each saves its seeds' shards (orbax), process 0 writes ``model.json``."""
    import json
    import pathlib

    from trm_jax import distributed

    run_dir = pathlib.Path(run_dir)
    with Checkpointer(run_dir / "checkpoints" / "model", max_to_keep=1) as ckpt:
        ckpt.save(0, params, {"model": model.spec(), "seeds": list(seeds)})
    if not distributed.is_writer():
        return
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
        raise CheckpointError(
            f"{run_dir} has no saved model (model.json): the run did not finish (it stopped with "
            "an error, or was interrupted; its metrics.jsonl shows how far it got). Finish it "
            "with its command plus --resume, or rerun it")
    try:
        meta = json.loads(path.read_text())
        model, seeds = models.from_spec(meta["model"]), list(meta["seeds"])
    except (ValueError, KeyError, TypeError) as err:
        raise CheckpointError(f"{path} is corrupt ({type(err).__name__}: {err}); rerun the "
                              "experiment that wrote it") from None
    like = model.init_seeds(jax.vmap(jax.random.key)(jnp.arange(len(seeds))))
    with Checkpointer(run_dir / "checkpoints" / "model") as ckpt:
        params, _ = ckpt.restore(like)
    return model, params, seeds
