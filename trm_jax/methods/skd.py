"""Selective knowledge distillation (SKD): a student that switches malicious inputs off.

1. The teacher (the full model) is trained on the beneficial pre-training split
   (:func:`trm_jax.methods.reference.protect`).
2. A student (the teacher's features part) regresses by MSE onto the teacher's
   penultimate pre-activations for beneficial images and onto a constant
   (``skd.malicious_target``, -100) for malicious ones.
3. The penultimate bias is zeroed; a fresh ReLU + linear head is trained on the
   beneficial split with everything else frozen.
4. Misses (% malicious test images not switched off) and false masks
   (% beneficial test images switched off) are measured (:mod:`trm_jax.skd`).

Switches (``skd``, :class:`trm_jax.skd.SKDConfig`; defaults = the paper): the mask at
any features layer (``mask_layer``; the layers above it are then trained with the head,
everything at and below it stays bitwise frozen), the whole network trained end to end
on beneficial cross-entropy plus the masking term (``objective="end_to_end"``, with
``mask_loss``, ``mask_weight``, ``mask_fraction``, ``logits_weight``), a wider LeNet
(``widths``). ``Protected.metrics`` also hold the honesty checks (:data:`HONESTY_KEYS`).

Defaults: teacher and head use the dataset's training defaults; distillation too,
except on digits (60 epochs at 3e-3: 400 images need more steps to reach the -100
targets; measured). Digits, 3 seeds: teacher 0.98, student 0.86, misses 0.4%,
false masks 11%.
"""
from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

from trm_jax import compilation, data, models, sharding, skd, streams, train, validate
from trm_jax.errors import ConfigError, about
from trm_jax.hooks import Hooks
from trm_jax.methods import reference
from trm_jax.skd import SKDConfig
from trm_jax.methods._phases import (accuracy_on, beneficial_model, check_batch, check_keys,
                                     device_subset, train_phase)
from trm_jax.typing import Protected, PRNGKey

NAME = "skd"
#: The per-seed metrics of SKD besides the beneficial test accuracy.
SUMMARY_KEYS = ("teacher_test_accuracy", "student_test_accuracy", "misses_percent",
                "false_masks_percent", "malicious_mean_activation", "beneficial_mean_activation")
#: The honesty checks in ``Protected.metrics`` (per seed, per features layer): the % of
#: malicious / beneficial test images whose activations are all zero there, and the norm of
#: the full fine-tune attack's gradient (fresh malicious head, the attacker's data) per layer.
HONESTY_KEYS = ("malicious_dead_percent", "beneficial_dead_percent", "finetune_grad_norm")
#: Malicious fine-tuning images the gradient probe averages over (the first ones).
PROBE_IMAGES = 512


@dataclasses.dataclass(frozen=True)
class SKDMethodConfig:
    """Selective knowledge distillation: teacher, distilled student, masked head.

    Attributes:
      teacher: the teacher's supervised training on the beneficial classes (its
        epochs are the ablation's axis).
      distill: the student's MSE regression onto the teacher's penultimate
        activations (beneficial images) and the malicious target (malicious images).
      head: 'head' training: the head-only phase of the masked student (features
        bitwise frozen).
      skd: the malicious target and the student's init (trm_jax.skd.SKDConfig).
    """

    teacher: train.TrainConfig = train.TrainConfig(epochs=20)
    distill: train.TrainConfig = train.TrainConfig(epochs=20)
    head: train.TrainConfig = train.TrainConfig(epochs=20, trainable=("head",))
    skd: skd.SKDConfig = skd.SKDConfig()

    DOMAINS = {"teacher": validate.Instance(train.TrainConfig),
               "distill": validate.Instance(train.TrainConfig),
               "head": validate.Instance(train.TrainConfig), "skd": validate.Instance(SKDConfig)}

    def __post_init__(self) -> None:
        validate.check_fields(self)
        if self.teacher.epochs < 1:
            raise ConfigError(f"teacher.epochs must be >= 1, got {self.teacher.epochs}",
                              field="teacher.epochs")
        if self.head.trainable != ("head",):
            raise ConfigError(f"head.trainable must be ('head',), got {self.head.trainable!r}",
                              field="head.trainable")


def default_config(entry) -> SKDMethodConfig:
    base = lambda **kw: reference.dataset_train_config(entry, **kw)
    return SKDMethodConfig(teacher=base(), distill=base(), head=base(trainable=("head",)))


def skd_model(config: SKDMethodConfig, protocol: data.ProtocolData,
              model: models.Model | None = None) -> models.Model:
    """The teacher's and student's architecture: the dataset's (or ``model``), with
    ``config.skd.widths`` when set (LeNet only)."""
    model = beneficial_model(protocol, model)
    widths = config.skd.widths
    if widths is None:
        return model
    if model.name != "lenet":
        raise ConfigError(f"skd.widths needs a lenet model, got {model.name!r}", field="skd.widths")
    options = {**dict(model.options), "widths": widths}
    return models.lenet(model.num_classes, model.input_shape, param_dtype=model.param_dtype,
                        **options)


def check_mask_layer(config: SKDMethodConfig, protocol: data.ProtocolData) -> None:
    """``skd.mask_layer`` must be a features layer of the model (:func:`skd_model`)."""
    with about("skd"):
        skd.resolve_mask_layer(skd_model(config, protocol), config.skd.mask_layer)


def check(config: SKDMethodConfig, protocol: data.ProtocolData) -> None:
    """Raises :class:`ConfigError` when the settings do not fit the data."""
    check_mask_layer(config, protocol)
    pre = protocol.pretrain
    check_batch(config.teacher, pre.beneficial, "teacher")
    check_batch(config.head, pre.beneficial, "head")
    n = len(pre.beneficial) + len(pre.malicious)
    if config.distill.epochs and config.distill.batch_size > n:
        raise ConfigError(f"distill.batch_size={config.distill.batch_size} exceeds the {n} "
                          f"distillation images; allowed: 1..{n}", field="distill.batch_size")


def protect(config: SKDMethodConfig, protocol: data.ProtocolData, keys: PRNGKey, *,
            hooks: Hooks | None = None, model: models.Model | None = None) -> Protected:
    """Teacher, distillation, masked head; every phase resumable through ``hooks``.

    Phases are named after the teacher budget (``teacher-e20``, ``distill-e20``,
    ``head-e20``), so an ablation over teacher epochs keeps each budget's checkpoints.

    Returns:
      :class:`Protected` whose metrics hold per-seed :data:`SUMMARY_KEYS`
      (``beneficial_test_accuracy`` = the student's) and ``teacher_epochs``.
    """
    check_keys(keys)
    check(config, protocol)
    model = skd_model(config, protocol, model)
    opts = config.skd
    layer = skd.resolve_mask_layer(model, opts.mask_layer)
    low = None if layer == model.penultimate else layer  # the paper's path stays as it was
    tag = f"e{config.teacher.epochs}"
    teacher = reference.protect(reference.ReferenceConfig(config.teacher), protocol, keys,
                                hooks=hooks, model=model, phase=f"teacher-{tag}")
    pre, test = protocol.pretrain, protocol.test
    if opts.objective == "regress":
        distill_data = skd.distillation_data(model, teacher.params["features"],
                                             pre.beneficial.images, pre.malicious.images,
                                             opts.malicious_target, low)
        student = _init_students(model, opts.student_init)(keys, teacher.params["features"])
        student = train_phase(hooks, f"distill-{tag}", keys, student, None, distill_data,
                              config.distill, loss_fn=skd.distillation_loss(model, low),
                              per_seed_data=(False, True)).params
        head_keys = jax.vmap(lambda k: jax.random.fold_in(k, streams.SKD_HEAD))(keys)
        params = _attach_heads(model, low)(head_keys, student)
    else:  # end to end: the whole teacher (or a fresh net) on CE + the masking term
        e2e_data = skd.end_to_end_data(model, teacher.params, pre.beneficial.images,
                                       pre.beneficial.labels, pre.malicious.images)
        start = teacher.params if opts.student_init == "teacher" else _fresh_students(model)(keys)
        params = train_phase(hooks, f"distill-{tag}", keys, jax.tree.map(jnp.array, start), None,
                             e2e_data, config.distill, loss_fn=skd.end_to_end_loss(model, layer, opts),
                             per_seed_data=skd.END_TO_END_PER_SEED).params
    test_data = device_subset(test.beneficial)
    head = dataclasses.replace(config.head, trainable=skd.head_trainable(model, layer))
    params = train_phase(hooks, f"head-{tag}", keys, params, model.apply,
                         device_subset(pre.beneficial), head, eval_data=test_data).params
    accuracy = accuracy_on(model, params, test_data)
    # The test images as constants of the program (as arguments, XLA sums the mean
    # activations in another order: float32 rounding in the last digits).
    masks = compilation.jit(jax.vmap(lambda f: skd.mask_report(
        model, f, test.beneficial.images, test.malicious.images, low, opts.mask_fraction)))(
        params["features"])
    return Protected(NAME, model, params, keys, {
        "beneficial_test_accuracy": accuracy, "student_test_accuracy": accuracy,
        "teacher_test_accuracy": teacher.metrics["beneficial_test_accuracy"],
        "teacher_epochs": config.teacher.epochs,
        **sharding.to_host(dict(masks)),
        **honesty_checks(model, params, keys, protocol)})


def honesty_checks(model: models.Model, params, keys: PRNGKey,
                   protocol: data.ProtocolData) -> dict[str, dict[str, np.ndarray]]:
    """:data:`HONESTY_KEYS` of a params stack ``[S, ...]`` (per seed, per layer)."""
    test, attacker = protocol.test, protocol.finetune.malicious
    out = sharding.to_host(_honesty_programs(model, attacker.num_classes)(
        keys, params, test.malicious.images, test.beneficial.images,
        attacker.images[:PROBE_IMAGES], attacker.labels[:PROBE_IMAGES]))
    return {name: {layer: np.asarray(v) for layer, v in values.items()}
            for name, values in zip(HONESTY_KEYS, out)}


# Every seed's small programs, one per (model, setting) and data as arguments: the
# teacher ablation's budgets reuse them (closures over arrays would each be new programs).


@functools.lru_cache(maxsize=16)
def _init_students(model: models.Model, student_init: str):
    return compilation.jit(jax.vmap(lambda k, f: skd.init_student(model, k, f, student_init)))


@functools.lru_cache(maxsize=16)
def _fresh_students(model: models.Model):
    return compilation.jit(jax.vmap(lambda k: model.init(jax.random.fold_in(k, streams.SKD_STUDENT))))


@functools.lru_cache(maxsize=16)
def _attach_heads(model: models.Model, low: str | None):
    return compilation.jit(jax.vmap(lambda k, f: skd.attach_head(model, k, f, low)))


@functools.lru_cache(maxsize=16)
def _honesty_programs(model: models.Model, num_classes: int):
    def one(key, p, malicious, beneficial, images, labels):
        probe = skd.probe_head(model, key, p, num_classes)
        return (skd.dead_percent(model, p["features"], malicious),
                skd.dead_percent(model, p["features"], beneficial),
                skd.finetune_gradient_norms(model, probe, images, labels))
    return compilation.jit(jax.vmap(one, in_axes=(0, 0, None, None, None, None)))
