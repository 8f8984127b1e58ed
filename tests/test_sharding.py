"""Seeds sharded over 4 forced CPU devices give the same results as one device.

Why float64, and where the tolerance comes from: sharding may only change the
order of floating-point sums (per-device programs block their convolutions and
reductions differently), never the maths. Such reordering moves each result by
a few ulps, and training then amplifies that: measured after 2 epochs of Adam,
the largest parameter difference is ~20-200 ulps of 1.0 (float64: 3.9e-15 =
18 eps; float32: 1.4e-5 to 2.3e-5 = 120-190 eps). In float32 that is 2e-5, the
size of real parameter values, so no float32 tolerance both catches a sharding
bug and never flakes (the old ``atol=2e-5`` failed 1 in 83,164 values). In
float64 we allow ``AMPLIFICATION = 1e6`` ulps (2.2e-10): 5,000x the worst
amplification measured in either precision, and still ~1e6x below what any
real bug (a seed given another seed's data, key or update) produces (>= 1e-4).
"""
import os
import subprocess
import sys
import textwrap

import numpy as np

AMPLIFICATION = 1e6
TOLERANCE = AMPLIFICATION * float(np.finfo(np.float64).eps)  # 2.2e-10

SCRIPT = textwrap.dedent("""
    import jax
    jax.config.update("jax_enable_x64", True)
    import jax.numpy as jnp, numpy as np
    from trm_jax import models, sharding, train
    assert jax.device_count() == 4, jax.devices()
    rng = np.random.default_rng(0)
    images = jnp.asarray(rng.integers(1, 256, (64, 8, 8, 1)).astype(np.uint8))
    labels = jnp.asarray(rng.integers(0, 3, 64).astype(np.int32))
    model = models.lenet(3, (8, 8, 1), padding="SAME", param_dtype=jnp.float64)
    keys = jax.vmap(jax.random.key)(jnp.arange(4))
    out = {{}}
    for placement in ("sharded", "single"):
        if placement == "single":  # the same process, every seed on one device
            sharding.can_shard = lambda num_seeds: False
        for strategy in ("scan", "step"):
            config = train.TrainConfig(epochs=2, batch_size=16, learning_rate=1e-2,
                                       strategy=strategy)
            state, history = train.fit_classifier(keys, model.init_seeds(keys), model.apply,
                                                  images, labels, config, progress=False)
            leaves = jax.tree_util.tree_leaves(state.params)
            assert all(x.dtype == jnp.float64 for x in leaves), [x.dtype for x in leaves]
            prefix = placement + "/" + strategy
            out[prefix + "/shards"] = len(
                state.params["features"]["conv1"]["kernel"].sharding.device_set)
            out[prefix + "/params"] = np.concatenate([np.ravel(x) for x in leaves])
            for name in ("loss", "accuracy"):
                out[prefix + "/" + name] = np.stack([h[name] for h in history])  # [epochs, S]
    np.savez("{out}", **out)
""")


def test_training_sharded_over_four_devices_equals_one_device(tmp_path):
    # One process with 4 forced CPU devices runs both placements: the seeds split over the
    # 4 devices, then (sharding switched off) all on one device.
    out = tmp_path / "result.npz"
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4",
               JAX_PLATFORMS="cpu")
    process = subprocess.run([sys.executable, "-c", SCRIPT.format(out=out)], env=env,
                             capture_output=True, text=True, timeout=600,
                             cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert process.returncode == 0, process.stderr[-3000:]
    result = dict(np.load(out))
    for strategy in ("scan", "step"):
        sharded, single = f"sharded/{strategy}", f"single/{strategy}"
        # The seed axis really was split, and then really was not.
        assert result[f"{sharded}/shards"] == 4 and result[f"{single}/shards"] == 1
        for name in ("params", "loss", "accuracy"):
            np.testing.assert_allclose(result[f"{sharded}/{name}"], result[f"{single}/{name}"],
                                       rtol=0, atol=TOLERANCE, err_msg=f"{strategy}/{name}")
