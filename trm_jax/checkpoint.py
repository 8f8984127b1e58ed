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

Ownership: nothing the project did not write is ever deleted, at any depth. Each
checkpoint folder keeps a manifest (``.trm_jax_files.jsonl``, one JSON line per event:
a step claimed before orbax writes it, every path of the step once it is written, a
step moved aside) that :func:`foreign_files` reads to tell orbax's files from a user's;
old steps are removed here (not by orbax's ``max_to_keep``) and only when nothing
foreign is inside them.

Threads: orbax keys the signals between a save's background threads by one global
operation id, so two checkpoints written at once (``compare --workers 2`` trains two
methods in two threads) mix each other's temporary folders up (``FileExistsError``,
``FileNotFoundError``). Every orbax call here holds one process-wide lock: saves from
several threads queue (each takes ~0.1-0.3 s on digits) and training goes on beside.
"""
from __future__ import annotations

import functools
import json
import logging
import os
import pathlib
import shutil
import sys
import threading
import warnings
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from trm_jax import errors
from trm_jax.errors import CheckpointError, NonFiniteError  # noqa: F401  (re-exported)
from trm_jax.sharding import is_key as _is_key

CORRUPT_SUFFIX = ".corrupt"
#: The per-folder record of what this project (through orbax) wrote there.
MANIFEST = ".trm_jax_files.jsonl"
#: orbax writes a step into ``<step><TMP_SUFFIX>...`` and renames it when complete.
TMP_SUFFIX = ".orbax-checkpoint-tmp"
#: Extra bytes a checkpoint takes beyond its arrays (metadata, OCDBT manifests), for the
#: free-space check before a save.
_OVERHEAD_BYTES = 1 << 20

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


def all_finite(tree: Any) -> bool:
    """Whether every float leaf of ``tree`` is finite (global arrays checked on their devices)."""
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
        self.max_to_keep = max_to_keep
        # orbax keeps every step: old ones are removed by `_prune`, which checks ownership.
        with errors.storage_errors(self.directory):
            self._manager = ocp.CheckpointManager(
                self.directory, options=ocp.CheckpointManagerOptions(max_to_keep=None, create=True))
            self._adopt()

    def _adopt(self) -> None:
        """Starts the manifest of a folder that has none: a new one, or one written before
        manifests existed, whose orbax-shaped step folders are taken as orbax's."""
        if not _is_writer() or os.path.exists(os.path.join(self.directory, MANIFEST)):
            return
        self._note({"format": 1})
        for name in sorted(os.listdir(self.directory)):
            if name.split(".", 1)[0].isdigit() and not foreign_files(self.directory, only=name):
                self._note({"wrote": name, "files": _listing(os.path.join(self.directory, name))})

    def _note(self, event: dict[str, Any]) -> None:
        """Appends one event to the folder's manifest (process 0 only: one writer)."""
        if not _is_writer():
            return
        # One line, one write: a kill cuts at most the last line.
        with open(os.path.join(self.directory, MANIFEST), "a") as f:
            f.write(json.dumps(event) + "\n")

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
        if not all_finite(state):
            raise NonFiniteError(
                f"refusing to checkpoint step {step}: the state holds NaN/Inf; the last good "
                f"checkpoint is {self.describe_latest()}", None, step)
        with errors.storage_errors(self.directory):
            self._check_space(state)
            if step in self._manager.all_steps():
                self._refuse_if_foreign(step, "replace")
                self._manager.delete(step)
            self._note({"writing": str(step)})  # before orbax: a kill mid-save leaves it ours
            saved = self._manager.save(step, args=ocp.args.Composite(
                state=ocp.args.StandardSave(_to_storable(state)),
                metadata=ocp.args.JsonSave(metadata or {})))
            self._manager.wait_until_finished()
            if not saved:
                raise CheckpointError(f"orbax declined to save step {step} in {self.directory} "
                                      f"(steps present: {self.all_steps()})")
            self._note({"wrote": str(step), "files": _listing(os.path.join(self.directory,
                                                                            str(step)))})
            self._prune()

    def _check_space(self, state: Any) -> None:
        """Refuses a save the disk cannot hold, before orbax starts writing (a full disk
        mid-save leaves a temporary folder and a long traceback)."""
        from trm_jax import resources

        need = _OVERHEAD_BYTES + resources.tree_bytes(_to_storable(state))
        free = shutil.disk_usage(self.directory).free
        if free < need:
            raise errors.StorageError(
                f"no space for a checkpoint in {self.directory}: it needs ~{_mib(need)} and "
                f"{_mib(free)} are free; free some space, then continue with --resume (the last "
                f"checkpoint, {self.describe_latest()}, is intact)")

    def _refuse_if_foreign(self, step: int, verb: str) -> None:
        foreign = foreign_files(self.directory, only=str(step))
        if foreign:
            raise CheckpointError(f"cannot {verb} checkpoint step {step} in {self.directory}: "
                                  f"it holds {foreign[0]}, which trm_jax did not write; move it "
                                  "away and continue with --resume")

    def _prune(self) -> None:
        """Removes the steps beyond the newest ``max_to_keep``, each only when every file in
        it is orbax's (one holding a user's file stays, with a warning)."""
        steps = self.all_steps()
        for step in steps[:-self.max_to_keep] if self.max_to_keep else []:
            foreign = foreign_files(self.directory, only=str(step))
            if foreign:
                warnings.warn(f"kept old checkpoint step {step} in {self.directory}: it holds "
                              f"{foreign[0]}, which trm_jax did not write", stacklevel=3)
                continue
            self._manager.delete(step)

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
                                f"({type(cause).__name__}: {_first_words(cause)})")
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
            if os.path.lexists(target):  # an older corrupt copy of this step: ours?
                foreign = foreign_files(self.directory, only=os.path.basename(target))
                if foreign:
                    raise CheckpointError(f"cannot move corrupt step {step} aside: {target} "
                                          f"holds {foreign[0]}, which trm_jax did not write; "
                                          "move it away and continue with --resume")
                shutil.rmtree(target)
            self._note({"moved": str(step), "to": os.path.basename(target)})
            os.replace(source, target)
        self._manager.reload()

    @_serialized
    def close(self) -> None:
        self._manager.close()

    def __enter__(self) -> "Checkpointer":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def _first_words(err: BaseException, limit: int = 200) -> str:
    """The gist of a (tensorstore) error: its first line, without the spec it appends."""
    text = str(err).split(" [tensorstore_spec", 1)[0].split("\n", 1)[0]
    return text if len(text) <= limit else text[:limit] + "..."


class _QuietOrbaxTasks(logging.Filter):
    """Drops asyncio's "Task exception was never retrieved" / "Event loop is closed" reports
    of orbax's reading tasks: a corrupt step's failed reads are left behind by orbax, and
    :meth:`Checkpointer.restore` already says in one line which step failed and why.
    ``TRM_JAX_VERBOSE=1`` keeps them."""

    def filter(self, record: logging.LogRecord) -> bool:
        if os.environ.get("TRM_JAX_VERBOSE"):
            return True
        text = record.getMessage()
        if "never retrieved" in text or "Event loop is closed" in text:
            return "orbax" not in text and "tensorstore" not in text and not _orbax_exc(record)
        return True


def _orbax_exc(record: logging.LogRecord) -> bool:
    info = record.exc_info
    if not info or info[1] is None:
        return False
    import traceback

    return any("orbax" in frame.filename for frame in traceback.extract_tb(info[2]))


logging.getLogger("asyncio").addFilter(_QuietOrbaxTasks())


def _quiet_closed_loop(hook):
    """``sys.unraisablehook`` without the "Event loop is closed" reports of tensorstore's
    late callbacks into orbax's finished event loop (one per array of a corrupt step)."""
    def unraisable(info) -> None:
        if (not os.environ.get("TRM_JAX_VERBOSE") and isinstance(info.exc_value, RuntimeError)
                and str(info.exc_value) == "Event loop is closed"):
            return
        hook(info)
    unraisable.trm_jax_quiet = True
    return unraisable


if not getattr(sys.unraisablehook, "trm_jax_quiet", False):
    sys.unraisablehook = _quiet_closed_loop(sys.unraisablehook)


def _is_writer() -> bool:
    from trm_jax import distributed

    return distributed.is_writer()


def _mib(n: int) -> str:
    return f"{n / 2**20:.1f} MiB"


def _listing(folder: str) -> list[str]:
    """Every path under ``folder`` (files, folders, links), relative to it, sorted."""
    out = []
    for top, dirs, files in os.walk(folder):
        rel = os.path.relpath(top, folder)
        out += [name if rel == "." else os.path.join(rel, name) for name in dirs + files]
    return sorted(out)


def _read_manifest(directory: str) -> tuple[dict[str, set[str] | None], set[str]] | None:
    """``(entries, claimed)`` from a folder's manifest, or ``None`` when it has none.

    ``entries``: step folder name -> the paths orbax wrote in it (``None``: claimed and
    not finished, i.e. a save was cut off: all of it is orbax's); ``claimed``: every step
    a save was started for (its temporary folders are orbax's)."""
    try:
        with open(os.path.join(directory, MANIFEST)) as f:
            lines = f.read().split("\n")
    except FileNotFoundError:
        return None
    entries: dict[str, set[str] | None] = {}
    claimed: set[str] = set()
    for line in lines:
        try:
            event = json.loads(line)
        except ValueError:  # an empty or cut-off line
            continue
        if "writing" in event:
            claimed.add(event["writing"])
            entries[event["writing"]] = None
        elif "wrote" in event:
            entries[event["wrote"]] = set(event.get("files", []))
        elif "moved" in event:
            entries[event["to"]] = entries.pop(event["moved"], set())
    return entries, claimed


def foreign_files(directory: str | os.PathLike, *, only: str | None = None) -> list[pathlib.Path]:
    """What in checkpoint folder ``directory`` trm_jax did not write (``[]``: all ours).

    Ours: the manifest, every step folder with exactly the paths the manifest lists for
    it, a step moved aside (``<step>.corrupt``), and (a save cut off by a kill) a claimed
    step's folder and orbax's temporary folders for it, whole. A folder from before the
    manifest (``legacy``) is judged by orbax's names down to the step folders. ``only``:
    check that one top-level entry.
    """
    root = pathlib.Path(directory)
    if not root.is_dir() or root.is_symlink():
        return [root] if root.exists() or root.is_symlink() else []
    manifest = _read_manifest(str(root))
    children = sorted(root.iterdir()) if only is None else [root / only]
    foreign = []
    for child in children:
        name = child.name
        if name in (MANIFEST, MANIFEST + ".tmp") or not (child.exists() or child.is_symlink()):
            continue
        step = name.split(".", 1)[0]
        temporary = name.startswith(step + TMP_SUFFIX)
        shaped = step.isdigit() and (name in (step, step + CORRUPT_SUFFIX) or temporary)
        if not shaped or child.is_symlink() or not child.is_dir():
            foreign.append(child)
        elif manifest is None:
            continue  # legacy: orbax-shaped step folders are orbax's
        elif temporary:
            if step not in manifest[1]:
                foreign.append(child)
        elif name not in manifest[0]:
            foreign.append(child)
        elif manifest[0][name] is not None:
            listed = manifest[0][name]
            foreign += [child / p for p in _listing(str(child)) if p not in listed
                        and os.path.dirname(p) in listed | {""}]  # the topmost unlisted only
    return foreign


def save_model(run_dir: str | os.PathLike, model: Any, params: Any, seeds: list[int]) -> None:
    """Stores a params stack ``[S, ...]`` in ``<run_dir>/checkpoints/model`` and the
    architecture in ``<run_dir>/model.json`` (what :func:`load_model` reads). Several
    processes: each saves its seeds' shards (orbax), process 0 writes ``model.json``."""
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
