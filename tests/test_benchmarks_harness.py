"""Fast tests of the benchmark harness and the PyTorch reference benches (tiny sizes)."""
from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from benchmarks import harness


# ----------------------------------------------------------------------------- harness


def test_time_fn_counts_calls_and_syncs():
    calls, synced = [], []

    def fn():
        calls.append(1)
        return len(calls)

    t = harness.time_fn(fn, warmup=2, repeats=3, sync=synced.append)
    assert len(calls) == 5 and synced == [1, 2, 3, 4, 5]  # sync sees every output
    assert len(t.samples) == 3 and t.min <= t.median <= t.max
    assert t.compile_s is not None and t.compile_s >= 0

    t0 = harness.time_fn(lambda: None, warmup=0, repeats=1)
    assert t0.compile_s is None
    with pytest.raises(ValueError, match="repeats"):
        harness.time_fn(lambda: None, repeats=0)


def test_time_fn_with_jax_block_until_ready():
    f = jax.jit(lambda x: x @ x)
    t = harness.time_fn(lambda: f(jnp.ones((8, 8))), warmup=1, repeats=2, sync=jax.block_until_ready)
    assert t.median > 0


def test_rows_ratios_and_table():
    timing = harness.Timing(median=2.0, min=1.0, max=4.0, samples=(1.0, 2.0, 4.0), compile_s=5.0)
    slow = harness.Row.from_timing("b", "ref", timing, unit="s/step", items_per_call=2)
    assert (slow.median, slow.min, slow.max) == (1.0, 0.5, 2.0)
    fast = harness.Row("b", "new", 0.25, 0.2, 0.3, "s/step", extra={"compiled_temp_bytes": 3 << 20})
    rate_ref = harness.Row.from_timing("r", "ref", timing, unit="images/s", items_per_call=100)
    assert (rate_ref.median, rate_ref.min, rate_ref.max) == (50.0, 25.0, 100.0)
    rate_new = harness.Row("r", "new", 200.0, 150.0, 250.0, "images/s")
    lone = harness.Row("c", "x", 1.0, 1.0, 1.0)
    rows = harness.add_ratios([slow, fast, rate_ref, rate_new, lone], "ref")
    # ratio = reference_time / impl_time: > 1 means faster, for both unit kinds.
    assert fast.ratio == pytest.approx(4.0) and rate_new.ratio == pytest.approx(4.0)
    assert slow.ratio == 1.0 and lone.ratio is None

    table = harness.format_table(rows)
    lines = table.splitlines()
    assert [c.strip() for c in lines[0].split("|")[1:-1]] == [
        "bench", "impl", "median", "min-max", "unit", "ratio vs reference", "memory"]
    assert len(lines) == 2 + len(rows)
    assert "4.00x vs ref" in table and "temp 3.0 MiB" in table


def test_write_json_roundtrip(tmp_path):
    rows = [harness.Row("b", "i", 1.0, 0.5, 2.0, extra={"x": np.float32(1.5), "nan": float("nan")})]
    path = tmp_path / "sub" / "r.json"
    obj = harness.write_json(rows, path, {"device_label": "test box", "quick": True})
    with open(path) as f:
        loaded = json.load(f)  # strict JSON (NaN -> null)
    assert loaded == obj
    meta = loaded["meta"]
    for key in ("cpu_model", "cpu_count", "jax_version", "jax_backend", "jax_device_kind", "torch_version",
                "command", "date_utc"):
        assert key in meta, key
    assert meta["device_label"] == "test box" and meta["quick"] is True
    back, _ = harness.read_json(path)
    assert back[0].extra == {"x": 1.5, "nan": None} and back[0].median == 1.0


def test_memory_helpers():
    # CPU: no runtime peak tracking; the compiled analysis works everywhere.
    if jax.default_backend() == "cpu":
        assert harness.peak_memory_bytes() is None
    f = jax.jit(lambda x: jnp.sin(x) @ jnp.cos(x).T + 1.0)
    stats = harness.compiled_memory_stats(f, jax.ShapeDtypeStruct((256, 256), jnp.float32))
    assert stats["argument"] == 256 * 256 * 4 and stats["output"] == 256 * 256 * 4
    assert harness.compiled_memory_bytes(f, jnp.ones((256, 256))) == stats["temp"] >= 0


def test_synthetic_cifar():
    x, y = harness.synthetic_cifar(0, 64, num_classes=5)
    assert x.shape == (64, 32, 32, 3) and x.dtype == np.uint8
    assert y.shape == (64,) and y.dtype == np.int32 and set(np.unique(y)) <= set(range(5))
    assert x.min() == 0 and x.max() == 255 and x.std() > 50  # random, not constant
    x2, _ = harness.synthetic_cifar(0, 64, num_classes=5)
    np.testing.assert_array_equal(x, x2)  # deterministic per seed
    xk, _ = harness.synthetic_cifar(jax.random.key(1), 4)
    xk2, _ = harness.synthetic_cifar(jax.random.PRNGKey(1), 4)
    np.testing.assert_array_equal(xk, xk2)
    assert not np.array_equal(xk, harness.synthetic_cifar(jax.random.key(2), 4)[0])


# ----------------------------------------------------------------------------- torch reference


@pytest.fixture(scope="module")
def tr():
    from conftest import IN_TORCH_CHILD

    if not IN_TORCH_CHILD:  # the test itself runs in a process of its own (conftest)
        yield None
        return
    import torch
    from benchmarks import torch_reference

    # Tiny sizes: extra threads only add overhead (and spin-wait badly on a shared
    # box), so pin the builders to one thread instead of os.cpu_count().
    threads = torch.get_num_threads()
    torch_reference.set_cpu_threads(1)
    yield torch_reference
    torch_reference.set_cpu_threads(None)
    torch.set_num_threads(threads)


TINY_META = dict(n_good=1, n_bad=1, ways=2, shots=1, query_shots=2, inner_steps=2, inner_lr=0.1)


@pytest.mark.torch
def test_lenet_param_count(tr):
    assert tr.num_params(tr.LeNet()) == 62_006


@pytest.mark.torch
def test_meta_step_impls_are_exact_second_order(tr):
    import torch

    kw = dict(TINY_META, dtype=torch.float64, device="cpu")
    grads = {impl: tr.build_torch_meta_step(impl, **kw).meta_grads() for impl in tr.META_IMPLS}
    ref = grads["autograd"]
    # Two independent implementations (torch.func nested grad with/without vmap,
    # autograd.grad(create_graph=True)) agree ...
    for impl in ("func_vmap", "func_loop"):
        for k in ref:
            torch.testing.assert_close(grads[impl][k], ref[k], rtol=1e-9, atol=1e-12)
    # ... and differ from first order, so the comparison is not vacuous.
    diff = max((grads["autograd_first_order"][k] - ref[k]).abs().max().item() for k in ref)
    assert diff > 1e-6

    # Central finite difference of the outer loss along a random direction.
    b = tr.build_torch_meta_step("func_vmap", **kw)
    g = b.meta_grads()
    gen = torch.Generator().manual_seed(0)
    params = dict(b.model.named_parameters())
    d = {k: torch.randn(p.shape, generator=gen, dtype=p.dtype) for k, p in params.items()}
    # ReLU/max-pool kinks make larger steps unreliable across 62k perturbed params;
    # in float64, 1e-7 keeps round-off ~1e-9 while staying between kinks.
    eps = 1e-7

    def loss_at(s: float) -> float:
        with torch.no_grad():
            for k, p in params.items():
                p.add_(s * d[k])
        v = b.outer_loss().item()
        with torch.no_grad():
            for k, p in params.items():
                p.sub_(s * d[k])
        return v

    fd = (loss_at(eps) - loss_at(-eps)) / (2 * eps)
    analytic = sum((g[k] * d[k]).sum().item() for k in g)
    assert fd == pytest.approx(analytic, rel=1e-5, abs=1e-8)


@pytest.mark.torch
def test_meta_step_runs_and_updates(tr):
    import torch

    run, sync = tr.make_torch_meta_step("func_vmap", device="cpu", **TINY_META)
    b = tr.build_torch_meta_step("autograd", device="cpu", **TINY_META)
    before = [p.detach().clone() for p in b.model.parameters()]
    loss = sync(b.step())
    assert torch.isfinite(loss)
    assert any(not torch.equal(a, p) for a, p in zip(before, b.model.parameters()))
    assert torch.isfinite(run()) and run.items_per_call == 1


@pytest.mark.torch
@pytest.mark.parametrize("pre", [False, True])
def test_attack_sweep_curves(tr, pre):
    run, sync = tr.make_torch_attack_sweep(seeds=2, learning_rates=(1e-3, 1e-1), epochs=2, n_train=128,
                                           n_test=100, batch_size=32, eval_batch=50,
                                           precompute_features=pre, device="cpu")
    curves = sync(run())
    assert curves.shape == (2, 2, 3)
    assert np.all((curves >= 0) & (curves <= 1))
    # epoch 0 = before training: a fresh head per seed, independent of the lr.
    np.testing.assert_array_equal(curves[:, 0, 0], curves[:, 1, 0])
    # Deterministic: the same seeds give the same curves.
    np.testing.assert_array_equal(curves, run())


@pytest.mark.torch
def test_attack_sweep_natural_equals_precomputed(tr):
    kw = dict(seeds=1, learning_rates=(1e-1,), epochs=1, n_train=96, n_test=60, batch_size=32,
              eval_batch=30, device="cpu")
    nat = tr.make_torch_attack_sweep(precompute_features=False, **kw)[0]()
    pre = tr.make_torch_attack_sweep(precompute_features=True, **kw)[0]()
    np.testing.assert_allclose(nat, pre, atol=1 / 60 + 1e-9)  # at most one borderline test image


@pytest.mark.torch
@pytest.mark.parametrize("bench", ["train_epoch", "distill_epoch"])
def test_epoch_benches(tr, bench):
    import torch

    make = getattr(tr, f"make_torch_{bench}")
    run, sync = make(n_images=300, batch_size=64, device="cpu")
    assert run.items_per_call == 256  # remainder dropped
    first = sync(run()).item()
    for _ in range(3):
        last = sync(run()).item()
    assert np.isfinite(first) and np.isfinite(last)
    if bench == "distill_epoch":
        assert first > 100  # the -100 malicious targets dominate the MSE at init


# ----------------------------------------------------------------------------- xla_options


def test_xla_options_variants_parse_to_compiler_options():
    from benchmarks import xla_options

    assert xla_options.parse_variant("xla_cpu_experimental_ynn_fusion_type=") == {
        "xla_cpu_experimental_ynn_fusion_type": ""}
    assert xla_options.parse_variant("a=true&b=LIBRARY_FUSION_TYPE_DOT&c=false") == {
        "a": True, "b": "LIBRARY_FUSION_TYPE_DOT", "c": False}
    with pytest.raises(SystemExit, match="option=value"):
        xla_options.parse_variant("a=1&oops")
