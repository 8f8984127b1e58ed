"""Tests for trm_jax.tasks: N-way K-shot sampling on the device."""
import jax
import numpy as np
import pytest

from trm_jax import tasks as T

COUNTS = (7, 12, 9, 20, 6)  # unequal class sizes, like digits
PAD = 255


def _pool() -> T.ClassPool:
    """Pool whose pixels encode (valid, class, example id, 0); padding slots are all 255."""
    labels = np.concatenate([np.full(n, c) for c, n in enumerate(COUNTS)])
    ids = np.concatenate([np.arange(n) for n in COUNTS])
    images = np.zeros((labels.size, 2, 2, 1), np.uint8)
    images[:, 0, 0, 0] = 1
    images[:, 0, 1, 0] = labels
    images[:, 1, 0, 0] = ids
    perm = np.random.default_rng(0).permutation(labels.size)  # class order must not matter
    pool = T.group_by_class(images[perm], labels[perm], len(COUNTS))
    pool.images[np.arange(max(COUNTS))[None, :] >= pool.counts[:, None]] = PAD
    return pool


def test_group_by_class_pads_and_counts():
    pool = _pool()
    assert pool.images.shape == (5, 20, 2, 2, 1) and pool.counts.dtype == np.int32
    np.testing.assert_array_equal(pool.counts, COUNTS)
    for c, n in enumerate(COUNTS):
        np.testing.assert_array_equal(pool.images[c, :n, 0, 1, 0], c)
        assert sorted(pool.images[c, :n, 1, 0, 0]) == list(range(n))


def test_group_by_class_errors():
    images = np.zeros((4, 2, 2, 1), np.uint8)
    with pytest.raises(ValueError, match="empty classes: \\[2\\]"):
        T.group_by_class(images, np.array([0, 1, 1, 0]), 3)
    with pytest.raises(ValueError, match="labels must lie in"):
        T.group_by_class(images, np.array([0, 1, 5, 0]), 3)
    with pytest.raises(ValueError, match="labels \\[B\\]"):
        T.group_by_class(images, np.array([0, 1]), 3)


@pytest.mark.parametrize("label_mode", ["fixed", "shuffled"])
def test_sample_tasks_invariants(label_mode):
    pool = jax.device_put(_pool())
    ways, shots, queries, num = 3, 2, 4, 200
    sample = jax.jit(lambda k: T.sample_tasks(k, pool, num, ways, shots, queries, label_mode))
    task = jax.tree_util.tree_map(np.asarray, sample(jax.random.key(0)))
    assert task.support_x.shape == (num, ways * shots, 2, 2, 1)
    assert task.query_x.shape == (num, ways * queries, 2, 2, 1)
    assert task.support_y.shape == (num, ways * shots) and task.support_y.dtype == np.int32
    assert task.query_y.shape == (num, ways * queries) and task.query_x.dtype == np.uint8
    # Per way: [N, K+Q] classes and example ids.
    x = np.concatenate([task.support_x.reshape(num, ways, shots, 4),
                        task.query_x.reshape(num, ways, queries, 4)], axis=2)
    y = np.concatenate([task.support_y.reshape(num, ways, shots),
                        task.query_y.reshape(num, ways, queries)], axis=2)
    cls, ex = x[..., 1], x[..., 2]
    assert (x != PAD).all(), "a padded slot was sampled"
    assert (cls == cls[:, :, :1]).all(), "a way mixes classes"
    assert (y == y[:, :, :1]).all(), "a way mixes labels"
    classes = cls[:, :, 0]
    assert all(len(set(c)) == ways for c in classes), "classes drawn with replacement"
    assert all(len(set(e)) == shots + queries for e in ex.reshape(-1, shots + queries)), \
        "examples drawn with replacement (or support/query overlap)"
    if label_mode == "fixed":
        np.testing.assert_array_equal(y[:, :, 0], classes)
    else:
        np.testing.assert_array_equal(np.sort(y[:, :, 0], axis=1),
                                      np.tile(np.arange(ways), (num, 1)))
        assert len({tuple(c) for c in classes}) > 10, "class-to-label map isn't random"
    # Randomness covers every class and every valid example of a class.
    assert set(classes.ravel()) == set(range(len(COUNTS)))
    assert set(ex[cls == 4].ravel()) == set(range(COUNTS[4]))


def test_sample_task_is_deterministic_and_vmappable():
    pool = jax.device_put(_pool())
    keys = jax.random.split(jax.random.key(1), 3)
    batched = jax.jit(jax.vmap(lambda k: T.sample_task(k, pool, 2, 1, 1)))(keys)
    one = jax.jit(lambda k: T.sample_task(k, pool, 2, 1, 1))
    for i in range(3):
        single = one(keys[i])
        for a, b in zip(single, batched):
            np.testing.assert_array_equal(a, np.asarray(b)[i])


def test_sample_errors_before_compute():
    pool = _pool()
    with pytest.raises(ValueError, match="ways=6 but the pool has only 5 classes"):
        T.sample_task(jax.random.key(0), pool, 6, 1, 1)
    with pytest.raises(ValueError, match="class 4 has only 6 examples"):
        T.sample_tasks(jax.random.key(0), pool, 2, 2, 3, 4)
    with pytest.raises(ValueError, match="largest class has only 20"):  # static: even under jit
        jax.jit(lambda k, p: T.sample_task(k, p, 2, 10, 11))(jax.random.key(0), pool)
    with pytest.raises(ValueError, match="label_mode"):
        T.sample_task(jax.random.key(0), pool, 2, 1, 1, "random")
    with pytest.raises(ValueError, match="shots >= 1"):
        T.sample_task(jax.random.key(0), pool, 2, 0, 1)
