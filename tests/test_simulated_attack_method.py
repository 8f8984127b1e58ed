"""The simulated-attack method, its validation split, goals, and its two experiments."""
from __future__ import annotations

import dataclasses
import json

import flax.linen as nn
import jax
import numpy as np
import pytest

from experiments import simulated_attack_search as search
from trm_jax import data, evaluation, methods, models
from trm_jax import simulated_attack as sa
from trm_jax.errors import ConfigError
from trm_jax.methods import simulated_attack as method

class SmallFeatures(nn.Module):
    """lenet's layer names on dense layers: compiles in seconds (the claims here are not
    about the architecture; test_simulated_attack checks the maths)."""

    @nn.compact
    def __call__(self, x):
        x = x.reshape(x.shape[:-3] + (-1,))
        for name in ("conv1", "conv2", "fc1"):
            x = nn.relu(nn.Dense(8, name=name)(x))
        return nn.Dense(8, name="fc2")(x)


SMALL = models.Model("lenet", SmallFeatures(), 5, (8, 8, 1), "fc2", layers=models.LENET_LAYERS)
TINY = method.SimulatedAttackConfig(
    attacker=sa.AttackerSpace(optimizers=("sgd", "adam"), steps=2, top_layers=(0, 1),
                              data_per_class=(2, 4)), bad_tasks=1, shots=4, queries=2,
    batch_size=16, meta_steps=3, log_every=1, start_train=method.train.TrainConfig(
        epochs=1, batch_size=32))


@pytest.mark.parametrize("change, match", [
    (dict(bad_term="ascentt"), "bad_term"), (dict(weighting="early"), "weighting"),
    (dict(meta_grad="reptile"), "meta_grad"), (dict(start="unsir"), "start"),
    (dict(lam=-1.0), "lam"), (dict(anchor=float("nan")), "anchor"),
    (dict(outer_lr=float("inf")), "outer_lr"), (dict(bad_tasks=0), "bad_tasks"),
    (dict(alternate_every=-1), "alternate_every")])
def test_config_errors(change, match):
    with pytest.raises(ConfigError, match=match):
        dataclasses.replace(TINY, **change)


def test_check_against_the_data(digits_protocol):
    with pytest.raises(ConfigError, match="top_layers"):
        methods.check("simulated_attack", dataclasses.replace(
            TINY, attacker=sa.AttackerSpace(top_layers=(5,), data_per_class=(4,))), digits_protocol)
    with pytest.raises(ConfigError, match="batch_size"):
        methods.check("simulated_attack", dataclasses.replace(TINY, batch_size=10_000),
                      digits_protocol)
    with pytest.raises(ConfigError, match="shots"):
        methods.check("simulated_attack", dataclasses.replace(TINY, shots=500), digits_protocol)


def test_protect_trains_every_seed_from_the_given_start(digits_protocol):
    keys = methods.seed_keys(2)
    start = method.start_model(TINY, digits_protocol, keys, model=SMALL)
    config = dataclasses.replace(TINY, alternate_every=2)
    protected = method.protect(config, digits_protocol, keys, start=start, model=SMALL)
    assert jax.tree.leaves(protected.params)[0].shape[0] == 2
    np.testing.assert_array_equal(protected.metrics["start_test_accuracy"],
                                  start.metrics["beneficial_test_accuracy"])
    last = protected.metrics["meta_final_metrics"]
    for name in ("objective", "good/loss", "anchor", "bad/term", "bad/final_acc", "meta_grad_norm"):
        assert last[name].shape == (2,) and np.all(np.isfinite(last[name])), name
    for seed in range(2):  # every seed's model moved from its own start
        moved = [np.abs(a[seed] - b[seed]).max() for a, b in zip(jax.tree.leaves(protected.params),
                                                                 jax.tree.leaves(start.params))]
        assert max(moved) > 1e-6, seed
    # the seeds trained apart (not one seed's update given to both)
    features = jax.tree.leaves(protected.params["features"])[0]
    assert np.abs(features[0] - features[1]).max() > 1e-3
    # the reported accuracy is the returned params' accuracy on the beneficial test half
    from trm_jax.methods._phases import accuracy_on, device_subset

    np.testing.assert_array_equal(
        protected.metrics["beneficial_test_accuracy"],
        accuracy_on(protected.model, protected.params, device_subset(digits_protocol.test.beneficial)))


def test_validation_protocol_holds_out_the_end_of_the_finetuning_split(digits_protocol):
    val = data.validation_protocol(digits_protocol, 1 / 3)
    for half in ("beneficial", "malicious"):
        ft = getattr(digits_protocol.finetune, half)
        a, b = getattr(val.finetune, half), getattr(val.test, half)
        assert len(a) + len(b) == len(ft) and len(b) == round(len(ft) / 3)
        np.testing.assert_array_equal(np.concatenate([a.images, b.images]), ft.images)
        assert a.classes == b.classes == ft.classes
    assert val.pretrain is digits_protocol.pretrain
    with pytest.raises(ConfigError, match="fraction"):
        data.validation_protocol(digits_protocol, 1.0)


def _report(reuse_final, advantages):
    """A report's summary with one reuse worst case and per-budget advantages."""
    budgets = {d: {"1x": {"worst": {"advantage_final": adv},
                          "worst_reuse": {"attack": "full_finetune", "final": {"mean": reuse_final}}}}
               for d, adv in advantages.items()}
    return {"summary": {"budgets": budgets}}


def test_defence_goals_closed_form():
    goals = evaluation.defence_goals(_report(0.25, {"5": -0.1, "all": -0.01}),
                                     np.array([0.97, 0.99]), {"mean": 0.985})
    assert goals["reuse"] == 0.25 and goals["reuse_attack"] == "full_finetune"
    assert goals["beneficial_drop"] == pytest.approx(0.005)
    assert goals["max_advantage"] == -0.01 and goals["max_advantage_at"] == "all/1x"
    assert goals["all_met"]
    missed = evaluation.defence_goals(_report(0.31, {"5": 0.02, "all": -0.3}), [0.9], [0.95])
    assert missed["met"] == {"reuse": False, "beneficial": False, "advantage": False}
    assert missed["max_advantage_at"] == "5/1x"
    assert "MISSED" in evaluation.goals_line(missed)


def test_variants_parse_and_errors():
    base = method.SimulatedAttackConfig()
    cfg = search.variant_config(base, "lam=3,attacker.top_layers=(0, 4),start=skd")
    assert cfg.lam == 3 and cfg.attacker.top_layers == (0, 4) and cfg.start == "skd"
    assert search.variant_config(base, "") == base
    with pytest.raises(ConfigError, match="field=value"):
        search.variant_config(base, "lam")
    with pytest.raises(ConfigError, match="no field"):
        search.variant_config(base, "lamb=3")
    with pytest.raises(ConfigError, match="lam"):
        search.variant_config(base, "lam=-1")


def test_pick_prefers_the_beneficial_constraint_then_the_worst_reuse():
    point = lambda name, ok, reuse, adv, drop: {"variant": name, "goals": {
        "met": {"beneficial": ok}, "reuse": reuse, "max_advantage": adv, "beneficial_drop": drop}}
    points = [point("a", False, 0.1, 0.0, 0.05), point("b", True, 0.6, 0.1, 0.01),
              point("c", True, 0.5, 0.2, 0.0), point("d", True, 0.5, 0.1, 0.02)]
    assert search.pick(points)["variant"] == "d"
    assert search.pick(points[:1] + [point("e", False, 0.9, 0, 0.03)])["variant"] == "e"


def test_search_cli_end_to_end_and_resume(tmp_path, digits_data_dir, capsys):
    argv = ["--dataset", "digits", "--data-dir", digits_data_dir, "--no-progress",
            "--workdir", str(tmp_path / "run"), "--meta-steps", "2", "--log-every", "1",
            "--attacker.steps", "2", "--attacker.data-per-class", "2", "--shots", "2",
            "--attacker.top-layers", "0", "--attacker.optimizers", "adam",
            "--queries", "2", "--bad-tasks", "1", "--batch-size", "16",
            "--start-train.epochs", "1", "--search-seeds", "1", "--seeds", "1",
            "--grid", "lam=1", "anchor=0.5", "--ablations", "lam=0",
            "--attack.attacks", "linear_probe", "--attack.epochs", "2",
            "--attack.learning-rates", "0.01"]
    results = search.main(argv)
    assert [p["variant"] for p in results["search"]] == ["lam=1", "anchor=0.5"]
    assert results["pick"] in ("lam=1", "anchor=0.5")
    assert [r["variant"] for r in results["test"]] == [f"pick ({results['pick']})", "pick, lam=0"]
    for rows, ref in ((results["search"], results["unprotected_validation"]),
                      (results["test"], results["unprotected"])):
        for row in rows + [ref]:
            assert 0 <= row["goals"]["reuse"] <= 1 and row["goals"]["reuse_attack"] == "linear_probe"
            assert row["goals"]["beneficial_drop"] == pytest.approx(  # vs the UNPROTECTED model
                ref["beneficial"]["mean"] - row["beneficial"]["mean"])
    run = tmp_path / "run"
    assert (run / "tradeoff.png").stat().st_size > 0
    assert "Pick: `" in (run / "results.md").read_text()
    stored = json.loads((run / "results.json").read_text())
    assert stored["pick"] == results["pick"]
    capsys.readouterr()
    again = search.main(argv + ["--resume"])  # every variant finished: nothing recomputed
    assert capsys.readouterr().out.count("reusing") == 6  # 2 + 2 variants, 2 references
    assert again["test"] == results["test"]


def test_search_cli_bad_variant_is_one_line_exit_2(capsys):
    from experiments import _cli

    assert _cli.main(search.main, ["--dataset", "digits", "--grid", "lamb=3"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "lamb" in err[0]


def test_single_experiment_reports_goals_against_the_unprotected_reference(tmp_path,
                                                                          digits_data_dir):
    from experiments import simulated_attack as experiment

    results = experiment.main([
        "--dataset", "digits", "--data-dir", digits_data_dir, "--no-progress", "--seeds", "1",
        "--workdir", str(tmp_path / "run"), "--meta-steps", "2", "--log-every", "1",
        "--attacker.steps", "2", "--attacker.data-per-class", "2", "--shots", "2",
        "--queries", "2", "--bad-tasks", "1", "--batch-size", "16", "--start-train.epochs", "1",
        "--attacker.top-layers", "0", "--attacker.optimizers", "adam", "--validation",
        "--attack.attacks", "linear_probe", "--attack.epochs", "2", "--attack.learning-rates",
        "0.01"])
    assert results["split"] == "validation"
    goals = results["goals"]
    drop = (results["unprotected_beneficial_test_accuracy"]["mean"]
            - results["beneficial_test_accuracy"]["mean"])
    assert goals["beneficial_drop"] == pytest.approx(drop)
    assert goals["reuse_attack"] == "linear_probe" and set(goals["met"]) == {
        "reuse", "beneficial", "advantage"}
    stored = json.loads((tmp_path / "run" / "results.json").read_text())
    assert stored["goals"] == results["goals"]
