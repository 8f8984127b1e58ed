"""Run folders survive interruptions: cut-off metrics lines, a second writer, corrupt JSON."""
import json
import os
import pathlib
import re
import signal
import subprocess
import sys
import textwrap

import pytest

from trm_jax import runs
from trm_jax.errors import RunFolderError, RunNotFoundError

ROOT = pathlib.Path(__file__).resolve().parents[1]


def started_run(path, records=3):
    with runs.RunDir.create(path) as run:
        run.write_config({"lr": 0.1})
        for step in range(1, records + 1):
            run.log({"step": step, "loss": 1.0 / step})
    return path


def test_cut_off_last_metrics_line_is_dropped_and_resume_goes_on(tmp_path):
    path = started_run(tmp_path / "run")
    with open(path / "metrics.jsonl", "a") as f:
        f.write('{"step": 4, "lo')  # what a kill in the middle of a write leaves
    with pytest.warns(UserWarning, match=r"metrics.jsonl: dropped its cut-off last line 4"):
        assert [r["step"] for r in runs.RunDir(path).metrics()] == [1, 2, 3]
    with pytest.warns(UserWarning, match="cut-off"):
        run = runs.RunDir.create(path, resume=True)  # rewrites the file without the partial line
    with run:
        run.log({"step": 4, "loss": 0.25})
    assert (path / "metrics.jsonl").read_text().count("\n") == 4
    assert [r["step"] for r in runs.RunDir(path).metrics()] == [1, 2, 3, 4]


def test_complete_last_line_without_newline_is_kept(tmp_path):
    path = started_run(tmp_path / "run")
    with open(path / "metrics.jsonl", "a") as f:
        f.write('{"step": 4}')  # cut just before its newline: the record is whole
    with runs.RunDir.create(path, resume=True) as run:
        run.log({"step": 5})
    assert [r["step"] for r in run.metrics()] == [1, 2, 3, 4, 5]


def test_corrupt_metrics_line_in_the_middle_names_file_and_line(tmp_path):
    path = started_run(tmp_path / "run")
    lines = (path / "metrics.jsonl").read_text().splitlines(keepends=True)
    lines[1] = '{"step": 2, "lo\n'
    (path / "metrics.jsonl").write_text("".join(lines))
    with pytest.raises(RunFolderError, match=r"metrics.jsonl line 2 is corrupt"):
        runs.RunDir(path).metrics()
    with pytest.raises(RunFolderError, match=r"metrics.jsonl line 2 is corrupt"):
        runs.RunDir.create(path, resume=True)
    assert runs.lock_holder(path) is None  # the failed resume released its lock


def test_truncate_metrics_keeps_the_selected_records(tmp_path):
    path = started_run(tmp_path / "run", records=5)
    with runs.RunDir.create(path, resume=True) as run:
        run.truncate_metrics(lambda r: r["step"] <= 2)
        assert [r["step"] for r in run.metrics()] == [1, 2]


HOLDER = textwrap.dedent("""
    import sys
    from trm_jax import runs
    run = runs.RunDir.create(sys.argv[1], resume=sys.argv[2] == "resume")
    print("locked", flush=True)
    sys.stdin.readline()  # hold the lock until killed
""")


def hold_lock(path, mode="create"):
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(path), mode], cwd=ROOT,
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "locked"
    return holder


def test_a_second_writer_process_is_refused_until_the_first_dies(tmp_path):
    path = started_run(tmp_path / "run")
    holder = hold_lock(path, "resume")
    try:
        assert runs.lock_holder(path) == holder.pid
        for flags in ({"resume": True}, {"overwrite": True}):
            with pytest.raises(RunFolderError, match=re.escape(
                    f"{path} is being written by another process (pid {holder.pid})")):
                runs.RunDir.create(path, **flags)
        assert (path / "config.json").exists()  # --overwrite deleted nothing under the writer
        assert len(runs.RunDir.open(path).metrics()) == 3  # readers take no lock
    finally:
        holder.send_signal(signal.SIGKILL)  # flock locks die with their process, even kill -9
        holder.wait()
    assert runs.lock_holder(path) is None
    with runs.RunDir.create(path, resume=True) as run:
        assert runs.lock_holder(path) == os.getpid()
        run.log({"step": 4})
    assert runs.lock_holder(path) is None  # close() released it


def test_the_lock_is_released_by_close_and_reentrant_in_one_process(tmp_path):
    path = tmp_path / "run"
    first = runs.RunDir.create(path)
    first.write_config({})
    second = runs.RunDir.create(path, resume=True)  # same process: allowed
    first.close()
    assert runs.lock_holder(path) == os.getpid()  # `second` still holds it
    second.close()
    second.close()
    holder = hold_lock(path, "resume")  # another process may now write it
    holder.kill()
    holder.wait()


def test_overwrite_empties_the_folder_but_keeps_the_lock_file(tmp_path):
    path = started_run(tmp_path / "run")
    (path / "checkpoints" / "1").mkdir(parents=True)
    with runs.RunDir.create(path, overwrite=True):
        assert sorted(p.name for p in path.iterdir()) == [".lock"]
    with pytest.raises(runs.RunExistsError, match="--overwrite"):
        runs.RunDir.create(started_run(tmp_path / "other"))


@pytest.mark.parametrize("name, advice", [("config.json", "--overwrite or another --workdir"),
                                          ("results.json", "--resume"),
                                          ("model.json", "--resume")])
def test_corrupt_json_names_the_file_and_what_to_do(tmp_path, name, advice):
    path = started_run(tmp_path / "run")
    (path / name).write_text('{"lr": 0.')
    with pytest.raises(RunFolderError) as err:
        runs.RunDir.open(path).read_json(name)
    message = str(err.value)
    assert f"{path / name} is corrupt (not valid JSON" in message and advice in message
    assert not isinstance(err.value, json.JSONDecodeError)


def test_messages_for_missing_and_empty_folders(tmp_path):
    with pytest.raises(RunNotFoundError, match=r"--resume given but run folder .*missing does not exist"):
        runs.RunDir.create(tmp_path / "missing", resume=True)
    (tmp_path / "empty").mkdir()
    with pytest.raises(RunNotFoundError, match=r"empty is empty: there is no run to resume") as err:
        runs.RunDir.create(tmp_path / "empty", resume=True)
    assert "does not exist" not in str(err.value)
    with pytest.raises(RunNotFoundError, match=r"run folder .*missing does not exist"):
        runs.RunDir.open(tmp_path / "missing")
    with pytest.raises(RunNotFoundError, match="is not a run folder"):
        runs.RunDir.open(tmp_path / "empty")
    with pytest.raises(FileNotFoundError, match="results.json does not exist"):  # old callers
        runs.RunDir.open(started_run(tmp_path / "run")).results()
    (tmp_path / "file").write_text("")
    with pytest.raises(RunFolderError, match="is not a folder"):
        runs.RunDir.create(tmp_path / "file")
