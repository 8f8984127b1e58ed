"""The unprotected reference: the paper's CNN trained normally on the beneficial classes.

    python -m experiments.train_reference --dataset digits --seeds 3
    python -m experiments.train_reference --dataset digits --train.epochs 10 --help

Writes a run folder (config.json, metrics.jsonl, results.json, model.json,
checkpoints/) and prints the beneficial test accuracy. Digits, 3 seeds, 2 CPU
cores: well under a minute, ~98% (see README).
"""
from __future__ import annotations

import dataclasses
from typing import Annotated

from experiments import _cli
from trm_jax import config_for, methods
from trm_jax.methods.reference import ReferenceConfig

NAME = "train_reference"


@dataclasses.dataclass(frozen=True)
class Config(_cli.Experiment):
    """The unprotected reference (plain training on the beneficial classes)."""

    method: Annotated[ReferenceConfig, _cli.FLAT] = ReferenceConfig()


def defaults(dataset: str) -> Config:
    return Config(dataset=dataset, method=config_for("reference", dataset))


def main(argv: list[str] | None = None) -> dict:
    config = _cli.parse(Config, defaults, argv, prog=f"python -m experiments.{NAME}",
                        description=__doc__)
    seeds, keys = _cli.seeds_of(config.seeds)
    protocol = _cli.load_protocol(config.dataset, config.protocol, config.run)
    model = _cli.model_override(config.dataset, config.model, protocol)
    _cli.check_method("method", "reference", config.method, protocol)
    _cli.check_resources(config, protocol, model=model)
    with _cli.Run(NAME, config, config.run) as run:
        with run.phase('reference'):
            protected = methods.protect("reference", config.method, protocol, keys, hooks=run.hooks,
                                        model=model)
        run.save_model(protected.model, protected.params, seeds)
        results = run.finish({"experiment": NAME, "dataset": config.dataset, "seeds": seeds,
                              **_cli.summarize(protected.metrics), "attacks": {}, "references": {}})
        _cli.print_accuracy("beneficial test accuracy", results["beneficial_test_accuracy"])
        return results


if __name__ == "__main__":
    raise SystemExit(_cli.main(main))
