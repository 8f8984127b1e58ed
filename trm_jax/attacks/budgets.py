"""The attacker's data on the device, and the attacker's budgets (data per class, steps).

Every data budget is a subset of the malicious fine-tuning split *tiled* to the
full size (:func:`data_budget`), so every budget runs in the same compiled
program; steps budgets are prefixes of one long run (:class:`Budgets`).
"""
from __future__ import annotations

from typing import NamedTuple

import jax
import numpy as np

from trm_jax import data as data_lib
from trm_jax import datasets
from trm_jax.errors import ConfigError


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


def attack_data(protocol: data_lib.ProtocolData) -> AttackData:
    """The malicious fine-tuning and test halves of ``protocol``, put on the device once."""
    ft, te, ben = protocol.finetune.malicious, protocol.test.malicious, protocol.finetune.beneficial
    return AttackData(*(jax.device_put(a) for a in (ft.images, ft.labels, te.images, te.labels,
                                                    ben.images, ben.labels)))


def budget_indices(labels: np.ndarray, per_class: int | None, *, seed: int = 0) -> np.ndarray:
    """``int[N]``: which fine-tuning example fills each of the ``N`` slots at a data budget.

    The subset is the first ``per_class`` of each class in a fixed permutation (``seed``;
    the same for every seed, method and reference, so all compare on the same examples),
    interleaved, then tiled to ``N``: each kept example appears ``floor(N / n)`` or
    ``ceil(N / n)`` times per epoch. ``None`` (all): ``arange(N)``.
    """
    labels = np.asarray(labels)
    if per_class is None:
        return np.arange(labels.shape[0])
    if not isinstance(per_class, (int, np.integer)) or per_class < 1:
        raise ConfigError(f"attacker data per class must be an integer >= 1 or None (all), got "
                          f"{per_class!r}")
    order = np.random.default_rng(seed).permutation(labels.shape[0])
    keep = np.concatenate([order[labels[order] == c][:per_class] for c in np.unique(labels)])
    keep = np.random.default_rng(seed + 1).permutation(keep)  # classes interleaved in the tiling
    return keep[np.arange(labels.shape[0]) % keep.shape[0]]


def data_budget(data: AttackData, per_class: int | None, *, seed: int = 0) -> AttackData:
    """The attacker's data budget: ``per_class`` fine-tuning examples of each class
    (``None``: all), tiled to the full set's size ``N`` (:func:`budget_indices`).

    Tiling keeps every array's shape, so every budget runs in the SAME compiled program,
    and an epoch is ``N // batch_size`` steps at every budget.
    """
    if per_class is None:
        return data
    idx = budget_indices(np.asarray(data.finetune_labels), per_class, seed=seed)
    return data._replace(finetune_images=data.finetune_images[idx],
                         finetune_labels=data.finetune_labels[idx])


def default_epochs(protocol: data_lib.ProtocolData) -> int:
    """The dataset's ``attack_epochs`` (:mod:`trm_jax.datasets`). Digits: 262 malicious
    fine-tuning images, 4 steps of 64 per epoch, so 10 epochs = 40 steps (scratch
    reaches ~0.97 in them); CIFAR-10 (5,000 images): 10 epochs = 780 steps."""
    return datasets.get(protocol.spec.dataset).attack_epochs


def steps_per_epoch(data: AttackData, batch_size: int) -> int:
    """Optimizer steps per attack epoch: ``N // batch_size``."""
    return data.num_finetune // batch_size


class Budgets(NamedTuple):
    """The attacker's budgets (issue 12): every attack and scratch run at each.

    Attributes:
      data_per_class: fine-tuning examples per malicious class (``None``: all), see
        :func:`data_budget`; every budget runs in the same compiled program.
      steps_multipliers: multiples of the default epochs. ONE run of
        ``epochs x max(steps_multipliers)`` epochs gives all of them: with a constant
        learning rate, an attacker with budget ``m x epochs`` takes exactly the first
        ``m x epochs`` epochs of the long run (same init, shuffles and optimizer state),
        so its curve is the long curve's prefix and its learning rate is re-chosen on
        that prefix.
    """

    data_per_class: tuple[int | None, ...] = (None,)
    steps_multipliers: tuple[int, ...] = (1,)

    def validate(self) -> "Budgets":
        data = tuple(self.data_per_class)
        steps = tuple(self.steps_multipliers)
        if not data or len(set(data)) != len(data) or any(
                d is not None and (not isinstance(d, (int, np.integer)) or d < 1) for d in data):
            raise ConfigError(f"data_per_class must be distinct integers >= 1 or None (all), got {data}",
                              field="data_per_class")
        if not steps or len(set(steps)) != len(steps) or any(
                not isinstance(m, (int, np.integer)) or m < 1 for m in steps):
            raise ConfigError(f"steps_multipliers must be distinct integers >= 1, got {steps}",
                              field="steps_multipliers")
        return Budgets(data, steps)

    def resolve(self, labels: np.ndarray) -> "Budgets":
        """The budgets as they are used on the fine-tuning ``labels``: a data budget of at
        least the largest class's count takes every example of every class, i.e. all the
        data, and becomes ``None`` ("all", run as "all": the same examples in the same order);
        one that repeats an earlier budget this way is dropped.

        Why "all" and not a refusal: a researcher who asks for 1000 per class of a split
        with 59 expects all of them (a sweep over datasets of different sizes stays
        runnable), but must not read "1000" in the results as the budget that was used.
        A budget between the smallest and the largest class's count keeps its number: it
        does cap the larger classes."""
        counts = np.bincount(np.asarray(labels)) if np.size(labels) else np.zeros(1, int)
        whole = int(counts.max())
        data = tuple(dict.fromkeys(None if d is not None and d >= whole else d
                                   for d in self.data_per_class))
        return Budgets(data, tuple(self.steps_multipliers))

    @property
    def data_keys(self) -> tuple[str, ...]:
        """``("5", "20", "all")``: the data budgets' names in reports (:func:`budget_key`)."""
        return tuple(budget_key(d) for d in self.data_per_class)

    @property
    def steps_keys(self) -> tuple[str, ...]:
        """``("1x", "4x")``: the steps budgets' names in reports."""
        return tuple(f"{m}x" for m in self.steps_multipliers)

    @property
    def headline(self) -> tuple[str, str]:
        """The budget of an entry's top-level numbers: the most data (all, if given) and the
        fewest steps (the old single-budget protocol by default)."""
        most = None if None in self.data_per_class else max(self.data_per_class)
        return budget_key(most), f"{min(self.steps_multipliers)}x"


def budget_key(per_class: int | None) -> str:
    """``None`` -> ``"all"``; ``n`` -> ``"n"`` (the keys of ``entry["budgets"]``)."""
    return "all" if per_class is None else str(int(per_class))
