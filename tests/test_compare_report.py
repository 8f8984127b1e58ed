"""experiments.compare's report parts (table per budget, figures) on a hand-built results
dict: no training, instant."""
from __future__ import annotations

import numpy as np

from experiments import compare
from trm_jax import attack, metrics

BUDGETS = attack.Budgets((5, None), (1, 2))
LRS = (0.01, 0.1)


def _entry(level: float, reuse: bool, scratch: dict | None = None, seed: int = 0) -> dict:
    """An entry whose curves sit around ``level`` (epochs 2 x max steps 2 = 4)."""
    rng = np.random.default_rng(seed)
    curves = {d: np.clip(level + 0.05 * rng.standard_normal((len(LRS), 2, 5)), 0, 1)
              for d in ("5", "all")}
    targets = None if scratch is None else {
        d: {s: 0.9 * scratch["budgets"][d][s]["final"]["mean"] for s in ("1x", "2x")}
        for d in curves}
    out = {**metrics.sweep_summary(curves["all"][..., :3], LRS), "optimizer": "adam",
           "reuse": reuse, "curves": curves["all"][..., :3].tolist(),
           "budgets": attack.budget_summaries(curves, LRS, epochs=2, budgets=BUDGETS,
                                              steps_per_epoch=4, targets=targets)}
    return out


def test_markdown_and_figures_per_budget(tmp_path):
    scratch = _entry(0.8, False)
    table, attacks = [], {}
    for i, (method, level) in enumerate((("reference", 0.9), ("skd", 0.4))):
        report = {"attacks": {"linear_probe/adam": _entry(level, True, scratch, i),
                              "reinit_top3/adam": _entry(level + 0.05, False, scratch, i + 7)}}
        report["summary"] = {"budgets": attack.report_budgets(report["attacks"], scratch)}
        attacks.update({f"{method}/{n}": e for n, e in report["attacks"].items()})
        table.append(compare.row(method, {"mean": 0.95, "std": 0.01}, report, scratch))
    results = {"dataset": "digits", "seeds": [0, 1], "chance": 0.2, "table": table,
               "attacks": attacks, "references": {"scratch": scratch}, "failed": {},
               "command": "python -m experiments.compare", "wall_seconds": 60.0,
               "evaluation": {"wall_seconds": 30.0, "xla_compilations": 12, "compile_seconds": 9.0},
               "data_provenance": "digits"}
    md = compare.markdown(results)
    for d, s in (("5 per class", "1x"), ("5 per class", "2x"), ("all", "1x"), ("all", "2x")):
        assert f"## Attacker data: {d}; steps: {s}" in md
    # the worst-case cells of a row are ONE attack's numbers: check skd at (all, 2x)
    worst = table[1]["budgets"]["all"]["2x"]["worst"]
    cells = compare._worst_cells(worst)
    assert cells[1] == compare._pm(attacks["skd/" + worst["entry"]]["budgets"]["all"]["2x"]["final"])
    assert cells[2] == compare._pm(attacks["skd/" + worst["entry"]]["budgets"]["all"]["2x"]["auc"])
    assert " | ".join(cells) in md
    assert table[1]["budgets"]["all"]["2x"]["worst_reuse"]["entry"] == "linear_probe/adam"
    assert "12 XLA compilations" in md
    compare.figures(lambda name: tmp_path / name, results)
    for name in ("fig3_accuracy_vs_attacker_data.png", "fig4_attacks_skd.png",
                 "fig4_attacks_reference.png", "fig2_attack_curves.png"):
        assert (tmp_path / name).stat().st_size > 10_000, name
