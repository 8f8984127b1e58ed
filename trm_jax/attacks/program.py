"""One attack as a pure function of one (seed, learning rate), and the compiled sweep.

:func:`make_attack` interprets an :class:`~trm_jax.attacks.specs.AttackSpec`'s stages
for ONE seed and ONE learning rate (purejaxrl style: ``make_attack(model, config) ->
attack(params, key, lr, data)``); :func:`attack_sweep` lifts it over learning rates
and seeds into ONE jitted program (epochs as ``lax.scan``, batches as the ``lax.scan``
of :func:`trm_jax.train.train_epoch`, data resident on the device). The learning rate
is a traced scalar, so it is vmapped like any other input; so are a fine-tuning
attack's stages (:class:`Stages`), so that every attack but a precomputed linear probe
shares one compiled program per model and optimizer, or one of two when the attack keeps
the lower half frozen (no backward pass there; :func:`frozen_lower_half`); a digits
suite compiled 10 sweeps before, 6 now, with the same curves.

Keys: ``head_key, shuffle_key = split(fold_in(key, streams.ATTACK))``; the fresh head
comes from ``head_key`` (shared by all learning rates of a seed), re-initialised layers
from ``fold_in(head_key, streams.REINIT)``, the warm start's shuffles from
``fold_in(shuffle_key, streams.WARM_START)``.
"""
from __future__ import annotations

import dataclasses
import functools
import threading
from typing import Any, Callable, NamedTuple, Sequence

import chex
import jax
import jax.numpy as jnp
import numpy as np

from trm_jax import compilation, models, sharding, streams, train
from trm_jax.attacks import specs
from trm_jax.attacks.budgets import AttackData
from trm_jax.errors import ConfigError
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


def resolve_batching(batching: str, config: specs.AttackConfig,
                     model: models.Model | None = None) -> str:
    """``"auto"``: on CPU, ``"map"`` (a sequential ``lax.map`` over the (lr, seed) grid, still
    one program) when the attack's program computes a conv kernel's gradient (the shared
    fine-tuning program does, unless the attack keeps the lower half frozen:
    :func:`frozen_lower_half`); ``"vmap"`` otherwise and on GPU/TPU. Measured on 2 CPU
    cores, digits, 3 seeds x 3 lrs x 20 epochs, first call (compile + run) / later calls:
    full_finetune vmap 5.3 / 0.97 s, map 4.7 / 1.30 s; reinit_top2 vmap 4.5 / 0.32, map
    3.6 / 0.43; head_and_penultimate vmap 3.2 / 0.24, map 4.0 / 0.48."""
    if batching not in specs.BATCHINGS:
        raise ConfigError(f"unknown batching {batching!r}; allowed: {specs.BATCHINGS}")
    if batching != "auto":
        return batching
    if (model is not None and jax.default_backend() == "cpu" and not config.frozen_features
            and _conv_outside(model, frozen_lower_half(model, config))):
        return "map"
    return "vmap"


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


def _conv_outside(model: models.Model, frozen: tuple[str, ...]) -> bool:
    """Whether a conv kernel (a rank-4 parameter) lies outside the ``frozen`` layers."""
    shapes = model.param_shapes()["features"]
    return any(leaf.ndim == 4 for name, layer in shapes.items() if name not in frozen
               for leaf in jax.tree.leaves(layer))


def _program_config(config: specs.AttackConfig) -> specs.AttackConfig:
    """The compiled program's key: a fine-tuning attack's name and stages are runtime
    inputs (:class:`Stages`), so every one of them maps to the same config."""
    if config.frozen_features:
        return config
    return dataclasses.replace(config, attack="full_finetune", precompute_features=True)


# ----------------------------------------------------------------------------- stages


def _attack_keys(key: jax.Array) -> tuple[jax.Array, jax.Array]:
    """``(head_key, shuffle_key)`` of one seed's attack."""
    head_key, shuffle_key = jax.random.split(jax.random.fold_in(key, streams.ATTACK))
    return head_key, shuffle_key


def _linear(head: Params, z: jax.Array) -> jax.Array:
    """The head's dense layer without its ReLU: ``z[B, D] -> z @ W + b``."""
    return z @ head["dense"]["kernel"] + head["dense"]["bias"][None]


def _warm_start(model: models.Model, config: specs.AttackConfig, params: Params, key: jax.Array,
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
        return _prepare(model, config), _probe_fit(model, config, return_params)
    tune = _tune_fit(model, config, return_params, frozen_lower_half(model, config))
    stages = stage_arrays(model, config)

    def fit(params: Params, inputs: Any, key: jax.Array, learning_rate: jax.Array,
            data: AttackData) -> AttackOutput:
        features = (_warm_start(model, config, params, key, learning_rate, data)
                    if config.spec.warm_start_epochs else params["features"])
        return tune(features, key, learning_rate, data, stages)

    return _prepare(model, config), fit


def _prepare(model: models.Model, config: specs.AttackConfig
             ) -> Callable[[Params, AttackData], tuple[jax.Array, jax.Array]]:
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


def _probe_fit(model: models.Model, config: specs.AttackConfig, return_params: bool
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


def _tune_fit(model: models.Model, config: specs.AttackConfig, return_params: bool,
              frozen: tuple[str, ...] = ()) -> Callable[..., AttackOutput]:
    """Every fine-tuning attack: ``fit(features, key, lr, data, stages) -> AttackOutput``.

    A fresh head; the :class:`Stages`' ``reinit`` leaves replaced by a fresh init
    (``fold_in(head_key, streams.REINIT)``); ``probe_epochs`` of the head alone; then the
    ``trainable`` leaves, with a fresh optimizer state after a probe. Masks are selects,
    so frozen leaves keep their bits and one program serves every attack. ``frozen``
    layers (the stages must freeze them too) get no gradient at all: XLA drops the
    backward pass below the lowest trained layer.
    """
    classify = train.classification_loss(model.apply)

    def loss_fn(params: Params, batch: Any) -> Any:
        features = {n: jax.lax.stop_gradient(v) if n in frozen else v
                    for n, v in params["features"].items()}
        return classify({**params, "features": features}, batch)

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
      learning_rate: ``f32[]``, may be traced (validate it before: :func:`attack_sweep` does).
      data: :class:`~trm_jax.attacks.budgets.AttackData`.
    """
    prepare, fit = attack_phases(model, config, return_params=return_params)

    def attack(params: Params, key: jax.Array, learning_rate: jax.Array,
               data: AttackData) -> AttackOutput:
        return fit(params, prepare(params, data), key, learning_rate, data)

    return attack


# ----------------------------------------------------------------------------- sweeps
# A sweep maps a per-(seed, lr) function over seeds x lrs in one program: ``vmap`` of
# ``vmap``, or one ``lax.map`` over the flattened grid (lr-major). Outputs are ``[L, S, ...]``.


def _grid(fn: Callable, batching: str, per_lr: bool) -> Callable:
    """``fn(arg, key, lr, *shared)`` over ``arg[S, ...]`` (``[S, L, ...]`` if ``per_lr``),
    ``keys[S]``, ``lrs[L]``; ``shared`` arguments are the same for every grid point."""
    if batching == "vmap":
        def swept(arg, keys, lrs, *shared):
            rest = (None,) * len(shared)
            over_lrs = jax.vmap(fn, in_axes=(0 if per_lr else None, None, 0, *rest))
            over_seeds = jax.vmap(over_lrs, in_axes=(0, 0, None, *rest))
            return jax.tree.map(lambda x: jnp.swapaxes(x, 0, 1), over_seeds(arg, keys, lrs, *shared))
        return swept

    def mapped(arg, keys, lrs, *shared):
        num_seeds, num_lrs = keys.shape[0], lrs.shape[0]

        def body(idx: tuple[jax.Array, jax.Array]) -> Any:
            s, l = idx
            one = jax.tree.map(lambda x: x[s, l] if per_lr else x[s], arg)
            return fn(one, keys[s], lrs[l], *shared)

        out = jax.lax.map(body, (jnp.tile(jnp.arange(num_seeds), num_lrs),
                                 jnp.repeat(jnp.arange(num_lrs), num_seeds)))
        return jax.tree.map(lambda x: x.reshape(num_lrs, num_seeds, *x.shape[1:]), out)
    return mapped


def _probe_sweep(model: models.Model, config: specs.AttackConfig, batching: str,
                 return_params: bool) -> Callable[..., AttackOutput]:
    """``(params[S], keys[S], lrs[L], data) -> AttackOutput[L, S]``; under ``vmap`` the
    features are computed once per seed, seed by seed on CPU (per-seed conv weights under
    vmap become grouped convolutions, which XLA:CPU runs ~25% slower)."""
    prepare, fit = _prepare(model, config), _probe_fit(model, config, return_params)
    if batching == "map":
        return _grid(lambda p, key, lr, data: fit(p, prepare(p, data), key, lr, data), "map", False)
    over_grid = _grid(lambda pi, key, lr, data: fit(pi[0], pi[1], key, lr, data), "vmap", False)

    def sweep(params, keys, lrs, data):
        inputs = (jax.lax.map(lambda p: prepare(p, data), params) if jax.default_backend() == "cpu"
                  else jax.vmap(prepare, in_axes=(0, None))(params, data))
        return over_grid((params, inputs), keys, lrs, data)

    return sweep


_SWEEPS_LOCK = threading.Lock()  # sweeps may be built from several threads (suite.run_plan)


def compiled_sweep(model: models.Model, config: specs.AttackConfig, batching: str,
                   return_params: bool = False) -> Callable[..., AttackOutput]:
    """The jitted sweep of ``(model, config, batching)`` (cached; built once even when several
    threads ask at once), ``batching`` ``"vmap"`` or ``"map"``:

    * a precomputed linear probe: ``(params[S, ...], keys[S], lrs f32[L], data) ->
      AttackOutput[L, S]``;
    * every other attack: ``(features[S, L, ...], keys[S], lrs f32[L], data, stages) ->
      AttackOutput[L, S]``, one program for all of them (:class:`Stages` are inputs);
      ``features`` are the released ones repeated over lrs, or a warm start's; and a
      second one, ``features[S, ...]``, for those that keep the lower half frozen
      (:func:`frozen_lower_half`).
    """
    with _SWEEPS_LOCK:
        return _compiled_sweep(model, _program_config(config), batching, return_params,
                               frozen_lower_half(model, config))


@functools.lru_cache(maxsize=64)
def _compiled_sweep(model: models.Model, config: specs.AttackConfig, batching: str,
                    return_params: bool = False, frozen: tuple[str, ...] = ()
                    ) -> Callable[..., AttackOutput]:
    if batching not in ("vmap", "map"):
        raise ConfigError(f"batching must be 'vmap' or 'map' here, got {batching!r}")
    if config.frozen_features:
        return compilation.jit(_probe_sweep(model, config, batching, return_params))
    # Features [S, L, ...] (a warm start's differ per lr), or [S, ...] when the lower half
    # stays frozen: vmap then computes it once per seed for every lr.
    fit = _tune_fit(model, config, return_params, frozen)
    return compilation.jit(_grid(fit, batching, per_lr=not frozen))


@functools.lru_cache(maxsize=16)
def _compiled_warm_start(model: models.Model, config: specs.AttackConfig, batching: str
                         ) -> Callable[..., Params]:
    """``(params[S], keys[S], lrs[L], data) -> features[S, L, ...]`` after the warm start."""
    warm = _grid(lambda p, key, lr, data: _warm_start(model, config, p, key, lr, data),
                 batching, False)
    return compilation.jit(lambda *args: jax.tree.map(lambda x: jnp.swapaxes(x, 0, 1), warm(*args)))


@functools.partial(compilation.jit, static_argnums=1)
def _repeat_over_lrs(features: Params, num_lrs: int) -> Params:
    """``[S, ...] -> [S, L, ...]``: every learning rate starts from the released features."""
    return jax.tree.map(lambda x: jnp.broadcast_to(x[:, None], (x.shape[0], num_lrs, *x.shape[1:])),
                        features)


def attack_sweep(model: models.Model, params: Params, keys: jax.Array,
                 learning_rates: Sequence[float], data: AttackData, config: specs.AttackConfig, *,
                 batching: str = "auto", return_params: bool = False) -> AttackOutput:
    """Runs one attack for every (learning rate, seed) in ONE compiled program, which every
    fine-tuning attack of the suite shares (:func:`compiled_sweep`).

    Args:
      model: the architecture.
      params: ``[S, ...]`` stack of models to attack.
      keys: ``[S]`` PRNG keys, one per seed.
      learning_rates: ``L`` values, each finite and > 0.
      data: :class:`~trm_jax.attacks.budgets.AttackData` (``attack_data(protocol)``).
      config: the attack.
      batching: ``"vmap"``, ``"map"`` or ``"auto"`` (:func:`resolve_batching`).
      return_params: also return the attacked params ``[L, S, ...]``.

    Returns:
      :class:`AttackOutput` with ``curve: f32[L, S, E+1]``, ``finite: bool[L, S]``.

    Raises:
      ConfigError: bad learning rates, batch size, shapes or batching, before compiling.
    """
    lrs = specs.validate_learning_rates(learning_rates)
    check_inputs(model, params, keys, data, config)
    batching = resolve_batching(batching, config, model)
    params, keys, data = place(params, keys, data)
    lrs = jnp.asarray(lrs, jnp.float32)
    if config.frozen_features:
        # The attack drops the model's head for a fresh ``config.num_classes`` one: models
        # that differ only in their head (UNSIR's 10-way model) share one compiled sweep.
        model = dataclasses.replace(model, num_classes=config.num_classes)
        out = compiled_sweep(model, config, batching, return_params)(
            {"features": params["features"]}, keys, lrs, data)
        return sharding.gather(out)
    if config.spec.warm_start_epochs:  # trains the released model, its own head included
        features = _compiled_warm_start(model, config, batching)(params, keys, lrs, data)
    elif frozen_lower_half(model, config):
        features = params["features"]
    else:
        features = _repeat_over_lrs(params["features"], int(lrs.shape[0]))
    model = dataclasses.replace(model, num_classes=config.num_classes)
    out = compiled_sweep(model, config, batching, return_params)(
        features, keys, lrs, data, stage_arrays(model, config))
    # Several processes: every process gets the whole [L, S] output (one process: as is).
    return sharding.gather(out)


def check_inputs(model: models.Model, params: Params, keys: jax.Array, data: AttackData,
                 config: specs.AttackConfig) -> None:
    """Shape checks at the boundary (``chex``) with messages naming what is allowed."""
    specs.validate_config(config)
    if keys.ndim != 1:
        raise ConfigError(f"keys must be a [S] stack of PRNG keys (jax.random.key), got shape "
                          f"{keys.shape}")
    num_seeds = int(keys.shape[0])
    if params is None:
        raise ConfigError(f"attack {config.attack!r} needs params (a [S, ...] stack of models)")
    shapes = {jax.tree_util.keystr(path): tuple(x.shape)
              for path, x in jax.tree_util.tree_flatten_with_path(params)[0]}
    bad = {k: v for k, v in shapes.items() if not v or v[0] != num_seeds}
    if bad:
        raise ConfigError(f"params must be a stack with a leading seed axis of {num_seeds} (one per "
                          f"key); leaves with other shapes: {bad}")
    n = data.num_finetune
    if config.batch_size > n:
        raise ConfigError(f"batch_size={config.batch_size} exceeds the {n} malicious fine-tuning "
                          f"examples; allowed: 1..{n}")
    chex.assert_equal_shape_prefix([data.finetune_images, data.finetune_labels], 1)
    chex.assert_equal_shape_prefix([data.test_images, data.test_labels], 1)
    if config.spec.warm_start_epochs and (data.beneficial_images is None or
                                          config.batch_size > data.beneficial_labels.shape[0]):
        raise ConfigError(f"attack {config.attack!r} trains on the beneficial fine-tuning data "
                          f"first: AttackData needs beneficial_images/labels (attack_data(protocol) "
                          f"gives them) with at least batch_size={config.batch_size} examples")
    if tuple(data.finetune_images.shape[1:]) != tuple(model.input_shape):
        raise ConfigError(f"images of shape {data.finetune_images.shape[1:]} do not fit the model's "
                          f"input_shape {model.input_shape}")


def place(params: Params, keys: jax.Array, data: AttackData
          ) -> tuple[Params, jax.Array, AttackData]:
    """Seeds across devices (:mod:`trm_jax.sharding`): with several devices that divide
    ``S``, params and keys are sharded on the seed axis and the data is replicated.
    Otherwise params and keys are committed to the default device, so params fresh from
    ``init`` and params restored from a checkpoint hit the same compiled program (jit's
    cache tells committed arrays apart)."""
    num_seeds = int(keys.shape[0])
    if sharding.can_shard(num_seeds):
        return (sharding.shard_seeds(params), sharding.shard_seeds(keys),
                sharding.replicate(data, num_seeds))
    params, keys = jax.device_put((params, keys), jax.devices()[0])
    return params, keys, data
