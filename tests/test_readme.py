"""The README's code runs as written."""
from __future__ import annotations

import pathlib
import re

import numpy as np

ROOT = pathlib.Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def block(name: str) -> str:
    match = re.search(rf"<!-- {name}:start -->\s*```\w*\n(.*?)```\s*<!-- {name}:end -->", README,
                      re.DOTALL)
    assert match, f"no {name} block in README.md"
    return match.group(1)


def test_library_example_runs_as_written(digits_data_dir, monkeypatch, capsys):
    monkeypatch.setenv("TFDS_DATA_DIR", digits_data_dir)  # the prepared digits, not ~/
    namespace: dict = {}
    exec(compile(block("library"), "README.md:library", "exec"), namespace)
    protected, report = namespace["protected"], namespace["report"]
    accuracy = np.asarray(protected.metrics["beneficial_test_accuracy"])
    assert accuracy.shape == (2,) and np.all(accuracy > 0.5)
    assert set(report["attacks"]) == {"linear_probe", "full_finetune"}
    assert "scratch" in report["references"] and "unprotected/linear_probe" in report["references"]
    assert "linear_probe" in capsys.readouterr().out
