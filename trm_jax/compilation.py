"""Compile less and once: XLA options, JAX's persistent compilation cache, a compile counter.

On the paper's small models most of an experiment's wall time is XLA compiling
its programs, not running them. Three tools make that cost smaller, visible, and paid once:

* :func:`jit` -- ``jax.jit`` with the library's per-backend XLA options
  (:data:`CPU_COMPILER_OPTIONS`: on CPU, LLVM at ``-O2`` instead of ``-O3``: the
  library's programs compile ~1.25x faster, model initialisers 4x, and run as fast).
  Every program of the library is compiled through it.
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

The last two read jax's own hooks (``jax.config`` flags and ``jax.monitoring`` events,
jax 0.10); nothing here changes what is computed.
"""
from __future__ import annotations

import collections
import contextlib
import contextvars
import dataclasses
import functools
import os
import pathlib
import threading
import time
import warnings
from typing import Any, Callable, Iterator

import jax
import numpy as np
from jax import monitoring

from trm_jax.errors import ConfigError

try:  # jax's own "is a transformation tracing right now?" (jax 0.4.36+)
    from jax._src.core import trace_state_clean as _trace_state_clean
except ImportError:  # older jax: a tracer among the arguments is the sign
    _trace_state_clean = None

__all__ = ["CACHE_DIR_ENV", "CPU_COMPILER_OPTIONS", "NO_CACHE_ENV", "CompileStats", "PhaseStats",
           "compiler_options", "count_compilations", "default_cache_dir", "enable_persistent_cache",
           "in_current_context", "jit", "persistent_cache_wanted"]

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


CPU_COMPILER_OPTIONS: dict[str, Any] = {"xla_backend_optimization_level": 2}
"""XLA options :func:`jit` compiles with on CPU (``jax.jit(..., compiler_options=...)``).

XLA:CPU runs LLVM at ``-O3`` by default. At ``-O2`` the library's programs compile
faster (the test suite's XLA time: 687 -> 550 s; model initialisers 4x: lenet, 3 seeds,
4.4 -> 1.0 s, as ``-O3`` spends it on the unrolled threefry rounds of the random
initialisers) and run as fast (training step 46 vs 48 ms, exact meta-step 1.00 vs
0.97 s: within this machine's noise; ``BENCHMARKS.md``). Numbers: initialisers,
training steps, the quick start and every golden experiment number are bitwise the
same; one exact meta-step moves by float32 rounding (5e-7). ``-O1`` compiles no faster.
Edit the dict and call ``compiler_options.cache_clear()`` to change it; ``{}`` gives
XLA's defaults. GPU and TPU get no options.
"""


@functools.cache
def compiler_options(backend: str | None = None) -> dict[str, Any] | None:
    """The XLA options :func:`jit` passes on ``backend`` (default: jax's default backend).

    Checked once per backend by compiling a one-op program with them: a jaxlib that
    does not know an option gets a warning and XLA's defaults (``None``), never a
    failed experiment.
    """
    backend = backend or jax.default_backend()
    options = dict(CPU_COMPILER_OPTIONS) if backend == "cpu" else {}
    if not options:
        return None
    try:
        jax.jit(lambda x: x + 1, compiler_options=options, backend=backend).lower(
            np.float32(0)).compile()
    except Exception as err:  # noqa: BLE001 -- any rejection means: compile with the defaults
        warnings.warn(f"XLA options {options} rejected on {backend} ({str(err).splitlines()[0]}); "
                      "compiling with XLA's defaults", stacklevel=2)
        return None
    return options


def jit(fun: Callable | None = None, /, **jit_kwargs: Any) -> Callable:
    """``jax.jit(fun, **jit_kwargs)`` compiled with :func:`compiler_options`.

    Same arguments and call signature as ``jax.jit`` (also as a decorator:
    ``@functools.partial(jit, static_argnums=0)``). jax accepts ``compiler_options``
    only on a top-level call, so a call made while tracing (inside another ``jit``,
    ``grad`` or ``vmap``) uses the plain ``jax.jit`` and is compiled as part of the
    outer program, with the outer program's options. The backend is looked up at the
    first top-level call, not at import.
    """
    if fun is None:
        return functools.partial(jit, **jit_kwargs)
    return _Jit(fun, jit_kwargs)


class _Jit:
    """A ``jax.jit`` that picks its XLA options at the first top-level call."""

    def __init__(self, fun: Callable, jit_kwargs: dict[str, Any]) -> None:
        functools.update_wrapper(self, fun)
        self._fun, self._jit_kwargs = fun, jit_kwargs
        self._plain = jax.jit(fun, **jit_kwargs)
        self._top: Callable | None = None

    def _pick(self, args: tuple, kwargs: dict) -> Callable:
        if _tracing(args, kwargs):
            return self._plain
        if self._top is None:
            options = compiler_options()
            self._top = (jax.jit(self._fun, compiler_options=options, **self._jit_kwargs)
                         if options else self._plain)
        return self._top

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self._pick(args, kwargs)(*args, **kwargs)

    def lower(self, *args: Any, **kwargs: Any) -> jax.stages.Lowered:
        return self._pick(args, kwargs).lower(*args, **kwargs)

    def __getattr__(self, name: str) -> Any:  # the jitted function's other attributes
        if name.startswith("__") or "_plain" not in self.__dict__:
            raise AttributeError(name)
        return getattr(self._top if self._top is not None else self._plain, name)

    def __repr__(self) -> str:
        return f"trm_jax.compilation.jit({getattr(self._fun, '__qualname__', self._fun)!r})"


def _tracing(args: tuple, kwargs: dict) -> bool:
    if _trace_state_clean is not None:
        return not _trace_state_clean()
    return any(isinstance(leaf, jax.core.Tracer) for leaf in jax.tree.leaves((args, kwargs)))


def default_cache_dir() -> pathlib.Path:
    """``$TRM_JAX_CACHE_DIR``, else ``$XDG_CACHE_HOME/trm_jax/jax``, else
    ``~/.cache/trm_jax/jax``."""
    if os.environ.get(CACHE_DIR_ENV):
        return pathlib.Path(os.environ[CACHE_DIR_ENV]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or pathlib.Path.home() / ".cache"
    return pathlib.Path(base).expanduser() / "trm_jax" / "jax"


def _env_true(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


def persistent_cache_wanted() -> bool:
    """Whether :func:`enable_persistent_cache` would turn a cache on in a folder of its own
    choosing (not off by ``$TRM_JAX_NO_COMPILE_CACHE`` or jax's settings, and no folder
    configured already)."""
    return not (_env_true(NO_CACHE_ENV) or not jax.config.jax_enable_compilation_cache
                or jax.config.jax_compilation_cache_dir)


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
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise ConfigError(f"the compilation cache folder {folder} (${CACHE_DIR_ENV}) cannot be "
                          f"created ({err.strerror or err}); set ${CACHE_DIR_ENV} to a writable "
                          f"folder or turn the cache off (${NO_CACHE_ENV}=1, --no-compile-cache)"
                          ) from None
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
      trace_seconds: seconds spent tracing to jaxprs.
      lower_seconds: seconds spent lowering to MLIR.
      backend_seconds: seconds of XLA compiling or loading from the cache
        (``compile_seconds`` is the sum of the three).
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
        # The open phases, per thread (a context variable): methods trained in parallel
        # threads each count their own compilations; a worker thread started with
        # ``contextvars.copy_context().run`` (:func:`in_current_context`) counts for the
        # phase that started it.
        self._stack: contextvars.ContextVar[tuple[str, ...]] = contextvars.ContextVar(
            f"trm_jax_phases_{id(self)}", default=())
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
        stack = self._stack.get()
        path = f"{stack[-1]}/{name}" if stack else name
        with self._lock:
            stats = self.phases.setdefault(path, PhaseStats())
        token = self._stack.set((*stack, path))
        start = time.perf_counter()
        try:
            yield stats
        finally:
            with self._lock:  # the same phase open in two threads: their times add up
                stats.wall_seconds += time.perf_counter() - start
            self._stack.reset(token)

    def _targets(self) -> list[PhaseStats]:
        return [self.total, *(self.phases[p] for p in self._stack.get())]

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


def in_current_context(fn: Callable[..., Any]) -> Callable[..., Any]:
    """``fn`` to run in another thread (a pool's worker) as if in this one: what it
    compiles counts for the phases open here (:meth:`CompileStats.phase`)."""
    context = contextvars.copy_context()
    return lambda *args, **kwargs: context.copy().run(fn, *args, **kwargs)


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
