"""Seconds of one ``attack_sweep`` per attack on a real dataset: the first call (compile +
run) and later calls (run), with each call's final malicious accuracy per lr (which must
not change between code versions).

    python -m benchmarks.attack_programs --dataset mnist5k full_finetune probe_then_finetune
    PYTHONPATH=/path/to/other/checkout python -m benchmarks.attack_programs --dataset digits reinit_top3

The spec is compare's default budget at its largest: 5 seeds x the lrs 1e-3, 1e-2, 1e-1,
Adam, all the attacker's data, the dataset's attack epochs, batch 64, on random 5-way
models of the dataset's architecture (timing and code-version comparisons, not results).
Attacks run in the order given, in one process, so the first call of an attack whose
program an earlier attack compiled shows no compile. Run it with an empty compilation
cache (``TRM_JAX_NO_COMPILE_CACHE=1``) on a quiet machine; BENCHMARKS.md ("Attack
programs") quotes it.
"""
from __future__ import annotations

import argparse
import json
import time

import jax

import trm_jax
from trm_jax import attacks, datasets
from trm_jax import data as data_lib

LEARNING_RATES = (1e-3, 1e-2, 1e-1)


def time_attacks(dataset: str, names: list[str], seeds: int = 5, repeats: int = 2) -> dict:
    """``{attack: {"first": s, "later": [s, ...], "final": [acc per lr]}}`` (setup untimed)."""
    protocol = data_lib.load_protocol(data_lib.preset(dataset))
    keys = trm_jax.seed_keys(seeds)
    model = datasets.model_for(dataset, 5, protocol.image_shape)
    params = model.init_seeds(jax.vmap(jax.random.fold_in, in_axes=(0, None))(keys, 7))
    data = attacks.attack_data(protocol)
    epochs = attacks.default_epochs(protocol)
    out = {}
    for name in names:
        config = attacks.AttackConfig(name, 5, "adam", epochs, 64)
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            result = jax.block_until_ready(attacks.attack_sweep(model, params, keys,
                                                                LEARNING_RATES, data, config))
            times.append(round(time.perf_counter() - start, 2))
        out[name] = {"first": times[0], "later": times[1:],
                     "final": [round(float(x), 4) for x in result.curve[..., -1].mean(1)]}
        print(name, json.dumps(out[name]), flush=True)
    return out


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.attack_programs",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("attacks", nargs="+", choices=attacks.ATTACKS)
    parser.add_argument("--dataset", default="mnist5k", choices=("digits", "mnist5k"))
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=2, help="calls per attack (>= 1)")
    args = parser.parse_args(argv)
    return time_attacks(args.dataset, args.attacks, args.seeds, max(1, args.repeats))


if __name__ == "__main__":
    main()
