"""The API reference builds with no warning, and the docstrings' examples run as written."""
from __future__ import annotations

import doctest
import importlib
import os
import pathlib
import pkgutil
import subprocess
import sys
import time

import pytest

import trm_jax

ROOT = pathlib.Path(__file__).resolve().parents[1]
# What the reference must document (the public API), by the names a user imports.
REQUIRED = ["trm_jax.protect", "trm_jax.evaluate", "trm_jax.config_for", "trm_jax.seed_keys",
            "trm_jax.SuiteConfig", "trm_jax.Protected", "trm_jax.methods.reverse_maml.ReverseMAMLConfig",
            "trm_jax.methods.skd.SKDMethodConfig", "trm_jax.methods.unsir.UnsirMethodConfig",
            "trm_jax.meta.MetaConfig", "trm_jax.meta.adapt", "trm_jax.meta.meta_loss",
            "trm_jax.models.lenet", "trm_jax.datasets.DatasetEntry", "trm_jax.datasets.register",
            "trm_jax.hooks.Hooks", "trm_jax.errors.ConfigError"]


def require(module: str):
    """CI installs the docs extra, so a missing Sphinx fails there; elsewhere the test skips."""
    if os.environ.get("CI"):
        return importlib.import_module(module)
    return pytest.importorskip(module, reason="pip install -e '.[docs]'")


def test_api_reference_builds_without_a_warning(tmp_path):
    require("sphinx")
    require("myst_parser")
    out = tmp_path / "html"
    start = time.perf_counter()
    # -W: warnings are errors; -n: every cross-reference must resolve; -E: no cached state.
    run = subprocess.run([sys.executable, "-m", "sphinx", "-E", "-W", "--keep-going", "-n", "-q",
                          "-b", "html", str(ROOT / "docs"), str(out)],
                         cwd=ROOT, capture_output=True, text=True, timeout=600,
                         env={**os.environ, "PYTHONPATH": str(ROOT)})
    seconds = time.perf_counter() - start
    assert run.returncode == 0, (run.stdout[-3000:], run.stderr[-5000:])
    from sphinx.util.inventory import InventoryFile

    with open(out / "objects.inv", "rb") as f:
        inventory = InventoryFile.load(f, "", os.path.join)
    documented = {name for kind, objects in inventory.items() if kind.startswith("py:")
                  and kind != "py:module" for name in objects}
    missing = [name for name in REQUIRED if name not in documented]
    assert not missing, missing
    assert len(documented) >= 300, len(documented)
    print(f"docs: {len(documented)} public objects documented in {seconds:.1f} s")


def public_modules() -> list:
    names = ["trm_jax"] + [m.name for m in pkgutil.walk_packages(trm_jax.__path__, "trm_jax.")
                           if not m.name.rsplit(".", 1)[-1].startswith("_")]
    return [importlib.import_module(name) for name in sorted(names)]


def test_docstring_examples_run_as_written():
    finder, runner = doctest.DocTestFinder(), doctest.DocTestRunner(optionflags=doctest.ELLIPSIS)
    tests = [t for m in public_modules() for t in finder.find(m) if t.examples]
    for test in tests:
        runner.run(test)
    result = runner.summarize(verbose=False)
    assert result.failed == 0, result
    assert result.attempted >= 20 and len(tests) >= 8, result  # the examples exist and ran
    print(f"doctests: {result.attempted} examples in {len(tests)} docstrings")
