"""What every experiment shares: CLI flags, data + model presets, resumable phases.

Experiments stay thin: flags -> frozen dataclass configs -> library calls -> a
run folder (``trm_jax.runs``). Multi-phase experiments (teacher, student, head)
call :func:`train_phase` once per phase; each phase checkpoints under
``checkpoints/<phase>`` and is skipped or resumed on ``--resume``.
"""
from __future__ import annotations

import argparse
import dataclasses
import pathlib
import sys
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from trm_jax import checkpoint, data, models, presets, runs, train

TRAIN_DEFAULTS = {  # per dataset: epochs, batch size, learning rate (Adam)
    "cifar10": dict(epochs=20, batch_size=64, learning_rate=1e-3),
    "mnist": dict(epochs=5, batch_size=64, learning_rate=1e-3),
    "omniglot": dict(epochs=10, batch_size=64, learning_rate=1e-3),
    "digits": dict(epochs=30, batch_size=32, learning_rate=1e-3),
}


def int_list(text: str) -> tuple[int, ...]:
    """``"0,1,2"`` or ``"0-4"`` -> ``(0, 1, 2)`` / ``(0, 1, 2, 3, 4)``."""
    try:
        if "-" in text and "," not in text:
            lo, hi = (int(t) for t in text.split("-"))
            return tuple(range(lo, hi + 1))
        return tuple(int(t) for t in text.split(",") if t.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a list of ints like '0,1,2' or '0-4', got {text!r}")


def float_list(text: str) -> tuple[float, ...]:
    try:
        return tuple(float(t) for t in text.split(",") if t.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a list of numbers like '0.1,0.01', got {text!r}")


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {text!r}")
    return value


def add_common_args(parser: argparse.ArgumentParser, default_dataset: str = "cifar10") -> None:
    """Flags every experiment takes: data protocol, seeds, run folder."""
    g = parser.add_argument_group("data protocol")
    g.add_argument("--dataset", default=default_dataset, choices=sorted(data.DATASETS),
                   help="'digits' works offline; the others download through TFDS")
    g.add_argument("--data-dir", default=None, help="TFDS data dir (default $TFDS_DATA_DIR or ~/tensorflow_datasets)")
    g.add_argument("--beneficial-classes", type=int_list, default=None, help="default: first half of the classes")
    g.add_argument("--malicious-classes", type=int_list, default=None, help="default: second half")
    g.add_argument("--pretrain-size", type=positive_int, default=None, help="train[:N] is pre-training")
    g.add_argument("--finetune-size", type=positive_int, default=None, help="default: the rest of train")
    g.add_argument("--test-size", type=positive_int, default=None, help="default: the whole test split")
    g.add_argument("--model", default=None, choices=sorted(models.MODELS), help="default: the dataset's preset")
    r = parser.add_argument_group("run")
    r.add_argument("--seeds", type=positive_int, default=5, help="seeds 0..N-1, vmapped in one program")
    r.add_argument("--workdir", default=None, help="run folder (default runs/<name>-<timestamp>)")
    r.add_argument("--overwrite", action="store_true", help="replace an existing run folder")
    r.add_argument("--resume", action="store_true", help="continue the run in --workdir")
    r.add_argument("--checkpoint-every", type=positive_int, default=5, help="epochs between checkpoints")
    r.add_argument("--no-progress", action="store_true", help="no progress bars")


def add_train_args(parser: argparse.ArgumentParser, prefix: str = "", what: str = "training",
                   epochs_type: Callable[[str], Any] = int) -> None:
    """``--{prefix}epochs`` etc. for one supervised phase (defaults per dataset).

    ``epochs_type=int_list`` lets ``--{prefix}epochs`` take a list (an ablation);
    pass the chosen value to :func:`train_config` as ``epochs=``.
    """
    g = parser.add_argument_group(what)
    g.add_argument(f"--{prefix}epochs", type=epochs_type, default=None)
    g.add_argument(f"--{prefix}batch-size", type=positive_int, default=None)
    g.add_argument(f"--{prefix}lr", type=float, default=None)
    g.add_argument(f"--{prefix}optimizer", default="adam", choices=train.OPTIMIZERS)
    g.add_argument(f"--{prefix}strategy", default="auto", choices=train.STRATEGIES,
                   help="scan: epoch as one lax.scan (fast on GPU); step: one jit per step (fast on CPU)")


def train_config(args: argparse.Namespace, prefix: str = "", **overrides: Any) -> train.TrainConfig:
    """A :class:`TrainConfig` from ``add_train_args`` flags, dataset defaults filling gaps."""
    get = lambda name: getattr(args, (prefix + name).replace("-", "_"))
    defaults = TRAIN_DEFAULTS[args.dataset]
    values = dict(
        epochs=defaults["epochs"] if get("epochs") is None else get("epochs"),
        batch_size=get("batch-size") or defaults["batch_size"],
        learning_rate=defaults["learning_rate"] if get("lr") is None else get("lr"),
        optimizer=get("optimizer"), strategy=get("strategy"))
    values.update(overrides)
    return train.TrainConfig(**values)


def add_attack_args(parser: argparse.ArgumentParser) -> None:
    """``--attacks`` etc.: the fine-tuning evaluation run at the end of an experiment."""
    a = parser.add_argument_group("attack (trm_jax.attack; defaults: the evaluator's)")
    a.add_argument("--attacks", default="linear_probe",
                   help="comma-separated attack names, or 'all' (default: linear_probe, the paper's)")
    a.add_argument("--attack-lrs", type=float_list, default=None, help="e.g. 0.1,0.01")
    a.add_argument("--attack-optimizers", default=None, help="comma-separated, e.g. adam,momentum")
    a.add_argument("--attack-epochs", type=positive_int, default=None)
    a.add_argument("--attack-batch-size", type=positive_int, default=64)
    a.add_argument("--no-scratch", action="store_true", help="skip the from-scratch reference")


def attack_options(args: argparse.Namespace) -> dict[str, Any]:
    """``add_attack_args`` flags -> ``attack_report`` keyword arguments, validated before any compute.

    Raises:
      ValueError: unknown attack or optimizer names, empty lists, non-positive learning rates.
    """
    from trm_jax import attack  # the evaluator; imported only by experiments that attack

    split = lambda text: tuple(t.strip() for t in text.split(",") if t.strip())
    attacks = "all" if args.attacks == "all" else split(args.attacks)
    if not attacks:
        raise ValueError("--attacks is empty; give attack names or 'all'")
    attack.resolve_attacks(attacks)
    optimizers = None if args.attack_optimizers is None else split(args.attack_optimizers)
    bad = [o for o in optimizers or () if o not in attack.OPTIMIZERS]
    if bad or optimizers == ():
        raise ValueError(f"--attack-optimizers {args.attack_optimizers!r}: unknown or empty; "
                         f"allowed: {attack.OPTIMIZERS}")
    if args.attack_lrs is not None:
        attack.validate_learning_rates(args.attack_lrs)
    return dict(attacks=attacks, learning_rates=args.attack_lrs, optimizers=optimizers,
                epochs=args.attack_epochs, batch_size=args.attack_batch_size,
                include_scratch=not args.no_scratch)


def protocol_spec(args: argparse.Namespace) -> data.ProtocolSpec:
    """The dataset preset with any flag overrides; validated before any loading."""
    spec = data.preset(args.dataset)
    changes = {k: getattr(args, k) for k in ("beneficial_classes", "malicious_classes",
                                             "pretrain_size", "finetune_size", "test_size")
               if getattr(args, k) is not None}
    spec = dataclasses.replace(spec, **changes)
    data.validate_spec(spec)
    return spec


def seeds_and_keys(args: argparse.Namespace) -> tuple[list[int], jax.Array]:
    seeds = list(range(args.seeds))
    return seeds, jax.vmap(jax.random.key)(jnp.asarray(seeds))


def open_run(name: str, args: argparse.Namespace, config: dict[str, Any]) -> runs.RunDir:
    """Creates (or on ``--resume`` reopens) the run folder and writes ``config.json``.

    On resume the stored config must match: resuming with other settings would
    silently mix two experiments.
    """
    workdir = args.workdir or runs.default_workdir(name)
    run = runs.RunDir.create(workdir, overwrite=args.overwrite, resume=args.resume)
    config = runs.to_jsonable(config)
    if args.resume and (run.path / "config.json").exists():
        stored = run.config()
        ignore = {"resume", "overwrite", "no_progress", "workdir"}
        diff = sorted(k for k in set(stored) | set(config) if k not in ignore
                      and stored.get(k) != config.get(k))
        if diff:
            raise SystemExit(f"--resume: settings differ from the stored run in {diff}; "
                             "resume with the original flags or start a new --workdir")
    run.write_config(config)
    print(f"run folder: {run.path}")
    return run


def device_subset(subset: data.Subset) -> tuple[jax.Array, jax.Array]:
    """Puts a subset's ``(uint8 images, int32 labels)`` on the default device once."""
    return jax.device_put(subset.images), jax.device_put(subset.labels)


def train_phase(run: runs.RunDir, phase: str, keys: jax.Array, params: Any,
                apply_fn: Callable, train_data: tuple[jax.Array, jax.Array],
                config: train.TrainConfig, *, eval_data=None, resume: bool = False,
                checkpoint_every: int = 5, progress: bool = True,
                per_seed_data: bool | Any = False,
                loss_fn: train.LossFn | None = None) -> train.TrainState:
    """One resumable supervised phase: fit, log per-epoch metrics, checkpoint.

    The checkpoint under ``checkpoints/<phase>`` is written only after an epoch
    whose metrics are finite, so the last good state survives a NaN.
    ``per_seed_data``: ``train_data`` has a leading seed axis (see ``train.fit``).
    ``loss_fn``: replaces the cross-entropy of ``apply_fn`` (see ``train.fit_classifier``).
    """
    ckpt = checkpoint.Checkpointer(run.checkpoint_dir / phase)
    start_epoch, state = 0, None
    if resume and ckpt.latest_step() is not None:
        template = _initial_state(keys, params, apply_fn, train_data, config, per_seed_data)
        state, meta = ckpt.restore(template)
        start_epoch = int(meta["epoch"])
        run.truncate_metrics(lambda r: r.get("phase") != phase or r.get("epoch", 0) <= start_epoch)
        print(f"[{phase}] resumed after epoch {start_epoch}")

    def on_epoch(epoch, state, metrics):
        run.log({"phase": phase, "epoch": epoch,
                 **{k: float(np.mean(v)) for k, v in metrics.items()},
                 "per_seed": {k: v for k, v in metrics.items()}})
        if epoch % checkpoint_every == 0 or epoch == config.epochs:
            ckpt.save(epoch, state, {"epoch": epoch, "phase": phase})

    try:
        state, _ = train.fit_classifier(
            keys, params, apply_fn, *train_data, config, eval_data=eval_data, state=state,
            start_epoch=start_epoch, on_epoch=on_epoch, progress=phase if progress else False,
            per_seed_data=per_seed_data, loss_fn=loss_fn)
    except train.NonFiniteError as err:
        ckpt.close()
        raise SystemExit(f"[{phase}] {err}. Last good checkpoint: {ckpt.directory} "
                         f"(step {ckpt.latest_step()}).")
    if state is None:  # nothing left to train and nothing restored: zero epochs
        state = _initial_state(keys, params, apply_fn, train_data, config, per_seed_data)
    ckpt.close()
    return state


def _initial_state(keys, params, apply_fn, train_data, config, per_seed_data=False):
    state, _ = train.fit_classifier(keys, params, apply_fn, *train_data,
                                    dataclasses.replace(config, epochs=0), progress=False,
                                    per_seed_data=per_seed_data)
    return state


def save_model(run: runs.RunDir, model: models.Model, params: Any, seeds: list[int]) -> None:
    """Stores the final params stack ``[S, ...]`` in ``checkpoints/model`` and the
    architecture in ``model.json`` (what ``experiments.attack`` reads)."""
    with checkpoint.Checkpointer(run.checkpoint_dir / "model", max_to_keep=1) as ckpt:
        ckpt.save(0, params, {"model": model.spec(), "seeds": seeds})
    run.write_json("model.json", {"model": model.spec(), "seeds": seeds})


def load_model(run_dir: str | pathlib.Path) -> tuple[models.Model, Any, list[int]]:
    """Reads the saved model of any run folder -> ``(model, params[S, ...], seeds)``."""
    run = runs.RunDir.open(run_dir)
    if not (run.path / "model.json").is_file():
        raise checkpoint.CheckpointError(f"{run.path} has no saved model (model.json); "
                                         "did the run finish?")
    meta = run.read_json("model.json")
    model = models.from_spec(meta["model"])
    seeds = list(meta["seeds"])
    like = jax.vmap(model.init)(jax.vmap(jax.random.key)(jnp.arange(len(seeds))))
    with checkpoint.Checkpointer(run.checkpoint_dir / "model") as ckpt:
        params, _ = ckpt.restore(like)
    return model, params, seeds


class Timer:
    def __init__(self):
        self.start = time.perf_counter()

    def seconds(self) -> float:
        return time.perf_counter() - self.start


def fail(message: str) -> None:
    print(f"error: {message}", file=sys.stderr)
    raise SystemExit(2)
