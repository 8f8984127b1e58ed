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
    (runs.RunDir(path).checkpoint_dir / "1").mkdir(parents=True)
    with runs.RunDir.create(path, overwrite=True):
        assert sorted(p.name for p in path.iterdir()) == [".lock", runs.MARKER_FILE]
    with pytest.raises(runs.RunExistsError, match="--overwrite"):
        runs.RunDir.create(started_run(tmp_path / "other"))


def tree(path):
    """Every file and folder below ``path`` with its bytes (None for folders)."""
    return {p.relative_to(path).as_posix(): None if p.is_dir() else p.read_bytes()
            for p in sorted(path.rglob("*"))}


def test_overwrite_refuses_a_folder_that_is_not_a_run_and_deletes_nothing(tmp_path):
    folder = tmp_path / "d"
    (folder / "chapters").mkdir(parents=True)
    (folder / "thesis.tex").write_text("years of work")
    (folder / "chapters" / "one.tex").write_text("more")
    before = tree(folder)
    for flags in ({"overwrite": True}, {"resume": True}, {}):
        with pytest.raises(RunFolderError, match=r"d is not empty and is not a run folder"):
            runs.RunDir.create(folder, **flags)
        assert tree(folder) == before  # file by file: not even a lock or a marker was added


def test_overwrite_refuses_a_run_holding_a_file_it_did_not_write(tmp_path):
    path = started_run(tmp_path / "run")
    with runs.RunDir.create(path, resume=True) as run:
        run.file("attack_curves.png").write_bytes(b"png")
        (run.checkpoint_dir / "meta").mkdir(parents=True)
    (path / "notes.md").write_text("mine")
    before = tree(path)
    with pytest.raises(RunFolderError, match=r"--overwrite refused for .*run: it holds .*notes.md, "
                                             r"which trm_jax did not write; nothing was deleted"):
        runs.RunDir.create(path, overwrite=True)
    assert tree(path) == before
    (path / "notes.md").unlink()  # what the project wrote, alone: replaced
    with runs.RunDir.create(path, overwrite=True):
        assert sorted(p.name for p in path.iterdir()) == [".lock", runs.MARKER_FILE]


def test_overwrite_looks_into_nested_runs(tmp_path):
    """compare's methods/<m> folders are runs of their own: a file of the user's in one
    of them stops the parent's --overwrite."""
    with runs.RunDir.create(tmp_path / "cmp") as parent:
        parent.write_config({"experiment": "compare"})
        started_run(parent.file("methods") / "skd")
    (tmp_path / "cmp" / "methods" / "skd" / "keep.txt").write_text("mine")
    with pytest.raises(RunFolderError, match=r"skd/keep.txt, which trm_jax did not write"):
        runs.RunDir.create(tmp_path / "cmp", overwrite=True)
    assert (tmp_path / "cmp" / "methods" / "skd" / "keep.txt").exists()


@pytest.mark.parametrize("where", ["cwd", "parent", "home"])
def test_overwrite_never_empties_the_current_or_home_folder(tmp_path, monkeypatch, where):
    path = started_run(tmp_path / "run")
    if where == "home":
        monkeypatch.setenv("HOME", str(path))
    else:
        (path / "sub").mkdir()
        runs.RunDir(path).file("sub")
        monkeypatch.chdir(path if where == "cwd" else path / "sub")
    before = tree(path)
    with pytest.raises(RunFolderError, match=r"--overwrite refused .*: it is (the current folder|your home)"):
        runs.RunDir.create(path, overwrite=True)
    assert tree(path) == before


def test_a_run_from_before_the_marker_is_still_a_run(tmp_path):
    """Folders written by older versions (config.json naming an experiment, no marker) can
    be resumed and overwritten, but a user's file in one still stops --overwrite."""
    path = tmp_path / "old"
    (path / "checkpoints" / "head").mkdir(parents=True)
    (path / "config.json").write_text(json.dumps({"experiment": "skd"}))
    (path / "attack_curves.png").write_bytes(b"png")
    (path / "thesis.tex").write_text("mine")
    assert runs.is_run(path)
    with pytest.raises(RunFolderError, match=r"thesis.tex, which trm_jax did not write"):
        runs.RunDir.create(path, overwrite=True)
    with runs.RunDir.create(path, resume=True):  # resuming lists what is the project's, only
        assert json.loads((path / runs.MARKER_FILE).read_text())["files"] == [
            "attack_curves.png", "checkpoints", "config.json"]
    assert [p.name for p in runs.foreign_entries(path)] == ["thesis.tex"]


def test_every_writer_lists_its_file_before_writing_it(tmp_path):
    with runs.RunDir.create(tmp_path / "run") as run:
        run.write_config({"a": 1})
        run.log({"step": 1})
        run.write_json("extra.json", {})
        run.file("fig.png").write_bytes(b"")
        run.checkpoint_dir.mkdir()
    marker = json.loads((tmp_path / "run" / runs.MARKER_FILE).read_text())
    assert marker["format"] == runs.RUN_FORMAT and marker["files"] == [
        "checkpoints", "config.json", "extra.json", "fig.png", "metrics.jsonl"]
    assert runs.foreign_entries(tmp_path / "run") == []
    (tmp_path / "run" / "config.json.tmp").write_text("{")  # a write cut off by a kill: ours
    (tmp_path / "run" / f"{runs.PROBE_PREFIX}x1y2").write_text("")  # a write probe cut off
    assert runs.foreign_entries(tmp_path / "run") == []


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


def test_wall_seconds_add_up_every_process_of_a_run(tmp_path, monkeypatch):
    now = [100.0]
    monkeypatch.setattr(runs.time, "perf_counter", lambda: now[0])
    with runs.RunDir.create(tmp_path / "run") as run:  # the first process starts at t = 100
        now[0] = 107.5
        run.log({"step": 1})  # its last record, 7.5 s in; then it is killed
    now[0] = 200.0
    with runs.RunDir.create(tmp_path / "run", resume=True) as run:  # the resume
        now[0] = 203.25
        assert run.wall_seconds() == (7.5 + 3.25, 2)


def test_files_listed_from_several_threads_at_once_are_all_in_the_marker(tmp_path):
    """``compare --workers`` lists each method's folder from its own thread: the marker's
    read-modify-write must not lose one thread's name to another's."""
    import threading

    with runs.RunDir.create(tmp_path / "run") as run:
        start = threading.Barrier(8)

        def job(i: int) -> None:
            start.wait()
            for j in range(20):
                run.file(f"t{i}_{j}")

        threads = [threading.Thread(target=job, args=(i,)) for i in range(8)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        listed = set(json.loads((run.path / runs.MARKER_FILE).read_text())["files"])
    assert {f"t{i}_{j}" for i in range(8) for j in range(20)} <= listed
