"""experiments.compare's report parts (table per budget, search curves, figures) on
hand-built sweep results: no training, instant."""
from __future__ import annotations

import dataclasses

import numpy as np

from experiments import compare
from trm_jax import attacks
from trm_jax.attacks import result as R

LRS = (0.01, 0.1)
DATA = ("5", "all")


def _sweep(level: float, names=("linear_probe", "reinit_top3"), seed: int = 0, scratch=None):
    """Curves around ``level`` (epochs 2 x max steps 2 = 5 points), 2 seeds, adam."""
    rng = np.random.default_rng(seed)
    acc = np.clip(level + 0.05 * rng.standard_normal((len(names), 1, len(LRS), 2, len(DATA), 5)), 0, 1)
    acc[1:] += 0.05  # the second attack a little stronger
    return R.SweepResult(acc, np.ones(acc.shape[:-1], bool), tuple(names), ("adam",), LRS, DATA, 2,
                         (1, 2), 4, 64, tuple(n != "reinit_top3" for n in names),
                         np.zeros((len(names), 1)), scratch=scratch)


def test_markdown_search_curves_and_figures_per_budget(tmp_path):
    scratch = dataclasses.replace(_sweep(0.8, ("scratch",), seed=99), reuse=(False,))
    table, entries = [], {}
    for i, (method, level) in enumerate((("reference", 0.9), ("skd", 0.4))):
        sweep = _sweep(level, seed=i, scratch=scratch)
        report = attacks.to_json(sweep)
        entries.update({f"{method}/{n}": e for n, e in report["attacks"].items()})
        table.append(compare.row(method, {"mean": 0.95, "std": 0.01}, report, sweep))
    results = {"dataset": "digits", "seeds": [0, 1], "chance": 0.2, "table": table,
               "attacks": entries, "references": {"scratch": attacks.report.scratch_entry(scratch)},
               "failed": {}, "command": "python -m experiments.compare", "wall_seconds": 60.0,
               "evaluation": {"wall_seconds": 30.0, "xla_compilations": 12, "compile_seconds": 9.0},
               "data_provenance": "digits"}
    md = compare.markdown(results)
    for d, s in (("5 per class", "1x"), ("5 per class", "2x"), ("all", "1x"), ("all", "2x")):
        assert f"## Attacker data: {d}; steps: {s}" in md
    # the worst-case cells of a row are ONE attack's numbers: check skd at (all, 2x)
    worst = table[1]["budgets"]["all"]["2x"]["worst"]
    cells = compare._worst_cells(worst)
    assert cells[1] == compare._pm(entries["skd/" + worst["entry"]]["budgets"]["all"]["2x"]["final"])
    assert cells[2] == compare._pm(entries["skd/" + worst["entry"]]["budgets"]["all"]["2x"]["auc"])
    assert " | ".join(cells) in md
    assert table[1]["budgets"]["all"]["2x"]["worst_reuse"]["entry"] == "linear_probe"
    # the search curve's last point is the suite's worst case at that budget
    curve = table[1]["search_curves"]["all"]["2x"]
    assert len(curve) == 2 * len(LRS) and curve[-1] == worst["final"]["mean"]
    assert "## Attacker search" in md and "12 XLA compilations" in md
    compare.figures(lambda name: tmp_path / name, results)
    for name in ("fig3_accuracy_vs_attacker_data.png", "fig4_attacks_skd.png",
                 "fig4_attacks_reference.png", "fig2_attack_curves.png", "fig5_attacker_search.png"):
        assert (tmp_path / name).stat().st_size > 10_000, name


def test_figures_of_a_comparison_of_the_reference_alone(tmp_path):
    """``--methods reference``: the unprotected model gets its own panel in figure 3."""
    scratch = dataclasses.replace(_sweep(0.8, ("scratch",), seed=99), reuse=(False,))
    sweep = _sweep(0.9, scratch=scratch)
    report = attacks.to_json(sweep)
    results = {"dataset": "digits", "seeds": [0, 1], "chance": 0.2,
               "table": [compare.row("reference", {"mean": 0.95, "std": 0.01}, report, sweep)],
               "attacks": {f"reference/{n}": e for n, e in report["attacks"].items()},
               "references": {"scratch": attacks.report.scratch_entry(scratch)}}
    compare.figures(lambda name: tmp_path / name, results)
    assert (tmp_path / "fig3_accuracy_vs_attacker_data.png").stat().st_size > 10_000
