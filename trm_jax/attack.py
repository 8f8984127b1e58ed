"""The fine-tuning attack: how every method in the project is judged.

An attacker takes a released model, replaces its head with a fresh one and
fine-tunes on the *malicious* fine-tuning split; we record the malicious test
accuracy before fine-tuning (epoch 0) and after every epoch: a learning curve
``f32[E+1]`` (lower is better for a defence). The suite (:data:`ATTACKS`):

* ``linear_probe`` -- the paper's protocol: fresh head, features frozen, Adam
  (lr 0.1, b1 0.9). The features of the fine-tuning and test images are
  computed ONCE and the head is trained on them (the hot path; bitwise the same
  frozen features as masking them out of the optimizer).
* ``head_and_penultimate`` -- fresh head, the last features layer
  (``model.penultimate``) trainable too: the adaptive attack against
  activation-masking defences such as SKD (it can re-learn the penultimate
  bias and weights).
* ``reinit_penultimate`` -- fresh head AND a freshly initialised penultimate
  layer, both trainable, on the frozen layers below: an activation-masking
  defence (SKD drives malicious penultimate pre-activations to -100, so every
  ReLU is dead and gradients vanish) cannot hide information that survives in
  the layer below the mask.
* ``full_finetune`` -- fresh head, every parameter trainable.
* ``scratch`` (a *reference*, :func:`scratch_reference`) -- the same
  architecture from random init, trained on the same malicious data with the
  same budget: what the attacker gets without the protected model. It is
  literally ``full_finetune`` applied to freshly initialised models (one code
  path, one compiled program).

Every attack is written for ONE (seed, learning rate) by :func:`make_attack`
(purejaxrl style: ``make_attack(model, config) -> attack(params, key, lr, data)``)
and lifted with ``jax.vmap`` over learning rates and seeds by
:func:`attack_sweep`: a 5-seed x 4-lr sweep is one jitted program (epochs as
``lax.scan``, batches as the ``lax.scan`` of :func:`trm_jax.train.train_epoch`,
data resident on the device). The learning rate is a traced scalar, so it is
vmapped like any other input.

:func:`attack_report` is the entry point for experiments; it returns entries in
the ``results.json`` shape of DESIGN.md with the metrics of :mod:`trm_jax.metrics`.

Example::

  report = attack_report(model, params, keys, protocol)            # the paper's probe
  report = attack_report(model, params, keys, protocol, "all")     # the whole suite
  scratch = scratch_reference(model, keys, protocol)               # reuse across methods
"""
from __future__ import annotations

import dataclasses
import functools
import math
import time
from typing import Any, Callable, Iterable, Mapping, NamedTuple, Sequence

import chex
import jax
import jax.numpy as jnp
import numpy as np

from trm_jax import data as data_lib
from trm_jax import datasets, metrics, models, sharding, streams, train
from trm_jax.errors import ConfigError
from trm_jax.typing import Params



@dataclasses.dataclass(frozen=True)
class AttackSpec:
    """What one attack does, as data: a new attack is one :data:`ATTACK_SPECS` entry.

    Parts are named symbolically and resolved against the model
    (:func:`resolve_parts`): ``"head"``, ``"penultimate"`` (the last features
    layer, ``model.penultimate``), ``"all"``, or a ``features/<layer>`` path.

    Attributes:
      name: the entry's name in reports.
      trainable: parts the attacker trains (``("all",)``: every parameter); the rest
        stays bitwise frozen. The head is always fresh.
      reinit: parts re-initialised (fresh random values) before training.
      frozen_features: everything below the head is frozen and not re-initialised,
        so the features can be computed once (the linear-probe shortcut).
      trains_convs: conv kernels are trained (on CPU a ``lax.map`` over runs beats
        vmapped grouped convolutions, see :func:`resolve_batching`).
      description: one line for ``--help`` and the README.
    """

    name: str
    trainable: tuple[str, ...]
    reinit: tuple[str, ...] = ()
    frozen_features: bool = False
    trains_convs: bool = False
    description: str = ""


#: The attack suite, in report order.
ATTACK_SPECS: dict[str, AttackSpec] = {s.name: s for s in (
    AttackSpec("linear_probe", ("head",), frozen_features=True,
               description="the paper's: a fresh head on frozen features"),
    AttackSpec("head_and_penultimate", ("head", "penultimate"),
               description="fresh head; the last features layer trainable too (can re-learn "
                           "an activation mask's bias)"),
    AttackSpec("reinit_penultimate", ("head", "penultimate"), reinit=("penultimate",),
               description="fresh head and a freshly initialised penultimate layer on the "
                           "frozen layers below (the adaptive attack on activation masking)"),
    AttackSpec("full_finetune", ("all",), trains_convs=True,
               description="fresh head, every parameter trainable"),
)}
ATTACKS = tuple(ATTACK_SPECS)
#: Optimizers of the ``"all"`` suite: Adam (b1 0.9, b2 0.999) and SGD with momentum 0.9.
SUITE_OPTIMIZERS = ("adam", "momentum")
OPTIMIZERS = train.OPTIMIZERS
#: The paper's linear-probe learning rate (Adam).
PAPER_LEARNING_RATE = 0.1
#: The learning-rate grid of the ``"all"`` suite (and of non-probe attacks by default).
LEARNING_RATE_GRID = (1e-4, 1e-3, 1e-2, 1e-1)
#: Scratch training (Adam) sweeps these; the attacker's best one is the reference.
SCRATCH_LEARNING_RATES = (1e-3, 1e-2)
BATCHINGS = ("auto", "vmap", "map")

_ATTACK_STREAM = streams.ATTACK  # attack keys never collide with training keys
_SCRATCH_STREAM = streams.SCRATCH


@dataclasses.dataclass(frozen=True)
class AttackConfig:
    """One attack with one optimizer (hashable: a static argument of the compiled sweep).

    Attributes:
      attack: one of :data:`ATTACKS`.
      num_classes: classes of the malicious task (the fresh head's outputs).
      optimizer: ``"adam"`` | ``"momentum"`` | ``"sgd"`` (see :func:`trm_jax.train.make_optimizer`).
      epochs: fine-tuning epochs ``E`` (>= 1); curves have ``E + 1`` points.
      batch_size: examples per step; each epoch is a fresh per-seed shuffle and
        drops the last partial batch (``N // batch_size`` steps).
      b1: Adam's first-moment decay (the paper: 0.9).
      momentum: for ``"momentum"``.
      eval_batch_size: chunk size for test evaluation and feature extraction.
      precompute_features: for ``linear_probe``, train the head on features
        computed once (fast); ``False`` masks the frozen features out of the
        optimizer instead (same curves; used to test the shortcut).
    """

    attack: str = "linear_probe"
    num_classes: int = 5
    optimizer: str = "adam"
    epochs: int = 10
    batch_size: int = 64
    b1: float = 0.9
    momentum: float = 0.9
    eval_batch_size: int = 1024
    precompute_features: bool = True

    def __post_init__(self):
        validate_config(self)

    @property
    def frozen_features(self) -> bool:
        """True when the attack trains the head on precomputed features."""
        return ATTACK_SPECS[self.attack].frozen_features and self.precompute_features

    @property
    def spec(self) -> AttackSpec:
        return ATTACK_SPECS[self.attack]


class AttackData(NamedTuple):
    """The malicious data of an attack, resident on the device.

    Attributes:
      finetune_images: ``uint8[N, H, W, C]``; finetune_labels: ``int32[N]``.
      test_images: ``uint8[T, H, W, C]``; test_labels: ``int32[T]``.
    """

    finetune_images: jax.Array
    finetune_labels: jax.Array
    test_images: jax.Array
    test_labels: jax.Array

    @property
    def num_finetune(self) -> int:
        return int(self.finetune_labels.shape[0])


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


# ----------------------------------------------------------------------------- validation


def validate_config(config: AttackConfig) -> None:
    """Raises ``ValueError`` naming the bad value and what is allowed."""
    if config.attack not in ATTACKS:
        raise ConfigError(f"unknown attack {config.attack!r}; allowed: {ATTACKS}")
    if config.optimizer not in OPTIMIZERS:
        raise ConfigError(f"unknown optimizer {config.optimizer!r}; allowed: {OPTIMIZERS}")
    if not isinstance(config.epochs, (int, np.integer)) or config.epochs < 1:
        raise ConfigError(f"attack epochs must be an integer >= 1, got {config.epochs!r}")
    if config.batch_size < 1:
        raise ConfigError(f"batch_size must be >= 1, got {config.batch_size}")
    if config.eval_batch_size < 1:
        raise ConfigError(f"eval_batch_size must be >= 1, got {config.eval_batch_size}")
    if config.num_classes < 2:
        raise ConfigError(f"num_classes must be >= 2, got {config.num_classes}")


def validate_learning_rates(learning_rates: Iterable[float]) -> tuple[float, ...]:
    """Returns the learning rates as floats; each must be finite and > 0."""
    lrs = tuple(float(lr) for lr in np.asarray(learning_rates, dtype=np.float64).reshape(-1))
    if not lrs:
        raise ConfigError("learning_rates is empty; give at least one learning rate > 0")
    bad = [lr for lr in lrs if not (math.isfinite(lr) and lr > 0)]
    if bad:
        raise ConfigError(f"learning rates must be finite and > 0, got {bad} in {list(lrs)}")
    return lrs


def resolve_attacks(attacks: str | Sequence[str]) -> tuple[str, ...]:
    """``"all"`` -> :data:`ATTACKS`; a name or list of names is checked against them."""
    if isinstance(attacks, str):
        attacks = ATTACKS if attacks == "all" else (attacks,)
    attacks = tuple(attacks)
    bad = [a for a in attacks if a not in ATTACKS]
    if bad or not attacks:
        raise ConfigError(f"unknown attack(s) {bad or attacks}; allowed: {ATTACKS} or 'all' "
                         f"(the scratch reference is not an attack: it is always computed "
                         f"unless turned off)")
    return attacks


def resolve_batching(batching: str, config: AttackConfig) -> str:
    """``"auto"``: ``"map"`` (a sequential ``lax.map`` over the (lr, seed) grid,
    still one program) for attacks that train conv weights (``AttackSpec.trains_convs``)
    on CPU, where vmapped per-run conv weights become grouped convolutions that
    XLA:CPU runs slowly; ``"vmap"`` otherwise (GPU/TPU, and every attack whose
    trained weights are dense layers). Measured on 2 CPU cores, digits, 3 seeds x
    3 lrs x 20 epochs: full_finetune vmap 8.6 s / map 7.0 s; head_and_penultimate
    vmap 0.7 s / map 3.6 s."""
    if batching not in BATCHINGS:
        raise ConfigError(f"unknown batching {batching!r}; allowed: {BATCHINGS}")
    if batching != "auto":
        return batching
    if config.spec.trains_convs and jax.default_backend() == "cpu":
        return "map"
    return "vmap"


# ----------------------------------------------------------------------------- one run


def attack_data(protocol: data_lib.ProtocolData) -> AttackData:
    """The malicious fine-tuning and test halves of ``protocol``, put on the device once."""
    ft, te = protocol.finetune.malicious, protocol.test.malicious
    return AttackData(*(jax.device_put(a) for a in (ft.images, ft.labels, te.images, te.labels)))


def resolve_parts(model: models.Model, parts: Sequence[str]) -> tuple[str, ...]:
    """Symbolic parts of an :class:`AttackSpec` -> param path prefixes of ``model``."""
    names = {"head": "head", "penultimate": f"features/{model.penultimate}", "all": "all"}
    out = []
    for part in parts:
        if part not in names and not part.startswith("features/"):
            raise ConfigError(f"unknown model part {part!r}; allowed: {sorted(names)} or "
                              "'features/<layer>'")
        out.append(names.get(part, part))
    return tuple(out)


def trainable_prefixes(model: models.Model, attack: str) -> str | tuple[str, ...]:
    """What an attack may change: a :func:`trm_jax.train.trainable_mask` spec."""
    parts = resolve_parts(model, ATTACK_SPECS[attack].trainable)
    return "all" if "all" in parts else parts


def make_attack(model: models.Model, config: AttackConfig, *, return_params: bool = False
                ) -> Callable[[Params, jax.Array, jax.Array, AttackData], AttackOutput]:
    """Builds the attack for ONE seed and ONE learning rate (pure; vmap it).

    The returned ``attack(params, key, learning_rate, data) -> AttackOutput``:

    1. ``k_head, k_shuffle = split(fold_in(key, ATTACK))``; the head is
       ``model.init_head(k_head, num_classes)`` (seed-dependent, shared by all
       learning rates of a seed).
    2. ``epochs`` x :func:`trm_jax.train.train_epoch` (cross-entropy, a fresh
       shuffle from ``k_shuffle`` each epoch, parameters outside
       :func:`trainable_prefixes` bitwise frozen), under ``lax.scan``.
    3. ``curve[e]`` = malicious test accuracy after ``e`` epochs (``e = 0``: before).

    It is ``fit(params, prepare(params, data), key, learning_rate, data)`` of
    :func:`attack_phases`.

    Args (of ``attack``):
      params: ``{"features", "head"}`` of one model (its head is dropped).
      key: a PRNG key.
      learning_rate: ``f32[]``, may be traced (validate it before: :func:`attack_sweep` does).
      data: :class:`AttackData`.
    """
    prepare, fit = attack_phases(model, config, return_params=return_params)

    def attack(params: Params, key: jax.Array, learning_rate: jax.Array,
               data: AttackData) -> AttackOutput:
        return fit(params, prepare(params, data), key, learning_rate, data)

    return attack


def attack_phases(model: models.Model, config: AttackConfig, *, return_params: bool = False
                  ) -> tuple[Callable[[Params, AttackData], tuple[jax.Array, jax.Array]],
                             Callable[..., AttackOutput]]:
    """The attack in two pure phases, ``(prepare, fit)``:

    * ``prepare(params, data) -> (train_inputs, test_inputs)``: for a
      frozen-feature attack the features ``f[N, D]``, ``f[T, D]`` of the
      fine-tuning and test images (depends on the seed only, never on the
      learning rate, so a sweep computes it once per seed); else the images.
    * ``fit(params, inputs, key, learning_rate, data) -> AttackOutput``.
    """
    validate_config(config)
    trainable = trainable_prefixes(model, config.attack)
    chunk = config.eval_batch_size

    def prepare(params: Params, data: AttackData) -> tuple[jax.Array, jax.Array]:
        if config.frozen_features:
            return (model.features_chunked(params["features"], data.finetune_images, chunk),
                    model.features_chunked(params["features"], data.test_images, chunk))
        return data.finetune_images, data.test_images

    def fit(params: Params, inputs: tuple[jax.Array, jax.Array], key: jax.Array,
            learning_rate: jax.Array, data: AttackData) -> AttackOutput:
        train_x, test_x = inputs
        key = jax.random.fold_in(key, _ATTACK_STREAM)
        head_key, shuffle_key = jax.random.split(key)
        head = model.init_head(head_key, config.num_classes)
        optimizer = train.make_optimizer(config.optimizer, learning_rate, b1=config.b1,
                                         momentum=config.momentum)
        mask = None
        if config.frozen_features:
            apply_fn, trained = model.head, head
        else:
            apply_fn = model.apply
            features = params["features"]
            if config.spec.reinit:  # fresh layers under the fresh head
                fresh = model.init(jax.random.fold_in(head_key, streams.REINIT))
                features = _replace_parts(features, fresh["features"],
                                          resolve_parts(model, config.spec.reinit))
            trained = {"features": features, "head": head}
            if trainable != "all":
                mask = train.trainable_mask(trained, trainable)
                optimizer = train.masked_optimizer(optimizer, mask)
        loss_fn = train.classification_loss(apply_fn)

        def accuracy(p: Params) -> jax.Array:
            return train.evaluate(apply_fn, p, test_x, data.test_labels, chunk)["accuracy"]

        def epoch(state: train.TrainState, _: None) -> tuple[train.TrainState, jax.Array]:
            state, _ = train.train_epoch(state, (train_x, data.finetune_labels), loss_fn=loss_fn,
                                         optimizer=optimizer, batch_size=config.batch_size,
                                         mask=mask)
            return state, accuracy(state.params)

        state = train.init_state(shuffle_key, trained, optimizer)
        state, accs = jax.lax.scan(epoch, state, None, length=config.epochs)
        curve = jnp.concatenate([accuracy(trained)[None], accs]).astype(jnp.float32)
        final = ({"features": params["features"], "head": state.params}
                 if config.frozen_features else state.params)
        finite = jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(state.params)]))
        return AttackOutput(curve, finite, final if return_params else None)

    return prepare, fit


def _replace_parts(features: Params, fresh: Params, parts: Sequence[str]) -> Params:
    """``features`` with the layers named by ``parts`` (``features/<layer>``) from ``fresh``."""
    out = dict(features)
    for part in parts:
        layer = part.split("/", 1)[1]
        out[layer] = fresh[layer]
    return out


# ----------------------------------------------------------------------------- sweeps


@functools.lru_cache(maxsize=64)
def compiled_sweep(model: models.Model, config: AttackConfig, batching: str,
                   return_params: bool = False) -> Callable[..., AttackOutput]:
    """The jitted sweep ``(params[S,...], keys[S], lrs f32[L], data) -> AttackOutput[L, S]``.

    ``batching="vmap"``: ``vmap`` over seeds of ``vmap`` over learning rates.
    A frozen-feature attack's ``prepare`` phase (the features) depends only on
    the seed, so it runs once per seed (a ``lax.map`` over seeds on CPU, where
    vmapped per-seed convs are slower; ``vmap`` elsewhere) and only the head
    training is vmapped over ``S x L``. ``batching="map"``: a ``lax.map`` over the
    flattened ``L * S`` grid inside the same program.
    """
    one = make_attack(model, config, return_params=return_params)
    if batching == "vmap":
        prepare, fit = attack_phases(model, config, return_params=return_params)
        over_lrs = jax.vmap(fit, in_axes=(None, None, None, 0, None))
        over_seeds = jax.vmap(over_lrs, in_axes=(0, 0, 0, None, None))
        # Per-seed conv weights under vmap become grouped convolutions, which XLA:CPU
        # runs ~25% slower than a loop of plain ones: on CPU, prepare seed by seed.
        map_prepare = config.frozen_features and jax.default_backend() == "cpu"

        shared_inputs = jax.vmap(over_lrs, in_axes=(0, None, 0, None, None))

        def sweep(params, keys, lrs, data):
            if not config.frozen_features:  # the images: the same for every seed
                out = shared_inputs(params, prepare(None, data), keys, lrs, data)
            else:
                inputs = (jax.lax.map(lambda p: prepare(p, data), params) if map_prepare
                          else jax.vmap(prepare, in_axes=(0, None))(params, data))
                out = over_seeds(params, inputs, keys, lrs, data)  # [S, L, ...]
            return jax.tree.map(lambda x: jnp.swapaxes(x, 0, 1), out)
    elif batching == "map":
        def sweep(params, keys, lrs, data):
            num_seeds, num_lrs = keys.shape[0], lrs.shape[0]
            seed_idx = jnp.tile(jnp.arange(num_seeds), num_lrs)  # lr-major: [L * S]
            lr_idx = jnp.repeat(jnp.arange(num_lrs), num_seeds)

            def body(idx):
                s, l = idx
                return one(jax.tree.map(lambda x: x[s], params), keys[s], lrs[l], data)

            out = jax.lax.map(body, (seed_idx, lr_idx))
            return jax.tree.map(lambda x: x.reshape(num_lrs, num_seeds, *x.shape[1:]), out)
    else:
        raise ConfigError(f"batching must be 'vmap' or 'map' here, got {batching!r}")
    return jax.jit(sweep)


def attack_sweep(model: models.Model, params: Params, keys: jax.Array,
                 learning_rates: Sequence[float], data: AttackData, config: AttackConfig, *,
                 batching: str = "auto", return_params: bool = False) -> AttackOutput:
    """Runs one attack for every (learning rate, seed) in ONE compiled program.

    Args:
      model: the architecture.
      params: ``[S, ...]`` stack of models to attack.
      keys: ``[S]`` PRNG keys, one per seed.
      learning_rates: ``L`` values, each finite and > 0.
      data: :class:`AttackData` (see :func:`attack_data`).
      config: the attack.
      batching: ``"vmap"``, ``"map"`` or ``"auto"`` (:func:`resolve_batching`).
      return_params: also return the attacked params ``[L, S, ...]``.

    Returns:
      :class:`AttackOutput` with ``curve: f32[L, S, E+1]``, ``finite: bool[L, S]``.

    Raises:
      ValueError: bad learning rates, batch size, shapes or batching, before compiling.
    """
    lrs = validate_learning_rates(learning_rates)
    check_inputs(model, params, keys, data, config)
    batching = resolve_batching(batching, config)
    # The attack drops the model's head for a fresh ``config.num_classes`` one: models (and
    # params) that differ only in their head (UNSIR's 10-way model) share one compiled sweep.
    model = dataclasses.replace(model, num_classes=config.num_classes)
    params = {"features": params["features"]}
    params, keys, data = _place(params, keys, data, int(keys.shape[0]))
    fn = compiled_sweep(model, config, batching, return_params)
    return fn(params, keys, jnp.asarray(lrs, jnp.float32), data)


def check_inputs(model: models.Model, params: Params, keys: jax.Array, data: AttackData,
                 config: AttackConfig) -> None:
    """Shape checks at the boundary (``chex``) with messages naming what is allowed."""
    validate_config(config)
    if keys.ndim != 1:
        raise ConfigError(f"keys must be a [S] stack of PRNG keys (jax.random.key), got shape {keys.shape}")
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
    if tuple(data.finetune_images.shape[1:]) != tuple(model.input_shape):
        raise ConfigError(f"images of shape {data.finetune_images.shape[1:]} do not fit the model's "
                         f"input_shape {model.input_shape}")


def _place(params: Params, keys: jax.Array, data: AttackData, num_seeds: int
           ) -> tuple[Params, jax.Array, AttackData]:
    """Seeds across devices (:mod:`trm_jax.sharding`): with several devices that
    divide ``S``, params and keys are sharded on the seed axis and the data is
    replicated. Otherwise params and keys are committed to the default device, so
    params fresh from ``init`` and params restored from a checkpoint hit the same
    compiled program (jit's cache tells committed arrays apart)."""
    if sharding.can_shard(num_seeds):
        return (sharding.shard_seeds(params), sharding.shard_seeds(keys),
                sharding.replicate(data, num_seeds))
    params, keys = jax.device_put((params, keys), jax.devices()[0])
    return params, keys, data


# ----------------------------------------------------------------------------- reports


def steps_per_epoch(data: AttackData, batch_size: int) -> int:
    """Optimizer steps per attack epoch: ``N // batch_size``."""
    return data.num_finetune // batch_size


def make_entry(output: AttackOutput, learning_rates: Sequence[float], config: AttackConfig,
               data: AttackData, *, scratch: Mapping[str, Any] | None = None,
               wall_seconds: float | None = None) -> dict[str, Any]:
    """An attack's ``results.json`` entry (DESIGN.md) from a sweep's output.

    Keys: ``attack, optimizer, learning_rates, epochs, batch_size, steps_per_epoch,
    curves`` (``[lr][seed][epoch]``, epoch 0 = before fine-tuning), ``finite``
    (``[lr][seed]``), the metrics of :func:`trm_jax.metrics.sweep_summary`
    (``best_lr``, ``initial``, ``final``, ``best``, ``auc``, ``per_lr``) and, given
    the ``scratch`` entry, ``steps_to_reach`` its mean final accuracy and
    ``relative_to_scratch`` (``auc_ratio``, ``final_gap``).
    """
    curves = np.asarray(output.curve, dtype=np.float64)
    spe = steps_per_epoch(data, config.batch_size)
    target = None if scratch is None else scratch["final"]["mean"]
    entry = {"attack": config.attack, "optimizer": config.optimizer,
             "learning_rates": [float(lr) for lr in learning_rates], "epochs": config.epochs,
             "batch_size": config.batch_size, "steps_per_epoch": spe,
             "curves": curves.tolist(), "finite": np.asarray(output.finite).tolist(),
             **metrics.sweep_summary(curves, learning_rates, steps_per_epoch=spe, target=target)}
    if scratch is not None:
        entry["relative_to_scratch"] = metrics.relative_to_scratch(entry, scratch)
    if wall_seconds is not None:
        entry["wall_seconds"] = float(wall_seconds)
    return entry


def default_epochs(protocol: data_lib.ProtocolData) -> int:
    """The dataset's ``attack_epochs`` (:mod:`trm_jax.datasets`). Digits: 262 malicious
    fine-tuning images, 4 steps of 64 per epoch, so 10 epochs = 40 steps (scratch
    reaches ~0.97 in them); CIFAR-10 (5,000 images): 10 epochs = 780 steps."""
    return datasets.get(protocol.spec.dataset).attack_epochs


def scratch_reference(model: models.Model, keys: jax.Array, protocol: data_lib.ProtocolData, *,
                      learning_rates: Sequence[float] | None = None, optimizer: str = "adam",
                      epochs: int | None = None, batch_size: int = 64, batching: str = "auto",
                      data: AttackData | None = None) -> dict[str, Any]:
    """The scratch reference entry: ``model``'s architecture from random init (per
    seed, :func:`scratch_init`), every parameter trained on the malicious
    fine-tuning split with the attack's budget (``epochs``, ``batch_size``): the
    ``full_finetune`` attack on random models, so it shares its compiled program.

    It is the same for every method under the same protocol, seeds and budget:
    compute it once and pass it to :func:`attack_report` (``scratch=``).

    Args:
      learning_rates: default :data:`SCRATCH_LEARNING_RATES` (the headline is the
        best one for the attacker, :func:`trm_jax.metrics.best_lr_index`).
      optimizer: ``"adam"`` by default.
      epochs: default :func:`default_epochs`.

    Returns:
      An entry (see :func:`make_entry`) with ``curves: [L][S][E+1]``.
    """
    lrs = validate_learning_rates(SCRATCH_LEARNING_RATES if learning_rates is None else learning_rates)
    config = AttackConfig("full_finetune", protocol.finetune.malicious.num_classes, optimizer,
                          default_epochs(protocol) if epochs is None else epochs, batch_size)
    data = attack_data(protocol) if data is None else data
    start = time.perf_counter()
    params = scratch_init(model, keys)
    out = jax.block_until_ready(attack_sweep(model, params, keys, lrs, data, config, batching=batching))
    entry = make_entry(out, lrs, config, data, wall_seconds=time.perf_counter() - start)
    return {**entry, "attack": "scratch"}


def scratch_init(model: models.Model, keys: jax.Array) -> Params:
    """``[S]`` keys -> ``[S, ...]`` randomly initialised models (the scratch reference's
    starting point; the key stream differs from the attack's and from training's).

    Not jitted on purpose: eager ``vmap(model.init)`` reuses the per-shape compiled
    initialisers that training already built (a jitted init compiles for ~10 s on CPU)."""
    return jax.vmap(lambda k: model.init(jax.random.fold_in(k, _SCRATCH_STREAM)))(keys)


def attack_plan(attacks: str | Sequence[str] = ("linear_probe",), *,
                learning_rates: Sequence[float] | None = None,
                optimizers: Sequence[str] | None = None, num_classes: int = 5,
                epochs: int = 10, batch_size: int = 64
                ) -> dict[str, tuple[AttackConfig, tuple[float, ...]]]:
    """What :func:`attack_report` will run: ``{entry name: (config, learning rates)}``.

    Pure and cheap (no compute), so every setting is validated up front. See
    :func:`attack_report` for the defaults and the naming rule.
    """
    suite = isinstance(attacks, str) and attacks == "all"
    names = resolve_attacks(attacks)
    optimizers = tuple(SUITE_OPTIMIZERS if optimizers is None and suite else optimizers or ("adam",))
    bad = [o for o in optimizers if o not in OPTIMIZERS]
    if bad or not optimizers or len(set(optimizers)) != len(optimizers):
        raise ConfigError(f"bad optimizer list {list(optimizers)}; allowed (each once): {OPTIMIZERS}")
    plan = {}
    for a in names:
        lrs = validate_learning_rates(
            learning_rates if learning_rates is not None
            else (PAPER_LEARNING_RATE,) if a == "linear_probe" and not suite else LEARNING_RATE_GRID)
        for o in optimizers:
            name = a if len(optimizers) == 1 else f"{a}/{o}"
            plan[name] = (AttackConfig(a, num_classes, o, epochs, batch_size), lrs)
    return plan


def attack_report(model: models.Model, params: Params, keys: jax.Array,
                  protocol: data_lib.ProtocolData,
                  attacks: str | Sequence[str] = ("linear_probe",), *,
                  learning_rates: Sequence[float] | None = None,
                  optimizers: Sequence[str] | None = None, epochs: int | None = None,
                  batch_size: int = 64, include_scratch: bool = True,
                  scratch: Mapping[str, Any] | None = None,
                  reference_params: Params | None = None, batching: str = "auto",
                  verbose: bool = False) -> dict[str, Any]:
    """Attacks a stack of protected models: the evaluation every experiment reports.

    Args:
      model: the architecture of ``params``.
      params: ``[S, ...]`` stack, one protected model per seed.
      keys: ``[S]`` PRNG keys (the attack folds its own stream in, so the
        experiment's seed keys can be passed directly).
      protocol: the data protocol; its malicious fine-tuning / test halves are used.
      attacks: names from :data:`ATTACKS`, or ``"all"`` (the whole suite with
        both :data:`SUITE_OPTIMIZERS`).
      learning_rates: the grid for every attack. Default: the paper's ``(0.1,)``
        for ``linear_probe`` unless ``attacks="all"``; :data:`LEARNING_RATE_GRID`
        otherwise.
      optimizers: default ``("adam",)``, or :data:`SUITE_OPTIMIZERS` for ``"all"``.
        Entries are named ``attack`` with one optimizer, ``attack/optimizer``
        with several (e.g. ``"full_finetune/momentum"``).
      epochs: default :func:`default_epochs` (10 for digits and CIFAR-10).
      batch_size: attack batch size.
      include_scratch: compute the scratch reference (Adam,
        :data:`SCRATCH_LEARNING_RATES`, same epochs and batch size) unless
        ``scratch`` gives a precomputed one.
      reference_params: optional ``[S, ...]`` unprotected reference models,
        attacked the same way; entries in ``references["unprotected/<name>"]``.
      batching: see :func:`resolve_batching`.

    Returns:
      ``{"attacks": {name: entry}, "references": {"scratch": entry, ...},
      "summary": {"worst_case": ..., "relative_to_scratch": {name: ...}}}`` with
      entries as in :func:`make_entry`.

    Raises:
      ValueError: unknown attack/optimizer, non-positive learning rate, epochs < 1,
        batch size larger than the data or mismatched seeds -- before any compute.
    """
    epochs = default_epochs(protocol) if epochs is None else epochs
    plan = attack_plan(attacks, learning_rates=learning_rates, optimizers=optimizers,
                       num_classes=protocol.finetune.malicious.num_classes, epochs=epochs,
                       batch_size=batch_size)
    data = attack_data(protocol)
    for config, _ in plan.values():  # every check before any compute
        check_inputs(model, params, keys, data, config)
        if reference_params is not None:
            check_inputs(model, reference_params, keys, data, config)
    if scratch is not None and (scratch.get("epochs"), scratch.get("batch_size"),
                                np.shape(scratch["curves"])[1]) != (epochs, batch_size, keys.shape[0]):
        raise ConfigError(
            f"the given scratch reference has epochs={scratch.get('epochs')}, batch_size="
            f"{scratch.get('batch_size')}, {np.shape(scratch['curves'])[1]} seeds; this report "
            f"needs epochs={epochs}, batch_size={batch_size}, {keys.shape[0]} seeds (same budget)")

    references: dict[str, Any] = {}
    if scratch is not None:
        references["scratch"] = dict(scratch)
    elif include_scratch:
        references["scratch"] = scratch_reference(model, keys, protocol, epochs=epochs,
                                                  batch_size=batch_size, batching=batching, data=data)
        _say(verbose, "scratch", references["scratch"])
    target = references.get("scratch")

    def run_all(stack: Params, prefix: str) -> dict[str, Any]:
        out = {}
        for name, (config, lrs) in plan.items():
            start = time.perf_counter()
            result = jax.block_until_ready(
                attack_sweep(model, stack, keys, lrs, data, config, batching=batching))
            out[prefix + name] = make_entry(result, lrs, config, data, scratch=target,
                                            wall_seconds=time.perf_counter() - start)
            _say(verbose, prefix + name, out[prefix + name])
        return out

    entries = run_all(params, "")
    if reference_params is not None:
        references.update(run_all(reference_params, "unprotected/"))
    summary: dict[str, Any] = {"worst_case": metrics.worst_case(entries)}
    if target is not None:
        summary["relative_to_scratch"] = {n: e["relative_to_scratch"] for n, e in entries.items()}
    return {"attacks": entries, "references": references, "summary": summary}


def _say(verbose: bool, name: str, entry: Mapping[str, Any]) -> None:
    if verbose:
        print(f"[attack] {name}: final {entry['final']['mean']:.3f} +- {entry['final']['std']:.3f}, "
              f"AUC {entry['auc']['mean']:.3f} (lr {entry['best_lr']:g}, "
              f"{entry.get('wall_seconds', float('nan')):.1f}s)", flush=True)
