"""Many processes, one run (``--distributed.*``, :mod:`trm_jax.distributed`), for real: each
multi-process test starts local processes (2 forced CPU devices each, gloo collectives) on a
free port of 127.0.0.1, running the experiments' own command lines.

Why the 2-process runs equal the 1-process 4-device run exactly: both place the seeds on the
same 4-device mesh (one seed per device) and compile the same SPMD program; no reduction
crosses seeds inside a program (every sum is within one device's seed), and gathering the
results only copies them. Measured: results.json and metrics.jsonl bitwise equal (every
accuracy, curve, loss), so the comparison is exact. A process waits at most its timeouts:
every subprocess has a deadline, and pytest-timeout bounds each test.
"""
from __future__ import annotations

import json
import os
import textwrap
import pathlib
import signal
import socket
import subprocess
import sys
import time

import pytest

from experiments import _cli, reverse_maml
from trm_jax import distributed, errors, runs
from trm_jax.distributed import DistributedConfig

ROOT = pathlib.Path(__file__).resolve().parents[1]
SMALL = {
    "reverse_maml": ["--meta.shots", "2", "--meta.queries", "2", "--meta.good-tasks", "1",
                     "--meta.bad-tasks", "1", "--meta.inner-steps", "2", "--meta-steps", "4",
                     "--log-every", "1", "--head.epochs", "1", "--reference.train.epochs", "1",
                     "--attack.epochs", "1"],
    # UNSIR and SKD: the methods whose paths the reverse_maml test does not take (per-seed
    # data, learned noise); the reference and Reverse-MAML are that test's.
    "compare": ["--methods", "unsir", "skd", "--unsir.original.epochs", "1",
                "--unsir.unsir.noise.steps", "2", "--unsir.unsir.impair.epochs", "1",
                "--unsir.unsir.repair.epochs", "1", "--skd.teacher.epochs", "1",
                "--skd.distill.epochs", "1", "--skd.head.epochs", "1",
                "--attack.attacks", "linear_probe", "--attack.optimizers", "adam",
                "--attack.learning-rates", "0.01", "--attack.epochs", "1",
                "--attack.data-per-class", "None", "--attack.steps-multipliers", "1"],
}
# Not the same from run to run by nature (at any depth of results.json): times, compile
# counts, how many processes (and method threads: compare --workers) wrote, the command line.
UNTIMED = ("wall_seconds", "compilation", "processes", "workers", "evaluation", "command")


# ----------------------------------------------------------------------------- in-process


@pytest.mark.parametrize("kwargs, message", [
    (dict(coordinator="127.0.0.1:1234", num_processes=2, process_id=2),
     "out of range; allowed: 0..1"),
    (dict(coordinator="127.0.0.1:1234", num_processes=2, process_id=-1), "out of range"),
    (dict(coordinator="127.0.0.1:1234", num_processes=2), "also give distributed.process_id"),
    (dict(coordinator="localhost", num_processes=2, process_id=0), "expected HOST:PORT"),
    (dict(coordinator="h:70000", num_processes=2, process_id=0), "port 1..65535"),
    (dict(num_processes=2, process_id=0), "needs distributed.coordinator"),
    (dict(coordinator="auto", timeout=0), "timeout must be an integer in 1.."),
])
def test_bad_distributed_settings_are_typed_errors(kwargs, message):
    with pytest.raises(errors.ConfigError, match=message.replace("(", r"\(")):
        DistributedConfig(**kwargs)


def test_good_distributed_settings():
    assert not DistributedConfig().enabled
    assert DistributedConfig(coordinator="auto").enabled  # the cluster tells JAX the rest
    assert DistributedConfig(coordinator="[::1]:8476", num_processes=3, process_id=2).enabled


def test_cli_names_the_bad_flag_before_connecting_or_computing(no_compute, capsys):
    code = _cli.main(reverse_maml.main, ["--dataset", "digits", "--distributed.coordinator",
                                         "127.0.0.1:9", "--distributed.num-processes", "2",
                                         "--distributed.process-id", "2"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1, err
    assert "--distributed.process-id" in err and "allowed: 0..1" in err, err
    assert not distributed.is_initialized()


def test_alone_agreement_is_trivial():
    assert distributed.agree({"a": 1}, {"workdir": "x"}) == [{"workdir": "x"}]
    assert distributed._diff({"a": 1, "b": {"c": 2}}, {"a": 1, "b": {"c": 3}}) == ["b.c"]


def test_a_follower_sees_the_run_folder_but_writes_nothing(tmp_path, monkeypatch):
    monkeypatch.setattr(distributed, "is_writer", lambda: False)
    path = tmp_path / "run"
    run = runs.RunDir.create(path)
    assert not run.writer
    run.write_config({"experiment": "x"})
    run.log({"phase": "p", "epoch": 1})
    run.truncate_metrics(lambda r: True)
    run.write_results({k: 0 for k in runs.RESULT_KEYS})
    assert run.checkpoint_dir == path / "checkpoints"  # the same paths as process 0's
    run.close()
    assert not path.exists()  # ... and nothing written, not even the folder


# ----------------------------------------------------------------------------- processes


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def env(devices: int, cache: pathlib.Path) -> dict[str, str]:
    flags = [f for f in os.environ.get("XLA_FLAGS", "").split()
             if not f.startswith("--xla_force_host_platform_device_count")]
    out = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(ROOT), TF_CPP_MIN_LOG_LEVEL="3",
               XLA_FLAGS=" ".join([*flags, f"--xla_force_host_platform_device_count={devices}"]),
               TRM_JAX_CACHE_DIR=str(cache))  # one compile cache for the test's runs
    out.pop("TRM_JAX_NO_COMPILE_CACHE", None)
    out.pop("PYTEST_XDIST_WORKER", None)
    return out


def start(module: str, args: list[str], tmp_path: pathlib.Path, processes: int = 2,
          per_process: dict[int, list[str]] | None = None, tag: str = "run"
          ) -> list[subprocess.Popen]:
    """``processes`` local processes of ``python -m experiments.<module> ARGS`` (2 CPU
    devices each), their output in ``tmp_path/<tag>.<i>.out`` / ``.err``."""
    port = free_port()
    procs = []
    for i in range(processes):
        dist = ["--distributed.coordinator", f"127.0.0.1:{port}", "--distributed.num-processes",
                str(processes), "--distributed.process-id", str(i)]
        cmd = [sys.executable, "-m", f"experiments.{module}", *args, *dist,
               *(per_process or {}).get(i, [])]
        procs.append(subprocess.Popen(cmd, cwd=ROOT, env=env(2, tmp_path / "cache"),
                                      stdout=open(tmp_path / f"{tag}.{i}.out", "w"),
                                      stderr=open(tmp_path / f"{tag}.{i}.err", "w")))
    return procs


def wait(procs: list[subprocess.Popen], timeout: float) -> list[int]:
    """Every process's exit code; any still running after ``timeout`` s is killed (fails)."""
    deadline = time.monotonic() + timeout
    codes = []
    for p in procs:
        try:
            codes.append(p.wait(max(1.0, deadline - time.monotonic())))
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            pytest.fail(f"a process was still running after {timeout} s (a hang)")
    return codes


def errors_of(tmp_path: pathlib.Path, tag: str, processes: int = 2) -> list[list[str]]:
    """Each process's ``error:`` lines."""
    return [[ln for ln in (tmp_path / f"{tag}.{i}.err").read_text().splitlines()
             if ln.startswith("error:")] for i in range(processes)]


def common(module: str, workdir: pathlib.Path, data_dir: str, seeds: int = 4) -> list[str]:
    return ["--dataset", "digits", "--seeds", str(seeds), "--no-progress", "--data-dir", data_dir,
            "--workdir", str(workdir), *SMALL[module]]


PLACEMENT = textwrap.dedent("""
    import sys
    import jax, jax.numpy as jnp, numpy as np
    from trm_jax import distributed, sharding
    distributed.initialize(distributed.DistributedConfig(
        coordinator=sys.argv[1], num_processes=2, process_id=int(sys.argv[2]), timeout=60))
    assert jax.process_count() == 2 and jax.device_count() == 4 and sharding.multiprocess()
    keys = jax.vmap(jax.random.key)(jnp.arange(8))
    params = {"w": jnp.arange(8 * 3, dtype=jnp.float32).reshape(8, 3)}
    data = jnp.linspace(0.0, 1.0, 5)
    p, k = sharding.shard_seeds((params, keys))
    d = sharding.replicate(data, 8)
    assert not p["w"].is_fully_addressable and len(p["w"].addressable_shards) == 2
    assert d.is_fully_replicated
    out = jax.jit(jax.vmap(lambda p, k, d: p["w"].sum() * d.sum() + jax.random.uniform(k),
                           in_axes=(0, 0, None)))(p, k, d)
    host = sharding.to_host({"out": out, "w": p["w"], "d": d})
    expected = jax.vmap(lambda p, k: p["w"].sum() * data.sum()
                        + jax.random.uniform(k))(params, keys)
    np.testing.assert_array_equal(host["out"], np.asarray(expected))  # every seed, every process
    np.testing.assert_array_equal(host["w"], np.asarray(params["w"]))
    assert isinstance(sharding.gather(out), np.ndarray)
    try:
        sharding.shard_seeds(params["w"][:6])
    except Exception as err:
        assert type(err).__name__ == "ConfigError" and "a multiple of 4" in str(err), err
    else:
        raise AssertionError("6 seeds over 4 devices were accepted")
    print("placement ok", jax.process_index())
    distributed.shutdown()
""")


def test_to_host_and_gather_alone():
    import jax.numpy as jnp
    import numpy as np

    from trm_jax import sharding

    x = jnp.arange(4.0)
    assert sharding.gather(x) is x  # alone: device arrays stay where they are
    host = sharding.to_host({"x": x, "n": np.ones(2)})
    assert isinstance(host["x"], np.ndarray) and host["x"].tolist() == [0, 1, 2, 3]


@pytest.mark.timeout(180)
def test_seeds_are_placed_and_gathered_across_two_processes(tmp_path):
    port = free_port()
    procs = [subprocess.Popen([sys.executable, "-c", PLACEMENT, f"127.0.0.1:{port}", str(i)],
                              cwd=ROOT, env=env(2, tmp_path / "cache"), stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for i in range(2)]
    outputs = [p.communicate(timeout=150) for p in procs]
    for i, (p, (out, err)) in enumerate(zip(procs, outputs)):
        assert p.returncode == 0 and f"placement ok {i}" in out, err[-3000:]


@pytest.mark.timeout(180)
@pytest.mark.parametrize("process_id, why", [
    (1, "the coordinator 127.0.0.1:{port} cannot be reached"),  # process 0 never comes
    (0, "the coordinator answers: another process is missing"),  # process 1 never comes
])
def test_a_missing_process_fails_in_time_with_one_line(tmp_path, process_id, why):
    began, port = time.monotonic(), free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "experiments.reverse_maml", "--dataset", "digits",
         "--distributed.coordinator", f"127.0.0.1:{port}", "--distributed.num-processes", "2",
         "--distributed.process-id", str(process_id), "--distributed.timeout", "3"],
        cwd=ROOT, env=env(2, tmp_path / "cache"), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        text=True)
    out, err = proc.communicate(timeout=150)
    lines = [ln for ln in err.splitlines() if ln.startswith("error:")]
    assert proc.returncode == 2, err[-2000:]
    assert len(lines) == 1 and why.format(port=port) in lines[0], err[-2000:]
    assert lines[0].startswith(f"error: process {process_id}: not all 2 processes connected")
    assert "within --distributed.timeout 3 s" in lines[0]
    assert time.monotonic() - began < 120  # JAX alone would wait out its own timeout, then abort


@pytest.mark.timeout(900)
def test_bad_multiprocess_runs_stop_every_process_before_compute(tmp_path, digits_data_dir):
    # 1. Started with different settings: each process names the difference, nothing is written.
    work = tmp_path / "differ"
    procs = start("reverse_maml", common("reverse_maml", work, digits_data_dir), tmp_path,
                  per_process={1: ["--meta-steps", "5"]}, tag="differ")
    assert wait(procs, 200) == [2, 2]
    for lines in errors_of(tmp_path, "differ"):
        assert len(lines) == 1 and "different settings" in lines[0], lines
        assert "differs from process 0 in ['method.meta_steps']" in lines[0], lines
    assert not work.exists()  # process 0 removed the folder it had just made

    # 2. Seeds the 4 devices do not divide: a ConfigError on every process, at parse time.
    procs = start("reverse_maml", common("reverse_maml", tmp_path / "three", digits_data_dir,
                                         seeds=3), tmp_path, tag="three")
    assert wait(procs, 200) == [2, 2]
    for lines in errors_of(tmp_path, "three"):
        assert len(lines) == 1, lines
        assert lines[0].startswith("error: --seeds 3: a run over 2 processes"), lines
        assert lines[0].endswith("allowed: a multiple of 4"), lines

    # 3. Process 0 refuses its --workdir (not a run folder): process 1 stops too, naming it.
    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "notes.txt").write_text("mine")
    procs = start("reverse_maml", common("reverse_maml", taken, digits_data_dir), tmp_path,
                  tag="taken")
    assert wait(procs, 200) == [2, 2]
    first, second = errors_of(tmp_path, "taken")
    assert len(first) == 1 and str(taken) in first[0], first
    assert len(second) == 1 and "because process 0 stopped" in second[0] and str(taken) in second[0]
    assert sorted(p.name for p in taken.iterdir()) == ["notes.txt"]


def comparable(results):
    """``results`` without what differs between runs by nature (:data:`UNTIMED`, at any depth)."""
    if isinstance(results, dict):
        return {k: comparable(v) for k, v in results.items() if k not in UNTIMED}
    if isinstance(results, list):
        return [comparable(v) for v in results]
    return results


def metric_records(path: pathlib.Path, *, while_running: bool = False) -> dict[str, list[dict]]:
    """Every metrics.jsonl of a run folder (compare: one per method): path -> records.

    Only where they live (the folder, ``methods/*/``): a walk of the whole tree would race
    orbax renaming its temporary checkpoint folders under a running job. ``while_running``:
    a last line still being written is not counted."""
    files = [path / runs.METRICS_FILE, *path.glob(f"methods/*/{runs.METRICS_FILE}")]
    out = {}
    for f in sorted(f for f in files if f.is_file()):
        lines = f.read_text().splitlines()
        if while_running and lines and not lines[-1].endswith("}"):
            lines = lines[:-1]
        out[str(f.relative_to(path))] = [json.loads(ln) for ln in lines]
    return out


def one_process(module: str, workdir: pathlib.Path, data_dir: str, tmp_path: pathlib.Path) -> dict:
    """The reference: the same command in ONE process with 4 CPU devices."""
    out = subprocess.run([sys.executable, "-m", f"experiments.{module}",
                          *common(module, workdir, data_dir)], cwd=ROOT,
                         env=env(4, tmp_path / "cache"), capture_output=True, text=True,
                         timeout=1200)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads((workdir / "results.json").read_text())


def kill_when(procs: list[subprocess.Popen], workdir: pathlib.Path, records: int,
              timeout: float, victim: int) -> None:
    """Kills process ``victim`` (SIGKILL) once process 0 has logged ``records`` metric records."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if sum(map(len, metric_records(workdir, while_running=True).values())) >= records:
            procs[victim].send_signal(signal.SIGKILL)
            return
        if procs[victim].poll() is not None:
            pytest.fail(f"process {victim} ended (code {procs[victim].returncode}) before it "
                        "could be killed")
        time.sleep(0.05)
    pytest.fail(f"no {records} metric records within {timeout} s")


def check_multiprocess_run(module: str, tmp_path: pathlib.Path, data_dir: str,
                           kill_after: int, victim: int, uninterrupted: bool = True
                           ) -> tuple[dict, dict]:
    """1 process x 4 devices vs 2 processes x 2 devices (uninterrupted, then killed and
    resumed): the same results.json and metrics, written once, by process 0."""
    expected = one_process(module, tmp_path / "one", data_dir, tmp_path)
    if uninterrupted:
        check_uninterrupted(module, tmp_path, data_dir, expected)
    return expected, check_kill_and_resume(module, tmp_path, data_dir, expected, kill_after, victim)


def check_uninterrupted(module: str, tmp_path: pathlib.Path, data_dir: str, expected: dict) -> None:
    clean = tmp_path / "two"
    procs = start(module, common(module, clean, data_dir), tmp_path, tag="two")
    assert wait(procs, 1200) == [0, 0], (tmp_path / "two.1.err").read_text()[-3000:]
    results = json.loads((clean / "results.json").read_text())
    assert comparable(results) == comparable(expected)
    # Written once: every metrics record once (two writers would double them), by one process.
    assert metric_records(clean) == metric_records(tmp_path / "one") != {}
    assert json.loads((clean / runs.MARKER_FILE).read_text())["seconds"].__len__() == 1
    assert "(written by process 0)" in (tmp_path / "two.1.out").read_text()
    # One checkpoint folder, each process's shards in it (orbax's multi-process layout).
    assert shard_writers(clean / "checkpoints" / "model") == ["ocdbt.process_0", "ocdbt.process_1"]


def shard_writers(folder: pathlib.Path) -> list[str]:
    """The processes that wrote shards into the orbax checkpoints under ``folder``."""
    return sorted({p.name for p in folder.rglob("ocdbt.process_*")})


def check_kill_and_resume(module: str, tmp_path: pathlib.Path, data_dir: str, expected: dict,
                          kill_after: int, victim: int) -> dict:
    # Kill one process mid-run: the other notices within the heartbeat timeout and stops.
    cut = tmp_path / "cut"
    args = common(module, cut, data_dir) + ["--checkpoint-every", "1", "--meta-checkpoint-every",
                                            "1", "--distributed.heartbeat-timeout", "10"]
    procs = start(module, args, tmp_path, tag="cut")
    kill_when(procs, cut, kill_after, timeout=900, victim=victim)
    codes = wait(procs, 120)
    assert codes[victim] == -signal.SIGKILL and codes[1 - victim] != 0, codes
    assert not (cut / "results.json").exists()
    saved = sorted(str(p.relative_to(cut)) for p in cut.rglob("checkpoints/*/*")
                   if p.name.isdigit())
    assert saved, "killed before any checkpoint: nothing to resume from"
    procs = start(module, args + ["--resume"], tmp_path, tag="resume")
    assert wait(procs, 1200) == [0, 0], (tmp_path / "resume.0.err").read_text()[-3000:]
    resumed = json.loads((cut / "results.json").read_text())
    assert comparable(resumed) == comparable(expected)
    assert metric_records(cut) == metric_records(tmp_path / "one")  # no record lost or doubled
    return resumed


@pytest.mark.slow
@pytest.mark.timeout(3600)
def test_reverse_maml_over_two_processes_equals_one_and_resumes_after_a_kill(tmp_path,
                                                                           digits_data_dir):
    expected, resumed = check_multiprocess_run("reverse_maml", tmp_path, digits_data_dir,
                                               kill_after=2, victim=1)
    assert resumed["seeds"] == [0, 1, 2, 3]
    assert len(expected["attacks"]["linear_probe"]["curves"][0]) == 4  # [lr][seed][epoch]


@pytest.mark.slow
@pytest.mark.timeout(3600)
def test_compare_over_two_processes_equals_one_and_resumes_after_a_kill(tmp_path, digits_data_dir):
    # Killed, then resumed, only (an uninterrupted run too would add ~3 min): equal records and
    # results prove the same as for reverse_maml, and the follower's writes are tested there.
    # Here process 0 is killed: the writer and the coordinator.
    expected, resumed = check_multiprocess_run("compare", tmp_path, digits_data_dir, kill_after=2,
                                               victim=0, uninterrupted=False)
    assert set(resumed["beneficial_test_accuracy"]) == {"unsir", "skd"}
    assert resumed["failed"] == {} and resumed["references"]["scratch"]["curves"]
