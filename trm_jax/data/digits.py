"""A TFDS builder over scikit-learn's handwritten digits: real data, fully offline.

scikit-learn ships the UCI "Optical Recognition of Handwritten Digits" test set
(1,797 grey 8x8 images, classes 0-9, pixel values 0-16) inside its wheel, so this
builder needs no network. Pixels are rescaled to uint8 as ``round(v * 255 / 16)``.

Fixed, stratified split (seed 0): ``test`` holds 50 images of every class (500),
``train`` the other 1,297 in a fixed shuffled order, so that every prefix of
``train`` is roughly class-balanced and the protocol's pre-training / fine-tuning
slices (``train[:800]`` / ``train[800:]``) both contain every class.

Importing this module imports TensorFlow Datasets: only :mod:`trm_jax.data`
imports it, lazily.
"""
from __future__ import annotations

import numpy as np
import tensorflow_datasets as tfds

TEST_PER_CLASS = 50
SPLIT_SEED = 0


def digits_split() -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """``{"train": (uint8[1297, 8, 8, 1], int64[1297]), "test": (uint8[500, ...], ...)}``."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = np.round(digits.images * (255.0 / 16.0)).astype(np.uint8)[..., None]
    labels = digits.target.astype(np.int64)
    rng = np.random.default_rng(SPLIT_SEED)
    test_idx = np.concatenate([
        rng.permutation(np.flatnonzero(labels == c))[:TEST_PER_CLASS] for c in range(10)])
    train_idx = rng.permutation(np.setdiff1d(np.arange(len(labels)), test_idx))
    test_idx = rng.permutation(test_idx)
    return {"train": (images[train_idx], labels[train_idx]),
            "test": (images[test_idx], labels[test_idx])}


class SklearnDigits(tfds.core.GeneratorBasedBuilder):
    """scikit-learn's 8x8 handwritten digits, split 1,297 train / 500 test."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Initial release (stratified 1,297 / 500 split, seed 0)."}

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(
            builder=self,
            description="scikit-learn's copy of the UCI handwritten digits (8x8, grey).",
            features=tfds.features.FeaturesDict({
                "image": tfds.features.Image(shape=(8, 8, 1)),
                "label": tfds.features.ClassLabel(num_classes=10),
            }),
            supervised_keys=("image", "label"),
            homepage="https://scikit-learn.org/stable/datasets/toy_dataset.html#digits-dataset",
        )

    def _split_generators(self, dl_manager):
        del dl_manager  # nothing to download: the data ships with scikit-learn
        return {name: self._generate_examples(images, labels)
                for name, (images, labels) in digits_split().items()}

    def _generate_examples(self, images, labels):
        for i, (image, label) in enumerate(zip(images, labels)):
            yield i, {"image": image, "label": int(label)}
