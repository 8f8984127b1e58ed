"""Float64 exactness of the exact (second-order) meta-gradient, on any backend.

    python -m benchmarks.exactness            # every task batching x conv formulation
    python -m benchmarks.exactness --json out.json

For each task batching (``vmap``, ``map``, ``unroll``) and each convolution
formulation (``lax``, ``im2col``), the exact Reverse-MAML meta-gradient of LeNet
(float64, 32x32x3, 2 good + 2 bad tasks, 5-way, 2-shot support, 3-shot query,
2 inner SGD steps at lr 0.1, ascent on bad tasks, lam 1) is compared with

* **finite differences**: the directional derivative ``<g, v>`` along unit
  directions ``v`` (half along ``g``, half random) vs a 4-point (Richardson)
  central difference of the objective with step ``h = 1e-5``; relative error
  ``|<g,v> - fd| / |fd|``. The objective is only piecewise smooth: where a
  max-pool's argmax or a ReLU switches, the *inner gradient* jumps, so the
  adapted weights and the objective jump too (seen at ``h = 1e-4``); ``h`` must
  be small enough to cross no switch, and float64 rounding of the objective
  (~1e-16 / h) then limits this check to ~1e-9 (``--tol-fd`` 1e-6);
* **PyTorch autograd** (where torch is installed): an independent
  implementation of the same step (``torch.autograd.grad(create_graph=True)``,
  the weights and tasks copied from JAX); relative error ``max|g - g_ref| /
  max|g_ref|``, max over tensors. This one needs no tolerance for kinks: it is
  the strict check (expected ~1e-12 in float64).

Prints a table; exits 1 if any error exceeds ``--tol-torch`` (default 1e-10) or
``--tol-fd`` (default 1e-6).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Any

import jax
import numpy as np

SPEC = dict(ways=5, shots=2, queries=3, good_tasks=2, bad_tasks=2, inner_lr=0.1, inner_steps=2,
            bad_term="ascent", lam=1.0, meta_grad="exact")
BATCHINGS = ("vmap", "map", "unroll")
CONVS = ("lax", "im2col")


def _problem(seed: int = 0):
    """Float64 LeNet params, a fixed meta-batch of tasks, ``is_good`` and head keys."""
    import jax.numpy as jnp

    from benchmarks import harness
    from trm_jax import tasks

    n_classes = 10
    images, labels = harness.synthetic_cifar(seed, 400, num_classes=n_classes)
    pool = tasks.group_by_class(images, labels, n_classes)
    take = lambda lo: jax.tree.map(lambda a: a[lo:lo + 5], pool)
    good = tasks.sample_tasks(jax.random.key(1), take(0), SPEC["good_tasks"], SPEC["ways"],
                              SPEC["shots"], SPEC["queries"], "fixed")
    bad = tasks.sample_tasks(jax.random.key(2), take(5), SPEC["bad_tasks"], SPEC["ways"],
                             SPEC["shots"], SPEC["queries"], "fixed")
    both = jax.tree.map(lambda g, b: jnp.concatenate([g, b]), good, bad)
    num = SPEC["good_tasks"] + SPEC["bad_tasks"]
    is_good = jnp.arange(num) < SPEC["good_tasks"]
    return both, is_good, jax.random.split(jax.random.key(3), num)


def jax_value_and_grad(batching: str, conv: str, task_batch, is_good, keys):
    """``(params, f)`` with ``f(params) -> (objective, meta_gradient)`` compiled, float64."""
    import jax.numpy as jnp

    from trm_jax import compilation, meta, models

    model = models.lenet(5, (32, 32, 3), param_dtype=jnp.float64, conv_impl=conv)
    config = meta.MetaConfig(**SPEC, task_batching=batching)
    params = model.init(jax.random.key(0))
    loss = lambda p: meta.reverse_maml_loss(p, task_batch, is_good, keys, config, model)[0]
    return params, compilation.jit(jax.value_and_grad(loss))


def finite_difference_error(f, params, directions: int = 2, h: float = 1e-5, seed: int = 0) -> float:
    """Max over random unit directions of ``|<grad, v> - fd| / |fd|`` (Richardson, step h)."""
    from jax.flatten_util import ravel_pytree

    flat, unravel = ravel_pytree(params)
    flat = np.asarray(flat)
    grad = np.asarray(ravel_pytree(f(params)[1])[0])
    value = lambda x: float(f(unravel(jax.numpy.asarray(x)))[0])
    rng = np.random.default_rng(seed)
    worst = 0.0
    for _ in range(directions):
        # Half along the gradient, so <g, v> is O(|g|) and float64 rounding of the
        # objective (~1e-16 / h) stays far below it; half random, to test every entry.
        u = rng.standard_normal(flat.shape)
        v = grad / np.linalg.norm(grad) + u / np.linalg.norm(u)
        v /= np.linalg.norm(v)
        d1 = value(flat + h * v) - value(flat - h * v)
        d2 = value(flat + 2 * h * v) - value(flat - 2 * h * v)
        fd = (8 * d1 - d2) / (12 * h)
        worst = max(worst, abs(grad @ v - fd) / abs(fd))
    return worst


def torch_meta_gradient(params, task_batch, is_good) -> dict[str, np.ndarray]:
    """The same objective's exact meta-gradient in PyTorch autograd (float64), as JAX leaves.

    Weights are copied from the JAX params (HWIO -> OIHW, ``fc1``'s rows permuted
    from JAX's (h, w, c) flattening to PyTorch's (c, h, w)); the result is mapped
    back the same way, so it can be compared leaf by leaf.
    """
    import torch
    import torch.nn.functional as F

    from benchmarks import torch_reference as tr

    torch.set_num_threads(1)  # tiny work: spinning worker threads only slow it down
    p = jax.tree.map(lambda a: torch.from_numpy(np.array(a)), params)  # writable copies
    f = p["features"]
    c2 = f["conv2"]["kernel"].shape[-1]
    fc1 = f["fc1"]["kernel"].reshape(5, 5, c2, -1).permute(3, 2, 0, 1).reshape(-1, 25 * c2)
    names = ["conv1.w", "conv1.b", "conv2.w", "conv2.b", "fc1.w", "fc1.b", "fc2.w", "fc2.b",
             "head.w", "head.b"]
    leaves = [f["conv1"]["kernel"].permute(3, 2, 0, 1), f["conv1"]["bias"],
              f["conv2"]["kernel"].permute(3, 2, 0, 1), f["conv2"]["bias"], fc1, f["fc1"]["bias"],
              f["fc2"]["kernel"].T, f["fc2"]["bias"], p["head"]["dense"]["kernel"].T,
              p["head"]["dense"]["bias"]]
    theta = [t.detach().clone().contiguous().requires_grad_() for t in leaves]

    def net(w, x):
        x = F.max_pool2d(F.relu(F.conv2d(x, w[0], w[1])), 2)
        x = F.max_pool2d(F.relu(F.conv2d(x, w[2], w[3])), 2)
        x = F.relu(F.linear(torch.flatten(x, 1), w[4], w[5]))
        x = F.linear(x, w[6], w[7])
        return F.linear(F.relu(x), w[8], w[9])

    as_torch = lambda a: tr.to_float_nchw(np.asarray(a), torch.device("cpu"), torch.float64)
    xs, xq = as_torch(task_batch.support_x), as_torch(task_batch.query_x)
    ys = torch.from_numpy(np.asarray(task_batch.support_y)).long()
    yq = torch.from_numpy(np.asarray(task_batch.query_y)).long()
    good = np.asarray(is_good)
    n_good, n_bad = int(good.sum()), int((~good).sum())
    total = torch.zeros((), dtype=torch.float64)
    for t in range(len(good)):
        fast = theta
        for _ in range(SPEC["inner_steps"]):
            g = torch.autograd.grad(F.cross_entropy(net(fast, xs[t]), ys[t]), fast,
                                    create_graph=True)
            fast = [w - SPEC["inner_lr"] * gi for w, gi in zip(fast, g)]
        q = F.cross_entropy(net(fast, xq[t]), yq[t])
        total = total + (q / n_good if good[t] else -SPEC["lam"] * q / n_bad)
    grads = dict(zip(names, (g.numpy() for g in torch.autograd.grad(total, theta))))
    back = lambda w: np.transpose(w, (2, 3, 1, 0))  # OIHW -> HWIO
    fc1_back = grads["fc1.w"].reshape(-1, c2, 5, 5).transpose(2, 3, 1, 0).reshape(25 * c2, -1)
    return {"features": {"conv1": {"kernel": back(grads["conv1.w"]), "bias": grads["conv1.b"]},
                         "conv2": {"kernel": back(grads["conv2.w"]), "bias": grads["conv2.b"]},
                         "fc1": {"kernel": fc1_back, "bias": grads["fc1.b"]},
                         "fc2": {"kernel": grads["fc2.w"].T, "bias": grads["fc2.b"]}},
            "head": {"dense": {"kernel": grads["head.w"].T, "bias": grads["head.b"]}}}


def relative_error(got: Any, want: Any) -> float:
    """``max over leaves of max|got - want| / max|want|``."""
    errs = jax.tree.map(lambda a, b: float(np.max(np.abs(np.asarray(a) - np.asarray(b)))
                                           / max(float(np.max(np.abs(np.asarray(b)))), 1e-300)),
                        got, want)
    return max(jax.tree_util.tree_leaves(errs))


def run(batchings=BATCHINGS, convs=CONVS, use_torch: bool = True, directions: int = 2,
        fd_step: float = 1e-5) -> list[dict[str, Any]]:
    """One row per (task batching, conv): FD and PyTorch relative errors, compile seconds."""
    with jax.enable_x64(True):
        task_batch, is_good, keys = _problem()
        reference = None
        rows = []
        for conv in convs:
            for batching in batchings:
                params, f = jax_value_and_grad(batching, conv, task_batch, is_good, keys)
                t0 = time.perf_counter()
                grads = jax.block_until_ready(f(params)[1])
                row = {"task_batching": batching, "conv": conv,
                       "compile_s": round(time.perf_counter() - t0, 1),
                       "fd_rel_error": finite_difference_error(f, params, directions, fd_step)}
                if use_torch:
                    try:
                        if reference is None:
                            reference = torch_meta_gradient(params, task_batch, is_good)
                        row["torch_rel_error"] = relative_error(grads, reference)
                    except ImportError:
                        use_torch = False
                rows.append(row)
                print(_format_row(row), flush=True)
    return rows


def _format_row(row: dict[str, Any]) -> str:
    torch_err = row.get("torch_rel_error")
    torch_txt = f"{torch_err:.1e}" if torch_err is not None else "(no torch)"
    return (f"{row['task_batching']:7s} {row['conv']:7s} vs finite differences "
            f"{row['fd_rel_error']:.1e}   vs PyTorch autograd {torch_txt}   "
            f"(compile {row['compile_s']} s)")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.exactness", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batching", action="append", choices=BATCHINGS, help="repeatable")
    p.add_argument("--conv", action="append", choices=CONVS, help="repeatable")
    p.add_argument("--no-torch", action="store_true")
    p.add_argument("--directions", type=int, default=2, help="random FD directions")
    p.add_argument("--fd-step", type=float, default=1e-5)
    p.add_argument("--tol-torch", type=float, default=1e-10)
    p.add_argument("--tol-fd", type=float, default=1e-6)
    p.add_argument("--json", default=None, help="write the rows here")
    a = p.parse_args(argv)
    print(f"backend {jax.default_backend()} ({jax.devices()[0].device_kind}); float64 "
          f"exact meta-gradient, max relative error", flush=True)
    rows = run(tuple(a.batching or BATCHINGS), tuple(a.conv or CONVS), not a.no_torch,
               a.directions, a.fd_step)
    worst_fd = max(r["fd_rel_error"] for r in rows)
    worst_torch = max((r["torch_rel_error"] for r in rows if "torch_rel_error" in r), default=None)
    ok = worst_fd <= a.tol_fd and (worst_torch is None or worst_torch <= a.tol_torch)
    print(f"max vs finite differences {worst_fd:.1e} (tol {a.tol_fd:g}); max vs PyTorch "
          f"{'n/a' if worst_torch is None else f'{worst_torch:.1e}'} (tol {a.tol_torch:g}): "
          f"{'PASS' if ok else 'FAIL'}")
    if a.json:
        with open(a.json, "w") as fh:
            json.dump({"backend": jax.default_backend(), "device": jax.devices()[0].device_kind,
                       "spec": SPEC, "rows": rows}, fh, indent=2)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
