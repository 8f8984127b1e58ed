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

from trm_jax import compilation, models, streams, train, validate
from trm_jax.errors import ConfigError
from trm_jax.typing import Params
STUDENT_INITS = ("fresh", "teacher")
DEFAULT_MALICIOUS_TARGET = -100.0
#: ``"regress"``: the paper's MSE onto the teacher's pre-activations (beneficial) and the
#: target (malicious) at the mask layer; ``"end_to_end"``: the whole network trained on
#: beneficial cross-entropy plus the masking term (see :func:`end_to_end_loss`).
OBJECTIVES = ("regress", "end_to_end")
#: The masking term of ``"end_to_end"``: ``"mse"`` to the target, or ``"hinge"``
#: (one-sided: only pre-activations above the target are penalised).
MASK_LOSSES = ("mse", "hinge")


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
      mask_layer: the features layer whose ReLU masks malicious inputs (its pre-activations
        are driven to malicious_target): conv1, conv2, fc1 or fc2 for LeNet; None: the
        penultimate (the paper). Below the penultimate, the layers above the mask are
        trained with the head (everything at and below the mask stays bitwise frozen).
      objective: 'regress' (the paper) trains the layers up to the mask only;
        'end_to_end' trains the whole network (from the teacher) on beneficial
        cross-entropy + mask_weight x the masking term (+ logits_weight x the
        cross-entropy to the teacher's soft labels).
      mask_fraction: the share of the mask layer's channels that are masked (the first
        ceil(fraction * C)); 'end_to_end' only below 1.
      mask_weight: the end_to_end objective's weight of the masking term (>= 0).
      mask_loss: the masking term: 'mse' to malicious_target, or 'hinge' (only
        pre-activations above the target are penalised).
      logits_weight: the end_to_end objective's weight of the teacher's soft labels (>= 0).
      widths: LeNet's widths (conv1, conv2, fc1, fc2) for teacher and student, e.g. a
        wider conv2 under a conv2 mask; None: the dataset's model.
    """

    malicious_target: float = DEFAULT_MALICIOUS_TARGET
    student_init: Literal["teacher", "fresh"] = "teacher"
    mask_layer: str | None = None
    objective: Literal["regress", "end_to_end"] = "regress"
    mask_fraction: float = 1.0
    mask_weight: float = 1.0
    mask_loss: Literal["mse", "hinge"] = "mse"
    logits_weight: float = 0.0
    widths: tuple[int, ...] | None = None

    DOMAINS = {"malicious_target": validate.Float(hi=0, open_hi=True),
               "student_init": validate.Choice(STUDENT_INITS),
               "mask_layer": validate.Str(none=True), "objective": validate.Choice(OBJECTIVES),
               "mask_fraction": validate.Float(0, 1, open_lo=True),
               "mask_weight": validate.NONNEGATIVE, "mask_loss": validate.Choice(MASK_LOSSES),
               "logits_weight": validate.NONNEGATIVE,
               "widths": validate.Tuple(validate.COUNT, 4, 4, none=True)}  # LeNet's 4 widths

    def __post_init__(self):
        validate_config(self)


def validate_config(config: SKDConfig) -> None:
    """Raises :class:`ConfigError` naming the bad field, its value and what is allowed
    (malicious_target < 0: a target >= 0 would not switch the ReLU off; the paper uses
    -100)."""
    validate.check_fields(config)
    fraction = config.mask_fraction
    if fraction < 1 and config.objective != "end_to_end":
        raise ConfigError(f"mask_fraction={fraction} needs objective='end_to_end' (the regression "
                          "has a target for every channel)", field="mask_fraction")
    if config.objective != "end_to_end" and (config.logits_weight or config.mask_weight != 1.0
                                             or config.mask_loss != "mse"):
        raise ConfigError("mask_weight, mask_loss and logits_weight belong to objective="
                          f"'end_to_end', not {config.objective!r}", field="objective")


# ----------------------------------------------------------------------------- layers


def mask_layers(model: models.Model) -> tuple[str, ...]:
    """``model``'s features layers bottom to top: the places a mask can sit (LeNet:
    ``("conv1", "conv2", "fc1", "fc2")``; the last is the penultimate): the model's own
    :attr:`~trm_jax.models.Model.feature_layers`."""
    return tuple(layer[0] for layer in model.feature_layers)


def resolve_mask_layer(model: models.Model, layer: str | None) -> str:
    """``layer`` checked against :func:`mask_layers`; ``None`` is the penultimate."""
    allowed = mask_layers(model)
    if layer is None:
        return model.penultimate
    if layer not in allowed:
        raise ConfigError(f"mask_layer {layer!r} is not a features layer of {model.name}; "
                          f"allowed: {list(allowed)}", field="mask_layer")
    return layer


def layers_above(model: models.Model, layer: str) -> tuple[str, ...]:
    """The features layers above ``layer`` (trained with the head after a low mask)."""
    order = mask_layers(model)
    return order[order.index(layer) + 1:]


def _activation_module(model: models.Model, layer: str) -> str:
    """The submodule whose output the ReLU after ``layer`` reads (its norm, where it has one)."""
    names = model.param_shapes()["features"]
    norm = f"norm{layer[4:]}" if layer.startswith("conv") else None
    return norm if norm in names else layer


def layer_preactivations(model: models.Model, features_params: Params, images: chex.Array,
                         layers: tuple[str, ...] | str) -> dict[str, jax.Array] | jax.Array:
    """The pre-activations of features layers: ``images[B, H, W, C] -> f[B, ...]`` per layer
    (convolutions ``f[B, H', W', C']`` before ReLU and pooling, dense ``f[B, D]``).

    One forward pass (flax's ``capture_intermediates``); under ``jit`` the layers above
    the highest one asked for are not computed. A string ``layers`` returns its array.
    """
    single = isinstance(layers, str)
    _, out = features_and_preactivations(model, features_params, images,
                                         (layers,) if single else tuple(layers))
    return out[layers] if single else out


def features_and_preactivations(model: models.Model, features_params: Params,
                                images: chex.Array, layers: tuple[str, ...]
                                ) -> tuple[jax.Array, dict[str, jax.Array]]:
    """``(model.features(...) f[B, D], {layer: pre-activations})`` from one forward pass."""
    wanted = {_activation_module(model, layer): layer for layer in layers}
    features, state = model.features_module.apply(
        {"params": features_params}, models.to_float(images, model.param_dtype),
        capture_intermediates=lambda module, method: method == "__call__" and module.name in wanted,
        mutable=["intermediates"])
    captured = state["intermediates"]
    return features, {layer: captured[name]["__call__"][0] for name, layer in wanted.items()}


def masked_channels(pre_activations: chex.Array, fraction: float = 1.0) -> chex.Array:
    """The first ``ceil(fraction * C)`` channels (last axis) of ``f[B, ..., C]``."""
    channels = pre_activations.shape[-1]
    return pre_activations[..., :max(1, math.ceil(fraction * channels))]


# ----------------------------------------------------------------------------- targets


def distillation_targets(model: models.Model, teacher_features: Params,
                         beneficial_images: chex.Array, num_malicious: int,
                         malicious_target: float = DEFAULT_MALICIOUS_TARGET,
                         layer: str | None = None) -> jax.Array:
    """SKD's regression targets for one seed (pure; vmap over teachers for seeds).

    Args:
      model: the teacher's (= the student's) architecture.
      teacher_features: ``params["features"]`` of the trained teacher.
      beneficial_images: ``[Nb, H, W, C]``.
      num_malicious: ``Nm``, the number of malicious images that follow them.
      malicious_target: the constant ``c`` for malicious images.
      layer: the mask layer; ``None`` (or the penultimate): the paper's.

    Returns:
      ``f32[Nb + Nm, D]``: the teacher's penultimate pre-activations for the
      beneficial images, then ``c`` everywhere for the malicious ones (the order
      of :func:`distillation_data`'s images); at another ``layer`` that layer's
      pre-activations, ``f32[Nb + Nm, ...]`` (a convolution's ``[H', W', C']``).
    """
    if layer is None or layer == model.penultimate:
        beneficial = model.features_chunked(teacher_features, beneficial_images)
    else:
        beneficial = layer_preactivations(model, teacher_features, beneficial_images, layer)
    malicious = jnp.full((num_malicious, *beneficial.shape[1:]), malicious_target, beneficial.dtype)
    return jnp.concatenate([beneficial, malicious])


def distillation_data(model: models.Model, teacher_features: Params,
                      beneficial_images: chex.Array, malicious_images: chex.Array,
                      malicious_target: float = DEFAULT_MALICIOUS_TARGET,
                      layer: str | None = None) -> tuple[jax.Array, jax.Array]:
    """All beneficial + malicious images and every seed's targets, built once on the device.

    Args:
      teacher_features: a stack ``[S, ...]`` of teachers' ``params["features"]``.
      beneficial_images, malicious_images: ``[Nb, H, W, C]``, ``[Nm, H, W, C]``.

    Returns:
      ``(images[Nb + Nm, H, W, C], targets f32[S, Nb + Nm, D])``: the images
      are shared by all seeds, the targets are per seed (train with
      ``per_seed_data=(False, True)``; :func:`distill` does). At a lower ``layer``
      the targets are that layer's, ``f32[S, Nb + Nm, ...]``.
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
    if layer is not None:
        layer = resolve_mask_layer(model, layer)
    targets = _targets_for_seeds(model, teacher_features, jnp.asarray(beneficial_images),
                                 int(malicious_images.shape[0]), float(malicious_target),
                                 None if layer == model.penultimate else layer)
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


@functools.partial(compilation.jit, static_argnums=(0, 3, 4, 5))
def _targets_for_seeds(model, teacher_features, beneficial_images, num_malicious, target,
                       layer=None):
    return jax.vmap(distillation_targets, in_axes=(None, 0, None, None, None, None))(
        model, teacher_features, beneficial_images, num_malicious, target, layer)


# ----------------------------------------------------------------------------- distillation


def distillation_loss(model: models.Model, layer: str | None = None) -> train.LossFn:
    """SKD's MSE regression of the student's pre-activations onto the targets.

    ``L(theta) = mean_{i, d} (S_theta(x_i)_d - t_{i, d})^2`` over a batch
    ``(images[B, H, W, C], targets f32[B, D])``; ``theta`` is a features-params
    pytree (the student has no head).

    At a lower mask ``layer`` the student's pre-activations of that layer are
    regressed instead (targets ``f32[B, ...]`` of :func:`distillation_data` at
    ``layer``); the layers above it get no gradient.

    Returns:
      ``loss_fn(student_params, batch) -> (loss, {"loss": loss})``, a
      :data:`train.LossFn` for :func:`train.fit` / :func:`train.train_step` (the same
      object for the same arguments: a teacher ablation's fits share their programs).
    """
    return train.cached(_distillation_loss, model, layer)


@functools.lru_cache(maxsize=32)
def _distillation_loss(model: models.Model, layer: str | None) -> train.LossFn:
    low = layer is not None and layer != model.penultimate

    def loss_fn(params: Params, batch: tuple[jax.Array, jax.Array]):
        images, targets = batch
        outputs = (layer_preactivations(model, params, images, layer) if low
                   else model.features(params, images))
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


def end_to_end_data(model: models.Model, teacher_params: Params,
                    beneficial_images: chex.Array, beneficial_labels: chex.Array,
                    malicious_images: chex.Array
                    ) -> tuple[jax.Array, dict[str, jax.Array]]:
    """The ``"end_to_end"`` objective's data, built once on the device.

    Args:
      teacher_params: a stack ``[S, ...]`` of full teacher params (features and head).
      beneficial_images, beneficial_labels: ``[Nb, H, W, C]``, ``int[Nb]``.
      malicious_images: ``[Nm, H, W, C]``.

    Returns:
      ``(images[Nb + Nm, H, W, C], {"label": int32[Nb + Nm], "teacher": f32[S, Nb + Nm, K]})``:
      ``label`` is -1 on malicious images, ``teacher`` the teacher's logits (0 on
      malicious images). Train with ``per_seed_data=END_TO_END_PER_SEED``.
    """
    images = jnp.concatenate([jnp.asarray(beneficial_images), jnp.asarray(malicious_images)])
    num_malicious = int(malicious_images.shape[0])
    labels = jnp.concatenate([jnp.asarray(beneficial_labels, jnp.int32),
                              jnp.full((num_malicious,), -1, jnp.int32)])
    logits = _teacher_logits(model, teacher_params, jnp.asarray(beneficial_images), num_malicious)
    return images, {"label": labels, "teacher": logits}


#: ``per_seed_data`` of :func:`end_to_end_data`'s ``(images, targets)``.
END_TO_END_PER_SEED = (False, {"label": False, "teacher": True})


@functools.partial(compilation.jit, static_argnums=(0, 3))
def _teacher_logits(model, teacher_params, images, num_malicious):
    def one(params):
        logits = model.head(params["head"], model.features_chunked(params["features"], images))
        return jnp.concatenate([logits, jnp.zeros((num_malicious, logits.shape[-1]), logits.dtype)])
    return jax.vmap(one)(teacher_params)


def masking_term(pre_activations: chex.Array, is_malicious: chex.Array, config: SKDConfig
                 ) -> jax.Array:
    """The mean over malicious images of the masking loss of their masked channels.

    ``pre_activations: f[B, ..., C]``, ``is_malicious: bool[B]``; per image the mean
    over its masked channels (:func:`masked_channels`) of ``(a - c)^2`` (``"mse"``) or
    ``relu(a - c)^2`` (``"hinge"``: zero once below the target). 0 without malicious images.
    """
    pre = masked_channels(pre_activations, config.mask_fraction)
    diff = pre.reshape(pre.shape[0], -1) - config.malicious_target
    if config.mask_loss == "hinge":
        diff = jax.nn.relu(diff)
    per_image = jnp.mean(jnp.square(diff), axis=-1)
    return jnp.sum(jnp.where(is_malicious, per_image, 0.0)) / jnp.maximum(1, jnp.sum(is_malicious))


def end_to_end_loss(model: models.Model, layer: str, config: SKDConfig) -> train.LossFn:
    """The ``"end_to_end"`` objective on a batch of :func:`end_to_end_data`::

      L = CE(logits, y | beneficial) + logits_weight * CE(logits, softmax(teacher) | beneficial)
          + mask_weight * masking_term(pre_layer | malicious)

    (means over the batch's beneficial, resp. malicious, images); ``params`` are full
    model params. Metrics: ``loss``, ``cross_entropy``, ``mask``, ``accuracy`` (beneficial).
    The same object for the same arguments.
    """
    return train.cached(_end_to_end_loss, model, layer, config)


@functools.lru_cache(maxsize=32)
def _end_to_end_loss(model: models.Model, layer: str, config: SKDConfig) -> train.LossFn:
    def loss_fn(params: Params, batch: tuple[jax.Array, dict[str, jax.Array]]):
        images, targets = batch
        labels = targets["label"]
        features, pre = features_and_preactivations(model, params["features"], images, (layer,))
        logits = model.head(params["head"], features)
        good = labels >= 0
        count = jnp.maximum(1, jnp.sum(good))
        mean_good = lambda v: jnp.sum(jnp.where(good, v, 0.0)) / count
        ce = mean_good(optax.softmax_cross_entropy_with_integer_labels(logits, jnp.maximum(labels, 0)))
        mask = masking_term(pre[layer], ~good, config)
        loss = ce + config.mask_weight * mask
        if config.logits_weight:
            soft = jax.nn.softmax(targets["teacher"])
            loss = loss + config.logits_weight * mean_good(optax.softmax_cross_entropy(logits, soft))
        accuracy = mean_good((jnp.argmax(logits, -1) == labels).astype(jnp.float32))
        return loss, {"loss": loss, "cross_entropy": ce, "mask": mask, "accuracy": accuracy}
    return loss_fn


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


def mask_penultimate_bias(model: models.Model, features_params: Params,
                          layer: str | None = None) -> Params:
    """``features_params`` with the penultimate layer's (or ``layer``'s) bias set to exactly 0
    (any leading axes)."""
    name = layer or model.penultimate
    params = features_params[name]
    if "bias" not in params:
        raise ConfigError(f"layer {name!r} has no bias to mask (its params: {sorted(params)})")
    return {**features_params, name: {**params, "bias": jnp.zeros_like(params["bias"])}}


def attach_head(model: models.Model, key: chex.PRNGKey, features_params: Params,
                layer: str | None = None) -> Params:
    """The SKD model for one seed: the masked student plus a fresh ReLU + linear head.

    Returns ``{"features": masked student, "head": model.init_head(key)}``; train
    it with ``TrainConfig(trainable=("head",))`` so the student stays bitwise frozen
    (with a lower mask ``layer``, whose bias is zeroed instead: :func:`head_trainable`).
    """
    return {"features": mask_penultimate_bias(model, features_params, layer),
            "head": model.init_head(key)}


def head_trainable(model: models.Model, layer: str | None = None) -> tuple[str, ...]:
    """What the phase after distillation trains: the head and the layers above the mask
    (``("head",)`` for the paper's penultimate mask); the rest stays bitwise frozen."""
    layer = layer or model.penultimate
    return ("head", *(f"features/{name}" for name in layers_above(model, layer)))


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
                malicious_images: chex.Array, layer: str | None = None,
                fraction: float = 1.0) -> Mapping[str, jax.Array]:
    """Misses, false masks and mean activations of one seed's (masked) student.

    Args:
      features_params: the masked student (bias already zeroed, see :func:`attach_head`).
      beneficial_images, malicious_images: ``[N, H, W, C]`` test images.
      layer, fraction: the mask layer (``None``: the penultimate) and the share of its
        channels that is masked (:func:`masked_channels`): misses count those.

    Returns:
      ``{"misses_percent", "false_masks_percent", "malicious_mean_activation",
      "beneficial_mean_activation"}`` (scalars; means of the pre-activations).
    """
    if layer is None or (layer == model.penultimate and fraction == 1.0):
        ben = model.features_chunked(features_params, beneficial_images)
        mal = model.features_chunked(features_params, malicious_images)
    else:
        pre = lambda images: masked_channels(layer_preactivations(
            model, features_params, images, layer), fraction).reshape(images.shape[0], -1)
        ben, mal = pre(beneficial_images), pre(malicious_images)
    return {"misses_percent": misses(mal), "false_masks_percent": false_masks(ben),
            "malicious_mean_activation": jnp.mean(mal), "beneficial_mean_activation": jnp.mean(ben)}


# ----------------------------------------------------------------------------- honesty checks


def dead_percent(model: models.Model, features_params: Params, images: chex.Array
                 ) -> dict[str, jax.Array]:
    """Per features layer, the % of ``images`` whose post-ReLU activations there are ALL zero.

    A defence that masks by dead units stops every gradient below them for those
    inputs: this says where. ``images: [N, H, W, C]`` -> ``{layer: f32[]}`` for every
    layer of :func:`mask_layers` (the penultimate's ReLU is the head's).
    """
    pre = layer_preactivations(model, features_params, images, mask_layers(model))
    return {layer: 100.0 * jnp.mean(~jnp.any(a.reshape(a.shape[0], -1) > 0, axis=-1))
            for layer, a in pre.items()}


def finetune_gradient_norms(model: models.Model, params: Params, images: chex.Array,
                            labels: chex.Array) -> dict[str, jax.Array]:
    """The L2 norm, per layer, of the full fine-tune attack's loss gradient at ``params``.

    ``params``: full params with the attacker's head (e.g. :func:`probe_head`);
    ``images[N, H, W, C]``, ``labels int[N]`` the attacker's data. The loss is the
    mean cross-entropy over them. Returns ``{layer: f32[]}`` for every features layer
    and ``"head"``: zeros below a mask of dead units say the attack cannot move them.
    """
    def loss(p):
        logits = model.apply(p, images)
        return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, labels))

    grads = jax.grad(loss)(params)
    norm = lambda tree: jnp.sqrt(sum(jnp.sum(jnp.square(g)) for g in jax.tree.leaves(tree)))
    return {**{layer: norm(grads["features"][layer]) for layer in mask_layers(model)},
            "head": norm(grads["head"])}


def probe_head(model: models.Model, key: chex.PRNGKey, params: Params, num_classes: int) -> Params:
    """``params`` with a fresh ``num_classes``-way head (the full fine-tune attack's start)."""
    return {"features": params["features"],
            "head": model.init_head(jax.random.fold_in(key, streams.SKD_PROBE_HEAD), num_classes)}
