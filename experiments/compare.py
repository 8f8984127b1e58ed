"""The paper in one command: every method under one protocol and one set of seeds.

    python -m experiments.compare --dataset digits --seeds 5 --skd-teacher-epochs 1 2 5 10 20
    python -m experiments.compare --seeds 5                # CIFAR-10 (internet + a GPU advised)

Protects with every method (library calls, trm_jax.protect), each into its own
run folder WORKDIR/methods/<method> (reused when finished; --force redoes
it; --resume continues an interrupted one), then attacks every method with
the same suite against ONE from-scratch reference (same seeds, same budget); two
methods train at once (--workers), each attacked as soon as it is protected. A
method that fails (e.g. NaN) is recorded with its error and the others go on;
the exit code is then 1. Writes results.json, results.md (the table),
fig1_beneficial_accuracy.png, fig2_attack_curves.png and the SKD ablation figure.
"""
from __future__ import annotations

import concurrent.futures
import dataclasses
import json
import pathlib
import sys
import time
from typing import Any, Callable

from experiments import _cli
from trm_jax import (attacks, checkpoint, compilation, config_for, datasets, errors, evaluation,
                     methods, plots, runs, validate)
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
    attack: SuiteConfig = evaluation.COMPARE_SUITE
    """the attack suite and budgets (default: sized for 15 CPU minutes on digits)"""
    full_grid: bool = False
    """the skeptic's full grid instead of --attack.*: every attack, sgd/momentum/adam x 9 lrs
    1e-5..1e-1, data 5/20/50/all per class, 1x/4x/16x steps (trm_jax.evaluation.FULL_SUITE; a GPU run)"""
    force: bool = False
    """redo methods whose run folder already finished"""
    workers: int = 0
    """methods trained at once (threads; 0: 2 in a single-process run, else 1). One method's
    compiling leaves a core idle that another's training uses; the numbers do not depend on it"""

    DOMAINS = {**_cli.Experiment.DOMAINS, "methods": validate.Tuple(validate.Str()),
               "skd_teacher_epochs": validate.Tuple(validate.COUNT, min_len=0, distinct=True),
               "attack": validate.Instance(SuiteConfig), "full_grid": validate.Bool(),
               "force": validate.Bool(), "workers": validate.Int(0)}  # workers 0: automatic

    def __post_init__(self) -> None:
        super().__post_init__()
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


def entry_configs(config: Config, entry: str) -> list[Any]:
    """The method configs an entry trains, in order: one per --skd-teacher-epochs budget for
    skd (each checked before any method trains: a bad budget failed only after the others
    had trained), else the entry's config."""
    cfg = config.method_config(entry)
    if entry != "skd":
        return [cfg]
    return [dataclasses.replace(cfg, teacher=dataclasses.replace(cfg.teacher, epochs=epochs))
            for epochs in config.skd_teacher_epochs or (cfg.teacher.epochs,)]


def run_entry(entry: str, config: Config, protocol, keys, seeds, parent: _cli.Run
               ) -> tuple[Any, dict]:
    """Protects with one entry in ``<parent run>/methods/<entry>`` (or reuses a finished folder).

    Returns ``(Protected, summary dict)``."""
    method, _ = ENTRIES[entry]
    folder = parent.file("methods") / entry
    if (folder / "results.json").is_file() and not config.force:
        print(f"[compare] {entry}: reusing finished run {folder}", flush=True)
        model, params, stored_seeds = checkpoint.load_model(folder)
        if stored_seeds != seeds:
            raise errors.ConfigError(f"{folder} was trained with seeds {stored_seeds}, this "
                                     f"comparison uses {seeds}; pass --force to redo it")
        summary = json.loads((folder / "results.json").read_text())
        return methods.Protected(method, model, params, keys, {}), summary
    print(f"[compare] {entry}", flush=True)
    # --resume continues a started method (one never started starts now); otherwise it is redone.
    resume = config.run.resume and not config.force and runs.is_run(folder)
    run = runs.RunDir.create(folder, overwrite=not resume, resume=resume)
    with run:  # releases the folder's writer lock however the method ends
        run.write_config(runs.to_jsonable({"experiment": method, "dataset": config.dataset,
                                           "method": config.method_config(entry), "run": config.run}))
        hooks = RunFolderHooks(run, resume=resume,
                               checkpoint_every=config.run.checkpoint_every, progress=config.run.progress,
                               checkpoint_every_phase={"meta": config.run.meta_checkpoint_every},
                               checkpoint_seconds=config.run.checkpoint_seconds)
        start = time.perf_counter()
        try:
            ablation = []
            for cfg in entry_configs(config, entry):
                epochs = cfg.teacher.epochs if entry == "skd" else None
                num_classes = (protocol.pretrain.beneficial.num_classes
                               + protocol.pretrain.malicious.num_classes) if method == "unsir" else None
                model = _cli.model_override(config.dataset, config.model, protocol, num_classes)
                protected = methods.protect(method, cfg, protocol, keys, hooks=hooks, model=model)
                if epochs is not None:
                    ablation.append({"teacher_epochs": epochs, **{
                        k: v for k, v in _cli.summarize(protected.metrics).items() if k in SUMMARY_KEYS}})
        finally:
            hooks.close()
        _cli.save_model(run, protected.model, protected.params, seeds)
        summary = {"experiment": method, "dataset": config.dataset, "seeds": seeds,
                   **{k: v for k, v in _cli.summarize(protected.metrics).items()
                      if not isinstance(v, (int, float))},
                   "attacks": {}, "references": {}, "wall_seconds": time.perf_counter() - start}
        if ablation:
            summary["ablation"] = ablation
            if len(ablation) > 1 and run.writer:
                plots.plot_ablation(ablation, run.file("ablation.png"),
                                    f"SKD teacher ablation ({config.dataset}, {len(seeds)} seeds)")
        run.write_results(summary)
        return protected, json.loads(json.dumps(runs.to_jsonable(summary)))


def main(argv: list[str] | None = None) -> dict:
    config = _cli.parse(Config, defaults, argv, prog=f"python -m experiments.{NAME}",
                        description=__doc__)
    command = "python -m experiments.compare " + " ".join(sys.argv[1:] if argv is None else argv)
    seeds, keys = _cli.seeds_of(config.seeds)
    protocol = _cli.load_protocol(config.dataset, config.protocol, config.run)
    suite = evaluation.FULL_SUITE if config.full_grid else config.attack
    _cli.check_suite(suite, protocol)
    for entry in config.methods:  # every method's settings, before any compute
        for cfg in entry_configs(config, entry):
            _cli.check_method(entry.removesuffix("_fo"), ENTRIES[entry][0], cfg, protocol)
    extra = (("attack", suite),) if config.full_grid else ()
    _cli.check_resources(config, protocol, suites=extra)
    if config.skd_teacher_epochs and "skd" in config.methods:  # the ablation's longest teacher
        skd = config.skd
        longest = dataclasses.replace(config, skd=dataclasses.replace(skd, teacher=dataclasses.replace(
            skd.teacher, epochs=max(config.skd_teacher_epochs))))
        _cli.check_resources(longest, protocol, suites=extra,
                             aliases={"skd.teacher.epochs": "--skd-teacher-epochs"})
    with _cli.Run(NAME, config, config.run) as run:
        sweeps, summaries, failed, scratch = run_all(config, protocol, keys, seeds, run, suite)
        table, entries, beneficial = [], {}, {}
        for entry, sweep in sweeps.items():
            report = attacks.to_json(sweep)
            entries.update({f"{entry}/{name}": e for name, e in report["attacks"].items()})
            beneficial[entry] = summaries[entry]["beneficial_test_accuracy"]
            table.append(row(entry, beneficial[entry], report, sweep))

        results = run.finish({
            "experiment": NAME, "dataset": config.dataset, "seeds": seeds,
            "beneficial_test_accuracy": beneficial, "attacks": entries,
            "references": {"scratch": attacks.report.scratch_entry(scratch)} if scratch else {},
            "methods": {e: {k: s[k] for k in ("beneficial_test_accuracy", "wall_seconds", "stages",
                                              "misses_percent", "false_masks_percent",
                                              "teacher_test_accuracy", "ablation") if k in s}
                        for e, s in summaries.items()},
            "failed": failed, "table": table, "suite": runs.to_jsonable(suite),
            "evaluation": run.stats.phases["attack"].as_dict() if "attack" in run.stats.phases else {},
            "workers": workers_for(config),
            "chance": 1.0 / protocol.test.malicious.num_classes,
            "data_provenance": f"{config.dataset}: real data through TFDS", "command": command})
        if run.writer:  # process 0 of a multi-process run writes the table and figures
            run.file("results.md").write_text(markdown(results))
            if table:
                figures(run.file, results)
        print(markdown(results))
        return results


def workers_for(config: Config) -> int:
    """``--workers``, or 2 in a single-process run and 1 with several processes (they must
    start the same programs in the same order: their collectives pair up)."""
    import jax

    if jax.process_count() > 1:
        return 1
    return config.workers or 2


def run_all(config: Config, protocol, keys, seeds, run: _cli.Run, suite: SuiteConfig
            ) -> tuple[dict, dict, dict, Any]:
    """Every method of ``config``, each then attacked with ``suite``, and the scratch
    reference: :func:`workers_for` jobs at a time (a method's attack evaluation runs as soon
    as it is protected, beside the training of the next ones).

    Returns ``(sweeps, summaries, failed, scratch)``: the first three keyed by entry in
    ``config.methods`` order (a method that failed is in ``failed`` only: the others go on);
    ``scratch`` is ``None`` when every method failed. Each job counts its compilations for
    its own phase (a method's name, ``attack`` for its evaluation and the scratch reference).

    Raises:
      Whatever an attack evaluation raised (a bug, not a method's failure).
    """
    workers = workers_for(config)

    def scratch_job():
        model = (_cli.model_override(config.dataset, config.model, protocol)
                 or datasets.model_for(config.dataset, protocol.pretrain.beneficial.num_classes,
                                       protocol.image_shape))
        with run.phase("attack"):
            print("[compare] scratch reference", flush=True)
            return evaluation.scratch_reference(methods.Protected("scratch", model, None, keys, {}),
                                                protocol, suite)

    def method_job(entry: str, scratch: concurrent.futures.Future):
        try:
            with run.phase(entry):
                protected, summary = run_entry(entry, config, protocol, keys, seeds, run)
        except Exception as err:  # noqa: BLE001 -- one failing method must not end the comparison
            failure = {"error": type(err).__name__, "message": " ".join(str(err).split())}
            print(f"[compare] {entry} FAILED: {failure['error']}: {failure['message']}",
                  file=sys.stderr, flush=True)
            return None, None, failure
        with run.phase("attack"):
            print(f"[compare] attack suite on {entry}", flush=True)
            sweep = evaluation.evaluate(protected, protocol, suite, scratch=scratch.result(),
                                        verbose=config.run.progress)
        return sweep, summary, None

    order = list(config.methods)
    if workers > 1 and "skd" in order and len(config.skd_teacher_epochs) > 1:
        order.insert(0, order.pop(order.index("skd")))  # the longest job (one SKD per budget) first
    with concurrent.futures.ThreadPoolExecutor(workers) as pool:
        # The scratch reference is submitted first, so it has started (on a worker of its own)
        # before any method's evaluation waits for it: no job waits on a queued one.
        scratch = pool.submit(compilation.in_current_context(scratch_job))
        futures = {entry: pool.submit(compilation.in_current_context(method_job), entry, scratch)
                   for entry in order}
        try:
            concurrent.futures.wait([scratch, *futures.values()])
        except BaseException:  # Ctrl-C: start nothing more; running jobs stop at their end
            for future in futures.values():
                future.cancel()
            raise
    sweeps, summaries, failed = {}, {}, {}
    for entry in config.methods:
        sweep, summary, failure = futures[entry].result()
        if failure is None:
            sweeps[entry], summaries[entry] = sweep, summary
        else:
            failed[entry] = failure
    return sweeps, summaries, failed, scratch.result() if sweeps else None


SCRATCH = "scratch reference"


def probe_name(report: dict) -> str:
    names = [n for n in report["attacks"] if n.startswith("linear_probe")]
    return next((n for n in names if n.endswith("adam")), names[0]) if names else next(iter(report["attacks"]))


def row(entry: str, beneficial: dict, report: dict, sweep: attacks.SweepResult) -> dict[str, Any]:
    """One method's table row: the linear probe at the headline budget and, per budget
    (data, steps), the two worst cases with each worst attack's OWN numbers, and the
    attacker's search curves."""
    probe = report["attacks"][probe_name(report)]
    return {"method": entry, "label": ENTRIES[entry][1], "beneficial": beneficial,
            "probe_attack": probe_name(report), "probe_final": probe["final"],
            "probe_auc": probe["auc"], "probe_relative_to_scratch": probe["relative_to_scratch"],
            "budgets": attacks.report.budgets_json(sweep),
            "search_curves": attacks.report.search_curves_json(sweep)}


def _pm(s: dict) -> str:
    return f"{s['mean']:.3f} ± {s['std']:.3f}"


def _steps(worst: dict) -> str:
    steps = worst.get("steps_to_90")
    if steps is None:
        return "-"
    if steps["mean"] is None or steps["mean"] == float("inf"):
        return f"never ({steps['reached']:.0%})"
    return f"{steps['mean']:.0f}"


def _worst_cells(worst: dict | None) -> list[str]:
    if worst is None:
        return ["-"] * 5
    return [f"{worst['entry']} (lr {worst['learning_rate']:g})", _pm(worst["final"]),
            _pm(worst["auc"]), f"{worst['advantage_auc']:+.3f} / {worst['advantage_final']:+.3f}",
            _steps(worst)]


def data_label(key: str, results: dict) -> str:
    return "all" if key == "all" else f"{key} per class"


def markdown(results: dict) -> str:
    lines = [f"# Transfer resistance on {results['dataset']} ({len(results['seeds'])} seeds)", ""]
    scratch = results["references"].get("scratch")
    rows = results["table"]
    budgets = scratch.get("budgets", {}) if scratch else {}
    lines += ["Malicious test accuracy after the fine-tuning attacks (lower is better for a defence); "
              f"chance {results['chance']:.2f}. Per attacker budget (data per class x steps), each "
              "worst case is ONE attack (the highest mean final accuracy, each attack at its own "
              "best learning rate and optimizer) with that attack's own numbers. *Advantage* = "
              "attack minus scratch (same architecture from random init, same data, steps, "
              "optimizers and learning-rate grid): AUC / final. *Reuse* attacks keep at least the "
              "lower half of the protected network; judge a defence on them by absolute accuracy, "
              "on the whole suite by advantage (re-initialising most layers approaches scratch).", ""]
    ref = next((r for r in rows if r["method"] == "reference"), None)
    for d, per in budgets.items():
        for s in (k for k in per if k != "curve"):
            sc = per[s]
            lines += [f"## Attacker data: {data_label(d, results)}; steps: {s} ({sc['steps']} steps)", "",
                      f"Scratch: final {_pm(sc['final'])}, AUC {_pm(sc['auc'])} ({sc.get('optimizer')}, "
                      f"lr {sc['best_lr']:g}).", "",
                      "| method | beneficial acc | worst attack (suite) | its final | its AUC "
                      "| its advantage AUC / final | its steps to 90% of scratch final "
                      "| worst reuse attack | its final | its AUC | its advantage AUC / final "
                      "| its steps to 90% | unprotected worst: advantage AUC / final |",
                      "|" + "---|" * 13]
            for r in rows:
                b = r["budgets"].get(d, {}).get(s)
                if b is None:
                    continue
                u = ref["budgets"].get(d, {}).get(s, {}).get("worst") if ref else None
                unprot = "-" if u is None else f"{u['advantage_auc']:+.3f} / {u['advantage_final']:+.3f}"
                lines.append("| " + " | ".join([r["label"], _pm(r["beneficial"]),
                                                *_worst_cells(b["worst"]),
                                                *_worst_cells(b["worst_reuse"]), unprot]) + " |")
            lines.append("")
    if rows and not budgets:
        lines += ["| method | beneficial acc | linear probe final | linear probe AUC |", "|---|---|---|---|"]
        lines += [f"| {r['label']} | {_pm(r['beneficial'])} | {_pm(r['probe_final'])} | "
                  f"{_pm(r['probe_auc'])} |" for r in rows]
    lines += search_lines(rows)
    lines += ["## Linear probe (the paper's attack, headline budget)", "",
              "| method | beneficial acc | linear probe final | linear probe AUC "
              "| linear probe AUC / scratch AUC |", "|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['label']} | {_pm(r['beneficial'])} | {_pm(r['probe_final'])} | "
                     f"{_pm(r['probe_auc'])} | {r['probe_relative_to_scratch']['auc_ratio']:.3f} |")
    for entry, failure in results["failed"].items():
        lines.append(f"| {ENTRIES[entry][1]} | FAILED: {failure['error']}: {failure['message']} "
                     "| | | |")
    evaluation_stats = results.get("evaluation")
    lines += ["", f"Command: `{results['command']}`; wall time {results['wall_seconds'] / 60:.1f} min "
              f"(methods reused from an earlier run are not timed again)."
              + ("" if not evaluation_stats else
                 f" Attack evaluation (scratch + every method"
                 + (f", summed over the {results['workers']} threads that ran it beside the "
                    "methods' training" if results.get("workers", 1) > 1 else "")
                 + f"): {evaluation_stats['wall_seconds'] / 60:.1f} "
                 f"min, {evaluation_stats['xla_compilations']} XLA compilations "
                 f"({evaluation_stats['compile_seconds']:.0f} s)."),
              f"Data: {results['data_provenance']}."]
    return "\n".join(lines) + "\n"


#: The numbers of trials the search table shows (and ``all``).
SEARCH_TRIALS = (1, 3, 10)


def search_lines(rows: list[dict]) -> list[str]:
    """The attacker's search table: expected best attack after n random trials, per budget."""
    rows = [r for r in rows if r.get("search_curves")]
    if not rows:
        return []
    lines = ["## Attacker search: the expected best attack after n random trials", "",
             "An attacker who tries n distinct (attack, optimizer, learning rate) settings of the "
             "suite at random and keeps the best one: its expected mean final malicious accuracy "
             "(n = all: the worst case over the suite, as in the tables above).", "",
             "| method | attacker data | steps | " + " | ".join(f"n = {n}" for n in SEARCH_TRIALS)
             + " | n = all |", "|" + "---|" * (4 + len(SEARCH_TRIALS))]
    for r in rows:
        for d, per in r["search_curves"].items():
            for s, curve in per.items():
                cells = [f"{curve[n - 1]:.3f}" if n <= len(curve) else "-" for n in SEARCH_TRIALS]
                lines.append(f"| {r['label']} | {d} | {s} | " + " | ".join(cells)
                             + f" | {curve[-1]:.3f} (N = {len(curve)}) |")
    return lines + [""]


def search_figure(path, results: dict) -> None:
    """Figure 5: expected best attack vs the attacker's number of random trials, per method,
    at all the attacker's data and the shortest steps budget; scratch as a line."""
    plt = plots._pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    scratch = results["references"]["scratch"]["budgets"]
    d = "all" if "all" in scratch else list(scratch)[-1]
    s = next(k for k in scratch[d] if k != "curve")
    for r in results["table"]:
        curve = r["search_curves"][d][s]
        ax.plot(range(1, len(curve) + 1), curve, marker=".", label=r["label"])
    ax.axhline(scratch[d][s]["final"]["mean"], color="black", ls="--", label="scratch (random init)")
    ax.axhline(results["chance"], color="grey", lw=0.8, label="chance")
    ax.set_xscale("log")
    from matplotlib import ticker  # plain trial counts on the log axis: 1 2 5 10 20 ... N

    n = max(len(r["search_curves"][d][s]) for r in results["table"])
    ticks = [t for t in (1, 2, 5, 10, 20, 50, 100, 200, 500) if t < 0.8 * n] + [n]
    ax.set_xlim(0.9, n * 1.1)
    ax.xaxis.set_major_locator(ticker.FixedLocator(ticks))
    ax.xaxis.set_major_formatter(ticker.FixedFormatter([str(t) for t in ticks]))
    ax.xaxis.set_minor_locator(ticker.NullLocator())
    ax.set_xlabel("attacker's random trials of (attack, optimizer, learning rate)")
    ax.set_ylabel("expected best mean final malicious accuracy")
    ax.set_title(f"Figure 5: attacker search ({results['dataset']}, data {data_label(d, results)}, "
                 f"{s} steps)", fontsize=9)
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def figures(file: Callable[[str], pathlib.Path], results: dict) -> None:
    """The figures of ``results``, each written to ``file(name)`` (a run folder's :meth:`~_cli.Run.file`)."""
    rows = results["table"]
    plots.plot_bars({r["label"]: r["beneficial"] for r in rows}, file("fig1_beneficial_accuracy.png"),
                    f"Figure 1: beneficial test accuracy per method\n({results['dataset']}, mean ± std "
                    f"over {len(results['seeds'])} seeds; higher is better)",
                    "beneficial test accuracy (fraction)")
    curves = {r["label"]: results["attacks"][f"{r['method']}/{r['probe_attack']}"] for r in rows}
    curves["scratch (from random init)"] = results["references"]["scratch"]
    plots.plot_attack_curves(curves, file("fig2_attack_curves.png"),
                             f"Figure 2: linear-probe attack on {results['dataset']} (malicious classes)",
                             chance=results["chance"])
    scratch = results["references"]["scratch"]
    if "budgets" in scratch:
        data_figure(file("fig3_accuracy_vs_attacker_data.png"), results)
        if all(r.get("search_curves") for r in rows):
            search_figure(file("fig5_attacker_search.png"), results)
        for r in rows:  # per-attack curves at all data, the longest steps budget
            d = "all" if "all" in scratch["budgets"] else list(scratch["budgets"])[-1]
            entries = {name.split("/", 1)[1]: {"curves": [e["budgets"][d]["curve"]],
                                               "steps_per_epoch": e.get("steps_per_epoch")}
                       for name, e in results["attacks"].items() if name.startswith(r["method"] + "/")}
            entries["scratch"] = {"curves": [scratch["budgets"][d]["curve"]],
                                  "steps_per_epoch": scratch.get("steps_per_epoch")}
            plots.plot_attack_curves(entries, file(f"fig4_attacks_{r['method']}.png"),
                                     f"Every attack on {r['label']} ({results['dataset']}, data "
                                     f"{data_label(d, results)}, each at its best lr)",
                                     chance=results["chance"])
    source = file("methods") / "skd" / "ablation.png"
    if source.is_file():
        file("skd_ablation.png").write_bytes(source.read_bytes())


def data_figure(path, results: dict) -> None:
    """Malicious accuracy vs attacker data per class at the longest steps budget: scratch,
    the unprotected reference and each method's worst case (mean ± std over seeds)."""
    scratch = results["references"]["scratch"]["budgets"]
    keys = list(scratch)
    steps = [k for k in scratch[keys[0]] if k != "curve"][-1]
    worst = lambda r, case: [r["budgets"][k][steps][case] for k in keys]
    shared = {"scratch (random init)": [scratch[k][steps]["final"] for k in keys]}
    panels = {}
    alone = all(r["method"] == "reference" for r in results["table"])  # --methods reference
    for r in results["table"]:
        if r["method"] == "reference" and not alone:
            shared["unprotected: worst attack"] = [w["final"] for w in worst(r, "worst")]
            continue
        panels[r["label"]] = {"worst attack (whole suite)": [w["final"] for w in worst(r, "worst")]}
        if all(worst(r, "worst_reuse")):
            panels[r["label"]]["worst reuse attack"] = [w["final"] for w in worst(r, "worst_reuse")]
    plots.plot_budget_panels(
        [data_label(k, results) for k in keys], panels, shared, path,
        f"Malicious accuracy vs attacker data ({results['dataset']}, {steps} steps budget)\n"
        f"mean ± std over {len(results['seeds'])} seeds; lower is better for a defence",
        xlabel="attacker data per malicious class", ylabel="malicious test accuracy",
        chance=results["chance"])


if __name__ == "__main__":
    raise SystemExit(_cli.main(main))
