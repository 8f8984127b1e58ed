"""Selective knowledge distillation (SKD), then the fine-tuning attack on the SKD model.

    python -m experiments.skd --dataset digits --seeds 3                  # offline quick start
    python -m experiments.skd --dataset digits --seeds 3 --attacks all    # + the adaptive attacks
    python -m experiments.skd --dataset digits --teacher-epochs 1,2,5,10,20   # teacher ablation
    python -m experiments.skd                                             # the paper (CIFAR-10)

Per teacher budget: 1) the teacher (the full model) is trained on the beneficial
pre-training split (``experiments.train_reference``); 2) a student (the
teacher's features part) regresses by MSE onto the teacher's penultimate
pre-activations for beneficial images and onto a constant (``--malicious-target``,
-100) for malicious ones; 3) the penultimate bias is zeroed, a fresh ReLU +
linear head is trained on the beneficial split with everything else frozen;
4) misses (% malicious test images not switched off) and false masks
(% beneficial test images switched off) are measured (``trm_jax.skd``). The
model of the last teacher budget is saved and attacked (``trm_jax.attack``:
the paper's linear probe by default; ``--attacks all`` adds
``head_and_penultimate``, which can re-learn the zeroed bias -- the honest test
of this defence -- and ``full_finetune``), next to a from-scratch reference.

Writes a run folder: config.json, metrics.jsonl (per-epoch records of every
phase, plus one ``ablation`` record per budget), results.json (the DESIGN.md
keys plus ``teacher_test_accuracy``, ``misses_percent``, ``false_masks_percent``,
``ablation``), attack_curves.png, ablation.png (with several budgets) and
checkpoints/ (``--resume`` continues an interrupted run).

Defaults: teacher and head use the dataset's training defaults (CIFAR-10: 20
epochs, batch 64, Adam 1e-3); distillation too, except on digits (60 epochs,
lr 3e-3: 400 images need more steps to reach the -100 targets; measured). The
student starts from the teacher (``--student-init teacher``, see
``trm_jax.skd.SKDConfig``). Digits, 3 seeds, on 2 shared (busy) CPU cores:
~1.5 min with the linear probe, ~5 min with ``--attacks all``, ~6 min for the
1,2,5,10,20 ablation; teacher 0.98, student 0.86, misses 0.4%, false masks 11%.
"""
from __future__ import annotations

import argparse
from typing import Any

import jax
import numpy as np

from experiments import common
from experiments.train_reference import train_reference
from trm_jax import data, presets, runs, skd, train

NAME = "skd"
# Distillation overrides of common.TRAIN_DEFAULTS where the flag is not given (measured on digits).
DISTILL_DEFAULTS: dict[str, dict[str, Any]] = {"digits": dict(epochs=60, learning_rate=3e-3)}


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=f"python -m experiments.{NAME}", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    common.add_common_args(p)
    common.add_train_args(p, "teacher-", "teacher (--teacher-epochs 1,2,5,10,20: the ablation)",
                          epochs_type=common.int_list)
    common.add_train_args(p, "distill-", "distillation (student)")
    common.add_train_args(p, "head-", "head (head-only training of the masked student)")
    s = p.add_argument_group("SKD")
    s.add_argument("--malicious-target", type=float, default=skd.DEFAULT_MALICIOUS_TARGET,
                   help="constant target of malicious images' penultimate pre-activations "
                        f"(default {skd.DEFAULT_MALICIOUS_TARGET}, the paper's)")
    s.add_argument("--student-init", default=skd.SKDConfig.student_init, choices=skd.STUDENT_INITS,
                   help="start the student from the teacher's features (default) or fresh")
    common.add_attack_args(p)
    return p


def teacher_budgets(args: argparse.Namespace) -> tuple[int, ...]:
    """``--teacher-epochs`` as a tuple (default: the dataset's training epochs)."""
    budgets = args.teacher_epochs or (common.TRAIN_DEFAULTS[args.dataset]["epochs"],)
    bad = [e for e in budgets if e < 1]
    if bad or len(set(budgets)) != len(budgets):
        raise ValueError(f"--teacher-epochs must be distinct integers >= 1, got {list(budgets)}")
    return tuple(budgets)


def distill_config(args: argparse.Namespace) -> train.TrainConfig:
    defaults = DISTILL_DEFAULTS.get(args.dataset, {})
    flags = {"epochs": args.distill_epochs, "learning_rate": args.distill_lr}
    return common.train_config(args, "distill-", **{k: v for k, v in defaults.items()
                                                     if flags[k] is None})


def run_skd(run: runs.RunDir, protocol: data.ProtocolData, model, keys: jax.Array,
            teacher_config: train.TrainConfig, distill_config: train.TrainConfig,
            head_config: train.TrainConfig, config: skd.SKDConfig, *, resume: bool = False,
            checkpoint_every: int = 5, progress: bool = True) -> dict[str, Any]:
    """Teacher, distillation, masked head for one teacher budget; every phase resumable.

    Returns the SKD params ``[S, ...]`` and per-seed ``f[S]`` numbers: teacher and
    student beneficial test accuracy, misses, false masks, mean activations.
    """
    tag = f"e{teacher_config.epochs}"
    phase_kwargs = dict(resume=resume, checkpoint_every=checkpoint_every, progress=progress)
    teacher, teacher_accuracy = train_reference(run, protocol, model, keys, teacher_config,
                                                phase=f"teacher-{tag}", **phase_kwargs)
    pre, test = protocol.pretrain, protocol.test
    distill_data = skd.distillation_data(model, teacher["features"], pre.beneficial.images,
                                         pre.malicious.images, config.malicious_target)
    student = jax.jit(jax.vmap(lambda k, f: skd.init_student(model, k, f, config.student_init)))(
        keys, teacher["features"])
    student = common.train_phase(run, f"distill-{tag}", keys, student, None, distill_data,
                                 distill_config, loss_fn=skd.distillation_loss(model),
                                 per_seed_data=(False, True), **phase_kwargs).params

    head_keys = jax.vmap(lambda k: jax.random.fold_in(k, 2))(keys)
    params = jax.jit(jax.vmap(lambda k, f: skd.attach_head(model, k, f)))(head_keys, student)
    test_data = common.device_subset(test.beneficial)
    params = common.train_phase(run, f"head-{tag}", keys, params, model.apply,
                                common.device_subset(pre.beneficial), head_config,
                                eval_data=test_data, **phase_kwargs).params
    accuracy = jax.vmap(lambda p: train.evaluate(model.apply, p, *test_data))(params)["accuracy"]
    masks = jax.jit(jax.vmap(lambda f: skd.mask_report(model, f, test.beneficial.images,
                                                       test.malicious.images)))(params["features"])
    return {"params": params, "teacher_epochs": teacher_config.epochs,
            "teacher_test_accuracy": np.asarray(teacher_accuracy),
            "student_test_accuracy": np.asarray(accuracy),
            **{k: np.asarray(v) for k, v in masks.items()}}


SUMMARY_KEYS = ("teacher_test_accuracy", "student_test_accuracy", "misses_percent",
                "false_masks_percent", "malicious_mean_activation", "beneficial_mean_activation")


def ablation_table(rows: list[dict[str, Any]]) -> str:
    """Markdown: teacher epochs | teacher acc | student acc | misses % | false masks % (mean +- std)."""
    cols = ("teacher_test_accuracy", "student_test_accuracy", "misses_percent", "false_masks_percent")
    head = "| teacher epochs | teacher acc | student acc | misses % | false masks % |"
    lines = [head, "|" + "|".join("-" * (len(c) + 2) for c in head.strip("|").split("|")) + "|"]
    for r in rows:
        cells = [f"{r[c]['mean']:.3f} ± {r[c]['std']:.3f}" if "accuracy" in c
                 else f"{r[c]['mean']:.1f} ± {r[c]['std']:.1f}" for c in cols]
        lines.append(f"| {r['teacher_epochs']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot_ablation(rows: list[dict[str, Any]], path, title: str):
    """Teacher / student beneficial accuracy (%) and misses (%) against teacher epochs."""
    from trm_jax import plots

    plt = plots._pyplot()
    fig, ax = plt.subplots(figsize=(6.5, 4.2), dpi=120)
    x = [r["teacher_epochs"] for r in rows]
    for key, label, scale in (("teacher_test_accuracy", "teacher accuracy", 100.0),
                              ("student_test_accuracy", "SKD student accuracy", 100.0),
                              ("misses_percent", "misses (malicious not masked)", 1.0),
                              ("false_masks_percent", "false masks (beneficial masked)", 1.0)):
        mean = np.array([r[key]["mean"] for r in rows]) * scale
        std = np.array([r[key]["std"] for r in rows]) * scale
        ax.errorbar(x, mean, yerr=std, marker="o", capsize=3, label=label)
    ax.set_xscale("log")
    ax.set_xticks(x, [str(e) for e in x])
    ax.set_xlabel("teacher training epochs")
    ax.set_ylabel("% of test images (mean ± std over seeds)")
    ax.set_ylim(-2, 102)
    ax.set_title(title)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8, loc="center right")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def main(argv: list[str] | None = None) -> dict:
    p = parser()
    args = p.parse_args(argv)
    timer = common.Timer()
    try:
        spec = common.protocol_spec(args)
        budgets = teacher_budgets(args)
        teacher_configs = [common.train_config(args, "teacher-", epochs=e) for e in budgets]
        distill = distill_config(args)
        head = common.train_config(args, "head-", trainable=("head",))
        config = skd.SKDConfig(args.malicious_target, args.student_init)
        attack_kwargs = common.attack_options(args)
    except ValueError as err:
        p.error(str(err))
    seeds, keys = common.seeds_and_keys(args)
    protocol = data.load_protocol(spec, data_dir=args.data_dir)
    model = presets.model_for(args.dataset, protocol.pretrain.beneficial.num_classes,
                              protocol.image_shape, args.model)
    run = common.open_run(NAME, args, {
        "experiment": NAME, **vars(args), "protocol": spec, "teacher": teacher_configs,
        "distill": distill, "head": head, "skd": config, "attack": attack_kwargs,
        "model": model.spec(), "data_sizes": protocol.sizes()})
    if args.resume:  # the ablation records are rewritten below
        run.truncate_metrics(lambda r: r.get("phase") != "ablation")

    rows, params = [], None
    for teacher_config in teacher_configs:
        out = run_skd(run, protocol, model, keys, teacher_config, distill, head, config,
                      resume=args.resume, checkpoint_every=args.checkpoint_every,
                      progress=not args.no_progress)
        params = out.pop("params")
        row = {"teacher_epochs": out["teacher_epochs"],
               **{k: runs.summarize(out[k]) for k in SUMMARY_KEYS}}
        run.log({"phase": "ablation", **row})
        rows.append(row)
        print(f"[teacher {row['teacher_epochs']} epochs] teacher acc "
              f"{row['teacher_test_accuracy']['mean']:.4f}, student acc "
              f"{row['student_test_accuracy']['mean']:.4f}, misses "
              f"{row['misses_percent']['mean']:.2f}%, false masks "
              f"{row['false_masks_percent']['mean']:.2f}%", flush=True)
    common.save_model(run, model, params, seeds)
    skd_seconds = timer.seconds()

    from trm_jax import attack, plots  # the evaluator
    from experiments.attack import summary_table

    report = attack.attack_report(model, params, keys, protocol, **attack_kwargs)
    chance = 1.0 / protocol.test.malicious.num_classes
    curves = {f"SKD ({name})": entry for name, entry in report["attacks"].items()}
    plots.plot_attack_curves({**curves, **report["references"]}, run.path / "attack_curves.png",
                             f"SKD on {args.dataset} (teacher {budgets[-1]} epochs): "
                             "malicious test accuracy under attack", chance)
    if len(rows) > 1:
        plot_ablation(rows, run.path / "ablation.png",
                      f"SKD teacher ablation ({args.dataset}, {len(seeds)} seeds)")

    final = rows[-1]
    results = {
        "experiment": NAME, "dataset": args.dataset, "seeds": seeds,
        "beneficial_test_accuracy": final["student_test_accuracy"],
        "attacks": report["attacks"], "references": report["references"],
        "attack_summary": report.get("summary"), "chance": chance,
        **{k: final[k] for k in SUMMARY_KEYS}, "teacher_epochs": final["teacher_epochs"],
        "ablation": rows, "skd": config,
        "notes": "misses/false masks in % of test images; the attacked model is the last "
                 "teacher budget's; beneficial_test_accuracy = the SKD student + head",
        "skd_seconds": skd_seconds, "attack_seconds": timer.seconds() - skd_seconds,
        "wall_seconds": timer.seconds()}
    run.write_results(results)
    print(ablation_table(rows))
    print(summary_table(results))
    print(f"wall time {results['wall_seconds']:.1f}s (SKD {skd_seconds:.1f}s, attack "
          f"{results['attack_seconds']:.1f}s); run folder {run.path}")
    return results


if __name__ == "__main__":
    main()
