"""``python -m benchmarks.exactness``: the float64 exact meta-gradient vs finite differences
and vs an independent PyTorch autograd implementation (one strategy here, all in the CLI)."""
import numpy as np
import pytest

from benchmarks import exactness


def test_relative_error_is_max_over_leaves_scaled_by_the_reference():
    want = {"a": np.array([1.0, -4.0]), "b": np.array([2.0])}
    got = {"a": np.array([1.0, -3.0]), "b": np.array([2.5])}
    assert exactness.relative_error(got, want) == pytest.approx(0.25)


def test_exact_meta_gradient_matches_finite_differences():
    """The float64 check of the real LeNet meta-gradient, with or without torch installed.
    Finite differences are limited by float64 rounding / h (~1e-9 to 1e-7 measured)."""
    (row,) = exactness.run(batchings=("unroll",), convs=("im2col",), use_torch=False, directions=1)
    assert row["fd_rel_error"] < 1e-6 and row.get("torch_rel_error") is None


@pytest.mark.torch
def test_exact_meta_gradient_matches_pytorch():
    (row,) = exactness.run(batchings=("unroll",), convs=("im2col",), directions=1)
    # Independent float64 implementations of the same maths agree to rounding (~1e-15 measured).
    assert row["torch_rel_error"] < 1e-10
    assert row["fd_rel_error"] < 1e-6
