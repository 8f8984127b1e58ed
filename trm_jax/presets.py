"""Per-dataset defaults: which model fits the images, and the protocol's settings.

``model_for(dataset, num_classes)`` picks the architecture and padding:
CIFAR-10 uses the paper's LeNet with VALID padding (62,006 params); MNIST (28x28)
also fits VALID; the 8x8 digits need SAME padding; Omniglot uses Conv4.
"""
from __future__ import annotations

from trm_jax import data, models

MODEL_PRESETS: dict[str, tuple[str, dict]] = {
    "cifar10": ("lenet", {"padding": "VALID"}),
    "mnist": ("lenet", {"padding": "VALID"}),
    "digits": ("lenet", {"padding": "SAME"}),
    "omniglot": ("conv4", {}),
}


def model_for(dataset: str, num_classes: int, image_shape: tuple[int, int, int] | None = None,
              name: str | None = None) -> models.Model:
    """The preset model for ``dataset`` (or ``name``) with a ``num_classes``-way head."""
    info = data.dataset_info(dataset)
    default_name, kwargs = MODEL_PRESETS[dataset]
    name = name or default_name
    if name != default_name:
        kwargs = {"padding": "SAME"} if name == "lenet" else {}
    return models.make_model(name, num_classes=num_classes,
                             input_shape=tuple(image_shape or info.image_shape), **kwargs)
