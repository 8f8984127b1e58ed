"""Compile once: JAX's persistent compilation cache, and a counter of compilations.

On the paper's small models most of an experiment's wall time is XLA compiling
its programs, not running them. Two tools make that cost visible and pay it once:

* :func:`enable_persistent_cache` -- compiled executables are written to a folder
  and loaded (not recompiled) by every later process that builds the same program.
* :func:`count_compilations` -- how many programs were compiled, how long tracing,
  lowering and compiling took, and how many came from the persistent cache, in
  total and per named phase, ready for ``results.json``::

      enable_persistent_cache()
      with count_compilations() as stats:
          with stats.phase("train"):
              ...
          with stats.phase("attack"):
              ...
      results["compilation"] = stats.as_dict()

Both read jax's own hooks (``jax.config`` flags and ``jax.monitoring`` events,
jax 0.10); nothing here changes what is computed.
"""
from __future__ import annotations

import collections
import contextlib
import dataclasses
import os
import pathlib
import threading
import time
import warnings
from typing import Any, Iterator

import jax
from jax import monitoring

__all__ = ["CACHE_DIR_ENV", "NO_CACHE_ENV", "CompileStats", "PhaseStats", "count_compilations",
           "default_cache_dir", "enable_persistent_cache"]

CACHE_DIR_ENV = "TRM_JAX_CACHE_DIR"
"""Environment variable naming the persistent cache folder (default ``~/.cache/trm_jax/jax``)."""
NO_CACHE_ENV = "TRM_JAX_NO_COMPILE_CACHE"
"""Set to ``1`` (or ``true``/``yes``) to leave the persistent cache off."""

# jax.monitoring event names (jax/_src/dispatch.py, compiler.py, compilation_cache.py).
TRACE_EVENT = "/jax/core/compile/jaxpr_trace_duration"  # top-level jit traces only
LOWER_EVENT = "/jax/core/compile/jaxpr_to_mlir_module_duration"
BACKEND_COMPILE_EVENT = "/jax/core/compile/backend_compile_duration"  # wraps cache lookup + XLA
CACHE_HIT_EVENT = "/jax/compilation_cache/cache_hits"
CACHE_WRITE_EVENT = "/jax/compilation_cache/cache_misses"  # recorded when a miss is written
CACHE_REQUEST_EVENT = "/jax/compilation_cache/compile_requests_use_cache"

# Thresholds under which jax does not write an entry. With jax's default minimum compile
# time (1 s), `compare --dataset digits` on CPU would cache 27 of its 213 programs: the other
# 186 (eager ops, evaluations, small steps; 18 s of 198 s XLA time) would compile again in
# every run, while loading one from the cache takes ~7 ms. So every program is cached
# (213 entries, 4.5 MB for that run).
_MIN_COMPILE_SECS = 0.0
_MIN_ENTRY_BYTES = -1  # -1: no size minimum, and jax does not override it


def default_cache_dir() -> pathlib.Path:
    """``$TRM_JAX_CACHE_DIR``, else ``$XDG_CACHE_HOME/trm_jax/jax``, else
    ``~/.cache/trm_jax/jax``."""
    if os.environ.get(CACHE_DIR_ENV):
        return pathlib.Path(os.environ[CACHE_DIR_ENV]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or pathlib.Path.home() / ".cache"
    return pathlib.Path(base).expanduser() / "trm_jax" / "jax"


def _env_true(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


def enable_persistent_cache(path: str | os.PathLike | None = None) -> pathlib.Path | None:
    """Turns on JAX's persistent compilation cache; returns its folder, or ``None`` when off.

    A later process that compiles the same program (same computation, shapes,
    flags, jax version and device) loads the executable from the folder instead of
    running XLA. Works on CPU, GPU and TPU in jax 0.10 (no extra flag for CPU).

    Idempotent, and never overrides the user: if a cache folder is already
    configured (``JAX_COMPILATION_CACHE_DIR``, ``jax.config.update(
    "jax_compilation_cache_dir", ...)`` or an earlier call) that folder is kept and
    returned (with a warning when ``path`` asks for another one). The minimum
    compile time / entry size for writing an entry are lowered to 0 so that the
    small CPU programs are cached too, unless the user set them through their
    ``JAX_PERSISTENT_CACHE_MIN_*`` environment variables.

    Args:
      path: the cache folder; default :func:`default_cache_dir`. Created if missing.

    Returns:
      The active cache folder, or ``None`` when ``$TRM_JAX_NO_COMPILE_CACHE`` is set
      or the user disabled jax's cache (``jax_enable_compilation_cache=False``).
    """
    if _env_true(NO_CACHE_ENV) or not jax.config.jax_enable_compilation_cache:
        return None
    configured = jax.config.jax_compilation_cache_dir
    if configured:
        resolved = lambda p: pathlib.Path(p).expanduser().resolve()
        if path is not None and resolved(path) != resolved(configured):
            warnings.warn(f"enable_persistent_cache({str(path)!r}): jax's compilation cache is "
                          f"already at {configured!r}; keeping that one", stacklevel=2)
        return pathlib.Path(configured)
    folder = pathlib.Path(path).expanduser() if path is not None else default_cache_dir()
    folder.mkdir(parents=True, exist_ok=True)
    if "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS" not in os.environ:
        jax.config.update("jax_persistent_cache_min_compile_time_secs", _MIN_COMPILE_SECS)
    if "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES" not in os.environ:
        jax.config.update("jax_persistent_cache_min_entry_size_bytes", _MIN_ENTRY_BYTES)
    jax.config.update("jax_compilation_cache_dir", str(folder))
    return folder


@dataclasses.dataclass
class PhaseStats:
    """Counts and seconds of one phase (or of the whole counted block).

    Attributes:
      compilations: programs that needed an executable (XLA compile or persistent-cache
        load); a jitted function called again with the same shapes adds nothing.
      xla_compilations: of those, the ones XLA really compiled (``compilations - cache_hits``).
      cache_hits: executables loaded from the persistent cache.
      cache_writes: executables written to the persistent cache.
      trace_seconds, lower_seconds, backend_seconds: jaxpr tracing, lowering to MLIR, and
        XLA compile or cache load; ``compile_seconds`` is their sum.
      wall_seconds: wall time of the phase (of the ``with`` block).
    """
    compilations: int = 0
    cache_hits: int = 0
    cache_writes: int = 0
    trace_seconds: float = 0.0
    lower_seconds: float = 0.0
    backend_seconds: float = 0.0
    wall_seconds: float = 0.0

    @property
    def xla_compilations(self) -> int:
        return self.compilations - self.cache_hits

    @property
    def compile_seconds(self) -> float:
        return self.trace_seconds + self.lower_seconds + self.backend_seconds

    def as_dict(self) -> dict[str, Any]:
        wall = self.wall_seconds
        return {"compilations": self.compilations, "xla_compilations": self.xla_compilations,
                "cache_hits": self.cache_hits, "cache_writes": self.cache_writes,
                "compile_seconds": round(self.compile_seconds, 4),
                "trace_seconds": round(self.trace_seconds, 4),
                "lower_seconds": round(self.lower_seconds, 4),
                "backend_compile_seconds": round(self.backend_seconds, 4),
                "wall_seconds": round(wall, 4),
                "compile_share": round(self.compile_seconds / wall, 4) if wall > 0 else None}


class CompileStats:
    """What jax compiled while this counter was active, in total and per phase.

    Phases nest (``"outer/inner"``) and are inclusive: an event inside
    ``phase("b")`` within ``phase("a")`` counts for ``"a"``, ``"a/b"`` and the total.
    Entering the same phase name again accumulates. ``programs`` counts backend
    compiles per jitted function name: a name seen more than once was compiled for
    more than one set of shapes/static arguments (or re-created).
    """

    def __init__(self) -> None:
        self.total = PhaseStats()
        self.phases: dict[str, PhaseStats] = {}
        self.programs: collections.Counter[str] = collections.Counter()
        self._stack: list[str] = []
        self._lock = threading.Lock()
        self._start: float | None = None

    def __enter__(self) -> "CompileStats":
        self._start = time.perf_counter()
        _activate(self)
        return self

    def __exit__(self, *exc: Any) -> None:
        _deactivate(self)
        self.total.wall_seconds += time.perf_counter() - self._start

    @contextlib.contextmanager
    def phase(self, name: str) -> Iterator[PhaseStats]:
        """Attributes what compiles inside the block to phase ``name`` (nested: ``outer/name``)."""
        with self._lock:
            path = f"{self._stack[-1]}/{name}" if self._stack else name
            self._stack.append(path)
            stats = self.phases.setdefault(path, PhaseStats())
        start = time.perf_counter()
        try:
            yield stats
        finally:
            with self._lock:
                stats.wall_seconds += time.perf_counter() - start
                self._stack.pop()

    def _targets(self) -> list[PhaseStats]:
        return [self.total, *(self.phases[p] for p in self._stack)]

    def _on_event(self, event: str) -> None:
        field = {CACHE_HIT_EVENT: "cache_hits", CACHE_WRITE_EVENT: "cache_writes"}.get(event)
        if field is None:
            return
        with self._lock:
            for s in self._targets():
                setattr(s, field, getattr(s, field) + 1)

    def _on_duration(self, event: str, seconds: float, fun_name: str = "?", **_: Any) -> None:
        field = {TRACE_EVENT: "trace_seconds", LOWER_EVENT: "lower_seconds",
                 BACKEND_COMPILE_EVENT: "backend_seconds"}.get(event)
        if field is None:
            return
        with self._lock:
            for s in self._targets():
                setattr(s, field, getattr(s, field) + seconds)
                if event == BACKEND_COMPILE_EVENT:
                    s.compilations += 1
            if event == BACKEND_COMPILE_EVENT:
                self.programs[fun_name] += 1

    def recompiled(self) -> dict[str, int]:
        """Jitted function names compiled more than once, with their counts."""
        return {n: c for n, c in self.programs.most_common() if c > 1}

    def as_dict(self) -> dict[str, Any]:
        """``{"compilations", "compile_seconds", "cache_hits", ..., "phases": {name: {...}}}``."""
        return {**self.total.as_dict(), "phases": {n: s.as_dict() for n, s in self.phases.items()}}


def count_compilations() -> CompileStats:
    """A fresh :class:`CompileStats`; use it as ``with count_compilations() as stats:``.

    Counters may nest or overlap (each active one sees every compilation of the
    process, from any thread); nothing is recorded outside their ``with`` blocks.
    """
    return CompileStats()


# jax.monitoring listeners are process-global and cannot be scoped: one pair of
# listeners is registered while at least one counter is active, and routes events to
# every active counter. Unregistering when the last one exits keeps tests independent.
_active: list[CompileStats] = []
_registry_lock = threading.Lock()


def _route_event(event: str, **kwargs: Any) -> None:
    for stats in list(_active):
        stats._on_event(event)


def _route_duration(event: str, seconds: float, **kwargs: Any) -> None:
    for stats in list(_active):
        stats._on_duration(event, seconds, **kwargs)


def _activate(stats: CompileStats) -> None:
    with _registry_lock:
        if not _active:
            monitoring.register_event_listener(_route_event)
            monitoring.register_event_duration_secs_listener(_route_duration)
        _active.append(stats)


def _deactivate(stats: CompileStats) -> None:
    with _registry_lock:
        _active.remove(stats)
        if not _active:
            # Tolerate a jax.monitoring.clear_event_listeners() by someone else meanwhile.
            with contextlib.suppress(Exception):
                monitoring.unregister_event_listener(_route_event)
            with contextlib.suppress(Exception):
                monitoring.unregister_event_duration_listener(_route_duration)
