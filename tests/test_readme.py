"""The README's code runs as written."""
from __future__ import annotations

import pathlib
import re

import numpy as np
import pytest

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
    assert "linear_probe" in out and "reference: scratch" in out


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


def test_quickstart_output_is_the_committed_run():
    """What the README says the quick start prints is what that run prints."""
    import json

    from trm_jax import evaluation

    results = json.loads((RESULTS / "quickstart.json").read_text())
    printed = README.split("<!-- quickstart:end -->", 1)[1].split("```text", 1)[1].split("```")[0]
    normal = lambda text: [" ".join(line.split()) for line in text.splitlines() if line.strip()]
    # digits: 5 malicious classes, chance 0.20 (the legend names it)
    table = [line for line in normal(evaluation.summary_table(results, chance=0.2))
             if set(line) - set("- ")]
    assert table and all(line in normal(printed) for line in table), (table, printed)
    pm = lambda s: f"{s['mean']:.4f} +- {s['std']:.4f}"
    for label, summary in (("Reverse-MAML", results["beneficial_test_accuracy"]),
                           ("unprotected reference", results["unprotected_beneficial_test_accuracy"])):
        assert f"{label} beneficial test accuracy: {pm(summary)}" in printed, label


def test_a_newcomer_meets_no_commit_hash_or_internal_name_before_the_quick_start_ends():
    start = README.split("<!-- quickstart:end -->", 1)[1].split("\n## ", 1)[0]
    top = README.split("<!-- quickstart:start -->", 1)[0] + start
    assert not re.findall(r"\b(?=[0-9a-f]*[a-f])(?=[0-9a-f]*[0-9])[0-9a-f]{7,40}\b", top)
    for internal in ("trm_jax.", "conv_impl", "vmap", "jit", "lax.", "Hooks", "issue "):
        assert internal not in top, internal
    assert len(README.encode()) < 12_000, len(README.encode())


def table_rows(results: dict) -> list[str]:
    """A README results table: one row per method at all the attacker's data and 1x steps."""
    pm = lambda s: f"{s['mean']:.3f} ± {s['std']:.3f}"
    rows = []
    for row in results["table"]:
        at = row["budgets"]["all"]["1x"]
        worst, reuse = at["worst"], at["worst_reuse"]
        rows.append(f"| {row['label']} | {pm(row['beneficial'])} | {pm(row['probe_final'])} | "
                    f"{worst['attack']}: {pm(worst['final'])} ({worst['advantage_final']:+.3f}) | "
                    f"{reuse['attack']}: {pm(reuse['final'])} |")
    return rows


def readme_section(heading: str) -> str:
    return README.split(f"### {heading}", 1)[1].split("\n### ", 1)[0].split("\n## ", 1)[0]


@pytest.mark.parametrize("dataset, heading", [("digits", "Digits"), ("mnist5k", "mnist5k")])
def test_results_table_is_the_committed_comparison(dataset, heading):
    import json

    from experiments import compare

    folder = ROOT / "experiments" / "results" / dataset
    results = json.loads((folder / "results.json").read_text())
    assert results["dataset"] == dataset and len(results["seeds"]) == 5 and not results["failed"]
    section = readme_section(heading)
    for row in table_rows(results):
        assert row in section, row
    scratch = results["references"]["scratch"]["budgets"]["all"]["1x"]["final"]
    assert f"scratch reaches {scratch['mean']:.3f} ± {scratch['std']:.3f}" in " ".join(section.split())
    # The full tables: results.md is what compare writes from results.json, and docs show it.
    assert (folder / "results.md").read_text() == compare.markdown(results)
    docs = (ROOT / "docs" / "results.md").read_text()
    assert f"../experiments/results/{dataset}/results.md" in docs
    for figure in ("fig1_beneficial_accuracy", "fig2_attack_curves", "fig3_accuracy_vs_attacker_data"):
        assert (folder / f"{figure}.png").stat().st_size > 0
        assert f"../experiments/results/{dataset}/{figure}.png" in docs, figure


@pytest.mark.parametrize("dataset", ["digits", "mnist5k"])
def test_simulated_attack_tables_are_the_committed_search(dataset):
    import json

    from experiments import simulated_attack_search as search

    folder = RESULTS.parent / dataset / "simulated_attack_search"
    results = json.loads((folder / "results.json").read_text())
    tables = (folder / "results.md").read_text()
    rows = [ln for ln in search.markdown(results).splitlines() if ln.startswith("| ")]
    assert len(rows) == 2 + 2 + len(results["search"]) + len(results["test"])  # headers, references
    for row in rows:
        assert row in tables, row
    assert f"Pick: `{results['pick']}`" in tables
    docs = (ROOT / "docs" / "results.md").read_text()
    assert f"../experiments/results/{dataset}/simulated_attack_search/results.md" in docs


def test_the_attack_suite_table_names_every_attack():
    import trm_jax

    suite = trm_jax.attacks
    table = README.split("## The attack suite", 1)[1].split("\n## ", 1)[0]
    named = re.findall(r"^\| `(\w+)`", table, re.MULTILINE)
    assert named == [*suite.ATTACKS, "scratch"], named
