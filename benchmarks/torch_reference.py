"""PyTorch reference implementations of the trm_jax benchmark specs.

Each bench is built by ``make_torch_<bench>(..., device=None) -> (run_fn, sync_fn)``:

* ``run_fn()`` does the timed unit of work (one outer step, one sweep, one
  epoch) and returns its result; ``run_fn.items_per_call`` says how many
  steps/images that unit is (for rate units in :mod:`benchmarks.harness`).
* ``sync_fn(output)`` waits for the device (``torch.cuda.synchronize()`` on CUDA,
  a no-op on CPU); pass it as ``sync=`` to :func:`benchmarks.harness.time_fn`.

Setup (model init, synthetic data, moving data to the device, task sampling)
happens in ``make_*`` and is never timed. Sizes are keyword arguments so a
``--quick`` mode can shrink them; the defaults are the full specs.

Threads: on CPU every builder calls :func:`configure_torch`, which sets
``torch.set_num_threads(os.cpu_count())``. PyTorch's default is the number of
*physical* cores, whereas XLA's CPU backend uses every logical core; matching
them keeps the JAX-vs-PyTorch comparison about the code, not the thread count.

Run ``python -m benchmarks.torch_reference [--quick]`` to time every bench here.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
from typing import Any, Callable, Sequence

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.func import functional_call

from benchmarks import harness

Device = torch.device | str | None
Params = dict[str, torch.Tensor]

# ----------------------------------------------------------------------------- setup


def resolve_device(device: Device = None) -> torch.device:
    """``device`` as a ``torch.device``; default CUDA if available, else CPU."""
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(device)


_CPU_THREADS: int | None = None  # None = os.cpu_count(); see set_cpu_threads


def set_cpu_threads(n: int | None) -> None:
    """Overrides the CPU thread count the builders use (``None`` = ``os.cpu_count()``).

    For tests and for timing on a busy shared machine, where PyTorch's
    spin-waiting worker threads make tiny ops many times slower; final numbers
    should use the default.
    """
    global _CPU_THREADS
    if n is not None and n < 1:
        raise ValueError(f"threads must be >= 1 or None, got {n}")
    _CPU_THREADS = n


def configure_torch(device: Device = None) -> torch.device:
    """Resolves the device and, on CPU, uses every logical core (see module doc)."""
    dev = resolve_device(device)
    if dev.type == "cpu":
        torch.set_num_threads(_CPU_THREADS or os.cpu_count() or 1)
    return dev


def make_sync(device: torch.device) -> Callable[[Any], Any]:
    """A ``sync(output)`` for :func:`harness.time_fn`: waits for CUDA, else no-op."""
    if device.type == "cuda":
        def sync(out: Any = None) -> Any:
            torch.cuda.synchronize(device)
            return out
    else:
        def sync(out: Any = None) -> Any:
            return out
    return sync


def to_float_nchw(images: np.ndarray, device: torch.device, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``uint8[..., H, W, C]`` (NHWC) -> float ``[..., C, H, W]`` in [-1, 1] on ``device``.

    Done once at setup: the natural PyTorch layout is NCHW float on the device.
    """
    x = torch.from_numpy(np.ascontiguousarray(images)).to(device)
    x = x.movedim(-1, -3).to(dtype) / 127.5 - 1.0
    return x.contiguous()


# ----------------------------------------------------------------------------- model


class LeNetFeatures(nn.Module):
    """The paper's CIFAR CNN up to the penultimate (fc 84) *pre-activation*."""

    def __init__(self, in_channels: int = 3) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, 6, 5)
        self.conv2 = nn.Conv2d(6, 16, 5)
        self.fc1 = nn.Linear(16 * 5 * 5, 120)
        self.fc2 = nn.Linear(120, 84)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.max_pool2d(F.relu(self.conv1(x)), 2)
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)
        x = F.relu(self.fc1(torch.flatten(x, -3)))
        return self.fc2(x)


class LeNet(nn.Module):
    """LeNet = features + head (ReLU + fc 84->num_classes); 62,006 params for 10 classes."""

    def __init__(self, num_classes: int = 10, in_channels: int = 3) -> None:
        super().__init__()
        self.features = LeNetFeatures(in_channels)
        self.head = nn.Sequential(nn.ReLU(), nn.Linear(84, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def num_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _with_items(fn: Callable, items_per_call: float) -> Callable:
    fn.items_per_call = items_per_call  # type: ignore[attr-defined]
    return fn


# ----------------------------------------------------------------------------- meta_step

META_IMPLS = ("func_vmap", "func_loop", "autograd", "autograd_first_order")


@dataclasses.dataclass
class MetaStepBench:
    """One Reverse-MAML outer step, built by :func:`build_torch_meta_step`.

    Attributes:
      model: the meta-learned LeNet (its parameters are updated by ``step``).
      meta_grads: computes the meta-gradient ``{param name: grad}`` of the outer
        loss at the current parameters, without updating them.
      step: one full outer step (meta-gradient + ``optimizer.step()``);
        returns the outer loss (detached).
      outer_loss: the outer loss at the current parameters (a value only; for
        finite-difference checks of ``meta_grads``).
      sync: see module doc.
      impl: one of :data:`META_IMPLS`.
    """

    model: LeNet
    optimizer: torch.optim.Optimizer
    meta_grads: Callable[[], Params]
    step: Callable[[], torch.Tensor]
    outer_loss: Callable[[], torch.Tensor]
    sync: Callable[[Any], Any]
    impl: str


def build_torch_meta_step(
    impl: str = "func_vmap",
    *,
    n_good: int = 4,
    n_bad: int = 4,
    ways: int = 5,
    shots: int = 10,
    query_shots: int = 15,
    inner_steps: int = 5,
    inner_lr: float = 0.01,
    bad_weight: float = 1.0,
    outer_lr: float = 1e-3,
    num_classes: int = 10,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    device: Device = None,
) -> MetaStepBench:
    """Builds one Reverse-MAML outer step in PyTorch.

    Spec: ``n_good + n_bad`` tasks, ``ways``-way, ``shots`` support and
    ``query_shots`` query images per class; ``inner_steps`` SGD steps at
    ``inner_lr`` adapting *all* parameters; exact second order (except
    ``autograd_first_order``); outer loss = mean good query CE -
    ``bad_weight`` * mean bad query CE (plain ascent on bad tasks); Adam(outer_lr).
    Tasks are synthetic and pre-sampled on the device (labels ``0..ways-1``).

    Implementations:
      * ``func_vmap``: ``torch.func.grad`` over a ``torch.func.vmap`` over tasks of
        a loss whose inner loop uses nested ``torch.func.grad`` + ``functional_call``.
      * ``func_loop``: the same, with a Python loop over tasks instead of vmap.
      * ``autograd``: the classic ("higher"-style) ``torch.autograd.grad(...,
        create_graph=True)`` inner loop, Python loop over tasks, one backward per
        task accumulating into ``.grad`` (keeps one task's graph alive at a time).
      * ``autograd_first_order``: the same with ``create_graph=False`` (FOMAML).
    """
    if impl not in META_IMPLS:
        raise ValueError(f"impl={impl!r}; allowed: {META_IMPLS}")
    dev = configure_torch(device)
    n_tasks = n_good + n_bad
    n_s, n_q = ways * shots, ways * query_shots

    torch.manual_seed(seed)
    model = LeNet(num_classes).to(device=dev, dtype=dtype)
    opt = torch.optim.Adam(model.parameters(), lr=outer_lr)
    names = [n for n, _ in model.named_parameters()]

    # Pre-sampled tasks: synthetic images, class-sorted labels 0..ways-1.
    imgs, _ = harness.synthetic_cifar(seed, n_tasks * (n_s + n_q))
    imgs = to_float_nchw(imgs, dev, dtype).reshape(n_tasks, n_s + n_q, 3, 32, 32)
    xs, xq = imgs[:, :n_s].contiguous(), imgs[:, n_s:].contiguous()
    ys = torch.arange(ways, device=dev).repeat_interleave(shots).expand(n_tasks, n_s).contiguous()
    yq = torch.arange(ways, device=dev).repeat_interleave(query_shots).expand(n_tasks, n_q).contiguous()
    # Per-task outer weights: +1/n_good (descent) for good, -bad_weight/n_bad (ascent) for bad.
    w = torch.tensor([1.0 / n_good] * n_good + [-bad_weight / n_bad] * n_bad, device=dev, dtype=dtype)

    def loss_fn(params: Params, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(functional_call(model, params, (x,)), y)

    def outer_loss() -> torch.Tensor:
        total = torch.zeros((), device=dev, dtype=dtype)
        for t in range(n_tasks):
            fast = list(model.parameters())
            for _ in range(inner_steps):
                g = torch.autograd.grad(loss_fn(dict(zip(names, fast)), xs[t], ys[t]), fast)
                fast = [p.detach() - inner_lr * gi for p, gi in zip(fast, g)]
                fast = [p.requires_grad_() for p in fast]
            with torch.no_grad():
                total += w[t] * loss_fn(dict(zip(names, fast)), xq[t], yq[t])
        return total

    if impl.startswith("func"):
        inner_grad = torch.func.grad(loss_fn)

        def query_loss(params: Params, xs_t, ys_t, xq_t, yq_t) -> torch.Tensor:
            for _ in range(inner_steps):
                g = inner_grad(params, xs_t, ys_t)
                params = {k: params[k] - inner_lr * g[k] for k in params}
            return loss_fn(params, xq_t, yq_t)

        if impl == "func_vmap":
            batched = torch.func.vmap(query_loss, in_dims=(None, 0, 0, 0, 0))

            def outer(params: Params) -> tuple[torch.Tensor, torch.Tensor]:
                loss = (w * batched(params, xs, ys, xq, yq)).sum()
                return loss, loss
        else:
            def outer(params: Params) -> tuple[torch.Tensor, torch.Tensor]:
                losses = torch.stack([query_loss(params, xs[t], ys[t], xq[t], yq[t]) for t in range(n_tasks)])
                loss = (w * losses).sum()
                return loss, loss

        outer_grad = torch.func.grad(outer, has_aux=True)

        def compute() -> tuple[Params, torch.Tensor]:
            params = {n: p.detach() for n, p in model.named_parameters()}
            return outer_grad(params)

        def meta_grads() -> Params:
            return compute()[0]

        def step() -> torch.Tensor:
            grads, loss = compute()
            for n, p in model.named_parameters():
                p.grad = grads[n]
            opt.step()
            return loss.detach()

    else:
        second_order = impl == "autograd"
        params = list(model.parameters())

        def accumulate() -> torch.Tensor:
            opt.zero_grad(set_to_none=True)
            total = torch.zeros((), device=dev, dtype=dtype)
            for t in range(n_tasks):
                fast = params
                for _ in range(inner_steps):
                    l = loss_fn(dict(zip(names, fast)), xs[t], ys[t])
                    g = torch.autograd.grad(l, fast, create_graph=second_order)
                    fast = [p - inner_lr * gi for p, gi in zip(fast, g)]
                q = w[t] * loss_fn(dict(zip(names, fast)), xq[t], yq[t])
                q.backward()  # frees this task's graph before the next task
                total += q.detach()
            return total

        def meta_grads() -> Params:
            accumulate()
            return {n: p.grad.clone() for n, p in model.named_parameters()}

        def step() -> torch.Tensor:
            loss = accumulate()
            opt.step()
            return loss

    return MetaStepBench(model, opt, meta_grads, step, outer_loss, make_sync(dev), impl)


def make_torch_meta_step(impl: str = "func_vmap", *, device: Device = None, **spec: Any):
    """``(run_fn, sync_fn)`` for one Reverse-MAML outer step; see :func:`build_torch_meta_step`."""
    b = build_torch_meta_step(impl, device=device, **spec)
    return _with_items(b.step, 1), b.sync


# ----------------------------------------------------------------------------- attack_sweep


def make_torch_attack_sweep(
    *,
    seeds: int | Sequence[int] = 5,
    learning_rates: Sequence[float] = (1e-4, 1e-3, 1e-2, 1e-1),
    epochs: int = 5,
    n_train: int = 5000,
    n_test: int = 5000,
    batch_size: int = 64,
    num_classes: int = 5,
    eval_batch: int = 1000,
    precompute_features: bool = False,
    data_seed: int = 0,
    device: Device = None,
):
    """Linear-probe fine-tuning attack over seeds x learning rates, in PyTorch.

    For each seed and lr: a fresh head (ReLU + Linear 84->``num_classes``, init
    from ``torch.manual_seed(seed)``) on a frozen LeNet feature extractor (random
    weights), Adam(lr, betas=(0.9, 0.999)), ``epochs`` epochs over ``n_train``
    images in batches of ``batch_size`` (shuffled per seed per epoch, remainder
    dropped), test accuracy on ``n_test`` images before training and after each
    epoch.

    ``precompute_features=False`` is the natural implementation: a Python loop
    per (seed, lr) that pushes every batch through the frozen extractor under
    ``torch.no_grad()``. ``True`` is the fair "best" PyTorch: features of the
    train and test sets are computed once per call (inside the timed call), and
    the loops only train the head.

    ``run_fn()`` returns the curves, ``float64[seeds, lrs, epochs + 1]``.
    """
    dev = configure_torch(device)
    seed_list = list(range(seeds)) if isinstance(seeds, int) else list(seeds)
    lrs = list(learning_rates)

    torch.manual_seed(10_000 + data_seed)
    extractor = LeNetFeatures().to(dev).eval().requires_grad_(False)
    xtr, ytr = harness.synthetic_cifar(data_seed, n_train, num_classes)
    xte, yte = harness.synthetic_cifar(data_seed + 1, n_test, num_classes)
    xtr, xte = to_float_nchw(xtr, dev), to_float_nchw(xte, dev)
    ytr = torch.from_numpy(ytr).long().to(dev)
    yte = torch.from_numpy(yte).long().to(dev)
    steps = n_train // batch_size

    @torch.no_grad()
    def extract(x: torch.Tensor) -> torch.Tensor:
        return torch.cat([extractor(x[i:i + eval_batch]) for i in range(0, len(x), eval_batch)])

    def run() -> np.ndarray:
        if precompute_features:
            ftr, fte = extract(xtr), extract(xte)
            inp_tr, inp_te, feat = ftr, fte, (lambda z: z)
        else:
            inp_tr, inp_te, feat = xtr, xte, extractor

        @torch.no_grad()
        def accuracy(head: nn.Module) -> float:
            correct = torch.zeros((), device=dev, dtype=torch.long)
            for i in range(0, n_test, eval_batch):
                logits = head(feat(inp_te[i:i + eval_batch]))
                correct += (logits.argmax(-1) == yte[i:i + eval_batch]).sum()
            return correct.item() / n_test

        curves = np.zeros((len(seed_list), len(lrs), epochs + 1))
        for si, seed in enumerate(seed_list):
            for li, lr in enumerate(lrs):
                torch.manual_seed(seed)
                head = nn.Sequential(nn.ReLU(), nn.Linear(84, num_classes)).to(dev)
                opt = torch.optim.Adam(head.parameters(), lr=lr, betas=(0.9, 0.999))
                gen = torch.Generator(device=dev).manual_seed(seed)  # same order for every lr
                curves[si, li, 0] = accuracy(head)
                for ep in range(epochs):
                    perm = torch.randperm(n_train, generator=gen, device=dev)
                    for s in range(steps):
                        idx = perm[s * batch_size:(s + 1) * batch_size]
                        with torch.no_grad():
                            f = feat(inp_tr[idx])
                        loss = F.cross_entropy(head(f), ytr[idx])
                        opt.zero_grad(set_to_none=True)
                        loss.backward()
                        opt.step()
                    curves[si, li, ep + 1] = accuracy(head)
        return curves

    return _with_items(run, len(seed_list) * len(lrs)), make_sync(dev)


# ----------------------------------------------------------------------------- train / distill


def _epoch_loop(model: nn.Module, opt: torch.optim.Optimizer, x: torch.Tensor, t: torch.Tensor,
                loss_fn: Callable, batch_size: int) -> Callable[[], torch.Tensor]:
    """One shuffled epoch of eager minibatch training (remainder dropped)."""
    n = len(x)
    steps = n // batch_size
    if steps == 0:
        raise ValueError(f"batch_size={batch_size} exceeds the {n} images")

    def run() -> torch.Tensor:
        perm = torch.randperm(n, device=x.device)
        for s in range(steps):
            idx = perm[s * batch_size:(s + 1) * batch_size]
            loss = loss_fn(model(x[idx]), t[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        return loss.detach()

    return _with_items(run, steps * batch_size)


def make_torch_train_epoch(
    *,
    n_images: int = 20_000,
    batch_size: int = 128,
    lr: float = 1e-3,
    num_classes: int = 10,
    seed: int = 0,
    device: Device = None,
):
    """One epoch of supervised LeNet training (Adam ``lr``, CE), eager PyTorch.

    Data (synthetic) is on the device; ``run_fn.items_per_call`` = images per
    epoch, for an ``images/s`` row. Default ``n_images`` = the beneficial half of
    the 40,000-image pre-training split.
    """
    dev = configure_torch(device)
    torch.manual_seed(seed)
    model = LeNet(num_classes).to(dev)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    x, y = harness.synthetic_cifar(seed, n_images, num_classes)
    x, y = to_float_nchw(x, dev), torch.from_numpy(y).long().to(dev)
    return _epoch_loop(model, opt, x, y, F.cross_entropy, batch_size), make_sync(dev)


def make_torch_distill_epoch(
    *,
    n_images: int = 40_000,
    beneficial_fraction: float = 0.5,
    malicious_target: float = -100.0,
    batch_size: int = 128,
    lr: float = 1e-3,
    seed: int = 0,
    device: Device = None,
):
    """One epoch of SKD distillation: student = LeNet features, MSE to targets [N, 84].

    Targets (computed at setup, untimed): the penultimate pre-activations of a
    (random) teacher for the first ``beneficial_fraction`` of the images, the
    constant ``malicious_target`` for the rest; the epoch shuffles them
    together. Default ``n_images`` = the full 40,000-image pre-training split.
    """
    dev = configure_torch(device)
    torch.manual_seed(seed)
    teacher = LeNet().to(dev).eval()
    student = LeNetFeatures().to(dev)
    opt = torch.optim.Adam(student.parameters(), lr=lr)
    x, _ = harness.synthetic_cifar(seed, n_images)
    x = to_float_nchw(x, dev)
    n_ben = int(round(beneficial_fraction * n_images))
    with torch.no_grad():
        targets = torch.full((n_images, 84), malicious_target, device=dev)
        for i in range(0, n_ben, 1000):
            j = min(i + 1000, n_ben)
            targets[i:j] = teacher.features(x[i:j])
    return _epoch_loop(student, opt, x, targets, F.mse_loss, batch_size), make_sync(dev)


# ----------------------------------------------------------------------------- CLI

QUICK = {
    "meta_step": {},  # the full spec even in --quick: the JAX side times it, ratios need equal work
    "attack_sweep": dict(seeds=2, learning_rates=(1e-3, 1e-1), epochs=2, n_train=640, n_test=500),
    "train_epoch": dict(n_images=1280),
    "distill_epoch": dict(n_images=1280),
}


def run_all(quick: bool = False, benches: Sequence[str] | None = None, warmup: int = 1,
            repeats: int = 3, device: Device = None) -> list[harness.Row]:
    """Times every PyTorch bench; returns rows with ratios vs each bench's natural impl."""
    dev = configure_torch(device)
    benches = list(benches or QUICK)
    spec = lambda name: QUICK[name] if quick else {}
    rows: list[harness.Row] = []

    def timed(bench: str, impl: str, made, unit: str, items: float | None = None) -> harness.Row:
        run, sync = made
        harness.reset_peak_memory(dev)
        t = harness.time_fn(run, warmup=warmup, repeats=repeats, sync=sync)
        row = harness.Row.from_timing(bench, impl, t, unit=unit, items_per_call=items,
                                      extra={"peak_memory_bytes": harness.peak_memory_bytes(dev)})
        rows.append(row)
        print(harness.format_table([row]).splitlines()[-1], flush=True)
        return row

    if "meta_step" in benches:
        second = []
        for impl in META_IMPLS:
            r = timed("meta_step", f"torch.{impl}", make_torch_meta_step(impl, device=dev, **spec("meta_step")), "s/step")
            if impl != "autograd_first_order":
                second.append(r)
        best = min(second, key=lambda r: r.median)
        rows.append(dataclasses.replace(best, impl="torch best (2nd order)",
                                        extra={**best.extra, "best_of": best.impl}))
    if "attack_sweep" in benches:
        for pre in (False, True):
            impl = "torch precomputed features" if pre else "torch natural"
            timed("attack_sweep", impl, make_torch_attack_sweep(precompute_features=pre, device=dev,
                                                                **spec("attack_sweep")), "s/sweep")
    if "train_epoch" in benches:
        made = make_torch_train_epoch(device=dev, **spec("train_epoch"))
        timed("train_epoch", "torch", made, "images/s", made[0].items_per_call)
    if "distill_epoch" in benches:
        made = make_torch_distill_epoch(device=dev, **spec("distill_epoch"))
        timed("distill_epoch", "torch", made, "images/s", made[0].items_per_call)

    refs = {"meta_step": "torch.autograd", "attack_sweep": "torch natural"}
    return harness.add_ratios(rows, refs)


def main(argv: Sequence[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="tiny sizes (smoke test)")
    p.add_argument("--bench", action="append", choices=list(QUICK), help="repeatable; default all")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--device", default=None, help="cuda / cpu (default: cuda if available)")
    p.add_argument("--json", default=None, help="write rows + machine info here")
    p.add_argument("--threads", type=int, default=None, help="CPU threads (default: os.cpu_count())")
    a = p.parse_args(argv)
    set_cpu_threads(a.threads)
    rows = run_all(a.quick, a.bench, a.warmup, a.repeats, a.device)
    print()
    print(harness.format_table(rows))
    if a.json:
        harness.write_json(rows, a.json, {"quick": a.quick, "framework": "torch",
                                          "torch_num_threads": torch.get_num_threads()})


if __name__ == "__main__":
    main()
