"""Selective knowledge distillation (SKD), then the fine-tuning attack on the SKD model.

    python -m experiments.skd --dataset digits --seeds 3                   # offline quick start
    python -m experiments.skd --dataset digits --seeds 3 --attack.attacks all   # the whole suite
    python -m experiments.skd --dataset digits --teacher-epochs 1 2 5 10 20     # teacher ablation
    python -m experiments.skd                                              # the paper (CIFAR-10)

Per teacher budget: teacher, distillation onto penultimate targets (-100 for
malicious images), masked head; misses and false masks (trm_jax.methods.skd).
The model of the LAST teacher budget is saved and attacked next to a
from-scratch reference. Writes a run folder: config.json, metrics.jsonl (one
ablation record per budget), results.json (plus teacher_test_accuracy,
misses_percent, false_masks_percent, ablation), attack_curves.png,
ablation.png (with several budgets), checkpoints/. Digits, 3 seeds, 2 CPU cores:
~1.5 min; teacher 0.98, student 0.86, misses 0.4%, false masks 11%.

The mask can sit at any features layer and be trained end to end (--skd.mask-layer conv2
--skd.objective end_to_end, with --skd.mask-fraction, --skd.mask-loss, --skd.mask-weight,
--skd.logits-weight, --skd.widths: trm_jax.skd.SKDConfig); results.json's "honesty" holds,
per layer, the % of test images whose activations are all zero and the full fine-tune
gradient's norm (a mask of dead units stops gradients).
"""
from __future__ import annotations

import dataclasses
from typing import Annotated


from experiments import _cli
from trm_jax import attacks, config_for, evaluation, methods, plots, validate
from trm_jax.evaluation import SuiteConfig
from trm_jax.methods.skd import HONESTY_KEYS, SUMMARY_KEYS, SKDMethodConfig

NAME = "skd"


@dataclasses.dataclass(frozen=True)
class Config(_cli.Experiment):
    """Selective knowledge distillation, then the attack."""

    method: Annotated[SKDMethodConfig, _cli.FLAT] = SKDMethodConfig()
    teacher_epochs: tuple[int, ...] = ()
    """teacher budgets of the ablation (the last one is attacked); default: teacher.epochs"""
    attack: SuiteConfig = SuiteConfig()

    DOMAINS = {**_cli.Experiment.DOMAINS, "method": validate.Instance(SKDMethodConfig),
               "teacher_epochs": validate.Tuple(validate.COUNT, min_len=0, distinct=True),
               "attack": validate.Instance(SuiteConfig)}

    def budgets(self) -> tuple[int, ...]:
        return self.teacher_epochs or (self.method.teacher.epochs,)


def defaults(dataset: str) -> Config:
    return Config(dataset=dataset, method=config_for(NAME, dataset))


def ablation_table(rows: list[dict]) -> str:
    """Markdown: teacher epochs | teacher acc | student acc | misses % | false masks %."""
    cols = ("teacher_test_accuracy", "student_test_accuracy", "misses_percent", "false_masks_percent")
    lines = ["| teacher epochs | teacher acc | student acc | misses % | false masks % |",
             "|---|---|---|---|---|"]
    for r in rows:
        cells = [f"{r[c]['mean']:.3f} ± {r[c]['std']:.3f}" if "accuracy" in c
                 else f"{r[c]['mean']:.1f} ± {r[c]['std']:.1f}" for c in cols]
        lines.append(f"| {r['teacher_epochs']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    config = _cli.parse(Config, defaults, argv, prog=f"python -m experiments.{NAME}",
                        description=__doc__)
    seeds, keys = _cli.seeds_of(config.seeds)
    protocol = _cli.load_protocol(config.dataset, config.protocol, config.run)
    model = _cli.model_override(config.dataset, config.model, protocol)
    for epochs in config.budgets():  # every budget's settings, before any compute
        _cli.check_method("method", NAME, dataclasses.replace(config.method, teacher=dataclasses.replace(
            config.method.teacher, epochs=epochs)), protocol)
    _cli.check_suite(config.attack, protocol)
    longest = dataclasses.replace(config, method=dataclasses.replace(config.method, teacher=(
        dataclasses.replace(config.method.teacher, epochs=max(config.budgets())))))
    _cli.check_resources(longest, protocol, model=model,  # the ablation's longest teacher
                         aliases={"method.teacher.epochs": "--teacher-epochs"}
                         if config.teacher_epochs else None)
    with _cli.Run(NAME, config, config.run) as run:
        if run.resume:  # the ablation records are written again below
            run.dir.truncate_metrics(lambda r: r.get("phase") != "ablation")
        rows, protected = [], None
        for epochs in config.budgets():
            method = dataclasses.replace(config.method, teacher=dataclasses.replace(
                config.method.teacher, epochs=epochs))
            with run.phase('skd'):
                protected = methods.protect(NAME, method, protocol, keys, hooks=run.hooks, model=model)
            row = {"teacher_epochs": epochs,
                   **{k: v for k, v in _cli.summarize(protected.metrics).items() if k in SUMMARY_KEYS}}
            run.hooks.log({"phase": "ablation", **row})
            rows.append(row)
            print(f"[teacher {epochs} epochs] teacher acc {row['teacher_test_accuracy']['mean']:.4f}, "
                  f"student acc {row['student_test_accuracy']['mean']:.4f}, misses "
                  f"{row['misses_percent']['mean']:.2f}%, false masks "
                  f"{row['false_masks_percent']['mean']:.2f}%", flush=True)
        run.save_model(protected.model, protected.params, seeds)
        skd_seconds = run.seconds()
        with run.phase('attack'):
            result = evaluation.evaluate(protected, protocol, config.attack,
                                         verbose=config.run.progress)
            report = attacks.to_json(result)
        chance = 1.0 / protocol.test.malicious.num_classes
        final = rows[-1]
        results = run.finish({
            "experiment": NAME, "dataset": config.dataset, "seeds": seeds,
            "beneficial_test_accuracy": final["student_test_accuracy"], **report,
            "chance": chance, **{k: final[k] for k in SUMMARY_KEYS},
            # dead units and the full fine-tune gradient per layer: does the mask stop gradients?
            "honesty": {k: v for k, v in _cli.summarize(protected.metrics).items()
                        if k in HONESTY_KEYS},
            "teacher_epochs": final["teacher_epochs"], "ablation": rows,
            "notes": "misses/false masks in % of test images; the attacked model is the last "
                     "teacher budget's; beneficial_test_accuracy = the SKD student + head",
            "skd_seconds": skd_seconds, "attack_seconds": run.seconds() - skd_seconds})
        if run.writer:  # process 0 of a multi-process run writes the figures
            evaluation.plot_report(report, run.file("attack_curves.png"),
                                   f"SKD on {config.dataset} (teacher {final['teacher_epochs']} epochs): "
                                   "malicious test accuracy under attack", chance, label="SKD: ")
        if len(rows) > 1 and run.writer:
            plots.plot_ablation(rows, run.file("ablation.png"),
                                f"SKD teacher ablation ({config.dataset}, {len(seeds)} seeds)")
        print(ablation_table(rows))
        print(evaluation.summary_table(results, chance=chance))
        return results


if __name__ == "__main__":
    raise SystemExit(_cli.main(main))
