"""Fault injection: what a user placed is never deleted, at any depth; a full or failing
disk is one line and leaves the run resumable; a lost peer is one line.

Disk-full cases run on a real, tiny tmpfs where this machine lets the test mount one (as
root), and by injecting ``ENOSPC``/``EIO`` into the project's own write calls elsewhere.
"""
from __future__ import annotations

import contextlib
import errno
import json
import os
import pathlib
import shutil
import subprocess
import sys
import time
import uuid

import jax.numpy as jnp
import numpy as np
import pytest

from experiments import _cli, reverse_maml, train_reference
from trm_jax import checkpoint, data, errors, runs

ROOT = pathlib.Path(__file__).resolve().parents[1]
TINY_RM = ["--meta.shots", "2", "--meta.queries", "2", "--meta.good-tasks", "1",
           "--meta.bad-tasks", "1", "--meta.inner-steps", "1", "--meta-steps", "2",
           "--head.epochs", "1", "--reference.train.epochs", "2", "--attack.epochs", "1",
           "--attack.learning-rates", "0.1", "--checkpoint-every", "1", "--checkpoint-seconds", "0"]
TINY_REF = ["--train.epochs", "2",
            "--checkpoint-every", "1", "--checkpoint-seconds", "0"]


def tree(path: pathlib.Path) -> dict[str, bytes | None]:
    return {p.relative_to(path).as_posix(): None if p.is_dir() else p.read_bytes()
            for p in sorted(path.rglob("*"))}


def digits(data_dir: str, workdir: pathlib.Path, *extra: str) -> list[str]:
    return ["--dataset", "digits", "--seeds", "1", "--no-progress", "--data-dir", data_dir,
            "--workdir", str(workdir), *extra]


def run_cli(module, args, capsys) -> tuple[int, str]:
    code = _cli.main(module.main, args)
    return code, capsys.readouterr().err


def assert_one_line(code: int, err: str, *parts: str) -> None:
    lines = [ln for ln in err.splitlines() if not ln.startswith("warning: ")]
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error: "), err
    assert "Traceback" not in err and all(p in err for p in parts), err


def state(value: float = 1.0) -> dict:
    return {"w": jnp.full((3, 4), value), "b": jnp.zeros(4)}


# ------------------------------------------------------------ ownership at every depth


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, digits_data_dir) -> pathlib.Path:
    """A finished tiny Reverse-MAML run folder, copied by each test that changes it."""
    folder = tmp_path_factory.mktemp("finished") / "run"
    assert _cli.main(reverse_maml.main, digits(digits_data_dir, folder, *TINY_RM)) == 0
    return folder


@pytest.mark.parametrize("where", [
    "checkpoints/my_notes.txt",                  # the reproduction
    "checkpoints/meta/my_notes.txt",             # beside orbax's steps
    "checkpoints/meta/2/state/my_notes.txt",     # inside a step, among orbax's files
    "checkpoints/model/0/mine/deep/notes.txt",   # a folder of the user's inside a step
    "checkpoints/mine/notes.txt",                # a folder beside the phases
])
def test_overwrite_refuses_a_users_file_at_any_depth(finished_run, tmp_path, digits_data_dir,
                                                     capsys, where):
    folder = tmp_path / "run"
    shutil.copytree(finished_run, folder, symlinks=True)
    (folder / where).parent.mkdir(parents=True, exist_ok=True)
    (folder / where).write_text("mine")
    before = tree(folder)
    code, err = run_cli(reverse_maml, digits(digits_data_dir, folder, *TINY_RM, "--overwrite"),
                        capsys)
    first = where.split("/mine/")[0] + "/mine" if "/mine/" in where else where
    assert_one_line(code, err, "--overwrite refused", first, "nothing was deleted")
    assert tree(folder) == before  # file by file, bytes included


def test_overwrite_of_a_whole_run_of_ours_still_works(finished_run, tmp_path, digits_data_dir,
                                                      capsys):
    folder = tmp_path / "run"
    shutil.copytree(finished_run, folder, symlinks=True)
    assert runs.foreign_entries(folder) == []
    (folder / "checkpoints" / "meta" / "stale.orbax-checkpoint-tmp-1").mkdir()  # not claimed
    assert runs.foreign_entries(folder) == [folder / "checkpoints/meta/stale.orbax-checkpoint-tmp-1"]
    (folder / "checkpoints" / "meta" / "stale.orbax-checkpoint-tmp-1").rmdir()
    code, _ = run_cli(reverse_maml, digits(digits_data_dir, folder, *TINY_RM, "--overwrite"), capsys)
    assert code == 0 and (folder / "results.json").is_file()


def test_attack_overwrite_replaces_only_its_own_output(finished_run, tmp_path, capsys, no_compute):
    from experiments import attack

    folder = tmp_path / "run"
    shutil.copytree(finished_run, folder, symlinks=True)
    (folder / "mine.json").write_text("my analysis")
    code, err = run_cli(attack, ["--run", str(folder), "--output", "mine.json", "--overwrite"],
                        capsys)
    assert_one_line(code, err, "--overwrite refused", "mine.json", "nothing was replaced")
    assert (folder / "mine.json").read_text() == "my analysis"


def test_a_symlink_placed_in_a_checkpoint_is_foreign_and_its_target_survives(tmp_path):
    ckpt_dir = tmp_path / "ckpt"
    with checkpoint.Checkpointer(ckpt_dir) as ckpt:
        ckpt.save(1, state())
    target = tmp_path / "precious"
    target.mkdir()
    (target / "data.bin").write_bytes(b"1234")
    (ckpt_dir / "1" / "link").symlink_to(target)
    assert checkpoint.foreign_files(ckpt_dir) == [ckpt_dir / "1" / "link"]


def test_a_save_cut_off_by_a_kill_is_ours_and_an_unclaimed_step_is_not(tmp_path):
    ckpt_dir = tmp_path / "ckpt"
    with checkpoint.Checkpointer(ckpt_dir) as ckpt:
        ckpt.save(1, state())
    with open(ckpt_dir / checkpoint.MANIFEST, "a") as f:  # as a kill inside orbax's save leaves it
        f.write(json.dumps({"writing": "2"}) + "\n")
    (ckpt_dir / f"2{checkpoint.TMP_SUFFIX}-123" / "state").mkdir(parents=True)
    (ckpt_dir / f"2{checkpoint.TMP_SUFFIX}-123" / "state" / "half").write_bytes(b"x")
    assert checkpoint.foreign_files(ckpt_dir) == []
    (ckpt_dir / "3").mkdir()  # orbax-shaped, but no save of step 3 was ever started
    assert checkpoint.foreign_files(ckpt_dir) == [ckpt_dir / "3"]


def test_old_steps_are_pruned_unless_they_hold_a_users_file(tmp_path):
    ckpt_dir = tmp_path / "ckpt"
    with checkpoint.Checkpointer(ckpt_dir, max_to_keep=2) as ckpt:
        ckpt.save(1, state(1.0))
        (ckpt_dir / "1" / "notes.txt").write_text("mine")
        ckpt.save(2, state(2.0))
        with pytest.warns(UserWarning, match="kept old checkpoint step 1"):
            ckpt.save(3, state(3.0))
        assert ckpt.all_steps() == [1, 2, 3] and (ckpt_dir / "1" / "notes.txt").read_text() == "mine"
        ckpt.save(4, state(4.0))  # step 2 holds nothing of the user's: removed
        assert 2 not in ckpt.all_steps()
        restored, meta = ckpt.restore(state())
        assert meta["restored_step"] == 4 and float(restored["w"][0, 0]) == 4.0
        with pytest.raises(errors.CheckpointError, match="notes.txt"):
            ckpt.save(1, state(5.0))  # replacing step 1 would delete the user's file


def test_a_corrupt_step_is_set_aside_and_stays_ours(tmp_path):
    ckpt_dir = tmp_path / "ckpt"
    with checkpoint.Checkpointer(ckpt_dir) as ckpt:
        ckpt.save(1, state(1.0))
        ckpt.save(2, state(2.0))
    for f in (ckpt_dir / "2").rglob("manifest.ocdbt"):
        f.unlink()
    with checkpoint.Checkpointer(ckpt_dir) as ckpt, pytest.warns(UserWarning, match="corrupt"):
        _, meta = ckpt.restore(state())
    assert meta["restored_step"] == 1 and (ckpt_dir / "2.corrupt").is_dir()
    assert checkpoint.foreign_files(ckpt_dir) == []
    (ckpt_dir / "2.corrupt" / "mine.txt").write_text("x")
    assert checkpoint.foreign_files(ckpt_dir) == [ckpt_dir / "2.corrupt" / "mine.txt"]


def test_nested_files_of_a_run_are_listed_and_others_are_foreign(tmp_path):
    folder = tmp_path / "run"
    with runs.RunDir.create(folder) as run:
        run.file("variants").mkdir()
        run.file("variants/a.json").write_text("{}")
        inner = runs.RunDir.create(run.file("methods") / "skd")
        inner.write_config({"experiment": "skd"})
        inner.close()
    assert runs.foreign_entries(folder) == []
    (folder / "variants" / "b.json").write_text("{}")       # looks like ours, is not listed
    (folder / "methods" / "notes.txt").write_text("mine")  # beside a method's run folder
    (folder / "methods" / "skd" / "mine.txt").write_text("mine")
    assert runs.foreign_entries(folder) == [folder / "methods/notes.txt",
                                            folder / "methods/skd/mine.txt",
                                            folder / "variants/b.json"]
    with pytest.raises(errors.RunFolderError, match="not a path inside"):
        runs.RunDir(folder).file("../outside.txt")


def test_a_run_from_before_nested_listing_is_judged_by_its_names(tmp_path):
    folder = tmp_path / "old"
    (folder / "variants").mkdir(parents=True)
    (folder / "variants" / "validation-0.json").write_text("{}")
    (folder / "checkpoints" / "meta" / "5" / "state").mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps({"experiment": "reverse_maml"}))
    (folder / runs.MARKER_FILE).write_text(json.dumps(
        {"format": 1, "files": ["config.json", "variants", "checkpoints"], "seconds": [1.0]}))
    assert runs.foreign_entries(folder) == []
    (folder / "checkpoints" / "meta" / "notes.txt").write_text("mine")
    assert runs.foreign_entries(folder) == [folder / "checkpoints/meta/notes.txt"]


# ------------------------------------------------------------ SIGKILL inside a save

KILL_AT = """
import os, signal, sys
from trm_jax import checkpoint

phase, step, moment = sys.argv[1], sys.argv[2], sys.argv[3]
note, save = checkpoint.Checkpointer._note, checkpoint.Checkpointer.save

def here(self):
    return os.path.basename(self.directory) == phase

def killing_note(self, event):
    if here(self) and event.get(moment) == step:  # 'writing': orbax has not begun;
        os.kill(os.getpid(), signal.SIGKILL)      # 'wrote': orbax is done, not yet noted
    note(self, event)

def killing_save(self, s, *args, **kwargs):
    save(self, s, *args, **kwargs)
    if here(self) and moment == "saved" and str(s) == step:
        os.kill(os.getpid(), signal.SIGKILL)

checkpoint.Checkpointer._note, checkpoint.Checkpointer.save = killing_note, killing_save
from experiments import _cli, reverse_maml
sys.exit(_cli.main(reverse_maml.main, sys.argv[4:]))
"""
# (phase, its last step): every checkpoint folder of a Reverse-MAML run.
PHASES = [("reference", "2"), ("meta", "2"), ("head", "1"), ("model", "0")]


@pytest.mark.slow
@pytest.mark.parametrize("moment", ["writing", "wrote", "saved"])
@pytest.mark.parametrize("phase,step", PHASES)
def test_sigkill_inside_each_phases_save_resumes_to_the_same_numbers(
        finished_run, digits_data_dir, tmp_path, capsys, phase, step, moment):
    """SIGKILL before orbax writes a step (claimed), after orbax wrote it (not yet in the
    manifest), and after the save: --resume finishes with the numbers of the uninterrupted
    run, and the folder holds nothing foreign (so --overwrite would still work)."""
    folder = tmp_path / "run"
    args = digits(digits_data_dir, folder, *TINY_RM, "--meta-checkpoint-every", "1")
    done = subprocess.run([sys.executable, "-c", KILL_AT, phase, step, moment, *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == -9, done.stderr[-2000:]
    assert not (folder / "results.json").exists()
    assert runs.foreign_entries(folder) == []
    assert _cli.main(reverse_maml.main, [*args, "--resume"]) == 0
    assert numbers(folder) == numbers(finished_run)
    assert runs.foreign_entries(folder) == []


# ------------------------------------------------------------ a full or failing disk


@contextlib.contextmanager
def tiny_filesystem(size: str):
    """A tmpfs of ``size`` mounted for the test (skipped where mounting is not allowed)."""
    mount = pathlib.Path("/tmp") / f"trm_jax_tiny_{uuid.uuid4().hex[:8]}"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(mount)],
                          capture_output=True)
    if done.returncode != 0:
        mount.rmdir()
        pytest.skip(f"cannot mount a tmpfs here ({done.stderr.decode().strip()[:80]})")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], capture_output=True)
        mount.rmdir()


def fill(folder: pathlib.Path, leave: int = 0) -> None:
    """Fills ``folder``'s filesystem, leaving about ``leave`` bytes free."""
    with open(folder / "filler", "wb") as f:
        while shutil.disk_usage(folder).free > leave:
            try:
                f.write(b"\0" * max(512, min(1 << 20, shutil.disk_usage(folder).free - leave)))
                f.flush()
            except OSError:
                break


@pytest.mark.parametrize("write", ["marker", "config", "metrics", "checkpoint", "results",
                                   "figure"])
def test_an_injected_full_disk_is_one_line_and_the_run_resumes(write, digits_data_dir, tmp_path,
                                                               capsys, monkeypatch):
    """ENOSPC (EIO for the figure) at each of the run folder's write paths: one line, exit 2;
    then, with space again, --resume (or a fresh start where the folder was discarded:
    nothing had begun) gives the numbers of an uninterrupted run."""
    import matplotlib.figure

    folder = tmp_path / "run"
    code_of = {"figure": errno.EIO}.get(write, errno.ENOSPC)
    module, tiny = (reverse_maml, TINY_RM) if write == "figure" else (train_reference, TINY_REF)

    def failing(*_args, **_kwargs):
        raise OSError(code_of, os.strerror(code_of), str(folder / write))

    target = {"marker": (runs.RunDir, "_write_marker"), "config": (runs.RunDir, "write_config"),
              "metrics": (runs.RunDir, "log"), "checkpoint": (checkpoint.Checkpointer, "_check_space"),
              "results": (runs.RunDir, "write_results"),
              "figure": (matplotlib.figure.Figure, "savefig")}[write]
    with monkeypatch.context() as patch:
        patch.setattr(*target, failing)
        code, err = run_cli(module, digits(digits_data_dir, folder, *tiny), capsys)
    assert_one_line(code, err, os.strerror(code_of), "--resume")
    if write in ("marker", "config"):  # nothing had begun: nothing is left
        assert not folder.exists()
    again = ("--resume",) if folder.exists() else ()
    assert run_cli(module, digits(digits_data_dir, folder, *tiny, *again), capsys)[0] == 0
    clean = tmp_path / "clean"
    assert run_cli(module, digits(digits_data_dir, clean, *tiny), capsys)[0] == 0
    assert numbers(folder) == numbers(clean) != {}


def numbers(run: pathlib.Path):
    """A run's results without its timings (which differ between any two runs)."""
    def strip(value):
        if isinstance(value, dict):
            return {k: strip(v) for k, v in value.items() if "seconds" not in k}
        return [strip(v) for v in value] if isinstance(value, list) else value

    results = json.loads((run / "results.json").read_text())
    return strip({k: results[k] for k in ("beneficial_test_accuracy", "attacks", "references")
                  if k in results})


def test_a_checkpoint_the_disk_cannot_hold_is_refused_before_orbax_writes(tmp_path):
    with tiny_filesystem("2m") as mount:
        with checkpoint.Checkpointer(mount / "ckpt") as ckpt:
            ckpt.save(1, state())
            fill(mount, leave=64 << 10)
            big = {"w": jnp.zeros((1 << 18,), jnp.float32)}  # 1 MiB
            with pytest.raises(errors.StorageError, match=r"needs ~2\.0 MiB .* free.*step 1"):
                ckpt.save(2, big)
            assert ckpt.all_steps() == [1] and checkpoint.foreign_files(mount / "ckpt") == []
            assert float(ckpt.restore(state())[0]["w"][0, 0]) == 1.0  # the last good one


def test_a_real_full_disk_inside_orbax_is_one_line_and_resumable(tmp_path, monkeypatch):
    """The free-space check passed (told there is room), then tensorstore meets ENOSPC."""
    with tiny_filesystem("4m") as mount:
        ckpt_dir = mount / "ckpt"
        with checkpoint.Checkpointer(ckpt_dir) as ckpt:
            ckpt.save(1, state())
            fill(mount, leave=16 << 10)
            usage = shutil.disk_usage(mount)
            monkeypatch.setattr(checkpoint.shutil, "disk_usage",
                                lambda _p: usage._replace(free=1 << 40))
            with pytest.raises(errors.StorageError, match="No space left on device"):
                ckpt.save(2, {"w": jnp.ones((1 << 18,), jnp.float32)})
            monkeypatch.undo()
            (mount / "filler").unlink()
            assert checkpoint.foreign_files(ckpt_dir) == []  # the cut-off save is ours
            restored, meta = ckpt.restore(state())
            assert meta["restored_step"] == 1
            ckpt.save(2, state(2.0))  # with room again the same step saves
            assert ckpt.latest_step() == 2


def test_a_full_disk_at_the_start_is_one_line_and_leaves_no_folder(digits_data_dir, capsys):
    with tiny_filesystem("64k") as mount:
        fill(mount)
        folder = mount / "run"
        started = time.perf_counter()
        code, err = run_cli(train_reference, digits(digits_data_dir, folder, *TINY_REF), capsys)
        assert time.perf_counter() - started < 5
        assert code == 2 and err.count("\n") == 1 and "Traceback" not in err, err
        assert not folder.exists()


def test_a_full_tfds_data_dir_is_one_line_and_leaves_no_half_prepared_dataset(capsys):
    with tiny_filesystem("256k") as mount:
        (mount / "other").write_text("a user's file in the data dir")
        started = time.perf_counter()
        with pytest.raises(errors.StorageError, match="No space left on device"):
            data.prepare_digits(str(mount / "tfds"))
        assert not (mount / "tfds" / "sklearn_digits").exists()
        assert (mount / "other").read_text() == "a user's file in the data dir"
        assert time.perf_counter() - started < 60


def test_storage_errors_are_found_however_deep_a_library_wraps_them():
    inner = OSError(errno.ENOSPC, "No space left on device", "/x/y")
    try:
        try:
            raise inner
        except OSError as e:
            raise RuntimeError("orbax: commit failed") from e
    except RuntimeError as outer:
        err = errors.as_storage_error(outer)
    assert isinstance(err, errors.StorageError) and "/x/y" in str(err)
    tensorstore_like = ValueError("UNKNOWN: Error writing local file: No space left on device")
    assert isinstance(errors.as_storage_error(tensorstore_like, "/d"), errors.StorageError)
    assert errors.as_storage_error(ValueError("shape mismatch")) is None
    assert errors.as_storage_error(MemoryError("RESOURCE_EXHAUSTED: Out of memory")) is None


# ------------------------------------------------------------ quiet failures


def test_restoring_past_a_corrupt_step_prints_one_warning_and_no_task_noise(tmp_path,
                                                                             digits_data_dir):
    """The corrupt-latest fallback through the CLI (in a process of its own: pytest catches
    unraisable exceptions itself): one ``warning:`` line naming the step, and none of
    asyncio's reports of orbax's abandoned reads ("Event loop is closed", ~90 before)."""
    folder = tmp_path / "run"
    assert _cli.main(train_reference.main, digits(digits_data_dir, folder, *TINY_REF)) == 0
    for f in (folder / "checkpoints" / "reference" / "2").rglob("manifest.ocdbt"):
        f.unlink()
    env = {k: v for k, v in os.environ.items() if k != "TRM_JAX_VERBOSE"}
    done = subprocess.run([sys.executable, "-m", "experiments.train_reference",
                           *digits(digits_data_dir, folder, *TINY_REF, "--resume")],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    warnings = [ln for ln in done.stderr.splitlines() if ln.startswith("warning: ")]
    assert len(warnings) == 1 and "step(s) [2]" in warnings[0] and "restored step 1" in warnings[0]
    assert "Traceback" not in done.stderr and "never retrieved" not in done.stderr, done.stderr[:3000]


def test_the_native_stderr_filter_turns_a_fatal_dump_into_one_line():
    from trm_jax import native_stderr

    dump = ["run folder: /tmp/x\n",
            "E1204 18:35:51.943261   12368 coordination_service_agent.cc:289] Polled an error\n",
            "F1204 18:35:51.943309   12368 client.h:80] Terminating process because the JAX "
            "distributed service detected fatal errors. This most likely indicates that another "
            "task died\n",
            "Additional GRPC error information from remote target coordination_service\n",
            "*** Check failure stack trace: ***\n", "    @     0x7fa67c30cd5b  std::_Function\n"]
    out = list(native_stderr.filter_lines(iter(dump), "1"))
    assert out[0] == "run folder: /tmp/x\n" and len(out) == 2
    assert out[1].startswith("error: process 1: another process of this run stopped")
    other = ["W1204 18:35:51.943261   12368 cpu_client.cc:1] a warning of XLA's\n"]
    assert list(native_stderr.filter_lines(iter(other), "0")) == other


PEER = """
import sys, time
from trm_jax import distributed
distributed.initialize(distributed.DistributedConfig(coordinator=sys.argv[1], num_processes=2,
                       process_id=int(sys.argv[2]), timeout=60, heartbeat_timeout=10))
print("connected", flush=True)
time.sleep(120)
"""


@pytest.mark.parametrize("victim", [0, 1])
def test_a_killed_peer_ends_the_survivor_with_one_line(tmp_path, victim):
    """SIGKILL of the coordinator (0) or of the follower (1): the survivor stops within the
    heartbeat timeout with ONE ``error:`` line and no C++ stack dump (exit 2 from our watch;
    134 where JAX's client aborts at once because the coordinator is gone)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {k: v for k, v in os.environ.items() if k != "TRM_JAX_VERBOSE"}
    env.update(PYTHONPATH=str(ROOT), JAX_PLATFORMS="cpu")
    procs = [subprocess.Popen([sys.executable, "-c", PEER, f"127.0.0.1:{port}", str(i)],
                              stdout=subprocess.PIPE, stderr=open(tmp_path / f"{i}.err", "w"),
                              env=env, text=True) for i in range(2)]
    try:
        for p in procs:
            assert p.stdout.readline().strip() == "connected"
        procs[victim].kill()
        started = time.monotonic()
        code = procs[1 - victim].wait(timeout=30)
        assert time.monotonic() - started < 15
        assert code in ((134, -6) if victim == 0 else (2,)), code
        deadline = time.monotonic() + 5  # the filter process writes the last line
        while time.monotonic() < deadline:
            text = (tmp_path / f"{1 - victim}.err").read_text()
            if "error:" in text:
                break
            time.sleep(0.1)
        lines = [ln for ln in text.splitlines() if ln.strip()]
        assert len(lines) == 1 and lines[0].startswith(f"error: process {1 - victim}:"), text
        assert "stack trace" not in text and "@ " not in text
    finally:
        for p in procs:
            p.kill()
            p.wait()
