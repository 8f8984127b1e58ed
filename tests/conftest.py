"""Shared fixtures: the offline digits protocol, prepared once per test session."""
from __future__ import annotations

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
# The library's persistent compilation cache (~/.cache) stays off in tests (test_compilation
# turns it on in its own subprocesses and temporary folders): tests never write to ~/.cache.
# jax's cache runs in a per-session temporary folder instead (session_compilation_cache).
os.environ.setdefault("TRM_JAX_NO_COMPILE_CACHE", "1")

import jax
import pytest

from trm_jax import compilation

# The tests' own programs (reference computations, finite differences, eager ops) compile
# with the XLA options the library's programs use on CPU (LLVM -O2 instead of -O3: the same
# numbers, ~20% less XLA time in a suite run). XLA reads its flags when the backend starts,
# which is after this module is imported; subprocesses inherit them.
os.environ["XLA_FLAGS"] = " ".join([os.environ.get("XLA_FLAGS", ""), *(
    f"--{name}={value}" for name, value in compilation.CPU_COMPILER_OPTIONS.items())]).strip()

# Catch silent broadcasting bugs (equinox does the same in its test-suite).
jax.config.update("jax_numpy_rank_promotion", "raise")

CACHE_FLAGS = ("jax_compilation_cache_dir", "jax_persistent_cache_min_compile_time_secs",
               "jax_persistent_cache_min_entry_size_bytes")


@pytest.fixture(scope="session", autouse=True)
def session_compilation_cache(tmp_path_factory):
    """jax's persistent compilation cache in the session's temporary folder, one folder for
    all xdist workers (set in the test processes only; subprocesses keep their own settings).

    Many tests build the same programs again in new closures (an experiment run, then
    its resume; ``compare`` running the methods the golden runs ran), which jax's
    in-memory cache cannot see; the persistent cache is keyed on the program itself,
    so the second build loads XLA's executable (~ms) instead of compiling it (~s).
    Loaded executables are XLA's own, bit for bit: no test's numbers change.
    Measured once each on 2 busy shared cores: the reverse_maml resume tests 29 -> 20 s and
    24 -> 4 s, the compare-failure test 47 -> 25 s; tests with nothing to reuse pay no
    measurable cost for the cache writes (~1.5 ms per program, measured). Shared by the two
    workers: 350-420 of ~2,600 programs per suite run loaded instead of compiled.
    """
    saved = {name: getattr(jax.config, name) for name in CACHE_FLAGS}
    if os.environ.get("PYTEST_XDIST_WORKER"):
        # One folder for all the session's workers (the parent of each worker's basetemp), so
        # a program one worker compiled loads in the other (jax's cache keys depend on the
        # folder's path: per-worker folders never share). No size limit: with one, jax takes
        # a file lock and rescans the whole folder on every write (minutes over a session).
        # An entry read while the other worker writes it fails to decompress, and jax then
        # warns and compiles instead: never a wrong program.
        folder = tmp_path_factory.getbasetemp().parent / "jax_cache"
        folder.mkdir(exist_ok=True)
    else:
        folder = tmp_path_factory.mktemp("jax_cache")
    jax.config.update("jax_compilation_cache_dir", str(folder))
    # Every program, however small or quick to compile (jax's defaults skip those).
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", -1)
    yield
    for name, value in saved.items():
        jax.config.update(name, value)


@pytest.fixture(scope="session")
def digits_data_dir(tmp_path_factory) -> str:
    """A TFDS data dir with the scikit-learn digits prepared in it (~5 s, once)."""
    from trm_jax import data

    path = str(tmp_path_factory.mktemp("tfds"))
    data.prepare_digits(path)
    return path


@pytest.fixture(scope="session")
def digits_protocol(digits_data_dir):
    """The digits protocol with its preset (pretrain 800 / finetune 497 / test 500)."""
    from trm_jax import data

    return data.load_protocol(data.preset("digits"), data_dir=digits_data_dir)


@pytest.fixture
def interrupt_at(monkeypatch):
    """``with interrupt_at(key, value): ...`` raises KeyboardInterrupt when a run logs
    a metrics record with ``record[key] == value`` (a simulated crash mid-run)."""
    import contextlib

    from trm_jax import runs

    @contextlib.contextmanager
    def patch(key, value):
        original = runs.RunDir.log

        def crash(self, record):
            if record.get(key) == value:
                raise KeyboardInterrupt("simulated interruption")
            original(self, record)

        monkeypatch.setattr(runs.RunDir, "log", crash)
        try:
            yield
        finally:
            monkeypatch.setattr(runs.RunDir, "log", original)

    return patch
