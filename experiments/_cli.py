"""What every experiment's command line shares: config parsing, errors, run folders.

An experiment is ONE frozen dataclass (its fields: ``dataset``, ``seeds``, the
method's config, the attack suite, :class:`ProtocolOptions`, :class:`RunOptions`).
Its command line is generated from the dataclass by `tyro
<https://brentyi.github.io/tyro/>`_: every field is a flag, nested configs are
dotted (``--meta.inner-steps 10``, ``--attack.epochs 20``), the help text comes
from the docstrings, and the defaults shown are the dataset's
(``--dataset digits --help`` shows the digits defaults: they come from
:func:`trm_jax.config_for`, i.e. :mod:`trm_jax.datasets`).

:func:`main` maps every typed error (:mod:`trm_jax.errors`) and every bad flag
to ONE line on stderr and exit code 2, without a traceback.
"""
from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import re
import sys
import time
from typing import Annotated, Any, Callable, TypeVar

import jax
import numpy as np
import tyro

from trm_jax import compilation, data, datasets, errors, runs
from trm_jax.hooks import RunFolderHooks
from trm_jax.methods import seed_keys

C = TypeVar("C")
#: Use as ``Annotated[Cfg, FLAT]``: the field's own name is not a flag prefix.
FLAT = tyro.conf.arg(name="")


@dataclasses.dataclass(frozen=True)
class ProtocolOptions:
    """The protocol's classes and split sizes (None: the dataset's preset)."""

    beneficial_classes: tuple[int, ...] | None = None
    """class ids of the beneficial half (default: the first half of the classes)"""
    malicious_classes: tuple[int, ...] | None = None
    """class ids of the malicious half (default: the second half)"""
    pretrain_size: int | None = None
    """train[:N] is pre-training (default: the dataset's)"""
    finetune_size: int | None = None
    """train[N:N+M] is fine-tuning (default: the rest of train)"""
    test_size: int | None = None
    """test[:T] (default: the whole test split)"""


@dataclasses.dataclass(frozen=True)
class RunOptions:
    """Where results go and how the run behaves (not part of the experiment's identity)."""

    workdir: str | None = None
    """run folder (default runs/<experiment>-<timestamp>)"""
    resume: bool = False
    """continue the interrupted run in --workdir (same settings required)"""
    overwrite: bool = False
    """replace an existing run folder"""
    progress: bool = True
    """progress bars"""
    checkpoint_every: int = 5
    """epochs between checkpoints of supervised phases"""
    meta_checkpoint_every: int = 100
    """outer steps between meta-training checkpoints"""
    data_dir: str | None = None
    """TFDS data dir (default $TFDS_DATA_DIR or ~/tensorflow_datasets)"""
    download: bool = True
    """let TFDS download a dataset that is not prepared (after one short reachability probe:
    offline it fails in seconds); --no-download never downloads"""
    compile_cache: bool = True
    """JAX's persistent compilation cache ($TRM_JAX_CACHE_DIR, default ~/.cache/trm_jax/jax;
    also off with TRM_JAX_NO_COMPILE_CACHE=1): a second run loads its programs instead of
    compiling them"""

    def __post_init__(self) -> None:
        for name in ("checkpoint_every", "meta_checkpoint_every"):
            if getattr(self, name) < 1:
                raise errors.ConfigError(f"--{name.replace('_', '-')} must be >= 1, "
                                         f"got {getattr(self, name)}")


@dataclasses.dataclass(frozen=True)
class Experiment:
    """The fields every experiment's config has (subclass it and add the method's)."""

    dataset: str = "cifar10"
    """'digits' works offline; the others download through TFDS (any registered dataset)"""
    seeds: int = 5
    """seeds 0..N-1, vmapped in one program"""
    model: str | None = None
    """architecture (default: the dataset's preset)"""
    protocol: Annotated[ProtocolOptions, FLAT] = ProtocolOptions()
    run: Annotated[RunOptions, FLAT] = RunOptions()


RUN_FIELDS = ("run",)  # config fields that may change on --resume


def peek_dataset(argv: list[str], default: str) -> str:
    """The ``--dataset`` value in ``argv`` (per-dataset defaults depend on it)."""
    for i, arg in enumerate(argv):
        if arg == "--dataset" and i + 1 < len(argv):
            return argv[i + 1]
        if arg.startswith("--dataset="):
            return arg.split("=", 1)[1]
    return default


def parse(config_cls: type[C], defaults: Callable[[str], C], argv: list[str] | None, *,
          prog: str, description: str, default_dataset: str = "cifar10") -> C:
    """``argv`` -> a resolved experiment config (the dataset's defaults under the flags).

    Raises:
      ConfigError: an unknown dataset, a bad flag or value (one line, naming it).
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    dataset = peek_dataset(argv, default_dataset)
    if dataset not in datasets.DATASETS:
        raise errors.ConfigError(f"--dataset {dataset!r}: unknown; allowed: {list(datasets.names())}")
    default = defaults(dataset)
    out = io.StringIO()
    try:
        with contextlib.redirect_stderr(out), contextlib.redirect_stdout(out):
            return tyro.cli(config_cls, default=default, args=argv, prog=prog,
                            description=description)
    except SystemExit as exit_:
        if exit_.code in (0, None):  # --help
            sys.stdout.write(out.getvalue())
            raise
        raise errors.ConfigError(one_line(out.getvalue())) from None


def one_line(text: str) -> str:
    """A tyro error box -> one line (title: message)."""
    lines = [re.sub(r"[│╭╮╰╯─]+", " ", ln).strip() for ln in text.splitlines()]
    lines = [ln for ln in lines if ln and not set(ln) <= set("-") and "helptext" not in ln
             and not ln.startswith("usage:")]
    return re.sub(r"\s+", " ", ": ".join(lines)).strip() or "bad command line"


def main(run: Callable[[list[str] | None], Any], argv: list[str] | None = None) -> int:
    """Runs an experiment's ``main``; typed errors -> one line on stderr, exit code 2."""
    try:
        results = run(argv)
    except errors.TrmError as err:
        message = " ".join(str(err).split())
        print(f"error: {message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted: continue with the same command plus --resume", file=sys.stderr)
        return 130
    if isinstance(results, dict) and results.get("failed"):
        print(f"error: failed: {sorted(results['failed'])} (see results.json)", file=sys.stderr)
        return 1
    return 0


def protocol_spec(dataset: str, options: ProtocolOptions) -> data.ProtocolSpec:
    """The dataset's preset protocol with the given overrides; validated."""
    spec = data.preset(dataset)
    changes = {k: v for k, v in dataclasses.asdict(options).items() if v is not None}
    spec = dataclasses.replace(spec, **{k: tuple(v) if isinstance(v, list) else v
                                        for k, v in changes.items()})
    data.validate_spec(spec)
    return spec


def load_protocol(dataset: str, options: ProtocolOptions, run: RunOptions) -> data.ProtocolData:
    return data.load_protocol(protocol_spec(dataset, options), data_dir=run.data_dir,
                              download=None if run.download else False)  # None: probe, then download


def seeds_of(count: int) -> tuple[list[int], jax.Array]:
    if not isinstance(count, int) or count < 1:
        raise errors.ConfigError(f"--seeds must be an integer >= 1, got {count!r}")
    return list(range(count)), seed_keys(count)


class Run:
    """A run folder opened for an experiment: the folder, its hooks, a timer and a compile
    counter. Use it as a context manager (``with _cli.Run(...) as run:``): on exit,
    however it ends, the hooks, the counter and the folder's writer lock are released.

    Opening it turns on the persistent compilation cache (``--no-compile-cache``: off)
    and counts every compilation, per phase (``with run.phase("attack"):``); ``finish``
    writes the counts to ``results.json`` under ``compilation``.
    """

    def __init__(self, name: str, config: Any, options: RunOptions):
        self.started = time.perf_counter()
        workdir = options.workdir or runs.default_workdir(name)
        resolved = runs.to_jsonable({"experiment": name, **dataclasses.asdict(config)})
        self.dir = runs.RunDir.create(workdir, overwrite=options.overwrite, resume=options.resume)
        try:
            if options.resume and (self.dir.path / "config.json").exists():
                stored = self.dir.config()
                diff = sorted(k for k in set(stored) | set(resolved) if k not in RUN_FIELDS
                              and stored.get(k) != resolved.get(k))
                if diff:
                    raise errors.RunFolderError(
                        f"--resume: the resolved settings differ from the stored run's in {diff}; "
                        "resume with the original settings or start a new --workdir")
            self.dir.write_config(resolved)
        except BaseException:
            self.dir.close()
            raise
        self.cache_dir = compilation.enable_persistent_cache() if options.compile_cache else None
        self.stats = compilation.count_compilations().__enter__()
        self.hooks = RunFolderHooks(self.dir, resume=options.resume,
                                    checkpoint_every=options.checkpoint_every,
                                    progress=options.progress,
                                    checkpoint_every_phase={"meta": options.meta_checkpoint_every})
        self.resume = options.resume
        print(f"run folder: {self.dir.path}", flush=True)

    def __enter__(self) -> "Run":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def close(self) -> None:
        if self.stats is not None:
            self.stats.__exit__(None, None, None)
            self.stats = None
        self.hooks.close()
        self.dir.close()

    @property
    def path(self):
        return self.dir.path

    def phase(self, name: str):
        """Counts the compilations of a named phase (``results.json``: ``compilation.phases``)."""
        return self.stats.phase(name)

    def seconds(self) -> float:
        return time.perf_counter() - self.started

    def finish(self, results: dict[str, Any]) -> dict[str, Any]:
        """Writes ``results.json`` (with ``wall_seconds`` and ``compilation``)."""
        wall = self.seconds()
        compiled = self.stats.as_dict()  # the counter is still open: its wall time is ours
        compiled.update(wall_seconds=round(wall, 4),
                        compile_share=round(compiled["compile_seconds"] / wall, 4),
                        persistent_cache=None if self.cache_dir is None else str(self.cache_dir))
        results = {**results, "compilation": compiled, "wall_seconds": wall}
        self.dir.write_results(results)
        return json.loads(json.dumps(runs.to_jsonable(results)))


def summarize(metrics: dict[str, Any]) -> dict[str, Any]:
    """Per-seed arrays in (nested) dicts -> ``{"per_seed", "mean", "std"}`` summaries."""
    out = {}
    for k, v in metrics.items():
        if isinstance(v, dict):
            out[k] = summarize(v)
        elif isinstance(v, (np.ndarray, jax.Array)) and np.ndim(v) == 1:
            out[k] = runs.summarize(v)
        else:
            out[k] = v
    return out


def print_accuracy(label: str, summary: dict[str, Any]) -> None:
    print(f"{label}: {summary['mean']:.4f} +- {summary['std']:.4f} "
          f"(per seed {np.round(summary['per_seed'], 4).tolist()})", flush=True)


def model_override(dataset: str, name: str | None, protocol: data.ProtocolData,
                   num_classes: int | None = None):
    """``--model NAME``: that architecture for ``dataset``; ``None``: the method's preset."""
    if name is None:
        return None
    return datasets.model_for(dataset, num_classes or protocol.pretrain.beneficial.num_classes,
                              protocol.image_shape, name)
