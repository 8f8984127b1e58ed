"""What every method shares: the protected-model record, seeds, resumable training phases."""
from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax

from trm_jax import compilation, data, models, train
from trm_jax.errors import ConfigError, NonFiniteError, about
from trm_jax.hooks import NO_HOOKS, Hooks
from trm_jax.typing import ApplyFn, Params, PRNGKey, Protected  # noqa: F401 (Protected: re-exported)


def replace_path(config: Any, path: str, value: Any) -> Any:
    """``replace_path(cfg, "meta.shots", 5)``: a copy of a nested frozen dataclass."""
    head, _, rest = path.partition(".")
    if not dataclasses.is_dataclass(config) or head not in {f.name for f in dataclasses.fields(config)}:
        raise ConfigError(f"{type(config).__name__} has no field {head!r} (override {path!r})")
    if rest:
        value = replace_path(getattr(config, head), rest, value)
    return dataclasses.replace(config, **{head: value})


def dataset_config(module: Any, entry: Any) -> Any:
    """A method module's recommended config on dataset ``entry`` (a
    :class:`~trm_jax.datasets.DatasetEntry`): its ``default_config(entry)`` with the entry's
    overrides for ``module.NAME``."""
    from trm_jax import datasets

    config = module.default_config(entry)
    for path, value in entry.overrides.get(module.NAME, {}).items():
        config = replace_path(config, path, datasets.resolve_value(value))
    return config


def seed_keys(seeds: int | list[int] | tuple[int, ...]) -> PRNGKey:
    """``seeds`` (a count ``N`` means ``0..N-1``; or the seeds themselves) -> ``[S]`` typed PRNG keys.

    Raises:
      ConfigError: not a count >= 1 nor a non-empty sequence of integers >= 0.

    Example:
      >>> import trm_jax
      >>> trm_jax.seed_keys(3).shape                 # seeds 0, 1, 2: one vmap axis
      (3,)
      >>> trm_jax.seed_keys([4, 7]).shape
      (2,)
    """
    def integer(v: Any) -> bool:
        return isinstance(v, (int, np.integer)) and not isinstance(v, (bool, np.bool_))

    if integer(seeds):
        if seeds < 1:
            raise ConfigError(f"seeds must be a count >= 1 or a list of seeds, got {seeds!r}")
        seeds = list(range(int(seeds)))
    elif isinstance(seeds, (list, tuple, range, np.ndarray)):
        seeds = list(np.asarray(seeds).reshape(-1)) if isinstance(seeds, np.ndarray) else list(seeds)
        bad = [s for s in seeds if not integer(s) or s < 0]
        if not seeds or bad:
            raise ConfigError(f"seeds must be a count >= 1 or a non-empty list of integers >= 0, "
                              f"got {seeds!r}" + (f" (not allowed: {bad})" if bad else ""))
    else:
        raise ConfigError(f"seeds must be a count >= 1 or a list of integer seeds, got "
                          f"{type(seeds).__name__} {seeds!r}")
    return jax.vmap(jax.random.key)(jnp.asarray([int(s) for s in seeds]))


def check_keys(keys: PRNGKey) -> int:
    """``[S]`` typed keys -> ``S``; a clear error for anything else."""
    if not (isinstance(keys, jax.Array) and jax.dtypes.issubdtype(keys.dtype, jax.dtypes.prng_key)
            and keys.ndim == 1 and keys.shape[0] >= 1):
        raise ConfigError(f"keys must be a [S] stack of typed PRNG keys (trm_jax.seed_keys(3) or "
                          f"jax.vmap(jax.random.key)(seeds)), got {getattr(keys, 'dtype', type(keys))} "
                          f"{getattr(keys, 'shape', '')}")
    return int(keys.shape[0])


def check_trainable(config: Any, model: models.Model) -> None:
    """Every phase's ``trainable`` prefixes in ``config`` (at any depth), checked against
    ``model``'s parameter paths before any compute (before: when that phase started, after
    the earlier phases had trained). A phase that trains a part of the model (SKD's student)
    is checked against the whole model: a typo is caught here, the rest at the phase.

    Raises:
      ConfigError: naming the setting (``teacher.trainable``) and the parameter paths.
    """
    shapes = jax.eval_shape(model.init, jax.random.key(0))

    def walk(value: Any, path: str) -> None:
        if isinstance(value, train.TrainConfig) and value.trainable != "all":
            with about(f"{path}.trainable" if path else "trainable"):
                train.trainable_mask(shapes, value.trainable)
        if dataclasses.is_dataclass(value) and not isinstance(value, type):
            for field in dataclasses.fields(value):
                walk(getattr(value, field.name), f"{path}.{field.name}" if path else field.name)

    walk(config, "")


def check_batch(config: train.TrainConfig, subset: data.Subset, phase: str) -> None:
    """A phase's batch must fit its data (an epoch drops the last partial batch)."""
    if config.epochs and config.batch_size > len(subset):
        raise ConfigError(f"{phase}.batch_size={config.batch_size} exceeds the {len(subset)} "
                          f"training examples; allowed: 1..{len(subset)}",
                          field=f"{phase}.batch_size")


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
    out = train.EvalOn(model.apply, *subset).all_seeds(params)  # one program per model
    from trm_jax import sharding

    return sharding.to_host(out["accuracy"])


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


def outer_loop(phase: str, step: Callable[..., tuple[Params, Any, dict[str, jax.Array]]],
               params: Params, optimizer: optax.GradientTransformation, keys: PRNGKey,
               steps: int, log_every: int, hooks: Hooks | None, *, shared: tuple = (),
               per_seed: tuple = (), plain_step: Callable[..., Any] | None = None,
               plain_every: int = 0, postfix: tuple[str, ...] = (), advice: str = ""
               ) -> tuple[Params, dict[str, np.ndarray]]:
    """A resumable, vmapped outer loop (meta-training): ``steps`` calls of one jitted step.

    ``step(params, opt_state, key, *shared, *per_seed) -> (params, opt_state, metrics)``
    is written for ONE seed and vmapped here (``shared`` arrays, e.g. the data, are not
    vmapped; ``per_seed`` ones are ``[S, ...]``). The key of seed ``s`` at step ``t`` is
    ``fold_in(fold_in(keys[s], streams.META), t)``: a resumed run draws exactly what an
    uninterrupted one would. ``optimizer`` only initialises the state: it must be the one
    ``step`` applies (the steps close over theirs so they can be cached per setting).
    Every ``plain_every``-th step runs ``plain_step`` instead
    (same signature). Metrics are logged every ``log_every`` steps, where NaN/Inf stops
    the loop (the last saved state stays intact).

    Returns:
      ``(params[S, ...], metrics of the last logged step {name: f[S]})``.

    Raises:
      NonFiniteError: NaN/Inf at a logged step (``advice`` ends its message).
    """
    from trm_jax import sharding, streams

    hooks = hooks or NO_HOOKS
    opt_state = jax.vmap(optimizer.init)(params)
    start, last = 0, {}
    restored = hooks.restore(phase, lambda: (params, opt_state))
    if restored is not None:
        (params, opt_state), info = restored
        start = int(info["step"])
        last = {k: np.asarray(v) for k, v in info.get("metrics", {}).items()}
    # Seeds across devices (no-op on one device); the shared data is replicated.
    params, opt_state, keys, per_seed = sharding.shard_seeds((params, opt_state, keys, per_seed))
    shared = sharding.replicate(shared, int(keys.shape[0]))
    in_axes = (0, 0, 0) + (None,) * len(shared) + (0,) * len(per_seed)
    step_fn = _seeds_program(step, in_axes)
    plain_fn = _seeds_program(plain_step, in_axes) if plain_step else None
    fold = _fold_seeds
    stream = fold(keys, streams.META)
    bar = range(start + 1, steps + 1)
    if hooks.progress:
        from tqdm.auto import tqdm
        bar = tqdm(bar, desc=phase, initial=start, total=steps, dynamic_ncols=True)
    for t in bar:
        fn = plain_fn if plain_fn is not None and t % plain_every == 0 else step_fn
        params, opt_state, metrics = fn(params, opt_state, fold(stream, t), *shared, *per_seed)
        if t % log_every == 0 or t == steps:
            metrics = sharding.to_host(dict(metrics))  # [S] each, on every process
            bad = [k for k, v in metrics.items() if not np.all(np.isfinite(v))]
            if bad or not _finite(params):
                raise NonFiniteError(
                    f"[{phase}] non-finite {bad or 'params'} at outer step {t}: stopped; "
                    f"{hooks.describe_last_good(phase)}. {advice}", None, t)
            last = {**last, **metrics}
            hooks.log({"phase": phase, "step": t,
                       **{k: float(v.mean()) for k, v in metrics.items()}, "per_seed": metrics})
            if hasattr(bar, "set_postfix"):
                bar.set_postfix({k: f"{metrics[k].mean():.3f}" for k in postfix if k in metrics})
        if hooks.should_save(phase, t, steps) and _finite(params):
            hooks.save(phase, t, (params, opt_state),
                       {"step": t, "metrics": {k: v.tolist() for k, v in last.items()}})
    return params, last


_fold_seeds = compilation.jit(jax.vmap(jax.random.fold_in, in_axes=(0, None)))


@functools.lru_cache(maxsize=32)
def _seeds_program(step: Callable[..., Any], in_axes: tuple) -> Callable[..., Any]:
    """``jit(vmap(step))``, one per (cached) step function: repeated runs reuse its programs."""
    return compilation.jit(jax.vmap(step, in_axes=in_axes))


_all_finite = compilation.jit(train.all_finite)


def _finite(tree: Any) -> bool:
    # One program and one device->host bool per check (per leaf, eagerly: two compiled
    # programs per leaf shape and a round trip per leaf at every checked step).
    return bool(_all_finite(tree))
