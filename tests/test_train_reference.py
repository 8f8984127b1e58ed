"""End-to-end checks of the run-folder contract with the reference experiment."""
import json

import jax
import numpy as np
import pytest

from experiments import common, train_reference
from trm_jax import runs

ARGS = ["--dataset", "digits", "--seeds", "2", "--epochs", "4", "--checkpoint-every", "1",
        "--no-progress"]


def run(tmp_path, name, digits_data_dir, *extra):
    return train_reference.main(ARGS + ["--workdir", str(tmp_path / name),
                                        "--data-dir", digits_data_dir, *extra])


def test_run_folder_has_the_designed_shape(tmp_path, digits_data_dir):
    results = run(tmp_path, "a", digits_data_dir)
    folder = tmp_path / "a"
    for name in ("config.json", "metrics.jsonl", "results.json", "model.json"):
        assert (folder / name).is_file(), name
    stored = json.loads((folder / "results.json").read_text())
    assert set(runs.RESULT_KEYS) <= set(stored)
    assert stored["seeds"] == [0, 1] and stored["dataset"] == "digits"
    acc = stored["beneficial_test_accuracy"]
    assert len(acc["per_seed"]) == 2 and acc["mean"] > 0.5  # 4 epochs are enough to learn
    config = json.loads((folder / "config.json").read_text())
    assert config["train"]["epochs"] == 4 and config["protocol"]["beneficial_classes"] == [0, 1, 2, 3, 4]
    epochs = [r["epoch"] for r in runs.RunDir(folder).metrics()]
    assert epochs == [1, 2, 3, 4]
    model, params, seeds = common.load_model(folder)
    assert seeds == [0, 1] and model.name == "lenet"
    assert jax.tree_util.tree_leaves(params)[0].shape[0] == 2
    assert results["beneficial_test_accuracy"] == stored["beneficial_test_accuracy"]


def test_existing_run_folder_is_never_overwritten_silently(tmp_path, digits_data_dir):
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "precious.txt").write_text("keep me")
    with pytest.raises(runs.RunExistsError, match="--overwrite"):
        run(tmp_path, "b", digits_data_dir)
    assert (tmp_path / "b" / "precious.txt").read_text() == "keep me"


def test_interrupted_then_resumed_equals_uninterrupted(tmp_path, digits_data_dir, interrupt_at):
    run(tmp_path, "full", digits_data_dir)
    _, full, _ = common.load_model(tmp_path / "full")

    with interrupt_at("epoch", 3), pytest.raises(KeyboardInterrupt):
        run(tmp_path, "cut", digits_data_dir)
    assert not (tmp_path / "cut" / "results.json").exists()

    run(tmp_path, "cut", digits_data_dir, "--resume")
    _, resumed, _ = common.load_model(tmp_path / "cut")
    jax.tree.map(np.testing.assert_array_equal, resumed, full)
    epochs = [r["epoch"] for r in runs.RunDir(tmp_path / "cut").metrics()]
    assert epochs == [1, 2, 3, 4]


def test_resume_with_other_settings_is_refused(tmp_path, digits_data_dir):
    run(tmp_path, "c", digits_data_dir)
    with pytest.raises(SystemExit, match="settings differ .*epochs"):
        train_reference.main(["--dataset", "digits", "--seeds", "2", "--epochs", "6",
                              "--workdir", str(tmp_path / "c"), "--data-dir", digits_data_dir,
                              "--resume"])


def test_bad_flags_fail_before_any_compute(tmp_path, capsys):
    with pytest.raises(SystemExit):
        train_reference.main(["--dataset", "digits", "--seeds", "0", "--workdir", str(tmp_path / "d")])
    assert "expected an integer >= 1" in capsys.readouterr().err
    with pytest.raises(ValueError, match="overlap"):
        train_reference.main(["--dataset", "digits", "--beneficial-classes", "0-5",
                              "--workdir", str(tmp_path / "e")])
    with pytest.raises(ValueError, match="learning_rate must be > 0"):
        train_reference.main(["--dataset", "digits", "--lr", "0", "--workdir", str(tmp_path / "f")])
    assert not (tmp_path / "e").exists() and not (tmp_path / "f").exists()
