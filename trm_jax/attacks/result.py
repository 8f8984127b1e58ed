"""One typed result for a whole attack sweep, and the pure functions that read it.

:class:`SweepResult` holds every learning curve of a sweep on named axes::

  accuracy: f64[attack, optimizer, lr, seed, data, epoch]     (AXES)

``epoch`` runs over the longest steps budget (``epochs * max(steps_multipliers) + 1``
points, epoch 0 = before fine-tuning); a shorter steps budget is a prefix
(:func:`at_steps`). Where an attack did not run at a learning rate (a lone linear
probe at the paper's 0.1 next to attacks on a grid) the curves are NaN
(:attr:`SweepResult.ran`). The scratch reference is a ``SweepResult`` too (one attack,
``"scratch"``), and so is the unprotected reference attacked the same way.

Everything a report says is a small pure function over it: the attacker's learning rate
(:func:`best_lr`), its choice of optimizer and learning rate per attack
(:func:`attacker_choice`), the worst case over the suite or the reuse attacks
(:func:`worst_case`), the advantage over scratch (:func:`advantage`), steps to 90% of
scratch (:func:`steps_to_fraction`), the budget table (:func:`budget_table`) and the
attacker's search curve (:func:`search_curve`). Means over seeds, population std.
"""
from __future__ import annotations

import dataclasses
import math
from typing import NamedTuple

import numpy as np

from trm_jax.errors import ConfigError

AXES = ("attack", "optimizer", "lr", "seed", "data", "epoch")
#: Steps for the worst attack to reach this fraction of scratch's final accuracy.
SCRATCH_FRACTION = 0.9


@dataclasses.dataclass(frozen=True, eq=False)  # arrays inside: identity, not elementwise ==
class SweepResult:
    """Every curve of an attack sweep (one method's params stack, every seed).

    Attributes:
      accuracy: ``f64[attack, optimizer, lr, seed, data, epoch]`` malicious test accuracy
        (NaN where the attack did not run at that learning rate).
      finite: ``bool[attack, optimizer, lr, seed, data]``: every parameter stayed finite.
      attacks: the labels of the attack axis.
      optimizers: the labels of the optimizer axis.
      learning_rates: the labels of the lr axis.
      data: the data budgets' names (``"5"``, ``"20"``, ``"all"``).
      epochs: the 1x steps budget in epochs.
      steps_multipliers: the steps budgets, multiples of ``epochs``.
      steps_per_epoch: optimizer steps per epoch.
      batch_size: examples per step.
      reuse: per attack, whether it keeps the lower half of the network as released.
      wall_seconds: ``f64[attack, optimizer]`` seconds each attack's sweep took.
      scratch: the scratch reference on the same budgets (attacks ``("scratch",)``).
      unprotected: the unprotected reference attacked the same way, if given.
    """

    accuracy: np.ndarray
    finite: np.ndarray
    attacks: tuple[str, ...]
    optimizers: tuple[str, ...]
    learning_rates: tuple[float, ...]
    data: tuple[str, ...]
    epochs: int
    steps_multipliers: tuple[int, ...]
    steps_per_epoch: int
    batch_size: int
    reuse: tuple[bool, ...]
    wall_seconds: np.ndarray
    scratch: "SweepResult | None" = None
    unprotected: "SweepResult | None" = None

    def __post_init__(self) -> None:
        shape = (len(self.attacks), len(self.optimizers), len(self.learning_rates))
        if self.accuracy.ndim != len(AXES) or self.accuracy.shape[:3] != shape or \
                self.accuracy.shape[4] != len(self.data):
            raise ConfigError(f"accuracy must be [attack={shape[0]}, optimizer={shape[1]}, "
                              f"lr={shape[2]}, seed, data={len(self.data)}, epoch], got "
                              f"{self.accuracy.shape}")
        if self.accuracy.shape[-1] != self.epochs * max(self.steps_multipliers) + 1:
            raise ConfigError(f"the epoch axis must hold epochs * max(steps_multipliers) + 1 = "
                              f"{self.epochs * max(self.steps_multipliers) + 1} points, got "
                              f"{self.accuracy.shape[-1]}")
        if len(self.reuse) != len(self.attacks):
            raise ConfigError(f"reuse needs one flag per attack ({len(self.attacks)}), got {self.reuse}")

    @property
    def num_seeds(self) -> int:
        return int(self.accuracy.shape[3])

    @property
    def steps_keys(self) -> tuple[str, ...]:
        return tuple(f"{m}x" for m in self.steps_multipliers)

    @property
    def ran(self) -> np.ndarray:
        """``bool[attack, optimizer, lr]``: which (attack, optimizer, lr) were run."""
        return ~np.all(np.isnan(self.accuracy), axis=(3, 4, 5))

    def index(self, axis: str, label) -> int:
        """The position of ``label`` on ``axis`` (``"attack"``, ``"optimizer"``, ``"lr"``, ``"data"``)."""
        labels = {"attack": self.attacks, "optimizer": self.optimizers,
                  "lr": self.learning_rates, "data": self.data}[axis]
        if label not in labels:
            raise ConfigError(f"{label!r} is not on the {axis} axis; it holds {list(labels)}")
        return labels.index(label)


def at_steps(result: SweepResult, steps: str) -> np.ndarray:
    """The curves at a steps budget (``"1x"``): ``accuracy[..., :epochs * m + 1]``."""
    if steps not in result.steps_keys:
        raise ConfigError(f"steps budget {steps!r} not in {list(result.steps_keys)}")
    return result.accuracy[..., :result.epochs * int(steps[:-1]) + 1]


def final_means(result: SweepResult, steps: str) -> np.ndarray:
    """``f64[attack, optimizer, lr, data]``: mean over seeds of the final accuracy at a
    steps budget; ``-inf`` where not run (never the attacker's choice)."""
    final = at_steps(result, steps)[..., -1].mean(axis=3)
    return np.where(np.isnan(final), -np.inf, final)


def best_lr(result: SweepResult, steps: str) -> np.ndarray:
    """``int[attack, optimizer, data]``: the attacker's learning rate, ``argmax_l mean_s
    final`` (first on ties), at a steps budget."""
    return np.argmax(final_means(result, steps), axis=2)


class Choice(NamedTuple):
    """An attacker's choice at one data and steps budget, with its per-seed numbers.

    Attributes:
      attack, optimizer, learning_rate: what was chosen.
      final: ``f64[S]`` final accuracy per seed; auc: ``f64[S]`` (mean of epochs 1..E).
      curve: ``f64[S, E+1]``.
    """

    attack: str
    optimizer: str
    learning_rate: float
    final: np.ndarray
    auc: np.ndarray
    curve: np.ndarray


def _choice(result: SweepResult, steps: str, a: int, o: int, l: int, d: int) -> Choice:
    curve = at_steps(result, steps)[a, o, l, :, d]
    return Choice(result.attacks[a], result.optimizers[o], result.learning_rates[l],
                  curve[:, -1], curve[:, 1:].mean(axis=-1), curve)


def attacker_choice(result: SweepResult, data: str, steps: str, attack: str) -> Choice:
    """The best (optimizer, lr) of one attack for the attacker (highest mean final; first on
    ties, optimizers in their order), at a data and steps budget."""
    a, d = result.index("attack", attack), result.index("data", data)
    means = final_means(result, steps)[a, :, :, d]  # [optimizer, lr]
    o, l = np.unravel_index(np.argmax(means), means.shape)
    return _choice(result, steps, a, int(o), int(l), d)


def worst_case(result: SweepResult, data: str, steps: str, *, reuse_only: bool = False
               ) -> Choice | None:
    """The strongest attack (with its best optimizer and lr) at a budget: the highest mean
    final accuracy over the suite, or over its reuse attacks (``None`` if there are none)."""
    attacks = [a for a, r in zip(result.attacks, result.reuse) if r or not reuse_only]
    if not attacks:
        return None
    choices = [attacker_choice(result, data, steps, a) for a in attacks]
    return choices[int(np.argmax([c.final.mean() for c in choices]))]


def scratch_choice(result: SweepResult, data: str, steps: str) -> Choice:
    """Scratch at a budget: its best (optimizer, lr) for the attacker."""
    if result.scratch is None:
        raise ConfigError("this sweep has no scratch reference")
    return attacker_choice(result.scratch, data, steps, "scratch")


def advantage(choice: Choice, scratch: Choice) -> tuple[float, float]:
    """``(advantage_auc, advantage_final)``: mean over seeds, attack minus scratch at the same
    budget (> 0: the protected weights help the attacker more than no weights at all)."""
    return (float(choice.auc.mean() - scratch.auc.mean()),
            float(choice.final.mean() - scratch.final.mean()))


def steps_to_fraction(choice: Choice, target: float, steps_per_epoch: int) -> tuple[float, float]:
    """``(mean steps, fraction of seeds that reach)``: optimizer steps until each seed's curve
    first reaches ``target`` (at epoch resolution); the mean is ``inf`` when a seed never does."""
    hit = choice.curve >= target
    steps = np.where(hit.any(axis=-1), np.argmax(hit, axis=-1) * steps_per_epoch, np.inf)
    return float(steps.mean()), float(np.isfinite(steps).mean())


class BudgetRow(NamedTuple):
    """One attacker budget of a defence: scratch, the two worst cases, and their advantages.

    ``worst_reuse`` and its advantage are ``None`` when the suite has no reuse attack;
    ``steps_to_90`` is ``(mean steps, fraction reached)`` to 90% of scratch's mean final.
    """

    data: str
    steps: str
    scratch: Choice
    worst: Choice
    worst_advantage: tuple[float, float]
    worst_steps_to_90: tuple[float, float]
    worst_reuse: Choice | None
    reuse_advantage: tuple[float, float] | None
    reuse_steps_to_90: tuple[float, float] | None


def budget_table(result: SweepResult) -> list[BudgetRow]:
    """Every (data, steps) budget of ``result``, data-major, as :class:`BudgetRow` s."""
    rows = []
    for d in result.data:
        for s in result.steps_keys:
            sc = scratch_choice(result, d, s)
            target = SCRATCH_FRACTION * float(sc.final.mean())
            worst, reuse = worst_case(result, d, s), worst_case(result, d, s, reuse_only=True)
            rows.append(BudgetRow(
                d, s, sc, worst, advantage(worst, sc),
                steps_to_fraction(worst, target, result.steps_per_epoch), reuse,
                None if reuse is None else advantage(reuse, sc),
                None if reuse is None else steps_to_fraction(reuse, target, result.steps_per_epoch)))
    return rows


def search_curve(result: SweepResult, data: str, steps: str) -> np.ndarray:
    """The attacker's search curve: ``f64[N]``, entry ``n - 1`` = the expected best mean final
    accuracy after ``n`` distinct (attack, optimizer, lr) trials drawn uniformly at random
    from the ``N`` the sweep ran, ``n = 1..N`` (the last is the worst case of the suite).

    With the values sorted ascending, ``v_(1) <= ... <= v_(N)``, the best of a random
    ``n``-subset is ``v_(k)`` with probability ``C(k-1, n-1) / C(N, n)``.
    """
    values = final_means(result, steps)[..., result.index("data", data)]
    v = np.sort(values[np.isfinite(values)])
    big_n = v.size
    out = np.empty(big_n)
    for n in range(1, big_n + 1):
        weights = np.array([math.comb(k - 1, n - 1) for k in range(1, big_n + 1)], dtype=np.float64)
        out[n - 1] = float(weights @ v) / math.comb(big_n, n)
    return out
