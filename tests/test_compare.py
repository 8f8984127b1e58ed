"""``experiments.compare`` end to end on a tiny digits configuration (slow)."""
import json
import math

import pytest

from experiments import compare

TINY_METHOD_ARGS = [
    "reference:--epochs 2",
    "unsir:--epochs 2 --noise-steps 2 --attack-epochs 1",
    "skd:--teacher-epochs 2 --distill-epochs 2 --head-epochs 2 --attack-epochs 1",
    "reverse_maml:--meta-steps 3 --shots 2 --queries 2 --good-tasks 1 --bad-tasks 1 --inner-steps 1 --attack-epochs 1 --head-epochs 1",
    "reverse_maml_fo:--meta-steps 3 --shots 2 --queries 2 --good-tasks 1 --bad-tasks 1 --inner-steps 1 --attack-epochs 1 --head-epochs 1",
]


def finite_numbers(value):
    if isinstance(value, dict):
        for v in value.values():
            yield from finite_numbers(v)
    elif isinstance(value, list):
        for v in value:
            yield from finite_numbers(v)
    elif isinstance(value, (int, float)) and not isinstance(value, bool):
        yield value


@pytest.mark.slow
def test_compare_writes_every_output_with_finite_numbers(tmp_path, digits_data_dir):
    argv = ["--dataset", "digits", "--seeds", "2", "--workdir", str(tmp_path / "cmp"),
            "--data-dir", digits_data_dir, "--attacks", "linear_probe,full_finetune",
            "--attack-optimizers", "adam", "--attack-lrs", "0.01", "--attack-epochs", "1",
            "--no-progress"]
    for item in TINY_METHOD_ARGS:
        argv += ["--method-args", item]
    results = compare.main(argv)
    folder = tmp_path / "cmp"
    for name in ("config.json", "results.json", "results.md", "fig1_beneficial_accuracy.png",
                 "fig2_attack_curves.png"):
        assert (folder / name).is_file() and (folder / name).stat().st_size > 0, name
    stored = json.loads((folder / "results.json").read_text())
    assert set(stored["beneficial_test_accuracy"]) == set(compare.METHODS)
    numbers = [x for k, v in stored.items() if k != "methods" for x in finite_numbers(v)]
    assert numbers and all(math.isfinite(x) for x in numbers)
    table = (folder / "results.md").read_text()
    for label in ("Unprotected reference", "UNSIR", "SKD", "Reverse-MAML (exact)", "first-order"):
        assert label in table
    assert len(results["table"]) == len(compare.METHODS)
    # A second run reuses every finished method folder.
    again = compare.main(argv + ["--resume"])
    assert again["beneficial_test_accuracy"] == results["beneficial_test_accuracy"]
