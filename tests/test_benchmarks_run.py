"""Smoke test of the one-command benchmark runner on its cheapest bench."""
import json

from benchmarks import run


def test_run_writes_a_table_and_json_with_ratios(tmp_path, capsys):
    out = tmp_path / "bench.json"
    rows = run.main(["--quick", "--bench", "train_epoch", "--no-torch", "--repeats", "1",
                     "--device-label", "test", "--out", str(out)])
    assert {r.impl for r in rows} == {"jax step", "jax scan"}
    assert all(r.median > 0 and r.unit == "images/s" for r in rows)
    scan = next(r for r in rows if r.impl == "jax scan")
    assert scan.reference == "jax step" and scan.ratio > 0
    stored = json.loads(out.read_text())
    assert "| train_epoch" in capsys.readouterr().out
    assert json.dumps(stored).count("train_epoch") >= 2
