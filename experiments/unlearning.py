"""Machine-unlearning baseline (UNSIR), then the fine-tuning attack on the unlearned model.

    python -m experiments.unlearning --dataset digits --seeds 3
    python -m experiments.unlearning --dataset digits --unsir.impair.learning-rate 0.02

Stages (trm_jax.methods.unsir): the original all-classes model, the
error-maximising noise, impair, repair. Beneficial and malicious test accuracy
(argmax over all classes' logits) after every stage. The repaired model's
features get a fresh malicious head and are attacked like every other method's;
the original model is attacked too, as references["unprotected/<attack>"]
(--no-attack-original skips it), to show what unlearning changed.

Expected (digits, 3 seeds, ~2 min on 2 CPU cores): original 0.973 beneficial /
0.951 malicious; impair 0.884 / 0.001; repair 0.955 / 0.000; linear probe on the
unlearned features 0.74 (scratch 0.96).
"""
from __future__ import annotations

import dataclasses
from typing import Annotated

from experiments import _cli
from trm_jax import attacks, config_for, evaluation, methods
from trm_jax.evaluation import SuiteConfig
from trm_jax.methods.unsir import STAGES, UnsirMethodConfig

NAME = "unlearning"


@dataclasses.dataclass(frozen=True)
class Config(_cli.Experiment):
    """The UNSIR machine-unlearning baseline, then the attack."""

    method: Annotated[UnsirMethodConfig, _cli.FLAT] = UnsirMethodConfig()
    attack_original: bool = True
    """also attack the original model (before unlearning) as a reference"""
    attack: SuiteConfig = SuiteConfig()


def defaults(dataset: str) -> Config:
    return Config(dataset=dataset, method=config_for("unsir", dataset))


def main(argv: list[str] | None = None) -> dict:
    config = _cli.parse(Config, defaults, argv, prog=f"python -m experiments.{NAME}",
                        description=__doc__)
    seeds, keys = _cli.seeds_of(config.seeds)
    protocol = _cli.load_protocol(config.dataset, config.protocol, config.run)
    num_classes = protocol.pretrain.beneficial.num_classes + protocol.pretrain.malicious.num_classes
    model = _cli.model_override(config.dataset, config.model, protocol, num_classes)
    _cli.check_method("method", "unsir", config.method, protocol)
    _cli.check_resources(config, protocol, model=model)
    with _cli.Run(NAME, config, config.run) as run:
        if run.resume:  # the per-stage records are written again
            run.dir.truncate_metrics(lambda r: r.get("phase") != "stages")
        with run.phase('unsir'):
            protected = methods.protect("unsir", config.method, protocol, keys, hooks=run.hooks,
                                        model=model)
        run.save_model(protected.model, protected.params, seeds)
        unsir_seconds = run.seconds()
        with run.phase('attack'):
            original = protected.extras["original"] if config.attack_original else None
            result = evaluation.evaluate(protected, protocol, config.attack,
                                         verbose=config.run.progress, reference=original)
            report = attacks.to_json(result)
        summary = _cli.summarize(protected.metrics)
        results = run.finish({
            "experiment": NAME, "dataset": config.dataset, "seeds": seeds, **summary, **report,
            "references_note": "scratch: random init trained on the malicious data; "
                               "unprotected/*: the original model (all classes, before unlearning) "
                               "attacked the same way",
            "stage_accuracy_note": "argmax over all classes' logits (the unlearned model as deployed); "
                                   "the attack replaces the head with a fresh malicious one",
            "unsir_seconds": unsir_seconds, "attack_seconds": run.seconds() - unsir_seconds})
        if run.writer:  # process 0 of a multi-process run writes the figure
            evaluation.plot_report(report, run.file("attack_curves.png"),
                                   f"UNSIR on {config.dataset}: malicious test accuracy under attack",
                                   1.0 / protocol.test.malicious.num_classes, label="UNSIR: ")
        for stage in STAGES:
            acc = results["stages"][stage]
            print(f"{stage:<9} beneficial {acc['beneficial_test_accuracy']['mean']:.4f}  "
                  f"malicious {acc['malicious_test_accuracy']['mean']:.4f}")
        chance = 1.0 / protocol.test.malicious.num_classes
        print(evaluation.summary_table(results, chance=chance))
        return results


if __name__ == "__main__":
    raise SystemExit(_cli.main(main))
