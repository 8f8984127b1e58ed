"""Every resistance-metric formula on hand-made curves (pure numpy, instant)."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest

from trm_jax import metrics, runs

# [S=2, E+1=4]: epoch 0 = before fine-tuning.
CURVES = np.array([[0.2, 0.5, 0.8, 0.7],
                   [0.2, 0.4, 0.4, 0.6]])


def test_final_best_auc():
    np.testing.assert_allclose(metrics.final_accuracy(CURVES), [0.7, 0.6])
    np.testing.assert_allclose(metrics.best_accuracy(CURVES), [0.8, 0.6])
    # AUC = mean of the E post-fine-tuning points (epoch 0 excluded).
    np.testing.assert_allclose(metrics.auc(CURVES), [(0.5 + 0.8 + 0.7) / 3, (0.4 + 0.4 + 0.6) / 3])
    # best includes epoch 0: a curve that only gets worse keeps its start.
    np.testing.assert_allclose(metrics.best_accuracy([0.9, 0.3, 0.1]), 0.9)
    # works on any leading shape: [L, S, E+1] -> [L, S]
    assert metrics.auc(np.stack([CURVES, CURVES])).shape == (2, 2)


def test_steps_to_reach_and_never_reached_convention():
    steps = metrics.steps_to_reach(CURVES, target=0.5, steps_per_epoch=4)
    np.testing.assert_array_equal(steps, [4.0, 12.0])  # first epoch with a_e >= target, x 4 steps
    assert metrics.steps_to_reach(CURVES, 0.2, 4).tolist() == [0.0, 0.0]  # reached before fine-tuning
    never = metrics.steps_to_reach(CURVES, 0.75, 4)
    assert never[0] == 8.0 and never[1] == math.inf  # never reached -> inf
    # inf propagates to the seed summary (null in JSON) and `reached` counts the seeds that made it
    summary = metrics.curve_summary(CURVES, steps_per_epoch=4, target=0.75)["steps_to_reach"]
    assert summary["mean"] == math.inf and summary["reached"] == 0.5 and summary["target"] == 0.75
    assert json.loads(json.dumps(runs.to_jsonable(summary)))["mean"] is None


def test_summarize_is_population_std():
    s = metrics.summarize([0.5, 0.7])
    assert s["mean"] == pytest.approx(0.6) and s["std"] == pytest.approx(0.1)
    assert s["per_seed"] == [0.5, 0.7]


def test_sweep_summary_headline_is_the_attackers_best_lr():
    weak = CURVES * 0.5
    sweep = np.stack([weak, CURVES, CURVES])  # [L=3, S, E+1]; lrs 2 and 3 tie
    out = metrics.sweep_summary(sweep, [1e-3, 1e-2, 1e-1], steps_per_epoch=4, target=0.5)
    assert out["best_lr"] == 1e-2 and out["best_lr_index"] == 1  # ties: the first
    assert out["final"]["mean"] == pytest.approx(0.65)
    assert out["auc"] == out["per_lr"][1]["auc"]
    assert [p["learning_rate"] for p in out["per_lr"]] == [1e-3, 1e-2, 1e-1]
    assert out["per_lr"][0]["final"]["mean"] == pytest.approx(0.325)
    assert out["initial"]["mean"] == pytest.approx(0.2)


def test_worst_case_and_relative_to_scratch():
    lo = metrics.sweep_summary(CURVES[None] * 0.5, [0.1])
    hi = metrics.sweep_summary(CURVES[None], [0.01])
    worst = metrics.worst_case({"linear_probe": lo, "full_finetune": hi})
    assert worst["final"]["attack"] == "full_finetune" and worst["final"]["learning_rate"] == 0.01
    assert worst["auc"]["mean"] == hi["auc"]["mean"]

    scratch = metrics.sweep_summary(np.full((1, 2, 4), 0.9), [1e-3])
    rel = metrics.relative_to_scratch(lo, scratch)
    assert rel["auc_ratio"] == pytest.approx(lo["auc"]["mean"] / 0.9)
    assert rel["final_gap"] == pytest.approx(0.325 - 0.9)
    zero = metrics.sweep_summary(np.zeros((1, 2, 4)), [1e-3])
    assert metrics.relative_to_scratch(lo, zero)["auc_ratio"] == math.inf


def test_bad_inputs():
    with pytest.raises(ValueError, match="epoch axis"):
        metrics.auc([0.5])  # epoch 0 only: no fine-tuning epoch
    with pytest.raises(ValueError, match="steps_per_epoch"):
        metrics.steps_to_reach(CURVES, 0.5, 0)
    with pytest.raises(ValueError, match="target"):
        metrics.steps_to_reach(CURVES, float("nan"), 4)
    with pytest.raises(ValueError, match=r"\[L=2, S, E\+1\]"):
        metrics.sweep_summary(CURVES[None], [0.1, 0.01])
    with pytest.raises(ValueError, match="at least one"):
        metrics.worst_case({})
    with pytest.raises(ValueError, match="zero seeds"):
        metrics.summarize([])


def _at_budget(final: float, auc: float, lr: float, optimizer: str = "adam") -> dict:
    """A hand-built budget summary: every seed at ``final`` / ``auc``."""
    s = lambda v: {"per_seed": [v, v], "mean": v, "std": 0.0}
    return {"final": s(final), "auc": s(auc), "best_lr": lr, "optimizer": optimizer,
            "steps_to_reach": {"mean": 8.0, "reached": 1.0, "target": 0.81}}


def test_budget_summary_worst_cases_are_the_worst_attacks_own_numbers():
    # full_finetune has the highest final, reinit_top3 the highest AUC (a trap for a table
    # that takes each column's max separately), linear_probe is the best reuse attack.
    entries = {"linear_probe": _at_budget(0.70, 0.65, 0.1),
               "full_finetune": _at_budget(0.95, 0.50, 1e-3, "sgd"),
               "reinit_top3": _at_budget(0.80, 0.90, 1e-2)}
    scratch = {**_at_budget(0.90, 0.80, 1e-2), "optimizer": "momentum"}
    out = metrics.budget_summary(entries, scratch, reuse=["linear_probe"])
    worst, reuse = out["worst"], out["worst_reuse"]
    assert worst["entry"] == "full_finetune" and worst["optimizer"] == "sgd"
    assert worst["learning_rate"] == 1e-3
    assert worst["final"]["mean"] == 0.95 and worst["auc"]["mean"] == 0.50  # its own AUC
    assert worst["advantage_final"] == pytest.approx(0.05)
    assert worst["advantage_auc"] == pytest.approx(-0.30)
    assert worst["steps_to_90"]["mean"] == 8.0
    assert reuse["entry"] == "linear_probe" and reuse["final"]["mean"] == 0.70
    assert reuse["auc"]["mean"] == 0.65 and reuse["advantage_final"] == pytest.approx(-0.20)
    assert out["scratch"]["optimizer"] == "momentum" and out["scratch"]["final"]["mean"] == 0.90
    assert metrics.budget_summary(entries, scratch, reuse=[])["worst_reuse"] is None
    with pytest.raises(ValueError, match="not entries"):
        metrics.budget_summary(entries, scratch, reuse=["bogus"])
