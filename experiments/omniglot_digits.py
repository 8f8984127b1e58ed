"""Omniglot (beneficial) vs handwritten digits (malicious): Reverse-MAML with Conv4.

    # The paper's second setting (TFDS downloads Omniglot and MNIST; a GPU run):
    python -m experiments.omniglot_digits --seeds 5
    # Offline smoke run, ~6 min on 2 shared CPU cores. Omniglot is TFDS MOCK data
    # (random images: beneficial accuracy stays at chance), the digits are real:
    python -m experiments.omniglot_digits --malicious digits --mock-beneficial --seeds 2 \\
        --width 32 --meta-steps 100 --good-tasks 4 --bad-tasks 4 --bad-term clipped_ascent \\
        --eval-tasks 100

Classic few-shot MAML on the beneficial side (Finn et al., 2017): N-way K-shot
tasks from the characters of Omniglot's *background* alphabets (TFDS ``train``)
with labels ``0..N-1`` shuffled per task (``label_mode="shuffled"``; the Conv4
head has ``N`` outputs). Bad tasks are N-way tasks from the malicious digits
(MNIST, or scikit-learn's 8x8 digits upsampled) and are trained in reverse
(``trm_jax.meta``: exact second order by default). Images: Omniglot 105x105x3
-> 28x28 grey, inverted to white strokes on black like the digits
(``trm_jax.data.grey_resize``).

Evaluation:

1. beneficial few-shot accuracy: mean post-adaptation query accuracy over
   ``--eval-tasks`` N-way tasks from the *evaluation* alphabets (TFDS ``test``:
   characters never seen in meta-training), with the training inner loop
   (``meta.task_logits``); reported as ``beneficial_fewshot_accuracy`` and as
   ``beneficial_test_accuracy`` (the key every run folder has);
2. the fine-tuning attack (``trm_jax.attack.attack_report``): the meta-learned
   features with a fresh 10-way head, fine-tuned on the malicious fine-tuning
   split, malicious test accuracy per epoch, next to the scratch reference.

``--bad-term ascent`` (default) is the paper's unbounded gradient ascent; if it
diverges the run stops with a message (last good checkpoint kept):
``clipped_ascent``, ``inverse_ce`` or ``uniform_kl`` are the bounded alternatives.

The paper reports ~85% beneficial accuracy and ~20% on digits after
fine-tuning. Omniglot and MNIST need TFDS downloads; offline, ``--mock-beneficial``
/ ``--mock-malicious`` load them from ``tfds.testing.mock_data`` (random images:
the run tests the pipeline and its numbers mean nothing). ``results.json`` and
the printed summary always say which data were real (``data_provenance``).
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import math
import sys
from typing import Any, Iterator, NamedTuple

import jax
import numpy as np

from experiments import common, reverse_maml
from trm_jax import attack, data, meta, models, plots, runs, tasks

NAME = "omniglot_digits"
MALICIOUS = ("mnist", "digits")
MOCK = "TFDS mock data: NOT real"
# Key streams: meta_train folds its own tag (reverse_maml.META_STREAM), the attack 0x0A77;
# fold_in(key, 0) is free for evaluation.
_EVAL_STREAM = 0
_BENEFICIAL_EVAL, _MALICIOUS_EVAL = 1, 2


@dataclasses.dataclass(frozen=True)
class DataConfig:
    """Which data, at what resolution, and how the malicious dataset is split.

    Attributes:
      malicious: ``"mnist"`` (TFDS, 28x28x1) or ``"digits"`` (scikit-learn's
        8x8 digits, offline, upsampled).
      image_size: side ``S`` of every image (``S x S x 1`` grey).
      resize_method: ``"bilinear"`` or ``"nearest"`` (Omniglot and digits alike).
      invert_omniglot: white strokes on black (like the digits), as in MAML.
      malicious_classes: digit classes of the bad tasks and the attack.
      malicious_pretrain_size: ``train[:P]`` of the malicious dataset feeds the
        bad tasks; ``None``: the dataset's protocol preset (MNIST 50,000, digits 800).
      malicious_finetune_size: ``train[P:P+F]`` is the attacker's fine-tuning
        set; ``None``: the rest of ``train``.
      malicious_test_size: ``test[:T]`` scores the attack; ``None``: all of ``test``.
      mock_beneficial, mock_malicious: load that dataset from
        ``tfds.testing.mock_data`` (random images; offline smoke runs only).
      mock_examples: examples per split of the mock data.
    """

    malicious: str = "mnist"
    image_size: int = 28
    resize_method: str = "bilinear"
    invert_omniglot: bool = True
    malicious_classes: tuple[int, ...] = tuple(range(10))
    malicious_pretrain_size: int | None = None
    malicious_finetune_size: int | None = None
    malicious_test_size: int | None = None
    mock_beneficial: bool = False
    mock_malicious: bool = False
    mock_examples: int = 3000

    def __post_init__(self) -> None:
        if self.malicious not in MALICIOUS:
            raise ValueError(f"malicious must be one of {MALICIOUS}, got {self.malicious!r}")
        if self.resize_method not in data.RESIZE_METHODS:
            raise ValueError(f"resize_method must be one of {data.RESIZE_METHODS}, "
                             f"got {self.resize_method!r}")
        if not (isinstance(self.image_size, int) and self.image_size >= 1):
            raise ValueError(f"image_size must be an int >= 1, got {self.image_size!r}")
        classes = tuple(self.malicious_classes)
        bad = [c for c in classes if not 0 <= c <= 9]
        if len(classes) < 2 or len(set(classes)) != len(classes) or bad:
            raise ValueError(f"malicious_classes={classes}: need >= 2 distinct digits in 0..9"
                             + (f" (out of range: {bad})" if bad else ""))
        for name in ("malicious_pretrain_size", "malicious_finetune_size", "malicious_test_size"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"{name} must be >= 1 or None (default), got {value}")
        if self.mock_examples < 1:
            raise ValueError(f"mock_examples must be >= 1, got {self.mock_examples}")


class FewShotData(NamedTuple):
    """Everything the experiment reads, as host arrays.

    Attributes:
      meta_train: Omniglot background characters, ``images uint8[N, S, S, 1]``,
        labels ``0..C-1`` (one class per character).
      meta_test: Omniglot evaluation characters (disjoint alphabets), same layout.
      malicious: a malicious-only :class:`trm_jax.data.ProtocolData`: its
        malicious halves are the digits' pre-training (bad tasks), fine-tuning
        and test splits (the attack); its beneficial halves are empty
        placeholders (the attack evaluator reads only the malicious halves).
      provenance: ``{"beneficial": ..., "malicious": ...}``, real or mock.
      dropped_classes: Omniglot characters per split with fewer than
        ``shots + queries`` drawings (0 on real data).
    """

    meta_train: data.Subset
    meta_test: data.Subset
    malicious: data.ProtocolData
    provenance: dict[str, str]
    dropped_classes: dict[str, int]


# ----------------------------------------------------------------------------- data


@contextlib.contextmanager
def _maybe_mock(enabled: bool, num_examples: int) -> Iterator[None]:
    if not enabled:
        yield
        return
    import tensorflow_datasets as tfds

    with tfds.testing.mock_data(num_examples=num_examples):
        yield


def _load(dataset: str, mock: bool, config: DataConfig, data_dir: str | None,
          download: bool) -> tuple[tuple[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray], bool]:
    """``(train, test, mocked)``: both TFDS splits as host arrays, and whether TFDS was mocked."""
    info = data.dataset_info(dataset)
    with _maybe_mock(mock, config.mock_examples):
        mocked = data.tfds_mock_active()
        try:
            train = data.load_split(dataset, info.train_split, data_dir, download)
            test = data.load_split(dataset, info.test_split, data_dir, download)
        except data.DatasetUnavailableError as err:
            flag = "--mock-beneficial" if dataset == "omniglot" else "--mock-malicious"
            raise data.DatasetUnavailableError(
                f"{err}\nOffline, {flag} runs the pipeline on TFDS mock data (random images; "
                f"its numbers are NOT results)" + ("" if dataset == "omniglot" else
                                                   ", or use --malicious digits (real, offline)")
            ) from err
    return train, test, mocked


def load_omniglot(config: DataConfig, min_examples: int, data_dir: str | None = None,
                  download: bool = True) -> tuple[data.Subset, data.Subset, str, dict[str, int]]:
    """Omniglot background (meta-train) and evaluation (meta-test) characters.

    Returns:
      ``(meta_train, meta_test, provenance, dropped)``; images
      ``uint8[N, S, S, 1]``, classes = characters with ``>= min_examples`` drawings.
    """
    train, test, mocked = _load("omniglot", config.mock_beneficial, config, data_dir, download)
    subsets, dropped = [], {}
    for split, (images, labels) in (("meta_train", train), ("meta_test", test)):
        images = data.grey_resize(images, config.image_size, invert=config.invert_omniglot,
                                  method=config.resize_method)
        try:
            subset = data.fewshot_classes(images, labels, min_examples)
        except ValueError as err:
            raise ValueError(f"Omniglot {split}: {err}" + (
                f" (mock data has random labels over 1,623 characters: raise --mock-examples, "
                f"now {config.mock_examples})" if mocked else "")) from err
        dropped[split] = int(np.unique(labels).size - subset.num_classes)
        subsets.append(subset)
    what = f"omniglot ({MOCK})" if mocked else "omniglot (TFDS 'omniglot', real)"
    return subsets[0], subsets[1], what, dropped


def load_malicious(config: DataConfig, data_dir: str | None = None,
                   download: bool = True) -> tuple[data.ProtocolData, str]:
    """The malicious digits as a malicious-only protocol (see :class:`FewShotData`).

    ``train[:P]`` -> ``pretrain.malicious`` (bad tasks), ``train[P:P+F]`` ->
    ``finetune.malicious`` (the attacker), ``test[:T]`` -> ``test.malicious``;
    images ``uint8[N, S, S, 1]``, labels = positions in ``malicious_classes``.
    """
    name = config.malicious
    train, test, mocked = _load(name, config.mock_malicious, config, data_dir, download)
    preset = data.preset(name)
    pretrain = config.malicious_pretrain_size or preset.pretrain_size
    finetune = config.malicious_finetune_size
    n_train, n_test = len(train[1]), len(test[1])
    if pretrain + (finetune or 1) > n_train:
        raise ValueError(f"malicious_pretrain_size={pretrain} + malicious_finetune_size={finetune} "
                         f"needs {pretrain + (finetune or 1)} training examples but {name!r} has "
                         f"{n_train}{' (mock)' if mocked else ''}; allowed: pretrain + finetune "
                         f"<= {n_train}")
    if config.malicious_test_size is not None and config.malicious_test_size > n_test:
        raise ValueError(f"malicious_test_size={config.malicious_test_size} exceeds the {n_test} "
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
            raise ValueError(f"the malicious {split} split of {name!r} has no examples of classes "
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
    else:
        what = "mnist (TFDS 'mnist', real)"
    return protocol, what


def load_data(config: DataConfig, min_examples: int, data_dir: str | None = None,
              download: bool = True) -> FewShotData:
    """Loads Omniglot and the malicious digits (see :class:`FewShotData`)."""
    meta_train, meta_test, ben, dropped = load_omniglot(config, min_examples, data_dir, download)
    malicious, mal = load_malicious(config, data_dir, download)
    return FewShotData(meta_train, meta_test, malicious, {"beneficial": ben, "malicious": mal},
                       dropped)


def class_pool(subset: data.Subset) -> tasks.ClassPool:
    """``images[C, M, S, S, 1]``, ``counts[C]`` of one subset, on the device."""
    return jax.device_put(tasks.group_by_class(subset.images, subset.labels, subset.num_classes))


# ----------------------------------------------------------------------------- evaluation


def fewshot_accuracy(model: Any, params: Any, keys: jax.Array, pool: tasks.ClassPool,
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
    """
    if num_tasks < 1 or batch < 1:
        raise ValueError(f"need num_tasks >= 1 and batch >= 1, got {num_tasks}, {batch}")
    tasks.check_task_shape(pool, config.ways, config.shots, config.queries, "evaluation pool")
    batch = min(batch, num_tasks)
    num_chunks = -(-num_tasks // batch)

    def one_seed(p: Any, key: jax.Array) -> jax.Array:
        def chunk(k: jax.Array) -> jax.Array:
            k_tasks, k_heads = jax.random.split(k)
            drawn = tasks.sample_tasks(k_tasks, pool, batch, config.ways, config.shots,
                                       config.queries, config.label_mode)
            _, post, _ = meta.map_tasks(
                lambda tk: meta.task_logits(p, tk[0], tk[1], config, model),
                (drawn, jax.random.split(k_heads, batch)), config.task_batching)
            return jax.vmap(meta.accuracy)(post, drawn.query_y)  # [batch]

        return jax.lax.map(chunk, jax.random.split(key, num_chunks)).reshape(-1)[:num_tasks]

    return np.asarray(jax.jit(jax.vmap(one_seed))(params, keys))


def eval_keys(keys: jax.Array, stream: int) -> jax.Array:
    """Per-seed evaluation keys, disjoint from meta-training's and the attack's streams."""
    fold = jax.vmap(jax.random.fold_in, in_axes=(0, None))
    return fold(fold(keys, _EVAL_STREAM), stream)


def summarize_tasks(acc: np.ndarray) -> dict[str, Any]:
    """``f[S, T]`` -> seed summary of the mean over tasks, plus each seed's 95% CI over tasks."""
    out = runs.summarize(acc.mean(1))
    out["per_seed_ci95"] = (1.96 * acc.std(1) / math.sqrt(acc.shape[1])).tolist()
    out["num_tasks"] = int(acc.shape[1])
    return out


# ----------------------------------------------------------------------------- CLI


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=f"python -m experiments.{NAME}", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    d = p.add_argument_group("data")
    d.add_argument("--malicious", default="mnist", choices=MALICIOUS,
                   help="mnist (TFDS download) or digits (scikit-learn, offline, upsampled)")
    d.add_argument("--image-size", type=common.positive_int, default=28)
    d.add_argument("--resize-method", default="bilinear", choices=data.RESIZE_METHODS)
    d.add_argument("--no-invert-omniglot", action="store_true",
                   help="keep Omniglot's black strokes on white")
    d.add_argument("--malicious-classes", type=common.int_list, default=tuple(range(10)))
    d.add_argument("--malicious-pretrain-size", type=common.positive_int, default=None,
                   help="train[:P] feeds the bad tasks (default: MNIST 50000, digits 800)")
    d.add_argument("--malicious-finetune-size", type=common.positive_int, default=None,
                   help="train[P:P+F] is the attacker's fine-tuning set (default: the rest)")
    d.add_argument("--malicious-test-size", type=common.positive_int, default=None,
                   help="test[:T] scores the attack (default: all)")
    d.add_argument("--data-dir", default=None,
                   help="TFDS data dir (default $TFDS_DATA_DIR or ~/tensorflow_datasets)")
    d.add_argument("--no-download", action="store_true",
                   help="fail at once if a dataset is not prepared (offline: no retries)")
    d.add_argument("--mock-beneficial", action="store_true",
                   help="Omniglot from tfds.testing.mock_data: random images, NOT real results")
    d.add_argument("--mock-malicious", action="store_true",
                   help="the malicious dataset from tfds.testing.mock_data (NOT real)")
    d.add_argument("--mock-examples", type=common.positive_int, default=3000,
                   help="examples per split of the mock data")

    m = p.add_argument_group("few-shot Reverse-MAML (trm_jax.meta; labels shuffled per task)")
    m.add_argument("--ways", type=common.positive_int, default=5)
    m.add_argument("--shots", type=common.positive_int, default=1)
    m.add_argument("--queries", type=common.positive_int, default=5, help="per class")
    m.add_argument("--inner-steps", type=int, default=1, help="1 = MAML's Omniglot setting")
    m.add_argument("--inner-lr", type=float, default=0.4)
    m.add_argument("--good-tasks", type=common.positive_int, default=8, help="Omniglot tasks per meta-batch")
    m.add_argument("--bad-tasks", type=int, default=8, help="digit tasks per meta-batch (0: plain MAML)")
    m.add_argument("--lam", type=float, default=1.0, help="weight of the bad-task term")
    m.add_argument("--bad-term", default="ascent", choices=sorted(meta.BAD_TERMS),
                   help="ascent = the paper's negated cross-entropy")
    m.add_argument("--loss-cap", type=float, default=None, help="cap of clipped_ascent (default log N)")
    m.add_argument("--meta-grad", default="exact", choices=meta.META_GRADS)
    m.add_argument("--adapt", default="all", choices=meta.ADAPT_MODES)
    m.add_argument("--remat", action="store_true", help="jax.checkpoint each inner step")
    m.add_argument("--task-batching", default="auto", choices=meta.TASK_BATCHINGS)
    m.add_argument("--meta-steps", type=common.positive_int, default=2000)
    m.add_argument("--outer-lr", type=float, default=1e-3, help="outer Adam learning rate")
    m.add_argument("--width", type=common.positive_int, default=64, help="Conv4 channels")
    m.add_argument("--norm", default="none", choices=("none", "layer"), help="Conv4 normalisation")
    m.add_argument("--log-every", type=common.positive_int, default=10)
    m.add_argument("--meta-checkpoint-every", type=common.positive_int, default=100)
    m.add_argument("--eval-tasks", type=common.positive_int, default=200,
                   help="test tasks per seed for the few-shot accuracies")
    m.add_argument("--eval-batch", type=common.positive_int, default=25, help="test tasks per chunk")

    r = p.add_argument_group("run")
    r.add_argument("--seeds", type=common.positive_int, default=5, help="seeds 0..N-1, vmapped")
    r.add_argument("--workdir", default=None, help=f"run folder (default runs/{NAME}-<timestamp>)")
    r.add_argument("--overwrite", action="store_true", help="replace an existing run folder")
    r.add_argument("--resume", action="store_true", help="continue the run in --workdir")
    r.add_argument("--no-progress", action="store_true", help="no progress bars")
    common.add_attack_args(p)
    return p


def data_config(args: argparse.Namespace) -> DataConfig:
    return DataConfig(
        malicious=args.malicious, image_size=args.image_size, resize_method=args.resize_method,
        invert_omniglot=not args.no_invert_omniglot,
        malicious_classes=tuple(args.malicious_classes),
        malicious_pretrain_size=args.malicious_pretrain_size,
        malicious_finetune_size=args.malicious_finetune_size,
        malicious_test_size=args.malicious_test_size, mock_beneficial=args.mock_beneficial,
        mock_malicious=args.mock_malicious, mock_examples=args.mock_examples)


def meta_config(args: argparse.Namespace) -> meta.MetaConfig:
    if args.bad_tasks < 0:
        raise ValueError(f"--bad-tasks must be >= 0, got {args.bad_tasks}")
    if not args.outer_lr > 0:
        raise ValueError(f"--outer-lr must be > 0, got {args.outer_lr}")
    return meta.MetaConfig(
        ways=args.ways, shots=args.shots, queries=args.queries, good_tasks=args.good_tasks,
        bad_tasks=args.bad_tasks, inner_lr=args.inner_lr, inner_steps=args.inner_steps,
        adapt=args.adapt, head_init="keep", meta_grad=args.meta_grad, remat=args.remat,
        bad_term=args.bad_term, lam=args.lam, loss_cap=args.loss_cap,
        task_batching=args.task_batching, label_mode="shuffled")


def main(argv: list[str] | None = None) -> dict:
    args = parser().parse_args(argv)
    timer = common.Timer()
    dconf, config = data_config(args), meta_config(args)  # every check before any loading
    attack_opts = common.attack_options(args)
    seeds, keys = common.seeds_and_keys(args)

    loaded = load_data(dconf, config.shots + config.queries, args.data_dir, not args.no_download)
    protocol = loaded.malicious
    good_pool, bad_pool = class_pool(loaded.meta_train), class_pool(protocol.pretrain.malicious)
    test_pools = {"beneficial": class_pool(loaded.meta_test),
                  "malicious": class_pool(protocol.test.malicious)}
    meta.check_pools(config, good_pool, bad_pool)
    for half, pool in test_pools.items():
        tasks.check_task_shape(pool, config.ways, config.shots, config.queries, f"{half} test pool")
    model = models.conv4(config.ways, (dconf.image_size, dconf.image_size, 1), args.width, args.norm)
    sizes = {"omniglot_meta_train": {"classes": loaded.meta_train.num_classes,
                                     "images": len(loaded.meta_train)},
             "omniglot_meta_test": {"classes": loaded.meta_test.num_classes,
                                    "images": len(loaded.meta_test)},
             "omniglot_dropped_classes": loaded.dropped_classes,
             "malicious": {split: len(getattr(protocol, split).malicious)
                           for split in ("pretrain", "finetune", "test")}}
    run = common.open_run(NAME, args, {
        "experiment": NAME, **vars(args), "data": dconf, "meta": config,
        "model": model.spec(), "data_sizes": sizes, "data_provenance": loaded.provenance})
    _print_provenance(loaded.provenance)

    params, last = reverse_maml.meta_train(
        run, model, config, keys, good_pool, bad_pool, meta_steps=args.meta_steps,
        outer_lr=args.outer_lr, log_every=args.log_every,
        checkpoint_every=args.meta_checkpoint_every, resume=args.resume,
        progress=not args.no_progress)
    common.save_model(run, model, params, seeds)

    if args.resume:  # evaluation reruns in full (same keys, same numbers): drop older records
        run.truncate_metrics(lambda r: r.get("phase") != "eval")
    fewshot = {}
    for half, stream in (("beneficial", _BENEFICIAL_EVAL), ("malicious", _MALICIOUS_EVAL)):
        acc = fewshot_accuracy(model, params, eval_keys(keys, stream), test_pools[half], config,
                               args.eval_tasks, args.eval_batch)
        fewshot[half] = summarize_tasks(acc)
        run.log({"phase": "eval", "split": f"{half}_fewshot", "accuracy": fewshot[half]["mean"],
                 "per_seed": fewshot[half]["per_seed"]})
    print(f"few-shot {config.ways}-way {config.shots}-shot accuracy after adaptation: Omniglot "
          f"(evaluation alphabets) {fewshot['beneficial']['mean']:.4f}, malicious digits "
          f"{fewshot['malicious']['mean']:.4f}")

    report = attack.attack_report(model, params, keys, protocol, verbose=True, **attack_opts)
    results = {
        "experiment": NAME, "dataset": f"omniglot-vs-{dconf.malicious}", "seeds": seeds,
        "data_provenance": {**loaded.provenance, "all_real": not _any_mock(loaded.provenance)},
        "beneficial_fewshot_accuracy": fewshot["beneficial"],
        "beneficial_test_accuracy": fewshot["beneficial"],
        "beneficial_test_accuracy_definition": (
            f"{config.ways}-way {config.shots}-shot query accuracy after {config.inner_steps} "
            f"inner step(s), mean over {args.eval_tasks} tasks per seed from Omniglot's "
            "evaluation alphabets (TFDS test split)"),
        "malicious_fewshot_accuracy": fewshot["malicious"],
        "attacks": report["attacks"], "references": report["references"],
        "summary": report["summary"],
        "meta_final_metrics": {k: runs.summarize(v) for k, v in last.items()},
        "wall_seconds": timer.seconds()}
    run.write_results(results)
    figure(run, report, results, len(dconf.malicious_classes))
    print_summary(results)
    return results


def _any_mock(provenance: dict[str, str]) -> bool:
    return any(MOCK in v for v in provenance.values())


def _print_provenance(provenance: dict[str, str]) -> None:
    for half, what in provenance.items():
        print(f"{half} data: {what}")
    if _any_mock(provenance):
        print("WARNING: this run uses TFDS mock data (random images); its numbers test the "
              "pipeline and are NOT results.")


def figure(run: runs.RunDir, report: dict, results: dict, num_classes: int) -> None:
    entries = {f"Reverse-MAML Conv4: {k}": v for k, v in report["attacks"].items()}
    entries.update(report["references"])
    mock = " [MOCK DATA: not real]" if not results["data_provenance"]["all_real"] else ""
    plots.plot_attack_curves(entries, run.path / "attack_curves.png",
                             f"Fine-tuning attack on {results['dataset']}{mock}",
                             chance=1.0 / num_classes)


def print_summary(results: dict) -> None:
    print()
    _print_provenance({k: v for k, v in results["data_provenance"].items() if k != "all_real"})
    for name in ("beneficial_fewshot_accuracy", "malicious_fewshot_accuracy"):
        s = results[name]
        print(f"{name:28s} {s['mean']:.4f} +- {s['std']:.4f}  per seed "
              f"{np.round(s['per_seed'], 4).tolist()} ({s['num_tasks']} tasks each)")
    rows = [("Reverse-MAML " + k, v) for k, v in results["attacks"].items()]
    rows += list(results["references"].items())
    print(f"{'malicious fine-tuning attack':34s} {'final':>15s} {'AUC':>15s}  curve (mean over seeds)")
    for name, entry in rows:
        curve = np.asarray(entry["curves"])[entry.get("best_lr_index", 0)].mean(0)
        print(f"{name:34s} {entry['final']['mean']:.3f} +- {entry['final']['std']:.3f} "
              f"{entry['auc']['mean']:.3f} +- {entry['auc']['std']:.3f}  {np.round(curve, 3).tolist()}")
    print(f"wall time {results['wall_seconds']:.1f}s")


if __name__ == "__main__":
    try:
        main()
    except data.DatasetUnavailableError as err:
        print(f"error: {err}", file=sys.stderr)
        raise SystemExit(2)
