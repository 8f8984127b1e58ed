"""Search and ablation for simulated-attack meta-training: choose on validation, report on test.

    python -m experiments.simulated_attack_search --dataset digits
    python -m experiments.simulated_attack_search --dataset digits --grid "lam=1" "lam=3,anchor=0.3"

1. **Search** (--search-seeds seeds): every --grid variant of the base config
   (field=value changes, comma-separated; dotted paths reach nested fields, e.g.
   attacker.steps=20) is trained and attacked on trm_jax.data.validation_protocol:
   the attacker fine-tunes on two thirds of the fine-tuning split and is scored on the
   last third; the test split is never read. The pick: among variants within 0.02 of the
   reference's beneficial accuracy, the lowest worst-case reuse attack (then the lowest
   advantage over scratch); if none is within 0.02, the smallest beneficial drop.
2. **Test** (--seeds seeds): the pick and each --ablations change of it (one
   ingredient removed), attacked on the test split, with the goals of
   trm_jax.evaluation.defence_goals; the unprotected reference attacked the same way.

Writes results.json, results.md (search and ablation tables) and tradeoff.png (beneficial
accuracy vs worst reuse attack, one point per variant). --resume skips finished variants.
"""
from __future__ import annotations

import dataclasses
import json
from typing import Annotated, Any

from experiments import _cli
from trm_jax import attacks, config_for, data, errors, evaluation, plots, runs, validate
from trm_jax.evaluation import SuiteConfig
from trm_jax.methods import simulated_attack
from trm_jax.methods.simulated_attack import SimulatedAttackConfig

NAME = "simulated_attack_search"

#: The search: one knob at a time around the base config (lam, K, attacker mix, anchor,
#: the SKD hybrid).
GRID = ("lam=1", "lam=3", "anchor=0.1", "attacker.steps=20", "attacker.top_layers=(4,)",
        "start=skd,attacker.reinit_probability=0.25")
#: Each removes one ingredient of the pick.
ABLATIONS = ("weighting=final", "meta_grad=first_order", "lam=0", "anchor=0",
             "attacker.top_layers=(0,)")


@dataclasses.dataclass(frozen=True)
class Config(_cli.Experiment):
    """Validation search over variants, then the pick and its ablations on the test split."""

    method: Annotated[SimulatedAttackConfig, _cli.FLAT] = SimulatedAttackConfig()
    grid: tuple[str, ...] = GRID
    """variants of the base config searched on the validation split ("field=value,...")"""
    ablations: tuple[str, ...] = ABLATIONS
    """changes of the pick evaluated on the test split (one ingredient removed each)"""
    search_seeds: int = 3
    """seeds of the validation search"""
    attack: SuiteConfig = evaluation.COMPARE_SUITE
    """the attack suite and budgets (default: compare's)"""

    DOMAINS = {**_cli.Experiment.DOMAINS, "grid": validate.Tuple(validate.Str()),
               "ablations": validate.Tuple(validate.Str(), min_len=0),
               "search_seeds": validate.COUNT, "attack": validate.Instance(SuiteConfig)}

    def __post_init__(self) -> None:
        super().__post_init__()
        for name in ("grid", "ablations"):  # every change names a field and fits its domain
            for variant in getattr(self, name):
                with errors.about(name):
                    _cli.variant_config(self.method, variant)


def defaults(dataset: str) -> Config:
    return Config(dataset=dataset, method=config_for(simulated_attack.NAME, dataset))


# Variants are "field=value" changes of a config (shared with experiments.skd_mask_search).
apply_variant, variant_config = _cli.apply_variant, _cli.variant_config


def _json(record: dict[str, Any]) -> dict[str, Any]:
    """A record as it reads back from its JSON file (what ``--resume`` sees)."""
    return json.loads(json.dumps(runs.to_jsonable(record)))


def evaluate_variant(name: str, config: SimulatedAttackConfig, protocol, keys, suite, scratch,
                     start, model) -> dict[str, Any]:
    """Protects and attacks one variant: its JSON-able record (goals: :func:`with_goals`)."""
    if config.start != "reference":
        start = None  # the hybrid trains its own starting model (SKD)
    protected = simulated_attack.protect(config, protocol, keys, model=model, start=start)
    result = evaluation.evaluate(protected, protocol, suite, scratch=scratch)
    summary = _cli.summarize(protected.metrics)
    return _json({
        "variant": name, "config": config, "beneficial": summary["beneficial_test_accuracy"],
        "start_beneficial": summary["start_test_accuracy"],
        "budgets": attacks.report.budgets_json(result),
        "meta_final_metrics": summary["meta_final_metrics"]})


def reference_record(start, protocol, suite, scratch) -> dict[str, Any]:
    """The unprotected reference (the search's starting model) attacked the same way."""
    result = evaluation.evaluate(start, protocol, suite, scratch=scratch)
    return _json({
        "variant": "unprotected reference",
        "beneficial": _cli.summarize(start.metrics)["beneficial_test_accuracy"],
        "budgets": attacks.report.budgets_json(result)})


def with_goals(record: dict[str, Any], reference_beneficial: dict[str, Any]) -> dict[str, Any]:
    """``record`` plus its goals, the beneficial drop measured against the UNPROTECTED
    reference (never against the variant's own start: the SKD hybrid starts lower)."""
    report = {"summary": {"budgets": record["budgets"]}}
    return {**record, "goals": evaluation.defence_goals(report, record["beneficial"],
                                                        reference_beneficial)}


def pick(points: list[dict[str, Any]]) -> dict[str, Any]:
    """The search's choice (see the module docstring)."""
    ok = [p for p in points if p["goals"]["met"]["beneficial"]]
    if ok:
        return min(ok, key=lambda p: (p["goals"]["reuse"], p["goals"]["max_advantage"]))
    return min(points, key=lambda p: p["goals"]["beneficial_drop"])


def main(argv: list[str] | None = None) -> dict:
    config = _cli.parse(Config, defaults, argv, prog=f"python -m experiments.{NAME}",
                        description=__doc__)
    variants = {v: variant_config(config.method, v) for v in config.grid}  # errors first
    for ablation in config.ablations:
        variant_config(config.method, ablation)
    protocol = _cli.load_protocol(config.dataset, config.protocol, config.run)
    validation = data.validation_protocol(protocol)
    model = _cli.model_override(config.dataset, config.model, protocol)
    for cfg in variants.values():
        _cli.check_method("method", simulated_attack.NAME, cfg, validation)
    suite = config.attack
    _cli.check_suite(suite, validation)  # the search attacks on validation, the pick on test
    _cli.check_suite(suite, protocol)
    _cli.check_resources(config, protocol, model=model, seeds=max(config.seeds, config.search_seeds))
    with _cli.Run(NAME, config, config.run) as run:
        done = run.file("variants")
        if run.writer:  # process 0 of a multi-process run writes the records
            done.mkdir(exist_ok=True)

        def cached(tag: str, compute) -> dict[str, Any]:
            path = run.file(f"variants/{tag}.json")  # listed as the project's
            if config.run.resume and path.is_file():
                print(f"[search] {tag}: reusing {path}", flush=True)
                return json.loads(path.read_text())
            record = compute()
            if run.writer:
                path.write_text(json.dumps(record, indent=1))
            return record

        def stage(protocol_, seeds: int, entries: dict[str, SimulatedAttackConfig], split: str):
            _, keys = _cli.seeds_of(seeds)
            state: dict[str, Any] = {}
            reference_config = dataclasses.replace(config.method, start="reference")

            def shared():  # the reference start and scratch, once per stage, only if needed
                if not state:
                    state["start"] = simulated_attack.start_model(reference_config, protocol_,
                                                                  keys, model=model)
                    state["scratch"] = evaluation.scratch_reference(state["start"], protocol_, suite)
                return state["start"], state["scratch"]

            reference = cached(f"{split}-reference", lambda: reference_record(
                shared()[0], protocol_, suite, shared()[1]))
            reference = with_goals(reference, reference["beneficial"])
            records = []
            for i, (name, cfg) in enumerate(entries.items()):
                print(f"[search] {split}: {name}", flush=True)
                records.append(with_goals(cached(f"{split}-{i}", lambda: evaluate_variant(
                    name, cfg, protocol_, keys, suite, shared()[1], shared()[0], model)),
                    reference["beneficial"]))
                print(f"[search]   {evaluation.goals_line(records[-1]['goals'])}", flush=True)
            return records, reference

        with run.phase("search"):
            points, val_reference = stage(validation, config.search_seeds, variants, "validation")
        best = pick(points)
        base = variant_config(config.method, best["variant"])
        entries = {f"pick ({best['variant']})": base,
                   **{f"pick, {a}": variant_config(base, a) for a in config.ablations}}
        with run.phase("test"):
            rows, unprotected = stage(protocol, config.seeds, entries, "test")
        results = run.finish({"experiment": NAME, "dataset": config.dataset,
                              "search_seeds": config.search_seeds, "seeds": config.seeds,
                              "beneficial_test_accuracy": rows[0]["beneficial"],
                              "attacks": {}, "references": {},  # per-variant budgets below
                              "search": points, "pick": best["variant"], "test": rows,
                              "unprotected": unprotected, "unprotected_validation": val_reference, "suite": runs.to_jsonable(suite)})
        if run.writer:
            run.file("results.md").write_text(markdown(results))
            tradeoff_figure(run.file("tradeoff.png"), results)
        print(markdown(results))
        return results


def _cells(p: dict[str, Any]) -> str:
    g = p["goals"]
    return (f"{p['beneficial']['mean']:.3f} ± {p['beneficial']['std']:.3f} | {g['beneficial_drop']:+.3f} | "
            f"{g['reuse']:.3f} ({g['reuse_attack']}) | {g['max_advantage']:+.3f} "
            f"({g['max_advantage_at']}) | {'yes' if g['all_met'] else 'no'}")


def markdown(results: dict[str, Any]) -> str:
    head = ("| variant | beneficial | drop vs reference | worst reuse (final) | max advantage over "
            "scratch (budget) | all goals |\n|---|---|---|---|---|---|")
    lines = [f"# Simulated-attack search on {results['dataset']}", "",
             f"## Validation search ({results['search_seeds']} seeds; held-out third of the "
             "fine-tuning split)", "", head]
    lines += [f"| {p['variant']} | {_cells(p)} |"
              for p in [results["unprotected_validation"], *results["search"]]]
    lines += ["", f"Pick: `{results['pick']}`.", "",
              f"## Test split ({results['seeds']} seeds): the pick and its ablations", "", head]
    lines += [f"| {p['variant']} | {_cells(p)} |"
              for p in [results["unprotected"], *results["test"]]]
    lines += ["", "Goals: worst reuse attack <= 0.30, beneficial drop <= 0.02, advantage over "
              "scratch <= 0 at every budget. Mean ± std over seeds."]
    return "\n".join(lines) + "\n"


def tradeoff_figure(path, results: dict[str, Any]) -> Any:
    """Beneficial accuracy vs worst reuse attack, one point per variant (validation: circles,
    test: squares), the goal region shaded."""
    points = [(p["variant"], p["beneficial"]["mean"], p["goals"]["reuse"], "o", "validation")
              for p in results["search"]]
    points += [(p["variant"], p["beneficial"]["mean"], p["goals"]["reuse"], "s", "test")
               for p in results["test"]]
    for u, group in ((results["unprotected_validation"], "validation"),
                     (results["unprotected"], "test")):
        points.append(("unprotected", u["beneficial"]["mean"], u["goals"]["reuse"], "x",
                       f"unprotected ({group})"))
    u = results["unprotected"]
    return plots.plot_tradeoff(points, path, f"Simulated-attack meta-training on "
                                             f"{results['dataset']}: beneficial vs worst reuse attack",
                               goal_x=0.30, goal_y=u["beneficial"]["mean"] - 0.02)


if __name__ == "__main__":
    raise SystemExit(_cli.main(main))
