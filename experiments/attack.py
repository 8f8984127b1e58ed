"""Fine-tuning attacks on any saved model: the evaluation of every method.

    python -m experiments.train_reference --dataset digits --seeds 3 --workdir runs/ref
    python -m experiments.attack --run runs/ref                          # the paper's linear probe
    python -m experiments.attack --run runs/ref --attack.attacks all --output attack_all.json

Reads the run's config.json (dataset, protocol, data dir) and saved model
(model.json + checkpoints/model), attacks every seed's model with every
learning rate in one compiled program per attack (trm_jax.evaluate), and
writes into the run folder attack.json (all curves and metrics) and
attack.png (mean +- std learning curves, chance level), then prints a
summary. --reference RUN also attacks an unprotected reference run the same way.
"""
from __future__ import annotations

import dataclasses
import os
import pathlib
import time
from typing import Annotated, Any

import jax

from experiments import _cli
from trm_jax import attacks, checkpoint, errors, evaluation, methods, runs, validate
from trm_jax.evaluation import SuiteConfig

NAME = "attack"


@dataclasses.dataclass(frozen=True)
class Config:
    """Attack the saved model of any run folder."""

    run: str
    """run folder of any experiment (with a saved model)"""
    attack: SuiteConfig = SuiteConfig()
    seeds: Annotated[int | None, _cli.default_is("every saved seed")] = None
    """attack only the first N saved seeds"""
    reference: str | None = None
    """run folder of an unprotected reference model to attack the same way"""
    data_dir: Annotated[str | None, _cli.default_is("the run's")] = None
    """the TFDS data folder to read the run's dataset from"""
    output: str = "attack.json"
    """file name inside the run folder"""
    overwrite: bool = False
    """replace an existing output file"""
    force_resources: bool = False
    """run even when the pre-flight estimate (trm_jax.resources) says the attack needs more
    memory than is available or more than 1e7 optimizer steps"""

    DOMAINS = {"run": validate.Str(), "attack": validate.Instance(SuiteConfig),
               "seeds": validate.Int(1, none=True), "reference": validate.Str(none=True),
               "data_dir": validate.Str(none=True), "output": validate.Str(),
               "overwrite": validate.Bool(), "force_resources": validate.Bool()}

    def __post_init__(self) -> None:
        for name in ("run", "reference", "data_dir"):  # `~` is the home folder, as in a shell
            if isinstance(getattr(self, name), str) and getattr(self, name):
                object.__setattr__(self, name, os.path.expanduser(getattr(self, name)))
        validate.check_fields(self)
        if not self.output.endswith(".json") or pathlib.Path(self.output).name != self.output:
            raise errors.ConfigError(f"--output must be a plain file name ending in .json, "
                                     f"got {self.output!r}")


def load(run_dir: str, num_seeds: int | None, what: str):
    model, params, seeds = checkpoint.load_model(run_dir)
    if num_seeds is not None:
        if not 1 <= num_seeds <= len(seeds):
            raise errors.ConfigError(f"--seeds {num_seeds} but the {what} run {run_dir} saved "
                                     f"{len(seeds)} seeds {seeds}; allowed: 1..{len(seeds)}")
        seeds, params = seeds[:num_seeds], jax.tree.map(lambda x: x[:num_seeds], params)
    return methods.Protected(what, model, params, methods.seed_keys(seeds), {}), seeds


def main(argv: list[str] | None = None) -> dict[str, Any]:
    config = _cli.parse(Config, lambda _: Config(run=""), argv,
                        prog=f"python -m experiments.{NAME}", description=__doc__,
                        default_dataset="digits")
    start = time.perf_counter()
    if not config.run:
        raise errors.ConfigError("--run is required: the run folder (--workdir) of the experiment "
                                 "whose saved model to attack, e.g. --run runs/reverse_maml-...")
    run = runs.RunDir.open(config.run)
    out_path = run.path / config.output
    if out_path.exists() and not config.overwrite:
        raise errors.RunFolderError(f"{out_path} exists; pass --overwrite to replace it or "
                                    "choose another --output")
    for path in (out_path, out_path.with_suffix(".png")):  # --overwrite replaces only ours
        if path.exists() and path in runs.foreign_entries(run.path):
            raise errors.RunFolderError(f"--overwrite refused for {path}: trm_jax did not write "
                                        "it; nothing was replaced. Choose another --output")
    stored = run.config()
    if "dataset" not in stored:
        raise errors.RunFolderError(f"{run.path}/config.json names no dataset; cannot tell which "
                                    "data the model was trained for")
    options = _cli.ProtocolOptions(**{k: v for k, v in (stored.get("protocol") or {}).items()
                                      if k in {f.name for f in dataclasses.fields(_cli.ProtocolOptions)}})
    protected, seeds = load(config.run, config.seeds, "attacked")
    reference = None
    if config.reference is not None:
        reference, _ = load(config.reference, len(seeds), "reference")
        if reference.model.spec() != protected.model.spec():
            raise errors.ConfigError(f"--reference model {reference.model.spec()} differs from "
                                     f"the attacked model {protected.model.spec()}")
    data_dir = config.data_dir or (stored.get("run") or {}).get("data_dir")
    protocol = _cli.load_protocol(stored["dataset"], options, _cli.RunOptions(data_dir=data_dir))
    _cli.check_suite(config.attack, protocol)
    _cli.check_resources(config, protocol, model=protected.model, seeds=len(seeds),
                         run=_cli.RunOptions(force_resources=config.force_resources))
    result = evaluation.evaluate(protected, protocol, config.attack, reference=reference,
                                 verbose=True)
    report = attacks.to_json(result)
    chance = 1.0 / protocol.finetune.malicious.num_classes
    result = {"experiment": NAME, "run": str(run.path), "attacked_experiment": stored.get("experiment"),
              "dataset": stored["dataset"], "seeds": seeds, "protocol": protocol.spec,
              "model": protected.model.spec(), "chance": chance,
              "settings": dataclasses.asdict(config), **report,
              "wall_seconds": time.perf_counter() - start}
    run.write_json(config.output, result)
    figure = evaluation.plot_report(report, run.file(out_path.with_suffix(".png").name),
                                    f"Fine-tuning attacks on {stored.get('experiment', 'model')} "
                                    f"({stored['dataset']}, {len(seeds)} seeds)", chance)
    print(evaluation.summary_table(result, chance=chance))
    worst = result["summary"]["worst_case"]["final"]
    print(f"worst case (final): {worst['attack']} {worst['mean']:.3f} ± {worst['std']:.3f}; "
          f"chance {chance:.3f}")
    print(f"wrote {out_path} and {figure} in {result['wall_seconds']:.1f}s")
    return result


if __name__ == "__main__":
    raise SystemExit(_cli.main(main))
