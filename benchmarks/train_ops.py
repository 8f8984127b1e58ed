"""Where supervised training's time goes on CPU: the step's parts and single convolutions,
JAX vs PyTorch in one process, and formulations of lenet's conv1 forward.

    python -m benchmarks.train_ops [--calls 30]

Spec: ``bench_train``'s step (lenet on 32x32x3, batch 128, Adam). Each JAX row is timed
with three compile settings: XLA's defaults, the library's (``compilation.jit`` on CPU:
``CPU_COMPILER_OPTIONS``) and the library's plus the YNNPACK-for-dots-only option
(``YNN_DOTS``, BENCHMARKS.md). Medians of ``--calls`` calls after a warm-up; PyTorch eager
(2 threads) the same way. The conv1 formulations are compared on the forward and on the
weight gradient (all training needs of conv1), each forward with its largest difference
from ``lax.conv``'s (0: bitwise).
"""
from __future__ import annotations

import argparse
import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax

from benchmarks import harness
from trm_jax import compilation, models, train

YNN_DOTS = {"xla_cpu_experimental_ynn_fusion_type": "LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT"}
NHWC = ("NHWC", "HWIO", "NHWC")


def _median_ms(fn: Callable[[], Any], calls: int, sync: Callable[[Any], Any] | None = None) -> float:
    return 1e3 * harness.time_fn(fn, warmup=1, repeats=calls, sync=sync).median


def _settings() -> dict[str, dict[str, Any] | None]:
    library = compilation.compiler_options() or {}
    return {"XLA defaults": None, "library": library or None,
            "library + YNN_DOTS": {**library, **YNN_DOTS}}


def _lax_conv(x: jax.Array, k: jax.Array) -> jax.Array:
    return jax.lax.conv_general_dilated(x, k, (1, 1), "VALID", dimension_numbers=NHWC)


def conv1_formulations() -> dict[str, Callable[[jax.Array, jax.Array], jax.Array]]:
    """``x: f32[N, 32, 32, 3], k: f32[5, 5, 3, 6] -> f32[N, 28, 28, 6]``, each the same maths
    as ``lax.conv`` (NHWC), whose own rows are "conv1 forward" / "conv1 weight gradient"."""
    def padded_out(x, k):  # zero kernel columns to 8 output channels, sliced off again
        return _lax_conv(x, jnp.pad(k, ((0, 0), (0, 0), (0, 0), (0, 2))))[..., :6]

    def width_patches(x, k):  # 5 width shifts stacked once, then one dot per kernel row
        p = jnp.concatenate([x[:, :, j:j + 28, :] for j in range(5)], -1)  # [N, 32, 28, 15]
        return sum(jnp.einsum("nhwc,co->nhwo", p[:, i:i + 28], k[i].reshape(15, 6))
                   for i in range(5))

    def nchw(x, k):
        out = jax.lax.conv_general_dilated(x.transpose(0, 3, 1, 2), k.transpose(3, 2, 0, 1),
                                           (1, 1), "VALID", dimension_numbers=("NCHW", "OIHW", "NCHW"))
        return out.transpose(0, 2, 3, 1)

    return {"lax.conv, 8 output channels": padded_out,
            "lax.conv NCHW": nchw,
            "im2col (models.im2col_conv)": lambda x, k: models.im2col_conv(
                x, k, (1, 1), "VALID", dimension_numbers=NHWC),
            "banded dot (models.toeplitz_conv, the CPU default)": lambda x, k: models.toeplitz_conv(
                x, k, (1, 1), "VALID", dimension_numbers=NHWC),
            "width patches + 5 dots": width_patches}


def jax_rows(calls: int) -> list[tuple[str, str, float, str]]:
    """``(setting, part, median ms, note)`` for every part under every compile setting."""
    model, optimizer = models.lenet(10), optax.adam(1e-3)
    key = jax.random.key(0)
    params = jax.jit(model.init)(key)
    state = train.init_state(key, params, optimizer)
    images, labels = harness.synthetic_cifar(0, 128)
    batch = (jax.device_put(images), jax.device_put(labels))
    loss_fn = train.classification_loss(model.apply)
    rng = np.random.default_rng(0)
    x1 = jnp.asarray(rng.standard_normal((128, 32, 32, 3)), jnp.float32)
    k1 = params["features"]["conv1"]["kernel"]
    g1 = jnp.asarray(rng.standard_normal((128, 28, 28, 6)), jnp.float32)
    x2 = jnp.asarray(rng.standard_normal((128, 14, 14, 6)), jnp.float32)
    k2 = params["features"]["conv2"]["kernel"]
    g2 = jnp.asarray(rng.standard_normal((128, 10, 10, 16)), jnp.float32)
    parts = {
        "training step": (functools.partial(train.train_step, loss_fn=loss_fn, optimizer=optimizer),
                          (state, batch)),
        "forward (loss)": (lambda p, b: loss_fn(p, b)[0], (params, batch)),
        "loss + gradient": (jax.value_and_grad(lambda p, b: loss_fn(p, b)[0]), (params, batch)),
        "conv1 forward": (_lax_conv, (x1, k1)),
        "conv1 weight gradient": (lambda x, k, g: jax.vjp(lambda w: _lax_conv(x, w), k)[1](g)[0],
                                  (x1, k1, g1)),
        "conv2 forward": (_lax_conv, (x2, k2)),
        "conv2 both gradients": (lambda x, k, g: jax.vjp(_lax_conv, x, k)[1](g), (x2, k2, g2)),
    }
    for name, conv in conv1_formulations().items():
        parts[f"conv1 forward as {name}"] = (conv, (x1, k1))
        # conv is linear in the kernel: its weight gradient needs no forward output
        parts[f"conv1 weight gradient as {name}"] = (
            lambda x, k, g, conv=conv: jax.vjp(lambda w: conv(x, w), k)[1](g)[0], (x1, k1, g1))
    reference = np.asarray(jax.jit(_lax_conv)(x1, k1))
    rows = []
    for setting, options in _settings().items():
        for name, (fn, args) in parts.items():
            compiled = jax.jit(fn, compiler_options=options)
            ms = _median_ms(lambda: compiled(*args), calls, sync=jax.block_until_ready)
            note = ""
            if name.startswith("conv1 forward as"):
                note = f"max |diff| {float(np.max(np.abs(np.asarray(compiled(*args)) - reference))):.1e}"
            rows.append((setting, name, ms, note))
    return rows


def torch_rows(calls: int) -> list[tuple[str, float]]:
    import torch
    import torch.nn.functional as F

    from benchmarks import torch_reference

    torch_reference.set_cpu_threads(2)
    model = torch_reference.LeNet(10)
    optimizer = torch.optim.Adam(model.parameters(), 1e-3)
    images, labels = torch.rand(128, 3, 32, 32), torch.randint(0, 10, (128,))

    def step():
        optimizer.zero_grad()
        F.cross_entropy(model(images), labels).backward()
        optimizer.step()

    def forward():
        with torch.no_grad():
            F.cross_entropy(model(images), labels)

    def loss_and_grad():
        model.zero_grad()
        F.cross_entropy(model(images), labels).backward()

    w1 = torch.randn(6, 3, 5, 5, requires_grad=True)
    g1 = torch.randn(128, 6, 28, 28)
    x2 = torch.randn(128, 6, 14, 14, requires_grad=True)
    w2 = torch.randn(16, 6, 5, 5, requires_grad=True)
    g2 = torch.randn(128, 16, 10, 10)

    def conv1_forward():
        with torch.no_grad():
            F.conv2d(images, w1)

    def conv2_forward():
        with torch.no_grad():
            F.conv2d(x2, w2)

    parts = {"training step": step, "forward (loss)": forward, "loss + gradient": loss_and_grad,
             "conv1 forward": conv1_forward,
             "conv1 weight gradient": lambda: torch.autograd.grad(F.conv2d(images, w1), w1, g1),
             "conv2 forward": conv2_forward,
             "conv2 both gradients": lambda: torch.autograd.grad(F.conv2d(x2, w2), (x2, w2), g2)}
    return [(name, _median_ms(fn, calls)) for name, fn in parts.items()]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--calls", type=int, default=30)
    args = parser.parse_args(argv)
    rows = jax_rows(args.calls)
    torch_ms = dict(torch_rows(args.calls))
    settings = list(_settings())
    names = list(dict.fromkeys(name for _, name, _, _ in rows))
    table = {(s, n): (ms, note) for s, n, ms, note in rows}
    print("| part (ms) | " + " | ".join(settings) + " | PyTorch | note |")
    print("|---|" + "---|" * (len(settings) + 2))
    for name in names:
        cells = [f"{table[(s, name)][0]:.2f}" for s in settings]
        torch_cell = f"{torch_ms[name]:.2f}" if name in torch_ms else "-"
        print(f"| {name} | " + " | ".join(cells) + f" | {torch_cell} | {table[(settings[0], name)][1]} |")


if __name__ == "__main__":
    main()
