"""The fine-tuning attack evaluator on the real (offline) digits protocol, small and CPU-fast.

Compilation dominates: every test reuses one attack configuration where it can
(``compiled_sweep`` is cached per model, config and batching).
"""
from __future__ import annotations

import functools
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from trm_jax import attacks as attack
from trm_jax import compilation, datasets, errors, evaluation, plots
from trm_jax.attacks import program

EPOCHS = 2
SEEDS = 2
LRS = (0.01, 0.1)


@pytest.fixture(scope="module")
def setup(digits_protocol):
    model = datasets.model_for("digits", 5, digits_protocol.image_shape)
    keys = jax.vmap(jax.random.key)(jnp.arange(SEEDS))
    params = model.init_seeds(keys)
    return model, params, keys, attack.attack_data(digits_protocol)


def config(name: str, **kw) -> attack.AttackConfig:
    return attack.AttackConfig(name, num_classes=5, epochs=EPOCHS, batch_size=64, **kw)


def looped(model, cfg, params, keys, lrs, data, return_params=False):
    """The reference: a Python loop over (lr, seed) of the jitted single-run attack."""
    one = jax.jit(attack.make_attack(model, cfg, return_params=return_params))
    # Seeds are sliced in numpy: indexing a jax array eagerly compiles a program per shape.
    host = None if params is None else jax.tree.map(np.asarray, params)
    key_data = np.asarray(jax.random.key_data(keys))
    outs = [[one(None if host is None else jax.tree.map(lambda x: x[s], host),
                 jax.random.wrap_key_data(key_data[s]), jnp.float32(lr), data)
             for s in range(keys.shape[0])] for lr in lrs]
    return jax.tree.map(lambda *xs: np.stack(xs).reshape(len(lrs), keys.shape[0], *xs[0].shape),
                        *[o for row in outs for o in row])


def test_vmapped_sweep_equals_python_loop(setup):
    model, params, keys, data = setup
    cfg = config("linear_probe")
    swept = attack.attack_sweep(model, params, keys, LRS, data, cfg, batching="vmap")
    assert swept.curve.shape == (len(LRS), SEEDS, EPOCHS + 1) and swept.curve.dtype == jnp.float32
    ref = looped(model, cfg, params, keys, LRS, data)
    np.testing.assert_allclose(swept.curve, ref.curve, atol=1e-6)
    assert bool(jnp.all(swept.finite))
    # seeds give different heads/shuffles; the attack learns above chance (0.2) at lr 0.1
    assert float(swept.curve[1, :, -1].mean()) > 0.3


def test_models_differing_only_in_their_head_share_one_compiled_sweep(setup, digits_protocol):
    model, params, keys, data = setup
    cfg = config("linear_probe")
    wide = datasets.model_for("digits", 10, digits_protocol.image_shape)  # e.g. UNSIR's model
    wide_params = {"features": params["features"], "head": jax.vmap(wide.init_head)(keys)}
    narrow = attack.attack_sweep(model, params, keys, LRS, data, cfg, batching="vmap")
    with compilation.count_compilations() as stats:
        same = attack.attack_sweep(wide, wide_params, keys, LRS, data, cfg, batching="vmap")
    assert stats.total.compilations == 0
    np.testing.assert_array_equal(same.curve, narrow.curve)


def test_linear_probe_keeps_features_bitwise_and_matches_precomputed_path(setup):
    model, params, keys, data = setup
    masked = config("linear_probe", precompute_features=False)
    out = attack.attack_sweep(model, params, keys, LRS, data, masked, batching="vmap",
                              return_params=True)
    for lr_params in (jax.tree.map(lambda x: x[i], out.params) for i in range(len(LRS))):
        same = jax.tree.map(lambda a, b: bool(jnp.all(a == b)), lr_params["features"], params["features"])
        assert all(jax.tree.leaves(same)), same  # frozen features: exactly the input bits
        assert not bool(jnp.all(lr_params["head"]["dense"]["kernel"] == 0))
    # training the head on features computed once gives the same curves
    fast = attack.attack_sweep(model, params, keys, LRS, data, config("linear_probe"), batching="vmap")
    np.testing.assert_allclose(out.curve, fast.curve, atol=1e-6)


def test_full_finetune_changes_features_and_map_equals_loop(setup):
    model, params, keys, data = setup
    cfg = config("full_finetune")
    lrs = (1e-3, 1e-2)  # as many as SCRATCH_LEARNING_RATES: the CLI test reuses this program
    swept = attack.attack_sweep(model, params, keys, lrs, data, cfg, batching="map")
    assert swept.curve.shape == (len(lrs), SEEDS, EPOCHS + 1)
    ref = looped(model, cfg, params, keys, lrs, data, return_params=True)
    np.testing.assert_allclose(swept.curve, ref.curve, atol=1e-6)
    for name in ("conv1", "conv2", "fc1", "fc2"):  # every layer is trained
        assert not bool(jnp.all(ref.params["features"][name]["kernel"][0]
                                == params["features"][name]["kernel"]))


def test_head_and_penultimate_trains_only_the_last_two_layers(setup):
    model, params, keys, data = setup
    out = attack.attack_sweep(model, params, keys, (0.01,), data, config("head_and_penultimate"),
                              batching="vmap", return_params=True)
    after = jax.tree.map(lambda x: x[0], out.params["features"])
    for name, layer in params["features"].items():
        unchanged = all(bool(jnp.all(a == b)) for a, b in zip(jax.tree.leaves(after[name]),
                                                              jax.tree.leaves(layer)))
        assert unchanged == (name != model.penultimate), name


def test_bad_inputs_raise_before_compute(setup, digits_protocol, monkeypatch):
    model, params, keys, data = setup

    def no_compute(*args, **kwargs):
        raise AssertionError("validation must happen before any compilation")

    monkeypatch.setattr(program, "compiled_sweep", no_compute)
    monkeypatch.setattr(attack, "scratch_reference", no_compute)
    protected = evaluation.Protected("x", model, params, keys, {})
    report = lambda **kw: evaluation.evaluate(protected, digits_protocol, evaluation.SuiteConfig(**kw))
    with pytest.raises(ValueError, match=r"unknown attack.*'bogus'.*allowed.*linear_probe.*full_finetune"):
        report(attacks=("linear_probe", "bogus"))
    with pytest.raises(ValueError, match=r"> 0.*-0\.1"):
        report(learning_rates=(0.1, -0.1))
    with pytest.raises(ValueError, match=r"> 0.*0\.0"):
        report(learning_rates=(0.0,))
    with pytest.raises(ValueError, match="epochs must be an integer >= 1 or None, got 0"):
        report(epochs=0)
    with pytest.raises(ValueError,
                       match=r"optimizers must be a tuple .* each one of \(.adam., .sgd., .momentum.\)"):
        report(optimizers=("rmsprop",))
    with pytest.raises(ValueError, match="batch_size=1000 exceeds the 262"):
        report(batch_size=1000)
    with pytest.raises(ValueError, match=r"reference does not match the model .* for 2 seeds"):
        evaluation.evaluate(protected, digits_protocol, reference=jax.tree.map(
            lambda x: jnp.concatenate([x, x[:1]]), params))
    with pytest.raises(ValueError, match="learning rates"):
        attack.attack_sweep(model, params, keys, (float("nan"),), data, config("linear_probe"))
    with pytest.raises(ValueError, match="unknown batching"):
        attack.attack_sweep(model, params, keys, LRS, data, config("linear_probe"), batching="pmap")
    with pytest.raises(ValueError, match="needs params"):
        attack.attack_sweep(model, None, keys, LRS, data, config("full_finetune"))
    with pytest.raises(ValueError, match="leading seed axis of 3"):  # 2 seeds of params, 3 keys
        attack.attack_sweep(model, params, jax.vmap(jax.random.key)(jnp.arange(3)), LRS, data,
                            config("linear_probe"))


def test_attack_plan_suite_and_defaults():
    plan = attack.attack_plan("all", num_classes=5)
    assert list(plan) == [f"{a}/{o}" for a in attack.ATTACKS for o in ("adam", "momentum")]
    assert all(lrs == attack.LEARNING_RATE_GRID for _, lrs in plan.values())
    assert plan["full_finetune/momentum"][0].optimizer == "momentum"
    paper = attack.attack_plan(num_classes=5)  # default: the paper's probe
    (cfg, lrs), = paper.values()
    assert list(paper) == ["linear_probe"] and lrs == (0.1,) and cfg.optimizer == "adam" and cfg.b1 == 0.9
    mixed = attack.attack_plan(("linear_probe", "full_finetune"))
    assert mixed["linear_probe"][1] == (0.1,) and mixed["full_finetune"][1] == attack.LEARNING_RATE_GRID


def test_report_scratch_plot_and_cli(setup, digits_protocol, digits_data_dir, tmp_path, capsys):
    """attack_report's shape, the scratch reference, the figure and the CLI on a saved run."""
    from experiments import attack as cli
    from trm_jax import checkpoint, runs

    model, params, keys, _ = setup
    run = runs.RunDir.create(tmp_path / "run")
    run.write_config({"experiment": "unit", "dataset": "digits", "run": {"data_dir": digits_data_dir}})
    checkpoint.save_model(run.path, model, params, list(range(SEEDS)))
    result = cli.main(["--run", str(run.path), "--attack.epochs", str(EPOCHS),
                       "--attack.learning-rates", *map(str, LRS)])
    stored = json.loads((run.path / "attack.json").read_text())
    assert (run.path / "attack.png").stat().st_size > 10_000
    entry = stored["attacks"]["linear_probe"]
    assert np.shape(entry["curves"]) == (len(LRS), SEEDS, EPOCHS + 1)
    assert entry["learning_rates"] == list(LRS) and entry["optimizer"] == "adam"
    for key in ("final", "auc", "best", "initial", "steps_to_reach", "relative_to_scratch", "per_lr"):
        assert key in entry, key
    scratch = stored["references"]["scratch"]
    # Two lrs given: scratch sweeps the attacks' own grid (not SCRATCH_LEARNING_RATES, the
    # rule for a lone paper lr), so the comparison is at the same budget.
    assert scratch["learning_rates"] == list(LRS) != list(attack.SCRATCH_LEARNING_RATES)
    assert np.shape(scratch["curves"]) == (len(LRS), SEEDS, EPOCHS + 1)
    assert scratch["final"]["mean"] > 0.3  # scratch training learns the malicious task
    assert stored["summary"]["worst_case"]["final"]["attack"] == "linear_probe"
    assert result["chance"] == pytest.approx(0.2)
    assert "linear_probe" in capsys.readouterr().out
    # never overwrite silently
    with pytest.raises(errors.RunFolderError, match="--overwrite"):
        cli.main(["--run", str(run.path)])
    # the library entry point with a precomputed scratch reference reuses it
    protected = evaluation.Protected("x", model, params, keys, {})
    suite = evaluation.SuiteConfig(learning_rates=LRS, epochs=EPOCHS)
    shared = evaluation.scratch_reference(protected, digits_protocol, suite)
    result = evaluation.evaluate(protected, digits_protocol, suite, scratch=shared)
    assert result.scratch is shared
    report = attack.to_json(result)
    assert report["references"]["scratch"]["curves"] == scratch["curves"]
    np.testing.assert_allclose(report["attacks"]["linear_probe"]["curves"], entry["curves"], atol=1e-6)
    path = plots.plot_attack_curves({"a": entry}, tmp_path / "f.png", "t", chance=0.2, lr="all")
    assert path.exists()


def test_reinit_penultimate_replaces_and_trains_only_the_last_two_layers(setup):
    model, params, keys, data = setup
    # lr 1e-7: training alone moves a weight by <= ~1e-7 per step (Adam), so a change of
    # O(0.01) is the re-initialisation; the layers below stay the released bits.
    out = attack.attack_sweep(model, params, keys, (1e-7,), data, config("reinit_penultimate"),
                              batching="vmap", return_params=True)
    after = jax.tree.map(lambda x: x[0, 0], out.params["features"])
    for name, layer in params["features"].items():
        same = all(bool(jnp.all(a == b[0])) for a, b in zip(jax.tree.leaves(after[name]),
                                                            jax.tree.leaves(layer)))
        assert same == (name != model.penultimate), name
    released = params["features"][model.penultimate]["kernel"][0]
    assert float(jnp.max(jnp.abs(after[model.penultimate]["kernel"] - released))) > 1e-2
    # ... and re-initialised from the attack's REINIT stream: within lr x steps of that init
    from trm_jax import streams

    head_key = jax.random.split(jax.random.fold_in(keys[0], streams.ATTACK))[0]
    fresh = model.init(jax.random.fold_in(head_key, streams.REINIT))["features"][model.penultimate]
    steps = EPOCHS * (data.num_finetune // 64)
    np.testing.assert_allclose(after[model.penultimate]["kernel"], fresh["kernel"], rtol=0,
                               atol=2 * steps * 1e-7)
    assert np.all(np.isfinite(np.asarray(out.curve)))


# ----------------------------------------------------------------------------- issue 12


def _layers_equal(after, before) -> dict[str, bool]:
    return {name: all(bool(jnp.all(a == b)) for a, b in zip(jax.tree.leaves(after[name]),
                                                            jax.tree.leaves(layer)))
            for name, layer in before.items()}


def test_reinit_top_k_parts_follow_the_layer_order(setup):
    model = setup[0]
    assert model.feature_layers == (("conv1",), ("conv2",), ("fc1",), ("fc2",))
    assert attack.resolve_parts(model, ("top:1",)) == ("features/fc2",)
    assert attack.resolve_parts(model, ("head", "top:3")) == (
        "head", "features/conv2", "features/fc1", "features/fc2")
    with pytest.raises(ValueError, match=r"1\.\.3.*scratch"):
        attack.resolve_parts(model, ("top:4",))
    reuse = {n for n, s in attack.ATTACK_SPECS.items() if s.reuse}
    assert reuse == set(attack.ATTACKS) - {"reinit_top3"}  # k=3 > L/2 keeps only conv1


@pytest.mark.parametrize("name,k", [("reinit_top2", 2), ("reinit_top3", 3)])
def test_reinit_top_k_reinitialises_and_trains_the_top_k_only(setup, name, k):
    model, params, keys, data = setup
    # lr 1e-7: training alone moves a weight by <= ~1e-7 per step, so a change of
    # O(0.01) is the re-initialisation; the layers below stay the released bits
    out = attack.attack_sweep(model, params, keys, (1e-7,), data, config(name),
                              batching="map", return_params=True)
    after = jax.tree.map(lambda x: x[0, 0], out.params["features"])
    released = jax.tree.map(lambda x: x[0], params["features"])
    top = ("conv1", "conv2", "fc1", "fc2")[4 - k:]
    assert _layers_equal(after, released) == {n: n not in top for n in released}
    for n in top:
        assert float(jnp.max(jnp.abs(after[n]["kernel"] - released[n]["kernel"]))) > 1e-2, n


def test_standardized_probe_standardises_frozen_features_and_trains_a_linear_head(setup):
    model, params, keys, data = setup
    cfg = config("standardized_probe")
    prepare, _ = attack.attack_phases(model, cfg)
    one = jax.tree.map(lambda x: x[0], params)
    train_f, test_f = prepare(one, data)
    raw = model.features(one["features"], data.finetune_images)
    np.testing.assert_allclose(train_f.mean(0), 0.0, atol=1e-4)
    np.testing.assert_allclose(train_f.std(0), 1.0, rtol=1e-3)
    np.testing.assert_allclose(train_f, (raw - raw.mean(0, keepdims=True))
                               / raw.std(0, keepdims=True), atol=1e-3)
    # SKD-like scaling of the last layer (x 0.1, - 100; float32 keeps ~1e-4 of it) changes nothing after standardising
    fc2 = one["features"]["fc2"]
    skd_like = {**one, "features": {**one["features"], "fc2": {
        "kernel": fc2["kernel"] * 0.1, "bias": fc2["bias"] * 0.1 - 100.0}}}
    np.testing.assert_allclose(prepare(skd_like, data)[0], train_f, atol=2e-2)
    out = attack.attack_sweep(model, params, keys, (0.1,), data, cfg, batching="vmap",
                              return_params=True)
    assert all(_layers_equal(jax.tree.map(lambda x: x[0, 0], out.params["features"]),
                             jax.tree.map(lambda x: x[0], params["features"])).values())
    assert float(out.curve[0, :, -1].mean()) > 0.5


@functools.partial(jax.jit, static_argnames=("model", "warm_epochs"))
def by_hand(model, params, key, lr, finetune, warm_data, warm_epochs):
    """One seed's warm-start attack rebuilt from train's pieces: ``warm_epochs`` epochs of
    every parameter (released head) on ``warm_data``, then a fresh head and EPOCHS epochs of
    full fine-tuning on ``finetune``, with the attack's keys (streams.ATTACK, then the head /
    shuffle split, the warm start's shuffles under streams.WARM_START)."""
    from trm_jax import streams, train

    opt = train.make_optimizer("adam", lr)
    loss = train.classification_loss(model.apply)
    head_key, shuffle_key = jax.random.split(jax.random.fold_in(key, streams.ATTACK))
    state = train.init_state(jax.random.fold_in(shuffle_key, streams.WARM_START), params, opt)
    for _ in range(warm_epochs):
        state, _ = train.train_epoch(state, warm_data, loss_fn=loss, optimizer=opt, batch_size=64)
    trained = {"features": state.params["features"], "head": model.init_head(head_key, 5)}
    state = train.init_state(shuffle_key, trained, opt)
    for _ in range(EPOCHS):
        state, _ = train.train_epoch(state, finetune, loss_fn=loss, optimizer=opt, batch_size=64)
    return state.params


def test_warm_start_trains_everything_on_beneficial_data_first(setup):
    model, params, keys, data = setup
    lr = 1e-2
    warm = attack.attack_sweep(model, params, keys, (lr,), data, config("warm_start"),
                               batching="map", return_params=True)
    epochs = attack.ATTACK_SPECS["warm_start"].warm_start_epochs
    assert epochs == 2
    beneficial = (data.beneficial_images, data.beneficial_labels)
    malicious = (data.finetune_images, data.finetune_labels)
    key_data = np.asarray(jax.random.key_data(keys))
    for s in range(SEEDS):
        one = jax.tree.map(lambda x: np.asarray(x[s]), params)
        key = jax.random.wrap_key_data(key_data[s])
        got = jax.tree.map(lambda x: np.asarray(x[0, s]), warm.params)
        want = by_hand(model, one, key, lr, malicious, beneficial, epochs)
        # The same ops in another compiled program: measured bitwise equal on this CPU; 5e-5
        # leaves room for another XLA's float32 summation order, while the wrong warm starts
        # below end 0.13-0.21 away (measured).
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=0, atol=5e-5), got, want)
        if s:
            continue
        for wrong in (by_hand(model, one, key, lr, malicious, malicious, epochs),   # other data
                      by_hand(model, one, key, lr, malicious, beneficial, 1)):      # fewer epochs
            gap = max(float(np.max(np.abs(a - b))) for a, b in zip(jax.tree.leaves(got),
                                                                     jax.tree.leaves(wrong)))
            assert gap > 1e-2, gap
    with pytest.raises(ValueError, match="beneficial"):
        attack.attack_sweep(model, params, keys, (lr,), attack.AttackData(*data[:4]),
                            config("warm_start"))


def test_probe_then_finetune_is_a_linear_probe_first_then_full_finetuning(setup):
    model, params, keys, data = setup
    probe_epochs = attack.ATTACK_SPECS["probe_then_finetune"].probe_epochs
    epochs = probe_epochs + 1
    two = attack.attack_sweep(model, params, keys, (1e-2,), data,
                              attack.AttackConfig("probe_then_finetune", 5, epochs=epochs, batch_size=64),
                              batching="map", return_params=True)
    probe = attack.attack_sweep(model, params, keys, (1e-2,), data,
                                attack.AttackConfig("linear_probe", 5, epochs=epochs, batch_size=64,
                                                    precompute_features=False), batching="vmap")
    # stage 1 is the (masked) linear probe, step for step
    np.testing.assert_allclose(two.curve[..., :probe_epochs + 1], probe.curve[..., :probe_epochs + 1],
                               atol=1e-6)
    after = jax.tree.map(lambda x: x[0, 0], two.params["features"])
    assert not any(_layers_equal(after, jax.tree.map(lambda x: x[0], params["features"])).values())
    with pytest.raises(ValueError, match="epochs must be > 3"):
        attack.AttackConfig("probe_then_finetune", 5, epochs=3)


def test_budgets_share_one_program_and_short_budgets_are_prefixes(setup):
    model, params, keys, data = setup
    small = attack.data_budget(data, 5)
    assert small.finetune_images.shape == data.finetune_images.shape
    labels = np.asarray(small.finetune_labels)
    kept = {(int(l), np.asarray(im).tobytes()) for l, im in zip(labels, small.finetune_images)}
    assert sorted(np.bincount([l for l, _ in kept])) == [5] * 5  # 5 distinct images per class
    assert attack.data_budget(data, None) is data
    cfg = config("linear_probe")
    fn = attack.compiled_sweep(model, cfg, "vmap", False)
    long = attack.attack_sweep(model, params, keys, LRS, small, cfg, batching="vmap")
    before = fn._cache_size()
    attack.attack_sweep(model, params, keys, LRS, data, cfg, batching="vmap")
    assert fn._cache_size() == before  # another data budget: the same compiled program
    # steps budgets: a 1-epoch attacker's curve is the first epoch of the 2-epoch run
    short = attack.attack_sweep(model, params, keys, LRS, small,
                                attack.AttackConfig("linear_probe", 5, epochs=1, batch_size=64),
                                batching="vmap")
    np.testing.assert_array_equal(short.curve, long.curve[..., :2])
    with pytest.raises(ValueError, match="per class"):
        attack.data_budget(data, 0)


def test_every_finetuning_attack_runs_in_one_compiled_program(setup):
    """Stages are inputs: after full_finetune and reinit_top2 (the program of attacks that
    keep the lower half frozen), the other fine-tuning attacks compile nothing."""
    model, params, keys, data = setup
    stages = attack.stage_arrays(model, config("reinit_top2"))
    assert {n: bool(v["kernel"]) for n, v in stages.reinit.items()} == {
        "conv1": False, "conv2": False, "fc1": True, "fc2": True}
    assert {n: bool(v["kernel"]) for n, v in stages.trainable["features"].items()} == {
        "conv1": False, "conv2": False, "fc1": True, "fc2": True}
    assert bool(stages.trainable["head"]["dense"]["kernel"]) and int(stages.probe_epochs) == 0
    probe = attack.stage_arrays(model, attack.AttackConfig("probe_then_finetune", 5, epochs=4))
    assert int(probe.probe_epochs) == 3 and all(jax.tree.leaves(probe.trainable))
    lower = ("conv1", "conv2")
    assert {n: attack.frozen_lower_half(model, attack.AttackConfig(n, 5, epochs=4))
            for n in attack.ATTACKS} == {
        "linear_probe": (), "standardized_probe": (), "head_and_penultimate": lower,
        "reinit_penultimate": lower, "reinit_top2": lower, "reinit_top3": (), "full_finetune": (),
        "warm_start": (), "probe_then_finetune": ()}
    assert attack.frozen_lower_half(model, config("linear_probe", precompute_features=False)) == lower
    # a part below the upper half, however it is spelled, takes the attack out of the class
    for parts in (("head", "features/conv2/kernel"), ("features/conv1",)):
        spec = attack.register(attack.AttackSpec("tmp_lower", (attack.FineTune(parts),)))
        try:
            assert attack.frozen_lower_half(model, config("tmp_lower")) == (), parts
        finally:
            attack.unregister(spec.name)
    spec = attack.register(attack.AttackSpec("tmp_upper", (attack.FineTune(("head", "features/fc1/bias")),)))
    try:
        assert attack.frozen_lower_half(model, config("tmp_upper")) == lower
    finally:
        attack.unregister(spec.name)
    lrs = (1e-3, 1e-2)
    attack.attack_sweep(model, params, keys, lrs, data, config("full_finetune"), batching="map")
    attack.attack_sweep(model, params, keys, lrs, data, config("reinit_top2"), batching="map")
    with compilation.count_compilations() as stats:
        outs = {name: attack.attack_sweep(model, params, keys, lrs, data, config(name), batching="map")
                for name in ("reinit_top3", "head_and_penultimate", "reinit_penultimate")}
    assert stats.total.compilations == 0, stats.total
    # different stages give different curves from one program
    assert not np.array_equal(outs["reinit_penultimate"].curve, outs["head_and_penultimate"].curve)


def test_the_frozen_lower_half_program_equals_the_general_one(setup):
    """The lower-half program (stop_gradient below, features once per seed) trains what the
    general program trains, on the same stages."""
    import dataclasses

    model, params, keys, data = setup
    cfg = config("reinit_top2")
    lrs = jnp.asarray((1e-2,), jnp.float32)
    fast = attack.attack_sweep(model, params, keys, (1e-2,), data, cfg, batching="map",
                               return_params=True)
    general = program._compiled_sweep(dataclasses.replace(model, num_classes=5),
                                      program._program_config(cfg), "map", True, ())
    features = jax.tree.map(lambda x: x[:, None], params["features"])  # [S, L=1, ...]
    slow = general(features, keys, lrs, data, attack.stage_arrays(model, cfg))
    one_image = 1 / data.test_labels.shape[0]
    np.testing.assert_allclose(fast.curve, slow.curve, rtol=0, atol=one_image + 1e-6)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=0, atol=1e-5),
                 fast.params, slow.params)
