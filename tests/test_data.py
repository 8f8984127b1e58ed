import subprocess
import sys

import numpy as np
import pytest

from trm_jax import data


def test_digits_protocol_has_six_nonempty_subsets_with_disjoint_classes(digits_protocol):
    p = digits_protocol
    for split in (p.pretrain, p.finetune, p.test):
        ben, mal = split.beneficial, split.malicious
        assert len(ben) > 0 and len(mal) > 0
        assert set(ben.original_labels) <= {0, 1, 2, 3, 4}
        assert set(mal.original_labels) <= {5, 6, 7, 8, 9}
        assert ben.images.dtype == np.uint8 and ben.labels.dtype == np.int32
        assert ben.images.shape[1:] == (8, 8, 1)
        assert set(np.unique(ben.labels)) == set(range(5)) == set(np.unique(mal.labels))
    sizes = p.sizes()
    assert sum(sizes["pretrain"].values()) == 800
    assert sum(sizes["finetune"].values()) == 497
    assert sum(sizes["test"].values()) == 500  # 50 per class, stratified


def test_mnist5k_split_is_fixed_stratified_and_every_prefix_is_balanced():
    from trm_jax.data.mnist5k import load_csv, mnist5k_split

    images, labels = load_csv()
    assert images.shape == (5000, 28, 28, 1) and images.dtype == np.uint8
    np.testing.assert_array_equal(np.bincount(labels), [500] * 10)
    a, b = mnist5k_split(), mnist5k_split()
    for split in ("train", "test"):
        np.testing.assert_array_equal(a[split][0], b[split][0])
        np.testing.assert_array_equal(a[split][1], b[split][1])
    (train_x, train_y), (test_x, test_y) = a["train"], a["test"]
    assert len(train_y) == 4000 and len(test_y) == 1000
    np.testing.assert_array_equal(np.bincount(test_y), [100] * 10)
    for k in (1, 7, 200, 400):  # every prefix of 10 k images: k of each class
        np.testing.assert_array_equal(np.bincount(train_y[:10 * k], minlength=10), [k] * 10)
    assert not np.array_equal(train_y[:10], train_y[10:20])  # the class order is shuffled too
    # train and test are disjoint and together the whole file (each image once).
    rows = lambda x: {r.tobytes() for r in x.reshape(len(x), -1)}
    assert not rows(train_x) & rows(test_x)
    assert len(rows(train_x) | rows(test_x)) == len(rows(images))


def test_mnist5k_builder_reads_back_the_split_through_tfds_data_source(mnist5k_data_dir):
    from trm_jax.data.mnist5k import mnist5k_split

    split = mnist5k_split()
    for name in ("train", "test"):
        images, labels = data.load_split("mnist5k", name, mnist5k_data_dir)
        assert images.dtype == np.uint8 and labels.dtype == np.int32
        np.testing.assert_array_equal(images, split[name][0])  # order kept (no TFDS shuffle)
        np.testing.assert_array_equal(labels, split[name][1])


def test_mnist5k_protocol_preset_is_exactly_balanced(mnist5k_data_dir):
    p = data.load_protocol(data.preset("mnist5k"), data_dir=mnist5k_data_dir)
    assert p.sizes() == {half: {"beneficial": n, "malicious": n} for half, n in
                         (("pretrain", 1000), ("finetune", 1000), ("test", 500))}
    for split in (p.pretrain, p.finetune, p.test):
        assert split.beneficial.images.shape[1:] == (28, 28, 1)
        for subset in split:
            np.testing.assert_array_equal(np.bincount(subset.labels), [len(subset) // 5] * 5)
    val = data.validation_protocol(p)
    assert val.sizes()["test"] == {"beneficial": 333, "malicious": 333}


def test_prepare_offline_names_the_offline_datasets(tmp_path):
    with pytest.raises(data.ConfigError, match=r"'cifar10' has no offline builder; allowed: "
                                               r"\['digits', 'mnist5k'\]"):
        data.prepare_offline("cifar10", str(tmp_path))
    assert not any(tmp_path.iterdir())


def test_labels_are_positions_in_the_class_list():
    images = np.arange(6, dtype=np.uint8).reshape(6, 1, 1, 1)
    labels = np.array([7, 2, 9, 2, 5, 7])
    subset = data.split_by_class(images, labels, (9, 7))
    np.testing.assert_array_equal(subset.labels, [1, 0, 1])  # 9 -> 0, 7 -> 1
    np.testing.assert_array_equal(subset.original_labels, [7, 9, 7])
    np.testing.assert_array_equal(subset.images.ravel(), [0, 2, 5])


def test_digits_split_is_fixed_and_stratified():
    from trm_jax.data.digits import digits_split

    a, b = digits_split(), digits_split()
    np.testing.assert_array_equal(a["train"][1], b["train"][1])
    assert len(a["train"][1]) == 1297 and len(a["test"][1]) == 500
    assert np.all(np.bincount(a["test"][1]) == 50)
    assert a["train"][0].max() == 255 and a["train"][0].min() == 0


@pytest.mark.parametrize("spec, message", [
    (data.ProtocolSpec("imagenet"), r"unknown dataset 'imagenet'; allowed: \['cifar10', 'digits', 'mnist', 'mnist5k', 'omniglot'\]"),
    (data.ProtocolSpec("digits", (0, 1, 2), (2, 3)), r"overlap on \[2\]"),
    (data.ProtocolSpec("digits", (0, 1), (5, 12)), r"\[12\] out of range .* allowed 0..9"),
    (data.ProtocolSpec("digits", (), (5,)), "beneficial_classes is empty"),
    (data.ProtocolSpec("digits", (0, 0), (5,)), "lists a class twice"),
    (data.ProtocolSpec("digits", pretrain_size=0), "pretrain_size must be >= 1"),
])
def test_bad_specs_name_the_value_and_what_is_allowed(spec, message):
    with pytest.raises(ValueError, match=message):
        data.validate_spec(spec)


def test_split_sizes_beyond_the_data_are_rejected(digits_data_dir):
    spec = data.ProtocolSpec("digits", pretrain_size=1200, finetune_size=500)
    with pytest.raises(ValueError, match=r"needs 1700 training examples, but 'digits' has 1297"):
        data.load_protocol(spec, data_dir=digits_data_dir)
    with pytest.raises(ValueError, match="test_size=900 exceeds the 500"):
        data.load_protocol(data.ProtocolSpec("digits", pretrain_size=800, test_size=900),
                           data_dir=digits_data_dir)


def test_empty_subset_is_rejected():
    images = np.zeros((6, 2, 2, 1), np.uint8) + 3
    train = (images, np.array([0, 0, 0, 1, 1, 1]))
    test = (images, np.array([0, 1, 0, 1, 0, 1]))
    with pytest.raises(ValueError, match="malicious half of the pretrain split is empty"):
        data.protocol_from_arrays(data.ProtocolSpec("digits", (0,), (1,), pretrain_size=3), train, test)


def test_cifar10_loads_through_tfds_with_mock_data(tmp_path):
    tfds = pytest.importorskip("tensorflow_datasets")
    with tfds.testing.mock_data(num_examples=200):
        p = data.load_protocol(data.ProtocolSpec("cifar10", pretrain_size=120), data_dir=str(tmp_path))
    assert p.image_shape == (32, 32, 3)
    assert sum(p.sizes()["pretrain"].values()) == 120
    assert sum(p.sizes()["finetune"].values()) == 80
    assert set(p.pretrain.malicious.original_labels) <= set(range(5, 10))


@pytest.mark.parametrize("name, shape", [("mnist", (28, 28, 1)), ("omniglot", (105, 105, 3))])
def test_other_tfds_datasets_load_with_mock_data(tmp_path, name, shape):
    tfds = pytest.importorskip("tensorflow_datasets")
    with tfds.testing.mock_data(num_examples=30):
        images, labels = data.load_split(name, "train", data_dir=str(tmp_path))
    assert images.shape == (30, *shape) and images.dtype == np.uint8
    assert labels.dtype == np.int32 and labels.max() < data.DATASETS[name].num_classes


def test_unprepared_dataset_offline_says_how_to_prepare_it(tmp_path):
    with pytest.raises(data.DatasetUnavailableError) as err:
        data.load_protocol(data.preset("mnist"), data_dir=str(tmp_path), download=False)
    message = str(err.value)
    assert "'mnist'" in message and "tfds.data_source('mnist'" in message
    assert "With no network, --dataset digits" in message and "offline" in message


def test_import_does_not_load_tensorflow():
    code = ("import sys, trm_jax, trm_jax.data, experiments._cli, experiments.compare; "
            "bad = [m for m in ('tensorflow', 'tensorflow_datasets') if m in sys.modules]; "
            "assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True)


def tree(root):
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


def block_network(monkeypatch):
    import socket

    def refuse(*args, **kwargs):
        raise OSError("network blocked by the test")

    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    monkeypatch.setattr(socket.socket, "connect", refuse)


def with_old_files(root):
    """A data dir with things a failed attempt must not remove."""
    (root / "downloads" / "extracted" / "old").mkdir(parents=True)
    (root / "downloads" / "old.tar.gz").write_bytes(b"old")
    (root / "cifar10" / "old").mkdir(parents=True)
    return tree(root)


def test_offline_unprepared_dataset_fails_in_seconds_and_leaves_nothing(tmp_path, monkeypatch):
    import time

    pytest.importorskip("tensorflow_datasets")  # imported before the clock starts
    before = with_old_files(tmp_path)
    block_network(monkeypatch)
    start = time.monotonic()
    with pytest.raises(data.DatasetUnavailableError) as err:
        data.load_protocol(data.preset("cifar10"), data_dir=str(tmp_path))
    assert time.monotonic() - start < 15  # TFDS alone retries for ~208 s
    message = str(err.value)
    assert "'cifar10'" in message and "is unreachable" in message and "blocked by the test" in message
    assert "tfds.data_source('cifar10'" in message and "--dataset digits" in message
    # The hint comes before TFDS's own (long) error, so a one-line CLI message shows it early.
    assert message.index(" offline (real data") < message.index("TFDS said")
    assert tree(tmp_path) == before


def test_failed_download_is_cleaned_up_and_keeps_what_was_there(tmp_path, monkeypatch):
    tfds = pytest.importorskip("tensorflow_datasets")
    before = with_old_files(tmp_path)
    calls = []

    def failing_source(name, *, split, data_dir, download, builder_kwargs):
        calls.append(download)
        (tmp_path / "cifar10" / "3.0.2.incomplete").mkdir(exist_ok=True)
        if download:  # what TFDS leaves when its retries run out
            (tmp_path / "downloads" / "cifar10").mkdir()
            (tmp_path / "downloads" / "cifar10" / "cifar.tar.gz.tmp.abc").write_bytes(b"part")
            (tmp_path / "downloads" / "extracted" / "new").mkdir()
            (tmp_path / "downloads" / "extracted" / "old" / "new.bin").write_bytes(b"x")
            raise ConnectionError("simulated: download failed after retries")
        raise AssertionError("simulated: dataset not prepared")

    monkeypatch.setattr(tfds, "data_source", failing_source)
    with pytest.raises(data.DatasetUnavailableError, match=r"downloading it failed\. .* TFDS said: ConnectionError: simulated"):
        data.load_split("cifar10", "train", data_dir=str(tmp_path), download=True)
    assert calls == [False, True]  # download=True skips the reachability check
    # Inside a pre-existing extracted archive nothing is judged: only new top-level entries go.
    assert tree(tmp_path) == sorted(before + ["downloads/extracted/old/new.bin"])


def test_no_download_fails_without_touching_the_network(tmp_path, monkeypatch):
    pytest.importorskip("tensorflow_datasets")
    monkeypatch.setattr(data, "download_reachable", lambda url: pytest.fail("network probed"))
    with pytest.raises(data.DatasetUnavailableError, match=r"download=False \(--no-download\)"):
        data.load_split("cifar10", "test", data_dir=str(tmp_path), download=False)
    assert tree(tmp_path) == []


@pytest.mark.parametrize("status, reachable", [(200, True), (405, True), (403, False)])
def test_download_reachable_asks_the_url_once(status, reachable):
    import http.server
    import threading

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_HEAD(self):
            self.send_response(status)
            self.end_headers()

        def log_message(self, *args):
            pass

    server = http.server.HTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.handle_request, daemon=True).start()
    try:
        ok, why = data.download_reachable(f"http://127.0.0.1:{server.server_port}/file", timeout=10)
    finally:
        server.server_close()
    assert ok is reachable and why.startswith(f"HTTP {status}")


def test_download_reachable_is_false_when_the_network_is_blocked(monkeypatch):
    block_network(monkeypatch)
    ok, why = data.download_reachable("https://example.org/x", timeout=2)
    assert not ok and "blocked by the test" in why
