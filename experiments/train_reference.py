"""The unprotected reference: the paper's CNN trained normally on the beneficial classes.

    python -m experiments.train_reference --dataset digits --seeds 3

Writes a run folder (config.json, metrics.jsonl, results.json, checkpoints/) and
prints the beneficial test accuracy. Offline on 2 CPU cores, digits with 3 seeds
takes well under a minute and reaches ~98% (see README).
"""
from __future__ import annotations

import argparse

import jax
import numpy as np

from experiments import common
from trm_jax import data, presets, runs

NAME = "train_reference"


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=f"python -m experiments.{NAME}", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    common.add_common_args(p)
    common.add_train_args(p)
    return p


def train_reference(run: runs.RunDir, protocol: data.ProtocolData, model, keys, config,
                    *, resume: bool = False, checkpoint_every: int = 5, progress: bool = True,
                    phase: str = "reference"):
    """Trains ``model`` on the beneficial pre-training split for every seed.

    ``phase`` names the checkpoints and metric records (SKD's teacher: ``"teacher"``).
    Returns the final params ``[S, ...]`` and per-seed beneficial test accuracy.
    """
    train_data = common.device_subset(protocol.pretrain.beneficial)
    test_data = common.device_subset(protocol.test.beneficial)
    params = jax.vmap(model.init)(keys)
    state = common.train_phase(run, phase, keys, params, model.apply, train_data, config,
                               eval_data=test_data, resume=resume,
                               checkpoint_every=checkpoint_every, progress=progress)
    accuracy = jax.vmap(lambda p: common.train.evaluate(model.apply, p, *test_data))(state.params)
    return state.params, np.asarray(accuracy["accuracy"])


def main(argv: list[str] | None = None) -> dict:
    args = parser().parse_args(argv)
    timer = common.Timer()
    spec = common.protocol_spec(args)
    config = common.train_config(args)
    seeds, keys = common.seeds_and_keys(args)
    protocol = data.load_protocol(spec, data_dir=args.data_dir)
    model = presets.model_for(args.dataset, len(spec.beneficial_classes),
                              protocol.image_shape, args.model)
    run = common.open_run(NAME, args, {"experiment": NAME, **vars(args), "protocol": spec,
                                       "train": config, "model": model.spec(),
                                       "data_sizes": protocol.sizes()})
    params, accuracy = train_reference(run, protocol, model, keys, config, resume=args.resume,
                                       checkpoint_every=args.checkpoint_every,
                                       progress=not args.no_progress)
    common.save_model(run, model, params, seeds)
    results = {"experiment": NAME, "dataset": args.dataset, "seeds": seeds,
               "beneficial_test_accuracy": runs.summarize(accuracy),
               "attacks": {}, "references": {}, "wall_seconds": timer.seconds()}
    run.write_results(results)
    summary = results["beneficial_test_accuracy"]
    print(f"beneficial test accuracy: {summary['mean']:.4f} +- {summary['std']:.4f} "
          f"(per seed {np.round(accuracy, 4).tolist()}) in {results['wall_seconds']:.1f}s")
    return results


if __name__ == "__main__":
    main()
