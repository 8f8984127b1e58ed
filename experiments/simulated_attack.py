"""Simulated-attack meta-training, then the attack suite and the defence goals.

    python -m experiments.simulated_attack --dataset digits --seeds 3
    python -m experiments.simulated_attack --dataset digits --lam 3 --attacker.steps 20

Trains the unprotected reference (the starting model and the goals' baseline), meta-trains against
attackers sampled from the evaluation's suite (trm_jax.methods.simulated_attack),
then attacks the result with --attack (default: compare's suite, every attack at
three data budgets) and reports the goals of trm_jax.evaluation.defence_goals:
worst reuse attack, beneficial accuracy vs the reference, advantage over scratch.
--validation scores on a held-out part of the fine-tuning split instead of the
test split (for choosing settings; see experiments.simulated_attack_search).
"""
from __future__ import annotations

import dataclasses
from typing import Annotated

from experiments import _cli
from trm_jax import attacks, config_for, data, evaluation, methods
from trm_jax.evaluation import SuiteConfig
from trm_jax.methods import simulated_attack
from trm_jax.methods.simulated_attack import SimulatedAttackConfig

NAME = "simulated_attack"


@dataclasses.dataclass(frozen=True)
class Config(_cli.Experiment):
    """Simulated-attack meta-training from the unprotected reference, then the attack suite."""

    method: Annotated[SimulatedAttackConfig, _cli.FLAT] = SimulatedAttackConfig()
    attack: SuiteConfig = evaluation.COMPARE_SUITE
    """the attack suite and budgets (default: compare's)"""
    validation: bool = False
    """score on the last third of the fine-tuning split, never the test split"""


def defaults(dataset: str) -> Config:
    return Config(dataset=dataset, method=config_for(NAME, dataset))


def main(argv: list[str] | None = None) -> dict:
    config = _cli.parse(Config, defaults, argv, prog=f"python -m experiments.{NAME}",
                        description=__doc__)
    seeds, keys = _cli.seeds_of(config.seeds)
    protocol = _cli.load_protocol(config.dataset, config.protocol, config.run)
    if config.validation:
        protocol = data.validation_protocol(protocol)
    model = _cli.model_override(config.dataset, config.model, protocol)
    _cli.check_method("method", NAME, config.method, protocol)
    _cli.check_suite(config.attack, protocol)
    _cli.check_resources(config, protocol, model=model)
    with _cli.Run(NAME, config, config.run) as run:
        with run.phase("reference"):  # the unprotected model: the goals' beneficial baseline
            reference = simulated_attack.start_model(
                dataclasses.replace(config.method, start="reference"), protocol, keys,
                hooks=run.hooks, model=model)
        with run.phase("meta"):  # from the reference, or (start=skd) from SKD's student
            protected = simulated_attack.protect(
                config.method, protocol, keys, hooks=run.hooks, model=model,
                start=reference if config.method.start == "reference" else None)
        run.save_model(protected.model, protected.params, seeds)
        summary = _cli.summarize(protected.metrics)
        unprotected = _cli.summarize(reference.metrics)["beneficial_test_accuracy"]
        _cli.print_accuracy("unprotected reference beneficial accuracy", unprotected)
        _cli.print_accuracy("protected beneficial accuracy", summary["beneficial_test_accuracy"])
        with run.phase("attack"):
            result = evaluation.evaluate(protected, protocol, config.attack,
                                         verbose=config.run.progress)
            report = attacks.to_json(result)
        goals = evaluation.defence_goals(report, summary["beneficial_test_accuracy"], unprotected)
        results = run.finish({"experiment": NAME, "dataset": config.dataset, "seeds": seeds,
                              "split": "validation" if config.validation else "test",
                              **summary, "unprotected_beneficial_test_accuracy": unprotected,
                              **report, "goals": goals})
        chance = 1.0 / protocol.test.malicious.num_classes
        print(evaluation.summary_table(results, chance=chance))
        print(evaluation.goals_line(goals))
        return results


if __name__ == "__main__":
    raise SystemExit(_cli.main(main))
