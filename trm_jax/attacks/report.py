"""The edge: a :class:`~trm_jax.attacks.result.SweepResult` as the ``results.json`` report.

Written once, here: ``{"attacks": {name: entry}, "references": {"scratch": entry,
"unprotected/<name>": entry, ...}, "summary": {"worst_case", "relative_to_scratch",
"budgets"}}`` with entries in the shape of DESIGN.md (``curves[lr][seed][epoch]``, the
metrics of :mod:`trm_jax.metrics` at the headline budget, and ``budgets``: every
budget's numbers). The budget summaries are :func:`~trm_jax.attacks.result.budget_table`.
"""
from __future__ import annotations

from typing import Any, Mapping

import numpy as np

from trm_jax import metrics
from trm_jax.attacks import result as R
from trm_jax.attacks.suite import entry_name

#: ``{"attacks": {name: entry}, "references": {...}, "summary": {...}}`` (DESIGN.md).
Report = dict[str, Any]


def headline(result: R.SweepResult) -> tuple[str, str]:
    """The budget of an entry's top-level numbers: the most data (``"all"`` if run) and the
    fewest steps."""
    data = "all" if "all" in result.data else max(result.data, key=int)
    return data, f"{min(result.steps_multipliers)}x"


def _per_budget(result: R.SweepResult, curves: np.ndarray, lrs: list[float],
                targets: Mapping[str, Mapping[str, float]] | None) -> dict[str, Any]:
    """``{data: {"<m>x": summary, "curve": [S][E_max+1] at the longest budget's best lr}}``."""
    out, longest = {}, f"{max(result.steps_multipliers)}x"
    for d, key in enumerate(result.data):
        per = {}
        for m, s in zip(result.steps_multipliers, result.steps_keys):
            e = result.epochs * m
            summary = metrics.sweep_summary(curves[:, :, d, :e + 1], lrs,
                                            steps_per_epoch=result.steps_per_epoch,
                                            target=None if targets is None else targets[key][s])
            summary["per_lr"] = [{"learning_rate": p["learning_rate"], "final": p["final"]["mean"],
                                  "auc": p["auc"]["mean"]} for p in summary["per_lr"]]
            per[s] = {"steps": e * result.steps_per_epoch, "epochs": e, **summary}
        out[key] = {**per, "curve": curves[per[longest]["best_lr_index"], :, d].tolist()}
    return out


def entry(result: R.SweepResult, attack: str, optimizer: str,
          scratch: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """One (attack, optimizer) of ``result`` as a ``results.json`` entry (its run lrs only)."""
    a, o = result.index("attack", attack), result.index("optimizer", optimizer)
    cols = np.flatnonzero(result.ran[a, o])
    lrs = [result.learning_rates[i] for i in cols]
    curves = result.accuracy[a, o, cols]  # [L, S, D, E_max+1]
    d, s = headline(result)
    di, e = result.index("data", d), result.epochs * int(s[:-1])
    head = curves[:, :, di, :e + 1]
    # scratch IS full_finetune on random models: its per-optimizer entries say so
    out = {"attack": "full_finetune" if attack == "scratch" else attack, "optimizer": optimizer,
           "learning_rates": [float(lr) for lr in lrs], "epochs": e,
           "batch_size": result.batch_size, "steps_per_epoch": result.steps_per_epoch,
           "curves": head.tolist(), "finite": result.finite[a, o, cols, :, di].tolist(),
           **metrics.sweep_summary(head, lrs, steps_per_epoch=result.steps_per_epoch,
                                   target=None if scratch is None else scratch["final"]["mean"])}
    if scratch is not None:
        out["relative_to_scratch"] = metrics.relative_to_scratch(out, scratch)
    targets = None if scratch is None else {
        dk: {sk: R.SCRATCH_FRACTION * b["final"]["mean"] for sk, b in per.items() if sk != "curve"}
        for dk, per in scratch["budgets"].items()}
    out["budgets"] = _per_budget(result, curves, lrs, targets)
    out["data_per_class"] = list(result.data)
    out["steps_multipliers"] = list(result.steps_multipliers)
    out["reuse"] = result.reuse[a]
    return out


def scratch_entry(scratch: R.SweepResult) -> dict[str, Any]:
    """The scratch reference's entry: the headline of its best optimizer, and at every
    budget the best (optimizer, lr) for the attacker, tagged with its ``optimizer``."""
    per_opt = [entry(scratch, "scratch", o) for o in scratch.optimizers]
    out = dict(per_opt[metrics.best_over(per_opt)])
    budgets = {}
    for d in scratch.data:
        per = {}
        for s in scratch.steps_keys:
            i = metrics.best_over([b["budgets"][d][s] for b in per_opt])
            per[s] = {**per_opt[i]["budgets"][d][s], "optimizer": scratch.optimizers[i]}
        longest = f"{max(scratch.steps_multipliers)}x"
        per["curve"] = per_opt[metrics.best_over([b["budgets"][d][longest] for b in per_opt])][
            "budgets"][d]["curve"]
        budgets[d] = per
    out["budgets"] = budgets
    out["optimizers"] = list(scratch.optimizers)
    out["wall_seconds"] = float(scratch.wall_seconds.sum())
    return {**out, "attack": "scratch", "reuse": False}


def entries(result: R.SweepResult, scratch: Mapping[str, Any] | None, prefix: str = ""
            ) -> dict[str, dict[str, Any]]:
    """Every (attack, optimizer) that ran, in plan order, named ``prefix + entry name``."""
    out = {}
    for a, attack in enumerate(result.attacks):
        for o, optimizer in enumerate(result.optimizers):
            if not result.ran[a, o].any():
                continue
            name = entry_name(result, attack, optimizer)
            out[prefix + name] = {**entry(result, attack, optimizer, scratch), "attack_name": name,
                                  "wall_seconds": float(result.wall_seconds[a, o])}
    return out


def _choice_json(result: R.SweepResult, choice: R.Choice, adv: tuple[float, float],
                 steps: tuple[float, float], target: float, prefix: str) -> dict[str, Any]:
    name = prefix + entry_name(result, choice.attack, choice.optimizer)
    ms = lambda v: {"mean": float(v.mean()), "std": float(v.std())}
    return {"attack": name, "optimizer": choice.optimizer, "learning_rate": choice.learning_rate,
            "final": ms(choice.final), "auc": ms(choice.auc), "advantage_auc": adv[0],
            "advantage_final": adv[1],
            "steps_to_90": {"mean": steps[0], "reached": steps[1], "target": target},
            "entry": name}


def budgets_json(result: R.SweepResult, prefix: str = "") -> dict[str, Any]:
    """``{data: {"<m>x": {"scratch", "worst", "worst_reuse"[, "unprotected"]}}}`` from
    :func:`~trm_jax.attacks.result.budget_table` (and the unprotected reference's)."""
    unprotected = ({(r.data, r.steps): r for r in R.budget_table(result.unprotected)}
                   if result.unprotected is not None else {})
    out: dict[str, Any] = {}
    for row in R.budget_table(result):
        target = R.SCRATCH_FRACTION * float(row.scratch.final.mean())
        b = {"scratch": {"final": {"mean": float(row.scratch.final.mean()),
                                   "std": float(row.scratch.final.std())},
                         "auc": {"mean": float(row.scratch.auc.mean()),
                                 "std": float(row.scratch.auc.std())},
                         "optimizer": row.scratch.optimizer,
                         "learning_rate": row.scratch.learning_rate},
             "worst": _choice_json(result, row.worst, row.worst_advantage, row.worst_steps_to_90,
                                   target, prefix),
             "worst_reuse": None if row.worst_reuse is None else _choice_json(
                 result, row.worst_reuse, row.reuse_advantage, row.reuse_steps_to_90, target, prefix)}
        u = unprotected.get((row.data, row.steps))
        if u is not None:
            b["unprotected"] = {
                "worst": _choice_json(result.unprotected, u.worst, u.worst_advantage,
                                      u.worst_steps_to_90, target, "unprotected/"),
                "worst_reuse": None if u.worst_reuse is None else _choice_json(
                    result.unprotected, u.worst_reuse, u.reuse_advantage, u.reuse_steps_to_90,
                    target, "unprotected/")}
        out.setdefault(row.data, {})[row.steps] = b
    return out


def to_json(result: R.SweepResult) -> Report:
    """The report of ``result`` (the ``results.json`` shape of DESIGN.md)."""
    references: dict[str, Any] = {}
    scratch = None
    if result.scratch is not None:
        scratch = references["scratch"] = scratch_entry(result.scratch)
    attacks = entries(result, scratch)
    if result.unprotected is not None:
        references.update(entries(result.unprotected, scratch, "unprotected/"))
    summary: dict[str, Any] = {"worst_case": metrics.worst_case(attacks)}
    if scratch is not None:
        summary["relative_to_scratch"] = {n: e["relative_to_scratch"] for n, e in attacks.items()}
        summary["budgets"] = budgets_json(result)
        summary["search_curves"] = search_curves_json(result)
    return {"attacks": attacks, "references": references, "summary": summary}


def search_curves_json(result: R.SweepResult) -> dict[str, Any]:
    """``{data: {"<m>x": [expected best after n trials, n = 1..N]}}`` (:func:`~trm_jax.attacks.result.search_curve`)."""
    return {d: {s: R.search_curve(result, d, s).tolist() for s in result.steps_keys}
            for d in result.data}
