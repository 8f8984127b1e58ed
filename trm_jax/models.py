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
import functools
from typing import Any, Callable, Literal, Sequence

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from trm_jax import compilation
from trm_jax.errors import ConfigError
from trm_jax.typing import Params
Padding = Literal["VALID", "SAME"]
ConvImpl = Literal["auto", "lax", "im2col", "toeplitz"]
CONV_IMPLS = ("auto", "lax", "im2col", "toeplitz")


def to_float(images: chex.Array, dtype: Any = jnp.float32) -> chex.Array:
    """Maps ``uint8[..., H, W, C]`` images to ``[-1, 1]``; float inputs pass through.

    Normalising here (inside jit) keeps the datasets as compact uint8 arrays.
    """
    if jnp.issubdtype(images.dtype, jnp.integer):
        return images.astype(dtype) / 127.5 - 1.0
    return images


# ------------------------------------------------------------------ conv and pool kernels
# Three formulations of a convolution, same maths, chosen per backend and layer (measured,
# see BENCHMARKS.md). XLA:CPU runs convolutions with few channels (LeNet's 3 -> 6 and
# 6 -> 16) and their gradients several times slower than PyTorch, whereas one 2-D ``dot``
# against the kernel unrolled into a banded (Toeplitz) matrix runs them 3-4x faster and
# differentiates into dots; for wide layers shifted slices + one ``dot`` (im2col) beat
# XLA:CPU's convolution over vmapped seeds, inside loops and in second-order
# meta-gradients (which need every input gradient), and match it otherwise. On GPU
# (cuDNN) ``lax.conv`` wins. Max-pooling as reshape + max
# with a mask JVP is exact (its derivatives of every order are selections) where
# ``reduce_window``'s second derivative runs at reduced precision on GPU, is cheaper
# on CPU, and compiles faster.


# On cpu, "auto" runs layers with at most this many output channels as "toeplitz" and
# wider ones as "im2col". Measured training steps (2-core CPU, BENCHMARKS.md): LeNet (6 and
# 16 channels) 2.6-3.6x faster than "lax" on 32x32x3 and 8x8x1 with one seed, 3-10x with
# 3 vmapped seeds; Conv4 on 28x28x1 as fast as "lax" at width 16, 1.5x faster at width 8,
# 3.6x SLOWER at width 32 (the band is then too narrow to pay), where "im2col" is 5x faster
# than "lax" with vmapped seeds and as fast with one.
#: The widest layer (output channels) that CPU runs as a Toeplitz product; wider: im2col.
TOEPLITZ_MAX_CHANNELS = 16


def resolve_conv_impl(impl: str, backend: str | None = None,
                      out_channels: int | None = None) -> str:
    """Maps ``"auto"`` to a concrete convolution for ``backend`` (default: JAX's).

    * ``"lax"``: ``lax.conv_general_dilated`` (cuDNN on GPU).
    * ``"im2col"``: the ``kh * kw`` shifted slices of the input concatenated on
      the channel axis, then ONE 2-D ``dot`` with the kernel reshaped to
      ``[kh * kw * C, O]`` (see :func:`im2col_conv`).
    * ``"toeplitz"``: blocks of output columns as ONE 2-D ``dot`` with the kernel
      unrolled into a banded matrix (see :func:`toeplitz_conv`).

    All three are the same maths; float32 sums are taken in other orders, so the
    last bits differ. ``"auto"`` is ``"lax"`` on gpu/tpu; on cpu it is
    ``"toeplitz"`` for a layer of at most :data:`TOEPLITZ_MAX_CHANNELS`
    ``out_channels`` and ``"im2col"`` otherwise: XLA:CPU runs ``lax.conv``, its
    gradients, and any of them inside a loop or over vmapped seeds, several times
    slower than these ``dot`` products (measured, BENCHMARKS.md).
    """
    if impl not in CONV_IMPLS:
        raise ConfigError(f"conv_impl must be one of {CONV_IMPLS}, got {impl!r}")
    if impl != "auto":
        return impl
    if (backend or jax.default_backend()) != "cpu":
        return "lax"
    if out_channels is not None and out_channels <= TOEPLITZ_MAX_CHANNELS:
        return "toeplitz"
    return "im2col"


def _stride_one_nhwc(formulation: Callable[..., chex.Array]) -> Callable[..., chex.Array]:
    """Lifts ``formulation(lhs, rhs, precision) -> out`` (unpadded NHWC x HWIO, stride 1)
    to ``lax.conv_general_dilated``'s signature: explicit padding first, and anything else
    than stride 1, no dilation, one feature group and NHWC falls back to
    ``lax.conv_general_dilated`` with the same arguments."""
    @functools.wraps(formulation)
    def conv(lhs: chex.Array, rhs: chex.Array, window_strides: Sequence[int],
             padding: str | Sequence[tuple[int, int]], lhs_dilation: Any = None,
             rhs_dilation: Any = None, dimension_numbers: Any = None,
             feature_group_count: int = 1, precision: Any = None, **kwargs: Any) -> chex.Array:
        plain = (tuple(window_strides) == (1, 1) and feature_group_count == 1 and not kwargs
                 and all(d is None or tuple(d) == (1, 1) for d in (lhs_dilation, rhs_dilation))
                 and lhs.ndim == 4 and _is_nhwc(dimension_numbers))
        if plain:
            pads = (jax.lax.padtype_to_pads(lhs.shape[1:3], rhs.shape[:2], (1, 1), padding)
                    if isinstance(padding, str) else [tuple(p) for p in padding])
            # a kernel larger than the (padded) input: lax's empty output
            plain = all(n + lo + hi >= k for n, (lo, hi), k in zip(lhs.shape[1:3], pads, rhs.shape[:2]))
        if not plain:
            return jax.lax.conv_general_dilated(
                lhs, rhs, window_strides, padding, lhs_dilation=lhs_dilation,
                rhs_dilation=rhs_dilation, dimension_numbers=dimension_numbers,
                feature_group_count=feature_group_count, precision=precision, **kwargs)
        if any(p != (0, 0) for p in pads):
            lhs = jnp.pad(lhs, [(0, 0), *pads, (0, 0)])
        return formulation(lhs, rhs, precision)
    return conv


@_stride_one_nhwc
def im2col_conv(lhs: chex.Array, rhs: chex.Array, precision: Any = None) -> chex.Array:
    """``lax.conv_general_dilated`` for NHWC x HWIO as shifted slices + one 2-D ``dot``.

    ``lhs: f[B, H, W, C]``, ``rhs: f[kh, kw, C, O] -> f[B, H', W', O]``, with
    ``lax.conv_general_dilated``'s arguments. Only stride 1, no dilation and one feature
    group are rewritten (all this project's models use); anything else falls back to
    ``lax.conv_general_dilated`` with the same arguments. Slicing + concatenating is what
    XLA:CPU runs fastest: ``lax.conv_general_dilated_patches`` (itself a convolution) was
    2.3x slower, and ``einsum`` over the stacked slices no faster.
    """
    kh, kw, c, o = rhs.shape
    b, h, w, _ = lhs.shape
    ho, wo = h - kh + 1, w - kw + 1
    patches = jnp.concatenate([lhs[:, i:i + ho, j:j + wo, :]
                               for i in range(kh) for j in range(kw)], axis=-1)
    out = jax.lax.dot(patches.reshape(b * ho * wo, kh * kw * c), rhs.reshape(kh * kw * c, o),
                      precision=precision)
    return out.reshape(b, ho, wo, o)


def toeplitz_block(out_width: int, out_channels: int) -> int:
    """Output columns per row of :func:`toeplitz_conv`'s ``dot``: the narrowest block that
    gives the ``dot`` at least 40 output columns (``block * out_channels``), rounded up to a
    divisor of ``out_width`` when one is within a factor 2 (else the input is zero-padded
    to a multiple of the block); at most ``out_width``.

    Wider blocks make fewer, wider dot rows but multiply more of the band's zeros: a
    ``kw``-wide kernel costs ``(block + kw - 1) / kw`` times a direct convolution's
    multiplies. Measured on 2 CPU cores (BENCHMARKS.md): LeNet's training step on 32x32x3
    ran fastest with blocks of 7 (3 -> 6 channels, 28 columns) and 5 or 10 (6 -> 16
    channels, 10 columns), up to 1.3x slower with 14 and 2.
    """
    want = min(out_width, -(-40 // out_channels))
    divisor = next(b for b in range(want, out_width + 1) if out_width % b == 0)
    return divisor if divisor <= 2 * want else want


@_stride_one_nhwc
def toeplitz_conv(lhs: chex.Array, rhs: chex.Array, precision: Any = None) -> chex.Array:
    """``lax.conv_general_dilated`` for NHWC x HWIO as ONE 2-D ``dot`` with a banded kernel.

    ``lhs: f[B, H, W, C]``, ``rhs: f[kh, kw, C, O] -> f[B, H', W', O]``, with
    ``lax.conv_general_dilated``'s arguments (stride 1, no dilation, one feature group and
    NHWC are rewritten, anything else falls back to it). The output's columns are cut into
    blocks of ``n = toeplitz_block(W', O)``; each block of one output row is one row of the
    ``dot``: the ``kh`` input rows it reads, ``n + kw - 1`` columns wide, against the
    kernel unrolled into ``f[kh * (n + kw - 1) * C, n * O]`` (Toeplitz in the columns:
    entry ``(i, a, c), (b, o)`` is ``rhs[i, a - b, c, o]`` where ``0 <= a - b < kw``,
    else 0). Few channels make im2col's ``dot`` too thin (``O`` output columns) for
    XLA:CPU to run fast; the band gives it ``n * O`` columns for ``(n + kw - 1) / kw``
    times the multiplies. Exact: the band's zeros add exact zeros (float64 tests).
    """
    kh, kw, c, o = rhs.shape
    b, h, w, _ = lhs.shape
    ho, wo = h - kh + 1, w - kw + 1
    block = toeplitz_block(wo, o)
    blocks = -(-wo // block)
    win = block + kw - 1
    if blocks * block > wo:  # zero columns for the last block's extra outputs, sliced off
        lhs = jnp.pad(lhs, [(0, 0), (0, 0), (0, blocks * block - wo), (0, 0)])
    band = np.zeros((kw, win, block), np.float32)  # band[j, a, b] = 1 where a - b == j
    for j in range(kw):
        band[j, np.arange(block) + j, np.arange(block)] = 1
    kernel = jnp.einsum("jab,ijco->iacbo", band.astype(rhs.dtype), rhs)
    # One concatenation of the blocks x kh windows (one copy; stacking rows, then blocks of
    # them, made two and cost 1.3x the forward): [B, H', blocks * kh, win * C].
    patches = jnp.concatenate([lhs[:, i:i + ho, k * block:k * block + win].reshape(b, ho, 1, -1)
                               for k in range(blocks) for i in range(kh)], axis=2)
    out = jax.lax.dot(patches.reshape(b * ho * blocks, kh * win * c),
                      kernel.reshape(kh * win * c, block * o), precision=precision)
    return out.reshape(b, ho, blocks * block, o)[:, :, :wo]


def _is_nhwc(dimension_numbers: Any) -> bool:
    if dimension_numbers is None:  # lax's default is NCHW: not ours to rewrite
        return False
    if isinstance(dimension_numbers, jax.lax.ConvDimensionNumbers):
        return dimension_numbers == jax.lax.conv_dimension_numbers(
            (1, 1, 1, 1), (1, 1, 1, 1), ("NHWC", "HWIO", "NHWC"))
    return tuple(dimension_numbers) == ("NHWC", "HWIO", "NHWC")


def conv_fn(impl: str = "auto") -> Callable[..., chex.Array]:
    """A ``conv_general_dilated`` for ``flax.linen.Conv``, picked per backend at trace time."""
    def conv(lhs: chex.Array, rhs: chex.Array, *args: Any, **kwargs: Any) -> chex.Array:
        resolved = resolve_conv_impl(impl, out_channels=rhs.shape[-1])
        if resolved == "im2col":
            return im2col_conv(lhs, rhs, *args, **kwargs)
        if resolved == "toeplitz":
            return toeplitz_conv(lhs, rhs, *args, **kwargs)
        return jax.lax.conv_general_dilated(lhs, rhs, *args, **kwargs)
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
    # The first maximum (row-major) of each window: the smallest window position where x
    # equals the max. A min-reduction and elementwise selects at full resolution: the
    # derivative's transpose is then one select of the broadcast cotangent (a cumulative
    # count over the window, or per-position slices whose transposes are pads, cost more
    # than the convolution they follow on CPU).
    k = x.shape[-4]
    position = np.arange(k * k, dtype=np.int32).reshape((1,) * (x.ndim - 4) + (k, 1, k, 1))
    hits = x == jnp.expand_dims(y, (-4, -2))
    first = jnp.min(jnp.where(hits, position, k * k), axis=(-4, -2), keepdims=True)
    return y, jnp.sum(jnp.where(position == first, t, 0), axis=(-4, -2))


class LeNetFeatures(nn.Module):
    """The paper's CIFAR CNN up to the penultimate pre-activation.

    conv 6 k5, ReLU, max-pool 2; conv 16 k5, ReLU, max-pool 2; fc 120, ReLU;
    fc 84 (pre-activation: the head applies the ReLU). On ``32x32x3`` with
    ``VALID`` padding, this plus a 10-way head has exactly 62,006 parameters.
    """

    padding: Padding = "VALID"
    param_dtype: Any = jnp.float32
    conv_impl: ConvImpl = "auto"
    widths: tuple[int, int, int, int] = (6, 16, 120, 84)  # conv1, conv2, fc1, fc2

    @nn.compact
    def __call__(self, x: chex.Array) -> chex.Array:
        dense = lambda n, name: nn.Dense(n, name=name, param_dtype=self.param_dtype, dtype=self.param_dtype)
        conv = lambda n, name: nn.Conv(n, (5, 5), padding=self.padding, name=name,
                                       param_dtype=self.param_dtype, dtype=self.param_dtype,
                                       conv_general_dilated=conv_fn(self.conv_impl))
        c1, c2, f1, f2 = self.widths
        x = max_pool(nn.relu(conv(c1, "conv1")(x)))
        x = max_pool(nn.relu(conv(c2, "conv2")(x)))
        x = x.reshape(x.shape[:-3] + (-1,))
        x = nn.relu(dense(f1, "fc1")(x))
        return dense(f2, "fc2")(x)


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
      layers: the features layers bottom to top, each the tuple of its param names
        (conv4's ``norm<i>`` belongs to ``conv<i>``): what the attacks' ``top:k`` parts
        and the *reuse* attacks (keeping the bottom half) are defined on.
    """

    name: str
    features_module: nn.Module
    num_classes: int
    input_shape: tuple[int, int, int]
    penultimate: str
    param_dtype: Any = jnp.float32
    options: tuple[tuple[str, Any], ...] = ()  # factory kwargs, for `spec()`
    layers: tuple[tuple[str, ...], ...] = ()

    @property
    def feature_layers(self) -> tuple[tuple[str, ...], ...]:
        """``layers``, bottom to top (e.g. lenet: ``(("conv1",), ("conv2",), ("fc1",), ("fc2",))``)."""
        if not self.layers:
            raise ConfigError(f"model {self.name!r} has no layer order; build it with "
                              f"trm_jax.models.wrap(..., layers=...)")
        return self.layers

    def spec(self) -> dict[str, Any]:
        """A JSON-able description; ``from_spec(model.spec())`` rebuilds the model."""
        return {"name": self.name, "num_classes": self.num_classes,
                "input_shape": list(self.input_shape), **dict(self.options)}

    @property
    def feature_dim(self) -> int:
        """``D``, the width of the features (cached: tracing an init costs ~0.1 s, and every
        fresh head needs it)."""
        return _feature_dim(self.features_module, tuple(self.input_shape), self.param_dtype)

    def param_shapes(self) -> Params:
        """``jax.eval_shape(self.init, key)``: ``{"features", "head"}`` of
        ``jax.ShapeDtypeStruct`` (cached per model; do not mutate)."""
        return _param_shapes(self)

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


@functools.lru_cache(maxsize=64)
def _feature_dim(features_module: nn.Module, input_shape: tuple[int, ...], dtype: Any) -> int:
    x = jax.ShapeDtypeStruct((1, *input_shape), dtype)
    out = jax.eval_shape(lambda k, x: features_module.init_with_output(k, x)[0],
                         jax.random.key(0), x)
    return int(out.shape[-1])


@functools.lru_cache(maxsize=64)
def _param_shapes(model: Model) -> Params:
    return jax.eval_shape(model.init, jax.random.key(0))


@functools.partial(compilation.jit, static_argnums=0)
def _init_seeds(model: Model, keys: chex.Array) -> Params:
    return jax.vmap(model.init)(keys)


#: LeNet's features layers bottom to top (a :class:`Model`'s ``layers``).
LENET_LAYERS = (("conv1",), ("conv2",), ("fc1",), ("fc2",))

#: LeNet's default widths (conv1, conv2, fc1, fc2): the paper's net.
LENET_WIDTHS = (6, 16, 120, 84)


def lenet(num_classes: int = 10, input_shape: tuple[int, int, int] = (32, 32, 3),
          padding: Padding = "VALID", param_dtype: Any = jnp.float32,
          conv_impl: ConvImpl = "auto",
          widths: Sequence[int] = LENET_WIDTHS) -> Model:
    """The paper's LeNet-style CNN. Use ``padding="SAME"`` for inputs under 32x32.

    ``conv_impl``: how convolutions run (:func:`resolve_conv_impl`; same params, same maths).
    ``widths``: output channels / units of conv1, conv2, fc1, fc2 (default the paper's
    6, 16, 120, 84; e.g. a wider conv2 for a defence that masks there).
    """
    _check_shape(input_shape)
    resolve_conv_impl(conv_impl)
    widths = tuple(int(w) for w in widths) if isinstance(widths, (tuple, list)) else widths
    if (not isinstance(widths, tuple) or len(widths) != 4
            or not all(isinstance(w, int) and w >= 1 for w in widths)):
        raise ConfigError(f"lenet widths must be 4 integers >= 1 (conv1, conv2, fc1, fc2), "
                          f"got {widths!r}")
    h, w, _ = input_shape
    if padding == "VALID" and (h < 16 or w < 16):
        raise ConfigError(f"lenet with VALID padding needs inputs of at least 16x16, got "
                         f"{input_shape}; use padding='SAME' for small images such as digits.")
    return Model("lenet", LeNetFeatures(padding, param_dtype, conv_impl, widths), num_classes,
                 tuple(input_shape), "fc2", param_dtype,
                 (("padding", padding), *_impl_option(conv_impl),
                  *((("widths", widths),) if widths != LENET_WIDTHS else ())), LENET_LAYERS)


def conv4(num_classes: int = 5, input_shape: tuple[int, int, int] = (28, 28, 1),
          width: int = 64, norm: Literal["none", "layer"] = "none",
          param_dtype: Any = jnp.float32, conv_impl: ConvImpl = "auto") -> Model:
    """The MAML Conv4 net (Finn et al., 2017) without BatchNorm; ``conv_impl`` as in :func:`lenet`."""
    _check_shape(input_shape)
    resolve_conv_impl(conv_impl)
    if norm not in ("none", "layer"):
        raise ConfigError(f"conv4 norm must be 'none' or 'layer', got {norm!r}")
    layers = tuple((f"conv{i}",) + ((f"norm{i}",) if norm == "layer" else ()) for i in range(1, 5))
    return Model("conv4", Conv4Features(width, norm, param_dtype, conv_impl), num_classes,
                 tuple(input_shape), "conv4", param_dtype,
                 (("width", width), ("norm", norm), *_impl_option(conv_impl)), layers)


def wrap(features: nn.Module, num_classes: int, layers: Sequence[str | Sequence[str]],
         input_shape: tuple[int, int, int], *, name: str = "custom",
         param_dtype: Any = jnp.float32) -> Model:
    """Your own ``flax.linen`` features module as a :class:`Model` that
    :func:`trm_jax.protect`, :func:`trm_jax.evaluate` and the attack suite accept.

    Args:
      features: maps ``f32[B, H, W, C]`` images (in ``[-1, 1]``) to ``f32[B, D]``: everything
        up to the penultimate layer's *pre-activation* (the head adds the ReLU).
      num_classes: outputs of the head (ReLU + linear, the project's head: the attacker
        replaces it with a fresh one anyway).
      layers: the features module's layers bottom to top, by submodule name (a name, or a
        tuple of names that form one layer, e.g. ``("conv1", "norm1")``); the last is the
        penultimate layer. Every top-level param collection must belong to one layer.
      input_shape: ``(H, W, C)`` of one image.

    Raises:
      ConfigError: a layer the module does not have, or a param collection no layer owns.
    """
    _check_shape(input_shape)
    groups = tuple((l,) if isinstance(l, str) else tuple(l) for l in layers)
    if not groups or not all(groups):
        raise ConfigError(f"layers must name the features layers bottom to top, got {layers!r}")
    x = jax.ShapeDtypeStruct((1, *input_shape), param_dtype)
    try:
        shapes = jax.eval_shape(features.init, jax.random.key(0), x)["params"]
    except Exception as err:  # noqa: BLE001 -- any failure of the user's module on this input
        raise ConfigError(f"features module {type(features).__name__} fails on input_shape "
                          f"{tuple(input_shape)}: {type(err).__name__}: {err}") from err
    named = [n for g in groups for n in g]
    missing, unowned = sorted(set(named) - set(shapes)), sorted(set(shapes) - set(named))
    if missing or unowned or len(set(named)) != len(named):
        raise ConfigError(f"layers {groups} must name each of the module's param collections "
                          f"{sorted(shapes)} once; missing from the module: {missing}, owned by "
                          f"no layer: {unowned}")
    return Model(name, features, num_classes, tuple(input_shape), groups[-1][0], param_dtype,
                 (), groups)


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
