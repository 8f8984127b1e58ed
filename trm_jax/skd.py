"""Selective knowledge distillation (SKD): a student that *switches off* on malicious inputs.

The paper's defence, in five pure steps (each written for ONE seed; seeds are
a ``jax.vmap`` axis, and the training goes through :mod:`trm_jax.train`):

1. **Teacher** ``T``: the full model trained on the beneficial pre-training split
   (``train.fit_classifier``; ``experiments.train_reference``).
2. **Targets** (:func:`distillation_targets`), computed once on the device::

     t(x) = T_features(x)               if x is beneficial   (penultimate pre-activation, f32[D])
     t(x) = c * 1_D                     if x is malicious    (c = malicious_target, default -100.0)

3. **Student** ``S`` = the teacher's features part (no ReLU, no final linear
   layer), initialised from the teacher (default) or fresh, regressed onto the
   targets with MSE (:func:`distillation_loss`, :func:`distill_step`)::

     L(theta) = 1 / (B * D) * sum_{i in batch} || S_theta(x_i) - t(x_i) ||_2^2

4. **Mask + head** (:func:`attach_head`): the penultimate bias is set to 0,
   then ReLU and a fresh linear head are re-appended and ONLY the head is
   trained on the beneficial split (``TrainConfig(trainable=("head",))``). A
   malicious input whose pre-activations are all negative reaches the head as
   an all-zero vector, so the attacker's fresh head sees nothing to separate.
5. **Misses** (:func:`misses`): the % of malicious test images whose post-ReLU
   penultimate activations are not all zero (the defence failed on them); the
   converse on beneficial images is :func:`false_masks` (% that ARE all zero).

References:
  "Transfer Resistant Model Training" (2023), selective knowledge distillation;
  Hinton et al., "Distilling the Knowledge in a Neural Network" (2015).
"""
from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, Literal, Mapping

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax

from trm_jax import compilation, models, streams, train
from trm_jax.errors import ConfigError
from trm_jax.typing import Params
STUDENT_INITS = ("fresh", "teacher")
DEFAULT_MALICIOUS_TARGET = -100.0


@dataclasses.dataclass(frozen=True)
class SKDConfig:
    """SKD's own settings (the three training phases use train.TrainConfig).

    Attributes:
      malicious_target: the constant every malicious image's penultimate
        pre-activations are regressed onto (the paper: -100.0). Must be finite;
        a value >= 0 would not switch the ReLU off and is rejected.
      student_init: 'teacher' (start from the teacher's features,
        so the beneficial targets are met at step 0 and mostly the malicious ones
        have to be learned) or 'fresh' (a new random init, as in classic
        distillation). Measured on digits (3 seeds, same budgets): 'teacher'
        gives 86% beneficial accuracy and 11% false masks, 'fresh' 70% and 22%;
        misses are 0.4% with both.
    """

    malicious_target: float = DEFAULT_MALICIOUS_TARGET
    student_init: Literal["teacher", "fresh"] = "teacher"

    def __post_init__(self):
        validate_config(self)


def validate_config(config: SKDConfig) -> None:
    """Raises ``ValueError`` naming the bad value and what is allowed."""
    try:
        target = float(config.malicious_target)
    except (TypeError, ValueError):
        target = math.nan
    if not math.isfinite(target) or not target < 0:
        raise ConfigError(f"malicious_target must be a finite number < 0 (the paper uses "
                         f"{DEFAULT_MALICIOUS_TARGET}), got {config.malicious_target!r}")
    if config.student_init not in STUDENT_INITS:
        raise ConfigError(f"unknown student_init {config.student_init!r}; allowed: {STUDENT_INITS}")


# ----------------------------------------------------------------------------- targets


def distillation_targets(model: models.Model, teacher_features: Params,
                         beneficial_images: chex.Array, num_malicious: int,
                         malicious_target: float = DEFAULT_MALICIOUS_TARGET) -> jax.Array:
    """SKD's regression targets for one seed (pure; vmap over teachers for seeds).

    Args:
      model: the teacher's (= the student's) architecture.
      teacher_features: ``params["features"]`` of the trained teacher.
      beneficial_images: ``[Nb, H, W, C]``.
      num_malicious: ``Nm``, the number of malicious images that follow them.
      malicious_target: the constant ``c`` for malicious images.

    Returns:
      ``f32[Nb + Nm, D]``: the teacher's penultimate pre-activations for the
      beneficial images, then ``c`` everywhere for the malicious ones (the order
      of :func:`distillation_data`'s images).
    """
    beneficial = model.features_chunked(teacher_features, beneficial_images)
    malicious = jnp.full((num_malicious, beneficial.shape[-1]), malicious_target, beneficial.dtype)
    return jnp.concatenate([beneficial, malicious])


def distillation_data(model: models.Model, teacher_features: Params,
                      beneficial_images: chex.Array, malicious_images: chex.Array,
                      malicious_target: float = DEFAULT_MALICIOUS_TARGET
                      ) -> tuple[jax.Array, jax.Array]:
    """All beneficial + malicious images and every seed's targets, built once on the device.

    Args:
      teacher_features: a stack ``[S, ...]`` of teachers' ``params["features"]``.
      beneficial_images, malicious_images: ``[Nb, H, W, C]``, ``[Nm, H, W, C]``.

    Returns:
      ``(images[Nb + Nm, H, W, C], targets f32[S, Nb + Nm, D])``: the images
      are shared by all seeds, the targets are per seed (train with
      ``per_seed_data=(False, True)``; :func:`distill` does).
    """
    SKDConfig(malicious_target=malicious_target)  # validates the target
    check_features_stack(model, teacher_features, "teacher_features")
    for name, images in (("beneficial_images", beneficial_images),
                         ("malicious_images", malicious_images)):
        if images.ndim != 4 or images.shape[0] < 1:
            raise ConfigError(f"{name} must be a non-empty [N, H, W, C] array, got shape "
                             f"{images.shape}")
        if tuple(images.shape[1:]) != tuple(model.input_shape):
            raise ConfigError(f"{name} have shape {images.shape[1:]} per image, the model expects "
                             f"{model.input_shape}")
    images = jnp.concatenate([jnp.asarray(beneficial_images), jnp.asarray(malicious_images)])
    targets = _targets_for_seeds(model, teacher_features, jnp.asarray(beneficial_images),
                                 int(malicious_images.shape[0]), float(malicious_target))
    return images, targets


def check_features_stack(model: models.Model, stack: Params, name: str) -> int:
    """Checks that ``stack`` is ``[S, ...]`` features params of ``model``; returns ``S``."""
    expected = jax.eval_shape(lambda k: model.init(k)["features"], jax.random.key(0))
    try:
        shapes = jax.tree.map(lambda e, a: (tuple(a.shape[1:]) == e.shape, a.shape[0]), expected,
                              stack)
        flags = jax.tree.leaves(shapes, is_leaf=lambda x: isinstance(x, tuple))
    except (ValueError, TypeError, IndexError):
        flags = [(False, None)]
    if not all(ok for ok, _ in flags) or len({n for _, n in flags}) != 1:
        raise ConfigError(f"{name} must be a stack [S, ...] of {model.name} features params (one "
                         f"per seed, e.g. model.init_seeds(keys)['features']); got shapes "
                         f"{jax.tree.map(lambda a: getattr(a, 'shape', a), stack)}")
    return int(flags[0][1])


@functools.partial(compilation.jit, static_argnums=(0, 3, 4))
def _targets_for_seeds(model, teacher_features, beneficial_images, num_malicious, target):
    return jax.vmap(distillation_targets, in_axes=(None, 0, None, None, None))(
        model, teacher_features, beneficial_images, num_malicious, target)


# ----------------------------------------------------------------------------- distillation


def distillation_loss(model: models.Model) -> train.LossFn:
    """SKD's MSE regression of the student's pre-activations onto the targets.

    ``L(theta) = mean_{i, d} (S_theta(x_i)_d - t_{i, d})^2`` over a batch
    ``(images[B, H, W, C], targets f32[B, D])``; ``theta`` is a features-params
    pytree (the student has no head).

    Returns:
      ``loss_fn(student_params, batch) -> (loss, {"loss": loss})``, a
      :data:`train.LossFn` for :func:`train.fit` / :func:`train.train_step`.
    """
    def loss_fn(params: Params, batch: tuple[jax.Array, jax.Array]):
        images, targets = batch
        outputs = model.features(params, images)
        chex.assert_equal_shape([outputs, targets])
        loss = jnp.mean(jnp.square(outputs - targets))
        return loss, {"loss": loss}
    return loss_fn


@functools.partial(compilation.jit, static_argnames=("model", "optimizer"), donate_argnums=0)
def distill_step(state: train.TrainState, batch: tuple[jax.Array, jax.Array], *,
                 model: models.Model, optimizer: optax.GradientTransformation
                 ) -> tuple[train.TrainState, dict[str, jax.Array]]:
    """One jitted optax step of SKD distillation for one seed (``jax.vmap`` it for seeds).

    Minimises :func:`distillation_loss` on ``batch = (images[B, H, W, C],
    targets f32[B, D])``; ``state.params`` are the student's features params.
    This is :func:`train.train_step` with the MSE loss, so an epoch of it as a
    ``lax.scan`` is :func:`train.train_epoch` and many epochs over seeds are
    :func:`distill`. ``state`` is donated: do not reuse it after the call.

    Returns:
      The new state and ``{"loss": mse}``.
    """
    return train.train_step(state, batch, loss_fn=distillation_loss(model), optimizer=optimizer)


def init_student(model: models.Model, key: chex.PRNGKey, teacher_features: Params,
                 student_init: str = "teacher") -> Params:
    """The student's features params for one seed.

    ``"fresh"``: ``model.init`` with a key derived from ``key`` (``fold_in(key, 1)``,
    so the student never starts where the teacher started); ``"teacher"``: a copy
    of ``teacher_features``.
    """
    if student_init not in STUDENT_INITS:
        raise ConfigError(f"unknown student_init {student_init!r}; allowed: {STUDENT_INITS}")
    if student_init == "teacher":
        return jax.tree.map(jnp.array, teacher_features)
    return model.init(jax.random.fold_in(key, streams.SKD_STUDENT))["features"]


def distill(keys: jax.Array, student_params: Params, images: jax.Array, targets: jax.Array,
            config: train.TrainConfig, *, model: models.Model,
            **fit_kwargs: Any) -> tuple[train.TrainState, list[dict[str, np.ndarray]]]:
    """Distils a stack of seeds through the shared engine (:func:`train.fit_classifier`).

    Args:
      keys: ``[S]`` PRNG keys (they drive the shuffles).
      student_params: ``[S, ...]`` students' features params (:func:`init_student`).
      images, targets: ``[N, H, W, C]`` shared and ``f32[S, N, D]`` per seed
        (:func:`distillation_data`).
      config: epochs, batch size, optimizer and learning rate, strategy.
      **fit_kwargs: passed on (``state``, ``start_epoch``, ``on_epoch``, ``progress``).

    Returns:
      The final state (``state.params`` = students) and the per-epoch metrics.
    """
    num_seeds = keys.shape[0]
    if check_features_stack(model, student_params, "student_params") != num_seeds:
        raise ConfigError(f"student_params hold {jax.tree.leaves(student_params)[0].shape[0]} seeds "
                         f"but there are {num_seeds} keys")
    dim = model.feature_dim
    if targets.ndim != 3 or targets.shape[0] != num_seeds or targets.shape[2] != dim:
        raise ConfigError(f"targets must be f32[S={num_seeds}, N, D={dim}], got shape {targets.shape}")
    if targets.shape[1] != images.shape[0]:
        raise ConfigError(f"{images.shape[0]} images but {targets.shape[1]} targets per seed; "
                         "they must match (see distillation_data)")
    return train.fit_classifier(keys, student_params, None, images, targets, config,
                                loss_fn=distillation_loss(model), per_seed_data=(False, True),
                                **fit_kwargs)


# ----------------------------------------------------------------------------- mask + head


def mask_penultimate_bias(model: models.Model, features_params: Params) -> Params:
    """``features_params`` with the penultimate layer's bias set to exactly 0 (any leading axes)."""
    layer = features_params[model.penultimate]
    if "bias" not in layer:
        raise ConfigError(f"penultimate layer {model.penultimate!r} has no bias to mask "
                         f"(its params: {sorted(layer)})")
    return {**features_params, model.penultimate: {**layer, "bias": jnp.zeros_like(layer["bias"])}}


def attach_head(model: models.Model, key: chex.PRNGKey, features_params: Params) -> Params:
    """The SKD model for one seed: the masked student plus a fresh ReLU + linear head.

    Returns ``{"features": masked student, "head": model.init_head(key)}``; train
    it with ``TrainConfig(trainable=("head",))`` so the student stays bitwise frozen.
    """
    return {"features": mask_penultimate_bias(model, features_params), "head": model.init_head(key)}


# ----------------------------------------------------------------------------- misses


def misses(pre_activations: chex.Array) -> jax.Array:
    """% of images whose post-ReLU penultimate activations are NOT all zero.

    ``misses = 100 / N * #{i : max_d relu(a_{i, d}) > 0}`` over ``f[N, D]``
    pre-activations of malicious images: the images the defence failed to switch off.
    """
    chex.assert_rank(pre_activations, 2)
    return 100.0 * jnp.mean(jnp.any(pre_activations > 0, axis=-1))


def false_masks(pre_activations: chex.Array) -> jax.Array:
    """% of images whose post-ReLU penultimate activations ARE all zero (``100 - misses``).

    Over beneficial images: the images the defence wrongly switched off (the
    head cannot classify them).
    """
    return 100.0 - misses(pre_activations)


def mask_report(model: models.Model, features_params: Params, beneficial_images: chex.Array,
                malicious_images: chex.Array) -> Mapping[str, jax.Array]:
    """Misses, false masks and mean activations of one seed's (masked) student.

    Args:
      features_params: the masked student (bias already zeroed, see :func:`attach_head`).
      beneficial_images, malicious_images: ``[N, H, W, C]`` test images.

    Returns:
      ``{"misses_percent", "false_masks_percent", "malicious_mean_activation",
      "beneficial_mean_activation"}`` (scalars; means of the pre-activations).
    """
    ben = model.features_chunked(features_params, beneficial_images)
    mal = model.features_chunked(features_params, malicious_images)
    return {"misses_percent": misses(mal), "false_masks_percent": false_masks(ben),
            "malicious_mean_activation": jnp.mean(mal), "beneficial_mean_activation": jnp.mean(ben)}
