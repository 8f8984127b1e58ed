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

import ast
import contextlib
import dataclasses
import io
import json
import os
import pathlib
import re
import sys
import time
import typing
from typing import Annotated, Any, Callable, TypeVar

import jax
import numpy as np
import tyro

from trm_jax import (checkpoint, compilation, data, datasets, distributed, errors, native_stderr,
                     resources, runs, sharding, validate)
from trm_jax.distributed import DistributedConfig
from trm_jax.models import MODELS
from trm_jax.hooks import RunFolderHooks
from trm_jax import methods
from trm_jax.methods import seed_keys

C = TypeVar("C")
#: Use as ``Annotated[Cfg, FLAT]``: the field's own name is not a flag prefix.
FLAT = tyro.conf.arg(name="")


def default_is(words: str, **arg: Any) -> Any:
    """``Annotated[T, default_is("the dataset's")]``: --help says ``(default: the dataset's)``
    where the field's value (``None``) only means "decided later"."""
    return tyro.conf.arg(help_behavior_hint=f"(default: {words})", **arg)


def choices(names: Any) -> str:
    """A metavar listing the allowed values, as tyro does for ``Literal`` fields."""
    return "{" + ",".join(names) + "}"


@dataclasses.dataclass(frozen=True)
class ProtocolOptions:
    """The protocol's classes and split sizes (None: the dataset's preset)."""

    beneficial_classes: Annotated[tuple[int, ...] | None,
                                  default_is("the dataset's, e.g. 0 1 2 3 4")] = None
    """class ids of the beneficial half (the classes the model should keep)"""
    malicious_classes: Annotated[tuple[int, ...] | None,
                                 default_is("the dataset's, e.g. 5 6 7 8 9")] = None
    """class ids of the malicious half (the classes an attacker should not get)"""
    pretrain_size: Annotated[int | None, default_is("the dataset's")] = None
    """N: train[:N] is the pre-training split (what the methods train on)"""
    finetune_size: Annotated[int | None, default_is("the rest of train")] = None
    """M: train[N:N+M] is the fine-tuning split (the attacker's data)"""
    test_size: Annotated[int | None, default_is("the whole test split")] = None
    """T: test[:T] scores every model"""

    DOMAINS = {"beneficial_classes": validate.Tuple(validate.Int(0), none=True),
               "malicious_classes": validate.Tuple(validate.Int(0), none=True),
               "pretrain_size": validate.Int(1, none=True),
               "finetune_size": validate.Int(1, none=True), "test_size": validate.Int(1, none=True)}

    def __post_init__(self) -> None:  # the dataset's own bounds: data.validate_spec
        validate.check_fields(self)


@dataclasses.dataclass(frozen=True)
class RunOptions:
    """Where results go and how the run behaves (not part of the experiment's identity)."""

    workdir: Annotated[str | None, default_is("runs/<experiment>-<timestamp>")] = None
    """the run folder: config.json, metrics.jsonl, results.json, figures, checkpoints/"""
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
    checkpoint_seconds: float = 30.0
    """besides a phase's last step, at most one checkpoint per this many seconds of the phase
    (an interrupted run redoes at most that much; a save costs ~0.1-0.3 s); 0: every
    --checkpoint-every / --meta-checkpoint-every steps (as multi-process runs always do: every
    process must save together)"""
    data_dir: Annotated[str | None, default_is("$TFDS_DATA_DIR or ~/tensorflow_datasets")] = None
    """the TFDS data folder (prepared datasets are read from, and prepared into, it)"""
    download: bool = True
    """let TFDS download a dataset that is not prepared (after one short reachability probe:
    offline it fails in seconds); --no-download never downloads"""
    distributed: DistributedConfig = DistributedConfig()
    """one run over several processes/hosts (docs/multihost.md): every process starts the
    same command with its own --distributed.process-id"""
    compile_cache: bool = True
    """JAX's persistent compilation cache ($TRM_JAX_CACHE_DIR, default ~/.cache/trm_jax/jax;
    also off with TRM_JAX_NO_COMPILE_CACHE=1): a second run loads its programs instead of
    compiling them"""
    force_resources: bool = False
    """run even when the pre-flight estimate (trm_jax.resources) says the run needs more
    memory than is available or more than 1e7 optimizer steps in one phase"""
    allow_topology_change: bool = False
    """--resume on another number of processes or devices than the run started on (the
    numbers may then differ in float rounding, ~1e-7; results.json records the change)"""
    verbose: bool = False
    """also show the underlying reports of a failure that the one-line message summarises
    (orbax's abandoned reads of a corrupt checkpoint, JAX's C++ dump when a process of a
    multi-process run is lost); the same as TRM_JAX_VERBOSE=1"""

    DOMAINS = {"workdir": validate.Str(none=True), "resume": validate.Bool(),
               "overwrite": validate.Bool(), "progress": validate.Bool(),
               "checkpoint_every": validate.COUNT, "meta_checkpoint_every": validate.COUNT,
               "checkpoint_seconds": validate.NONNEGATIVE, "data_dir": validate.Str(none=True),
               "download": validate.Bool(), "distributed": validate.Instance(DistributedConfig),
               "compile_cache": validate.Bool(), "force_resources": validate.Bool(),
               "allow_topology_change": validate.Bool(), "verbose": validate.Bool()}

    def __post_init__(self) -> None:
        # `~` is the user's home wherever a path is taken (tyro passes it through verbatim)
        for name in ("workdir", "data_dir"):
            if isinstance(getattr(self, name), str):
                object.__setattr__(self, name, os.path.expanduser(getattr(self, name)))
        validate.check_fields(self)


@dataclasses.dataclass(frozen=True)
class Experiment:
    """The fields every experiment's config has (subclass it and add the method's)."""

    dataset: Annotated[str, tyro.conf.arg(metavar=choices(datasets.names()))] = "cifar10"
    """the dataset (cifar10: the paper's; digits works offline; the others download
    through TFDS on first use)"""
    seeds: int = 5
    """seeds 0..N-1, vmapped in one program"""
    model: Annotated[str | None, default_is("the dataset's preset", metavar=choices(MODELS))] = None
    """the architecture (lenet: the paper's CNN; conv4: MAML's 4-layer CNN)"""
    protocol: Annotated[ProtocolOptions, FLAT] = ProtocolOptions()
    run: Annotated[RunOptions, FLAT] = RunOptions()

    DOMAINS = {"dataset": validate.Str(), "seeds": validate.COUNT,
               "model": validate.Choice(tuple(MODELS), none=True),
               "protocol": validate.Instance(ProtocolOptions), "run": validate.Instance(RunOptions)}

    def __post_init__(self) -> None:  # a subclass adds its fields: {**Experiment.DOMAINS, ...}
        validate.check_fields(self)


RUN_FIELDS = ("run", "topology")  # config fields that may change on --resume


def topology() -> dict[str, int]:
    """The processes and devices this run computes on (config.json's ``topology``): the
    numbers depend on it in float rounding (the seed axis is split over the devices)."""
    return {"processes": jax.process_count(), "devices": jax.device_count()}


def check_resume(config: Any) -> dict[str, Any] | None:
    """``--resume`` of ``--workdir``: the stored run's dataset and topology against this
    command's, before any data is prepared (a resume with another ``--dataset`` prepared
    that dataset, then failed on the settings' diff).

    Returns:
      ``{"from": stored, "to": now}`` when the topology changed and
      ``--allow-topology-change`` accepts it; else ``None``.

    Raises:
      RunFolderError: another dataset, or another topology without ``--allow-topology-change``.
    """
    run = config.run
    path = pathlib.Path(run.workdir or "") / "config.json"
    if not (run.resume and run.workdir and path.is_file()):
        return None
    try:
        stored = json.loads(path.read_text())
    except (OSError, ValueError):
        return None  # the run folder's own checks say what is wrong with it
    if not isinstance(stored, dict):
        return None
    dataset = getattr(config, "dataset", None)
    if dataset is not None and stored.get("dataset") not in (None, dataset):
        raise errors.RunFolderError(
            f"--resume: {run.workdir} is a run on --dataset {stored['dataset']}, not --dataset "
            f"{dataset}; resume with --dataset {stored['dataset']} or start a new --workdir")
    now = topology()
    before = stored.get("topology")
    if not isinstance(before, dict):  # a run from before topologies were recorded: its processes
        processes = ((stored.get("run") or {}).get("distributed") or {}).get("num_processes")
        before = {"processes": processes or 1}
    changed = {k: (v, now[k]) for k, v in before.items() if k in now and v != now[k]}
    if not changed:
        return None
    said = ", ".join(f"{v[0]} {k} then, {v[1]} now" for k, v in changed.items())
    if not run.allow_topology_change:
        raise errors.RunFolderError(
            f"--resume: {run.workdir} was computed on another topology ({said}); its numbers would "
            "differ in float rounding (~1e-7). Resume on the original processes and devices, or "
            "pass --allow-topology-change to accept that (results.json records it)")
    return {"from": before, "to": now}


def peek_dataset(argv: list[str], default: str) -> str:
    """The ``--dataset`` value in ``argv`` (per-dataset defaults depend on it).

    Raises:
      ConfigError: ``--dataset`` given more than once (which one's defaults would apply?).
    """
    values = [argv[i + 1] for i, arg in enumerate(argv[:-1]) if arg == "--dataset"]
    values += [arg.split("=", 1)[1] for arg in argv if arg.startswith("--dataset=")]
    if len(values) > 1:
        raise errors.ConfigError(f"--dataset given {len(values)} times ({values}); give it once")
    return values[0] if values else default


# What the command line being run was built from: (config class, argv), for naming flags.
_PARSED: list[tuple[type, list[str]]] = []


def parse(config_cls: type[C], defaults: Callable[[str], C], argv: list[str] | None, *,
          prog: str, description: str, default_dataset: str = "cifar10") -> C:
    """``argv`` -> a resolved experiment config (the dataset's defaults under the flags).

    Also checks, before any compute, that the run's folders can be written (the
    workdir, the data dir, the compilation cache: :func:`check_run_options`).

    Raises:
      ConfigError: an unknown dataset, a bad flag or value (one line, naming the flag).
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    _PARSED[:] = [(config_cls, argv)]
    dataset = peek_dataset(argv, default_dataset)
    if dataset not in datasets.DATASETS:
        raise errors.ConfigError(f"--dataset {dataset!r}: unknown; allowed: {list(datasets.names())}")
    default = defaults(dataset)
    out = io.StringIO()
    try:
        # Errors: a wide console, so tyro's boxes hold one logical line per line (no wrapping)
        # for one_line. --help: the terminal's own width, or it is unreadable there.
        wide = {} if {"-h", "--help"} & set(argv) else {"COLUMNS": "1000"}
        with contextlib.redirect_stderr(out), contextlib.redirect_stdout(out), \
                _environ(**wide), errors.watch() as seen:
            config = tyro.cli(config_cls, default=default, args=argv, prog=prog,
                              description=description)
    except SystemExit as exit_:
        if exit_.code in (0, None):  # --help
            sys.stdout.write(out.getvalue())
            raise
        text = out.getvalue()
        where = re.search(r"Error parsing ([\w.-]+):", text)
        if seen and where:  # a config's own check, inside tyro: its error, with the field's path
            err, path = seen[-1], where.group(1).replace("-", "_")
            err.field = path if err.field is None else f"{path}.{err.field}"
            raise err from None
        raise switch_misuse(config_cls, argv, text) or errors.ConfigError(one_line(text)) from None
    if isinstance(getattr(config, "run", None), RunOptions):
        if config.run.verbose:  # read where the reports are filtered (checkpoint, native_stderr)
            os.environ["TRM_JAX_VERBOSE"] = "1"
        # Several processes: they connect now (before any JAX computation), and their
        # devices must divide the seeds; then the same checks as alone.
        distributed.initialize(config.run.distributed)
        if config.run.distributed.enabled and isinstance(getattr(config, "seeds", None), int) \
                and config.seeds >= 1:
            sharding.check_seeds(config.seeds)
        check_run_options(config.run)
        check_resume(config)
    return config


@contextlib.contextmanager
def _environ(**values: str):
    saved = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def one_line(text: str) -> str:
    """A tyro error box -> one line: its message, plus the flags it suggests."""
    sections, current = [], []
    for raw in text.splitlines():
        line = re.sub(r"[│╭╮╰╯]+", " ", raw).strip()
        if line and set(line) <= set("-─"):
            sections.append(current)
            current = []
        elif line:
            current.append(line)
    sections.append(current)
    message, hints = [], []
    for section in sections[1:] or sections:
        if not section or section[0].startswith(("For full helptext", "usage:", "Argument helptext")):
            continue
        if section[0].startswith("Perhaps you meant"):
            hints = [ln.split()[0] for ln in section[1:] if ln.startswith("--")]
            continue
        message += section
    line = " ".join(message) or " ".join(sections[0]) or "bad command line"
    if hints:
        line += f"; perhaps you meant {' or '.join(hints)}"
    return re.sub(r"\s+", " ", line).strip()


def switch_misuse(config_cls: type, argv: list[str], text: str) -> errors.ConfigError | None:
    """tyro's "Unrecognized options: abc" for ``--progress abc`` or ``--progress=abc`` names
    no flag: the error that does (a switch takes no value), or ``None`` when it was not that."""
    unknown = re.search(r"Unrecognized options?: (.+)", text)
    if not unknown:
        return None
    switches = switch_flags(config_cls)
    for i, arg in enumerate(argv):
        flag, eq, value = arg.partition("=")
        if not eq and i + 1 < len(argv) and not argv[i + 1].startswith("-"):
            value = argv[i + 1]
        if flag in switches and value and value in unknown.group(1):
            return errors.ConfigError(f"{flag} is a switch ({flag} / --no-{flag[2:]}) and takes no "
                                      f"value, got {value!r}")
    return None


def switch_flags(config_cls: type) -> set[str]:
    """The flags of ``config_cls`` that are on/off switches (``bool`` fields)."""
    return {flag for flag, hint in _leaves(config_cls).values() if hint is bool}


def flag_names(config_cls: type) -> dict[str, str]:
    """Every leaf setting of an experiment config class: dotted field path -> its flag
    (``"method.meta.inner_lr"`` -> ``"--meta.inner-lr"``; :data:`FLAT` fields add no prefix)."""
    return {path: flag for path, (flag, _) in _leaves(config_cls).items()}


def _leaves(config_cls: type) -> dict[str, tuple[str, Any]]:
    """Dotted field path -> (its flag, its type) for every leaf setting of ``config_cls``."""
    out: dict[str, tuple[str, Any]] = {}

    def walk(cls: type, path: tuple[str, ...], flag: tuple[str, ...]) -> None:
        hints = typing.get_type_hints(cls, include_extras=True)
        for field in dataclasses.fields(cls):
            hint, flat = hints.get(field.name, field.type), False
            if typing.get_origin(hint) is Annotated:
                flat = any(m is FLAT for m in hint.__metadata__)
                hint = typing.get_args(hint)[0]
            sub_path, sub_flag = (*path, field.name), flag if flat else (*flag, field.name)
            if dataclasses.is_dataclass(hint):
                walk(hint, sub_path, sub_flag)
            else:
                out[".".join(sub_path)] = ("--" + ".".join(sub_flag).replace("_", "-"), hint)

    walk(config_cls, (), ())
    return out


def name_flag(err: errors.ConfigError) -> errors.ConfigError:
    """``err`` with its ``field`` replaced in the message by the flag that sets it, for the
    command line last parsed (the one given on the command line where several could be meant)."""
    if not err.field or not _PARSED:
        return err
    config_cls, argv = _PARSED[0]
    flags, parts, candidates = flag_names(config_cls), err.field.split("."), []
    for i in range(len(parts)):  # the full path, else the settings it ends with (the
        key = ".".join(parts[i:])  # protocol's classes, checked by the attack suite)
        candidates = [flags[key]] if key in flags else [
            f for p, f in flags.items() if p.endswith("." + key)]
        if candidates:
            break
    else:
        return err
    given = [f for f in candidates if any(a == f or a.startswith(f + "=") for a in argv)]
    flag = (given or candidates)[0]
    message = str(err)
    for i in range(len(parts)):  # the longest spelling of the field that the message uses
        found = re.search(r"(\b\w+Config\.)?\b" + re.escape(".".join(parts[i:])) + r"\b", message)
        if found:
            message = message[:found.start()] + flag + message[found.end():]
            break
    else:
        message = f"{flag}: {message}"
    return errors.ConfigError(message, field=err.field)


def check_run_options(run: RunOptions) -> None:
    """``--workdir`` may be used as asked (:func:`trm_jax.runs.check_workdir`: ``--overwrite``
    only of a run folder of ours, ``--resume`` only of a run), and the folders a run writes
    can be written: ``--workdir``, ``--data-dir`` and, unless
    ``--no-compile-cache``, the compilation cache (``$TRM_JAX_CACHE_DIR``). Each is probed by
    creating and removing a file in it (or in the nearest folder above it that exists), so
    a read-only filesystem fails here, before any compute and before a run folder exists."""
    if run.workdir is not None and distributed.is_writer():  # the others write no run folder
        runs.check_workdir(run.workdir, overwrite=run.overwrite, resume=run.resume)
        writable_folder(run.workdir, "--workdir")
    writable_folder(run.data_dir or data.default_data_dir(),
                    "--data-dir" if run.data_dir else "the TFDS data dir ($TFDS_DATA_DIR)",
                    must_write=False)
    if run.compile_cache and compilation.persistent_cache_wanted():
        writable_folder(compilation.default_cache_dir(), "the compilation cache",
                        hint=f"set ${compilation.CACHE_DIR_ENV} to a writable folder, or pass "
                             "--no-compile-cache")


def writable_folder(path: str | os.PathLike, what: str, *, must_write: bool = True,
                    hint: str = "give a writable folder") -> None:
    """Raises :class:`ConfigError` unless ``path`` is, or can be created as, a folder this
    process can write in. ``must_write=False``: an existing folder only needs to be readable
    (a prepared, read-only TFDS data dir is fine)."""
    path = pathlib.Path(path).expanduser()
    existing = path
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise errors.ConfigError(f"{what} {path}: {existing} is a file, not a folder; {hint}")
    if existing == path and not must_write:
        if not os.access(path, os.R_OK | os.X_OK):
            raise errors.ConfigError(f"{what} {path} cannot be read; give a readable folder")
        return
    err = runs.write_probe(existing)
    if err is not None:
        raise errors.ConfigError(f"{what} {path}: cannot write in {existing} "
                                 f"({err.strerror or err}); {hint}")


def main(run: Callable[[list[str] | None], Any], argv: list[str] | None = None) -> int:
    """Runs an experiment's ``main``; typed errors -> one line on stderr, exit code 2; so is
    a storage failure anywhere (a full disk, a quota, an I/O error: the run stays resumable).

    Several processes (``--distributed.*``): an error before compute is also posted to the
    others (they stop with one line naming this process), and every process leaves the run
    together (``jax.distributed.shutdown``)."""
    try:
        results = run(argv)
    except errors.TrmError as err:
        if isinstance(err, errors.ConfigError):
            err = name_flag(err)
        message = " ".join(str(err).split())
        print(f"error: {message}", file=sys.stderr)
        _leave(message, 2)
        return 2
    except KeyboardInterrupt:
        print("interrupted: continue with the same command plus --resume", file=sys.stderr)
        _leave("interrupted", 130)
        return 130
    except Exception as err:
        storage = errors.as_storage_error(err)  # a full disk, however deep in a library
        if storage is not None:
            message = " ".join(str(storage).split())
            print(f"error: {message}", file=sys.stderr)
            _leave(message, 2)
            return 2
        # A bug: its traceback follows; the other processes stop too.
        distributed.report_failure(f"{type(err).__name__}: {' '.join(str(err).split())}")
        raise
    _leave(None, 0)
    if isinstance(results, dict) and results.get("failed"):
        print(f"error: failed: {sorted(results['failed'])} (see results.json)", file=sys.stderr)
        return 1
    return 0


def _leave(error: str | None, code: int) -> None:
    if distributed.stuck():  # JAX still waits to connect, in a thread that cannot be stopped
        sys.stdout.flush()
        sys.stderr.flush()
        native_stderr.finish()
        os._exit(code)
    if error is not None:
        distributed.report_failure(error)
    distributed.shutdown()


def protocol_spec(dataset: str, options: ProtocolOptions) -> data.ProtocolSpec:
    """The dataset's preset protocol with the given overrides; validated."""
    spec = data.preset(dataset)
    changes = {k: v for k, v in dataclasses.asdict(options).items() if v is not None}
    spec = dataclasses.replace(spec, **{k: tuple(v) if isinstance(v, list) else v
                                        for k, v in changes.items()})
    data.validate_spec(spec)
    return spec


def check_method(field: str, name: str, config: Any, protocol: data.ProtocolData) -> None:
    """:func:`trm_jax.methods.check` of the experiment config's ``field``: an error names
    the flag (``--reference.train.batch-size``), before any compute."""
    with errors.about(field):
        methods.check(name, config, protocol)


def check_suite(suite: Any, protocol: data.ProtocolData, field: str = "attack") -> None:
    """:meth:`trm_jax.SuiteConfig.check` of the experiment config's ``field``, before any compute."""
    with errors.about(field):
        suite.check(protocol)


def check_resources(config: Any, protocol: data.ProtocolData, *, model: Any = None,
                    suites: tuple[tuple[str, Any], ...] = (), seeds: int | None = None,
                    run: RunOptions | None = None, aliases: dict[str, str] | None = None
                    ) -> resources.Estimate | None:
    """The pre-flight estimate of the run's peak memory and steps (:mod:`trm_jax.resources`):
    refuses (one line naming the flags, the estimate and what is available) a run that would
    not fit or would not end, before any compute; ``--force-resources`` skips it.

    ``model``: the architecture (default: ``--model`` or the dataset's preset); ``suites``:
    attack suites besides the ``SuiteConfig`` fields of ``config`` (compare's --full-grid);
    ``aliases``: setting path -> the flag that set it, where another flag than its own did
    (an ablation's budgets)."""
    run = run or config.run
    if run.force_resources:
        return None
    seeds = config.seeds if seeds is None else seeds
    model = model or model_override(config.dataset, getattr(config, "model", None), protocol) \
        or datasets.model_for(config.dataset, protocol.pretrain.beneficial.num_classes,
                              protocol.image_shape)
    pretrain, finetune = protocol.pretrain, protocol.finetune
    arrays = [a for a in jax.tree.leaves(protocol) if isinstance(a, np.ndarray)]
    est = resources.estimate(config, model=model, seeds=seeds, suites=suites,
                             train_examples=len(pretrain.beneficial) + len(pretrain.malicious),
                             attack_examples=len(finetune.malicious),
                             attack_epochs=datasets.get(protocol.spec.dataset).attack_epochs,
                             data_bytes=sum(a.nbytes for a in arrays), devices=jax.device_count())
    flags = {**flag_names(type(config)), **(aliases or {})}
    resources.check(est, seeds=seeds, flag=lambda path: flags.get(path, path))
    return est


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
        workdir = pathlib.Path(options.workdir or runs.default_workdir(name))
        fresh = not workdir.exists()
        resolved = runs.to_jsonable({"experiment": name, **dataclasses.asdict(config),
                                     "topology": topology()})
        self.topology_change = check_resume(config) if hasattr(config, "run") else None
        # Several processes, before compute: the same settings everywhere (all but the
        # process id), and process 0's run folder (its default has process 0's timestamp).
        same = json.loads(json.dumps(resolved))
        same.get("run", {}).get("distributed", {}).pop("process_id", None)
        if not distributed.is_writer():
            workdir = pathlib.Path(distributed.agree(same)[0]["workdir"])
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
            if distributed.is_writer():
                distributed.agree(same, {"workdir": str(workdir)})
            self.cache_dir = compilation.enable_persistent_cache() if options.compile_cache else None
        except BaseException:
            self.dir.close()
            if fresh and self.dir.writer:  # made a moment ago by this process
                runs.discard(workdir)
            raise
        self.stats = compilation.count_compilations().__enter__()
        self.hooks = RunFolderHooks(self.dir, resume=options.resume,
                                    checkpoint_every=options.checkpoint_every,
                                    progress=options.progress,
                                    checkpoint_every_phase={"meta": options.meta_checkpoint_every},
                                    checkpoint_seconds=options.checkpoint_seconds)
        self.resume = options.resume
        self.writer = self.dir.writer  # False: another process writes the run folder
        print(f"run folder: {self.dir.path}" + ("" if self.writer else " (written by process 0)"),
              flush=True)

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

    def file(self, name: str):
        """``<run>/name``, listed as the project's (see :meth:`trm_jax.runs.RunDir.file`)."""
        return self.dir.file(name)

    def save_model(self, model: Any, params: Any, seeds: list[int]) -> None:
        """The run's model (``model.json`` + ``checkpoints/model``: what ``experiments.attack``
        and :func:`trm_jax.checkpoint.load_model` read)."""
        save_model(self.dir, model, params, seeds)

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
        # Every process of the run (an interrupted one until its last record, then each resume).
        total, processes = self.dir.wall_seconds()
        results = {**results, "compilation": compiled, "wall_seconds": max(total, wall),
                   "processes": processes,
                   **({"topology_change": self.topology_change} if self.topology_change else {})}
        self.dir.write_results(results)
        return json.loads(json.dumps(runs.to_jsonable(results)))


def save_model(run: runs.RunDir, model: Any, params: Any, seeds: list[int]) -> None:
    """:func:`trm_jax.checkpoint.save_model` into a run folder, its files listed as the project's."""
    run.file("model.json"), run.file("checkpoints")
    checkpoint.save_model(run.path, model, params, seeds)


def summarize(metrics: dict[str, Any]) -> dict[str, Any]:
    """Per-seed arrays in (nested) dicts -> ``{"per_seed", "mean", "std"}`` summaries."""
    out = {}
    for k, v in metrics.items():
        if isinstance(v, dict):
            out[k] = summarize(v)
        elif isinstance(v, (np.ndarray, jax.Array)) and np.ndim(v) == 1:
            out[k] = runs.summarize(sharding.to_host(v))
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


def apply_variant(config: Any, change: str) -> Any:
    """One ``"field=value"`` change (a dotted path, a Python literal or a bare word).

    Raises:
      ConfigError: not ``field=value``, an unknown field, or an invalid value.
    """
    path, sep, text = change.partition("=")
    if not sep or not path.strip():
        raise errors.ConfigError(f"variant change {change!r} is not field=value")
    try:
        value = ast.literal_eval(text.strip())
    except (ValueError, SyntaxError):
        value = text.strip()  # a bare word is a string (start=skd)
    return methods.replace_path(config, path.strip(), value)


def _split_variants(variant: str) -> list[str]:
    """Splits on the commas between changes, not inside tuples: "a=(1, 2),b=3"."""
    out, depth, cur = [], 0, ""
    for ch in variant:
        depth += ch in "([{"
        depth -= ch in ")]}"
        if ch == "," and depth == 0:
            out.append(cur)
            cur = ""
        else:
            cur += ch
    return [c for c in (*out, cur) if c.strip()]


def variant_config(base: Any, variant: str) -> Any:
    """``base`` with every comma-separated ``field=value`` change of ``variant`` applied."""
    config = base
    for change in _split_variants(variant):
        config = apply_variant(config, change)
    return config
