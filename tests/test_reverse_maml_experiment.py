"""The Reverse-MAML experiment end to end on a tiny digits configuration."""
import json

import jax
import numpy as np
import pytest

from experiments import common, reverse_maml
from trm_jax import runs

TINY = ["--dataset", "digits", "--seeds", "2", "--shots", "2", "--queries", "2",
        "--good-tasks", "1", "--bad-tasks", "1", "--inner-steps", "1", "--meta-steps", "6",
        "--log-every", "2", "--meta-checkpoint-every", "2", "--no-reference", "--no-scratch",
        "--attack-epochs", "1", "--head-epochs", "1", "--no-progress"]


def run(tmp_path, name, data_dir, *extra):
    return reverse_maml.main(TINY + ["--workdir", str(tmp_path / name), "--data-dir", data_dir, *extra])


def test_run_writes_results_with_the_designed_keys(tmp_path, digits_data_dir):
    results = run(tmp_path, "a", digits_data_dir)
    stored = json.loads((tmp_path / "a" / "results.json").read_text())
    assert set(runs.RESULT_KEYS) <= set(stored)
    curves = np.asarray(stored["attacks"]["linear_probe"]["curves"])
    assert curves.shape == (1, 2, 2) and np.all(np.isfinite(curves))
    assert (tmp_path / "a" / "attack_curves.png").stat().st_size > 0
    steps = [r["step"] for r in runs.RunDir(tmp_path / "a").metrics() if r["phase"] == "meta"]
    assert steps == [2, 4, 6]
    assert results["seeds"] == [0, 1]


def test_interrupted_then_resumed_equals_uninterrupted(tmp_path, digits_data_dir, interrupt_at):
    run(tmp_path, "full", digits_data_dir)
    _, full, _ = common.load_model(tmp_path / "full")

    with interrupt_at("step", 4), pytest.raises(KeyboardInterrupt):
        run(tmp_path, "cut", digits_data_dir)

    run(tmp_path, "cut", digits_data_dir, "--resume")
    _, resumed, _ = common.load_model(tmp_path / "cut")
    jax.tree.map(np.testing.assert_array_equal, resumed, full)
    steps = [r["step"] for r in runs.RunDir(tmp_path / "cut").metrics() if r["phase"] == "meta"]
    assert steps == [2, 4, 6]


def test_impossible_tasks_fail_before_compute(tmp_path, digits_data_dir):
    with pytest.raises(ValueError, match="shots"):
        reverse_maml.main(["--dataset", "digits", "--shots", "90", "--queries", "10",
                           "--workdir", str(tmp_path / "b"), "--data-dir", digits_data_dir])
    with pytest.raises(ValueError, match="outer-lr must be > 0"):
        reverse_maml.main(["--dataset", "digits", "--outer-lr", "0",
                           "--workdir", str(tmp_path / "c"), "--data-dir", digits_data_dir])
    assert not (tmp_path / "b").exists() and not (tmp_path / "c").exists()
