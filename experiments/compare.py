"""The paper in one command: every method under one protocol and one set of seeds.

    python -m experiments.compare --dataset digits --seeds 5 --skd-teacher-epochs 1 2 5 10 20
    python -m experiments.compare --seeds 5                # CIFAR-10 (internet + a GPU advised)

Protects with every method (library calls, ``trm_jax.protect``), each into its own
run folder ``WORKDIR/methods/<method>`` (reused when finished; ``--force`` redoes
it; ``--resume`` continues an interrupted one), then attacks every method with
the same suite against ONE from-scratch reference (same seeds, same budget). A
method that fails (e.g. NaN) is recorded with its error and the others go on;
the exit code is then 1. Writes results.json, results.md (the table),
fig1_beneficial_accuracy.png, fig2_attack_curves.png and the SKD ablation figure.
"""
from __future__ import annotations

import dataclasses
import json
import sys
import time
from typing import Any

from experiments import _cli
from trm_jax import checkpoint, config_for, errors, evaluation, methods, metrics, plots, runs
from trm_jax.evaluation import SuiteConfig
from trm_jax.hooks import RunFolderHooks
from trm_jax.methods.reference import ReferenceConfig
from trm_jax.methods.reverse_maml import ReverseMAMLConfig
from trm_jax.methods.skd import SUMMARY_KEYS, SKDMethodConfig
from trm_jax.methods.unsir import UnsirMethodConfig

NAME = "compare"
#: compare entry -> (library method, label)
ENTRIES = {"reference": ("reference", "Unprotected reference"),
           "unsir": ("unsir", "UNSIR (unlearning)"),
           "skd": ("skd", "SKD"),
           "reverse_maml": ("reverse_maml", "Reverse-MAML (exact)"),
           "reverse_maml_fo": ("reverse_maml", "Reverse-MAML (first-order)")}


@dataclasses.dataclass(frozen=True)
class Config(_cli.Experiment):
    """Every method under one protocol, one seed set and one scratch reference."""

    methods: tuple[str, ...] = tuple(ENTRIES)
    """which entries to run (reverse_maml_fo = reverse_maml with first-order meta-gradients)"""
    reference: ReferenceConfig = ReferenceConfig()
    unsir: UnsirMethodConfig = UnsirMethodConfig()
    skd: SKDMethodConfig = SKDMethodConfig()
    skd_teacher_epochs: tuple[int, ...] = ()
    """SKD teacher ablation budgets (the last one is attacked); default: skd.teacher.epochs"""
    reverse_maml: ReverseMAMLConfig = ReverseMAMLConfig()
    attack: SuiteConfig = SuiteConfig(attacks=("all",))
    force: bool = False
    """redo methods whose run folder already finished"""

    def __post_init__(self) -> None:
        bad = [m for m in self.methods if m not in ENTRIES]
        if bad or not self.methods:
            raise errors.ConfigError(f"--methods {list(self.methods)}: unknown {bad}; "
                                     f"allowed: {list(ENTRIES)}")

    def method_config(self, entry: str) -> Any:
        if entry == "reverse_maml_fo":
            return dataclasses.replace(self.reverse_maml, meta=dataclasses.replace(
                self.reverse_maml.meta, meta_grad="first_order"))
        return getattr(self, entry)


def defaults(dataset: str) -> Config:
    return Config(dataset=dataset, **{m: config_for(m, dataset)
                                      for m in ("reference", "unsir", "skd", "reverse_maml")})


def run_entry(entry: str, config: Config, protocol, keys, seeds, root) -> tuple[Any, dict]:
    """Protects with one entry in ``root/methods/<entry>`` (or reuses a finished folder).

    Returns ``(Protected, summary dict)``."""
    method, _ = ENTRIES[entry]
    folder = root / "methods" / entry
    if (folder / "results.json").is_file() and not config.force:
        print(f"[compare] {entry}: reusing finished run {folder}", flush=True)
        model, params, stored_seeds = checkpoint.load_model(folder)
        if stored_seeds != seeds:
            raise errors.ConfigError(f"{folder} was trained with seeds {stored_seeds}, this "
                                     f"comparison uses {seeds}; pass --force to redo it")
        summary = json.loads((folder / "results.json").read_text())
        return methods.Protected(method, model, params, keys, {}), summary
    print(f"[compare] {entry}", flush=True)
    run = runs.RunDir.create(folder, overwrite=config.force or not config.run.resume,
                             resume=config.run.resume and not config.force)
    run.write_config(runs.to_jsonable({"experiment": method, "dataset": config.dataset,
                                       "method": config.method_config(entry), "run": config.run}))
    hooks = RunFolderHooks(run, resume=config.run.resume and not config.force,
                           checkpoint_every=config.run.checkpoint_every, progress=config.run.progress,
                           checkpoint_every_phase={"meta": config.run.meta_checkpoint_every})
    start = time.perf_counter()
    try:
        budgets = (config.skd_teacher_epochs or (config.skd.teacher.epochs,)) if entry == "skd" \
            else (None,)
        ablation = []
        for epochs in budgets:
            cfg = config.method_config(entry)
            if epochs is not None:
                cfg = dataclasses.replace(cfg, teacher=dataclasses.replace(cfg.teacher, epochs=epochs))
            num_classes = (protocol.pretrain.beneficial.num_classes
                           + protocol.pretrain.malicious.num_classes) if method == "unsir" else None
            model = _cli.model_override(config.dataset, config.model, protocol, num_classes)
            protected = methods.protect(method, cfg, protocol, keys, hooks=hooks, model=model)
            if epochs is not None:
                ablation.append({"teacher_epochs": epochs, **{
                    k: v for k, v in _cli.summarize(protected.metrics).items() if k in SUMMARY_KEYS}})
    finally:
        hooks.close()
    checkpoint.save_model(folder, protected.model, protected.params, seeds)
    summary = {"experiment": method, "dataset": config.dataset, "seeds": seeds,
               **{k: v for k, v in _cli.summarize(protected.metrics).items()
                  if not isinstance(v, (int, float))},
               "attacks": {}, "references": {}, "wall_seconds": time.perf_counter() - start}
    if ablation:
        summary["ablation"] = ablation
        if len(ablation) > 1:
            plots.plot_ablation(ablation, folder / "ablation.png",
                                f"SKD teacher ablation ({config.dataset}, {len(seeds)} seeds)")
    run.write_results(summary)
    return protected, json.loads(json.dumps(runs.to_jsonable(summary)))


def main(argv: list[str] | None = None) -> dict:
    config = _cli.parse(Config, defaults, argv, prog=f"python -m experiments.{NAME}",
                        description=__doc__)
    command = "python -m experiments.compare " + " ".join(sys.argv[1:] if argv is None else argv)
    seeds, keys = _cli.seeds_of(config.seeds)
    protocol = _cli.load_protocol(config.dataset, config.protocol, config.run)
    suite = config.attack
    suite.plan(protocol.finetune.malicious.num_classes, suite.epochs_for(protocol))  # validate early
    for entry in config.methods:  # every method's settings, before any compute
        methods.check(ENTRIES[entry][0], config.method_config(entry), protocol)
    with _cli.Run(NAME, config, config.run) as run:
        protected, summaries, failed = {}, {}, {}
        for entry in config.methods:
            try:
                with run.phase(entry):
                    protected[entry], summaries[entry] = run_entry(entry, config, protocol, keys,
                                                                   seeds, run.path)
            except Exception as err:  # noqa: BLE001 -- one failing method must not end the comparison
                failed[entry] = {"error": type(err).__name__, "message": " ".join(str(err).split())}
                print(f"[compare] {entry} FAILED: {failed[entry]['error']}: "
                      f"{failed[entry]['message']}", file=sys.stderr, flush=True)

        table, entries, beneficial, scratch = [], {}, {}, None
        for entry, prot in protected.items():
            with run.phase("attack"):
                if scratch is None:
                    print("[compare] scratch reference", flush=True)
                    scratch = evaluation.scratch_reference(prot, protocol, suite)
                print(f"[compare] attack suite on {entry}", flush=True)
                report = evaluation.evaluate(prot, protocol, suite, scratch=scratch,
                                             verbose=config.run.progress)
            entries.update({f"{entry}/{name}": e for name, e in report["attacks"].items()})
            beneficial[entry] = summaries[entry]["beneficial_test_accuracy"]
            table.append(row(entry, beneficial[entry], report, scratch))

        results = run.finish({
            "experiment": NAME, "dataset": config.dataset, "seeds": seeds,
            "beneficial_test_accuracy": beneficial, "attacks": entries,
            "references": {"scratch": scratch} if scratch else {},
            "methods": {e: {k: s[k] for k in ("beneficial_test_accuracy", "wall_seconds", "stages",
                                              "misses_percent", "false_masks_percent",
                                              "teacher_test_accuracy", "ablation") if k in s}
                        for e, s in summaries.items()},
            "failed": failed, "table": table, "chance": 1.0 / protocol.test.malicious.num_classes,
            "data_provenance": f"{config.dataset}: real data through TFDS", "command": command})
        (run.path / "results.md").write_text(markdown(results))
        if table:
            figures(run.path, results)
        print(markdown(results))
        return results


def probe_name(report: dict) -> str:
    names = [n for n in report["attacks"] if n.startswith("linear_probe")]
    return next((n for n in names if n.endswith("adam")), names[0]) if names else next(iter(report["attacks"]))


def row(entry: str, beneficial: dict, report: dict, scratch: dict) -> dict[str, Any]:
    probe = report["attacks"][probe_name(report)]
    worst_name, worst = max(report["attacks"].items(), key=lambda ne: ne[1]["final"]["mean"])
    return {"method": entry, "label": ENTRIES[entry][1], "beneficial": beneficial,
            "probe_attack": probe_name(report), "probe_final": probe["final"],
            "probe_auc": probe["auc"], "worst_attack": worst_name, "worst_final": worst["final"],
            "probe_relative_to_scratch": metrics.relative_to_scratch(probe, scratch),
            "worst_relative_to_scratch": metrics.relative_to_scratch(worst, scratch)}


def markdown(results: dict) -> str:
    pm = lambda s: f"{s['mean']:.3f} ± {s['std']:.3f}"
    lines = [f"# Transfer resistance on {results['dataset']} ({len(results['seeds'])} seeds)", ""]
    scratch = results["references"].get("scratch")
    if scratch:
        lines += [f"Malicious test accuracy after the fine-tuning attack (lower is better); chance "
                  f"{results['chance']:.2f}. Scratch (same architecture from random init, same "
                  f"budget): final {pm(scratch['final'])}, AUC {pm(scratch['auc'])}.", "",
                  "| method | beneficial acc | linear probe final | linear probe AUC "
                  "| linear probe AUC / scratch AUC | worst case over suite (final) "
                  "| worst case final - scratch final |", "|---|---|---|---|---|---|---|"]
    for r in results["table"]:
        lines.append(f"| {r['label']} | {pm(r['beneficial'])} | {pm(r['probe_final'])} | "
                     f"{pm(r['probe_auc'])} | {r['probe_relative_to_scratch']['auc_ratio']:.3f} | "
                     f"{pm(r['worst_final'])} ({r['worst_attack']}) | "
                     f"{r['worst_relative_to_scratch']['final_gap']:+.3f} |")
    for entry, failure in results["failed"].items():
        lines.append(f"| {ENTRIES[entry][1]} | FAILED: {failure['error']}: {failure['message']} "
                     "| | | | | |")
    lines += ["", "Linear probe: fresh head on frozen features, Adam, at the attacker's best learning "
              "rate of the grid. Worst case: the highest mean final accuracy over the whole suite "
              "(attack x optimizer x lr).", "",
              f"Command: `{results['command']}`; wall time {results['wall_seconds'] / 60:.1f} min "
              f"(methods reused from an earlier run are not timed again). Data: "
              f"{results['data_provenance']}."]
    return "\n".join(lines) + "\n"


def figures(path, results: dict) -> None:
    rows = results["table"]
    plots.plot_bars({r["label"]: r["beneficial"] for r in rows}, path / "fig1_beneficial_accuracy.png",
                    f"Figure 1: beneficial test accuracy per method\n({results['dataset']}, mean ± std "
                    f"over {len(results['seeds'])} seeds; higher is better)",
                    "beneficial test accuracy (fraction)")
    curves = {r["label"]: results["attacks"][f"{r['method']}/{r['probe_attack']}"] for r in rows}
    curves["scratch (from random init)"] = results["references"]["scratch"]
    plots.plot_attack_curves(curves, path / "fig2_attack_curves.png",
                             f"Figure 2: linear-probe attack on {results['dataset']} (malicious classes)",
                             chance=results["chance"])
    source = path / "methods" / "skd" / "ablation.png"
    if source.is_file():
        (path / "skd_ablation.png").write_bytes(source.read_bytes())


if __name__ == "__main__":
    raise SystemExit(_cli.main(main))
