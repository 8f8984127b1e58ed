"""Shared fixtures: the offline digits protocol, prepared once per test session."""
from __future__ import annotations

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
# The persistent compilation cache stays off in tests (test_compilation turns it on in
# its own subprocesses and temporary folders): tests never write to ~/.cache.
os.environ.setdefault("TRM_JAX_NO_COMPILE_CACHE", "1")

import jax
import pytest

# Catch silent broadcasting bugs (equinox does the same in its test-suite).
jax.config.update("jax_numpy_rank_promotion", "raise")


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
