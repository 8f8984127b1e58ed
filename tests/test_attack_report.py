"""The pure functions over a SweepResult, on hand-built arrays whose answers are known; the
JSON edge; and what the scratch reference is (``full_finetune`` on ``scratch_init`` params)."""
from __future__ import annotations

import itertools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from trm_jax import attacks, datasets, errors, evaluation
from trm_jax.attacks import result as R
from trm_jax.evaluation import SuiteConfig

S = 2  # seeds


def sweep(finals: dict, *, epochs: int = 2, steps=(1,), optimizers=("adam",), lrs=(0.01, 0.1),
          data=("all",), reuse: dict | None = None, scratch=None, spread: float = 0.0) -> R.SweepResult:
    """A SweepResult whose curves rise linearly from 0.2 (epoch 0) to ``finals[attack][o][l][d]``
    at the LAST epoch; seed s adds ``(-1)**s * spread`` (so the mean is the given final)."""
    names = tuple(finals)
    e = epochs * max(steps) + 1
    acc = np.full((len(names), len(optimizers), len(lrs), S, len(data), e), np.nan)
    for (a, name), o, l, d in itertools.product(enumerate(names), range(len(optimizers)),
                                                range(len(lrs)), range(len(data))):
        f = np.asarray(finals[name], dtype=float).reshape(len(optimizers), len(lrs), len(data))[o, l, d]
        if np.isnan(f):
            continue
        for s in range(S):
            acc[a, o, l, s, d] = np.linspace(0.2, f + (-1) ** s * spread, e)
    reuse = reuse or {}
    return R.SweepResult(acc, np.ones(acc.shape[:-1], bool), names, tuple(optimizers), tuple(lrs),
                         tuple(data), epochs, tuple(steps), 4, 64,
                         tuple(reuse.get(n, True) for n in names),
                         np.zeros((len(names), len(optimizers))), scratch=scratch)


def scratch_of(final, **kw) -> R.SweepResult:
    return sweep({"scratch": final}, reuse={"scratch": False}, **kw)


def test_best_lr_is_the_argmax_of_the_mean_final_first_on_ties():
    r = sweep({"a": [0.5, 0.7], "b": [0.6, 0.6]})
    np.testing.assert_array_equal(R.best_lr(r, "1x")[:, 0, 0], [1, 0])


def test_a_shorter_steps_budget_is_a_prefix_and_reselects_the_lr():
    # epochs 2, steps 1x/2x: 5 points; the 1x budget ends at point 2 (halfway up the line)
    r = sweep({"a": [0.4, 1.0]}, steps=(1, 2))
    assert R.at_steps(r, "1x").shape[-1] == 3 and R.at_steps(r, "2x").shape[-1] == 5
    np.testing.assert_allclose(R.final_means(r, "1x")[0, 0, :, 0], [0.3, 0.6])
    with pytest.raises(errors.ConfigError, match="'3x' not in"):
        R.at_steps(r, "3x")


def test_attacker_choice_takes_the_best_optimizer_and_lr_per_budget():
    # optimizers x lrs x data: sgd best at data "5", adam best at "all"
    finals = {"a": [[[0.50, 0.30], [0.45, 0.70]],      # sgd: lr 0.01, lr 0.1 (data 5, all)
                    [[0.40, 0.95], [0.20, 0.60]]]}     # adam
    r = sweep(finals, optimizers=("sgd", "adam"), data=("5", "all"))
    c5, call = R.attacker_choice(r, "5", "1x", "a"), R.attacker_choice(r, "all", "1x", "a")
    assert (c5.optimizer, c5.learning_rate) == ("sgd", 0.01)
    assert (call.optimizer, call.learning_rate) == ("adam", 0.01)
    assert c5.final.mean() == pytest.approx(0.50) and call.final.mean() == pytest.approx(0.95)


def test_worst_cases_over_the_suite_and_the_reuse_attacks_and_their_advantage():
    sc = scratch_of([0.80, 0.80])
    r = sweep({"linear_probe": [0.30, 0.20], "reinit_top3": [0.78, 0.70],
               "full_finetune": [0.40, 0.35]}, reuse={"reinit_top3": False}, scratch=sc, spread=0.01)
    worst, reuse = R.worst_case(r, "all", "1x"), R.worst_case(r, "all", "1x", reuse_only=True)
    assert worst.attack == "reinit_top3" and reuse.attack == "full_finetune"
    scratch = R.scratch_choice(r, "all", "1x")
    assert R.advantage(worst, scratch)[1] == pytest.approx(0.78 - 0.80)
    assert R.advantage(reuse, scratch)[1] == pytest.approx(0.40 - 0.80)
    # AUC = mean of epochs 1..E of the line 0.2 -> f over E = 2 epochs: (0.2 + f) / 2 + (f - 0.2) / 4 ...
    line = lambda f: np.linspace(0.2, f, 3)[1:].mean()
    assert R.advantage(reuse, scratch)[0] == pytest.approx(line(0.40) - line(0.80))
    assert R.worst_case(sweep({"x": [0.5, 0.5]}, reuse={"x": False}), "all", "1x",
                        reuse_only=True) is None


def test_steps_to_fraction_counts_optimizer_steps_and_never_is_inf():
    c = R.Choice("a", "adam", 0.1, np.array([0.5, 0.5]), np.array([0.4, 0.4]),
                 np.array([[0.1, 0.6, 0.9], [0.1, 0.2, 0.3]]))
    assert R.steps_to_fraction(c, 0.5, steps_per_epoch=4) == (math.inf, 0.5)
    c2 = c._replace(curve=np.array([[0.1, 0.6, 0.9], [0.7, 0.2, 0.3]]))
    assert R.steps_to_fraction(c2, 0.5, steps_per_epoch=4) == (2.0, 1.0)  # steps 4 and 0


def test_budget_table_one_row_per_budget_with_its_own_scratch():
    sc = scratch_of([[0.6, 0.9], [0.6, 0.9]], data=("5", "all"))
    r = sweep({"a": [[0.5, 0.95], [0.4, 0.85]]}, data=("5", "all"), scratch=sc)
    rows = R.budget_table(r)
    assert [(row.data, row.steps) for row in rows] == [("5", "1x"), ("all", "1x")]
    assert rows[0].worst_advantage[1] == pytest.approx(0.5 - 0.6)
    assert rows[1].worst_advantage[1] == pytest.approx(0.95 - 0.9)
    assert rows[1].worst.learning_rate == 0.01


def test_search_curve_is_the_expected_best_of_n_random_trials():
    # 3 (attack, lr) cells with means 0.2, 0.5, 0.8 (the 4th not run: NaN, never drawn)
    r = sweep({"a": [0.2, 0.8], "b": [0.5, np.nan]})
    curve = R.search_curve(r, "all", "1x")
    # n=1: the mean; n=2: best of a random pair = (0.5 + 0.8 + 0.8) / 3; n=3: the max
    np.testing.assert_allclose(curve, [0.5, 2.1 / 3, 0.8])
    # brute force over every subset, on random values
    rng = np.random.default_rng(0)
    finals = {f"a{i}": rng.uniform(size=2) for i in range(3)}
    r = sweep(finals)
    values = R.final_means(r, "1x")[..., 0].reshape(-1)
    brute = [np.mean([max(c) for c in itertools.combinations(values, n)]) for n in range(1, 7)]
    np.testing.assert_allclose(R.search_curve(r, "all", "1x"), brute)


def test_sweep_result_checks_its_axes():
    r = sweep({"a": [0.5, 0.5]})
    with pytest.raises(errors.ConfigError, match=r"accuracy must be \[attack=1"):
        R.SweepResult(r.accuracy[:, :, :1], r.finite, r.attacks, r.optimizers, r.learning_rates,
                      r.data, r.epochs, r.steps_multipliers, 4, 64, r.reuse, r.wall_seconds)
    with pytest.raises(errors.ConfigError, match="epoch axis"):
        R.SweepResult(r.accuracy[..., :2], r.finite, r.attacks, r.optimizers, r.learning_rates,
                      r.data, r.epochs, r.steps_multipliers, 4, 64, r.reuse, r.wall_seconds)
    with pytest.raises(errors.ConfigError, match="'nope' is not on the attack axis"):
        r.index("attack", "nope")


def test_the_json_report_carries_the_same_numbers():
    sc = scratch_of([0.80, 0.80], optimizers=("adam",))
    r = sweep({"linear_probe": [0.30, 0.20], "reinit_top3": [0.78, 0.70]},
              reuse={"reinit_top3": False}, scratch=sc, spread=0.01)
    report = attacks.to_json(r)
    assert list(report["attacks"]) == ["linear_probe", "reinit_top3"]
    entry = report["attacks"]["reinit_top3"]
    assert entry["best_lr"] == 0.01 and entry["final"]["mean"] == pytest.approx(0.78)
    assert np.shape(entry["curves"]) == (2, S, 3)
    b = report["summary"]["budgets"]["all"]["1x"]
    assert b["worst"]["entry"] == "reinit_top3" and b["worst_reuse"]["entry"] == "linear_probe"
    assert b["worst"]["advantage_final"] == pytest.approx(-0.02)
    assert report["references"]["scratch"]["attack"] == "scratch"
    assert report["summary"]["search_curves"]["all"]["1x"][-1] == pytest.approx(0.78)
    goals = evaluation.defence_goals(r, [0.9, 0.9], [0.9, 0.9])
    assert goals["reuse"] == pytest.approx(0.30) and goals["max_advantage"] == pytest.approx(-0.02)
    assert goals == evaluation.defence_goals(report, [0.9, 0.9], [0.9, 0.9])  # the JSON way


def test_suite_scratch_grid_rules():
    # the paper's lone probe lr: scratch sweeps its own small grid
    assert SuiteConfig().scratch_grid == (attacks.SCRATCH_LEARNING_RATES, ("adam",))
    # a grid given for the attacks: scratch gets the same one (equal budget)
    assert SuiteConfig(learning_rates=(1e-3, 1e-1)).scratch_grid == ((1e-3, 1e-1), ("adam",))
    # the whole suite: its default grid and both suite optimizers
    lrs, opts = SuiteConfig(attacks=("all",)).scratch_grid
    assert lrs == attacks.LEARNING_RATE_GRID and opts == attacks.SUITE_OPTIMIZERS
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
    scratch = attacks.scratch_reference(model, keys, digits_protocol, learning_rates=(0.01,),
                                        epochs=1, batching="vmap")
    start = attacks.scratch_init(model, keys)
    # its own init stream: neither the protected model's init nor the attack's
    kernel = lambda p: np.asarray(p["features"]["conv1"]["kernel"])
    assert not np.allclose(kernel(start), kernel(params))
    out = attacks.attack_sweep(model, start, keys, (0.01,), attacks.attack_data(digits_protocol),
                               attacks.AttackConfig("full_finetune", 5, "adam", 1, 64),
                               batching="vmap")
    np.testing.assert_array_equal(scratch.accuracy[0, 0, :, :, 0], np.asarray(out.curve, np.float64))
    entry = attacks.report.scratch_entry(scratch)
    assert entry["attack"] == "scratch" and entry["reuse"] is False


def test_a_scratch_reference_of_another_budget_is_refused(small, digits_protocol, monkeypatch):
    model, params, keys = small
    protected = evaluation.Protected("x", model, params, keys, {})
    scratch = scratch_of([0.5, 0.5], epochs=2)  # 2 seeds, epochs 2, all data, 1x
    monkeypatch.setattr(attacks, "run_plan", lambda *a, **k: pytest.fail("computed"))
    for suite in (SuiteConfig(epochs=2, data_per_class=(5, None)),
                  SuiteConfig(epochs=2, steps_multipliers=(1, 4)), SuiteConfig(epochs=3)):
        with pytest.raises(errors.ConfigError, match="same budget"):
            evaluation.evaluate(protected, digits_protocol, suite, scratch=scratch)
    with pytest.raises(errors.ConfigError, match="what scratch_reference returns"):
        evaluation.evaluate(protected, digits_protocol, SuiteConfig(epochs=2), scratch={"curves": 1})
