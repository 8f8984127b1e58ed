"""``methods._phases.outer_loop``: the resumable, vmapped meta-training loop, on a toy step
whose every number is known: its NaN stop (last good checkpoint intact) and ``plain_every``."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from trm_jax import errors, methods, runs
from trm_jax.hooks import RunFolderHooks
from trm_jax.methods._phases import outer_loop

KEYS = methods.seed_keys(2)
START = {"w": jnp.asarray([0.0, 10.0])}  # [S]: seed 0 starts at 0, seed 1 at 10


def count_step(params, opt_state, key):
    """w -> w + 1; the objective turns NaN once seed 0's w reaches 3."""
    w = params["w"] + 1.0
    return {"w": w}, opt_state, {"objective": jnp.where(w >= 3.0, jnp.nan, w)}


def plain_step(params, opt_state, key):
    return {"w": params["w"] + 100.0}, opt_state, {"objective": params["w"] * 0.0}


def finite_step(params, opt_state, key):
    return {"w": params["w"] + 1.0}, opt_state, {"objective": params["w"] * 0.0}


def test_plain_every_runs_the_plain_step_at_every_kth_outer_step():
    params, last = outer_loop("meta", finite_step, START, optax.sgd(0.1), KEYS, steps=5,
                              log_every=1, hooks=None, plain_step=plain_step, plain_every=2)
    # steps 1..5: +1, +100, +1, +100, +1
    np.testing.assert_array_equal(params["w"], [203.0, 213.0])
    np.testing.assert_array_equal(last["objective"], [0.0, 0.0])


def test_nan_stops_the_loop_and_keeps_the_last_good_checkpoint(tmp_path):
    with runs.RunDir.create(tmp_path / "run") as run:
        hooks = RunFolderHooks(run, checkpoint_every=1, progress=False)
        with pytest.raises(errors.NonFiniteError) as err:
            outer_loop("meta", count_step, START, optax.sgd(0.1), KEYS, steps=10, log_every=1,
                       hooks=hooks, advice="lower the learning rate")
        message = str(err.value)
        # seed 1 (w = 11) is NaN from step 1 on: stopped at the first logged step, nothing saved
        assert err.value.epoch == 1 and "non-finite ['objective'] at outer step 1" in message
        assert "no checkpoint of this phase was written yet" in message
        assert message.endswith("lower the learning rate")
        hooks.close()

    # seed 1 finite until later: the last good state is the one saved before the NaN step
    start = {"w": jnp.asarray([0.0, -5.0])}
    with runs.RunDir.create(tmp_path / "run2") as run:
        hooks = RunFolderHooks(run, checkpoint_every=1, progress=False)
        with pytest.raises(errors.NonFiniteError, match="at outer step 3") as err:
            outer_loop("meta", count_step, start, optax.sgd(0.1), KEYS, steps=10, log_every=1,
                       hooks=hooks)
        assert "the last good checkpoint (step 2)" in str(err.value)
        assert [r["step"] for r in run.metrics()] == [1, 2]  # the NaN step is not logged
        hooks.close()
        resumed = RunFolderHooks(run, resume=True, checkpoint_every=1, progress=False)
        (params, _), meta = resumed.restore("meta", lambda: (start, jax.vmap(optax.sgd(0.1).init)(start)))
        resumed.close()
    assert meta["step"] == 2
    np.testing.assert_array_equal(params["w"], [2.0, -3.0])
