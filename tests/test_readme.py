"""The README's code runs as written."""
from __future__ import annotations

import pathlib
import re

import numpy as np

import trm_jax

ROOT = pathlib.Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def block(name: str) -> str:
    match = re.search(rf"<!-- {name}:start -->\s*```\w*\n(.*?)```\s*<!-- {name}:end -->", README,
                      re.DOTALL)
    assert match, f"no {name} block in README.md"
    return match.group(1)


def test_library_example_runs_as_written(digits_data_dir, monkeypatch, capsys):
    monkeypatch.setenv("TFDS_DATA_DIR", digits_data_dir)  # the prepared digits, not ~/
    namespace: dict = {}
    exec(compile(block("library"), "README.md:library", "exec"), namespace)
    protected, result = namespace["protected"], namespace["result"]
    accuracy = np.asarray(protected.metrics["beneficial_test_accuracy"])
    assert accuracy.shape == (2,) and np.all(accuracy > 0.5)
    assert result.attacks == ("linear_probe", "full_finetune")
    assert result.scratch is not None and result.unprotected.attacks == result.attacks
    report = trm_jax.attacks.to_json(result)
    assert "scratch" in report["references"] and "unprotected/linear_probe" in report["references"]
    out = capsys.readouterr().out
    assert "linear_probe" in out and namespace["worst"].attack in out


def test_your_own_model_example_runs_as_written(digits_data_dir, monkeypatch, capsys):
    monkeypatch.setenv("TFDS_DATA_DIR", digits_data_dir)
    namespace: dict = {}
    exec(compile(block("byo"), "README.md:byo", "exec"), namespace)
    result = namespace["result"]
    assert result.attacks == ("linear_probe", "reinit_penultimate", "full_finetune")
    assert namespace["model"].feature_layers == (("hidden",), ("penultimate",))
    assert np.asarray(namespace["protected"].metrics["beneficial_test_accuracy"]).mean() > 0.8
    assert "reinit_penultimate" in capsys.readouterr().out


RESULTS = ROOT / "experiments" / "results" / "digits"


def quickstart_claim(results: dict) -> str:
    """The quick-start sentence of README.md, written from a reverse_maml results.json."""
    pm = lambda s: f"{s['mean']:.3f} ± {s['std']:.3f}"
    return (f"beneficial test accuracy {pm(results['beneficial_test_accuracy'])}, linear-probe "
            f"malicious accuracy {pm(results['attacks']['linear_probe']['final'])} (unprotected "
            f"{pm(results['references']['unprotected/linear_probe']['final'])})")


def test_quickstart_numbers_are_the_committed_run():
    import json

    results = json.loads((RESULTS / "quickstart.json").read_text())
    assert results["experiment"] == "reverse_maml" and len(results["seeds"]) == 3
    assert quickstart_claim(results) in " ".join(README.split()), quickstart_claim(results)


def test_results_table_is_the_committed_comparison():
    import json

    from experiments import compare

    results = json.loads((RESULTS / "results.json").read_text())
    rows = [ln for ln in compare.markdown(results).splitlines() if ln.startswith("| ")]
    assert len(rows) >= 2 + len(results["table"])
    for row in rows:
        assert row in README, row


def test_simulated_attack_tables_are_the_committed_search():
    import json

    from experiments import simulated_attack_search as search

    results = json.loads((RESULTS / "simulated_attack_search" / "results.json").read_text())
    rows = [ln for ln in search.markdown(results).splitlines() if ln.startswith("| ")]
    assert len(rows) == 2 + 2 + len(results["search"]) + len(results["test"])  # headers, references
    for row in rows:
        assert row in README, row
    assert f"Pick: `{results['pick']}`" in README
