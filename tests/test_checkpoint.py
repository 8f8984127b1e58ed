import json
import pathlib
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from trm_jax import checkpoint, models, train
from trm_jax.errors import NonFiniteError

MODEL = models.lenet(3, (8, 8, 1), padding="SAME")


def make_state(seeds=(0, 1)):
    keys = jax.vmap(jax.random.key)(jnp.asarray(seeds))
    params = MODEL.init_seeds(keys)
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
    assert meta == {"epoch": 1, "note": "x", "restored_step": 1}
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
    state = make_state(seeds=(0, 1))
    with checkpoint.Checkpointer(tmp_path / "ckpt") as ckpt:
        ckpt.save(1, state)
        with pytest.raises(checkpoint.CheckpointError, match="does not match"):
            ckpt.restore(jax.tree.map(lambda x: x[:1], state))  # 1 seed where 2 were saved


def corrupt_arrays(step_dir):
    """Overwrites the array data files of a saved step (what a bad disk or a cut copy leaves)."""
    files = [p for p in pathlib.Path(step_dir).rglob("*") if p.is_file() and p.parent.name == "d"]
    assert files, sorted(pathlib.Path(step_dir).rglob("*"))
    for path in files:
        path.write_bytes(b"\x00garbage")


def test_corrupt_latest_checkpoint_falls_back_to_the_newest_good_step(tmp_path):
    states = {1: make_state((0, 1)), 2: make_state((2, 3)), 3: make_state((4, 5))}
    with checkpoint.Checkpointer(tmp_path / "ckpt", max_to_keep=3) as ckpt:
        for step, state in states.items():
            ckpt.save(step, state, {"epoch": step})
    corrupt_arrays(tmp_path / "ckpt" / "3")
    with checkpoint.Checkpointer(tmp_path / "ckpt", max_to_keep=3) as ckpt:
        with pytest.warns(UserWarning, match=r"step\(s\) \[3\] .* corrupt .*restored step 2"):
            restored, meta = ckpt.restore(make_state())
        assert meta == {"epoch": 2, "restored_step": 2}
        assert_trees_equal(restored, states[2])
        # The corrupt step is kept aside, so training can save step 3 again.
        assert ckpt.all_steps() == [1, 2] and (tmp_path / "ckpt" / "3.corrupt").is_dir()
        ckpt.save(3, states[1], {"epoch": 3})
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            restored, meta = ckpt.restore(make_state())
        assert meta["restored_step"] == 3
        assert_trees_equal(restored, states[1])


def test_no_step_restores_lists_every_step_tried(tmp_path):
    with checkpoint.Checkpointer(tmp_path / "ckpt", max_to_keep=2) as ckpt:
        ckpt.save(1, make_state())
        ckpt.save(2, make_state())
    corrupt_arrays(tmp_path / "ckpt" / "1")
    corrupt_arrays(tmp_path / "ckpt" / "2")
    with checkpoint.Checkpointer(tmp_path / "ckpt") as ckpt:
        with pytest.raises(checkpoint.CheckpointError, match=r"tried steps \[2, 1\]: step 2 is corrupt .*; step 1 is corrupt"):
            ckpt.restore(make_state())
        assert ckpt.all_steps() == [1, 2]  # nothing moved when nothing restored


def test_a_non_finite_state_is_never_saved(tmp_path):
    state = make_state()
    bad = state._replace(params=jax.tree.map(lambda x: x.at[0].set(jnp.nan), state.params))
    with checkpoint.Checkpointer(tmp_path / "ckpt") as ckpt:
        assert ckpt.describe_latest() == f"no checkpoint yet in {ckpt.directory}"
        with pytest.raises(NonFiniteError, match="refusing to checkpoint step 1: .*no checkpoint yet"):
            ckpt.save(1, bad)
        assert ckpt.all_steps() == []
        ckpt.save(1, state)
        with pytest.raises(NonFiniteError, match=r"last good checkpoint is step 1 in "):
            ckpt.save(2, bad)
        assert ckpt.all_steps() == [1] and ckpt.describe_latest() == f"step 1 in {ckpt.directory}"


def test_saving_an_existing_step_replaces_it(tmp_path):
    with checkpoint.Checkpointer(tmp_path / "ckpt") as ckpt:
        ckpt.save(1, make_state((0, 1)), {"v": 1})
        ckpt.save(1, make_state((2, 3)), {"v": 2})  # orbax alone would skip this silently
        restored, meta = ckpt.restore(make_state(), step=1)
    assert meta["v"] == 2
    assert_trees_equal(restored, make_state((2, 3)))


def test_max_to_keep_prunes_the_oldest_steps(tmp_path):
    with checkpoint.Checkpointer(tmp_path / "ckpt", max_to_keep=2) as ckpt:
        for step in (1, 2, 3, 4):
            ckpt.save(step, make_state((step, step + 10)), {"epoch": step})
        assert ckpt.all_steps() == [3, 4]
        restored, meta = ckpt.restore(make_state(), step=3)
    assert meta["epoch"] == 3 and meta["restored_step"] == 3
    assert_trees_equal(restored, make_state((3, 13)))
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir() if p.name.isdigit()) == ["3", "4"]


def test_restoring_a_named_corrupt_step_is_an_error_not_a_fallback(tmp_path):
    """step=k asks for that step: a corrupt k is an error naming it (no silent older step),
    and nothing is moved aside."""
    with checkpoint.Checkpointer(tmp_path / "ckpt", max_to_keep=3) as ckpt:
        for step in (1, 2):
            ckpt.save(step, make_state((step, step)))
    corrupt_arrays(tmp_path / "ckpt" / "2")
    with checkpoint.Checkpointer(tmp_path / "ckpt", max_to_keep=3) as ckpt:
        with pytest.raises(checkpoint.CheckpointError, match=r"checkpoint at step 2 .* corrupt"):
            ckpt.restore(make_state(), step=2)
        assert ckpt.all_steps() == [1, 2] and not (tmp_path / "ckpt" / "2.corrupt").exists()
        assert_trees_equal(ckpt.restore(make_state(), step=1)[0], make_state((1, 1)))


@pytest.mark.parametrize("text, what", [('{"model": {"name": "lenet"', "JSONDecodeError"),
                                        ('{"seeds": [0]}', "KeyError"),
                                        (json.dumps({"model": {**MODEL.spec(), "name": "resnet"},
                                                     "seeds": [0]}), "resnet")])
def test_a_corrupt_model_json_names_the_file(tmp_path, text, what):
    checkpoint.save_model(tmp_path, MODEL, MODEL.init_seeds(jax.vmap(jax.random.key)(jnp.arange(1))),
                          [0])
    (tmp_path / "model.json").write_text(text)
    with pytest.raises(checkpoint.CheckpointError) as err:
        checkpoint.load_model(tmp_path)
    assert f"{tmp_path / 'model.json'} is corrupt" in str(err.value) and what in str(err.value)


def test_checkpoints_saved_from_several_threads_at_once_are_all_written(tmp_path):
    """orbax's save threads share one global operation id: two checkpoints written at
    once (``compare --workers 2``) mixed their temporary folders up (FileExistsError) or
    hung, until saves queued."""
    import threading
    import time

    start, results = threading.Barrier(4), {}

    def job(i: int) -> None:
        with checkpoint.Checkpointer(tmp_path / f"ckpt{i}", max_to_keep=3) as ckpt:
            start.wait()  # every thread saves at the same moment
            for step in range(6):
                ckpt.save(step, make_state((i, step)), {"thread": i, "step": step})
            results[i] = ckpt.all_steps(), ckpt.restore(make_state())

    threads = [threading.Thread(target=job, args=(i,), daemon=True) for i in range(4)]
    for thread in threads:
        thread.start()
    deadline = time.monotonic() + 60  # a few seconds when saves queue; unqueued they can hang
    for thread in threads:
        thread.join(timeout=max(0.0, deadline - time.monotonic()))
    assert sorted(results) == [0, 1, 2, 3], "a thread's saves failed or hung"
    for i, (steps, (state, meta)) in results.items():
        assert steps == [3, 4, 5]
        assert (meta["thread"], meta["step"], meta["restored_step"]) == (i, 5, 5)
        assert_trees_equal(state, make_state((i, 5)))
