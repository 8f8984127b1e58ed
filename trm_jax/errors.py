"""Typed errors: every failure a user can cause or meet has one class here.

The library raises these (never ``SystemExit``); the experiments' one CLI
wrapper (``experiments._cli.run``) turns each into a one-line ``error: ...``
message and exit code 2. Messages name the bad value and what is allowed.

* :class:`ConfigError` -- a bad setting (also a ``ValueError``, so
  ``except ValueError`` keeps working).
* :class:`DatasetUnavailableError` -- the data is neither prepared nor downloadable.
* :class:`NonFiniteError` -- training produced NaN/Inf; carries the last good state.
* :class:`CheckpointError` -- a checkpoint is missing, corrupt or does not match.
* :class:`RunFolderError` -- a run folder cannot be created, opened, resumed or locked.
* :class:`StorageError` -- a write failed: the disk is full, a quota is reached, or an
  I/O error; the run stays resumable once the cause is fixed.
"""
from __future__ import annotations

import contextlib
import errno
import os
import shutil
from typing import Any, Iterator


class TrmError(Exception):
    """Base class of every error trm_jax raises on purpose."""


class ConfigError(TrmError, ValueError):
    """A setting is out of range or inconsistent; raised before any compute.

    Attributes:
      field: the setting at fault as a dotted path relative to the config that was
        checked (``"inner_lr"``, ``"teacher.batch_size"``), as the message spells it,
        or ``None``. The experiments' command lines replace it in the message by the
        flag that sets it (``--meta.inner-lr``).

    Example:
      >>> import trm_jax
      >>> try:
      ...     trm_jax.train.TrainConfig(learning_rate=float("inf"))
      ... except ConfigError as err:
      ...     print(err, "| field:", err.field)
      learning_rate must be finite and > 0, got inf | field: learning_rate
    """

    def __init__(self, message: str, *, field: str | None = None):
        super().__init__(message)
        self.field = field
        for seen in _WATCHERS:
            seen.append(self)


# Lists that collect every ConfigError made while a `watch()` block runs.
_WATCHERS: list[list[ConfigError]] = []


@contextlib.contextmanager
def watch() -> Iterator[list[ConfigError]]:
    """Collects every :class:`ConfigError` created in the block, in order, even one that a
    caller catches (tyro turns a ``ValueError`` raised while it builds a config into its own
    message box; the command lines read the original error, with its ``field``, from here)."""
    seen: list[ConfigError] = []
    _WATCHERS.append(seen)
    try:
        yield seen
    finally:
        _WATCHERS.remove(seen)


class DatasetUnavailableError(TrmError, RuntimeError):
    """A dataset is neither prepared locally nor downloadable here."""


class NonFiniteError(TrmError, FloatingPointError):
    """Training produced NaN/Inf.

    Attributes:
      state: the last good (finite) state, or ``None`` when there is none.
      epoch: the epoch (or outer step) at which it happened.
    """

    def __init__(self, message: str, state: Any = None, epoch: int | None = None):
        super().__init__(message)
        self.state = state
        self.epoch = epoch


class CheckpointError(TrmError, RuntimeError):
    """A checkpoint is missing, unreadable or does not match the expected state."""


class RunFolderError(TrmError, OSError):
    """A run folder exists (and may not be overwritten), is missing, is not a run
    folder, is corrupt or is locked by another process."""


class RunExistsError(RunFolderError, FileExistsError):
    """The run folder exists and neither ``overwrite`` nor ``resume`` was given."""


class RunNotFoundError(RunFolderError, FileNotFoundError):
    """The run folder (or a file a run needs in it) does not exist, or holds no run."""


class StorageError(TrmError, OSError):
    """A write failed for lack of space (``ENOSPC``, ``EDQUOT``), a read-only or failing
    disk (``EROFS``, ``EIO``): nothing half-written is kept, and the run continues with
    ``--resume`` once there is room."""


#: errno values that mean "the storage failed", not "the program is wrong".
STORAGE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EIO, errno.EROFS}
# The same, as the text libraries (tensorstore under orbax, TFDS) wrap them in.
_STORAGE_TEXTS = tuple(os.strerror(e) for e in sorted(STORAGE_ERRNOS))


def storage_cause(exc: BaseException) -> BaseException | None:
    """The exception in ``exc``'s chain (causes, contexts, groups) that is a storage
    failure (an ``OSError`` with one of :data:`STORAGE_ERRNOS`, or a library error whose
    text says so), or ``None``."""
    seen, todo = set(), [exc]
    while todo:
        e = todo.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        if isinstance(e, StorageError):
            return e
        if isinstance(e, OSError) and e.errno in STORAGE_ERRNOS:
            return e
        if not isinstance(e, TrmError) and any(t in str(e) for t in _STORAGE_TEXTS):
            return e
        todo += [e.__cause__, e.__context__, *getattr(e, "exceptions", ())]
    return None


def _free(path: str) -> str:
    while path and not os.path.exists(path):
        path = os.path.dirname(path)
    try:
        return f"{shutil.disk_usage(path or '.').free / 2**20:.1f} MiB free there"
    except OSError:
        return "free space unknown"


def as_storage_error(exc: BaseException, where: str | os.PathLike | None = None
                     ) -> StorageError | None:
    """A one-line :class:`StorageError` for a storage failure in ``exc``'s chain (naming
    the file, the errno's meaning and the free space), or ``None`` when there is none."""
    cause = storage_cause(exc)
    if cause is None:
        return None
    if isinstance(cause, StorageError):
        return cause
    path = getattr(cause, "filename", None) or where
    what = (os.strerror(cause.errno) if isinstance(cause, OSError) and cause.errno
            else next(t for t in _STORAGE_TEXTS if t in str(cause)))
    place = f" writing {path}" if path else ""
    err = StorageError(f"{what}{place} ({_free(os.fspath(path)) if path else 'free space unknown'});"
                       " free some space (or fix the disk), then run the same command again, "
                       "plus --resume once its run folder exists")
    err.errno = getattr(cause, "errno", None)
    return err


@contextlib.contextmanager
def storage_errors(where: str | os.PathLike | None = None) -> Iterator[None]:
    """Turns a storage failure raised in the block (however deep in a library) into a
    one-line :class:`StorageError`; any other error passes unchanged."""
    try:
        yield
    except StorageError:
        raise
    except Exception as exc:
        err = as_storage_error(exc, where)
        if err is None:
            raise
        raise err from None


class DistributedError(TrmError, RuntimeError):
    """A multi-process run cannot start: the processes did not all connect in time, were
    started with different settings, or one of them stopped with an error before compute."""


def check_choice(field: str, value, allowed) -> None:
    """Raises :class:`ConfigError` ``unknown <field> <value>; allowed: <allowed>`` (naming
    ``field``) unless ``value`` is one of ``allowed``."""
    if value not in allowed:
        raise ConfigError(f"unknown {field} {value!r}; allowed: {tuple(allowed)}", field=field)


@contextlib.contextmanager
def about(field: str) -> Iterator[None]:
    """A :class:`ConfigError` raised in the block is about ``field``: its ``field`` becomes
    ``field`` (none yet) or ``field.<its field>`` (a nested config's setting).

    Example::

      with errors.about("reference"):
          methods.check("reference", config.reference, protocol)   # field "reference.train.batch_size"
    """
    try:
        yield
    except ConfigError as err:
        err.field = field if err.field is None else f"{field}.{err.field}"
        raise


ERRORS = (ConfigError, DatasetUnavailableError, NonFiniteError, CheckpointError, RunFolderError,
          StorageError)
