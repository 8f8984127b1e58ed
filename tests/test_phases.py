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


def test_checkpoint_seconds_throttles_saves_but_never_the_last_step(tmp_path, monkeypatch):
    """At most one save per ``checkpoint_seconds`` of a phase (a clock we move by hand), on
    ``checkpoint_every`` steps only; the phase's last step always; 0 and several processes:
    every ``checkpoint_every`` steps."""
    from trm_jax import hooks as hooks_lib

    clock = [100.0]
    monkeypatch.setattr(hooks_lib.time, "monotonic", lambda: clock[0])
    with runs.RunDir.create(tmp_path / "run") as run:
        hooks = RunFolderHooks(run, checkpoint_every=2, progress=False, checkpoint_seconds=10)
        saved = []
        for step, now in zip(range(1, 11), (100, 101, 104, 111, 112, 113, 114, 121, 122, 123)):
            clock[0] = float(now)
            if hooks.should_save("p", step, last=10):
                hooks.save("p", step, {"w": jnp.zeros(2)}, {})
                saved.append(step)
        hooks.close()
        # the phase's clock starts at its first checkpoint_every step (2, t=101); 4 is 10 s
        # later (save), 6 only 2 s after that, 8 10 s after 4 (save); 10 is the last step
        assert saved == [4, 8, 10]
        other = RunFolderHooks(run, checkpoint_every=2, progress=False, checkpoint_seconds=10)
        assert other.should_save("q", 3, last=3) and not other.should_save("q", 1, last=3)
        monkeypatch.setattr(jax, "process_count", lambda: 2)
        assert other.should_save("q", 2, last=3)  # every process must save together
        zero = RunFolderHooks(run, checkpoint_every=2, progress=False, checkpoint_seconds=0)
        monkeypatch.setattr(jax, "process_count", lambda: 1)
        assert [s for s in range(1, 6) if zero.should_save("r", s, last=5)] == [2, 4, 5]
    for bad in (-1.0, float("nan"), float("inf")):
        with pytest.raises(errors.ConfigError, match="checkpoint_seconds must be finite"):
            RunFolderHooks(run, checkpoint_seconds=bad)
