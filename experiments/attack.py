"""Fine-tuning attacks on any saved model: the evaluation of every method.

    python -m experiments.train_reference --dataset digits --seeds 3 --workdir runs/ref
    python -m experiments.attack --run runs/ref                    # the paper's linear probe
    python -m experiments.attack --run runs/ref --attacks all --output attack_all.json

Reads the run's ``config.json`` (dataset, classes, split sizes, data dir) and
saved model (``model.json`` + ``checkpoints/model``), attacks every seed's model
with every learning rate in one compiled program per attack, and writes into the
run folder ``attack.json`` (all curves and metrics, see ``trm_jax.attack``) and
``attack.png`` (mean +- std learning curves, chance level), then prints a
summary. ``--reference RUN`` also attacks an unprotected reference run the same
way. On 2 CPU cores, digits with 3 seeds: ~1 min for the default probe +
scratch (mostly compilation).
"""
from __future__ import annotations

import argparse
import dataclasses
import pathlib
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from experiments import common
from trm_jax import attack, data, plots, runs

NAME = "attack"


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=f"python -m experiments.{NAME}", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", required=True, help="run folder of any experiment (with a saved model)")
    p.add_argument("--attacks", default="linear_probe",
                   help=f"'all' or a comma list of {', '.join(attack.ATTACKS)} (default: linear_probe)")
    p.add_argument("--learning-rates", type=common.float_list, default=None,
                   help="comma list; default: 0.1 for linear_probe, "
                        f"{','.join(f'{lr:g}' for lr in attack.LEARNING_RATE_GRID)} for the others / 'all'")
    p.add_argument("--optimizers", default=None,
                   help=f"comma list of {', '.join(attack.OPTIMIZERS)}; default adam ('all': adam,momentum)")
    p.add_argument("--epochs", type=int, default=None, help="attack epochs (default per dataset: "
                   + ", ".join(f"{k} {v}" for k, v in attack.DEFAULT_EPOCHS.items()) + ")")
    p.add_argument("--batch-size", type=common.positive_int, default=64)
    p.add_argument("--seeds", type=common.positive_int, default=None,
                   help="attack only the first N saved seeds (default: all)")
    p.add_argument("--no-scratch", action="store_true", help="skip the scratch reference")
    p.add_argument("--reference", default=None,
                   help="run folder of an unprotected reference model to attack the same way")
    p.add_argument("--data-dir", default=None, help="TFDS data dir (default: the run's)")
    p.add_argument("--batching", default="auto", choices=attack.BATCHINGS,
                   help="vmap: all runs vectorised; map: lax.map over runs (faster for conv "
                        "training on CPU); auto picks")
    p.add_argument("--output", default="attack.json", help="file name inside the run folder")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output file")
    return p


def protocol_from_config(config: dict[str, Any]) -> data.ProtocolSpec:
    """The run's protocol: ``config["protocol"]`` if stored, else the dataset preset
    with the run's class / size flags."""
    if isinstance(config.get("protocol"), dict):
        stored = dict(config["protocol"])
        fields = {f.name for f in dataclasses.fields(data.ProtocolSpec)}
        unknown = sorted(set(stored) - fields)
        if unknown:
            raise ValueError(f"config.json protocol has unknown fields {unknown}; known: {sorted(fields)}")
        for k in ("beneficial_classes", "malicious_classes"):
            if k in stored:
                stored[k] = tuple(stored[k])
        spec = data.ProtocolSpec(**stored)
    elif "dataset" in config:
        spec = data.preset(config["dataset"])
        changes = {k: (tuple(v) if isinstance(v, list) else v) for k, v in config.items()
                   if k in ("beneficial_classes", "malicious_classes", "pretrain_size",
                            "finetune_size", "test_size") and v is not None}
        spec = dataclasses.replace(spec, **changes)
    else:
        raise ValueError("config.json has neither 'protocol' nor 'dataset'; cannot tell which data "
                         "the model was trained for")
    data.validate_spec(spec)
    return spec


def parse_attacks(text: str) -> str | tuple[str, ...]:
    if text == "all":
        return "all"
    names = tuple(t.strip() for t in text.split(",") if t.strip())
    attack.resolve_attacks(names)
    return names


def load_params(run_dir: str, num_seeds: int | None, what: str):
    model, params, seeds = common.load_model(run_dir)
    if num_seeds is not None:
        if num_seeds > len(seeds):
            raise ValueError(f"--seeds {num_seeds} but the {what} run {run_dir} saved only "
                             f"{len(seeds)} seeds {seeds}; allowed: 1..{len(seeds)}")
        seeds = seeds[:num_seeds]
        params = jax.tree.map(lambda x: x[:num_seeds], params)
    return model, params, seeds


def summary_table(report: dict[str, Any]) -> str:
    """A plain-text table: one row per attack and reference entry."""
    header = ["entry", "lr*", "epoch 0", "final", "AUC", "best", "steps to scratch", "AUC/scratch"]
    rows = []
    groups = [("", report["attacks"]), ("ref: ", report["references"])]
    for prefix, entries in groups:
        for name, e in entries.items():
            steps = e.get("steps_to_reach")
            steps_cell = "-" if steps is None else (
                f"{steps['mean']:.0f}" if np.isfinite(steps["mean"])
                else f"never ({steps['reached']:.0%} reached)")
            ratio = e.get("relative_to_scratch", {}).get("auc_ratio")
            rows.append([prefix + name, f"{e['best_lr']:g}", f"{e['initial']['mean']:.3f}",
                         f"{e['final']['mean']:.3f} ± {e['final']['std']:.3f}",
                         f"{e['auc']['mean']:.3f} ± {e['auc']['std']:.3f}",
                         f"{e['best']['mean']:.3f}", steps_cell,
                         "-" if ratio is None else f"{ratio:.2f}"])
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(header)]
    fmt = lambda cells: "  ".join(c.ljust(w) for c, w in zip(cells, widths))
    return "\n".join([fmt(header), fmt(["-" * w for w in widths]), *map(fmt, rows)])


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parser().parse_args(argv)
    timer = common.Timer()
    try:  # every setting is checked before any loading or compute
        attacks = parse_attacks(args.attacks)
        optimizers = None if args.optimizers is None else tuple(
            o.strip() for o in args.optimizers.split(",") if o.strip())
        if args.epochs is not None and args.epochs < 1:
            raise ValueError(f"--epochs must be >= 1, got {args.epochs}")
        attack.attack_plan(attacks, learning_rates=args.learning_rates, optimizers=optimizers,
                           epochs=args.epochs or 1, batch_size=args.batch_size)
        if not args.output.endswith(".json") or pathlib.Path(args.output).name != args.output:
            raise ValueError(f"--output must be a plain file name ending in .json, got {args.output!r}")
        run = runs.RunDir.open(args.run)
        out_path = run.path / args.output
        if out_path.exists() and not args.overwrite:
            raise FileExistsError(f"{out_path} exists; pass --overwrite to replace it or choose "
                                  "another --output")
        config = run.config()
        spec = protocol_from_config(config)
        model, params, seeds = load_params(args.run, args.seeds, "attacked")
        reference = None
        if args.reference is not None:
            ref_model, reference, ref_seeds = load_params(args.reference, len(seeds), "reference")
            if ref_model.spec() != model.spec():
                raise ValueError(f"--reference model {ref_model.spec()} differs from the attacked "
                                 f"model {model.spec()}")
    except (ValueError, FileNotFoundError, FileExistsError, common.checkpoint.CheckpointError) as err:
        common.fail(str(err))
    data_dir = args.data_dir or config.get("data_dir")
    protocol = data.load_protocol(spec, data_dir=data_dir)
    keys = jax.vmap(jax.random.key)(jnp.asarray(seeds))
    try:
        report = attack.attack_report(
            model, params, keys, protocol, attacks, learning_rates=args.learning_rates,
            optimizers=optimizers, epochs=args.epochs, batch_size=args.batch_size,
            include_scratch=not args.no_scratch, reference_params=reference,
            batching=args.batching, verbose=True)
    except ValueError as err:
        common.fail(str(err))
    num_classes = protocol.finetune.malicious.num_classes
    result = {"experiment": NAME, "run": str(run.path), "attacked_experiment": config.get("experiment"),
              "dataset": spec.dataset, "seeds": seeds, "protocol": spec, "model": model.spec(),
              "malicious_classes": list(spec.malicious_classes), "chance": 1.0 / num_classes,
              "settings": {k: v for k, v in vars(args).items() if k not in ("overwrite",)},
              **report, "wall_seconds": timer.seconds()}
    run.write_json(args.output, result)
    figure = plots.plot_attack_curves(
        {**result["attacks"], **result["references"]}, out_path.with_suffix(".png"),
        f"Fine-tuning attacks on {config.get('experiment', 'model')} ({spec.dataset}, "
        f"{len(seeds)} seeds)", chance=1.0 / num_classes)
    print(summary_table(result))
    worst = result["summary"]["worst_case"]["final"]
    print(f"worst case (final): {worst['attack']} {worst['mean']:.3f} ± {worst['std']:.3f}; "
          f"chance {1.0 / num_classes:.3f}")
    print(f"wrote {out_path} and {figure} in {result['wall_seconds']:.1f}s")
    return result


if __name__ == "__main__":
    main()
