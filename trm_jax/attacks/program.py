"""The compiled sweep: one attack over every (learning rate, seed) in ONE jitted program.

:func:`attack_sweep` lifts :mod:`trm_jax.attacks.fit`'s per-(seed, lr) attack over
learning rates and seeds (``vmap`` of ``vmap``, or one ``lax.map`` over the grid), data
resident on the device. The learning rate and a fine-tuning attack's stages are inputs,
so every attack but a precomputed linear probe shares one compiled program per model and
optimizer, or one of two when it keeps the lower half frozen (no backward pass there); a
digits suite compiled 10 sweeps before, 6 now, with the same curves.
"""
from __future__ import annotations

import dataclasses
import functools
import threading
from typing import Any, Callable, Sequence

import chex
import jax
import jax.numpy as jnp

from trm_jax import compilation, models, sharding
from trm_jax.attacks import specs
from trm_jax.attacks.budgets import AttackData
from trm_jax.attacks.fit import (AttackOutput, conv_outside, frozen_lower_half, prepare_fn,
                                 probe_fit, stage_arrays, tune_fit, warm_start)
from trm_jax.errors import ConfigError
from trm_jax.typing import Params

def resolve_batching(batching: str, config: specs.AttackConfig,
                     model: models.Model | None = None) -> str:
    """``"auto"``: on CPU, ``"map"`` (a sequential ``lax.map`` over the (lr, seed) grid, still
    one program) when the attack's program computes a conv kernel's gradient (the shared
    fine-tuning program does, unless the attack keeps the lower half frozen:
    :func:`~trm_jax.attacks.fit.frozen_lower_half`); ``"vmap"`` otherwise and on GPU/TPU. Measured on 2 CPU
    cores, digits, 3 seeds x 3 lrs x 20 epochs, first call (compile + run) / later calls:
    full_finetune vmap 5.3 / 0.97 s, map 4.7 / 1.30 s; reinit_top2 vmap 4.5 / 0.32, map
    3.6 / 0.43; head_and_penultimate vmap 3.2 / 0.24, map 4.0 / 0.48."""
    if batching not in specs.BATCHINGS:
        raise ConfigError(f"unknown batching {batching!r}; allowed: {specs.BATCHINGS}")
    if batching != "auto":
        return batching
    if (model is not None and jax.default_backend() == "cpu" and not config.frozen_features
            and conv_outside(model, frozen_lower_half(model, config))):
        return "map"
    return "vmap"


def _program_config(config: specs.AttackConfig) -> specs.AttackConfig:
    """The compiled program's key: a fine-tuning attack's name and stages are runtime
    inputs (:class:`~trm_jax.attacks.fit.Stages`), so every one of them maps to the same config."""
    if config.frozen_features:
        return config
    return dataclasses.replace(config, attack="full_finetune", precompute_features=True)


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
    prepare, fit = prepare_fn(model, config), probe_fit(model, config, return_params)
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
      AttackOutput[L, S]``, one program for all of them (:class:`~trm_jax.attacks.fit.Stages` are inputs);
      ``features`` are the released ones repeated over lrs, or a warm start's; and a
      second one, ``features[S, ...]``, for those that keep the lower half frozen
      (:func:`~trm_jax.attacks.fit.frozen_lower_half`).
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
    fit = tune_fit(model, config, return_params, frozen)
    return compilation.jit(_grid(fit, batching, per_lr=not frozen))


@functools.lru_cache(maxsize=16)
def _compiledwarm_start(model: models.Model, config: specs.AttackConfig, batching: str
                         ) -> Callable[..., Params]:
    """``(params[S], keys[S], lrs[L], data) -> features[S, L, ...]`` after the warm start."""
    warm = _grid(lambda p, key, lr, data: warm_start(model, config, p, key, lr, data),
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
      :class:`~trm_jax.attacks.fit.AttackOutput` with ``curve: f32[L, S, E+1]``, ``finite: bool[L, S]``.

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
        features = _compiledwarm_start(model, config, batching)(params, keys, lrs, data)
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
