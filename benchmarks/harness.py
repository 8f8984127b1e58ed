"""Framework-agnostic benchmark harness: timing, memory, result rows, reports.

Neither JAX nor PyTorch is imported at module load; each helper imports the
framework it needs lazily, so the harness works with either (or both) installed.

Conventions
-----------
* Times are wall-clock seconds from :func:`time.perf_counter`. Asynchronous
  frameworks must be synchronised before the clock is read: pass
  ``sync=jax.block_until_ready`` (JAX) or ``sync=lambda _: torch.cuda.synchronize()``
  (PyTorch on CUDA) to :func:`time_fn`.
* ``Row.ratio`` compares an implementation with a *reference* implementation of
  the same bench: ``ratio = reference_time / impl_time``, so ``ratio > 1`` means
  "faster than the reference" whatever the unit. For rate units (``steps/s``,
  ``images/s``, ...) that is ``impl_rate / reference_rate``.
"""
from __future__ import annotations

import dataclasses
import datetime
import json
import os
import platform
import statistics
import sys
import time
from typing import Any, Callable, Iterable, Mapping, Sequence

import numpy as np

# Units whose value is a rate (higher is better); everything else is a duration.
RATE_UNITS = frozenset({"steps/s", "images/s", "epochs/s", "runs/s", "tasks/s", "items/s"})


# --------------------------------------------------------------------------- timing


@dataclasses.dataclass(frozen=True)
class Timing:
    """Wall-clock seconds per call of a benchmarked function.

    Attributes:
      median, min, max: statistics over ``samples`` (the timed, post-warm-up calls).
      samples: every timed call, in order.
      compile_s: duration of the very first call (tracing + compilation for
        jitted code, allocator/cuDNN warm-up for PyTorch), or ``None`` if the
        function was not called before timing (``warmup=0``).
    """

    median: float
    min: float
    max: float
    samples: tuple[float, ...]
    compile_s: float | None


def time_fn(
    fn: Callable[[], Any],
    *,
    warmup: int = 2,
    repeats: int = 5,
    sync: Callable[[Any], Any] | None = None,
) -> Timing:
    """Times a zero-argument callable.

    The first ``warmup`` calls are not part of the statistics; the first of them
    is reported separately as ``compile_s``. Each of the ``repeats`` timed calls
    is measured individually, with ``sync(output)`` run before the clock is read
    so that asynchronous dispatch (JAX, CUDA) is not mistaken for speed.

    Args:
      fn: the work to time, e.g. one outer step or one epoch.
      warmup: untimed calls before measuring (``>= 0``).
      repeats: timed calls (``>= 1``).
      sync: called on each output before reading the clock; ``None`` for
        synchronous code (e.g. PyTorch on CPU).
    """
    if warmup < 0 or repeats < 1:
        raise ValueError(f"need warmup >= 0 and repeats >= 1, got warmup={warmup}, repeats={repeats}")
    sync = sync if sync is not None else (lambda out: out)

    compile_s = None
    for i in range(warmup):
        t0 = time.perf_counter()
        sync(fn())
        if i == 0:
            compile_s = time.perf_counter() - t0

    samples = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        sync(fn())
        samples.append(time.perf_counter() - t0)
    return Timing(
        median=statistics.median(samples),
        min=min(samples),
        max=max(samples),
        samples=tuple(samples),
        compile_s=compile_s,
    )


# --------------------------------------------------------------------------- memory


def _is_torch_device(device: Any) -> bool:
    if device is None or "torch" not in sys.modules:
        return False
    import torch

    return isinstance(device, torch.device) or (
        isinstance(device, str) and device.split(":")[0] in ("cuda", "cpu", "mps")
    )


def peak_memory_bytes(device: Any = None) -> int | None:
    """Peak device memory in use so far (bytes), or ``None`` where it is not tracked.

    * A ``torch.device`` (or ``"cuda"``/``"cuda:0"``/``"cpu"``): on CUDA,
      ``torch.cuda.max_memory_allocated(device)`` (reset it with
      :func:`reset_peak_memory` before the measured work); on CPU ``None``.
    * A JAX device, or ``None`` (= ``jax.devices()[0]``):
      ``device.memory_stats()["peak_bytes_in_use"]`` where the backend reports
      it (GPU/TPU). The CPU backend has no ``memory_stats`` so this is ``None``
      there — use :func:`compiled_memory_bytes` for an analytic, backend-
      independent figure instead. JAX peaks cannot be reset: they are peaks over
      the process lifetime, so measure one configuration per process if the
      number matters.
    """
    if _is_torch_device(device):
        import torch

        dev = torch.device(device)
        if dev.type == "cuda" and torch.cuda.is_available():
            return int(torch.cuda.max_memory_allocated(dev))
        return None

    import jax

    dev = device if device is not None else jax.devices()[0]
    stats_fn = getattr(dev, "memory_stats", None)
    stats = stats_fn() if stats_fn is not None else None
    if not stats or "peak_bytes_in_use" not in stats:
        return None
    return int(stats["peak_bytes_in_use"])


def reset_peak_memory(device: Any = None) -> None:
    """Resets the PyTorch CUDA peak-memory counter; a no-op otherwise (see above)."""
    if _is_torch_device(device):
        import torch

        dev = torch.device(device)
        if dev.type == "cuda" and torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats(dev)


def compiled_memory_stats(jitted_fn: Callable, *args: Any, **kwargs: Any) -> dict[str, int]:
    """XLA's static memory analysis of ``jitted_fn(*args, **kwargs)``, on any backend.

    Lowers and compiles (without running) and returns the sizes XLA planned:
    ``temp`` (intermediates live during execution — the part that grows with,
    e.g., the number of differentiated inner steps), ``argument``, ``output``,
    ``alias`` (outputs sharing argument buffers through donation),
    ``generated_code`` and ``total = temp + argument + output - alias``.

    ``jitted_fn`` must be a ``jax.jit``-wrapped function; arguments may be
    arrays or ``jax.ShapeDtypeStruct``.
    """
    compiled = jitted_fn.lower(*args, **kwargs).compile()
    m = compiled.memory_analysis()
    if m is None:  # some backends / old versions do not implement the analysis
        raise NotImplementedError("this backend returns no memory_analysis()")
    out = {
        "temp": int(m.temp_size_in_bytes),
        "argument": int(m.argument_size_in_bytes),
        "output": int(m.output_size_in_bytes),
        "alias": int(m.alias_size_in_bytes),
        "generated_code": int(m.generated_code_size_in_bytes),
    }
    out["total"] = out["temp"] + out["argument"] + out["output"] - out["alias"]
    return out


def compiled_memory_bytes(jitted_fn: Callable, *args: Any, **kwargs: Any) -> int:
    """Temporary (scratch) bytes XLA allocates for one call of ``jitted_fn``.

    Works on CPU too (nothing is executed), which is what lets memory-vs-inner-
    steps curves be drawn without a GPU. See :func:`compiled_memory_stats`.
    """
    return compiled_memory_stats(jitted_fn, *args, **kwargs)["temp"]


# --------------------------------------------------------------------------- rows


@dataclasses.dataclass
class Row:
    """One benchmark result.

    Attributes:
      bench: benchmark name, e.g. ``"meta_step"``.
      impl: implementation name, e.g. ``"jax"``, ``"torch.func+vmap"``.
      median, min, max: the measurement in ``unit``.
      unit: ``"s/step"``, ``"s/epoch"``, ``"steps/s"``, ``"images/s"``, ...
        (units in :data:`RATE_UNITS` are rates: higher is better).
      ratio: ``reference_time / impl_time`` (>1 = faster than the reference);
        ``None`` until :func:`add_ratios` fills it in.
      reference: the ``impl`` name the ratio is relative to.
      extra: anything else (peak/compiled memory bytes, compile_s, sizes, ...).
        The keys ``peak_memory_bytes`` and ``compiled_temp_bytes`` are shown in
        the table's memory column.
    """

    bench: str
    impl: str
    median: float
    min: float
    max: float
    unit: str = "s/step"
    ratio: float | None = None
    reference: str | None = None
    extra: dict[str, Any] = dataclasses.field(default_factory=dict)

    @classmethod
    def from_timing(
        cls,
        bench: str,
        impl: str,
        timing: Timing,
        *,
        unit: str = "s/step",
        items_per_call: float | None = None,
        extra: Mapping[str, Any] | None = None,
    ) -> "Row":
        """Builds a row from a :class:`Timing`.

        For a duration unit the seconds per call are divided by
        ``items_per_call`` (default 1), e.g. one call = one epoch of 10 steps
        with ``unit="s/step", items_per_call=10``. For a rate unit the value is
        ``items_per_call / seconds`` (so ``min`` comes from the slowest call).
        ``compile_s`` and the raw samples are kept in ``extra``.
        """
        n = 1.0 if items_per_call is None else float(items_per_call)
        if unit in RATE_UNITS:
            med, lo, hi = n / timing.median, n / timing.max, n / timing.min
        else:
            med, lo, hi = timing.median / n, timing.min / n, timing.max / n
        ex = {"compile_s": timing.compile_s, "samples_s": list(timing.samples)}
        if items_per_call is not None:
            ex["items_per_call"] = items_per_call
        ex.update(extra or {})
        return cls(bench=bench, impl=impl, median=med, min=lo, max=hi, unit=unit, extra=ex)


def speed_ratio(row: Row, reference: Row) -> float:
    """``reference_time / row_time`` (>1 = ``row`` is faster), for either unit kind."""
    if (row.unit in RATE_UNITS) != (reference.unit in RATE_UNITS):
        raise ValueError(f"cannot compare units {row.unit!r} and {reference.unit!r}")
    if row.unit in RATE_UNITS:
        return row.median / reference.median
    return reference.median / row.median


def add_ratios(rows: Sequence[Row], reference_impl: str | Mapping[str, str]) -> list[Row]:
    """Fills ``ratio``/``reference`` of every row, bench by bench, in place.

    Args:
      rows: results, possibly of several benches.
      reference_impl: the reference ``impl`` name, or a ``{bench: impl}`` map.
        Benches without a reference row keep ``ratio=None``.
    Returns:
      ``rows`` as a list, for chaining.
    """
    refs: dict[str, Row] = {}
    for r in rows:
        ref_name = reference_impl if isinstance(reference_impl, str) else reference_impl.get(r.bench)
        if r.impl == ref_name:
            refs[r.bench] = r
    for r in rows:
        if r.bench in refs:
            r.ratio = speed_ratio(r, refs[r.bench])
            r.reference = refs[r.bench].impl
    return list(rows)


# --------------------------------------------------------------------------- reports


def _fmt_num(x: float | None) -> str:
    if x is None:
        return "-"
    if x == 0:
        return "0"
    if abs(x) >= 1000:
        return f"{x:,.0f}"
    if abs(x) >= 1:
        return f"{x:.3g}" if abs(x) < 100 else f"{x:.0f}"
    return f"{x:.3g}"


def format_bytes(n: int | None) -> str:
    """Human-readable binary size, ``"-"`` for ``None``."""
    if n is None:
        return "-"
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(size) < 1024 or unit == "GiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{size:.1f} GiB"  # unreachable, keeps type checkers happy


def _memory_cell(extra: Mapping[str, Any]) -> str:
    parts = []
    if extra.get("peak_memory_bytes") is not None:
        parts.append(f"peak {format_bytes(extra['peak_memory_bytes'])}")
    if extra.get("compiled_temp_bytes") is not None:
        parts.append(f"temp {format_bytes(extra['compiled_temp_bytes'])}")
    return ", ".join(parts) or "-"


def format_table(rows: Iterable[Row]) -> str:
    """A Markdown table: bench | impl | median | min-max | unit | ratio vs reference | memory."""
    header = ["bench", "impl", "median", "min-max", "unit", "ratio vs reference", "memory"]
    body = []
    for r in rows:
        ratio = "-" if r.ratio is None else f"{r.ratio:.2f}x vs {r.reference}"
        body.append([
            r.bench, r.impl, _fmt_num(r.median), f"{_fmt_num(r.min)}-{_fmt_num(r.max)}",
            r.unit, ratio, _memory_cell(r.extra),
        ])
    widths = [max(len(h), *(len(b[i]) for b in body)) if body else len(h) for i, h in enumerate(header)]
    line = lambda cells: "| " + " | ".join(c.ljust(w) for c, w in zip(cells, widths)) + " |"
    sep = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    return "\n".join([line(header), sep, *(line(b) for b in body)])


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for ln in f:
                if ln.lower().startswith("model name"):
                    return ln.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_info(device_label: str | None = None) -> dict[str, Any]:
    """Where and how the numbers were taken: CPU, core count, framework versions,
    JAX backend and device kind, GPU name for PyTorch, command line, UTC date.

    ``device_label`` is a free-form description (e.g. ``"1x H100 80GB"``);
    by default it is built from the JAX device kind and count.
    """
    info: dict[str, Any] = {
        "date_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join([os.path.basename(sys.executable), *sys.argv]),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu_model": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "numpy_version": np.__version__,
    }
    try:
        import jax

        devs = jax.devices()
        info.update(
            jax_version=jax.__version__,
            jax_backend=jax.default_backend(),
            jax_device_kind=devs[0].device_kind,
            jax_device_count=len(devs),
        )
    except Exception as e:  # noqa: BLE001 - record, never fail a report on metadata
        info["jax_error"] = repr(e)
    try:
        import torch

        info["torch_version"] = torch.__version__
        info["torch_num_threads"] = torch.get_num_threads()
        if torch.cuda.is_available():
            info["torch_cuda_device"] = torch.cuda.get_device_name(0)
    except ImportError:
        info["torch_version"] = None
    if device_label is None:
        kind = info.get("jax_device_kind", "?")
        n = info.get("jax_device_count", 1)
        device_label = f"{n}x {kind}" if info.get("jax_backend") != "cpu" else (
            f"CPU: {info['cpu_model']} ({info['cpu_count']} cores)")
    info["device_label"] = device_label
    return info


def _jsonable(x: Any) -> Any:
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, (np.generic,)):
        return x.item()
    if isinstance(x, np.ndarray):
        return x.tolist()
    if isinstance(x, float) and not np.isfinite(x):
        return None  # strict JSON has no NaN/Inf
    if isinstance(x, (str, int, float, bool)) or x is None:
        return x
    return repr(x)


def write_json(rows: Iterable[Row], path: str | os.PathLike, meta: Mapping[str, Any] | None = None) -> dict:
    """Writes ``{"meta": machine_info() | meta, "rows": [...]}`` to ``path``.

    Caller-supplied ``meta`` entries override the automatic ones (e.g. pass
    ``{"device_label": "...", "quick": True}``). Parent folders are created.
    Returns the written object.
    """
    info = machine_info((meta or {}).get("device_label"))
    info.update(meta or {})
    obj = {"meta": info, "rows": [dataclasses.asdict(r) for r in rows]}
    obj = _jsonable(obj)
    path = os.fspath(path)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump(obj, f, indent=2)
        f.write("\n")
    return obj


def read_json(path: str | os.PathLike) -> tuple[list[Row], dict]:
    """Inverse of :func:`write_json`: ``(rows, meta)``."""
    with open(path) as f:
        obj = json.load(f)
    return [Row(**r) for r in obj["rows"]], obj["meta"]


# --------------------------------------------------------------------------- data


def synthetic_cifar(key_or_seed: Any, n: int, num_classes: int = 10) -> tuple[np.ndarray, np.ndarray]:
    """Random CIFAR-shaped data for timing only (never present it as real data).

    Returns ``(uint8[n, 32, 32, 3], int32[n])``: pixels uniform in 0..255 and
    labels uniform in ``0..num_classes-1``. Random (not constant) inputs keep
    activations, ReLU masks and max-pool argmaxes realistic, so kernels do the
    same work they do on real images.

    Args:
      key_or_seed: an ``int`` seed or a JAX PRNG key (its key data seeds numpy).
    """
    if isinstance(key_or_seed, (int, np.integer)):
        seed: Any = int(key_or_seed)
    else:  # a JAX key (typed or raw uint32): derive a numpy seed from its bits
        import jax

        data = key_or_seed
        if jax.dtypes.issubdtype(getattr(data, "dtype", None), jax.dtypes.prng_key):
            data = jax.random.key_data(data)
        seed = [int(v) for v in np.asarray(data).ravel()]
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, size=(n, 32, 32, 3), dtype=np.uint8)
    labels = rng.integers(0, num_classes, size=(n,), dtype=np.int32)
    return images, labels
