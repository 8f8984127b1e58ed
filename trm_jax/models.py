"""Functional models split into a *features* part and a *head* part.

Every model's params are a dict ``{"features": ..., "head": ...}``:

* ``features(params["features"], images) -> f32[B, D]``: everything up to and
  including the penultimate layer's *pre-activation*;
* ``head(params["head"], features) -> f32[B, num_classes]``: ReLU + final linear.

So the head can be swapped (``init_head``) and the features frozen by masking
``params["features"]`` out of an optimizer (see :mod:`trm_jax.train`).

Images may be ``uint8[B, H, W, C]`` (normalised to [-1, 1] inside the jitted
code, so datasets stay uint8 on the device) or already floating point.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Literal

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
from trm_jax.errors import ConfigError

Params = Any  # a pytree of arrays
Padding = Literal["VALID", "SAME"]


def to_float(images: chex.Array, dtype: Any = jnp.float32) -> chex.Array:
    """Maps ``uint8[..., H, W, C]`` images to ``[-1, 1]``; float inputs pass through.

    Normalising here (inside jit) keeps the datasets as compact uint8 arrays.
    """
    if jnp.issubdtype(images.dtype, jnp.integer):
        return images.astype(dtype) / 127.5 - 1.0
    return images


class LeNetFeatures(nn.Module):
    """The paper's CIFAR CNN up to the penultimate pre-activation.

    conv 6 k5, ReLU, max-pool 2; conv 16 k5, ReLU, max-pool 2; fc 120, ReLU;
    fc 84 (pre-activation: the head applies the ReLU). On ``32x32x3`` with
    ``VALID`` padding, this plus a 10-way head has exactly 62,006 parameters.
    """

    padding: Padding = "VALID"
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: chex.Array) -> chex.Array:
        dense = lambda n, name: nn.Dense(n, name=name, param_dtype=self.param_dtype, dtype=self.param_dtype)
        conv = lambda n, name: nn.Conv(n, (5, 5), padding=self.padding, name=name,
                                       param_dtype=self.param_dtype, dtype=self.param_dtype)
        x = nn.max_pool(nn.relu(conv(6, "conv1")(x)), (2, 2), (2, 2))
        x = nn.max_pool(nn.relu(conv(16, "conv2")(x)), (2, 2), (2, 2))
        x = x.reshape(x.shape[:-3] + (-1,))
        x = nn.relu(dense(120, "fc1")(x))
        return dense(84, "fc2")(x)


class Conv4Features(nn.Module):
    """The standard MAML Omniglot net: 4 x [conv3x3(64), norm, ReLU, max-pool 2].

    No BatchNorm (its batch statistics complicate meta-learning): ``norm`` is
    ``"none"`` or ``"layer"`` (per-example LayerNorm over H, W, C, pure). The
    last block stops before its ReLU (max-pool and ReLU commute), so the head's
    ReLU completes it. Pooling uses SAME padding so any input >= 1x1 works.
    """

    width: int = 64
    norm: Literal["none", "layer"] = "none"
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: chex.Array) -> chex.Array:
        for i in range(4):
            x = nn.Conv(self.width, (3, 3), padding="SAME", name=f"conv{i + 1}",
                        param_dtype=self.param_dtype, dtype=self.param_dtype)(x)
            if self.norm == "layer":
                x = nn.LayerNorm(reduction_axes=(-3, -2, -1), name=f"norm{i + 1}",
                                 param_dtype=self.param_dtype, dtype=self.param_dtype)(x)
            if i < 3:
                x = nn.relu(x)
            x = nn.max_pool(x, (2, 2), (2, 2), padding="SAME")
        return x.reshape(x.shape[:-3] + (-1,))


class Head(nn.Module):
    """ReLU + the final linear layer."""

    num_classes: int
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, f: chex.Array) -> chex.Array:
        return nn.Dense(self.num_classes, name="dense", param_dtype=self.param_dtype,
                        dtype=self.param_dtype)(nn.relu(f))


@dataclasses.dataclass(frozen=True)
class Model:
    """A features module plus a ``num_classes``-way head, used through pure functions.

    Attributes:
      name: ``"lenet"`` or ``"conv4"``.
      features_module: a linen module mapping images to ``[B, D]`` pre-activations.
      num_classes: outputs of the head.
      input_shape: ``(H, W, C)`` of one image.
      penultimate: name of the last features layer (trainable in the
        ``head_and_penultimate`` attack).
    """

    name: str
    features_module: nn.Module
    num_classes: int
    input_shape: tuple[int, int, int]
    penultimate: str
    param_dtype: Any = jnp.float32
    options: tuple[tuple[str, Any], ...] = ()  # factory kwargs, for `spec()`

    def spec(self) -> dict[str, Any]:
        """A JSON-able description; ``from_spec(model.spec())`` rebuilds the model."""
        return {"name": self.name, "num_classes": self.num_classes,
                "input_shape": list(self.input_shape), **dict(self.options)}

    @property
    def feature_dim(self) -> int:
        x = jax.ShapeDtypeStruct((1, *self.input_shape), self.param_dtype)
        out = jax.eval_shape(lambda k, x: self.features_module.init_with_output(k, x)[0],
                             jax.random.key(0), x)
        return int(out.shape[-1])

    def init(self, key: chex.PRNGKey) -> Params:
        """Returns ``{"features": ..., "head": ...}`` for one seed (vmap over keys for many)."""
        k_features, k_head = jax.random.split(key)
        x = jnp.zeros((1, *self.input_shape), self.param_dtype)
        features = self.features_module.init(k_features, x)["params"]
        return {"features": features, "head": self.init_head(k_head)}

    def init_head(self, key: chex.PRNGKey, num_classes: int | None = None) -> Params:
        """A fresh head (the attack's replacement last layer)."""
        head = Head(num_classes or self.num_classes, self.param_dtype)
        return head.init(key, jnp.zeros((1, self.feature_dim), self.param_dtype))["params"]

    def features(self, features_params: Params, images: chex.Array) -> chex.Array:
        """``images: uint8|float[B, H, W, C] -> f[B, D]`` penultimate pre-activations."""
        return self.features_module.apply({"params": features_params},
                                          to_float(images, self.param_dtype))

    def features_chunked(self, features_params: Params, images: chex.Array,
                         chunk: int = 1024) -> chex.Array:
        """:meth:`features` of a whole set in chunks of ``chunk`` (bounded memory):
        ``images[N, H, W, C] -> f[N, D]``, one ``lax.map`` (the last chunk zero-padded)."""
        n = images.shape[0]
        chunk = max(1, min(chunk, n))
        num_chunks = -(-n // chunk)
        pad = num_chunks * chunk - n
        if pad:
            images = jnp.concatenate([images, jnp.zeros((pad, *images.shape[1:]), images.dtype)])
        out = jax.lax.map(lambda x: self.features(features_params, x),
                          images.reshape(num_chunks, chunk, *images.shape[1:]))
        return out.reshape(num_chunks * chunk, -1)[:n]

    def head(self, head_params: Params, features: chex.Array) -> chex.Array:
        """``features: f[B, D] -> logits f[B, K]`` (ReLU then linear); K from the params."""
        num_classes = head_params["dense"]["bias"].shape[-1]
        return Head(num_classes, self.param_dtype).apply({"params": head_params}, features)

    def apply(self, params: Params, images: chex.Array) -> chex.Array:
        """Full model: ``images[B, H, W, C] -> logits[B, K]``."""
        return self.head(params["head"], self.features(params["features"], images))


def lenet(num_classes: int = 10, input_shape: tuple[int, int, int] = (32, 32, 3),
          padding: Padding = "VALID", param_dtype: Any = jnp.float32) -> Model:
    """The paper's LeNet-style CNN. Use ``padding="SAME"`` for inputs under 32x32."""
    _check_shape(input_shape)
    h, w, _ = input_shape
    if padding == "VALID" and (h < 16 or w < 16):
        raise ConfigError(f"lenet with VALID padding needs inputs of at least 16x16, got "
                         f"{input_shape}; use padding='SAME' for small images such as digits.")
    return Model("lenet", LeNetFeatures(padding, param_dtype), num_classes,
                 tuple(input_shape), "fc2", param_dtype, (("padding", padding),))


def conv4(num_classes: int = 5, input_shape: tuple[int, int, int] = (28, 28, 1),
          width: int = 64, norm: Literal["none", "layer"] = "none",
          param_dtype: Any = jnp.float32) -> Model:
    """The MAML Conv4 net (Finn et al., 2017) without BatchNorm."""
    _check_shape(input_shape)
    if norm not in ("none", "layer"):
        raise ConfigError(f"conv4 norm must be 'none' or 'layer', got {norm!r}")
    return Model("conv4", Conv4Features(width, norm, param_dtype), num_classes,
                 tuple(input_shape), "conv4", param_dtype, (("width", width), ("norm", norm)))


MODELS: dict[str, Callable[..., Model]] = {"lenet": lenet, "conv4": conv4}


def make_model(name: str, **kwargs: Any) -> Model:
    """Builds a model by name (``"lenet"`` or ``"conv4"``)."""
    if name not in MODELS:
        raise ConfigError(f"unknown model {name!r}; known models: {sorted(MODELS)}")
    return MODELS[name](**kwargs)


def from_spec(spec: dict[str, Any]) -> Model:
    """Inverse of :meth:`Model.spec` (as stored in a run's ``config.json``)."""
    spec = dict(spec)
    name = spec.pop("name")
    spec["input_shape"] = tuple(spec["input_shape"])
    return make_model(name, **spec)


def count_params(params: Params) -> int:
    """Total number of scalars in a pytree."""
    return sum(int(x.size) for x in jax.tree_util.tree_leaves(params))


def _check_shape(input_shape: tuple[int, ...]) -> None:
    if len(input_shape) != 3 or any(int(d) < 1 for d in input_shape):
        raise ConfigError(f"input_shape must be (H, W, C) with positive sizes, got {input_shape}")
