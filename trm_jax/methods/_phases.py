"""What every method shares: the protected-model record, seeds, resumable training phases."""
from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from trm_jax import data, models, train
from trm_jax.errors import ConfigError, NonFiniteError
from trm_jax.hooks import NO_HOOKS, Hooks
from trm_jax.typing import ApplyFn, Params, PRNGKey


class Protected(NamedTuple):
    """What a method returns: one protected model per seed.

    Attributes:
      method: the method's name (``"reference"``, ``"skd"``, ...).
      model: the architecture.
      params: ``[S, ...]`` stack of ``{"features", "head"}`` params.
      keys: ``[S]`` the seed keys it was trained with (the evaluation reuses them).
      metrics: per-seed numbers ``f[S]`` (``beneficial_test_accuracy`` always) and
        method-specific ones (SKD's misses, UNSIR's stages, meta-training metrics).
      extras: other ``[S, ...]`` params stacks worth keeping (UNSIR: ``"original"``,
        the model before unlearning, which the evaluation can attack as a reference).
    """

    method: str
    model: models.Model
    params: Params
    keys: PRNGKey
    metrics: dict[str, Any]
    extras: dict[str, Params] = {}


def seed_keys(seeds: int | list[int] | tuple[int, ...]) -> PRNGKey:
    """``seeds`` (a count ``N`` means ``0..N-1``) -> ``[S]`` typed PRNG keys."""
    seeds = list(range(seeds)) if isinstance(seeds, int) else list(seeds)
    if not seeds:
        raise ConfigError("seeds is empty; give at least one seed")
    return jax.vmap(jax.random.key)(jnp.asarray(seeds))


def check_keys(keys: PRNGKey) -> int:
    """``[S]`` typed keys -> ``S``; a clear error for anything else."""
    if not (isinstance(keys, jax.Array) and jax.dtypes.issubdtype(keys.dtype, jax.dtypes.prng_key)
            and keys.ndim == 1 and keys.shape[0] >= 1):
        raise ConfigError(f"keys must be a [S] stack of typed PRNG keys (trm_jax.seed_keys(3) or "
                          f"jax.vmap(jax.random.key)(seeds)), got {getattr(keys, 'dtype', type(keys))} "
                          f"{getattr(keys, 'shape', '')}")
    return int(keys.shape[0])


def check_batch(config: train.TrainConfig, subset: data.Subset, phase: str) -> None:
    """A phase's batch must fit its data (an epoch drops the last partial batch)."""
    if config.epochs and config.batch_size > len(subset):
        raise ConfigError(f"{phase}.batch_size={config.batch_size} exceeds the {len(subset)} "
                          f"training examples; allowed: 1..{len(subset)}")


def device_subset(subset: data.Subset) -> tuple[jax.Array, jax.Array]:
    """A subset's ``(uint8 images, int32 labels)`` on the default device, once."""
    return jax.device_put(subset.images), jax.device_put(subset.labels)


def beneficial_model(protocol: data.ProtocolData, model: models.Model | None = None,
                     num_classes: int | None = None) -> models.Model:
    """The dataset's preset model with a head over the beneficial classes (or ``num_classes``)."""
    from trm_jax import datasets

    num_classes = num_classes or protocol.pretrain.beneficial.num_classes
    if model is not None:
        if model.num_classes != num_classes:
            raise ConfigError(f"the given model has {model.num_classes} outputs; this method "
                              f"needs {num_classes}")
        return model
    return datasets.model_for(protocol.spec.dataset, num_classes, protocol.image_shape)


def accuracy_on(model: models.Model, params: Params, subset: tuple[jax.Array, jax.Array]) -> np.ndarray:
    """Per-seed accuracy ``f[S]`` of a params stack on ``(images, labels)``."""
    out = jax.vmap(lambda p: train.evaluate(model.apply, p, *subset))(params)
    return np.asarray(out["accuracy"])


def train_phase(hooks: Hooks | None, phase: str, keys: PRNGKey, params: Params,
                apply_fn: ApplyFn | None, train_data: tuple[jax.Array, jax.Array],
                config: train.TrainConfig, *, eval_data: tuple[jax.Array, jax.Array] | None = None,
                per_seed_data: bool | Any = False,
                loss_fn: train.LossFn | None = None) -> train.TrainState:
    """One resumable supervised phase: restore (through ``hooks``), fit, log, save.

    A state is saved only after an epoch whose metrics are finite, so the last good
    state survives a NaN (``NonFiniteError`` names the phase and where it is).

    Args:
      hooks: see :mod:`trm_jax.hooks` (``None``: no logging, no checkpoints).
      phase: names the checkpoints and the metric records (``{"phase": phase, "epoch": e}``).
      keys: ``[S]`` seed keys (they drive the shuffles).
      params: ``[S, ...]`` initial params.
      apply_fn, train_data, config, eval_data, per_seed_data, loss_fn: see
        :func:`trm_jax.train.fit_classifier`.
    """
    hooks = hooks or NO_HOOKS
    fit = lambda cfg, **kw: train.fit_classifier(keys, params, apply_fn, *train_data, cfg,
                                                 per_seed_data=per_seed_data, loss_fn=loss_fn, **kw)
    start, state = 0, None
    restored = hooks.restore(phase, lambda: fit(dataclasses.replace(config, epochs=0),
                                                progress=False)[0])
    if restored is not None:
        state, meta = restored
        start = int(meta["step"])

    def on_epoch(epoch: int, state: train.TrainState, metrics: dict[str, np.ndarray]) -> None:
        hooks.log({"phase": phase, "epoch": epoch,
                   **{k: float(np.mean(v)) for k, v in metrics.items()}, "per_seed": metrics})
        if hooks.should_save(phase, epoch, config.epochs):
            hooks.save(phase, epoch, state, {"epoch": epoch})

    try:
        state, _ = fit(config, eval_data=eval_data, state=state, start_epoch=start,
                       on_epoch=on_epoch, progress=phase if hooks.progress else False)
    except NonFiniteError as err:
        raise NonFiniteError(f"[{phase}] {str(err).split('; training stopped')[0]}: training "
                             f"stopped; {hooks.describe_last_good(phase)}",
                             err.state, err.epoch) from None
    return state
