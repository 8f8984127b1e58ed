import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from trm_jax import checkpoint, models, train

MODEL = models.lenet(3, (8, 8, 1), padding="SAME")


def make_state(seeds=(0, 1)):
    keys = jax.vmap(jax.random.key)(jnp.asarray(seeds))
    params = jax.vmap(MODEL.init)(keys)
    return jax.vmap(train.init_state, in_axes=(0, 0, None))(keys, params, optax.adam(1e-2))


def data():
    rng = np.random.default_rng(0)
    return (jnp.asarray(rng.integers(1, 256, (64, 8, 8, 1)).astype(np.uint8)),
            jnp.asarray(rng.integers(0, 3, 64).astype(np.int32)))


def fit(state, epochs, start=0):
    return train.fit(state, data(), loss_fn=train.classification_loss(MODEL.apply),
                     optimizer=optax.adam(1e-2), epochs=epochs, batch_size=16, start_epoch=start,
                     strategy="scan", progress=False)[0]


def assert_trees_equal(a, b):
    a, b = checkpoint._to_storable(a), checkpoint._to_storable(b)
    jax.tree.map(np.testing.assert_array_equal, a, b)


def test_round_trip_keeps_params_optimizer_state_keys_and_metadata(tmp_path):
    state = fit(make_state(), 1)
    with checkpoint.Checkpointer(tmp_path / "ckpt") as ckpt:
        ckpt.save(1, state, {"epoch": 1, "note": "x"})
        restored, meta = ckpt.restore(make_state())
    assert meta == {"epoch": 1, "note": "x"}
    assert_trees_equal(restored, state)
    assert jax.dtypes.issubdtype(restored.key.dtype, jax.dtypes.prng_key)


def test_resumed_training_equals_uninterrupted(tmp_path):
    uninterrupted = fit(make_state(), 4)
    with checkpoint.Checkpointer(tmp_path / "ckpt") as ckpt:
        ckpt.save(2, fit(make_state(), 2), {"epoch": 2})
    with checkpoint.Checkpointer(tmp_path / "ckpt") as ckpt:  # a new process would do this
        restored, meta = ckpt.restore(make_state())
    resumed = fit(restored, 4, start=meta["epoch"])
    assert_trees_equal(resumed, uninterrupted)


def test_missing_checkpoint_is_a_clear_error(tmp_path):
    with checkpoint.Checkpointer(tmp_path / "empty") as ckpt:
        with pytest.raises(checkpoint.CheckpointError, match="no checkpoint in .*empty"):
            ckpt.restore(make_state())
        ckpt.save(3, make_state())
        with pytest.raises(checkpoint.CheckpointError, match=r"no checkpoint at step 7 .*\[3\]"):
            ckpt.restore(make_state(), step=7)


def test_corrupt_checkpoint_is_a_clear_error(tmp_path):
    with checkpoint.Checkpointer(tmp_path / "ckpt") as ckpt:
        ckpt.save(1, make_state())
    for path in pathlib.Path(tmp_path / "ckpt" / "1").rglob("*"):
        if path.is_file() and "metadata" not in path.name:
            path.write_bytes(b"\x00garbage")
    with checkpoint.Checkpointer(tmp_path / "ckpt") as ckpt:
        with pytest.raises(checkpoint.CheckpointError, match="step 1 .* corrupt"):
            ckpt.restore(make_state())


def test_mismatched_structure_is_a_clear_error(tmp_path):
    with checkpoint.Checkpointer(tmp_path / "ckpt") as ckpt:
        ckpt.save(1, make_state(seeds=(0, 1)))
        with pytest.raises(checkpoint.CheckpointError, match="does not match"):
            ckpt.restore(make_state(seeds=(0, 1, 2)))
