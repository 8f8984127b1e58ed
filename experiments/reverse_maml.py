"""Reverse-MAML with exact second-order meta-gradients, then the fine-tuning attack.

    python -m experiments.reverse_maml --dataset digits --seeds 3     # offline, ~a minute on CPU
    python -m experiments.reverse_maml --seeds 5                      # the paper's CIFAR-10 setting
    python -m experiments.reverse_maml --dataset digits --meta.inner-steps 10 --attack.attacks all

Good tasks (beneficial classes) are trained normally, bad tasks (malicious
classes) in reverse (trm_jax.methods.reverse_maml). The meta-learned model is
then evaluated: beneficial test accuracy, then the attack suite (the paper's
linear probe by default) next to the unprotected reference (trained here on the
same split and seeds) and the from-scratch reference. Writes a run folder with
results.json and attack_curves.png; --resume continues an interrupted run.
"""
from __future__ import annotations

import dataclasses
from typing import Annotated

from experiments import _cli
from trm_jax import attacks, config_for, evaluation, methods
from trm_jax.evaluation import SuiteConfig
from trm_jax.methods.reference import ReferenceConfig
from trm_jax.methods.reverse_maml import ReverseMAMLConfig

NAME = "reverse_maml"


@dataclasses.dataclass(frozen=True)
class Config(_cli.Experiment):
    """Reverse-MAML (exact second-order meta-gradients), then the attack."""

    method: Annotated[ReverseMAMLConfig, _cli.FLAT] = ReverseMAMLConfig()
    with_reference: bool = True
    """also train and attack the unprotected reference"""
    reference: ReferenceConfig = ReferenceConfig()
    attack: SuiteConfig = SuiteConfig()


def defaults(dataset: str) -> Config:
    return Config(dataset=dataset, method=config_for(NAME, dataset),
                  reference=config_for("reference", dataset))


def main(argv: list[str] | None = None) -> dict:
    config = _cli.parse(Config, defaults, argv, prog=f"python -m experiments.{NAME}",
                        description=__doc__)
    seeds, keys = _cli.seeds_of(config.seeds)
    protocol = _cli.load_protocol(config.dataset, config.protocol, config.run)
    model = _cli.model_override(config.dataset, config.model, protocol)
    _cli.check_method("method", NAME, config.method, protocol)
    if config.with_reference:
        _cli.check_method("reference", "reference", config.reference, protocol)
    _cli.check_suite(config.attack, protocol)
    _cli.check_resources(config, protocol, model=model)
    with _cli.Run(NAME, config, config.run) as run:
        with run.phase('reverse_maml'):
            protected = methods.protect(NAME, config.method, protocol, keys, hooks=run.hooks, model=model)
        run.save_model(protected.model, protected.params, seeds)
        _cli.print_accuracy("Reverse-MAML beneficial test accuracy",
                            _cli.summarize(protected.metrics)["beneficial_test_accuracy"])
        reference = None
        if config.with_reference:
            with run.phase('reference'):
                reference = methods.protect("reference", config.reference, protocol, keys,
                                            hooks=run.hooks, model=protected.model)
            _cli.print_accuracy("unprotected reference beneficial test accuracy",
                                _cli.summarize(reference.metrics)["beneficial_test_accuracy"])
        with run.phase('attack'):
            result = evaluation.evaluate(protected, protocol, config.attack, reference=reference,
                                         verbose=config.run.progress)
            report = attacks.to_json(result)
        results = {"experiment": NAME, "dataset": config.dataset, "seeds": seeds,
                   **_cli.summarize(protected.metrics), **report}
        if reference is not None:
            results["unprotected_beneficial_test_accuracy"] = _cli.summarize(
                reference.metrics)["beneficial_test_accuracy"]
        results = run.finish(results)
        if run.writer:  # process 0 of a multi-process run writes the figure
            evaluation.plot_report(report, run.file("attack_curves.png"),
                                   f"Fine-tuning attack on {config.dataset}: Reverse-MAML vs references",
                                   chance=1.0 / protocol.test.malicious.num_classes, label="Reverse-MAML: ")
        chance = 1.0 / protocol.test.malicious.num_classes
        print(evaluation.summary_table(results, chance=chance))
        return results


if __name__ == "__main__":
    raise SystemExit(_cli.main(main))
