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

import contextlib
import contextvars
import dataclasses
import functools
from typing import Any, Callable, Iterator, Literal, Sequence

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
from trm_jax import compilation
from trm_jax.errors import ConfigError

Params = Any  # a pytree of arrays
Padding = Literal["VALID", "SAME"]
ConvImpl = Literal["auto", "lax", "im2col"]
CONV_IMPLS = ("auto", "lax", "im2col")


def to_float(images: chex.Array, dtype: Any = jnp.float32) -> chex.Array:
    """Maps ``uint8[..., H, W, C]`` images to ``[-1, 1]``; float inputs pass through.

    Normalising here (inside jit) keeps the datasets as compact uint8 arrays.
    """
    if jnp.issubdtype(images.dtype, jnp.integer):
        return images.astype(dtype) / 127.5 - 1.0
    return images


# ------------------------------------------------------------------ conv and pool kernels
# Two formulations of a convolution, same maths, chosen per backend and use (measured,
# see BENCHMARKS.md): XLA:CPU's convolution *input* gradients are slow for LeNet's tiny
# channel counts, which second-order meta-gradients need at every inner step, whereas
# shifted slices + one 2-D ``dot`` differentiate into dots and pads; for first-order
# training on cpu, and on GPU (cuDNN), ``lax.conv`` wins. Max-pooling as reshape + max
# with a mask JVP is exact (its derivatives of every order are selections) where
# ``reduce_window``'s second derivative runs at reduced precision on GPU, is cheaper
# on CPU, and compiles faster.


# What ``conv_impl="auto"`` means on cpu while a function is being traced; the
# meta-learning code sets it to "im2col" (see ``auto_conv_impl``).
_AUTO_CPU_CONV: contextvars.ContextVar[str] = contextvars.ContextVar("trm_jax_auto_cpu_conv",
                                                                    default="lax")


def resolve_conv_impl(impl: str, backend: str | None = None) -> str:
    """Maps ``"auto"`` to a concrete convolution for ``backend`` (default: JAX's).

    * ``"lax"``: ``lax.conv_general_dilated`` (cuDNN on GPU).
    * ``"im2col"``: the ``kh * kw`` shifted slices of the input concatenated on
      the channel axis, then ONE 2-D ``dot`` with the kernel reshaped to
      ``[kh * kw * C, O]`` (see :func:`im2col_conv`). Same maths; float32 sums
      are taken in another order, so the last bits differ.

    ``"auto"`` is ``"lax"`` on gpu/tpu and for ordinary training on cpu (measured
    fastest there, see BENCHMARKS.md); under :func:`auto_conv_impl` on cpu (which
    :mod:`trm_jax.meta` uses while tracing second-order meta-gradients, where
    XLA:CPU's convolution input gradients are slow) it is that context's choice.
    """
    if impl not in CONV_IMPLS:
        raise ConfigError(f"conv_impl must be one of {CONV_IMPLS}, got {impl!r}")
    if impl != "auto":
        return impl
    return _AUTO_CPU_CONV.get() if (backend or jax.default_backend()) == "cpu" else "lax"


@contextlib.contextmanager
def auto_conv_impl(impl: str) -> Iterator[None]:
    """Within this block, ``conv_impl="auto"`` resolves to ``impl`` on cpu while tracing.

    A trace-time setting (like ``jax.default_matmul_precision``): use it inside
    the function that is jitted, so every trace of that function sees the same
    choice. Models built with an explicit ``conv_impl`` ignore it.
    """
    if impl not in ("lax", "im2col"):
        raise ConfigError(f"auto_conv_impl takes 'lax' or 'im2col', got {impl!r}")
    token = _AUTO_CPU_CONV.set(impl)
    try:
        yield
    finally:
        _AUTO_CPU_CONV.reset(token)


def im2col_conv(lhs: chex.Array, rhs: chex.Array, window_strides: Sequence[int],
                padding: str | Sequence[tuple[int, int]], lhs_dilation: Any = None,
                rhs_dilation: Any = None, dimension_numbers: Any = None,
                feature_group_count: int = 1, precision: Any = None,
                **kwargs: Any) -> chex.Array:
    """``lax.conv_general_dilated`` for NHWC x HWIO as shifted slices + one 2-D ``dot``.

    ``lhs: f[B, H, W, C]``, ``rhs: f[kh, kw, C, O] -> f[B, H', W', O]``. Only stride 1,
    no dilation and one feature group are rewritten (all this project's models use);
    anything else falls back to ``lax.conv_general_dilated`` with the same arguments.
    Slicing + concatenating is what XLA:CPU runs fastest: ``lax.conv_general_dilated_patches``
    (itself a convolution) was 2.3x slower, and ``einsum`` over the stacked slices no faster.
    """
    plain = (tuple(window_strides) == (1, 1) and feature_group_count == 1 and not kwargs
             and all(d is None or tuple(d) == (1, 1) for d in (lhs_dilation, rhs_dilation))
             and lhs.ndim == 4 and _is_nhwc(dimension_numbers))
    if not plain:
        return jax.lax.conv_general_dilated(
            lhs, rhs, window_strides, padding, lhs_dilation=lhs_dilation,
            rhs_dilation=rhs_dilation, dimension_numbers=dimension_numbers,
            feature_group_count=feature_group_count, precision=precision, **kwargs)
    kh, kw, c, o = rhs.shape
    if isinstance(padding, str):
        padding = jax.lax.padtype_to_pads(lhs.shape[1:3], (kh, kw), (1, 1), padding)
    padding = [tuple(p) for p in padding]
    if any(p != (0, 0) for p in padding):
        lhs = jnp.pad(lhs, [(0, 0), *padding, (0, 0)])
    b, h, w, _ = lhs.shape
    ho, wo = h - kh + 1, w - kw + 1
    patches = jnp.concatenate([lhs[:, i:i + ho, j:j + wo, :]
                               for i in range(kh) for j in range(kw)], axis=-1)
    out = jax.lax.dot(patches.reshape(b * ho * wo, kh * kw * c), rhs.reshape(kh * kw * c, o),
                      precision=precision)
    return out.reshape(b, ho, wo, o)


def _is_nhwc(dimension_numbers: Any) -> bool:
    if dimension_numbers is None:  # lax's default is NCHW: not ours to rewrite
        return False
    if isinstance(dimension_numbers, jax.lax.ConvDimensionNumbers):
        return dimension_numbers == jax.lax.conv_dimension_numbers(
            (1, 1, 1, 1), (1, 1, 1, 1), ("NHWC", "HWIO", "NHWC"))
    return tuple(dimension_numbers) == ("NHWC", "HWIO", "NHWC")


def conv_fn(impl: str = "auto") -> Callable[..., chex.Array]:
    """A ``conv_general_dilated`` for ``flax.linen.Conv``, picked per backend at trace time."""
    def conv(*args: Any, **kwargs: Any) -> chex.Array:
        if resolve_conv_impl(impl) == "im2col":
            return im2col_conv(*args, **kwargs)
        return jax.lax.conv_general_dilated(*args, **kwargs)
    return conv


def max_pool(x: chex.Array, window: int = 2, padding: Padding = "VALID") -> chex.Array:
    """Non-overlapping ``window x window`` max-pooling of ``x[..., H, W, C]``.

    Equals ``nn.max_pool(x, (window,) * 2, (window,) * 2, padding)`` in value and in
    derivatives of every order: ``VALID`` drops the last ``H % window`` rows (and
    columns), ``SAME`` pads them with ``-inf`` at the end; the derivative routes each
    output's tangent to the *first* maximum of its window in row-major order (as
    ``reduce_window``'s ``select_and_scatter`` and PyTorch do). Written as reshape +
    max with a hand-written JVP (a 0/1 mask times the tangent, linear, so its
    transpose and its own derivatives are exact): cheaper on CPU than ``jnp.max``'s
    generic rule (which divides by the number of ties), exact on GPU where
    ``reduce_window``'s second derivative runs at reduced precision, and faster
    to compile than either.
    """
    *batch, h, w, c = x.shape
    if padding == "SAME":
        ph, pw = -h % window, -w % window
        if ph or pw:
            pads = [(0, 0)] * len(batch) + [(0, ph), (0, pw), (0, 0)]
            x = jnp.pad(x, pads, constant_values=-jnp.inf)
    elif padding != "VALID":
        raise ConfigError(f"max_pool padding must be 'VALID' or 'SAME', got {padding!r}")
    h2, w2 = x.shape[-3] // window, x.shape[-2] // window
    x = x[..., :h2 * window, :w2 * window, :]
    return _window_max(x.reshape(*batch, h2, window, w2, window, c))


@jax.custom_jvp
def _window_max(x: chex.Array) -> chex.Array:
    """``x[..., H2, k, W2, k, C] -> max over the two k axes``, first-max derivative."""
    return jnp.max(x, axis=(-4, -2))


@_window_max.defjvp
def _window_max_jvp(primals: tuple[chex.Array], tangents: tuple[chex.Array]
                    ) -> tuple[chex.Array, chex.Array]:
    (x,), (t,) = primals, tangents
    y = _window_max(x)
    return y, jnp.sum(jnp.where(_first_max_mask(x, y), t, 0), axis=(-4, -2))


def _first_max_mask(x: chex.Array, y: chex.Array) -> chex.Array:
    """``bool[..., H2, k, W2, k, C]``: True at the first (row-major) maximum of each window."""
    *batch, h2, k, w2, _, c = x.shape
    hits = x == jnp.expand_dims(y, (-4, -2))
    flat = jnp.moveaxis(hits, -4, -3).reshape(*batch, h2, w2, k * k, c)  # window order i*k+j
    first = flat & (jnp.cumsum(flat, axis=-2) == 1)
    return jnp.moveaxis(first.reshape(*batch, h2, w2, k, k, c), -3, -4)


class LeNetFeatures(nn.Module):
    """The paper's CIFAR CNN up to the penultimate pre-activation.

    conv 6 k5, ReLU, max-pool 2; conv 16 k5, ReLU, max-pool 2; fc 120, ReLU;
    fc 84 (pre-activation: the head applies the ReLU). On ``32x32x3`` with
    ``VALID`` padding, this plus a 10-way head has exactly 62,006 parameters.
    """

    padding: Padding = "VALID"
    param_dtype: Any = jnp.float32
    conv_impl: ConvImpl = "auto"

    @nn.compact
    def __call__(self, x: chex.Array) -> chex.Array:
        dense = lambda n, name: nn.Dense(n, name=name, param_dtype=self.param_dtype, dtype=self.param_dtype)
        conv = lambda n, name: nn.Conv(n, (5, 5), padding=self.padding, name=name,
                                       param_dtype=self.param_dtype, dtype=self.param_dtype,
                                       conv_general_dilated=conv_fn(self.conv_impl))
        x = max_pool(nn.relu(conv(6, "conv1")(x)))
        x = max_pool(nn.relu(conv(16, "conv2")(x)))
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
    conv_impl: ConvImpl = "auto"

    @nn.compact
    def __call__(self, x: chex.Array) -> chex.Array:
        for i in range(4):
            x = nn.Conv(self.width, (3, 3), padding="SAME", name=f"conv{i + 1}",
                        param_dtype=self.param_dtype, dtype=self.param_dtype,
                        conv_general_dilated=conv_fn(self.conv_impl))(x)
            if self.norm == "layer":
                x = nn.LayerNorm(reduction_axes=(-3, -2, -1), name=f"norm{i + 1}",
                                 param_dtype=self.param_dtype, dtype=self.param_dtype)(x)
            if i < 3:
                x = nn.relu(x)
            x = max_pool(x, 2, padding="SAME")
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

    def init_seeds(self, keys: chex.Array) -> Params:
        """``keys: key[S]`` -> ``[S, ...]`` params: ``jax.vmap(self.init)(keys)`` as one
        compiled program, cached per model and ``S``.

        Bitwise equal to the eager ``vmap``, which compiles every initialiser op as its own
        XLA program (measured on 2 CPU cores, lenet on 8x8x1: 8.7 s eager vs 3.8 s jitted for
        the first call with a new ``S``)."""
        chex.assert_rank(keys, 1)
        return _init_seeds(self, keys)

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


@functools.partial(compilation.jit, static_argnums=0)
def _init_seeds(model: Model, keys: chex.Array) -> Params:
    return jax.vmap(model.init)(keys)


def lenet(num_classes: int = 10, input_shape: tuple[int, int, int] = (32, 32, 3),
          padding: Padding = "VALID", param_dtype: Any = jnp.float32,
          conv_impl: ConvImpl = "auto") -> Model:
    """The paper's LeNet-style CNN. Use ``padding="SAME"`` for inputs under 32x32.

    ``conv_impl``: how convolutions run (:func:`resolve_conv_impl`; same params, same maths).
    """
    _check_shape(input_shape)
    resolve_conv_impl(conv_impl)
    h, w, _ = input_shape
    if padding == "VALID" and (h < 16 or w < 16):
        raise ConfigError(f"lenet with VALID padding needs inputs of at least 16x16, got "
                         f"{input_shape}; use padding='SAME' for small images such as digits.")
    return Model("lenet", LeNetFeatures(padding, param_dtype, conv_impl), num_classes,
                 tuple(input_shape), "fc2", param_dtype,
                 (("padding", padding), *_impl_option(conv_impl)))


def conv4(num_classes: int = 5, input_shape: tuple[int, int, int] = (28, 28, 1),
          width: int = 64, norm: Literal["none", "layer"] = "none",
          param_dtype: Any = jnp.float32, conv_impl: ConvImpl = "auto") -> Model:
    """The MAML Conv4 net (Finn et al., 2017) without BatchNorm; ``conv_impl`` as in :func:`lenet`."""
    _check_shape(input_shape)
    resolve_conv_impl(conv_impl)
    if norm not in ("none", "layer"):
        raise ConfigError(f"conv4 norm must be 'none' or 'layer', got {norm!r}")
    return Model("conv4", Conv4Features(width, norm, param_dtype, conv_impl), num_classes,
                 tuple(input_shape), "conv4", param_dtype,
                 (("width", width), ("norm", norm), *_impl_option(conv_impl)))


def _impl_option(conv_impl: str) -> tuple[tuple[str, str], ...]:
    """``conv_impl`` goes into ``spec()`` only when set: a run's config stays as before."""
    return () if conv_impl == "auto" else (("conv_impl", conv_impl),)


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
