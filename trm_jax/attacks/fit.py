"""One attack as a pure function of one (seed, learning rate).

:func:`make_attack` interprets an :class:`~trm_jax.attacks.specs.AttackSpec`'s stages
for ONE seed and ONE learning rate (purejaxrl style: ``make_attack(model, config) ->
attack(params, key, lr, data)``): epochs as ``lax.scan``, batches as the ``lax.scan`` of
:func:`trm_jax.train.train_epoch`. The learning rate may be traced, and so may a
fine-tuning attack's stages (:class:`Stages`): every attack but a precomputed linear
probe is :func:`tune_fit` with other stage arrays, so the sweeps of
:mod:`trm_jax.attacks.program` compile one program for all of them (or one of two, when
the attack keeps the lower half frozen: :func:`frozen_lower_half`).

Keys: ``head_key, shuffle_key = split(fold_in(key, streams.ATTACK))``; the fresh head
comes from ``head_key`` (shared by all learning rates of a seed), re-initialised layers
from ``fold_in(head_key, streams.REINIT)``, the warm start's shuffles from
``fold_in(shuffle_key, streams.WARM_START)``.
"""
from __future__ import annotations

import functools
from typing import Any, Callable, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from trm_jax import models, streams, train
from trm_jax.attacks import specs
from trm_jax.attacks.budgets import AttackData
from trm_jax.typing import Params


class AttackOutput(NamedTuple):
    """What an attack returns; a sweep adds leading ``[L, S]`` axes to every field.

    Attributes:
      curve: ``f32[E+1]`` malicious test accuracy, ``curve[0]`` before fine-tuning.
      finite: ``bool[]`` whether every parameter stayed finite (False: diverged).
      params: the attacked model ``{"features", "head"}`` after fine-tuning, or
        ``None`` unless requested (``return_params=True``).
    """

    curve: jax.Array
    finite: jax.Array
    params: Params | None = None


class Stages(NamedTuple):
    """A fine-tuning attack's stages as runtime arrays (a pytree): every attack that is not
    a precomputed :class:`~trm_jax.attacks.specs.LinearProbe` runs in ONE compiled program
    per model and optimizer, with its stages as inputs (:func:`stage_arrays`).

    Attributes:
      trainable: ``bool[]`` per leaf of ``{"features", "head"}``: trained by the
        :class:`~trm_jax.attacks.specs.FineTune` stage; the others keep their bits.
      reinit: ``bool[]`` per leaf of the features: replaced by fresh values first
        (:class:`~trm_jax.attacks.specs.Reinit`).
      probe_epochs: ``int32[]``: the first epochs train the head alone, then the optimizer
        state starts afresh (:class:`~trm_jax.attacks.specs.Probe`); 0: no probe.
    """

    trainable: Params
    reinit: Params
    probe_epochs: jax.Array


@functools.lru_cache(maxsize=256)
def stage_arrays(model: models.Model, config: specs.AttackConfig) -> Stages:
    """The :class:`Stages` of ``config``'s attack on ``model`` (no compute; cached, do not
    mutate)."""
    shapes = model.param_shapes()
    trained = {"features": shapes["features"],
               "head": jax.eval_shape(lambda k: model.init_head(k, config.num_classes),
                                      jax.random.key(0))}
    as_array = lambda tree: jax.tree.map(lambda m: np.asarray(m, bool), tree)
    reinit = (train.trainable_mask(shapes["features"], _layer_prefixes(model, config.spec.reinit))
              if config.spec.reinit else jax.tree.map(lambda _: False, shapes["features"]))
    return Stages(as_array(train.trainable_mask(trained, specs.trainable_prefixes(model, config.attack))),
                  as_array(reinit), np.asarray(config.spec.probe_epochs, np.int32))


def _layer_prefixes(model: models.Model, parts: Sequence[str]) -> tuple[str, ...]:
    """``Reinit`` parts as prefixes inside the features tree (``features/fc2`` -> ``fc2``)."""
    return tuple(p.split("/", 1)[1] for p in specs.resolve_parts(model, parts))


def trains_convs(model: models.Model, config: specs.AttackConfig) -> bool:
    """True when the attack trains a convolution kernel (a rank-4 parameter)."""
    if config.frozen_features:
        return False
    trainable = specs.trainable_prefixes(model, config.attack)
    shapes = model.param_shapes()
    for path, leaf in jax.tree_util.tree_flatten_with_path(shapes)[0]:
        name = "/".join(str(getattr(k, "key", k)) for k in path)
        if leaf.ndim == 4 and (trainable == "all" or any(name.startswith(p) for p in trainable)):
            return True
    return False


def frozen_lower_half(model: models.Model, config: specs.AttackConfig) -> tuple[str, ...]:
    """The lower half of ``model``'s features layers (param names) when the attack neither
    trains, re-initialises nor warm-starts any of them, else ``()``. Such attacks (most
    reuse attacks) share a second fine-tuning program that computes no gradient below the
    upper half, and (under ``vmap``) runs the frozen layers once per seed, not per lr."""
    if config.frozen_features or config.spec.warm_start_epochs:
        return ()
    layers = model.feature_layers
    lower = tuple(n for layer in layers[:len(layers) // 2] for n in layer)
    trainable = specs.trainable_prefixes(model, config.attack)
    if trainable == "all":
        return ()
    touched = (*trainable, *specs.resolve_parts(model, config.spec.reinit))
    if any(_overlaps(p, f"features/{n}") for p in touched for n in lower):
        return ()
    return lower


def _overlaps(prefix: str, path: str) -> bool:
    """Whether the param-path ``prefix`` selects anything under ``path`` (or above it)."""
    return prefix in ("all", path) or path.startswith(prefix + "/") or prefix.startswith(path + "/")


def conv_outside(model: models.Model, frozen: tuple[str, ...]) -> bool:
    """Whether a conv kernel (a rank-4 parameter) lies outside the ``frozen`` layers."""
    shapes = model.param_shapes()["features"]
    return any(leaf.ndim == 4 for name, layer in shapes.items() if name not in frozen
               for leaf in jax.tree.leaves(layer))




def _attack_keys(key: jax.Array) -> tuple[jax.Array, jax.Array]:
    """``(head_key, shuffle_key)`` of one seed's attack."""
    head_key, shuffle_key = jax.random.split(jax.random.fold_in(key, streams.ATTACK))
    return head_key, shuffle_key


def _linear(head: Params, z: jax.Array) -> jax.Array:
    """The head's dense layer without its ReLU: ``z[B, D] -> z @ W + b``."""
    return z @ head["dense"]["kernel"] + head["dense"]["bias"][None]


def warm_start(model: models.Model, config: specs.AttackConfig, params: Params, key: jax.Array,
                learning_rate: jax.Array, data: AttackData) -> Params:
    """:class:`~trm_jax.attacks.specs.WarmStart`: every parameter with the released head on
    the beneficial fine-tuning data (the attack's optimizer and learning rate); returns
    the features."""
    loss_fn = train.classification_loss(model.apply)
    optimizer = _optimizer(config, learning_rate)
    beneficial = (data.beneficial_images, data.beneficial_labels)

    def epoch(state: train.TrainState, _: None) -> tuple[train.TrainState, None]:
        return train.train_epoch(state, beneficial, loss_fn=loss_fn, optimizer=optimizer,
                                 batch_size=config.batch_size)[0], None

    shuffle_key = jax.random.fold_in(_attack_keys(key)[1], streams.WARM_START)
    state = train.init_state(shuffle_key, params, optimizer)
    state, _ = jax.lax.scan(epoch, state, None, length=config.spec.warm_start_epochs)
    return state.params["features"]


def _optimizer(config: specs.AttackConfig, learning_rate: jax.Array) -> Any:
    return train.make_optimizer(config.optimizer, learning_rate, b1=config.b1,
                                momentum=config.momentum)


def attack_phases(model: models.Model, config: specs.AttackConfig, *, return_params: bool = False
                  ) -> tuple[Callable[[Params, AttackData], tuple[jax.Array, jax.Array]],
                             Callable[..., AttackOutput]]:
    """The attack in two pure phases, ``(prepare, fit)``:

    * ``prepare(params, data) -> (train_inputs, test_inputs)``: for a
      :class:`~trm_jax.attacks.specs.LinearProbe` the features ``f[N, D]``, ``f[T, D]``
      of the fine-tuning and test images (depends on the seed only, never on the
      learning rate, so a sweep computes it once per seed); else the images.
    * ``fit(params, inputs, key, learning_rate, data) -> AttackOutput``.
    """
    specs.validate_config(config)
    if config.frozen_features:
        return prepare_fn(model, config), probe_fit(model, config, return_params)
    tune = tune_fit(model, config, return_params, frozen_lower_half(model, config))
    stages = stage_arrays(model, config)

    def fit(params: Params, inputs: Any, key: jax.Array, learning_rate: jax.Array,
            data: AttackData) -> AttackOutput:
        features = (warm_start(model, config, params, key, learning_rate, data)
                    if config.spec.warm_start_epochs else params["features"])
        return tune(features, key, learning_rate, data, stages)

    return prepare_fn(model, config), fit


def prepare_fn(model: models.Model, config: specs.AttackConfig
               ) -> Callable[[Params, AttackData], tuple[jax.Array, jax.Array]]:
    """``prepare(params, data) -> (train_inputs, test_inputs)`` of :func:`attack_phases`."""
    chunk, spec = config.eval_batch_size, config.spec

    def prepare(params: Params, data: AttackData) -> tuple[jax.Array, jax.Array]:
        if not config.frozen_features:
            return data.finetune_images, data.test_images
        train_f = model.features_chunked(params["features"], data.finetune_images, chunk)
        test_f = model.features_chunked(params["features"], data.test_images, chunk)
        if spec.standardize:  # the attacker's statistics, applied to its test features too
            mu = train_f.mean(axis=0, keepdims=True)
            sd = jnp.maximum(train_f.std(axis=0, keepdims=True), 1e-6)
            train_f, test_f = (train_f - mu) / sd, (test_f - mu) / sd
        return train_f, test_f

    return prepare


def _epochs(state: train.TrainState, length: int, epoch_fn: Callable, accuracy: Callable
            ) -> tuple[train.TrainState, jax.Array]:
    """``length`` epochs under ``lax.scan``: ``curve f32[length + 1]`` (before, then after
    each epoch)."""
    def body(state: train.TrainState, e: jax.Array) -> tuple[train.TrainState, jax.Array]:
        state = epoch_fn(state, e)
        return state, accuracy(state.params)

    first = accuracy(state.params)[None]
    state, rest = jax.lax.scan(body, state, jnp.arange(length))
    return state, jnp.concatenate([first, rest]).astype(jnp.float32)


def probe_fit(model: models.Model, config: specs.AttackConfig, return_params: bool
               ) -> Callable[..., AttackOutput]:
    """A linear probe on features computed once: ``fit(params, (train_f, test_f), key, lr, data)``."""
    apply_fn = _linear if config.spec.standardize else model.head
    loss_fn = train.classification_loss(apply_fn)

    def fit(params: Params, inputs: tuple[jax.Array, jax.Array], key: jax.Array,
            learning_rate: jax.Array, data: AttackData) -> AttackOutput:
        train_f, test_f = inputs
        head_key, shuffle_key = _attack_keys(key)
        optimizer = _optimizer(config, learning_rate)

        def epoch(state: train.TrainState, _: jax.Array) -> train.TrainState:
            return train.train_epoch(state, (train_f, data.finetune_labels), loss_fn=loss_fn,
                                     optimizer=optimizer, batch_size=config.batch_size)[0]

        accuracy = lambda p: train.evaluate(apply_fn, p, test_f, data.test_labels,
                                            config.eval_batch_size)["accuracy"]
        state = train.init_state(shuffle_key, model.init_head(head_key, config.num_classes), optimizer)
        state, curve = _epochs(state, config.epochs, epoch, accuracy)
        final = {"features": params["features"], "head": state.params}
        return AttackOutput(curve, train.all_finite(state.params), final if return_params else None)

    return fit


def tune_fit(model: models.Model, config: specs.AttackConfig, return_params: bool,
              frozen: tuple[str, ...] = ()) -> Callable[..., AttackOutput]:
    """Every fine-tuning attack: ``fit(features, key, lr, data, stages) -> AttackOutput``.

    A fresh head; the :class:`Stages`' ``reinit`` leaves replaced by a fresh init
    (``fold_in(head_key, streams.REINIT)``); ``probe_epochs`` of the head alone; then the
    ``trainable`` leaves, with a fresh optimizer state after a probe. Masks are selects,
    so frozen leaves keep their bits and one program serves every attack. ``frozen``
    layers (the stages must freeze them too) get no gradient at all: XLA drops the
    backward pass below the lowest trained layer. In the general program (no ``frozen``
    layers), the probe epochs are a ``lax.cond`` branch with no backward pass below the
    head: LP-FT's sweep on mnist5k 12.4 -> 9.8 s, for ~0.4 s more compilation.
    """
    classify = train.classification_loss(model.apply)

    def loss_fn(params: Params, batch: Any) -> Any:
        features = {n: jax.lax.stop_gradient(v) if n in frozen else v
                    for n, v in params["features"].items()}
        return classify({**params, "features": features}, batch)

    def head_loss(params: Params, batch: Any) -> Any:
        return classify({**params, "features": jax.lax.stop_gradient(params["features"])}, batch)

    def fit(features: Params, key: jax.Array, learning_rate: jax.Array, data: AttackData,
            stages: Stages) -> AttackOutput:
        head_key, shuffle_key = _attack_keys(key)
        fresh = model.init(jax.random.fold_in(head_key, streams.REINIT))["features"]
        features = jax.tree.map(jnp.where, stages.reinit, fresh, features)
        trained = {"features": features, "head": model.init_head(head_key, config.num_classes)}
        head_only = {"features": jax.tree.map(lambda _: False, features),
                     "head": jax.tree.map(lambda _: True, trained["head"])}
        optimizer = _optimizer(config, learning_rate)

        def epoch(state: train.TrainState, e: jax.Array) -> train.TrainState:
            probing = e < stages.probe_epochs
            mask = jax.tree.map(lambda h, t: jnp.where(probing, h, t), head_only, stages.trainable)
            # Statically frozen layers: a Python False keeps the very input (not a select
            # whose result vmap would batch over lrs), so they run once per seed.
            mask["features"] = {n: jax.tree.map(lambda _: False, v) if n in frozen else v
                                for n, v in mask["features"].items()}
            restart = (e == stages.probe_epochs) & (stages.probe_epochs > 0)
            opt_state = jax.tree.map(lambda new, old: jnp.where(restart, new, old),
                                     optimizer.init(state.params), state.opt_state)
            return train.train_epoch(state._replace(opt_state=opt_state),
                                     (data.finetune_images, data.finetune_labels), loss_fn=loss_fn,
                                     optimizer=optimizer, batch_size=config.batch_size, mask=mask)[0]

        def probe_epoch(state: train.TrainState, e: jax.Array) -> train.TrainState:
            return train.train_epoch(state, (data.finetune_images, data.finetune_labels),
                                     loss_fn=head_loss, optimizer=optimizer,
                                     batch_size=config.batch_size, mask=head_only)[0]

        if not frozen:
            # The general program: the probe epochs skip the backward pass below the head
            # (the predicate is the same for every lr and seed: only one branch runs).
            tune_epoch = epoch
            epoch = lambda state, e: jax.lax.cond(e < stages.probe_epochs, probe_epoch,
                                                  tune_epoch, state, e)
        accuracy = lambda p: train.evaluate(model.apply, p, data.test_images, data.test_labels,
                                            config.eval_batch_size)["accuracy"]
        state = train.init_state(shuffle_key, trained, optimizer)
        state, curve = _epochs(state, config.epochs, epoch, accuracy)
        return AttackOutput(curve, train.all_finite(state.params),
                            state.params if return_params else None)

    return fit


def make_attack(model: models.Model, config: specs.AttackConfig, *, return_params: bool = False
                ) -> Callable[[Params, jax.Array, jax.Array, AttackData], AttackOutput]:
    """Builds the attack for ONE seed and ONE learning rate (pure; vmap it).

    ``attack(params, key, learning_rate, data) -> AttackOutput``: the spec's preludes, a
    fresh head ``model.init_head(head_key, num_classes)``, then ``epochs`` x
    :func:`trm_jax.train.train_epoch` (cross-entropy, a fresh shuffle each epoch,
    parameters outside :func:`~trm_jax.attacks.specs.trainable_prefixes` bitwise
    frozen) under ``lax.scan``; ``curve[e]`` = malicious test accuracy after ``e``
    epochs (``e = 0``: before). It is ``fit(params, prepare(params, data), ...)`` of
    :func:`attack_phases`.

    Args (of ``attack``):
      params: ``{"features", "head"}`` of one model (its head is dropped).
      key: a PRNG key.
      learning_rate: ``f32[]``, may be traced (validate it before: :func:`~trm_jax.attacks.program.attack_sweep` does).
      data: :class:`~trm_jax.attacks.budgets.AttackData`.
    """
    prepare, fit = attack_phases(model, config, return_params=return_params)

    def attack(params: Params, key: jax.Array, learning_rate: jax.Array,
               data: AttackData) -> AttackOutput:
        return fit(params, prepare(params, data), key, learning_rate, data)

    return attack
