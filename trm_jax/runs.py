"""Run folders: one shape for every experiment (docs/protocol.md, "What a run writes").

``runs/<name>-<timestamp>/`` holds ``config.json`` (every setting, resolved),
``metrics.jsonl`` (one JSON object per logged step/epoch), ``results.json``,
figures (``*.png``) and ``checkpoints/`` (orbax). Existing folders are never
overwritten silently, and nothing the project did not write is ever deleted.

A run folder is recognised by its marker, ``.trm_jax_run`` (JSON: the format
version and every path the project wrote there, nested ones included), which
:meth:`RunDir.create` writes before anything else; each file or folder is added
to it *before* it is written (:meth:`RunDir.file`), so even a run killed
mid-write leaves nothing unlisted. orbax's files under ``checkpoints/<phase>`` are
listed by that folder's own manifest (:mod:`trm_jax.checkpoint`). ``overwrite``
replaces only such a folder, and only while everything in it, at any depth, is the
project's (:func:`foreign_entries`); ``resume`` continues only a run.
"""
from __future__ import annotations

import dataclasses
import datetime
import fcntl
import json
import math
import os
import pathlib
import shutil
import threading
import time
import warnings
from typing import Any, Callable, Sequence

import numpy as np

from trm_jax import distributed, errors
from trm_jax.errors import RunExistsError, RunFolderError, RunNotFoundError  # noqa: F401  (re-exported)

RESULT_KEYS = ("experiment", "dataset", "seeds", "beneficial_test_accuracy", "attacks",
               "references", "wall_seconds")
LOCK_FILE = ".lock"
METRICS_FILE = "metrics.jsonl"
MARKER_FILE = ".trm_jax_run"
#: Files the experiments' write probe makes and removes at once (one left by a kill is ours).
PROBE_PREFIX = ".trm_jax_probe_"
#: Version of the run-folder layout recorded in the marker (2: nested paths are listed, and
#: every checkpoint folder keeps a manifest of orbax's files).
RUN_FORMAT = 2
#: The top-level folder of every run's orbax checkpoints (``checkpoints/<phase>``).
CHECKPOINTS = "checkpoints"
# Run folders written before the marker existed: recognised by a config.json naming an
# experiment, and overwritten only when every entry is one of the names those versions wrote.
_LEGACY_NAMES = ("config.json", "metrics.jsonl", "results.json", "results.md", "model.json",
                 "checkpoints", "methods", "variants", LOCK_FILE)
_LEGACY_SUFFIXES = (".png", ".json", ".tmp")

# What to do when a JSON file of a run is corrupt, by file name.
_REPAIR_HINTS = {
    "config.json": "it holds the run's settings: fix it by hand, or start again with "
                   "--overwrite or another --workdir",
}
_DEFAULT_HINT = ("restore it, or delete it and rerun the experiment (with --resume, or in a "
                 "new --workdir) to write it again")

# Run folders this process holds the writer lock of: resolved path -> [fd, users].
# One process may open its own folder twice (e.g. a run and its resume in one
# test session); only other processes are refused.
_HELD: dict[pathlib.Path, list[int]] = {}
# Threads of one process share run folders (``compare --workers`` lists each method's
# folder in the parent's marker from its own thread): the marker's read-modify-write
# and ``_HELD`` are done under this lock, so no listing is lost.
_THREADS = threading.RLock()


def default_workdir(name: str, root: str = "runs") -> pathlib.Path:
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    return pathlib.Path(root) / f"{name}-{stamp}"


def to_jsonable(value: Any) -> Any:
    """Numpy/JAX arrays and scalars, dataclasses, tuples and paths -> plain JSON values.

    Non-finite floats become ``None`` so files stay valid JSON.
    """
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return to_jsonable(dataclasses.asdict(value))
    if isinstance(value, dict):
        return {str(k): to_jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [to_jsonable(v) for v in value]
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    if hasattr(value, "__array__") and not isinstance(value, (str, bytes)):
        arr = np.asarray(value)
        return to_jsonable(arr.tolist()) if arr.ndim else to_jsonable(arr.item())
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def lock_holder(path: str | os.PathLike) -> int | None:
    """The pid of the process writing the run folder ``path``, or ``None`` when no
    process holds its lock (locks die with their process, even after ``kill -9``)."""
    lock = pathlib.Path(path) / LOCK_FILE
    if pathlib.Path(path).resolve() in _HELD:
        return os.getpid()
    try:
        fd = os.open(lock, os.O_RDONLY)
    except FileNotFoundError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return _read_pid(fd) or -1  # held, writer not known yet
    else:
        return None
    finally:
        os.close(fd)  # also drops the shared lock taken above


def _read_pid(fd: int) -> int | None:
    text = os.pread(fd, 32, 0).decode(errors="replace").strip()
    return int(text) if text.isdigit() else None


def _has_content(path: pathlib.Path) -> bool:
    """True when ``path`` holds anything besides a lock file."""
    return any(child.name != LOCK_FILE for child in path.iterdir())


def _read_marker(path: pathlib.Path) -> dict[str, Any] | None:
    """The marker of run folder ``path``, or ``None`` when there is none (or it is unreadable)."""
    try:
        marker = json.loads((path / MARKER_FILE).read_text())
    except (OSError, ValueError):
        return None
    return marker if isinstance(marker, dict) and isinstance(marker.get("files"), list) else None


def _is_legacy_run(path: pathlib.Path) -> bool:
    try:
        return isinstance(json.loads((path / "config.json").read_text()).get("experiment"), str)
    except (OSError, ValueError, AttributeError):
        return False


def is_run(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a run folder this project wrote (its marker, or a ``config.json``
    naming an experiment in a folder from before the marker)."""
    path = pathlib.Path(path)
    return path.is_dir() and (_read_marker(path) is not None or _is_legacy_run(path))


def foreign_entries(path: str | os.PathLike) -> list[pathlib.Path]:
    """What in run folder ``path`` the project did not write, at any depth (``[]``: all
    of it is ours).

    An entry is ours when the marker lists its path (``NAME.tmp`` too when it lists
    ``NAME``); inside a listed folder each entry is checked the same way, a folder that is
    itself a run folder (``compare``'s ``methods/<m>``) by its own marker, and
    ``checkpoints/<phase>`` file by file against its checkpoint manifest
    (:func:`trm_jax.checkpoint.foreign_files`). Runs from before nested listing (marker
    format 1, or no marker) are judged by the names those versions wrote below the top.
    A folder that is not a run at all: every entry.
    """
    from trm_jax import checkpoint

    path = pathlib.Path(path)
    marker = _read_marker(path)
    legacy = marker is None or marker.get("format", 1) < 2
    listed = set(marker["files"]) if marker is not None else set()
    is_run_folder = marker is not None or _is_legacy_run(path)

    def ours(rel: str) -> bool:
        if not is_run_folder:
            return False
        if marker is None:
            return "/" not in rel and (rel in _LEGACY_NAMES or rel.endswith(_LEGACY_SUFFIXES))
        return rel in listed or (rel.endswith(".tmp") and rel[:-4] in listed)

    def walk(folder: pathlib.Path, rel: str) -> list[pathlib.Path]:
        out = []
        for child in sorted(folder.iterdir()):
            sub = f"{rel}/{child.name}" if rel else child.name
            if not rel and (child.name in (LOCK_FILE, MARKER_FILE, MARKER_FILE + ".tmp")
                            or child.name.startswith(PROBE_PREFIX)):
                continue
            real_dir = child.is_dir() and not child.is_symlink()
            if rel == CHECKPOINTS and real_dir:  # orbax's folders: their own manifests
                if not legacy and not (child / checkpoint.MANIFEST).exists() and any(child.iterdir()):
                    out.append(child)
                else:
                    out += checkpoint.foreign_files(child)
            elif ours(sub) or (rel and legacy and _legacy_nested(rel, child)):
                if real_dir:
                    out += walk(child, sub)
            elif rel and real_dir and (child / MARKER_FILE).exists():
                out += foreign_entries(child)  # a run folder inside ours (methods/<m>)
            else:
                out.append(child)
        return out

    return walk(path, "") if is_run_folder else sorted(path.iterdir())


def discard(path: str | os.PathLike) -> bool:
    """Deletes the run folder ``path`` that this process has just made (a run that failed
    before it began), unless something in it is not the project's: then it stays whole.
    Returns whether it was deleted."""
    path = pathlib.Path(path)
    if not path.is_dir() or path.is_symlink():
        return False
    bookkeeping_only = {c.name for c in path.iterdir()} <= {LOCK_FILE, MARKER_FILE,
                                                              MARKER_FILE + ".tmp"}
    if not bookkeeping_only and (not is_run(path) or foreign_entries(path)):
        return False
    shutil.rmtree(path, ignore_errors=True)
    return True


def _legacy_nested(rel: str, child: pathlib.Path) -> bool:
    """What versions without nested listing wrote below the top: the search's records."""
    return rel == "variants" and child.suffix in (".json", ".tmp") and child.is_file()


def write_probe(folder: str | os.PathLike) -> OSError | None:
    """Creates and removes one file in ``folder``: ``None`` when that worked, else the error
    (as root, permissions alone do not say whether a folder can be written)."""
    import tempfile

    try:
        fd, probe = tempfile.mkstemp(prefix=PROBE_PREFIX, dir=folder)
        os.close(fd)
        os.unlink(probe)
    except OSError as err:
        return err
    return None


def _protected_folder(path: pathlib.Path) -> str | None:
    """Why ``--overwrite`` may never empty ``path`` (None: it may)."""
    resolved, cwd = path.resolve(), pathlib.Path.cwd().resolve()
    if resolved == pathlib.Path(resolved.anchor):
        return "it is the filesystem root"
    if resolved == pathlib.Path.home().resolve():
        return "it is your home folder"
    if resolved == cwd or resolved in cwd.parents:
        return "it is the current folder or one above it"
    return None


def check_workdir(path: str | os.PathLike, *, overwrite: bool = False, resume: bool = False) -> bool:
    """What :meth:`RunDir.create` would refuse, checked without touching anything (the
    experiments call it before any compute). Returns whether ``path`` holds a run.

    Raises:
      as :meth:`RunDir.create`.
    """
    path = pathlib.Path(path)
    if path.exists() and not path.is_dir():
        raise RunFolderError(f"run folder {path} exists and is not a folder; choose "
                             "another --workdir")
    has_content = path.is_dir() and _has_content(path)
    run_folder = has_content and is_run(path)
    if resume and not path.exists():
        raise RunNotFoundError(f"--resume given but run folder {path} does not exist; "
                               "check --workdir, or start without --resume")
    if resume and not has_content:
        raise RunNotFoundError(f"--resume given but run folder {path} is empty: there is no "
                               "run to resume; start without --resume")
    if has_content and not run_folder:
        raise (RunNotFoundError if resume else RunFolderError)(
            f"{path} is not empty and is not a run folder (no {MARKER_FILE} marker); "
            f"{'--resume continues' if resume else '--overwrite replaces'} only run folders "
            "of trm_jax, and nothing else is ever deleted: choose another --workdir")
    if run_folder and not (resume or overwrite):
        raise RunExistsError(
            f"run folder {path} already exists and is not empty; pass --overwrite to "
            "replace it, --resume to continue it, or choose another --workdir")
    if run_folder and overwrite and not resume:
        why = _protected_folder(path)
        foreign = [] if why else foreign_entries(path)
        if why or foreign:
            reason = why or (f"it holds {foreign[0]}, which trm_jax did not write"
                             + (f" (and {len(foreign) - 1} more)" if len(foreign) > 1 else ""))
            raise RunFolderError(f"--overwrite refused for {path}: {reason}; nothing was "
                                 "deleted. Move it away or choose another --workdir")
    return run_folder


class RunDir:
    """A run folder. Create (or resume) it with :meth:`create`; read one with :meth:`open`.

    :meth:`create` makes this process the folder's only writer: it holds an
    exclusive ``flock`` on ``<run>/.lock`` until :meth:`close` (or the end of a
    ``with`` block, or the process's exit, even by ``kill -9``); another process
    that tries to write the folder gets :class:`RunFolderError`. Readers
    (:meth:`open`, ``RunDir(path)``) take no lock.
    """

    def __init__(self, path: str | os.PathLike):
        self.path = pathlib.Path(path)
        self._locked = False
        self._listed: set[str] = set()  # names known to be in the marker already
        self._started: float | None = None  # perf_counter at create() (writers only)
        self._process = 0  # this process's index in the marker's "seconds"
        self._writer = True  # False: another process of a multi-process run writes it

    @classmethod
    def create(cls, path: str | os.PathLike, *, overwrite: bool = False,
               resume: bool = False) -> "RunDir":
        """Makes the folder, writes its marker and takes its writer lock.

        An existing non-empty folder is an error unless it is a run folder and
        ``resume`` (keep and continue it; a cut-off last line of ``metrics.jsonl``
        is dropped) or ``overwrite`` (empty it first, once the lock is ours) is given.
        ``overwrite`` never empties a folder holding anything the project did not
        write, nor the filesystem root, the home folder or the current folder (or
        one above it): it refuses, naming the entry or the reason, and deletes nothing.

        Raises:
          RunExistsError: the folder holds a run and neither flag was given.
          RunNotFoundError: ``resume`` but the folder is missing, empty or not a run.
          RunFolderError: ``overwrite`` refused (see above), another process writes
            the folder, ``path`` is a file, or the folder cannot be written.
        """
        path = pathlib.Path(path)
        if not distributed.is_writer():
            return cls.follower(path)
        run_folder = check_workdir(path, overwrite=overwrite, resume=resume)
        fresh = not path.exists()
        try:
            path.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise errors.as_storage_error(err, path) or RunFolderError(
                f"cannot create run folder {path} ({err.strerror or err}); choose a writable "
                "--workdir") from None
        run = cls(path)
        try:
            run._lock()
        except BaseException:
            if fresh:
                discard(path)
            raise
        try:
            if run_folder and resume:
                run._repair_metrics()
            elif run_folder:  # overwrite: emptied only now, so a live writer is never deleted under
                check_workdir(path, overwrite=True)  # again: a file may have come since
                for child in path.iterdir():
                    if child.name == LOCK_FILE:
                        continue
                    if child.is_dir() and not child.is_symlink():
                        shutil.rmtree(child)
                    else:
                        child.unlink()
            marker = _read_marker(path)
            run._process = len(marker.get("seconds", [])) if marker else 0
            run._started = time.perf_counter()
            if marker is None:  # new, overwritten, or from before the marker
                foreign = {c.name for c in foreign_entries(path)}
                run._write_marker(sorted(c.name for c in path.iterdir() if c.name not in
                                         (LOCK_FILE, MARKER_FILE, *foreign)))
            else:
                run._write_marker()
        except BaseException as exc:
            run.close()
            if fresh:  # made a moment ago (a full disk at the marker, say): leave nothing
                discard(path)
            storage = errors.as_storage_error(exc, path) if isinstance(exc, Exception) else None
            if storage is not None:
                raise storage from None
            raise
        return run

    @classmethod
    def follower(cls, path: str | os.PathLike) -> "RunDir":
        """The run folder as the processes other than 0 of a multi-process run see it
        (:mod:`trm_jax.distributed`): the same paths (orbax writes their checkpoint shards
        under :attr:`checkpoint_dir`), but it writes nothing: no folder, lock, marker,
        metrics, JSON (:meth:`create` returns one there)."""
        run = cls(path)
        run._writer = False
        return run

    @property
    def writer(self) -> bool:
        """Whether this process writes the folder's files (see :meth:`follower`)."""
        return self._writer

    @classmethod
    def open(cls, path: str | os.PathLike) -> "RunDir":
        """Opens a run folder for reading (no lock).

        Raises:
          RunNotFoundError: the folder is missing or has no ``config.json``.
        """
        path = pathlib.Path(path)
        if path.exists() and not path.is_dir():
            raise RunNotFoundError(f"{path} is a file, not a run folder; give the folder an "
                                   "experiment wrote (its --workdir)")
        if not path.is_dir():
            raise RunNotFoundError(f"run folder {path} does not exist")
        if not (path / "config.json").is_file():
            raise RunNotFoundError(f"{path} is not a run folder (no config.json)")
        return cls(path)

    def _write_marker(self, files: list[str] | None = None) -> dict[str, Any]:
        with _THREADS:
            marker = _read_marker(self.path) or {"format": RUN_FORMAT, "files": [], "seconds": []}
            if not self._writer:
                return marker
            if files is not None:
                marker["files"] = files
            seconds = list(marker.get("seconds", []))
            if self._started is not None:  # this process's time so far (a writer's)
                seconds[self._process:] = [round(time.perf_counter() - self._started, 3)]
            marker["seconds"] = seconds
            tmp = self.path / (MARKER_FILE + ".tmp")
            tmp.write_text(json.dumps(marker) + "\n")
            os.replace(tmp, self.path / MARKER_FILE)
            return marker

    def wall_seconds(self) -> tuple[float, int]:
        """``(seconds, processes)``: the time every process that wrote this run spent on it
        (a killed one's until its last record), and how many there were."""
        marker = _read_marker(self.path)
        if self._started is not None and marker is not None:
            marker = self._write_marker()
        seconds = (marker or {}).get("seconds", [])
        return float(sum(seconds)), len(seconds)

    def file(self, name: str) -> pathlib.Path:
        """``<run>/name``, listed in the folder's marker first: every file or folder the
        project writes into a run folder goes through here (or the writers below), so
        :func:`foreign_entries` can tell it from the user's. A nested ``name``
        (``variants/a.json``) lists its folders and itself."""
        parts = pathlib.PurePath(name).parts
        if not parts or ".." in parts or pathlib.PurePath(name).is_absolute():
            raise RunFolderError(f"{name!r} is not a path inside the run folder {self.path}")
        names = ["/".join(parts[:i]) for i in range(1, len(parts) + 1)]
        new = [n for n in names if n not in self._listed]
        if new and self._writer:
            with _THREADS:
                marker = _read_marker(self.path)
                if marker is not None and not set(new) <= set(marker["files"]):
                    self._write_marker(sorted({*marker["files"], *new}))
                self._listed.update(new)
        return self.path / name

    def _lock(self) -> None:
        with _THREADS:
            key = self.path.resolve()
            if key in _HELD:
                _HELD[key][1] += 1
            else:
                try:
                    fd = os.open(self.path / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
                except OSError as err:
                    raise RunFolderError(f"cannot write run folder {self.path} "
                                         f"({err.strerror or err}); choose a writable --workdir"
                                         ) from None
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    pid = _read_pid(fd)
                    os.close(fd)
                    raise RunFolderError(
                        f"run folder {self.path} is being written by another process"
                        f"{f' (pid {pid})' if pid else ''}; two writers would mix their records. "
                        "Wait for it to finish or stop it, or choose another --workdir") from None
                os.ftruncate(fd, 0)
                os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
                _HELD[key] = [fd, 1]
            self._locked = True

    def close(self) -> None:
        """Releases the writer lock (if this object holds it); safe to call twice."""
        if not self._locked:
            return
        self._locked = False
        key = self.path.resolve()
        with _THREADS:
            held = _HELD.get(key)
            if held is None:
                return
            held[1] -= 1
            if held[1] == 0:
                del _HELD[key]
                os.close(held[0])  # closing the last descriptor drops the flock

    def __enter__(self) -> "RunDir":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    @property
    def checkpoint_dir(self) -> pathlib.Path:
        """``<run>/checkpoints``: the orbax checkpoints (listed in the marker like any file)."""
        return self.file(CHECKPOINTS)

    def write_json(self, name: str, value: Any) -> pathlib.Path:
        """Writes atomically (temp file + rename): a crash never leaves half a file."""
        target = self.file(name)
        if not self._writer:
            return target
        tmp = target.with_suffix(target.suffix + ".tmp")
        tmp.write_text(json.dumps(to_jsonable(value), indent=2) + "\n")
        os.replace(tmp, target)
        return target

    def read_json(self, name: str) -> Any:
        """Reads ``<run>/name``.

        Raises:
          RunNotFoundError: the file does not exist.
          RunFolderError: it is not valid JSON (names the file and what to do).
        """
        file = self.path / name
        try:
            return json.loads(file.read_bytes().decode())
        except FileNotFoundError:
            raise RunNotFoundError(f"{file} does not exist (did the run get that far?)") from None
        except ValueError as err:  # JSONDecodeError, UnicodeDecodeError
            raise RunFolderError(f"{file} is corrupt (not valid JSON: {err}); "
                                 f"{_REPAIR_HINTS.get(name, _DEFAULT_HINT)}") from None

    def write_config(self, config: Any) -> None:
        self.write_json("config.json", config)

    def config(self) -> dict[str, Any]:
        return self.read_json("config.json")

    def log(self, record: dict[str, Any]) -> None:
        """Appends one JSON object (one line, one ``write``) to ``metrics.jsonl``."""
        if not self._writer:
            return
        with open(self.file(METRICS_FILE), "a") as f:
            f.write(json.dumps(to_jsonable(record)) + "\n")
        if self._started is not None:
            self._write_marker()  # the time spent so far survives a kill

    def metrics(self) -> list[dict[str, Any]]:
        """The records of ``metrics.jsonl``, in order (``[]`` when there is none).

        A cut-off last line (a process killed while writing it) is dropped with a
        warning; a bad line anywhere else is an error.

        Raises:
          RunFolderError: a complete line is not a JSON object (names file and line).
        """
        return self._read_metrics()[0]

    def _read_metrics(self) -> tuple[list[dict[str, Any]], bool]:
        """-> (records, whether the file needs rewriting: a cut-off or unterminated last line)."""
        file = self.path / METRICS_FILE
        if not file.exists():
            return [], False
        lines = file.read_bytes().decode(errors="replace").split("\n")
        records = []
        for number, line in enumerate(lines, 1):
            if not line.strip():
                continue
            last = number == len(lines)  # no newline after it: the write may have been cut
            try:
                record = json.loads(line)
                if not isinstance(record, dict):
                    raise ValueError(f"a JSON {type(record).__name__}, not an object")
            except ValueError as err:
                if last:
                    warnings.warn(f"{file}: dropped its cut-off last line {number} (the run was "
                                  "stopped while writing it)", stacklevel=3)
                    return records, True
                raise RunFolderError(
                    f"{file} line {number} is corrupt ({err}); only a cut-off last line can be "
                    "dropped safely. Fix or delete that line, or start a new --workdir") from None
            records.append(record)
        return records, bool(lines[-1].strip())

    def _write_metrics(self, records: list[dict[str, Any]]) -> None:
        file = self.file(METRICS_FILE)
        if not self._writer:
            return
        tmp = file.with_suffix(".jsonl.tmp")
        tmp.write_text("".join(json.dumps(to_jsonable(r)) + "\n" for r in records))
        os.replace(tmp, file)

    def _repair_metrics(self) -> None:
        records, dirty = self._read_metrics()
        if dirty:
            self._write_metrics(records)

    def truncate_metrics(self, keep: Callable[[dict[str, Any]], bool]) -> None:
        """Keeps only the metric records for which ``keep(record)`` is true (used on resume)."""
        self._write_metrics([r for r in self.metrics() if keep(r)])

    def write_results(self, results: dict[str, Any]) -> None:
        missing = [k for k in RESULT_KEYS if k not in results]
        if missing:
            raise ValueError(f"results.json needs the keys {RESULT_KEYS}; missing {missing}")
        self.write_json("results.json", results)

    def results(self) -> dict[str, Any]:
        return self.read_json("results.json")


def summarize(per_seed: Sequence[float] | np.ndarray) -> dict[str, Any]:
    """``{"per_seed": [...], "mean": m, "std": s}`` (population std over seeds)."""
    values = np.asarray(per_seed, dtype=np.float64).reshape(-1)
    return {"per_seed": values.tolist(), "mean": float(values.mean()), "std": float(values.std())}
