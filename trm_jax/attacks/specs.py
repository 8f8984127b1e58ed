"""What an attack is, as data: stages composed into an :class:`AttackSpec`, and the suite.

An attack on a released model is a short program of *stages*, applied in order:

* preludes, on the released model: :class:`WarmStart` (train everything with the
  released head on the beneficial data first), :class:`Reinit` (fresh random values
  for some layers);
* then the attacker's fresh head, and the training stages: :class:`Probe` (the head
  alone for a few epochs, LP-FT) and :class:`FineTune` (the named parts trainable, the
  rest bitwise frozen), or :class:`LinearProbe` (a head on features computed once).

Parts are named symbolically and resolved against the model (:func:`resolve_parts`):
``"head"``, ``"penultimate"`` (the last features layer), ``"top:k"`` (the top ``k``
of :attr:`trm_jax.models.Model.feature_layers`), ``"all"``, or ``features/<layer>``.

A new attack is one composition plus its test::

  register(AttackSpec("reinit_top2_sgd_probe",
                      (Reinit(("top:2",)), Probe(2), FineTune(("head", "top:2"))), reuse=True))
"""
from __future__ import annotations

import dataclasses
import math
from typing import Iterable, Sequence, Union

import numpy as np

from trm_jax import models, train, validate
from trm_jax.errors import ConfigError


@dataclasses.dataclass(frozen=True)
class WarmStart:
    """Prelude: ``epochs`` epochs of every parameter with the *released* head on the
    beneficial fine-tuning data (same optimizer and learning rate, its own optimizer
    state): moves the weights out of a region shaped against fine-tuning. Epoch 0 of
    the curve is after it."""

    epochs: int


@dataclasses.dataclass(frozen=True)
class Reinit:
    """Prelude: the named ``parts`` get fresh random values (under the fresh head)."""

    parts: tuple[str, ...]


@dataclasses.dataclass(frozen=True)
class Probe:
    """Training stage: the fresh head alone for ``epochs`` epochs; the next stage gets a
    fresh optimizer state (LP-FT, Kumar et al., 2022)."""

    epochs: int


@dataclasses.dataclass(frozen=True)
class FineTune:
    """Training stage (the last): ``trainable`` parts trained for the remaining epochs,
    everything else bitwise frozen. ``("all",)``: every parameter."""

    trainable: tuple[str, ...]


@dataclasses.dataclass(frozen=True)
class LinearProbe:
    """The whole attack: a fresh head on frozen features, which are computed ONCE per
    seed (the hot path; bitwise the frozen features of masking them out of the optimizer).

    ``standardize``: standardise each feature with the mean and std of the attacker's
    fine-tuning features, ``z = (f - mu) / max(sd, 1e-6)``, and train a linear
    classifier on ``z`` (no ReLU: it would drop the half that standardising recovers).
    Undoes activation scaling such as SKD's -100 targets."""

    standardize: bool = False


Stage = Union[WarmStart, Reinit, Probe, FineTune, LinearProbe]
PRELUDES = (WarmStart, Reinit)


@dataclasses.dataclass(frozen=True)
class AttackSpec:
    """One attack: a name, its stages, and whether it is a *reuse* attack.

    Attributes:
      name: the entry's name in reports.
      stages: preludes (:class:`WarmStart`, :class:`Reinit`), then :class:`Probe`
        (optional) and one :class:`FineTune`; or a lone :class:`LinearProbe`.
      reuse: the attack keeps at least the lower half of the protected network (its
        bottom ``L/2`` features layers) as released: the *reuse* worst case judges a
        defence by what an attacker gets out of its weights.
      description: one line for ``--help`` and the README.
    """

    name: str
    stages: tuple[Stage, ...]
    reuse: bool = False
    description: str = ""

    def __post_init__(self) -> None:
        stages = tuple(self.stages)
        kinds = [type(s) for s in stages]
        if kinds == [LinearProbe]:
            return
        if not kinds or kinds[-1] is not FineTune or kinds.count(FineTune) != 1:
            raise ConfigError(f"attack {self.name!r}: stages must end with one FineTune (or be one "
                              f"LinearProbe), got {[k.__name__ for k in kinds]}")
        order = {WarmStart: 0, Reinit: 1, Probe: 2, FineTune: 3}
        if any(k not in order for k in kinds) or [order[k] for k in kinds] != sorted(
                order[k] for k in kinds) or len(set(kinds)) != len(kinds):
            raise ConfigError(f"attack {self.name!r}: stages must be in the order WarmStart, Reinit, "
                              f"Probe, FineTune, each at most once; got {[k.__name__ for k in kinds]}")
        for s in stages:
            if isinstance(s, (WarmStart, Probe)) and (not isinstance(s.epochs, int) or s.epochs < 1):
                raise ConfigError(f"attack {self.name!r}: {type(s).__name__}.epochs must be an "
                                  f"integer >= 1, got {s.epochs!r}")

    def stage(self, kind: type) -> Stage | None:
        """The stage of type ``kind``, or ``None``."""
        return next((s for s in self.stages if isinstance(s, kind)), None)

    @property
    def frozen_features(self) -> bool:
        return self.stage(LinearProbe) is not None

    @property
    def standardize(self) -> bool:
        probe = self.stage(LinearProbe)
        return bool(probe and probe.standardize)

    @property
    def trainable(self) -> tuple[str, ...]:
        tune = self.stage(FineTune)
        return ("head",) if tune is None else tuple(tune.trainable)

    @property
    def reinit(self) -> tuple[str, ...]:
        stage = self.stage(Reinit)
        return () if stage is None else tuple(stage.parts)

    @property
    def warm_start_epochs(self) -> int:
        stage = self.stage(WarmStart)
        return 0 if stage is None else stage.epochs

    @property
    def probe_epochs(self) -> int:
        stage = self.stage(Probe)
        return 0 if stage is None else stage.epochs


#: The attack suite, in report order. ``reinit_penultimate`` is ``reinit_top1``: the top
#: ``k`` features layers (lenet: conv1 conv2 fc1 fc2; conv4: conv1..conv4) fresh and trained
#: with the head on the frozen layers below; ``k = L = 4`` is the scratch reference itself.
ATTACK_SPECS: dict[str, AttackSpec] = {s.name: s for s in (
    AttackSpec("linear_probe", (LinearProbe(),), reuse=True,
               description="the paper's: a fresh head on frozen features"),
    AttackSpec("standardized_probe", (LinearProbe(standardize=True),), reuse=True,
               description="a linear classifier on frozen features standardised with the "
                           "attacker's data (undoes activation scaling such as SKD's -100)"),
    AttackSpec("head_and_penultimate", (FineTune(("head", "penultimate")),), reuse=True,
               description="fresh head; the last features layer trainable too (can re-learn "
                           "an activation mask's bias)"),
    AttackSpec("reinit_penultimate", (Reinit(("penultimate",)), FineTune(("head", "penultimate"))),
               reuse=True,
               description="fresh head and a freshly initialised penultimate layer on the "
                           "frozen layers below (reinit top 1; the adaptive attack on "
                           "activation masking)"),
    AttackSpec("reinit_top2", (Reinit(("top:2",)), FineTune(("head", "top:2"))), reuse=True,
               description="fresh head and the top 2 features layers freshly initialised and "
                           "trained, the bottom half frozen"),
    AttackSpec("reinit_top3", (Reinit(("top:3",)), FineTune(("head", "top:3"))),
               description="fresh head and the top 3 features layers freshly initialised and "
                           "trained: only the first layer reused (close to scratch)"),
    AttackSpec("full_finetune", (FineTune(("all",)),), reuse=True,
               description="fresh head, every parameter trainable"),
    AttackSpec("warm_start", (WarmStart(2), FineTune(("all",))), reuse=True,
               description="2 epochs on the beneficial fine-tuning data with the released "
                           "head, then full fine-tuning with a fresh head"),
    AttackSpec("probe_then_finetune", (Probe(3), FineTune(("all",))), reuse=True,
               description="two stages: 3 epochs of linear probe, then full fine-tuning "
                           "(fresh optimizer state)"),
)}
#: The built-in suite's names (``"all"`` is every registered attack, :func:`register`).
ATTACKS = tuple(ATTACK_SPECS)
#: Optimizers of the ``"all"`` suite: Adam (b1 0.9, b2 0.999) and SGD with momentum 0.9.
SUITE_OPTIMIZERS = ("adam", "momentum")
#: The skeptic's grid (issue 12): 9 learning rates, half-decades from 1e-5 to 1e-1, and
#: three optimizers (MLAC searches 1e-5..1e-2; SOPHON's protection held only at SGD 1e-4).
WIDE_LEARNING_RATE_GRID = tuple(float(f"{x:.3g}") for x in np.logspace(-5, -1, 9))
WIDE_OPTIMIZERS = ("sgd", "momentum", "adam")
#: The paper's linear-probe learning rate (Adam).
PAPER_LEARNING_RATE = 0.1
#: The learning-rate grid of the ``"all"`` suite (and of non-probe attacks by default).
LEARNING_RATE_GRID = (1e-4, 1e-3, 1e-2, 1e-1)
#: Scratch training (Adam) sweeps these; the attacker's best one is the reference.
SCRATCH_LEARNING_RATES = (1e-3, 1e-2)
BATCHINGS = ("auto", "vmap", "map")


def register(spec: AttackSpec) -> AttackSpec:
    """Adds ``spec`` to the suite (after the built-in attacks); a name may be used once."""
    if not isinstance(spec, AttackSpec):
        raise ConfigError(f"register needs an AttackSpec, got {type(spec).__name__}")
    if spec.name in ATTACK_SPECS or spec.name in ("all", "scratch"):
        raise ConfigError(f"attack name {spec.name!r} is taken; taken: {(*ATTACK_SPECS, 'all', 'scratch')}")
    ATTACK_SPECS[spec.name] = spec
    return spec


def unregister(name: str) -> None:
    """Removes an attack added by :func:`register` (the built-in ones stay)."""
    if name not in ATTACKS:
        ATTACK_SPECS.pop(name, None)


@dataclasses.dataclass(frozen=True)
class AttackConfig:
    """One attack with one optimizer (hashable: a static argument of the compiled sweep).

    Attributes:
      attack: a name of :data:`ATTACK_SPECS`.
      num_classes: classes of the malicious task (the fresh head's outputs).
      optimizer: ``"adam"`` | ``"momentum"`` | ``"sgd"`` (:func:`trm_jax.train.make_optimizer`).
      epochs: fine-tuning epochs ``E`` (>= 1); curves have ``E + 1`` points.
      batch_size: examples per step; each epoch is a fresh per-seed shuffle and drops the
        last partial batch (``N // batch_size`` steps).
      b1: Adam's first-moment decay (the paper: 0.9).
      momentum: for ``"momentum"``.
      eval_batch_size: chunk size for test evaluation and feature extraction.
      precompute_features: for a :class:`LinearProbe`, train the head on features computed
        once (fast); ``False`` masks the frozen features out of the optimizer instead (same
        curves; used to test the shortcut).
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

    DOMAINS = {"attack": validate.Str(), "num_classes": validate.Int(2),
               "optimizer": validate.Choice(train.OPTIMIZERS), "epochs": validate.COUNT,
               "batch_size": validate.COUNT, "b1": validate.DECAY, "momentum": validate.DECAY,
               "eval_batch_size": validate.COUNT, "precompute_features": validate.Bool()}

    def __post_init__(self):
        validate_config(self)

    @property
    def spec(self) -> AttackSpec:
        return ATTACK_SPECS[self.attack]

    @property
    def frozen_features(self) -> bool:
        """True when the attack trains the head on precomputed features."""
        return self.spec.frozen_features and self.precompute_features


def validate_config(config: AttackConfig) -> None:
    """Raises :class:`~trm_jax.errors.ConfigError` naming the bad value and what is allowed."""
    validate.check_fields(config)
    if config.attack not in ATTACK_SPECS:
        raise ConfigError(f"unknown attack {config.attack!r}; allowed: {tuple(ATTACK_SPECS)}")
    if config.optimizer not in train.OPTIMIZERS:
        raise ConfigError(f"unknown optimizer {config.optimizer!r}; allowed: {train.OPTIMIZERS}")
    if not isinstance(config.epochs, (int, np.integer)) or config.epochs < 1:
        raise ConfigError(f"attack epochs must be an integer >= 1, got {config.epochs!r}")
    if config.batch_size < 1:
        raise ConfigError(f"batch_size must be >= 1, got {config.batch_size}")
    if config.eval_batch_size < 1:
        raise ConfigError(f"eval_batch_size must be >= 1, got {config.eval_batch_size}")
    if config.num_classes < 2:
        raise ConfigError(f"num_classes must be >= 2, got {config.num_classes}")
    probe = config.spec.probe_epochs
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
    """``"all"`` -> every attack of :data:`ATTACK_SPECS`; names are checked against them."""
    if isinstance(attacks, str):
        attacks = tuple(ATTACK_SPECS) if attacks == "all" else (attacks,)
    attacks = tuple(attacks)
    bad = [a for a in attacks if a not in ATTACK_SPECS]
    if bad or not attacks:
        raise ConfigError(f"unknown attack(s) {bad or attacks}; allowed: {tuple(ATTACK_SPECS)} or "
                          f"'all' (the scratch reference is not an attack: it is always computed "
                          f"unless turned off)")
    return attacks


def resolve_parts(model: models.Model, parts: Sequence[str]) -> tuple[str, ...]:
    """Symbolic parts of a stage -> param path prefixes of ``model`` (``"all"`` stays)."""
    layers = model.feature_layers
    names = {"head": "head", "penultimate": f"features/{model.penultimate}", "all": "all"}
    out = []
    for part in parts:
        if part.startswith("top:"):
            k = int(part[4:])
            if not 1 <= k < len(layers):
                raise ConfigError(f"{part!r}: k must be in 1..{len(layers) - 1} for {model.name} "
                                  f"(k = {len(layers)} re-initialises everything: the scratch "
                                  f"reference)")
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
