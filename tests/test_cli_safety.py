"""Nothing lost, nothing computed in vain: the experiments' pre-flight checks.

Every bad input of this file fails before any compute (the compute entry points are
replaced by functions that raise: conftest's ``no_compute``), with ONE line naming the flag and exit code 2, and
leaves nothing behind; ``--overwrite`` never deletes what the project did not write.
"""
from __future__ import annotations

import os
import pathlib
import subprocess
import sys

import pytest

from experiments import _cli, attack, compare, reverse_maml, skd, train_reference
from trm_jax import errors, runs

ROOT = pathlib.Path(__file__).resolve().parents[1]
# A path no process can write, root included (sysfs refuses new files) ...
UNWRITABLE = pathlib.Path("/sys/trm_jax_qa")
# ... and one whose parent does not exist and cannot be made (procfs).
UNCREATABLE = pathlib.Path("/proc/trm_jax_qa/sub")


def run_cli(module, args, capsys):
    code = _cli.main(module.main, args)
    return code, capsys.readouterr().err


def assert_one_line(code, err, *parts):
    assert code == 2 and err.startswith("error: ") and err.count("\n") == 1, err
    assert "Traceback" not in err and all(p in err for p in parts), err


def tree(path: pathlib.Path) -> dict[str, bytes | None]:
    return {p.relative_to(path).as_posix(): None if p.is_dir() else p.read_bytes()
            for p in sorted(path.rglob("*"))}


def digits(data_dir, workdir, *extra) -> list[str]:
    return ["--dataset", "digits", "--seeds", "1", "--no-progress", "--data-dir", data_dir,
            "--workdir", str(workdir), *extra]


# ----------------------------------------------------------------------------- run folders


def test_overwrite_of_a_folder_with_a_foreign_file_deletes_nothing(digits_data_dir, tmp_path,
                                                                    capsys, no_compute):
    folder = tmp_path / "d"
    (folder / "figures").mkdir(parents=True)
    (folder / "thesis.tex").write_text("years of work")
    (folder / "figures" / "f.pdf").write_bytes(b"%PDF")
    before = tree(folder)
    for flag in ("--overwrite", "--resume"):
        code, err = run_cli(reverse_maml, digits(digits_data_dir, folder, "--meta-steps", "10", flag),
                            capsys)
        assert_one_line(code, err, "is not a run folder", "nothing else is ever deleted")
        assert tree(folder) == before  # file by file, bytes included


def test_overwrite_of_a_run_holding_a_users_file_deletes_nothing(digits_data_dir, tmp_path,
                                                                  capsys, no_compute):
    folder = tmp_path / "run"
    with runs.RunDir.create(folder) as run:
        run.write_config({"experiment": "reverse_maml"})
        run.log({"phase": "meta", "step": 1})
    (folder / "my_notes.md").write_text("mine")
    before = tree(folder)
    code, err = run_cli(reverse_maml, digits(digits_data_dir, folder, "--overwrite"), capsys)
    assert_one_line(code, err, "--overwrite refused", "my_notes.md", "nothing was deleted")
    assert tree(folder) == before


def test_overwrite_of_the_current_folder_is_refused(digits_data_dir, tmp_path, capsys,
                                                    monkeypatch, no_compute):
    with runs.RunDir.create(tmp_path / "run") as run:
        run.write_config({"experiment": "reverse_maml"})
    monkeypatch.chdir(tmp_path / "run")
    before = tree(tmp_path)
    code, err = run_cli(reverse_maml, digits(digits_data_dir, ".", "--overwrite"), capsys)
    assert_one_line(code, err, "it is the current folder")
    assert tree(tmp_path) == before


# ----------------------------------------------------------------------------- unwritable paths


@pytest.mark.parametrize("where", ["unwritable", "uncreatable", "under_a_file"])
def test_a_workdir_that_cannot_be_written_is_one_line_and_leaves_nothing(
        where, digits_data_dir, tmp_path, capsys, no_compute):
    (tmp_path / "file.txt").write_text("x")
    workdir = {"unwritable": UNWRITABLE, "uncreatable": UNCREATABLE,
               "under_a_file": tmp_path / "file.txt" / "sub"}[where]
    code, err = run_cli(train_reference, digits(digits_data_dir, workdir), capsys)
    assert_one_line(code, err, f"--workdir {workdir}")
    assert not workdir.exists() and (tmp_path / "file.txt").read_text() == "x"


@pytest.mark.parametrize("where", ["unwritable", "a_file"])
def test_a_data_dir_that_cannot_be_used_is_one_line(where, tmp_path, capsys, no_compute):
    (tmp_path / "file.txt").write_text("x")
    data_dir = {"unwritable": UNWRITABLE, "a_file": tmp_path / "file.txt"}[where]
    code, err = run_cli(train_reference, digits(str(data_dir), tmp_path / "w"), capsys)
    assert_one_line(code, err, f"--data-dir {data_dir}")
    assert not (tmp_path / "w").exists()


def test_an_existing_data_dir_where_digits_cannot_be_prepared_is_one_line(tmp_path, capsys,
                                                                          no_compute):
    # /sys/kernel exists and can be read, but nothing can be prepared in it.
    code, err = run_cli(train_reference, digits("/sys/kernel", tmp_path / "w"), capsys)
    assert_one_line(code, err, "'digits' is not prepared in data_dir='/sys/kernel'",
                    "writable --data-dir")
    assert not (tmp_path / "w").exists()


@pytest.mark.parametrize("where", ["unwritable", "a_file"])
def test_a_compilation_cache_that_cannot_be_written_is_one_line_and_no_stub_folder(
        where, digits_data_dir, tmp_path, capsys, monkeypatch, no_compute):
    (tmp_path / "file.txt").write_text("x")
    cache = {"unwritable": UNWRITABLE, "a_file": tmp_path / "file.txt"}[where]
    monkeypatch.delenv("TRM_JAX_NO_COMPILE_CACHE", raising=False)
    monkeypatch.setenv("TRM_JAX_CACHE_DIR", str(cache))
    import jax

    saved = jax.config.jax_compilation_cache_dir  # the test session's own cache: none for the run
    jax.config.update("jax_compilation_cache_dir", None)
    try:
        code, err = run_cli(train_reference, digits(digits_data_dir, tmp_path / "w"), capsys)
    finally:
        jax.config.update("jax_compilation_cache_dir", saved)
    assert_one_line(code, err, f"the compilation cache {cache}", "--no-compile-cache")
    assert not (tmp_path / "w").exists()  # no stub run folder: the rerun is not "already exists"


def test_a_run_folder_is_removed_when_opening_it_fails_after_it_was_made(tmp_path, monkeypatch):
    """Past the pre-flight (e.g. the cache folder removed in between): the folder this
    process had just made goes again; an existing run folder stays."""
    from trm_jax import compilation

    def broken(*args, **kwargs):
        raise errors.ConfigError("the compilation cache folder cannot be created")

    monkeypatch.setattr(compilation, "enable_persistent_cache", broken)
    options = _cli.RunOptions(workdir=str(tmp_path / "new"))
    with pytest.raises(errors.ConfigError):
        _cli.Run("x", _cli.Experiment(), options)
    assert not (tmp_path / "new").exists()


# ----------------------------------------------------------------------------- settings


@pytest.mark.parametrize("module, args, message", [
    (reverse_maml, ["--attack.batch-size", "100000"],
     "--attack.batch-size=100000 exceeds the 262 malicious fine-tuning examples"),
    (skd, ["--beneficial-classes", "0", "--malicious-classes", "9"],
     "--malicious-classes=[9]: the attacks train a classifier of the malicious classes and need "
     "at least 2"),
    (reverse_maml, ["--meta.inner-lr", "inf"], "--meta.inner-lr must be finite and > 0, got inf"),
    (reverse_maml, ["--meta.lam", "nan"], "--meta.lam must be finite and >= 0"),
    (reverse_maml, ["--reference.train.batch-size", "100000"],
     "--reference.train.batch-size=100000 exceeds the 416 training examples"),
    (skd, ["--teacher.batch-size", "5000"], "--teacher.batch-size=5000 exceeds"),
    (compare, ["--skd.head.batch-size", "5000"], "--skd.head.batch-size=5000 exceeds"),
    (compare, ["--reverse-maml.meta.inner-lr", "-1"], "--reverse-maml.meta.inner-lr must be finite"),
    (reverse_maml, ["--reference.train.optimizer", "adamw"],
     "invalid choice 'adamw' for argument '--reference.train.optimizer'. Expected one of "
     "('adam', 'sgd', 'momentum')."),
    (reverse_maml, ["--inner-steps", "10"],
     "Unrecognized options: --inner-steps, 10; perhaps you meant --meta.inner-steps"),
    (reverse_maml, ["--attack.learning-rates", "0.1", "inf"],
     "--attack.learning-rates must be a tuple of >= 1 values, each finite and > 0 (or None), "
     "got (0.1, inf)"),
    (train_reference, ["--dataset", "cifar10"], "--dataset given 2 times (['digits', 'cifar10'])"),
    (compare, ["--checkpoint-seconds", "-1"], "--checkpoint-seconds must be finite and >= 0, got -1.0"),
    # Each error names its own flag (the budgets and the optimizers were blamed on
    # --attack.data-per-class and --attack.attacks; head.trainable was not a flag).
    (reverse_maml, ["--attack.steps-multipliers", "0"], "--attack.steps-multipliers must be"),
    (reverse_maml, ["--attack.optimizers", "lion"], "--attack.optimizers must be"),
    (reverse_maml, ["--head.trainable", "all"], "--head.trainable must be ('head',)"),
    (reverse_maml, ["--head.b1", "2"], "--head.b1 must be finite and in [0, 1), got 2.0"),
    (reverse_maml, ["--head.momentum", "nan"], "--head.momentum must be finite and in [0, 1)"),
    (reverse_maml, ["--meta-steps", str(2**63)], "--meta-steps must be an integer >= 1, got "
                                                 "9223372036854775808 (beyond int64)"),
])
def test_bad_settings_fail_before_compute_naming_the_flag(module, args, message, digits_data_dir,
                                                          tmp_path, capsys, no_compute):
    code, err = run_cli(module, digits(digits_data_dir, tmp_path / "w", *args), capsys)
    assert_one_line(code, err, message)
    assert "Config." not in err and not (tmp_path / "w").exists()


def test_every_flag_maps_to_its_field():
    flags = _cli.flag_names(compare.Config)
    assert flags["reverse_maml.meta.inner_lr"] == "--reverse-maml.meta.inner-lr"
    assert flags["protocol.malicious_classes"] == "--malicious-classes"  # FLAT: no prefix
    assert flags["run.overwrite"] == "--overwrite"
    assert _cli.flag_names(reverse_maml.Config)["method.meta.inner_lr"] == "--meta.inner-lr"


@pytest.mark.parametrize("args, message", [
    (["--meta.meta-grad", "x"], "invalid choice 'x' for argument '--meta.meta-grad'. Expected one "
                                "of ('exact', 'first_order', 'reptile')."),
    (["--seeds", "x"], "Error parsing --seeds: invalid literal for int() with base 10: 'x'"),
])
def test_tyros_messages_are_one_whole_line(args, message):
    """tyro's box (title, message, help) -> its message, never cut where tyro wrapped it."""
    with pytest.raises(errors.ConfigError) as err:
        _cli.parse(reverse_maml.Config, reverse_maml.defaults, ["--dataset", "digits", *args],
                   prog="p", description="")
    assert str(err.value) == message


def test_attack_cli_without_or_with_a_wrong_run(tmp_path, capsys, no_compute):
    code, err = run_cli(attack, [], capsys)
    assert_one_line(code, err, "--run is required")
    (tmp_path / "file.txt").write_text("x")
    code, err = run_cli(attack, ["--run", str(tmp_path / "file.txt")], capsys)
    assert_one_line(code, err, "is a file, not a run folder")


def test_attack_on_a_run_that_did_not_finish_says_so(tmp_path, capsys, no_compute):
    with runs.RunDir.create(tmp_path / "failed") as run:  # what a NaN stop leaves
        run.write_config({"experiment": "reverse_maml", "dataset": "digits"})
    code, err = run_cli(attack, ["--run", str(tmp_path / "failed")], capsys)
    assert_one_line(code, err, "the run did not finish", "--resume")


def test_a_real_process_prints_exactly_one_line(digits_data_dir, tmp_path):
    """No absl/TFDS warning, no progress bar before the error (a fresh process, where TFDS
    warns once per process)."""
    env = {**os.environ, "TRM_JAX_NO_COMPILE_CACHE": "1"}
    out = subprocess.run([sys.executable, "-m", "experiments.reverse_maml",
                          *digits(digits_data_dir, tmp_path / "w", "--attack.batch-size", "100000")],
                         cwd=ROOT, capture_output=True, text=True, timeout=300, env=env)
    assert out.returncode == 2, out.stderr
    assert out.stderr.splitlines() == [
        "error: --attack.batch-size=100000 exceeds the 262 malicious fine-tuning examples the "
        "attacks train on; allowed: 1..262"], out.stderr
