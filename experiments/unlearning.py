"""Machine-unlearning baseline (UNSIR), then the fine-tuning attack on the unlearned model.

    python -m experiments.unlearning --dataset digits --seeds 3

Stages (Tarun et al., "Fast Yet Effective Machine Unlearning", arXiv:2111.08947):
*original*: the preset CNN with one head over all classes (beneficial + malicious),
trained on the whole pre-training split; *noise*: an error-maximising noise batch
per malicious class; *impair*: one epoch on noise + retain subset at a high rate;
*repair*: one epoch on the retain subset. Beneficial and malicious test accuracy
(argmax over all classes' logits) are reported after every stage. The repaired
model's features then get a fresh malicious head and are attacked like every
other method (``trm_jax.attack.attack_report``; a from-scratch reference too).

Writes a run folder (config.json, metrics.jsonl, results.json with a ``stages``
entry, attack_curves.png, checkpoints/). The UNSIR defaults are the dataset's
preset in ``trm_jax.unlearning.PRESETS`` (the authors' notebook; a scaled preset
for the 8x8 digits); every one is a flag. The original model is attacked too, as
``references["unprotected/<attack>"]`` (``--no-original-attack`` skips it), to show
what unlearning changed in the features.

Expected (digits, 3 seeds, ~2 min on 2 shared CPU cores; test accuracy, mean +- std):
original 0.973 +- 0.005 beneficial / 0.951 +- 0.007 malicious; impair 0.884 / 0.001;
repair 0.955 +- 0.017 / 0.000. Linear probe (Adam 0.1, 10 epochs) on the unlearned
features: 0.15 -> 0.74 +- 0.05 malicious (the original model's: 0.97; scratch: 0.96);
``--attacks all``: full fine-tuning re-learns to 0.95 +- 0.01, like scratch.
"""
from __future__ import annotations

import argparse
import dataclasses
from typing import Any

import jax
import numpy as np

from experiments import common
from trm_jax import data, presets, runs, train, unlearning

NAME = "unlearning"
STAGES = ("original", "impair", "repair")


def retain_count(text: str) -> int | str:
    """``"all"`` or an integer >= 1."""
    return "all" if text == "all" else common.positive_int(text)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=f"python -m experiments.{NAME}", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    common.add_common_args(p)
    common.add_train_args(p, what="original model (all classes, one head)")
    n = p.add_argument_group("UNSIR noise (default: the dataset preset; source in brackets)")
    n.add_argument("--noise-steps", type=int, default=None,
                   help="Adam steps on the noise [notebook: 5x8=40]")
    n.add_argument("--noise-lr", type=float, default=None, help="noise Adam rate [notebook: 0.1]")
    n.add_argument("--noise-l2", type=float, default=None,
                   help="lambda in -CE + lambda*mean ||N_b||^2 [notebook: 0.1]")
    n.add_argument("--noise-batch-size", type=int, default=None,
                   help="noise images per forget class [notebook: 256; digits: 32]")
    n.add_argument("--noise-init-scale", type=float, default=None,
                   help="std of the Gaussian init [notebook: randn, 1.0]")
    n.add_argument("--noise-copies", type=int, default=None,
                   help="copies of each noise batch in the impair set [notebook: 20; digits: 2]")
    u = p.add_argument_group("UNSIR impair / repair (default: the dataset preset)")
    u.add_argument("--retain-per-class", type=retain_count, default=None,
                   help="retain images per beneficial class, or 'all' [notebook: 1000; digits: all]")
    for stage, rates in (("impair", "notebook: 0.02; digits: 0.01"),
                         ("repair", "notebook: 0.01; digits: 0.005")):
        u.add_argument(f"--{stage}-epochs", type=int, default=None, help="[paper: 1]")
        u.add_argument(f"--{stage}-lr", type=float, default=None, help=f"Adam rate [{rates}]")
        u.add_argument(f"--{stage}-batch-size", type=int, default=None,
                       help="[notebook: 256; digits: 16]")
        u.add_argument(f"--{stage}-optimizer", default=None, choices=train.OPTIMIZERS,
                       help="[notebook: adam]")
    common.add_attack_args(p)
    p.add_argument("--no-original-attack", action="store_true",
                   help="skip attacking the original (pre-unlearning) model as a reference "
                        "(on by default)")
    return p


def unsir_config(args: argparse.Namespace) -> unlearning.UnsirConfig:
    """The dataset's UNSIR preset with flag overrides (validated; a ``ValueError`` names the value)."""
    base = unlearning.preset(args.dataset)
    noise = {k: getattr(args, f"noise_{a}") for k, a in (
        ("steps", "steps"), ("learning_rate", "lr"), ("l2_weight", "l2"),
        ("batch_size", "batch_size"), ("init_scale", "init_scale"))
        if getattr(args, f"noise_{a}") is not None}
    stages = {}
    for stage in ("impair", "repair"):
        changes = {k: getattr(args, f"{stage}_{a}") for k, a in (
            ("epochs", "epochs"), ("learning_rate", "lr"), ("batch_size", "batch_size"),
            ("optimizer", "optimizer")) if getattr(args, f"{stage}_{a}") is not None}
        try:
            stages[stage] = dataclasses.replace(getattr(base, stage), strategy=args.strategy, **changes)
        except ValueError as err:
            raise ValueError(f"{stage}: {err}") from None
    top = {"noise": dataclasses.replace(base.noise, **noise), **stages}
    if args.noise_copies is not None:
        top["noise_copies"] = args.noise_copies
    if args.retain_per_class is not None:
        top["retain_per_class"] = None if args.retain_per_class == "all" else args.retain_per_class
    return dataclasses.replace(base, **top)


def run_unsir(run: runs.RunDir, protocol: data.ProtocolData, model, keys: jax.Array,
              train_config: train.TrainConfig, config: unlearning.UnsirConfig, *,
              resume: bool = False, checkpoint_every: int = 5,
              progress: bool = True) -> tuple[dict[str, Any], dict[str, dict[str, np.ndarray]], dict]:
    """Original training, then UNSIR, each training stage a resumable phase.

    Returns params ``{stage: [S, ...]}`` (``"repair"`` is the unlearned model),
    per-stage per-seed accuracies ``{stage: {"beneficial": f[S], "malicious": f[S]}}``
    and noise statistics.
    """
    pre, test = protocol.pretrain, protocol.test
    offset = pre.beneficial.num_classes
    all_images, all_labels = unlearning.all_classes(pre.beneficial, pre.malicious)
    test_all = unlearning.all_classes(test.beneficial, test.malicious)
    test_ben = common.device_subset(test.beneficial)
    test_mal = common.device_subset(test.malicious)

    def phase(name, phase_keys, params, train_data, config, *, per_seed_data):
        return common.train_phase(run, name, phase_keys, params, model.apply, train_data, config,
                                  eval_data=jax.device_put(test_all), resume=resume,
                                  checkpoint_every=checkpoint_every, progress=progress,
                                  per_seed_data=per_seed_data).params

    original = phase("original", keys, jax.vmap(model.init)(keys),
                     jax.device_put((all_images, all_labels)), train_config, per_seed_data=False)
    idx = unlearning.retain_indices(pre.beneficial.labels, config.retain_per_class)
    result = unlearning.unsir(
        keys, original, model.apply, unlearning.forget_labels_for(pre.beneficial, pre.malicious),
        jax.device_put(pre.beneficial.images[idx]), jax.device_put(pre.beneficial.labels[idx]),
        config, image_shape=protocol.image_shape, run_phase=phase, progress=progress)
    params = dict(zip(STAGES, (original, result.impaired, result.repaired)))
    accuracy = {stage: unlearning.half_accuracies(model.apply, p, test_ben, test_mal, offset)
                for stage, p in params.items()}
    history = {k: np.asarray(v) for k, v in result.noise_history.items()}  # [S, K, steps + 1]
    noise = {"forget_ce_initial": history["forget_ce"][..., 0].mean(1),
             "forget_ce_final": history["forget_ce"][..., -1].mean(1),
             "l2_final": history["l2"][..., -1].mean(1),
             "retain_size": int(idx.size),
             "impair_size": int(config.noise_copies * config.noise.batch_size
                                * pre.malicious.num_classes + idx.size)}
    return params, accuracy, noise


def main(argv: list[str] | None = None) -> dict:
    p = parser()
    args = p.parse_args(argv)
    timer = common.Timer()
    try:
        spec = common.protocol_spec(args)
        train_config = common.train_config(args)
        config = unsir_config(args)
        attack_kwargs = common.attack_options(args)
    except ValueError as err:
        p.error(str(err))
    seeds, keys = common.seeds_and_keys(args)
    protocol = data.load_protocol(spec, data_dir=args.data_dir)
    num_classes = protocol.pretrain.beneficial.num_classes + protocol.pretrain.malicious.num_classes
    model = presets.model_for(args.dataset, num_classes, protocol.image_shape, args.model)
    run = common.open_run(NAME, args, {
        "experiment": NAME, **vars(args), "protocol": spec, "train": train_config,
        "unsir": config, "model": model.spec(), "data_sizes": protocol.sizes(),
        "forget_classes": protocol.pretrain.malicious.classes})
    if args.resume:  # the per-stage records are rewritten below
        run.truncate_metrics(lambda r: r.get("phase") != "stages")

    params, accuracy, noise = run_unsir(
        run, protocol, model, keys, train_config, config, resume=args.resume,
        checkpoint_every=args.checkpoint_every, progress=not args.no_progress)
    unsir_seconds = timer.seconds()
    for stage in STAGES:
        run.log({"phase": "stages", "stage": stage,
                 **{f"{half}_test_accuracy": float(v.mean()) for half, v in accuracy[stage].items()},
                 "per_seed": accuracy[stage]})
    common.save_model(run, model, params["repair"], seeds)

    from trm_jax import attack, plots  # the evaluator; imported late (it is optional to UNSIR)
    report = attack.attack_report(
        model, params["repair"], keys, protocol, **attack_kwargs, verbose=not args.no_progress,
        reference_params=None if args.no_original_attack else params["original"])
    chance = 1.0 / protocol.test.malicious.num_classes
    curves = {f"UNSIR {name}": entry for name, entry in report["attacks"].items()}
    curves.update({name.replace("unprotected/", "original model (before unlearning) "): entry
                   for name, entry in report["references"].items()})
    plots.plot_attack_curves(curves, run.path / "attack_curves.png",
                             f"UNSIR on {args.dataset}: malicious test accuracy under attack", chance)

    results = {
        "experiment": NAME, "dataset": args.dataset, "seeds": seeds,
        "beneficial_test_accuracy": runs.summarize(accuracy["repair"]["beneficial"]),
        "malicious_test_accuracy": runs.summarize(accuracy["repair"]["malicious"]),
        "attacks": report["attacks"], "references": report["references"],
        "attack_summary": report.get("summary", {}),
        "references_note": "scratch: random init trained on the malicious data; "
                           "unprotected/*: the original model (all classes, before unlearning) "
                           "attacked the same way",
        "stages": {stage: {f"{half}_test_accuracy": runs.summarize(v)
                           for half, v in accuracy[stage].items()} for stage in STAGES},
        "stage_accuracy_note": "argmax over all classes' logits (the unlearned model as deployed); "
                               "the attack replaces the head with a fresh malicious one",
        "noise": {k: runs.summarize(v) if isinstance(v, np.ndarray) else v for k, v in noise.items()},
        "unsir_seconds": unsir_seconds, "attack_seconds": timer.seconds() - unsir_seconds,
        "wall_seconds": timer.seconds()}
    run.write_results(results)
    print(summary(results))
    return results


def summary(results: dict) -> str:
    """Per-stage accuracies and each attack's mean curve next to the references."""
    lines = [f"{'stage':<9} {'beneficial':>18} {'malicious':>18}"]
    for stage, acc in results["stages"].items():
        ben, mal = acc["beneficial_test_accuracy"], acc["malicious_test_accuracy"]
        lines.append(f"{stage:<9} {ben['mean']:>10.4f} +- {ben['std']:.4f} "
                     f"{mal['mean']:>10.4f} +- {mal['std']:.4f}")
    entries = {**{f"UNSIR {k}": v for k, v in results["attacks"].items()}, **results["references"]}
    for name, entry in entries.items():
        for lr, per_seed in zip(entry["learning_rates"], entry["curves"]):
            curves = np.asarray(per_seed, dtype=np.float64)  # [S, E+1]
            lines.append(f"{name} (lr {lr:g}): malicious test acc by attack epoch (mean over "
                         f"{curves.shape[0]} seeds) " + " ".join(f"{x:.3f}" for x in curves.mean(0)))
    lines.append(f"wall time {results['wall_seconds']:.1f}s "
                 f"(original + UNSIR {results['unsir_seconds']:.1f}s)")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
