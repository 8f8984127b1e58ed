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
* adaptive attacks (issue 12): ``standardized_probe`` (a linear classifier on
  frozen features standardised with the attacker's data: undoes activation
  scaling), ``reinit_top2`` / ``reinit_top3`` (``reinit_penultimate`` is top 1;
  top ``L`` = 4 is scratch), ``warm_start`` (a few epochs on the beneficial data
  first) and ``probe_then_finetune`` (LP-FT). :class:`AttackSpec` marks the
  *reuse* attacks (those keeping at least the lower half of the network).
* ``scratch`` (a *reference*, :func:`scratch_reference`) -- the same
  architecture from random init, trained on the same malicious data with the
  same budget: what the attacker gets without the protected model. It is
  literally ``full_finetune`` applied to freshly initialised models (one code
  path, one compiled program).

**Budgets** (:class:`Budgets`): attacker data per class (:func:`data_budget`: a
subset tiled to the full size, so every data budget runs in the same compiled
program) and steps as multiples of the default epochs, all read off ONE run of
the longest budget (a constant-lr attacker's short run is the long run's prefix).
Every entry is summarised at every budget (``entry["budgets"]``) and the report
gives, per budget, the worst attack over the suite and over the reuse attacks
with their own numbers and their advantage over scratch at the same budget
(:func:`trm_jax.metrics.budget_summary`).

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
from trm_jax import compilation, datasets, metrics, models, sharding, streams, train
from trm_jax.errors import ConfigError
from trm_jax.typing import Params



@dataclasses.dataclass(frozen=True)
class AttackSpec:
    """What one attack does, as data: a new attack is one :data:`ATTACK_SPECS` entry.

    Parts are named symbolically and resolved against the model
    (:func:`resolve_parts`): ``"head"``, ``"penultimate"`` (the last features
    layer, ``model.penultimate``), ``"top:k"`` (the top ``k`` features layers
    of :func:`feature_layers`, a conv4 norm with its conv), ``"all"``, or a
    ``features/<layer>`` path.

    Attributes:
      name: the entry's name in reports.
      trainable: parts the attacker trains (``("all",)``: every parameter); the rest
        stays bitwise frozen. The head is always fresh.
      reinit: parts re-initialised (fresh random values) before training.
      frozen_features: everything below the head is frozen and not re-initialised,
        so the features can be computed once (the linear-probe shortcut).
      trains_convs: conv kernels are trained (on CPU a ``lax.map`` over runs compiles
        faster than the vmapped sweep, see :func:`resolve_batching`).
      reuse: the attack keeps at least the lower half of the protected network
        (its bottom ``L/2`` features layers, ``L = 4`` for lenet and conv4) as
        released: the *reuse* worst case (:func:`trm_jax.metrics.budget_summary`)
        judges a defence by what an attacker gets out of its weights.
      standardize: (frozen features only) standardise each feature with the mean
        and std of the attacker's fine-tuning features, ``z = (f - mu) / max(sd,
        1e-6)``, and train a linear classifier on ``z`` (no ReLU: it would drop the
        half that standardising recovers). Undoes activation scaling such as SKD's
        -100 targets.
      warm_start_epochs: before the attack, this many epochs of training every
        parameter with the *released* head on the beneficial fine-tuning data (same
        optimizer and learning rate, its own optimizer state): moves the weights
        out of a region shaped against fine-tuning. Epoch 0 of the curve is after it.
      probe_epochs: a two-stage attack: the first ``probe_epochs`` epochs train the
        fresh head only (features frozen), the rest train ``trainable`` with a
        fresh optimizer state (LP-FT, Kumar et al., 2022).
      description: one line for ``--help`` and the README.
    """

    name: str
    trainable: tuple[str, ...]
    reinit: tuple[str, ...] = ()
    frozen_features: bool = False
    trains_convs: bool = False
    reuse: bool = False
    standardize: bool = False
    warm_start_epochs: int = 0
    probe_epochs: int = 0
    description: str = ""


#: The attack suite, in report order. ``reinit_penultimate`` is ``reinit_top1``:
#: the top ``k`` features layers (lenet: conv1 conv2 fc1 fc2; conv4: conv1..conv4)
#: fresh and trained with the head on the frozen layers below; ``k = L = 4`` is the
#: scratch reference itself, so large ``k`` approaches it (hence "advantage over scratch").
ATTACK_SPECS: dict[str, AttackSpec] = {s.name: s for s in (
    AttackSpec("linear_probe", ("head",), frozen_features=True, reuse=True,
               description="the paper's: a fresh head on frozen features"),
    AttackSpec("standardized_probe", ("head",), frozen_features=True, standardize=True, reuse=True,
               description="a linear classifier on frozen features standardised with the "
                           "attacker's data (undoes activation scaling such as SKD's -100)"),
    AttackSpec("head_and_penultimate", ("head", "penultimate"), reuse=True,
               description="fresh head; the last features layer trainable too (can re-learn "
                           "an activation mask's bias)"),
    AttackSpec("reinit_penultimate", ("head", "penultimate"), reinit=("penultimate",), reuse=True,
               description="fresh head and a freshly initialised penultimate layer on the "
                           "frozen layers below (reinit top 1; the adaptive attack on "
                           "activation masking)"),
    AttackSpec("reinit_top2", ("head", "top:2"), reinit=("top:2",), reuse=True,
               description="fresh head and the top 2 features layers freshly initialised and "
                           "trained, the bottom half frozen"),
    AttackSpec("reinit_top3", ("head", "top:3"), reinit=("top:3",), trains_convs=True,
               description="fresh head and the top 3 features layers freshly initialised and "
                           "trained: only the first layer reused (close to scratch)"),
    AttackSpec("full_finetune", ("all",), trains_convs=True, reuse=True,
               description="fresh head, every parameter trainable"),
    AttackSpec("warm_start", ("all",), trains_convs=True, reuse=True, warm_start_epochs=2,
               description="2 epochs on the beneficial fine-tuning data with the released "
                           "head, then full fine-tuning with a fresh head"),
    AttackSpec("probe_then_finetune", ("all",), trains_convs=True, reuse=True, probe_epochs=3,
               description="two stages: 3 epochs of linear probe, then full fine-tuning "
                           "(fresh optimizer state)"),
)}
ATTACKS = tuple(ATTACK_SPECS)
#: Optimizers of the ``"all"`` suite: Adam (b1 0.9, b2 0.999) and SGD with momentum 0.9.
SUITE_OPTIMIZERS = ("adam", "momentum")
#: The skeptic's grid (issue 12): 9 learning rates, half-decades from 1e-5 to 1e-1, and
#: three optimizers (MLAC searches 1e-5..1e-2; SOPHON's protection held only at SGD 1e-4).
WIDE_LEARNING_RATE_GRID = tuple(float(f"{x:.3g}") for x in np.logspace(-5, -1, 9))
WIDE_OPTIMIZERS = ("sgd", "momentum", "adam")
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
      beneficial_images: ``uint8[B, H, W, C]``, beneficial_labels: ``int32[B]``: the
        beneficial fine-tuning split (the ``warm_start`` attack trains on it).
    """

    finetune_images: jax.Array
    finetune_labels: jax.Array
    test_images: jax.Array
    test_labels: jax.Array
    beneficial_images: jax.Array | None = None
    beneficial_labels: jax.Array | None = None

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
    probe = ATTACK_SPECS[config.attack].probe_epochs
    if probe and config.epochs <= probe:
        raise ConfigError(f"attack {config.attack!r} probes for {probe} epochs first; epochs must "
                         f"be > {probe}, got {config.epochs}")


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
    on CPU; ``"vmap"`` otherwise (GPU/TPU, and every attack whose trained weights are
    dense layers). Measured on 2 CPU cores, digits, 3 seeds x 3 lrs x 20 epochs, first
    call (compile + run, what an experiment pays per sweep) / later calls: full_finetune
    vmap 5.3 / 0.97 s, map 4.7 / 1.30 s; reinit_top2 vmap 4.5 / 0.32, map 3.6 / 0.43;
    head_and_penultimate vmap 3.2 / 0.24, map 4.0 / 0.48. (Before CPU convolutions ran
    as ``dot``s, vmapped per-run kernels became grouped convolutions and map won both.)"""
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
    ft, te, ben = protocol.finetune.malicious, protocol.test.malicious, protocol.finetune.beneficial
    return AttackData(*(jax.device_put(a) for a in (ft.images, ft.labels, te.images, te.labels,
                                                    ben.images, ben.labels)))


def data_budget(data: AttackData, per_class: int | None, *, seed: int = 0) -> AttackData:
    """The attacker's data budget: ``per_class`` fine-tuning examples of each class
    (``None``: all), *tiled* to the full set's size ``N``.

    The subset is the first ``per_class`` of each class in a fixed permutation
    (``seed``; the same for every seed, method and reference, so all compare on the
    same examples). Tiling keeps every array's shape, so every budget runs in the
    SAME compiled program, and an epoch is ``N // batch_size`` steps at every budget
    (the steps budget does not depend on the data budget); each kept example appears
    ``floor(N / n)`` or ``ceil(N / n)`` times per epoch.
    """
    if per_class is None:
        return data
    if not isinstance(per_class, (int, np.integer)) or per_class < 1:
        raise ConfigError(f"attacker data per class must be an integer >= 1 or None (all), got "
                         f"{per_class!r}")
    labels = np.asarray(data.finetune_labels)
    order = np.random.default_rng(seed).permutation(labels.shape[0])
    keep = np.concatenate([order[labels[order] == c][:per_class] for c in np.unique(labels)])
    keep = np.random.default_rng(seed + 1).permutation(keep)  # classes interleaved in the tiling
    idx = keep[np.arange(labels.shape[0]) % keep.shape[0]]
    return data._replace(finetune_images=data.finetune_images[idx],
                         finetune_labels=data.finetune_labels[idx])


#: Features layers of each architecture, bottom to top (conv4's ``norm<i>`` belongs to ``conv<i>``).
FEATURE_LAYERS = {"lenet": ("conv1", "conv2", "fc1", "fc2"),
                  "conv4": ("conv1", "conv2", "conv3", "conv4")}


def feature_layers(model: models.Model) -> tuple[tuple[str, ...], ...]:
    """``model``'s features layers bottom to top, each the tuple of its param names."""
    if model.name not in FEATURE_LAYERS:
        raise ConfigError(f"no layer order for model {model.name!r}; known: {sorted(FEATURE_LAYERS)}")
    names = set(jax.eval_shape(model.init, jax.random.key(0))["features"])
    return tuple((n,) + tuple(m for m in (f"norm{n[4:]}",) if n.startswith("conv") and m in names)
                 for n in FEATURE_LAYERS[model.name])


def resolve_parts(model: models.Model, parts: Sequence[str]) -> tuple[str, ...]:
    """Symbolic parts of an :class:`AttackSpec` -> param path prefixes of ``model``."""
    names = {"head": "head", "penultimate": f"features/{model.penultimate}", "all": "all"}
    out = []
    for part in parts:
        if part.startswith("top:"):
            layers = feature_layers(model)
            k = int(part[4:])
            if not 1 <= k < len(layers):
                raise ConfigError(f"{part!r}: k must be in 1..{len(layers) - 1} for {model.name} "
                                  f"(k = {len(layers)} re-initialises everything: the scratch reference)")
            out += [f"features/{n}" for layer in layers[-k:] for n in layer]
        elif part in names or part.startswith("features/"):
            out.append(names.get(part, part))
        else:
            raise ConfigError(f"unknown model part {part!r}; allowed: {sorted(names)}, 'top:k' or "
                              "'features/<layer>'")
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

    spec = config.spec

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

    def fit(params: Params, inputs: tuple[jax.Array, jax.Array], key: jax.Array,
            learning_rate: jax.Array, data: AttackData) -> AttackOutput:
        train_x, test_x = inputs
        key = jax.random.fold_in(key, _ATTACK_STREAM)
        head_key, shuffle_key = jax.random.split(key)
        head = model.init_head(head_key, config.num_classes)
        base = train.make_optimizer(config.optimizer, learning_rate, b1=config.b1,
                                    momentum=config.momentum)
        optimizer, mask = base, None
        if config.frozen_features:
            apply_fn, trained = (_linear if spec.standardize else model.head), head
        else:
            apply_fn = model.apply
            features = params["features"]
            if spec.warm_start_epochs:
                features = _warm_start(model, config, params, base, data,
                                       jax.random.fold_in(shuffle_key, streams.WARM_START))
            if spec.reinit:  # fresh layers under the fresh head
                fresh = model.init(jax.random.fold_in(head_key, streams.REINIT))
                features = _replace_parts(features, fresh["features"],
                                          resolve_parts(model, spec.reinit))
            trained = {"features": features, "head": head}
            if trainable != "all":
                mask = train.trainable_mask(trained, trainable)
                optimizer = train.masked_optimizer(base, mask)
        loss_fn = train.classification_loss(apply_fn)

        def accuracy(p: Params) -> jax.Array:
            return train.evaluate(apply_fn, p, test_x, data.test_labels, chunk)["accuracy"]

        def run(state: train.TrainState, opt, opt_mask, length: int):
            def epoch(state: train.TrainState, _: None) -> tuple[train.TrainState, jax.Array]:
                state, _ = train.train_epoch(state, (train_x, data.finetune_labels), loss_fn=loss_fn,
                                             optimizer=opt, batch_size=config.batch_size,
                                             mask=opt_mask)
                return state, accuracy(state.params)
            return jax.lax.scan(epoch, state, None, length=length)

        accs = [accuracy(trained)[None]]
        if spec.probe_epochs:  # stage 1: the head only; stage 2 gets a fresh optimizer state
            probe_mask = train.trainable_mask(trained, ("head",))
            probe_opt = train.masked_optimizer(base, probe_mask)
            probe, probe_accs = run(train.init_state(shuffle_key, trained, probe_opt), probe_opt,
                                    probe_mask, spec.probe_epochs)
            accs.append(probe_accs)
            state = train.init_state(probe.key, probe.params, optimizer)
        else:
            state = train.init_state(shuffle_key, trained, optimizer)
        state, rest = run(state, optimizer, mask, config.epochs - spec.probe_epochs)
        curve = jnp.concatenate([*accs, rest]).astype(jnp.float32)
        final = ({"features": params["features"], "head": state.params}
                 if config.frozen_features else state.params)
        finite = jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(state.params)]))
        return AttackOutput(curve, finite, final if return_params else None)

    return prepare, fit


def _linear(head: Params, z: jax.Array) -> jax.Array:
    """The head's dense layer without its ReLU: ``z[B, D] -> z @ W + b``."""
    return z @ head["dense"]["kernel"] + head["dense"]["bias"][None]


def _warm_start(model: models.Model, config: AttackConfig, params: Params,
                optimizer, data: AttackData, key: jax.Array) -> Params:
    """``config.spec.warm_start_epochs`` epochs of every parameter with the released head
    on the beneficial fine-tuning data; returns the features."""
    loss_fn = train.classification_loss(model.apply)
    beneficial = (data.beneficial_images, data.beneficial_labels)

    def epoch(state: train.TrainState, _: None) -> tuple[train.TrainState, None]:
        return train.train_epoch(state, beneficial, loss_fn=loss_fn, optimizer=optimizer,
                                 batch_size=config.batch_size)[0], None

    state = train.init_state(key, params, optimizer)
    state, _ = jax.lax.scan(epoch, state, None, length=config.spec.warm_start_epochs)
    return state.params["features"]


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
    return compilation.jit(sweep)


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
    # A warm start first trains the released model, its own head included: it keeps it.
    if not config.spec.warm_start_epochs:
        model = dataclasses.replace(model, num_classes=config.num_classes)
        params = {"features": params["features"]}
    params, keys, data = _place(params, keys, data, int(keys.shape[0]))
    fn = compiled_sweep(model, config, batching, return_params)
    return sharding.gather(fn(params, keys, jnp.asarray(lrs, jnp.float32), data))


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
    if config.spec.warm_start_epochs and (data.beneficial_images is None or
                                          config.batch_size > data.beneficial_labels.shape[0]):
        raise ConfigError(f"attack {config.attack!r} trains on the beneficial fine-tuning data first: "
                          f"AttackData needs beneficial_images/labels (attack_data(protocol) gives "
                          f"them) with at least batch_size={config.batch_size} examples")
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


class Budgets(NamedTuple):
    """The attacker's budgets (issue 12): every attack and scratch run at each.

    Attributes:
      data_per_class: fine-tuning examples per malicious class (``None``: all), see
        :func:`data_budget`; every budget runs in the same compiled program.
      steps_multipliers: multiples of the default epochs. ONE run of
        ``epochs x max(steps_multipliers)`` epochs gives all of them: with a constant
        learning rate, an attacker with budget ``m x epochs`` takes exactly the
        first ``m x epochs`` epochs of the long run (same init, shuffles and
        optimizer state), so its curve is the long curve's prefix and its learning
        rate is re-chosen on that prefix.
    """

    data_per_class: tuple[int | None, ...] = (None,)
    steps_multipliers: tuple[int, ...] = (1,)

    def validate(self) -> "Budgets":
        data = tuple(self.data_per_class)
        steps = tuple(self.steps_multipliers)
        if not data or len(set(data)) != len(data) or any(
                d is not None and (not isinstance(d, (int, np.integer)) or d < 1) for d in data):
            raise ConfigError(f"data_per_class must be distinct integers >= 1 or None (all), got {data}")
        if not steps or len(set(steps)) != len(steps) or any(
                not isinstance(m, (int, np.integer)) or m < 1 for m in steps):
            raise ConfigError(f"steps_multipliers must be distinct integers >= 1, got {steps}")
        return Budgets(data, steps)

    @property
    def headline(self) -> tuple[str, str]:
        """The budget of an entry's top-level numbers: the most data (all, if given) and the
        fewest steps (the old single-budget protocol by default)."""
        most = None if None in self.data_per_class else max(self.data_per_class)
        return budget_key(most), f"{min(self.steps_multipliers)}x"


def budget_key(per_class: int | None) -> str:
    """``None`` -> ``"all"``; ``n`` -> ``"n"`` (the keys of ``entry["budgets"]``)."""
    return "all" if per_class is None else str(int(per_class))


def budget_summaries(curves: Mapping[str, np.ndarray], learning_rates: Sequence[float], *,
                     epochs: int, budgets: Budgets, steps_per_epoch: int,
                     targets: Mapping[str, Mapping[str, float]] | None = None) -> dict[str, Any]:
    """An entry's numbers at every budget from its long runs.

    Args:
      curves: ``{data key: f[L, S, epochs * max(m) + 1]}``.
      targets: ``{data key: {"<m>x": accuracy}}`` for ``steps_to_reach``.
    Returns:
      ``{data key: {"<m>x": {"steps", "epochs", "best_lr", "initial", "final", "best",
      "auc"[, "steps_to_reach"], "per_lr": [{learning_rate, final, auc} means]},
      "curve": [S][E_max+1] at the best lr of the longest budget}}``.
    """
    out = {}
    longest = f"{max(budgets.steps_multipliers)}x"
    for d, c in curves.items():
        per = {}
        for m in budgets.steps_multipliers:
            e = epochs * m
            target = None if targets is None else targets[d][f"{m}x"]
            summary = metrics.sweep_summary(c[..., :e + 1], learning_rates,
                                            steps_per_epoch=steps_per_epoch, target=target)
            summary["per_lr"] = [{"learning_rate": p["learning_rate"], "final": p["final"]["mean"],
                                  "auc": p["auc"]["mean"]} for p in summary["per_lr"]]
            per[f"{m}x"] = {"steps": e * steps_per_epoch, "epochs": e, **summary}
        out[d] = {**per, "curve": c[per[longest]["best_lr_index"]].tolist()}
    return out


def _long_runs(model: models.Model, params: Params, keys: jax.Array, lrs: Sequence[float],
               datas: Mapping[str, AttackData], config: AttackConfig, batching: str
               ) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """One sweep per data budget, all in ONE compiled program (same shapes)."""
    curves, finite = {}, {}
    for d, data in datas.items():
        out = jax.block_until_ready(attack_sweep(model, params, keys, lrs, data, config,
                                                 batching=batching))
        curves[d], finite[d] = np.asarray(out.curve, np.float64), np.asarray(out.finite)
    return curves, finite


def _headline_entry(curves: Mapping[str, np.ndarray], finite: Mapping[str, np.ndarray],
                    lrs: Sequence[float], config: AttackConfig, data: AttackData, epochs: int,
                    budgets: Budgets, scratch: Mapping[str, Any] | None) -> dict[str, Any]:
    """:func:`make_entry` at the headline budget (the old entry, bitwise) plus ``budgets``."""
    d, s = budgets.headline
    e = epochs * int(s[:-1])
    head = AttackOutput(curves[d][..., :e + 1], finite[d])
    entry = make_entry(head, lrs, dataclasses.replace(config, epochs=e), data, scratch=scratch)
    targets = None if scratch is None else {
        dk: {sk: metrics.SCRATCH_FRACTION * b["final"]["mean"] for sk, b in per.items()
             if sk != "curve"} for dk, per in scratch["budgets"].items()}
    entry["budgets"] = budget_summaries(curves, lrs, epochs=epochs, budgets=budgets,
                                        steps_per_epoch=entry["steps_per_epoch"], targets=targets)
    entry["data_per_class"] = [budget_key(x) for x in budgets.data_per_class]
    entry["steps_multipliers"] = list(budgets.steps_multipliers)
    entry["reuse"] = config.spec.reuse
    return entry


def _best_per_budget(per_opt: Sequence[Mapping[str, Any]], optimizers: Sequence[str],
                     budgets: Budgets) -> dict[str, Any]:
    """``entry["budgets"]`` of several optimizers -> at every budget, the one best for the
    attacker (by mean final accuracy at its best lr), tagged with its ``optimizer``."""
    longest = f"{max(budgets.steps_multipliers)}x"
    out = {}
    for d in per_opt[0]:
        per = {}
        for s in (f"{m}x" for m in budgets.steps_multipliers):
            i = metrics.best_over([b[d][s] for b in per_opt])
            per[s] = {**per_opt[i][d][s], "optimizer": optimizers[i]}
        per["curve"] = per_opt[metrics.best_over([b[d][longest] for b in per_opt])][d]["curve"]
        out[d] = per
    return out


def scratch_reference(model: models.Model, keys: jax.Array, protocol: data_lib.ProtocolData, *,
                      learning_rates: Sequence[float] | None = None,
                      optimizer: str | Sequence[str] = "adam",
                      epochs: int | None = None, batch_size: int = 64, batching: str = "auto",
                      data: AttackData | None = None, budgets: Budgets = Budgets()
                      ) -> dict[str, Any]:
    """The scratch reference entry: ``model``'s architecture from random init (per
    seed, :func:`scratch_init`), every parameter trained on the malicious
    fine-tuning split with the attack's budget (``epochs``, ``batch_size``): the
    ``full_finetune`` attack on random models, so it shares its compiled program.

    It is the same for every method under the same protocol, seeds and budget:
    compute it once and pass it to :func:`attack_report` (``scratch=``).

    Args:
      learning_rates: default :data:`SCRATCH_LEARNING_RATES` (the headline is the
        best one for the attacker, :func:`trm_jax.metrics.best_lr_index`).
      optimizer: one name or several; with several, every budget's numbers are those
        of the best (optimizer, learning rate) for the attacker at that budget.
      epochs: default :func:`default_epochs` (the 1x steps budget).
      budgets: data and steps budgets (:class:`Budgets`); scratch gets the same ones as
        the attacks, so every comparison is at equal budget.

    Returns:
      An entry (see :func:`make_entry`) with ``curves: [L][S][E+1]`` at the headline
      budget, ``optimizer`` (the headline's best) and ``budgets`` (each with its ``optimizer``).
    """
    lrs = validate_learning_rates(SCRATCH_LEARNING_RATES if learning_rates is None else learning_rates)
    optimizers = (optimizer,) if isinstance(optimizer, str) else tuple(optimizer)
    budgets = budgets.validate()
    epochs = default_epochs(protocol) if epochs is None else epochs
    data = attack_data(protocol) if data is None else data
    datas = {budget_key(d): data_budget(data, d) for d in budgets.data_per_class}
    start = time.perf_counter()
    params = scratch_init(model, keys)
    per_opt = []
    for opt in optimizers:
        config = AttackConfig("full_finetune", protocol.finetune.malicious.num_classes, opt,
                              epochs * max(budgets.steps_multipliers), batch_size)
        curves, finite = _long_runs(model, params, keys, lrs, datas, config, batching)
        per_opt.append(_headline_entry(curves, finite, lrs, config, data, epochs, budgets, None))
    entry = dict(per_opt[metrics.best_over(per_opt)])
    entry["budgets"] = _best_per_budget([e["budgets"] for e in per_opt], optimizers, budgets)
    entry["optimizers"] = list(optimizers)
    entry["wall_seconds"] = time.perf_counter() - start
    return {**entry, "attack": "scratch", "reuse": False}


def scratch_init(model: models.Model, keys: jax.Array) -> Params:
    """``[S]`` keys -> ``[S, ...]`` randomly initialised models (the scratch reference's
    starting point; the key stream differs from the attack's and from training's)."""
    return model.init_seeds(jax.vmap(jax.random.fold_in, in_axes=(0, None))(keys, _SCRATCH_STREAM))


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
                  budgets: Budgets = Budgets(),
                  scratch_learning_rates: Sequence[float] | None = None,
                  scratch_optimizers: Sequence[str] = ("adam",),
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
      budgets: the attacker's data and steps budgets (:class:`Budgets`); each attack
        runs ``epochs x max(steps)`` epochs once per data budget, all in one program.
        Entries' top-level numbers are at :attr:`Budgets.headline`, ``entry["budgets"]``
        holds every budget.
      scratch_learning_rates, scratch_optimizers: the scratch reference's grid
        (default: :data:`SCRATCH_LEARNING_RATES`, adam); give the attacks' grid for
        comparisons at equal budget.

    Returns:
      ``{"attacks": {name: entry}, "references": {"scratch": entry, ...},
      "summary": {"worst_case": ..., "relative_to_scratch": {name: ...},
      "budgets": {data key: {"<m>x": budget summary}}}}`` with entries as in
      :func:`make_entry` (+ ``budgets``) and budget summaries as in
      :func:`trm_jax.metrics.budget_summary` (+ ``unprotected`` with the reference's
      ``worst`` and ``worst_reuse`` when ``reference_params`` is given).

    Raises:
      ValueError: unknown attack/optimizer, non-positive learning rate, epochs < 1,
        batch size larger than the data or mismatched seeds -- before any compute.
    """
    epochs = default_epochs(protocol) if epochs is None else epochs
    budgets = budgets.validate()
    plan = attack_plan(attacks, learning_rates=learning_rates, optimizers=optimizers,
                       num_classes=protocol.finetune.malicious.num_classes,
                       epochs=epochs * max(budgets.steps_multipliers), batch_size=batch_size)
    data = attack_data(protocol)
    datas = {budget_key(d): data_budget(data, d) for d in budgets.data_per_class}
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
    if scratch is not None and (scratch.get("data_per_class", ["all"]), scratch.get(
            "steps_multipliers", [1])) != ([budget_key(d) for d in budgets.data_per_class],
                                           list(budgets.steps_multipliers)):
        raise ConfigError(f"the given scratch reference has data budgets "
                          f"{scratch.get('data_per_class')} and steps {scratch.get('steps_multipliers')}"
                          f"; this report needs {budgets} (same budget)")

    references: dict[str, Any] = {}
    if scratch is not None:
        references["scratch"] = dict(scratch)
    elif include_scratch:
        references["scratch"] = scratch_reference(
            model, keys, protocol, learning_rates=scratch_learning_rates,
            optimizer=scratch_optimizers, epochs=epochs, batch_size=batch_size,
            batching=batching, data=data, budgets=budgets)
        _say(verbose, "scratch", references["scratch"])
    target = references.get("scratch")

    def run_all(stack: Params, prefix: str) -> dict[str, Any]:
        out = {}
        for name, (config, lrs) in plan.items():
            start = time.perf_counter()
            curves, finite = _long_runs(model, stack, keys, lrs, datas, config, batching)
            entry = _headline_entry(curves, finite, lrs, config, data, epochs, budgets, target)
            out[prefix + name] = {**entry, "attack_name": name,
                                  "wall_seconds": time.perf_counter() - start}
            _say(verbose, prefix + name, out[prefix + name])
        return out

    entries = run_all(params, "")
    unprotected = run_all(reference_params, "unprotected/") if reference_params is not None else {}
    references.update(unprotected)
    summary: dict[str, Any] = {"worst_case": metrics.worst_case(entries)}
    if target is not None:
        summary["relative_to_scratch"] = {n: e["relative_to_scratch"] for n, e in entries.items()}
        summary["budgets"] = report_budgets(entries, target, unprotected or None)
    return {"attacks": entries, "references": references, "summary": summary}


def report_budgets(entries: Mapping[str, Mapping[str, Any]], scratch: Mapping[str, Any],
                   unprotected: Mapping[str, Mapping[str, Any]] | None = None) -> dict[str, Any]:
    """``{data key: {"<m>x": metrics.budget_summary}}`` over ``entries`` (each with
    ``budgets`` and ``reuse``), next to the unprotected reference's worst cases."""
    out: dict[str, Any] = {}
    for d, per in scratch["budgets"].items():
        out[d] = {}
        for s in (k for k in per if k != "curve"):
            at = lambda es: {n: {**e["budgets"][d][s], "attack_name": n, "optimizer": e["optimizer"]}
                             for n, e in es.items()}
            reuse = lambda es: [n for n, e in es.items() if e["reuse"]]
            b = metrics.budget_summary(at(entries), per[s], reuse(entries))
            if unprotected:
                u = metrics.budget_summary(at(unprotected), per[s], reuse(unprotected))
                b["unprotected"] = {"worst": u["worst"], "worst_reuse": u["worst_reuse"]}
            out[d][s] = b
    return out


def _say(verbose: bool, name: str, entry: Mapping[str, Any]) -> None:
    if verbose:
        print(f"[attack] {name}: final {entry['final']['mean']:.3f} +- {entry['final']['std']:.3f}, "
              f"AUC {entry['auc']['mean']:.3f} (lr {entry['best_lr']:g}, "
              f"{entry.get('wall_seconds', float('nan')):.1f}s)", flush=True)
