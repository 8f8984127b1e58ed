"""The compile counter and the persistent compilation cache (trm_jax.compilation)."""
from __future__ import annotations

import functools
import json
import os
import pathlib
import subprocess
import sys
import threading
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax._src import monitoring as jax_monitoring

from trm_jax import compilation

ROOT = pathlib.Path(__file__).resolve().parents[1]
CACHE_FLAGS = ("jax_compilation_cache_dir", "jax_persistent_cache_min_compile_time_secs",
               "jax_persistent_cache_min_entry_size_bytes", "jax_enable_compilation_cache")


def fresh_functions(salt: float):
    """Two jitted functions no other test compiles (``salt`` is baked in as a constant)."""
    f = jax.jit(lambda x: jnp.sin(x) * salt + 1.0)
    g = jax.jit(lambda x: jnp.cos(x) @ x.T - salt)
    return f, g


@pytest.fixture
def x():
    return jax.device_put(np.ones((3, 3), np.float32))  # made before any counter starts


def test_counts_each_distinct_program_once(x):
    f, g = fresh_functions(1.25)
    with compilation.count_compilations() as stats:
        f(x).block_until_ready()
        g(x).block_until_ready()
    assert stats.total.compilations == 2
    assert stats.total.backend_seconds > 0 and stats.total.lower_seconds > 0
    assert stats.total.compile_seconds == pytest.approx(
        stats.total.trace_seconds + stats.total.lower_seconds + stats.total.backend_seconds)
    with compilation.count_compilations() as again:
        f(x).block_until_ready()
        g(x).block_until_ready()
    assert again.total.compilations == 0 and again.total.compile_seconds == 0.0


def test_new_shape_is_a_new_compilation(x):
    f, _ = fresh_functions(1.5)
    y = jax.device_put(np.ones((2, 3), np.float32))
    with compilation.count_compilations() as stats:
        f(x).block_until_ready()
        f(y).block_until_ready()
    assert stats.total.compilations == 2
    assert stats.recompiled() == {"jit(<lambda>)": 2}


def test_phases_split_nest_and_accumulate(x):
    f, g = fresh_functions(1.75)
    h = jax.jit(lambda x: x * 3.5)
    with compilation.count_compilations() as stats:
        with stats.phase("train"):
            f(x).block_until_ready()
        with stats.phase("attack"):
            g(x).block_until_ready()
            with stats.phase("sweep"):
                h(x).block_until_ready()
        with stats.phase("train"):
            f(x).block_until_ready()  # cached in memory: nothing more
    counts = {name: s.compilations for name, s in stats.phases.items()}
    assert counts == {"train": 1, "attack": 2, "attack/sweep": 1}
    assert stats.total.compilations == 3
    d = stats.as_dict()
    assert d["compilations"] == 3 and set(d["phases"]) == {"train", "attack", "attack/sweep"}
    phases = d["phases"]
    assert phases["attack"]["compile_seconds"] >= phases["attack/sweep"]["compile_seconds"]
    assert 0 < phases["train"]["wall_seconds"] and d["wall_seconds"] > 0
    json.dumps(d)  # results.json-ready


def test_overlapping_counters_and_no_leak(x):
    f, g = fresh_functions(2.25)
    outer = compilation.count_compilations()
    with outer:
        f(x).block_until_ready()
        with compilation.count_compilations() as inner:
            g(x).block_until_ready()
    assert (outer.total.compilations, inner.total.compilations) == (2, 1)
    # Nothing stays registered with jax, and a finished counter no longer changes.
    assert compilation._route_event not in jax_monitoring.get_event_listeners()
    assert compilation._route_duration not in jax_monitoring.get_event_duration_listeners()
    jax.jit(lambda x: x - 2.25)(x).block_until_ready()
    assert outer.total.compilations == 2


def test_counts_compilations_from_other_threads(x):
    f, _ = fresh_functions(2.5)
    with compilation.count_compilations() as stats:
        t = threading.Thread(target=lambda: f(x).block_until_ready())
        t.start()
        t.join()
    assert stats.total.compilations == 1


def test_phases_in_parallel_threads_count_apart(x):
    # Two threads, each in its own phase at the same time (compare trains methods in
    # parallel): each phase gets its own program; a pool worker started through
    # in_current_context counts for the phase that started it; a bare thread for none.
    f, g = fresh_functions(2.75)
    h, k = jax.jit(lambda x: x * 4.25), jax.jit(lambda x: x - 4.25)
    both_open = threading.Barrier(2)

    with compilation.count_compilations() as stats:
        def method(name, fn, worker_fn):
            with stats.phase(name):
                both_open.wait()  # the two phases are open together
                fn(x).block_until_ready()
                worker = threading.Thread(target=compilation.in_current_context(
                    lambda: worker_fn(x).block_until_ready()))
                worker.start()
                worker.join()

        threads = [threading.Thread(target=compilation.in_current_context(method), args=a)
                   for a in (("a", f, h), ("b", g, k))]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        with stats.phase("c"):
            bare = threading.Thread(target=lambda: jax.jit(lambda x: x / 4.25)(x).block_until_ready())
            bare.start()
            bare.join()
    counts = {name: s.compilations for name, s in stats.phases.items()}
    assert counts == {"a": 2, "b": 2, "c": 0}
    assert stats.total.compilations == 5


@pytest.fixture
def cache_config(monkeypatch, tmp_path):
    """Restores jax's cache flags; clears the env vars that would configure them."""
    for name in (compilation.NO_CACHE_ENV, compilation.CACHE_DIR_ENV, "XDG_CACHE_HOME",
                 "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS",
                 "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES"):
        monkeypatch.delenv(name, raising=False)
    saved = {name: getattr(jax.config, name) for name in CACHE_FLAGS}
    jax.config.update("jax_compilation_cache_dir", None)
    yield tmp_path
    for name, value in saved.items():
        jax.config.update(name, value)


def test_enable_sets_folder_and_thresholds_idempotently(cache_config, monkeypatch):
    # No compilation happens in this test: jax initialises its cache on the first compile.
    monkeypatch.setenv(compilation.CACHE_DIR_ENV, str(cache_config / "c"))
    assert compilation.default_cache_dir() == cache_config / "c"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        folder = compilation.enable_persistent_cache()
        assert compilation.enable_persistent_cache() == folder
    assert folder == cache_config / "c" and folder.is_dir()
    assert jax.config.jax_compilation_cache_dir == str(folder)
    assert jax.config.jax_persistent_cache_min_compile_time_secs == 0.0
    assert jax.config.jax_persistent_cache_min_entry_size_bytes == -1


def test_enable_keeps_a_folder_the_user_configured(cache_config):
    jax.config.update("jax_compilation_cache_dir", str(cache_config / "users"))
    assert compilation.enable_persistent_cache() == cache_config / "users"
    with pytest.warns(UserWarning, match="keeping that one"):
        assert compilation.enable_persistent_cache(cache_config / "mine") == cache_config / "users"
    assert not (cache_config / "mine").exists()


def test_enable_opt_outs(cache_config, monkeypatch):
    monkeypatch.setenv(compilation.NO_CACHE_ENV, "1")
    assert compilation.enable_persistent_cache(cache_config) is None
    monkeypatch.setenv(compilation.NO_CACHE_ENV, "0")
    jax.config.update("jax_enable_compilation_cache", False)
    assert compilation.enable_persistent_cache(cache_config) is None
    assert jax.config.jax_compilation_cache_dir is None


def test_default_cache_dir_follows_xdg(monkeypatch, tmp_path):
    monkeypatch.delenv(compilation.CACHE_DIR_ENV, raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert compilation.default_cache_dir() == tmp_path / "trm_jax" / "jax"
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert compilation.default_cache_dir() == pathlib.Path.home() / ".cache" / "trm_jax" / "jax"


CHILD = """
import json, jax, jax.numpy as jnp
from trm_jax import compilation
folder = compilation.enable_persistent_cache()
with compilation.count_compilations() as stats:
    jax.jit(lambda x: jnp.tanh(x) @ x.T + 0.5)(jnp.ones((8, 8))).block_until_ready()
print(json.dumps({"folder": str(folder), **stats.as_dict()}))
"""


def test_second_process_loads_every_program_from_the_cache(tmp_path):
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("JAX_COMPILATION_CACHE", "JAX_PERSISTENT_CACHE", "TRM_JAX_"))}
    env.update(PYTHONPATH=str(ROOT), JAX_PLATFORMS="cpu", TRM_JAX_CACHE_DIR=str(tmp_path / "cache"))

    def child() -> dict:
        out = subprocess.run([sys.executable, "-c", CHILD], env=env, cwd=tmp_path, check=True,
                             capture_output=True, text=True, timeout=120).stdout
        return json.loads(out.strip().splitlines()[-1])

    cold, warm = child(), child()
    assert cold["folder"] == str(tmp_path / "cache")
    assert cold["compilations"] >= 1 and cold["cache_hits"] == 0
    assert cold["cache_writes"] == cold["compilations"]  # small CPU programs are written too
    assert warm["compilations"] == cold["compilations"]
    assert warm["cache_hits"] == warm["compilations"] and warm["xla_compilations"] == 0
    assert warm["cache_writes"] == 0


BAD_OPTION = {"xla_no_such_option_for_this_test": "1"}


def test_jit_passes_the_options_to_top_level_compiles_only(monkeypatch, x):
    # An option XLA rejects shows where the options go: the top-level call fails to
    # compile, calls made while tracing (jax forbids compiler_options there) do not.
    monkeypatch.setattr(compilation, "compiler_options", lambda: BAD_OPTION)
    f = compilation.jit(lambda v: jnp.sin(v) * 3.5)
    with pytest.raises(Exception, match="xla_no_such_option_for_this_test"):
        f(x)
    expected = np.sin(np.ones((3, 3), np.float32)) * 3.5
    np.testing.assert_allclose(jax.jit(lambda v: f(v) + 1)(x), expected + 1, rtol=1e-6)
    np.testing.assert_allclose(jax.vmap(f)(x), expected, rtol=1e-6)
    constant = np.ones((3, 3), np.float32)  # no tracer among the arguments, still inside a trace
    np.testing.assert_allclose(jax.jit(lambda v: f(constant) + v)(x), expected + 1, rtol=1e-6)
    np.testing.assert_allclose(jax.grad(lambda v: f(v).sum())(x), 3.5 * np.cos(1.0) * np.ones((3, 3)),
                               rtol=1e-6)
    with pytest.raises(Exception, match="xla_no_such_option_for_this_test"):
        f.lower(x).compile()


def test_jit_keeps_jax_jit_arguments_and_gives_its_numbers(x):
    f = functools.partial(compilation.jit, static_argnums=1)(lambda v, n: jnp.tanh(v) ** n @ v)
    plain = jax.jit(lambda v, n: jnp.tanh(v) ** n @ v, static_argnums=1)
    np.testing.assert_array_equal(f(x, 3), plain(x, 3))
    assert f.__name__ == "<lambda>" and "compilation.jit" in repr(f)


@pytest.fixture
def cpu_options(monkeypatch):
    """Lets a test edit CPU_COMPILER_OPTIONS; the probe's cache is cleared before and after."""
    compilation.compiler_options.cache_clear()
    yield lambda options: monkeypatch.setattr(compilation, "CPU_COMPILER_OPTIONS", options)
    monkeypatch.undo()
    compilation.compiler_options.cache_clear()


def test_compiler_options_are_probed_once_and_fall_back_to_xla_defaults(cpu_options):
    assert compilation.compiler_options("cpu") == {"xla_backend_optimization_level": 2}
    cpu_options(BAD_OPTION)
    assert compilation.compiler_options("cpu") == {"xla_backend_optimization_level": 2}  # cached
    compilation.compiler_options.cache_clear()
    with pytest.warns(UserWarning, match="xla_no_such_option_for_this_test.*XLA's defaults"):
        assert compilation.compiler_options("cpu") is None
    cpu_options({})
    compilation.compiler_options.cache_clear()
    assert compilation.compiler_options("cpu") is None
