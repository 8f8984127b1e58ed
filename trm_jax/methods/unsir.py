"""The machine-unlearning baseline: UNSIR (Tarun et al., "Fast Yet Effective Machine
Unlearning", arXiv:2111.08947).

Stages: *original*: the preset CNN with one head over all classes (beneficial +
malicious), trained on the whole pre-training split; *noise*: an error-maximising
noise batch per malicious class; *impair*: one epoch on noise + retain subset at a
high rate; *repair*: one epoch on the retain subset (:mod:`trm_jax.unlearning`).
Beneficial and malicious test accuracy (argmax over all classes' logits) are
reported after every stage. The repaired model is the protected one; the
evaluation replaces its head with a fresh malicious one like every other method's.

Digits (3 seeds): original 0.973 beneficial / 0.951 malicious; impair 0.884 /
0.001; repair 0.955 / 0.000; the linear probe on the unlearned features reaches
0.74, full fine-tuning 0.95 (scratch 0.96): it forgets yet re-learns.
"""
from __future__ import annotations

import dataclasses

import jax

from trm_jax import data, models, sharding, train, unlearning, validate
from trm_jax.errors import ConfigError
from trm_jax.hooks import Hooks
from trm_jax.methods._phases import (beneficial_model, check_keys, device_subset, train_phase)
from trm_jax.typing import Protected, PRNGKey

NAME = "unsir"
STAGES = ("original", "impair", "repair")


@dataclasses.dataclass(frozen=True)
class UnsirMethodConfig:
    """UNSIR, the machine-unlearning baseline: train on all classes, then unlearn the malicious ones.

    Attributes:
      original: training of the original all-classes model on the whole pre-training split.
      unsir: noise, impair and repair (trm_jax.unlearning.UnsirConfig; the
        authors' notebook values by default, a scaled preset on digits).
    """

    original: train.TrainConfig = train.TrainConfig(epochs=20)
    unsir: unlearning.UnsirConfig = unlearning.PAPER_CONFIG

    DOMAINS = {"original": validate.Instance(train.TrainConfig),
               "unsir": validate.Instance(unlearning.UnsirConfig)}

    def __post_init__(self) -> None:
        validate.check_fields(self)


def default_config(entry) -> UnsirMethodConfig:
    from trm_jax.methods.reference import dataset_train_config

    return UnsirMethodConfig(original=dataset_train_config(entry))


def check(config: UnsirMethodConfig, protocol: data.ProtocolData) -> None:
    """Raises :class:`ConfigError` when the settings do not fit the data."""
    pre = protocol.pretrain
    n = len(pre.beneficial) + len(pre.malicious)
    if config.original.epochs and config.original.batch_size > n:
        raise ConfigError(f"original.batch_size={config.original.batch_size} exceeds the {n} "
                          f"pre-training examples; allowed: 1..{n}")
    retain = unlearning.retain_indices(pre.beneficial.labels, config.unsir.retain_per_class).size
    n_impair = (config.unsir.noise_copies * config.unsir.noise.batch_size * pre.malicious.num_classes
                + retain)
    for name, size in (("impair", n_impair), ("repair", retain)):
        stage = getattr(config.unsir, name)
        if stage.epochs and stage.batch_size > size:
            raise ConfigError(f"unsir.{name}.batch_size={stage.batch_size} exceeds its {size} "
                              f"examples; allowed: 1..{size}")


def protect(config: UnsirMethodConfig, protocol: data.ProtocolData, keys: PRNGKey, *,
            hooks: Hooks | None = None, model: models.Model | None = None) -> Protected:
    """Original training, then UNSIR; each training stage a resumable phase.

    Returns:
      :class:`Protected` (the repaired model; its head covers all classes) with
      per-seed ``beneficial_test_accuracy`` / ``malicious_test_accuracy`` after
      repair, ``stages`` (per-stage per-seed accuracies) and ``noise`` statistics;
      ``extras["original"]`` is the model before unlearning.
    """
    check_keys(keys)
    check(config, protocol)
    pre, test = protocol.pretrain, protocol.test
    offset = pre.beneficial.num_classes
    model = beneficial_model(protocol, model, offset + pre.malicious.num_classes)
    all_images, all_labels = unlearning.all_classes(pre.beneficial, pre.malicious)
    test_all = jax.device_put(unlearning.all_classes(test.beneficial, test.malicious))
    test_ben, test_mal = device_subset(test.beneficial), device_subset(test.malicious)

    def phase(name, phase_keys, params, train_data, train_config, *, per_seed_data):
        return train_phase(hooks, name, phase_keys, params, model.apply, train_data, train_config,
                           eval_data=test_all, per_seed_data=per_seed_data).params

    u = config.unsir
    original = phase("original", keys, model.init_seeds(keys),
                     jax.device_put((all_images, all_labels)), config.original, per_seed_data=False)
    idx = unlearning.retain_indices(pre.beneficial.labels, u.retain_per_class)
    result = unlearning.unsir(
        keys, original, model.apply, unlearning.forget_labels_for(pre.beneficial, pre.malicious),
        jax.device_put(pre.beneficial.images[idx]), jax.device_put(pre.beneficial.labels[idx]),
        u, image_shape=protocol.image_shape, run_phase=phase,
        progress=bool(hooks and hooks.progress))
    params = dict(zip(STAGES, (original, result.impaired, result.repaired)))
    accuracy = {stage: unlearning.half_accuracies(model.apply, p, test_ben, test_mal, offset)
                for stage, p in params.items()}
    history = sharding.to_host(dict(result.noise_history))  # [S, K, steps + 1]
    noise = {"forget_ce_initial": history["forget_ce"][..., 0].mean(1),
             "forget_ce_final": history["forget_ce"][..., -1].mean(1),
             "l2_final": history["l2"][..., -1].mean(1),
             "retain_size": int(idx.size),
             "impair_size": int(u.noise_copies * u.noise.batch_size * pre.malicious.num_classes
                                + idx.size)}
    for stage in STAGES:
        if hooks is not None:
            hooks.log({"phase": "stages", "stage": stage,
                       **{f"{half}_test_accuracy": float(v.mean())
                          for half, v in accuracy[stage].items()}, "per_seed": accuracy[stage]})
    return Protected(NAME, model, params["repair"], keys, {
        "beneficial_test_accuracy": accuracy["repair"]["beneficial"],
        "malicious_test_accuracy": accuracy["repair"]["malicious"],
        "stages": {stage: {f"{half}_test_accuracy": v for half, v in accuracy[stage].items()}
                   for stage in STAGES},
        "noise": noise}, {"original": original})
