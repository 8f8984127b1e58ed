"""The attack report's summaries, on hand-built numbers whose answers are known, and what
the scratch reference is (``full_finetune`` on ``scratch_init`` params)."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from trm_jax import attack, datasets, errors
from trm_jax.evaluation import SuiteConfig


def at(final: float, auc: float | None = None, lr: float = 0.1) -> dict:
    """One budget's summary of one entry (what budget_summaries gives), std 0.01."""
    return {"final": {"mean": final, "std": 0.01}, "auc": {"mean": auc or final / 2, "std": 0.01},
            "best_lr": lr}


def budgets_of(**finals) -> dict:
    """``budgets_of(d5=(a, b), all=(c, e))`` -> ``{"5": {"1x": at(a), "4x": at(b), "curve"}, ...}``."""
    return {k.removeprefix("d"): {"1x": at(f1), "4x": at(f4), "curve": [f1, f4]}
            for k, (f1, f4) in finals.items()}


def test_best_per_budget_takes_the_attackers_best_optimizer_at_each_budget():
    sgd = budgets_of(d5=(0.30, 0.50), all=(0.70, 0.90))
    adam = budgets_of(d5=(0.40, 0.45), all=(0.60, 0.95))
    out = attack._best_per_budget([sgd, adam], ("sgd", "adam"),
                                  attack.Budgets((5, None), (1, 4)).validate())
    assert {d: {s: (v["final"]["mean"], v["optimizer"]) for s, v in per.items() if s != "curve"}
            for d, per in out.items()} == {"5": {"1x": (0.40, "adam"), "4x": (0.50, "sgd")},
                                           "all": {"1x": (0.70, "sgd"), "4x": (0.95, "adam")}}
    # the curve is the one of the best optimizer at the longest steps budget
    assert out["5"]["curve"] == [0.30, 0.50] and out["all"]["curve"] == [0.60, 0.95]


def test_report_budgets_gives_both_worst_cases_and_the_unprotected_ones():
    scratch = {"budgets": {"all": {"1x": {**at(0.80), "optimizer": "adam"}, "curve": [0.8]}}}
    entry = lambda final, reuse: {"budgets": {"all": {"1x": at(final), "curve": [final]}},
                                  "reuse": reuse, "optimizer": "adam"}
    protected = {"linear_probe": entry(0.30, True), "reinit_top3": entry(0.78, False),
                 "full_finetune": entry(0.40, True)}
    unprotected = {"linear_probe": entry(0.85, True), "reinit_top3": entry(0.79, False),
                   "full_finetune": entry(0.90, True)}
    out = attack.report_budgets(protected, scratch, unprotected)["all"]["1x"]
    assert out["worst"]["entry"] == "reinit_top3"            # the whole suite: highest final
    assert out["worst_reuse"]["entry"] == "full_finetune"    # the reuse attacks only
    assert out["worst"]["advantage_final"] == pytest.approx(0.78 - 0.80)
    assert out["worst_reuse"]["advantage_final"] == pytest.approx(0.40 - 0.80)
    assert out["scratch"]["final"] == {"mean": 0.80, "std": 0.01}
    u = out["unprotected"]
    assert u["worst"]["entry"] == u["worst_reuse"]["entry"] == "full_finetune"
    assert u["worst"]["advantage_final"] == pytest.approx(0.10)
    assert "unprotected" not in attack.report_budgets(protected, scratch)["all"]["1x"]


def test_suite_scratch_grid_rules():
    # the paper's lone probe lr: scratch sweeps its own small grid
    assert SuiteConfig().scratch_grid == (attack.SCRATCH_LEARNING_RATES, ("adam",))
    # a grid given for the attacks: scratch gets the same one (equal budget)
    assert SuiteConfig(learning_rates=(1e-3, 1e-1)).scratch_grid == ((1e-3, 1e-1), ("adam",))
    # the whole suite: its default grid and both suite optimizers
    lrs, opts = SuiteConfig(attacks=("all",)).scratch_grid
    assert lrs == attack.LEARNING_RATE_GRID and opts == attack.SUITE_OPTIMIZERS
    # explicit settings win
    assert SuiteConfig(scratch_learning_rates=(0.5,), scratch_optimizers=("sgd",)).scratch_grid == (
        (0.5,), ("sgd",))


@pytest.fixture(scope="module")
def small(digits_protocol):
    model = datasets.model_for("digits", 5, digits_protocol.image_shape)
    keys = jax.vmap(jax.random.key)(jnp.arange(2))
    return model, model.init_seeds(keys), keys


def test_scratch_is_full_finetuning_of_its_own_random_init(small, digits_protocol):
    model, params, keys = small
    entry = attack.scratch_reference(model, keys, digits_protocol, learning_rates=(0.01,),
                                     epochs=1, batching="vmap")
    start = attack.scratch_init(model, keys)
    # its own init stream: neither the protected model's init nor the attack's
    kernel = lambda p: np.asarray(p["features"]["conv1"]["kernel"])
    assert not np.allclose(kernel(start), kernel(params))
    sweep = attack.attack_sweep(model, start, keys, (0.01,), attack.attack_data(digits_protocol),
                                attack.AttackConfig("full_finetune", 5, "adam", 1, 64),
                                batching="vmap")
    np.testing.assert_array_equal(np.asarray(entry["curves"]), np.asarray(sweep.curve, np.float64))
    assert entry["attack"] == "scratch" and entry["reuse"] is False


def test_a_scratch_reference_of_another_budget_is_refused(small, digits_protocol):
    model, params, keys = small
    scratch = {"epochs": 2, "batch_size": 64, "curves": np.zeros((1, 2, 3)),
               "data_per_class": ["all"], "steps_multipliers": [1]}
    for budgets in (attack.Budgets((5, None), (1,)), attack.Budgets((None,), (1, 4))):
        with pytest.raises(errors.ConfigError, match="same budget"):
            attack.attack_report(model, params, keys, digits_protocol, epochs=2, scratch=scratch,
                                 budgets=budgets)
    with pytest.raises(errors.ConfigError, match="epochs=2, batch_size=64, 2 seeds; this report "
                                                 "needs epochs=3"):
        attack.attack_report(model, params, keys, digits_protocol, epochs=3, scratch=scratch)
