"""The paper in one command: every method under one protocol and one set of seeds.

    python -m experiments.compare --dataset digits --seeds 5      # offline, real data, ~20-30 min on 2 CPU cores
    python -m experiments.compare --seeds 5                        # CIFAR-10 (internet + a GPU advised)

Runs, each into its own run folder under ``WORKDIR/methods/<method>`` (reused
when it already finished; ``--force`` redoes it):

* ``reference``    -- the unprotected model (``experiments.train_reference``),
* ``unsir``        -- the machine-unlearning baseline (``experiments.unlearning``),
* ``skd``          -- selective knowledge distillation (``experiments.skd``, with the teacher ablation),
* ``reverse_maml`` -- Reverse-MAML, exact second-order meta-gradients,
* ``reverse_maml_fo`` -- its first-order variant,

then attacks every method's saved models with the same attack suite, against ONE
from-scratch reference (same seeds, same budget). Writes ``results.json`` (every
number), ``results.md`` (the table), ``fig1_beneficial_accuracy.png``,
``fig2_attack_curves.png`` and copies the SKD ablation figure.
"""
from __future__ import annotations

import argparse
import importlib
import json
import shutil
import sys
from typing import Any

import numpy as np

from experiments import common
from trm_jax import attack, data, metrics, plots, runs

NAME = "compare"
METHODS = {  # name -> (experiment module, label, extra flags)
    "reference": ("train_reference", "Unprotected reference", []),
    "unsir": ("unlearning", "UNSIR (unlearning)", ["--no-scratch", "--no-original-attack"]),
    "skd": ("skd", "SKD", ["--no-scratch"]),
    "reverse_maml": ("reverse_maml", "Reverse-MAML (exact)", ["--no-reference", "--no-scratch"]),
    "reverse_maml_fo": ("reverse_maml", "Reverse-MAML (first-order)",
                        ["--no-reference", "--no-scratch", "--meta-grad", "first_order"]),
}


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=f"python -m experiments.{NAME}", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", default="cifar10", choices=sorted(data.DATASETS))
    p.add_argument("--data-dir", default=None)
    p.add_argument("--seeds", type=common.positive_int, default=5)
    p.add_argument("--workdir", default=None)
    p.add_argument("--overwrite", action="store_true", help="replace the whole compare folder")
    p.add_argument("--resume", action="store_true", help="continue in --workdir (finished methods are reused)")
    p.add_argument("--force", action="store_true", help="redo methods whose run folder already finished")
    p.add_argument("--methods", default=",".join(METHODS),
                   help=f"comma list of {', '.join(METHODS)}")
    p.add_argument("--attacks", default="all",
                   help="the suite run on every method: 'all' or a comma list of "
                        f"{', '.join(attack.ATTACKS)}")
    p.add_argument("--attack-epochs", type=common.positive_int, default=None)
    p.add_argument("--attack-lrs", type=common.float_list, default=None)
    p.add_argument("--attack-optimizers", default=None, help="default: adam,momentum for 'all'")
    p.add_argument("--skd-teacher-epochs", default=None,
                   help="SKD teacher ablation budgets, e.g. 1,2,5,10,20 (default: the SKD default)")
    p.add_argument("--method-args", action="append", default=[], metavar="METHOD:FLAGS",
                   help="extra flags for one method, e.g. 'reverse_maml:--meta-steps 200' (repeatable)")
    p.add_argument("--no-progress", action="store_true")
    return p


def method_argv(name: str, args: argparse.Namespace, folder, extra: list[str]) -> list[str]:
    module, _, flags = METHODS[name]
    argv = ["--dataset", args.dataset, "--seeds", str(args.seeds), "--workdir", str(folder),
            *flags, *extra]
    if args.data_dir:
        argv += ["--data-dir", args.data_dir]
    if args.no_progress:
        argv += ["--no-progress"]
    if name == "skd" and args.skd_teacher_epochs:
        argv += ["--teacher-epochs", args.skd_teacher_epochs]
    if module != "train_reference" and args.attack_epochs:
        argv += ["--attack-epochs", str(args.attack_epochs)]
    return argv


def run_method(name: str, args: argparse.Namespace, run: runs.RunDir, extra: list[str]) -> dict:
    """Runs (or reuses) one method's experiment; returns its results.json."""
    folder = run.path / "methods" / name
    if (folder / "results.json").is_file() and not args.force:
        print(f"[compare] {name}: reusing finished run {folder}")
        return json.loads((folder / "results.json").read_text())
    argv = method_argv(name, args, folder, extra)
    if folder.exists():
        argv += ["--overwrite"]  # an unfinished or --force'd method folder is redone
    print(f"[compare] {name}: python -m experiments.{METHODS[name][0]} {' '.join(argv)}", flush=True)
    return importlib.import_module(f"experiments.{METHODS[name][0]}").main(argv)


def main(argv: list[str] | None = None) -> dict:
    args = parser().parse_args(argv)
    command = "python -m experiments.compare " + " ".join(sys.argv[1:] if argv is None else argv)
    timer = common.Timer()
    names = [n.strip() for n in args.methods.split(",") if n.strip()]
    unknown = [n for n in names if n not in METHODS]
    if unknown or not names:
        raise ValueError(f"--methods: unknown {unknown}; allowed: {list(METHODS)}")
    extra: dict[str, list[str]] = {n: [] for n in names}
    for item in args.method_args:
        method, _, flags = item.partition(":")
        if method not in extra:
            raise ValueError(f"--method-args {item!r}: method must be one of {names}")
        extra[method] += flags.split()
    attack_opts = dict(attacks="all" if args.attacks == "all" else tuple(args.attacks.split(",")),
                       learning_rates=args.attack_lrs,
                       optimizers=tuple(args.attack_optimizers.split(",")) if args.attack_optimizers else None)
    spec = common.protocol_spec(argparse.Namespace(
        dataset=args.dataset, beneficial_classes=None, malicious_classes=None, pretrain_size=None,
        finetune_size=None, test_size=None))
    protocol = data.load_protocol(spec, data_dir=args.data_dir)
    epochs = args.attack_epochs or attack.default_epochs(protocol)
    attack.attack_plan(attack_opts["attacks"], learning_rates=args.attack_lrs,
                       optimizers=attack_opts["optimizers"], epochs=epochs)  # validate early
    run = common.open_run(NAME, argparse.Namespace(workdir=args.workdir, overwrite=args.overwrite,
                                                   resume=args.resume),
                          {"experiment": NAME, **vars(args), "protocol": spec, "attack_epochs": epochs})

    method_results = {name: run_method(name, args, run, extra[name]) for name in names}

    seeds, keys = common.seeds_and_keys(args)
    model, _, _ = common.load_model(run.path / "methods" / names[0])
    print("[compare] scratch reference", flush=True)
    scratch = attack.scratch_reference(model, keys, protocol, epochs=epochs)
    table, entries, beneficial = [], {}, {}
    for name in names:
        model, params, method_seeds = common.load_model(run.path / "methods" / name)
        if method_seeds != seeds:
            raise ValueError(f"{name} was trained with seeds {method_seeds}, compare uses {seeds}; "
                             "rerun with --force")
        print(f"[compare] attack suite on {name}", flush=True)
        report = attack.attack_report(model, params, keys, protocol, scratch=scratch, epochs=epochs,
                                      **attack_opts)
        for attack_name, entry in report["attacks"].items():
            entries[f"{name}/{attack_name}"] = entry
        beneficial[name] = method_results[name]["beneficial_test_accuracy"]
        table.append(row(name, beneficial[name], report, scratch))

    results = {"experiment": NAME, "dataset": args.dataset, "seeds": seeds,
               "beneficial_test_accuracy": beneficial, "attacks": entries,
               "references": {"scratch": scratch}, "methods": method_results_summary(method_results),
               "table": table, "chance": 1.0 / protocol.test.malicious.num_classes,
               "data_provenance": f"{args.dataset}: real data through TFDS",
               "command": command,
               "wall_seconds": timer.seconds()}
    run.write_results(results)
    (run.path / "results.md").write_text(markdown(results, args))
    figures(run, results, names, args)
    print(markdown(results, args))
    return results


def probe_name(report: dict) -> str:
    names = [n for n in report["attacks"] if n.startswith("linear_probe")]
    return next((n for n in names if n.endswith("adam")), names[0]) if names else next(iter(report["attacks"]))


def row(name: str, beneficial: dict, report: dict, scratch: dict) -> dict[str, Any]:
    probe = report["attacks"][probe_name(report)]
    worst_name, worst = max(((n, e) for n, e in report["attacks"].items()),
                            key=lambda ne: ne[1]["final"]["mean"])
    rel = metrics.relative_to_scratch(probe, scratch)
    return {"method": name, "label": METHODS[name][1],
            "beneficial": beneficial, "probe_attack": probe_name(report),
            "probe_final": probe["final"], "probe_auc": probe["auc"],
            "worst_attack": worst_name, "worst_final": worst["final"],
            "relative_to_scratch": rel}


def method_results_summary(method_results: dict) -> dict:
    keep = ("beneficial_test_accuracy", "wall_seconds", "misses_percent", "false_masks_percent",
            "teacher_test_accuracy", "stages", "unprotected_beneficial_test_accuracy")
    return {n: {k: r[k] for k in keep if k in r} for n, r in method_results.items()}


def markdown(results: dict, args: argparse.Namespace) -> str:
    pm = lambda s: f"{s['mean']:.3f} ± {s['std']:.3f}"
    scratch = results["references"]["scratch"]
    lines = [f"# Transfer resistance on {results['dataset']} ({len(results['seeds'])} seeds)", "",
             f"Malicious test accuracy after the fine-tuning attack (lower is better); chance "
             f"{results['chance']:.2f}. Scratch (same architecture from random init, same budget): "
             f"final {pm(scratch['final'])}, AUC {pm(scratch['auc'])}.", "",
             "| method | beneficial acc | linear probe final | linear probe AUC | worst case over suite (final) "
             "| AUC / scratch AUC | final gap to scratch |",
             "|---|---|---|---|---|---|---|"]
    for r in results["table"]:
        rel = r["relative_to_scratch"]
        lines.append(f"| {r['label']} | {pm(r['beneficial'])} | {pm(r['probe_final'])} | "
                     f"{pm(r['probe_auc'])} | {pm(r['worst_final'])} ({r['worst_attack']}) | "
                     f"{rel.get('auc_ratio', float('nan')):.3f} | {rel.get('final_gap', float('nan')):+.3f} |")
    lines += ["", "Linear probe: fresh head on frozen features, Adam, at the attacker's best learning "
              "rate of the grid (the paper's lr 0.1 is in the grid). Worst case: the highest mean final "
              "accuracy over the whole suite (attack x optimizer x lr).", "",
              f"Command: `{results['command']}`; wall time {results['wall_seconds'] / 60:.1f} min "
              f"(methods reused from an earlier run are not timed again). Data: {results['data_provenance']}."]
    return "\n".join(lines) + "\n"


def figures(run: runs.RunDir, results: dict, names: list[str], args: argparse.Namespace) -> None:
    plt = plots._pyplot()
    fig, ax = plt.subplots(figsize=(7.0, 4.0), dpi=120)
    labels = [METHODS[n][1] for n in names]
    means = [results["beneficial_test_accuracy"][n]["mean"] for n in names]
    stds = [results["beneficial_test_accuracy"][n]["std"] for n in names]
    ax.bar(range(len(names)), means, yerr=stds, capsize=4, color="tab:blue", alpha=0.8)
    for i, (m, sd) in enumerate(zip(means, stds)):
        ax.text(i + 0.12, m + sd + 0.015, f"{m:.3f}", ha="left", fontsize=8)
    ax.set_xticks(range(len(names)), labels, rotation=15, fontsize=8)
    ax.set_ylim(0, 1.1)
    ax.set_ylabel("beneficial test accuracy (fraction)")
    ax.set_title(f"Figure 1: beneficial test accuracy per method\n({results['dataset']}, mean ± std "
                 f"over {len(results['seeds'])} seeds; higher is better)", fontsize=10)
    ax.grid(True, axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(run.path / "fig1_beneficial_accuracy.png")
    plt.close(fig)

    curves = {}
    for r in results["table"]:
        curves[r["label"]] = results["attacks"][f"{r['method']}/{r['probe_attack']}"]
    curves["scratch (from random init)"] = results["references"]["scratch"]
    plots.plot_attack_curves(curves, run.path / "fig2_attack_curves.png",
                             f"Figure 2: linear-probe attack on {results['dataset']} (malicious classes)",
                             chance=results["chance"])
    for figure in ("ablation.png", "misses.png"):
        source = run.path / "methods" / "skd" / figure
        if source.is_file():
            shutil.copy(source, run.path / f"skd_{figure}")


if __name__ == "__main__":
    main()
