"""Faults and bad input (issue 38, items 3-5): every refusal before the first compute.

A run too big for the machine's memory or too long to ever end, a bad budget of one
method of ``compare``, a ``--resume`` onto another dataset or topology: each is one line
naming the flag, exit code 2, within seconds (conftest's ``no_compute`` makes any compute
fail the test). ``~`` in a path is the home folder; an attacker data budget beyond the
data is recorded as what was used.
"""
from __future__ import annotations

import dataclasses
import json
import pathlib
import time

import numpy as np
import pytest

from experiments import (_cli, attack, compare, reverse_maml, simulated_attack, skd,
                         train_reference, unlearning)
from trm_jax import attacks, data, datasets, evaluation, methods, resources, runs
from trm_jax.evaluation import SuiteConfig

from test_cli_safety import assert_one_line, digits, run_cli


def timed(module, args, capsys):
    start = time.perf_counter()
    code, err = run_cli(module, args, capsys)
    return code, err, time.perf_counter() - start


# ----------------------------------------------------------------------------- resources


@pytest.mark.parametrize("module, args, parts", [
    (compare, ["--seeds", "100000"], ["--seeds 100000", "memory", "available", "--force-resources"]),
    (reverse_maml, ["--seeds", "100000"], ["--seeds 100000", "memory", "--force-resources"]),
    (reverse_maml, ["--attack.steps-multipliers", "1000000000"],
     ["--attack.steps-multipliers 1000000000", "optimizer steps", "bound 1e+07"]),
    (compare, ["--attack.epochs", "10000000"], ["--attack.epochs 10000000", "bound 1e+07"]),
    (train_reference, ["--train.epochs", "100000000"], ["--train.epochs 100000000", "steps"]),
    # The ablations' budgets, UNSIR's noise and the simulated attack's meta-steps.
    (compare, ["--skd-teacher-epochs", "5", "100000000"], ["--skd-teacher-epochs 100000000"]),
    (skd, ["--teacher-epochs", "5", "100000000"], ["--teacher-epochs 100000000", "bound"]),
    (unlearning, ["--unsir.noise.steps", "100000000"], ["--unsir.noise.steps 100000000"]),
    (simulated_attack, ["--meta-steps", "100000000"], ["--meta-steps 100000000", "bound"]),
])
@pytest.mark.timeout(300)  # a regression would otherwise train for years
def test_a_run_that_cannot_fit_or_end_is_refused_in_seconds(module, args, parts, digits_data_dir,
                                                            tmp_path, capsys, no_compute):
    """Before: --seeds 100000 reached 9 GB in 30 s; the attack's steps were felt only after
    every method had trained (here: the compute that no_compute refuses)."""
    seeds = [] if "--seeds" in args else ["--seeds", "1"]
    code, err, seconds = timed(module, ["--dataset", "digits", "--no-progress", "--data-dir",
                                        digits_data_dir, "--workdir", str(tmp_path / "w"),
                                        *seeds, *args], capsys)
    assert_one_line(code, err, *parts)
    assert seconds < 5 and not (tmp_path / "w").exists()


def test_force_resources_runs_anyway(digits_data_dir, tmp_path, no_compute):
    with pytest.raises(AssertionError, match="compute started"):
        _cli.main(reverse_maml.main, digits(digits_data_dir, tmp_path / "w", "--attack.epochs",
                                            "10000000", "--force-resources"))


@pytest.mark.parametrize("module, dataset, seeds", [
    (reverse_maml, "digits", 3), (compare, "digits", 5), (compare, "mnist5k", 5)])
def test_the_readmes_runs_are_not_refused(module, dataset, seeds, digits_data_dir,
                                          mnist5k_data_dir, tmp_path):
    data_dir = {"digits": digits_data_dir, "mnist5k": mnist5k_data_dir}[dataset]
    config = _cli.parse(module.Config, module.defaults,
                        ["--dataset", dataset, "--seeds", str(seeds), "--data-dir", data_dir,
                         "--workdir", str(tmp_path / "w")], prog="p", description="")
    est = _cli.check_resources(config, _cli.load_protocol(dataset, config.protocol, config.run))
    # What the run adds to the process (the test process's own size varies with the session):
    # well within an 8 GB laptop's memory.
    assert est.peak - est.base_bytes < 4 * 2**30 and max(p.steps for p in est.phases) < 10_000


def test_the_estimate_scales_with_seeds_and_refuses_only_beyond_what_is_available():
    model = datasets.model_for("digits", 5, (8, 8, 1))
    config = reverse_maml.defaults("digits")
    one, many = (resources.estimate(config, model=model, seeds=s, train_examples=800,
                                    attack_examples=262, attack_epochs=10) for s in (1, 100))
    assert [p.name for p in one.phases] == ["method.meta", "method.head", "reference.train", "attack"]
    for a, b in zip(one.phases, many.phases):
        assert b.bytes == pytest.approx(100 * a.bytes, rel=0.01) and a.steps == b.steps
    need = many.peak - many.base_bytes
    resources.check(many, seeds=100, available=(need, "test"))  # exactly enough: runs
    with pytest.raises(resources.ConfigError, match="--seeds 100: the method.meta phase"):
        resources.check(many, seeds=100, available=(need - 1, "test"))


# ----------------------------------------------------------------------------- compare's checks


@pytest.mark.parametrize("epochs", ["-1", "0"])
def test_a_bad_skd_budget_of_compare_fails_before_any_method_trains(epochs, digits_data_dir,
                                                                    tmp_path, capsys, no_compute):
    """Before: every other method trained first, then skd failed (exit 1, ~45 s)."""
    code, err, seconds = timed(compare, digits(digits_data_dir, tmp_path / "w",
                                               "--skd-teacher-epochs", "5", epochs), capsys)
    assert_one_line(code, err, "--skd-teacher-epochs must be", "an integer >= 1", f"(5, {epochs})")
    assert seconds < 5 and not (tmp_path / "w").exists()


# ----------------------------------------------------------------------------- resume


def stored_run(path: pathlib.Path, **config) -> pathlib.Path:
    with runs.RunDir.create(path) as run:
        run.write_config({"experiment": "train_reference", "dataset": "digits", **config})
        run.log({"phase": "train", "epoch": 1})
    return path


def test_resume_with_another_dataset_is_refused_before_preparing_it(tmp_path, capsys, no_compute):
    """Before: the new dataset was prepared (28 s for mnist5k), then the settings' diff refused."""
    folder = stored_run(tmp_path / "run", dataset="mnist5k")
    empty = tmp_path / "tfds"
    empty.mkdir()
    code, err, seconds = timed(train_reference, digits(str(empty), folder, "--resume"), capsys)
    assert_one_line(code, err, "is a run on --dataset mnist5k, not --dataset digits",
                    "--dataset mnist5k")
    assert seconds < 5 and list(empty.iterdir()) == []


@pytest.mark.parametrize("stored", [
    {"topology": {"processes": 2, "devices": 2}},
    {"run": {"distributed": {"num_processes": 2}}},  # a run from before topologies were recorded
])
def test_resume_on_another_topology_needs_allow_topology_change(stored, digits_data_dir, tmp_path,
                                                                capsys, no_compute):
    """Before: a two-process run resumed as one process, silently (losses differ by ~1e-7)."""
    folder = tmp_path / "run"
    config = _cli.parse(train_reference.Config, train_reference.defaults,
                        digits(digits_data_dir, folder), prog="p", description="")
    resolved = runs.to_jsonable({"experiment": "train_reference", **dataclasses.asdict(config)})
    stored_run(folder, **{**resolved, **stored,
                          "run": {**resolved["run"], **stored.get("run", {})}})
    code, err, seconds = timed(train_reference, digits(digits_data_dir, folder, "--resume"), capsys)
    assert_one_line(code, err, "another topology (2 processes then, 1 now",
                    "--allow-topology-change")
    assert seconds < 5
    with pytest.raises(AssertionError, match="compute started"):  # accepted: it trains
        _cli.main(train_reference.main, digits(digits_data_dir, folder, "--resume",
                                               "--allow-topology-change"))


RESULTS = {"experiment": "train_reference", "dataset": "digits", "seeds": [0],
           "beneficial_test_accuracy": {}, "attacks": {}, "references": {}}


def test_an_accepted_topology_change_is_recorded_in_results(tmp_path):
    folder = tmp_path / "run"
    options = _cli.RunOptions(workdir=str(folder), progress=False, compile_cache=False)
    with _cli.Run("train_reference", _cli.Experiment(dataset="digits", run=options), options):
        pass
    stored = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**stored, "topology": {"processes": 2,
                                                                           "devices": 2}}))
    options = dataclasses.replace(options, resume=True, allow_topology_change=True)
    with _cli.Run("train_reference", _cli.Experiment(dataset="digits", run=options), options) as run:
        results = run.finish(RESULTS)
    now = _cli.topology()
    assert results["topology_change"] == {"from": {"processes": 2, "devices": 2}, "to": now}
    assert json.loads((folder / "config.json").read_text())["topology"] == now
    # the same topology again: nothing to record
    options = _cli.RunOptions(workdir=str(folder), resume=True, progress=False, compile_cache=False)
    with _cli.Run("train_reference", _cli.Experiment(dataset="digits", run=options), options) as run:
        assert "topology_change" not in run.finish(RESULTS)


# ----------------------------------------------------------------------------- what was typed


def test_tilde_is_the_home_folder_in_every_path(digits_data_dir, tmp_path, monkeypatch, capsys,
                                                no_compute):
    """Before: --workdir '~/w' made a folder named '~' in the current folder."""
    home, cwd = tmp_path / "home", tmp_path / "cwd"
    home.mkdir(), cwd.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.chdir(cwd)
    (home / "tfds").symlink_to(digits_data_dir)
    with pytest.raises(AssertionError, match="compute started"):
        _cli.main(train_reference.main, digits("~/tfds", "~/w"))
    assert runs.is_run(home / "w") and list(cwd.iterdir()) == []
    assert json.loads((home / "w" / "config.json").read_text())["run"]["data_dir"] == str(home / "tfds")
    code, err = run_cli(attack, ["--run", "~/w", "--reference", "~/r"], capsys)
    assert_one_line(code, err, str(home / "w"))  # the run did not finish: named with its real path
    assert list(cwd.iterdir()) == []


def test_a_data_budget_beyond_the_data_is_recorded_as_all(digits_protocol):
    """Before: --attack.data-per-class 1000000 ran on all the data and recorded "1000000"."""
    labels = digits_protocol.finetune.malicious.labels
    largest = int(np.bincount(labels).max())  # digits: 59 of one malicious class
    budgets = attacks.Budgets((5, largest - 1, largest, 1_000_000, None), (1,)).resolve(labels)
    assert budgets.data_per_class == (5, largest - 1, None)  # what was used; "all" once
    model = datasets.model_for("digits", 5, (8, 8, 1))
    keys = methods.seed_keys(1)
    protected = methods.Protected("x", model, model.init_seeds(keys), keys, {})
    reports = [attacks.to_json(evaluation.evaluate(protected, digits_protocol, SuiteConfig(
        epochs=1, learning_rates=(0.1,), scratch=False, data_per_class=d))) for d in
        ((1_000_000,), (None,))]
    entry = reports[0]["attacks"]["linear_probe"]
    assert entry["data_per_class"] == ["all"] and list(entry["budgets"]) == ["all"]
    same = reports[1]["attacks"]["linear_probe"]  # the same run as "all", recorded as "all"
    assert entry["curves"] == same["curves"] and entry["budgets"] == same["budgets"]
