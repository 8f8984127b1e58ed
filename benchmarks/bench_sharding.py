"""``seed_sharding``: the same 4-seed training epoch on 1 vs 4 forced CPU devices.

Each configuration runs in a subprocess with
``XLA_FLAGS=--xla_force_host_platform_device_count=N`` (the device count is
fixed at JAX start-up). On a GPU/TPU host with several chips the same code
shards the seed axis across real devices. On a 2-core CPU the forced devices
share the cores, so this line shows the mechanism and its overhead, not a
speed-up: expect at most ~2x from 2 cores.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

from benchmarks import harness

_CHILD = """
import json, time, jax, jax.numpy as jnp, numpy as np
from benchmarks import harness
from trm_jax import models, train
images, labels = harness.synthetic_cifar(0, {n})
data = (jnp.asarray(images), jnp.asarray(labels))
model = models.lenet(10)
keys = jax.vmap(jax.random.key)(jnp.arange({seeds}))
config = train.TrainConfig(epochs=1, batch_size=128, strategy="{strategy}")
params = model.init_seeds(keys)
def run():
    state, _ = train.fit_classifier(keys, params, model.apply, *data, config, progress=False)
    return state.params
t = harness.time_fn(run, warmup=1, repeats={repeats}, sync=jax.block_until_ready)
print("RESULT" + json.dumps(dict(median=t.median, min=t.min, max=t.max, devices=jax.device_count())))
"""


def bench_seed_sharding(quick: bool = False, seeds: int = 4, strategy: str = "scan",
                        repeats: int = 3) -> list[harness.Row]:
    n = 1280 if quick else 2560
    rows = []
    for devices in (1, 4):
        env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}",
                   JAX_PLATFORMS="cpu")
        code = _CHILD.format(n=n, seeds=seeds, strategy=strategy, repeats=1 if quick else repeats)
        out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                             cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        if out.returncode != 0:
            raise RuntimeError(out.stderr[-2000:])
        r = json.loads(out.stdout.split("RESULT", 1)[1])
        items = seeds * (n // 128) * 128
        rows.append(harness.Row("seed_sharding", f"{seeds} seeds on {devices} CPU device(s)",
                                items / r["median"], items / r["max"], items / r["min"],
                                unit="images/s", extra={"devices": r["devices"], "strategy": strategy}))
    return harness.add_ratios(rows, f"{seeds} seeds on 1 CPU device(s)")


if __name__ == "__main__":
    print(harness.format_table(bench_seed_sharding(quick="--quick" in sys.argv)))
