"""The one supervised training engine: teacher, reference, head-only, repair.

Written for ONE seed, lifted over seeds with ``jax.vmap``:

* :func:`train_step` — one optax step on one batch (pure).
* :func:`train_epoch` — one epoch as a ``lax.scan`` over shuffled batches, with
  the data resident on the device (``strategy="scan"``).
* :func:`fit` — the Python loop over epochs: progress bar, per-epoch metrics,
  evaluation, NaN/Inf check. It trains a *stack* of seeds (leading axis) in one
  compiled program per epoch (``"scan"``) or per step (``"step"``).

Execution strategy is an option: ``"auto"`` is ``"scan"`` on every backend (one
dispatch per epoch). ``"step"`` (one jitted call per step) was the CPU default while
models ran ``lax.conv`` there, whose gradients XLA:CPU runs slower inside a loop;
since :mod:`trm_jax.models` runs CPU convolutions as ``dot`` products, the scan is faster
there too (1.4-1.5x, BENCHMARKS.md). Both give the same numbers (tested).
"""
from __future__ import annotations

import dataclasses
import functools
import inspect
import math
from typing import Any, Callable, Literal, Mapping, NamedTuple, Sequence, get_args

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax

from trm_jax import compilation, sharding

from trm_jax.typing import Params  # noqa: E402
Batch = Any  # a pytree of arrays with a common leading batch axis
#: ``loss_fn(params, batch) -> (scalar loss, {name: metric})``.
LossFn = Callable[[Params, Batch], tuple[jax.Array, Mapping[str, jax.Array]]]
Strategy = Literal["auto", "scan", "step"]
Optimizer = Literal["adam", "sgd", "momentum"]
STRATEGIES = get_args(Strategy)
OPTIMIZERS = get_args(Optimizer)


class TrainState(NamedTuple):
    """Everything that changes during training, for one seed (or a stack of seeds)."""

    params: Params
    opt_state: optax.OptState
    key: jax.Array  # consumed once per epoch for the shuffle
    step: jax.Array  # int32 number of optimizer steps taken


from trm_jax import validate  # noqa: E402
from trm_jax.errors import ConfigError, NonFiniteError, check_choice  # noqa: E402,F401


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Supervised training settings (hashable, so usable as a static argument).

    Attributes:
      epochs: passes over the data.
      batch_size: examples per step; the last partial batch of an epoch is dropped.
      learning_rate: optimizer step size (> 0).
      optimizer: 'adam' (b1, b2=0.999), 'sgd' or 'momentum' (SGD with momentum).
      b1: Adam's first-moment decay.
      momentum: for 'momentum'.
      trainable: 'all' or path prefixes such as ("head",) or
        ("head", "features/fc2"); everything else stays bitwise frozen.
      strategy: 'scan' (each epoch one lax.scan), 'step' (one jitted step per batch)
        or 'auto' (scan where it compiles well).
    """

    epochs: int = 10
    batch_size: int = 64
    learning_rate: float = 1e-3
    optimizer: Optimizer = "adam"
    b1: float = 0.9
    momentum: float = 0.9
    trainable: str | tuple[str, ...] = "all"
    strategy: Strategy = "auto"

    #: Every field's domain (:mod:`trm_jax.validate`); b1 and momentum in [0, 1): optax's
    #: moment decays (1 or more never forgets, so the steps grow without bound).
    DOMAINS = {"epochs": validate.Int(0), "batch_size": validate.COUNT,
               "learning_rate": validate.POSITIVE, "optimizer": validate.Choice(OPTIMIZERS),
               "b1": validate.DECAY, "momentum": validate.DECAY,
               "trainable": validate.Str(), "strategy": validate.Choice(STRATEGIES)}

    def __post_init__(self):
        validate_config(self)


def validate_config(config: TrainConfig) -> None:
    """Raises :class:`ConfigError` naming the bad field, its value and what is allowed."""
    trainable = validate.Str() if isinstance(config.trainable, str) else validate.Tuple(validate.Str())
    validate.check_fields(config, {**TrainConfig.DOMAINS, "trainable": trainable})  # or prefixes


def make_optimizer(name: str, learning_rate: float | jax.Array, *, b1: float = 0.9,
                   momentum: float = 0.9) -> optax.GradientTransformation:
    """``"adam"`` | ``"sgd"`` | ``"momentum"`` as an optax transformation.

    ``learning_rate`` may be a traced scalar (e.g. vmapped over a learning-rate
    grid, as :mod:`trm_jax.attacks` does); only Python/NumPy numbers are
    validated here, traced values are validated by the caller before tracing.
    For a number, the same settings return the same object, so :func:`fit` reuses the
    programs it compiled for them (:func:`cached`).
    """
    if not isinstance(learning_rate, jax.Array) and not learning_rate > 0:
        raise ConfigError(f"learning_rate must be > 0, got {learning_rate}")
    if isinstance(learning_rate, (int, float, np.number)):
        return _make_optimizer(name, float(learning_rate), float(b1), float(momentum))
    return _make_optimizer.__wrapped__(name, learning_rate, b1, momentum)


@functools.lru_cache(maxsize=256)
def _make_optimizer(name: str, learning_rate: float | jax.Array, b1: float,
                    momentum: float) -> optax.GradientTransformation:
    if name == "adam":
        return optax.adam(learning_rate, b1=b1)
    if name == "sgd":
        return optax.sgd(learning_rate)
    if name == "momentum":
        return optax.sgd(learning_rate, momentum=momentum)
    raise ConfigError(f"unknown optimizer {name!r}; allowed: {OPTIMIZERS}")


def trainable_mask(params: Params, trainable: str | Sequence[str]) -> Params:
    """A pytree of Python bools: True where a leaf's path starts with a prefix.

    ``trainable="all"`` marks everything; ``("head", "features/fc2")`` marks the
    head and the penultimate layer. A prefix that matches nothing is an error
    (a typo would otherwise silently freeze the whole model).
    """
    if trainable == "all":
        return jax.tree.map(lambda _: True, params)
    prefixes = (trainable,) if isinstance(trainable, str) else tuple(trainable)
    paths = ["/".join(_key_name(k) for k in path)
             for path, _ in jax.tree_util.tree_flatten_with_path(params)[0]]
    for prefix in prefixes:
        if not any(p == prefix or p.startswith(prefix + "/") for p in paths):
            raise ConfigError(f"trainable prefix {prefix!r} matches no parameter; "
                             f"parameter paths: {sorted(paths)}")
    flags = [any(p == q or p.startswith(q + "/") for q in prefixes) for p in paths]
    return jax.tree_util.tree_unflatten(jax.tree_util.tree_structure(params), flags)


def masked_optimizer(optimizer: optax.GradientTransformation,
                     mask: Params) -> optax.GradientTransformation:
    """Applies ``optimizer`` to the leaves where ``mask`` is True, zero updates elsewhere.

    Frozen leaves carry no optimizer state (``optax.set_to_zero``). The same optimizer and
    mask (Python bools) return the same object (:func:`cached`).
    """
    key = static_key(mask)
    if key is None:
        return _build_masked_optimizer(optimizer, mask)
    return cached(_masked_optimizer, optimizer, key)


@functools.lru_cache(maxsize=256)
def _masked_optimizer(optimizer: optax.GradientTransformation, mask_key: Any
                      ) -> optax.GradientTransformation:
    return _build_masked_optimizer(optimizer, from_static_key(mask_key))


def _build_masked_optimizer(optimizer: optax.GradientTransformation, mask: Params
                            ) -> optax.GradientTransformation:
    labels = jax.tree.map(lambda m: "train" if m else "freeze", mask)
    return optax.multi_transform({"train": optimizer, "freeze": optax.set_to_zero()}, labels)


def static_key(tree: Any) -> tuple[Any, tuple[Any, ...]] | None:
    """A hashable stand-in for a pytree of Python scalars and ``None`` (a mask of bools,
    vmap axes): ``(treedef, leaves)``; ``None`` if a leaf is anything else (an array)."""
    if tree is None:
        return None, ()
    leaves, treedef = jax.tree_util.tree_flatten(tree, is_leaf=lambda x: x is None)
    if not all(x is None or isinstance(x, (bool, int, float, str, np.bool_)) for x in leaves):
        return None
    return treedef, tuple(leaves)


def from_static_key(key: tuple[Any, tuple[Any, ...]]) -> Any:
    """The pytree of :func:`static_key`."""
    treedef, leaves = key
    return None if treedef is None else jax.tree_util.tree_unflatten(treedef, leaves)


class _SameMethod:
    """A bound method that equals (and hashes as) the same method of an EQUAL object:
    Python compares a bound method's ``__self__`` by identity, so ``model.apply`` of two
    equal models would otherwise be two cache keys."""

    def __init__(self, method: Any):
        self.method = method
        self.key = (method.__func__, method.__self__)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.method(*args, **kwargs)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, _SameMethod) and self.key == other.key

    def __hash__(self) -> int:
        return hash(self.key)


def _as_key(fn: Any) -> Any:
    return _SameMethod(fn) if inspect.ismethod(fn) else fn


def cached(builder: Callable[..., Any], *args: Any) -> Any:
    """``builder(*args)`` from its ``functools.lru_cache``, or built afresh when an argument
    is unhashable (a callable object without ``__hash__``): programs and losses built from
    the same pieces are the same objects, so jax reuses what it traced and compiled for
    them (SKD's teacher ablation calls :func:`fit` 15 times with 3 settings)."""
    args = tuple(map(_as_key, args))
    try:
        return builder(*args)
    except TypeError as err:
        if "unhashable" not in str(err):
            raise
        return builder.__wrapped__(*args)


def classification_loss(apply_fn: Callable[[Params, jax.Array], jax.Array]) -> LossFn:
    """Softmax cross-entropy over ``batch = (images[B, ...], labels int32[B])``.

    Returns ``loss_fn(params, batch) -> (mean loss, {"loss", "accuracy"})``; the same
    object for the same ``apply_fn`` (:func:`cached`).
    """
    return cached(_classification_loss, apply_fn)


@functools.lru_cache(maxsize=128)
def _classification_loss(apply_fn: Callable[[Params, jax.Array], jax.Array]) -> LossFn:
    def loss_fn(params: Params, batch: Batch):
        images, labels = batch
        logits = apply_fn(params, images)
        loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
        accuracy = jnp.mean(jnp.argmax(logits, -1) == labels)
        return loss, {"loss": loss, "accuracy": accuracy}
    return loss_fn


def init_state(key: chex.PRNGKey, params: Params,
               optimizer: optax.GradientTransformation) -> TrainState:
    """A fresh ``TrainState`` for one seed; ``jax.vmap`` it over keys and params."""
    return TrainState(params, optimizer.init(params), key, jnp.zeros((), jnp.int32))


def train_step(state: TrainState, batch: Batch, *, loss_fn: LossFn,
               optimizer: optax.GradientTransformation,
               mask: Params | None = None) -> tuple[TrainState, dict[str, jax.Array]]:
    """One optimizer step on one batch. Leaves with ``mask`` False keep their exact bits
    (mask leaves: Python bools, or ``bool[]`` arrays: one program for many masks)."""
    grads, metrics = jax.grad(loss_fn, has_aux=True)(state.params, batch)
    updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    if mask is not None:  # x + 0.0 may flip -0.0: select the old leaf instead
        params = jax.tree.map(_keep_frozen, mask, params, state.params)
    return state._replace(params=params, opt_state=opt_state, step=state.step + 1), dict(metrics)


def _keep_frozen(trainable: bool | jax.Array, new: jax.Array, old: jax.Array) -> jax.Array:
    """A Python bool picks a leaf while tracing; a ``bool[]`` array (a runtime mask, one
    program for many masks) selects bitwise."""
    if isinstance(trainable, (bool, np.bool_)):
        return new if trainable else old
    return jnp.where(trainable, new, old)


def epoch_batches(key: chex.PRNGKey, num_examples: int, batch_size: int) -> jax.Array:
    """``int32[num_batches, batch_size]`` shuffled indices; the remainder is dropped."""
    num_batches = num_examples // batch_size
    if num_batches < 1:
        raise ConfigError(f"batch_size={batch_size} exceeds the {num_examples} examples; "
                         f"allowed: 1..{num_examples}")
    perm = jax.random.permutation(key, num_examples)
    return perm[: num_batches * batch_size].reshape(num_batches, batch_size)


def _gather(data: Batch, idx: jax.Array) -> Batch:
    return jax.tree.map(lambda a: jnp.take(a, idx, axis=0), data)


def train_epoch(state: TrainState, data: Batch, *, loss_fn: LossFn,
                optimizer: optax.GradientTransformation, batch_size: int,
                mask: Params | None = None) -> tuple[TrainState, dict[str, jax.Array]]:
    """One shuffled epoch over ``data`` (resident pytree, leading axis N) as one ``lax.scan``.

    Returns the new state and the epoch's mean of every per-step metric.
    """
    key, shuffle_key = jax.random.split(state.key)
    batches = epoch_batches(shuffle_key, _num_examples(data), batch_size)

    def body(state, idx):
        return train_step(state, _gather(data, idx), loss_fn=loss_fn, optimizer=optimizer, mask=mask)

    state, metrics = jax.lax.scan(body, state._replace(key=key), batches)
    return state, jax.tree.map(jnp.mean, metrics)


def evaluate(apply_fn: Callable[[Params, jax.Array], jax.Array], params: Params,
             images: jax.Array, labels: jax.Array, batch_size: int = 1024) -> dict[str, jax.Array]:
    """Accuracy and mean cross-entropy over a whole set, in fixed-size chunks.

    Args:
      images: ``[N, H, W, C]``; labels: ``int32[N]``. N need not divide ``batch_size``.
    """
    n = labels.shape[0]
    batch_size = min(batch_size, n)
    num_batches = -(-n // batch_size)
    pad = num_batches * batch_size - n
    padded = _gather((images, labels), jnp.concatenate(
        [jnp.arange(n), jnp.zeros((pad,), jnp.int32)]).reshape(num_batches, batch_size))
    valid = (jnp.arange(num_batches * batch_size) < n).reshape(num_batches, batch_size)

    def chunk(args):
        (x, y), v = args
        logits = apply_fn(params, x)
        ce = optax.softmax_cross_entropy_with_integer_labels(logits, y)
        return jnp.sum((jnp.argmax(logits, -1) == y) * v), jnp.sum(ce * v)

    correct, ce = jax.lax.map(chunk, (padded, valid))
    return {"accuracy": correct.sum() / n, "loss": ce.sum() / n}


def all_finite(tree: Any) -> jax.Array:
    """``bool[]``: every leaf of ``tree`` is finite everywhere (traceable)."""
    return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)]))


def resolve_strategy(strategy: str) -> str:
    """``"auto"`` -> ``"scan"`` (fastest on every backend measured; BENCHMARKS.md)."""
    if strategy not in STRATEGIES:
        raise ConfigError(f"unknown strategy {strategy!r}; allowed: {STRATEGIES}")
    if strategy != "auto":
        return strategy
    return "scan"


def fit(state: TrainState, data: Batch, *, loss_fn: LossFn,
        optimizer: optax.GradientTransformation, epochs: int, batch_size: int,
        mask: Params | None = None, strategy: str = "auto", start_epoch: int = 0,
        eval_fn: Callable[[Params], Mapping[str, jax.Array]] | None = None,
        on_epoch: Callable[[int, TrainState, dict[str, np.ndarray]], None] | None = None,
        progress: bool | str = True,
        per_seed_data: bool | Any = False) -> tuple[TrainState, list[dict[str, np.ndarray]]]:
    """Trains a stack of seeds for ``epochs - start_epoch`` epochs.

    Args:
      state: a ``TrainState`` whose leaves have a leading seed axis ``S``
        (``jax.vmap(init_state)(keys, params)``).
      data: pytree of arrays with leading axis ``N``, shared by all seeds; put it
        on the device once (``jax.device_put``) before calling.
      per_seed_data: if True, every leaf of ``data`` has a leading seed axis,
        ``[S, N, ...]``, and seed ``s`` trains on ``data[s]`` (e.g. UNSIR's impair
        set, whose noise is learned per seed). A pytree of bools that is a prefix
        of ``data`` marks per-seed leaves one by one, e.g. ``(False, True)`` for
        ``data = (images[N, ...], targets[S, N, D])``: images shared, targets per
        seed (SKD's distillation data).
      eval_fn: ``params -> metrics`` for ONE seed (vmapped here), run after every epoch.
      on_epoch: called as ``on_epoch(epoch, state, metrics)`` after every epoch
        (logging, checkpoints); ``epoch`` counts from 1.
      start_epoch: epochs already done (for resuming).
      progress: show a tqdm bar (a string sets its description).

    Returns:
      The final state and one metrics dict per epoch (numpy arrays of shape ``[S]``).

    Raises:
      NonFiniteError: a loss became NaN/Inf; ``err.state`` is the last finite state.
    """
    chex.assert_tree_has_only_ndarrays(data)
    num_seeds = int(jax.tree_util.tree_leaves(state.key)[0].shape[0])
    data_axis = jax.tree.map(lambda flag: 0 if flag else None, per_seed_data)

    def first_seed(flag, sub):
        if not flag:
            return sub
        chex.assert_tree_shape_prefix(sub, (num_seeds,))
        return jax.tree.map(lambda a: a[0], sub)

    n = _num_examples(jax.tree.map(first_seed, per_seed_data, data))
    epoch_batches(jax.random.key(0), n, batch_size)  # validate sizes before compiling
    # Seeds across devices (a no-op on one device): state and per-seed data are
    # sharded on the seed axis, shared data is replicated.
    state = sharding.shard_seeds(state)
    data = jax.tree.map(lambda flag, sub: sharding.shard_seeds(sub) if flag
                        else sharding.replicate(sub, num_seeds), per_seed_data, data)
    strategy = resolve_strategy(strategy)
    if strategy == "scan":
        epoch_fn = _compiled_epoch(loss_fn, optimizer, batch_size, mask, data_axis)
    else:
        step_fn = _compiled_step(loss_fn, optimizer, mask, data_axis)
    evaluate_all = (None if eval_fn is None else eval_fn.all_seeds if isinstance(eval_fn, EvalOn)
                    else compilation.jit(jax.vmap(eval_fn)))

    history = []
    epochs_iter = range(start_epoch + 1, epochs + 1)
    bar = _progress(epochs_iter, progress)
    for epoch in bar:
        if strategy == "scan":
            new_state, metrics = epoch_fn(state, data)
        else:
            new_state, metrics = _epoch_by_steps(step_fn, state, data, n, batch_size)
        if evaluate_all is not None:
            metrics.update({f"eval_{k}": v for k, v in evaluate_all(new_state.params).items()})
        metrics = sharding.to_host(dict(metrics))  # [S] each, on every process
        bad = [k for k, v in metrics.items() if not np.all(np.isfinite(v))]
        if bad:
            seeds = sorted({int(i) for k in bad for i in np.flatnonzero(~np.isfinite(metrics[k]))})
            raise NonFiniteError(
                f"non-finite {bad} at epoch {epoch} (seed indices {seeds}); training stopped; "
                f"the state after epoch {epoch - 1} is the last good one", state, epoch - 1)
        state = new_state
        history.append(metrics)
        if hasattr(bar, "set_postfix"):
            bar.set_postfix({k: f"{float(np.mean(v)):.4f}" for k, v in metrics.items()})
        if on_epoch is not None:
            on_epoch(epoch, state, metrics)
    return state, history


def _compiled_epoch(loss_fn, optimizer, batch_size, mask, data_axis=None):
    """The jitted epoch of these pieces: the same one for the same pieces (:func:`cached`),
    so a later :func:`fit` with them traces and compiles nothing."""
    keys = static_key(mask), static_key(data_axis)
    if None in keys:  # a runtime (array) mask: a program of its own
        return _build_epoch(loss_fn, optimizer, batch_size, mask, data_axis)
    return cached(_epoch_program, loss_fn, optimizer, batch_size, *keys)


@functools.lru_cache(maxsize=64)
def _epoch_program(loss_fn, optimizer, batch_size, mask_key, axis_key):
    return _build_epoch(loss_fn, optimizer, batch_size, from_static_key(mask_key),
                        from_static_key(axis_key))


def _build_epoch(loss_fn, optimizer, batch_size, mask, data_axis):
    def one_seed(state, data):
        return train_epoch(state, data, loss_fn=loss_fn, optimizer=optimizer,
                           batch_size=batch_size, mask=mask)
    return compilation.jit(jax.vmap(one_seed, in_axes=(0, data_axis)))


def _compiled_step(loss_fn, optimizer, mask, data_axis=None):
    """The jitted step of these pieces (cached as :func:`_compiled_epoch`)."""
    keys = static_key(mask), static_key(data_axis)
    if None in keys:
        return _build_step(loss_fn, optimizer, mask, data_axis)
    return cached(_step_program, loss_fn, optimizer, *keys)


@functools.lru_cache(maxsize=64)
def _step_program(loss_fn, optimizer, mask_key, axis_key):
    return _build_step(loss_fn, optimizer, from_static_key(mask_key), from_static_key(axis_key))


def _build_step(loss_fn, optimizer, mask, data_axis):
    def one_seed(state, data, idx):
        return train_step(state, _gather(data, idx), loss_fn=loss_fn, optimizer=optimizer, mask=mask)
    return compilation.jit(jax.vmap(one_seed, in_axes=(0, data_axis, 0)))


class EvalOn:
    """``eval_fn`` for :func:`fit`: ``evaluate(apply_fn, params, images, labels)`` of one
    seed, with every seed's evaluation one program per ``apply_fn`` that takes the data as
    an argument (a closure over the arrays would be a new program for every call)."""

    def __init__(self, apply_fn: Callable[[Params, jax.Array], jax.Array], images: jax.Array,
                 labels: jax.Array):
        self.apply_fn, self.images, self.labels = apply_fn, images, labels

    def __call__(self, params: Params) -> dict[str, jax.Array]:
        return evaluate(self.apply_fn, params, self.images, self.labels)

    def all_seeds(self, params: Params) -> dict[str, jax.Array]:
        """``params[S, ...]`` -> ``{"accuracy": f32[S], "loss": f32[S]}``."""
        return cached(_evaluate_seeds, self.apply_fn)(params, self.images, self.labels)


@functools.lru_cache(maxsize=64)
def _evaluate_seeds(apply_fn):
    return compilation.jit(jax.vmap(lambda p, x, y: evaluate(apply_fn, p, x, y),
                                    in_axes=(0, None, None)))


def _epoch_by_steps(step_fn, state, data, n, batch_size):
    """The same epoch as :func:`train_epoch`, one jitted call per step."""
    keys = jax.vmap(jax.random.split)(state.key)
    batches = _seed_batches(keys[:, 1], n, batch_size)  # [S, num_batches, B]
    state = state._replace(key=keys[:, 0])
    per_step = []
    for i in range(batches.shape[1]):
        state, metrics = step_fn(state, data, batches[:, i])
        per_step.append(metrics)
    stacked = jax.tree.map(lambda *xs: jnp.stack(xs, 1), *per_step)
    return state, jax.tree.map(lambda a: a.mean(1), stacked)


_seed_batches = compilation.jit(jax.vmap(epoch_batches, in_axes=(0, None, None)), static_argnums=(1, 2))


def _num_examples(data: Batch) -> int:
    sizes = {int(a.shape[0]) for a in jax.tree_util.tree_leaves(data)}
    if len(sizes) != 1:
        raise ConfigError(f"all data arrays must share their leading (example) axis, got sizes {sizes}")
    return sizes.pop()


def _key_name(key: Any) -> str:
    for attr in ("key", "name", "idx"):
        if hasattr(key, attr):
            return str(getattr(key, attr))
    return str(key)


def _progress(iterable, progress):
    if not progress:
        return iterable
    from tqdm.auto import tqdm
    return tqdm(iterable, desc=progress if isinstance(progress, str) else "train",
                leave=False, dynamic_ncols=True)


def fit_classifier(keys: jax.Array, params: Params, apply_fn: Callable[[Params, jax.Array], jax.Array],
                   images: jax.Array, labels: jax.Array, config: TrainConfig, *,
                   eval_data: tuple[jax.Array, jax.Array] | None = None,
                   state: TrainState | None = None, start_epoch: int = 0,
                   on_epoch: Callable[[int, TrainState, dict[str, np.ndarray]], None] | None = None,
                   progress: bool | str = True,
                   per_seed_data: bool | Any = False,
                   loss_fn: LossFn | None = None) -> tuple[TrainState, list[dict[str, np.ndarray]]]:
    """Supervised cross-entropy training of a stack of seeds: the common case of :func:`fit`.

    Used for the unprotected reference, the SKD teacher and head, and UNSIR's
    original and repair stages.

    Args:
      keys: ``[S]`` PRNG keys (one per seed; they drive the shuffles).
      params: ``[S, ...]`` initial params (e.g. ``model.init_seeds(keys)``).
      images, labels: ``[N, H, W, C]``, ``int32[N]`` training data (device-resident);
        with ``per_seed_data``, ``[S, N, H, W, C]`` and ``int32[S, N]`` (one set per seed).
      config: a :class:`TrainConfig` (``trainable`` masks what may change).
      eval_data: optional ``(images, labels)`` evaluated after every epoch
        (``eval_accuracy`` / ``eval_loss`` in the metrics).
      state: resume from this state instead of initialising one.
      loss_fn: replaces the cross-entropy of ``apply_fn`` with any
        ``loss_fn(params, (images, labels)) -> (loss, metrics)``, e.g. SKD's MSE
        regression onto targets ``f32[N, D]`` (``labels`` then holds the targets).
    """
    mask = trainable_mask(jax.tree.map(lambda x: x[0], params), config.trainable)
    base = make_optimizer(config.optimizer, config.learning_rate, b1=config.b1,
                          momentum=config.momentum)
    optimizer = base if config.trainable == "all" else masked_optimizer(base, mask)
    if state is None:
        state = jax.vmap(init_state, in_axes=(0, 0, None))(keys, params, optimizer)
    eval_fn = None if eval_data is None else EvalOn(apply_fn, *eval_data)
    return fit(state, (images, labels), loss_fn=loss_fn or classification_loss(apply_fn),
               optimizer=optimizer, epochs=config.epochs, batch_size=config.batch_size,
               mask=None if config.trainable == "all" else mask, strategy=config.strategy,
               start_epoch=start_epoch, eval_fn=eval_fn, on_epoch=on_epoch, progress=progress,
               per_seed_data=per_seed_data)
