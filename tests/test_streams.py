"""The PRNG streams are distinct: within one experiment no two routines draw the same random
numbers from a seed. Each routine's key for one seed is derived here the way the routine
derives it (through its own function where it has one), and all of them are compared."""
import itertools

import jax
import numpy as np

from trm_jax import attacks as attack
from trm_jax import fewshot, models, skd, streams, unlearning


def key_bits(key) -> tuple[int, ...]:
    return tuple(np.asarray(jax.random.key_data(key)).reshape(-1).tolist())


def test_every_routines_key_for_one_seed_is_distinct():
    seed = jax.random.key(7)
    keys = seed[None]  # the [S] stack the routines take
    fold = jax.random.fold_in
    model = models.lenet(num_classes=2, input_shape=(8, 8, 1), padding="SAME")
    routines = {
        # the seed key itself: model init (split inside init) and training shuffles
        "training": seed,
        "attack": fold(seed, streams.ATTACK),            # attacks/fit.py: _attack_keys
        "meta": fold(seed, streams.META),                # _phases.outer_loop
        "skd head": fold(seed, streams.SKD_HEAD),        # methods/skd.py
        "skd student": fold(seed, streams.SKD_STUDENT),  # checked against init_student below
        **{f"unsir {stage}": unlearning.stage_keys(keys, stage)[0]
           for stage in ("noise", "impair", "repair")},
        **{f"few-shot {half}": fewshot.eval_keys(keys, half)[0]
           for half in ("beneficial", "malicious")},
        # nested streams, folded into the attack's key
        "attack reinit": fold(fold(seed, streams.ATTACK), streams.REINIT),
        "attack warm start": fold(jax.random.split(fold(seed, streams.ATTACK))[1],
                                  streams.WARM_START),
    }
    # The routines' own derivations agree with the ones listed.
    scratch = attack.scratch_init(model, keys)
    np.testing.assert_array_equal(jax.tree.leaves(scratch)[0][0],
                                  jax.tree.leaves(model.init(fold(seed, streams.SCRATCH)))[0])
    routines["scratch"] = fold(seed, streams.SCRATCH)
    student = skd.init_student(model, seed, None, "fresh")
    np.testing.assert_array_equal(jax.tree.leaves(student)[0],
                                  jax.tree.leaves(model.init(routines["skd student"])["features"])[0])
    # Which routines meet in one experiment (a method, its attack and the scratch reference);
    # across methods the same seed starts the same way on purpose (same seeds, same inits).
    experiments = {
        "reference / reverse_maml": ["training", "meta", "attack", "attack reinit",
                                     "attack warm start", "scratch"],
        "skd": ["training", "skd head", "skd student", "attack", "scratch"],
        "unsir": ["training", "unsir noise", "unsir impair", "unsir repair", "attack", "scratch"],
        "omniglot_digits": ["training", "meta", "few-shot beneficial", "few-shot malicious",
                            "attack", "scratch"],
    }
    for name, members in experiments.items():
        bits = {m: key_bits(routines[m]) for m in members}
        for a, b in itertools.combinations(members, 2):
            assert bits[a] != bits[b], f"{name}: {a} and {b} share a key"


def test_top_level_stream_tags_are_distinct():
    tags = list(streams.TOP_LEVEL.values())
    assert len(set(tags)) == len(tags) == 3
    assert {streams.ATTACK, streams.SCRATCH, streams.META} == set(tags)
