"""Hooks: how a method reports and persists its progress without knowing about run folders.

Every method's ``protect(config, protocol, keys, *, hooks=None)`` calls its hooks
at fixed points; the library itself never writes a file:

* ``hooks.log(record)`` -- one metrics record (a dict of floats and per-seed lists);
* ``hooks.save(phase, step, state, metadata)`` -- a resumable state after ``step``
  epochs (or outer steps) of ``phase``;
* ``hooks.restore(phase, make_like)`` -- ``(state, metadata)`` saved earlier for
  ``phase`` (shaped like ``make_like()``, called only when there is a checkpoint),
  or ``None`` (start the phase from scratch);
* ``hooks.should_save(phase, step, last)`` -- which steps to save;
* ``hooks.describe_last_good(phase)`` -- a sentence for error messages;
* ``hooks.progress`` -- show progress bars.

:class:`Hooks` does nothing (pure library use). :class:`RunFolderHooks` logs
to a run folder's ``metrics.jsonl`` and checkpoints every phase under
``checkpoints/<phase>`` with orbax; with ``resume=True`` each phase continues from
its last checkpoint, so an interrupted run resumes to the same numbers.
"""
from __future__ import annotations

import math
import sys
import time
import warnings
from typing import Any, Callable

from trm_jax.errors import ConfigError
from trm_jax.typing import PyTree


class Hooks:
    """No logging, no checkpoints, no progress bars: the default of every ``protect``."""

    progress: bool = False

    def log(self, record: dict[str, Any]) -> None:
        """Receives one metrics record."""

    def should_save(self, phase: str, step: int, last: int) -> bool:
        """Whether to save the state after ``step`` of ``last`` in ``phase``."""
        return False

    def save(self, phase: str, step: int, state: PyTree, metadata: dict[str, Any]) -> None:
        """Persists ``state`` after ``step`` of ``phase``."""

    def restore(self, phase: str, make_like: Callable[[], PyTree]
                ) -> tuple[PyTree, dict[str, Any]] | None:
        """The last saved state of ``phase`` shaped like ``make_like()``, or ``None``."""
        return None

    def describe_last_good(self, phase: str) -> str:
        """For error messages: where the last good state of ``phase`` is."""
        return "no checkpoints are kept (library use without a run folder)"

    def close(self) -> None:
        """Releases files (called by the owner of the hooks)."""


NO_HOOKS = Hooks()


class RunFolderHooks(Hooks):
    """Hooks that write to a :class:`trm_jax.runs.RunDir`.

    Args:
      run: the run folder.
      resume: restore each phase from its last checkpoint (``checkpoints/<phase>``).
      checkpoint_every: save every this many epochs / outer steps, and at the end.
      progress: show progress bars.
      checkpoint_every_phase: per-phase overrides, e.g. ``{"meta": 100}``.
      checkpoint_seconds: besides a phase's last step, save at most once per this many
        seconds of the phase (an interrupted run redoes at most that much). 0: every
        ``checkpoint_every`` steps. A save costs ~0.1-0.3 s (orbax), while a digits
        epoch takes milliseconds. Ignored with several processes, which must all save
        together.
    """

    def __init__(self, run: Any, *, resume: bool = False, checkpoint_every: int = 5,
                 progress: bool = True, checkpoint_every_phase: dict[str, int] | None = None,
                 checkpoint_seconds: float = 0.0):
        if not (math.isfinite(checkpoint_seconds) and checkpoint_seconds >= 0):
            raise ConfigError(f"checkpoint_seconds must be finite and >= 0, got "
                              f"{checkpoint_seconds!r}", field="checkpoint_seconds")
        self.run = run
        self.resume = resume
        self.checkpoint_every = checkpoint_every
        self.every = dict(checkpoint_every_phase or {})
        self.progress = progress
        self.checkpoint_seconds = checkpoint_seconds
        self._checkpointers: dict[str, Any] = {}
        self._saved_at: dict[str, float] = {}  # phase -> when it last saved (or first asked)

    def _ckpt(self, phase: str):
        from trm_jax import checkpoint

        if phase not in self._checkpointers:
            self._checkpointers[phase] = checkpoint.Checkpointer(self.run.checkpoint_dir / phase)
        return self._checkpointers[phase]

    def log(self, record: dict[str, Any]) -> None:
        self.run.log(record)

    def should_save(self, phase: str, step: int, last: int) -> bool:
        every = self.every.get(phase.split("-")[0], self.checkpoint_every)
        if step == last:
            return True
        if step % every:
            return False
        import jax

        if not self.checkpoint_seconds or jax.process_count() > 1:
            return True
        now = time.monotonic()
        return now - self._saved_at.setdefault(phase, now) >= self.checkpoint_seconds

    def save(self, phase: str, step: int, state: PyTree, metadata: dict[str, Any]) -> None:
        self._ckpt(phase).save(step, state, {**metadata, "phase": phase, "step": step})
        self._saved_at[phase] = time.monotonic()

    def restore(self, phase: str, make_like: Callable[[], PyTree]
                ) -> tuple[PyTree, dict[str, Any]] | None:
        if not self.resume:
            return None
        if not (self.run.checkpoint_dir / phase).exists() or self._ckpt(phase).latest_step() is None:
            # Killed before the phase's first checkpoint: it starts again from step 0, so the
            # records it logged before the kill would appear twice.
            self.run.truncate_metrics(lambda r: r.get("phase") != phase)
            return None
        ckpt = self._ckpt(phase)
        with warnings.catch_warnings(record=True) as caught:  # shown here, one line each
            warnings.simplefilter("always")
            state, meta = ckpt.restore(make_like())
        for warning in caught:
            print(f"warning: {' '.join(str(warning.message).split())}", file=sys.stderr, flush=True)
        done = int(meta.get("restored_step", meta.get("step", meta.get("epoch", 0))))
        # Records logged after the checkpoint are logged again when the phase goes on.
        self.run.truncate_metrics(
            lambda r: r.get("phase") != phase or r.get("epoch", r.get("step", 0)) <= done)
        return state, {**meta, "step": done}

    def describe_last_good(self, phase: str) -> str:
        if not (self.run.checkpoint_dir / phase).exists():
            return "no checkpoint of this phase was written yet"
        step = self._ckpt(phase).latest_step()
        if step is None:
            return "no checkpoint of this phase was written yet"
        return f"the last good checkpoint (step {step}) in {self.run.checkpoint_dir / phase} is intact"

    def close(self) -> None:
        for ckpt in self._checkpointers.values():
            ckpt.close()
        self._checkpointers.clear()
