"""One attack as a pure function of one (seed, learning rate), and the compiled sweep.

:func:`make_attack` interprets an :class:`~trm_jax.attacks.specs.AttackSpec`'s stages
for ONE seed and ONE learning rate (purejaxrl style: ``make_attack(model, config) ->
attack(params, key, lr, data)``); :func:`attack_sweep` lifts it over learning rates
and seeds into ONE jitted program (epochs as ``lax.scan``, batches as the ``lax.scan``
of :func:`trm_jax.train.train_epoch`, data resident on the device). The learning rate
is a traced scalar, so it is vmapped like any other input.

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


def trains_convs(model: models.Model, config: specs.AttackConfig) -> bool:
    """True when the attack trains a convolution kernel (a rank-4 parameter)."""
    if config.frozen_features:
        return False
    trainable = specs.trainable_prefixes(model, config.attack)
    shapes = jax.eval_shape(model.init, jax.random.key(0))
    for path, leaf in jax.tree_util.tree_flatten_with_path(shapes)[0]:
        name = "/".join(str(getattr(k, "key", k)) for k in path)
        if leaf.ndim == 4 and (trainable == "all" or any(name.startswith(p) for p in trainable)):
            return True
    return False


def resolve_batching(batching: str, config: specs.AttackConfig,
                     model: models.Model | None = None) -> str:
    """``"auto"``: ``"map"`` (a sequential ``lax.map`` over the (lr, seed) grid, still one
    program) for attacks that train conv kernels on CPU; ``"vmap"`` otherwise (GPU/TPU,
    and every attack whose trained weights are dense layers). Measured on 2 CPU cores,
    digits, 3 seeds x 3 lrs x 20 epochs, first call (compile + run) / later calls:
    full_finetune vmap 5.3 / 0.97 s, map 4.7 / 1.30 s; reinit_top2 vmap 4.5 / 0.32, map
    3.6 / 0.43; head_and_penultimate vmap 3.2 / 0.24, map 4.0 / 0.48."""
    if batching not in specs.BATCHINGS:
        raise ConfigError(f"unknown batching {batching!r}; allowed: {specs.BATCHINGS}")
    if batching != "auto":
        return batching
    if model is not None and jax.default_backend() == "cpu" and trains_convs(model, config):
        return "map"
    return "vmap"


# ----------------------------------------------------------------------------- stages


def _linear(head: Params, z: jax.Array) -> jax.Array:
    """The head's dense layer without its ReLU: ``z[B, D] -> z @ W + b``."""
    return z @ head["dense"]["kernel"] + head["dense"]["bias"][None]


def _warm_start(model: models.Model, config: specs.AttackConfig, params: Params,
                optimizer: Any, data: AttackData, key: jax.Array) -> Params:
    """:class:`~trm_jax.attacks.specs.WarmStart`: every parameter with the released head on
    the beneficial fine-tuning data; returns the features."""
    loss_fn = train.classification_loss(model.apply)
    beneficial = (data.beneficial_images, data.beneficial_labels)

    def epoch(state: train.TrainState, _: None) -> tuple[train.TrainState, None]:
        return train.train_epoch(state, beneficial, loss_fn=loss_fn, optimizer=optimizer,
                                 batch_size=config.batch_size)[0], None

    state = train.init_state(key, params, optimizer)
    state, _ = jax.lax.scan(epoch, state, None, length=config.spec.warm_start_epochs)
    return state.params["features"]


def _reinit(model: models.Model, features: Params, parts: Sequence[str], key: jax.Array) -> Params:
    """:class:`~trm_jax.attacks.specs.Reinit`: the layers ``parts`` (``features/<layer>``)
    replaced by fresh ones."""
    fresh = model.init(key)["features"]
    out = dict(features)
    for part in specs.resolve_parts(model, parts):
        layer = part.split("/", 1)[1]
        out[layer] = fresh[layer]
    return out


def _preludes(model: models.Model, config: specs.AttackConfig, params: Params, base: Any,
              data: AttackData, head_key: jax.Array, shuffle_key: jax.Array) -> Params:
    """The released features after the spec's preludes (warm start, then re-init)."""
    spec, features = config.spec, params["features"]
    if spec.warm_start_epochs:
        features = _warm_start(model, config, params, base, data,
                               jax.random.fold_in(shuffle_key, streams.WARM_START))
    if spec.reinit:  # fresh layers under the fresh head
        features = _reinit(model, features, spec.reinit, jax.random.fold_in(head_key, streams.REINIT))
    return features


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
    return _prepare(model, config), _fit(model, config, return_params)


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


def _fit(model: models.Model, config: specs.AttackConfig, return_params: bool
         ) -> Callable[..., AttackOutput]:
    trainable = specs.trainable_prefixes(model, config.attack)
    chunk, spec = config.eval_batch_size, config.spec

    def fit(params: Params, inputs: tuple[jax.Array, jax.Array], key: jax.Array,
            learning_rate: jax.Array, data: AttackData) -> AttackOutput:
        train_x, test_x = inputs
        head_key, shuffle_key = jax.random.split(jax.random.fold_in(key, streams.ATTACK))
        head = model.init_head(head_key, config.num_classes)
        base = train.make_optimizer(config.optimizer, learning_rate, b1=config.b1,
                                    momentum=config.momentum)
        optimizer, mask = base, None
        if config.frozen_features:
            apply_fn, trained = (_linear if spec.standardize else model.head), head
        else:
            apply_fn = model.apply
            features = _preludes(model, config, params, base, data, head_key, shuffle_key)
            trained = {"features": features, "head": head}
            if trainable != "all":
                mask = train.trainable_mask(trained, trainable)
                optimizer = train.masked_optimizer(base, mask)
        loss_fn = train.classification_loss(apply_fn)

        def accuracy(p: Params) -> jax.Array:
            return train.evaluate(apply_fn, p, test_x, data.test_labels, chunk)["accuracy"]

        def run(state: train.TrainState, opt: Any, opt_mask: Any, length: int):
            def epoch(state: train.TrainState, _: None) -> tuple[train.TrainState, jax.Array]:
                state, _ = train.train_epoch(state, (train_x, data.finetune_labels), loss_fn=loss_fn,
                                             optimizer=opt, batch_size=config.batch_size,
                                             mask=opt_mask)
                return state, accuracy(state.params)
            return jax.lax.scan(epoch, state, None, length=length)

        accs = [accuracy(trained)[None]]
        state = train.init_state(shuffle_key, trained, optimizer)
        if spec.probe_epochs:  # Probe: the head only; FineTune then gets a fresh optimizer state
            probe_mask = train.trainable_mask(trained, ("head",))
            probe_opt = train.masked_optimizer(base, probe_mask)
            probe, probe_accs = run(train.init_state(shuffle_key, trained, probe_opt), probe_opt,
                                    probe_mask, spec.probe_epochs)
            accs.append(probe_accs)
            state = train.init_state(probe.key, probe.params, optimizer)
        state, rest = run(state, optimizer, mask, config.epochs - spec.probe_epochs)
        curve = jnp.concatenate([*accs, rest]).astype(jnp.float32)
        final = ({"features": params["features"], "head": state.params}
                 if config.frozen_features else state.params)
        return AttackOutput(curve, train.all_finite(state.params), final if return_params else None)

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


def _vmap_sweep(model: models.Model, config: specs.AttackConfig, return_params: bool):
    prepare, fit = attack_phases(model, config, return_params=return_params)
    over_lrs = jax.vmap(fit, in_axes=(None, None, None, 0, None))
    over_seeds = jax.vmap(over_lrs, in_axes=(0, 0, 0, None, None))
    shared_inputs = jax.vmap(over_lrs, in_axes=(0, None, 0, None, None))
    # Per-seed conv weights under vmap become grouped convolutions, which XLA:CPU runs
    # ~25% slower than a loop of plain ones: on CPU, prepare seed by seed.
    map_prepare = config.frozen_features and jax.default_backend() == "cpu"

    def sweep(params, keys, lrs, data):
        if not config.frozen_features:  # the images: the same for every seed
            out = shared_inputs(params, prepare(None, data), keys, lrs, data)
        else:
            inputs = (jax.lax.map(lambda p: prepare(p, data), params) if map_prepare
                      else jax.vmap(prepare, in_axes=(0, None))(params, data))
            out = over_seeds(params, inputs, keys, lrs, data)  # [S, L, ...]
        return jax.tree.map(lambda x: jnp.swapaxes(x, 0, 1), out)

    return sweep


def _map_sweep(model: models.Model, config: specs.AttackConfig, return_params: bool):
    one = make_attack(model, config, return_params=return_params)

    def sweep(params, keys, lrs, data):
        num_seeds, num_lrs = keys.shape[0], lrs.shape[0]
        seed_idx = jnp.tile(jnp.arange(num_seeds), num_lrs)  # lr-major: [L * S]
        lr_idx = jnp.repeat(jnp.arange(num_lrs), num_seeds)

        def body(idx):
            s, l = idx
            return one(jax.tree.map(lambda x: x[s], params), keys[s], lrs[l], data)

        out = jax.lax.map(body, (seed_idx, lr_idx))
        return jax.tree.map(lambda x: x.reshape(num_lrs, num_seeds, *x.shape[1:]), out)

    return sweep


_SWEEPS_LOCK = threading.Lock()  # sweeps may be built from several threads (suite.run_plan)


def compiled_sweep(model: models.Model, config: specs.AttackConfig, batching: str,
                   return_params: bool = False) -> Callable[..., AttackOutput]:
    """The jitted sweep of ``(model, config, batching)`` (cached), built once even when several
    threads ask at once: ``(params[S,...], keys[S], lrs f32[L], data) -> AttackOutput[L, S]``.

    ``batching="vmap"``: ``vmap`` over seeds of ``vmap`` over learning rates; a linear probe's
    features (seed-dependent only) are computed once per seed. ``"map"``: a ``lax.map`` over
    the flattened ``L * S`` grid inside the same program.
    """
    with _SWEEPS_LOCK:
        return _compiled_sweep(model, config, batching, return_params)


@functools.lru_cache(maxsize=64)
def _compiled_sweep(model: models.Model, config: specs.AttackConfig, batching: str,
                    return_params: bool = False) -> Callable[..., AttackOutput]:
    builders = {"vmap": _vmap_sweep, "map": _map_sweep}
    if batching not in builders:
        raise ConfigError(f"batching must be 'vmap' or 'map' here, got {batching!r}")
    return compilation.jit(builders[batching](model, config, return_params))


def attack_sweep(model: models.Model, params: Params, keys: jax.Array,
                 learning_rates: Sequence[float], data: AttackData, config: specs.AttackConfig, *,
                 batching: str = "auto", return_params: bool = False) -> AttackOutput:
    """Runs one attack for every (learning rate, seed) in ONE compiled program.

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
    # The attack drops the model's head for a fresh ``config.num_classes`` one: models (and
    # params) that differ only in their head (UNSIR's 10-way model) share one compiled sweep.
    # A warm start first trains the released model, its own head included: it keeps it.
    if not config.spec.warm_start_epochs:
        model = dataclasses.replace(model, num_classes=config.num_classes)
        params = {"features": params["features"]}
    params, keys, data = place(params, keys, data)
    fn = compiled_sweep(model, config, batching, return_params)
    # Several processes: every process gets the whole [L, S] output (one process: as is).
    return sharding.gather(fn(params, keys, jnp.asarray(lrs, jnp.float32), data))


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
