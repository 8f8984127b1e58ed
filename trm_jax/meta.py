r"""Meta-learning core: MAML, first-order MAML, Reptile, and Reverse-MAML.

Small pure functions over pytrees, composed bottom-up:

* :func:`adapt`: the inner loop, ``K`` SGD steps as a ``lax.scan``;
* :func:`post_adaptation_loss` / :func:`meta_loss`: adapt on a task's support
  set, score its query set, (weighted) mean over a meta-batch of tasks;
* :func:`reptile_gradient`: Reptile's meta-gradient ``params - adapted``;
* :func:`task_logits` / :func:`batch_task_logits`, :func:`reverse_maml_loss`,
  :func:`meta_gradient`, :func:`make_meta_step`: the Reverse-MAML classifier objective (descent on
  good tasks, bounded or unbounded ascent on bad tasks) and one outer step.

The meta-gradient is exact second order by default: ``jax.grad`` of the
post-adaptation loss differentiates through the inner ``jax.grad`` s (Finn et
al., 2017). First-order MAML is one ``stop_gradient`` on the inner gradients.

Everything works with any ``apply_fn(params, x)`` (or ``loss_fn(params, x, y)``)
and any pytree of params; ``adapt="head"`` additionally needs a
:class:`trm_jax.models.Model`-like object with ``features``/``head``/``init_head``.

References:
  Finn, Abbeel, Levine, 2017. *Model-Agnostic Meta-Learning for Fast Adaptation
  of Deep Networks*. https://arxiv.org/abs/1703.03400
  Nichol, Achiam, Schulman, 2018. *On First-Order Meta-Learning Algorithms*
  (Reptile). https://arxiv.org/abs/1803.02999
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, Literal, Optional, Protocol

import chex
import jax
import jax.numpy as jnp
import optax

from trm_jax.tasks import LABEL_MODES, ClassPool, LabelMode, Task, check_task_shape, sample_tasks
from trm_jax import validate
from trm_jax.errors import ConfigError

from trm_jax.typing import Params  # noqa: E402
LossFn = Callable[[Params, chex.Array, chex.Array], chex.Array]  # (params, x, y) -> scalar
ApplyFn = Callable[[Params, chex.Array], chex.Array]  # (params, x) -> logits / predictions
BadTermFn = Callable[[chex.Array, chex.Array, Optional[float]], chex.Array]
Metrics = dict[str, chex.Array]

AdaptMode = Literal["all", "head"]
HeadInit = Literal["keep", "fresh"]
MetaGrad = Literal["exact", "first_order", "reptile"]
BadTerm = Literal["ascent", "clipped_ascent", "inverse_ce", "uniform_kl", "max_entropy"]
TaskBatching = Literal["vmap", "map", "unroll", "auto"]

ADAPT_MODES = ("all", "head")
HEAD_INITS = ("keep", "fresh")
META_GRADS = ("exact", "first_order", "reptile")
TASK_BATCHINGS = ("vmap", "map", "unroll", "auto")

# What ``task_batching="auto"`` picks on CPU, per ``adapt`` mode: measured on the
# 2-core build machine (lenet 32x32x3, 4 good + 4 bad tasks, 5-way 10-shot
# 15-query, 5 inner steps, exact second order); see ``resolve_task_batching``.
_AUTO_CPU = {"all": "unroll", "head": "unroll"}
# The longest inner loop ``adapt`` unrolls on cpu; longer ones stay rolled. Measured
# on the exact LeNet meta-step (8 tasks, im2col convs, loaded 2-core machine): K=20
# rolled 5.2 s/step, compile 84 s; unroll=5 19.2 s, 159 s; fully unrolled 21.1 s, 858 s.
_CPU_UNROLL_MAX = 5


class SplitModel(Protocol):
    """What ``adapt="head"`` needs (:class:`trm_jax.models.Model` has it)."""

    def features(self, features_params: Params, images: chex.Array) -> chex.Array: ...
    def head(self, head_params: Params, features: chex.Array) -> chex.Array: ...
    def init_head(self, key: chex.PRNGKey) -> Params: ...


# --------------------------------------------------------------------------- losses


def softmax_cross_entropy(logits: chex.Array, labels: chex.Array) -> chex.Array:
    """Mean cross-entropy ``-1/B sum_i log softmax(logits_i)[y_i]``.

    Args:
      logits: ``[B, C]``.
      labels: ``int[B]`` in ``[0, C)``.

    Returns:
      A scalar.
    """
    chex.assert_rank(logits, 2)
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()


def accuracy(logits: chex.Array, labels: chex.Array) -> chex.Array:
    """Fraction of ``argmax(logits[B, C]) == labels[B]`` (scalar, float)."""
    return jnp.mean((jnp.argmax(logits, -1).astype(labels.dtype) == labels).astype(logits.dtype))


def classification_loss(apply_fn: ApplyFn) -> LossFn:
    """``loss_fn(params, x, y) = softmax_cross_entropy(apply_fn(params, x), y)``."""
    return lambda params, x, y: softmax_cross_entropy(apply_fn(params, x), y)


# ------------------------------------------------------------------------ bad terms
# Each maps post-adaptation query logits of one *bad* task to a "resistance" R,
# larger = more transfer resistant. The Reverse-MAML objective *subtracts* lam * R.


def ascent(logits: chex.Array, labels: chex.Array, cap: Optional[float] = None) -> chex.Array:
    """``R = CE(logits, y)``: plain gradient ascent on the query loss (the paper).

    Unbounded: maximising it can diverge (logits blow up). ``cap`` is ignored.
    """
    del cap
    return softmax_cross_entropy(logits, labels)


def clipped_ascent(logits: chex.Array, labels: chex.Array,
                   cap: Optional[float] = None) -> chex.Array:
    """``R = mean_i min(CE_i, cap)``: ascent with no reward past a loss cap.

    Clipped per query example, so an example already at ``CE_i >= cap`` gets no
    gradient while the others still do; the objective is bounded, so it can't
    diverge. ``cap=None`` means chance level, ``log C`` (``C`` = logits width):
    no reward for being worse than a uniform guess.

    Example:
      >>> import math, jax.numpy as jnp
      >>> wrong = jnp.array([[0.0, 9.0, 0, 0, 0]])  # confidently wrong: CE ~ 9 > log 5
      >>> round(float(clipped_ascent(wrong, jnp.array([0]))), 4) == round(math.log(5), 4)
      True
    """
    cap = math.log(logits.shape[-1]) if cap is None else cap
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
    return jnp.minimum(ce, cap).mean()


def inverse_ce(logits: chex.Array, labels: chex.Array, cap: Optional[float] = None) -> chex.Array:
    """``R = mean_i log(1 - p_i[y_i])``, i.e. minimise the inverse CE ``-log(1 - p_true)``.

    Bounded above by 0 (reached when ``p_true = 0``), so it can't diverge.
    Computed stably as ``logsumexp_{j != y} z_j - logsumexp_j z_j``. ``cap`` is ignored.
    """
    del cap
    chex.assert_rank(logits, 2)
    others = jnp.arange(logits.shape[-1], dtype=labels.dtype)[None, :] != labels[:, None]
    log_not_true = jax.nn.logsumexp(logits, axis=-1, where=others)
    return jnp.mean(log_not_true - jax.nn.logsumexp(logits, axis=-1))


def uniform_kl(logits: chex.Array, labels: chex.Array, cap: Optional[float] = None) -> chex.Array:
    """``R = -mean_i KL(u || p_i)``, pushing predictions to uniform ``u = 1/C``.

    ``KL(u || p) = -log C - 1/C sum_j log p_j >= 0``, zero only at ``p = u``: the
    adapted model is pushed to know nothing rather than to be confidently wrong.
    Labels and ``cap`` are ignored.

    Example:
      >>> import jax.numpy as jnp
      >>> labels = jnp.array([0, 1])
      >>> abs(float(uniform_kl(jnp.zeros((2, 5)), labels)))            # uniform: the maximum
      0.0
      >>> float(uniform_kl(jnp.array([[4.0, 0, 0, 0, 0]] * 2), labels)) < 0  # confident: lower
      True
    """
    del labels, cap
    chex.assert_rank(logits, 2)
    num_classes = logits.shape[-1]
    kl = -math.log(num_classes) - jax.nn.log_softmax(logits, axis=-1).mean(-1)
    return -kl.mean()


def max_entropy(logits: chex.Array, labels: chex.Array, cap: Optional[float] = None) -> chex.Array:
    """``R = mean_i H(p_i) = -mean_i sum_j p_ij log p_ij``: the entropy of the predictions
    (TAR's objective), bounded above by ``log C`` (uniform). Labels and ``cap`` are ignored.

    Unlike :func:`uniform_kl` (``-KL(u || p)``, unbounded below as a class's ``p`` goes to
    0) it is bounded on both sides, so a confident attacked model costs at most ``log C``.
    """
    del labels, cap
    chex.assert_rank(logits, 2)
    logp = jax.nn.log_softmax(logits, axis=-1)
    return -jnp.sum(jnp.exp(logp) * logp, axis=-1).mean()


#: The bad terms ``R`` by name (the Reverse-MAML objective's resistance term).
BAD_TERMS: dict[str, BadTermFn] = {
    "ascent": ascent, "clipped_ascent": clipped_ascent,
    "inverse_ce": inverse_ce, "uniform_kl": uniform_kl, "max_entropy": max_entropy,
}


# ----------------------------------------------------------------------- inner loop


def adapt(params: Params, support_x: chex.Array, support_y: chex.Array, *,
          loss_fn: Optional[LossFn] = None, apply_fn: Optional[ApplyFn] = None,
          inner_lr: chex.Numeric, steps: int, first_order: bool = False,
          remat: bool = False, mask: Any = None,
          unroll: Optional[int | bool] = None) -> Params:
    r"""``steps`` inner SGD steps on the support set (the MAML inner loop).

    .. math::
      \phi_0 = \theta, \qquad
      \phi_{k+1} = \phi_k - \alpha \nabla_\phi L_s(\phi_k), \qquad k = 0..K-1

    The gradient is recomputed at every step (a ``lax.scan``), and ``jax.grad``
    through the result is exact second order. ``first_order=True`` applies
    ``stop_gradient`` to each inner gradient, so ``d phi_K / d theta = I``
    (FOMAML). ``remat=True`` wraps the scan body in ``jax.checkpoint``, so the
    outer gradient stores one set of params per step instead of every
    activation (same numbers, more compute).

    Args:
      params: the initial params ``theta`` (any pytree).
      support_x: the support inputs, e.g. ``[N*K, H, W, C]``.
      support_y: the support targets, e.g. ``int[N*K]``.
      loss_fn: ``loss_fn(params, x, y) -> scalar``; or give ``apply_fn``.
      apply_fn: ``apply_fn(params, x) -> logits[B, C]``; the loss is then the
        mean softmax cross-entropy on integer labels.
      inner_lr: ``alpha``, the inner SGD learning rate (python or traced scalar).
      steps: ``K >= 0`` (static); ``K = 0`` returns ``params`` unchanged.
      first_order: stop gradients through the inner gradients (FOMAML).
      remat: rematerialise each inner step in the backward pass.
      mask: optional pytree prefix of ``params`` with python bool leaves;
        ``False`` subtrees are frozen (not updated, no gradient taken through
        their inner update).
      unroll: the ``lax.scan`` unroll factor (``True`` = all ``steps``); ``None``
        picks one per backend (:func:`resolve_inner_unroll`; rolled with ``remat``). Same numbers
        either way; it changes only how XLA runs the loop.

    Returns:
      The adapted params ``phi_K``, same structure and dtypes as ``params``.

    Example:
      On ``L_s(w) = (w - 2)^2`` two steps at ``alpha = 0.25`` go 0 -> 1 -> 1.5, and each
      step scales ``d phi / d theta`` by ``1 - 2 alpha``, so the exact meta-gradient of
      ``phi_2`` is ``0.5^2`` (first order: 1).

      >>> import jax, jax.numpy as jnp
      >>> loss = lambda w, x, y: jnp.mean((w * x - y) ** 2)
      >>> x, y = jnp.ones(1), jnp.full(1, 2.0)
      >>> phi = lambda w, **kw: adapt(w, x, y, loss_fn=loss, inner_lr=0.25, steps=2, **kw)
      >>> float(phi(0.0))
      1.5
      >>> float(jax.grad(phi)(0.0)), float(jax.grad(lambda w: phi(w, first_order=True))(0.0))
      (0.25, 1.0)
    """
    loss_fn = _resolve_loss(loss_fn, apply_fn)
    if steps < 0:
        raise ConfigError(f"steps must be >= 0, got {steps}")
    if steps == 0:
        return params

    def step(p: Params, _: None) -> tuple[Params, None]:
        grads = jax.grad(loss_fn)(p, support_x, support_y)  # recomputed at every step
        if first_order:
            grads = jax.lax.stop_gradient(grads)
        if mask is not None:
            grads = jax.tree_util.tree_map(
                lambda m, g: g if m else jax.tree_util.tree_map(jnp.zeros_like, g), mask, grads)
        return jax.tree_util.tree_map(
            lambda w, g: w - jnp.asarray(inner_lr, w.dtype) * g, p, grads), None

    if remat:
        step = jax.checkpoint(step)
    if unroll is None:  # remat is for memory; unrolled, XLA:CPU kept as much (552 vs 542 MiB)
        unroll = 1 if remat else resolve_inner_unroll(steps)
    adapted, _ = jax.lax.scan(step, params, None, length=steps, unroll=unroll)
    return adapted


def resolve_inner_unroll(steps: int, backend: Optional[str] = None) -> int | bool:
    """The inner loop's ``lax.scan`` unroll factor for ``backend`` (default: JAX's).

    On cpu a short loop (up to ``_CPU_UNROLL_MAX`` steps) is unrolled: XLA:CPU
    runs a ``lax.conv`` and its gradients inside a loop body slower than the same
    ops unrolled (2.8x on the exact LeNet meta-step), 1.2x with im2col convolutions,
    and ~1.1x with the banded ones CPU models now run (0.39-0.47 vs 0.44-0.46 s, for
    6 s more compile). Longer loops stay rolled (``1``): unrolled,
    their compile time explodes and, measured at K=20, they also ran ~4x slower.
    Elsewhere the loop stays rolled, which compiles fastest.
    """
    if (backend or jax.default_backend()) != "cpu":
        return 1
    return True if steps <= _CPU_UNROLL_MAX else 1


def _resolve_loss(loss_fn: Optional[LossFn], apply_fn: Optional[ApplyFn]) -> LossFn:
    if (loss_fn is None) == (apply_fn is None):
        raise ConfigError("give exactly one of loss_fn(params, x, y) or apply_fn(params, x)")
    return loss_fn if loss_fn is not None else classification_loss(apply_fn)


# ------------------------------------------------------------------ task batching


def resolve_task_batching(strategy: TaskBatching, backend: Optional[str] = None,
                          adapt: AdaptMode = "all") -> str:
    """Maps ``"auto"`` to a concrete strategy for ``backend`` (default: JAX's) and ``adapt``.

    * ``"vmap"``: one batched program over tasks. Per-task adapted conv weights
      become *grouped* convolutions; on GPU/TPU that is the fast path (an H100
      ran it ~7x faster than PyTorch), but XLA:CPU runs grouped convolutions an
      order of magnitude slower (~20x slower than PyTorch on a 2-core CPU).
    * ``"map"``: ``lax.map``, one task at a time in a loop (ordinary convs).
    * ``"unroll"``: a Python loop over tasks inside jit (ordinary convs, no
      loop overhead, longer compiles), outputs stacked.

    ``"auto"`` is ``"vmap"`` on gpu/tpu. On cpu it is ``_AUTO_CPU[adapt]``,
    the faster of ``"map"`` / ``"unroll"`` measured on the 2-core build machine
    (``"unroll"``: XLA:CPU runs a loop body's convolutions slower than the same
    convolutions unrolled, and a batch of 8 tasks' images as one conv slower
    than 8 convs of one task each).
    """
    if strategy not in TASK_BATCHINGS:
        raise ConfigError(f"task_batching must be one of {TASK_BATCHINGS}, got {strategy!r}")
    if adapt not in ADAPT_MODES:
        raise ConfigError(f"adapt must be one of {ADAPT_MODES}, got {adapt!r}")
    if strategy != "auto":
        return strategy
    backend = backend or jax.default_backend()
    return _AUTO_CPU[adapt] if backend == "cpu" else "vmap"


def map_tasks(fn: Callable[[Any], Any], xs: Any, strategy: TaskBatching = "vmap") -> Any:
    """``fn`` over the leading (task) axis of the pytree ``xs``, outputs stacked.

    All strategies compute the same values (and gradients); they differ only in
    how XLA runs them (see :func:`resolve_task_batching`).
    """
    strategy = resolve_task_batching(strategy)
    if strategy == "vmap":
        return jax.vmap(fn)(xs)
    if strategy == "map":
        return jax.lax.map(fn, xs)
    num = jax.tree_util.tree_leaves(xs)[0].shape[0]
    outs = [fn(jax.tree_util.tree_map(lambda a: a[i], xs)) for i in range(num)]
    return jax.tree_util.tree_map(lambda *a: jnp.stack(a), *outs)


# ------------------------------------------------------------- generic MAML / Reptile


def post_adaptation_loss(params: Params, task: Task, *, loss_fn: LossFn, inner_lr: chex.Numeric,
                         steps: int, first_order: bool = False, remat: bool = False) -> chex.Array:
    r"""One task's MAML loss ``L_q(adapt(theta, support))`` (scalar).

    Args:
      params: ``theta``.
      task: one :class:`Task` (``support_x[S, ...]``, ``support_y[S, ...]``,
        ``query_x[Q, ...]``, ``query_y[Q, ...]``).
      loss_fn, inner_lr, steps, first_order, remat: as in :func:`adapt`.
    """
    adapted = adapt(params, task.support_x, task.support_y, loss_fn=loss_fn, inner_lr=inner_lr,
                    steps=steps, first_order=first_order, remat=remat)
    return loss_fn(adapted, task.query_x, task.query_y)


def meta_loss(params: Params, tasks: Task, *, loss_fn: LossFn, inner_lr: chex.Numeric,
              steps: int, first_order: bool = False, remat: bool = False,
              weights: Optional[chex.Array] = None,
              task_batching: TaskBatching = "vmap") -> chex.Array:
    r"""The MAML objective over a meta-batch: ``sum_t w_t L_q^t(adapt(theta, S_t))``.

    ``jax.grad`` of it is the (exact, unless ``first_order``) MAML meta-gradient.
    A negative weight turns a task into an ascent task (Reverse-MAML).

    Args:
      params: ``theta``.
      tasks: a :class:`Task` with a leading task axis ``[T, ...]``.
      weights: ``[T]``; default ``1/T`` each (the mean).
      task_batching: ``"vmap"``, ``"map"``, ``"unroll"`` or ``"auto"``.

    Returns:
      A scalar.
    """
    per_task = map_tasks(
        lambda t: post_adaptation_loss(params, t, loss_fn=loss_fn, inner_lr=inner_lr,
                                       steps=steps, first_order=first_order, remat=remat),
        tasks, task_batching)
    if weights is None:
        return per_task.mean()
    chex.assert_equal_shape([per_task, weights])
    return jnp.sum(weights.astype(per_task.dtype) * per_task)


def reptile_gradient(params: Params, tasks: Task, *, loss_fn: LossFn, inner_lr: chex.Numeric,
                     steps: int, weights: Optional[chex.Array] = None,
                     task_batching: TaskBatching = "vmap") -> Params:
    r"""Reptile's meta-gradient ``g = sum_t w_t (theta - phi_t)`` (Nichol et al., 2018).

    ``phi_t = adapt(theta, support_t)``; feeding ``g`` to SGD with step ``eps``
    gives Reptile's ``theta <- theta + eps sum_t w_t (phi_t - theta)``. Only the
    support set is used (as in :func:`adapt`). A negative weight flips a task:
    ``theta`` then moves *away* from where fine-tuning on that task leads, the
    first-order analogue of ascent (Reverse-MAML with Reptile).

    Args:
      weights: ``[T]``; default ``1/T`` each.

    Returns:
      A pytree like ``params``.
    """
    num = jax.tree_util.tree_leaves(tasks)[0].shape[0]
    weights = jnp.full((num,), 1.0 / num) if weights is None else weights
    delta = lambda t: _tree_sub(params, adapt(params, t.support_x, t.support_y, loss_fn=loss_fn,
                                                inner_lr=inner_lr, steps=steps))
    deltas = map_tasks(delta, tasks, task_batching)
    return jax.tree_util.tree_map(lambda d: jnp.tensordot(weights.astype(d.dtype), d, 1), deltas)


def _tree_sub(a: Params, b: Params) -> Params:
    return jax.tree_util.tree_map(jnp.subtract, a, b)


# -------------------------------------------------------------------- Reverse-MAML


@dataclasses.dataclass(frozen=True)
class MetaConfig:
    """Reverse-MAML hyper-parameters (frozen and hashable, so it can be static under jit).

    Attributes:
      ways: N, the classes per task (N-way).
      shots: K, the support images per class of a task (K-shot).
      queries: Q, the query images per class of a task (scored after adaptation).
      good_tasks: tasks per meta-batch from the beneficial classes (trained normally).
      bad_tasks: tasks per meta-batch from the malicious classes (trained in reverse).
      inner_lr: inner SGD learning rate alpha.
      inner_steps: inner SGD steps K (0 = plain training on the query sets).
      adapt: 'all' (classic MAML: every param adapts) or 'head' (the
        attack's setting: features frozen, only the head adapts; features are
        computed once per task and only the head is differentiated twice).
      head_init: with adapt="head", 'keep' adapts the meta-learned head;
        'fresh' re-initialises it per task (like the attack), so only the
        features are meta-learned.
      meta_grad: 'exact' (second order), 'first_order' (FOMAML) or
        'reptile' (adapt="all" only).
      remat: jax.checkpoint each inner step (memory for compute).
      bad_term: how bad tasks are resisted: 'ascent' (gradient ascent on their
        post-adaptation loss, unbounded), 'clipped_ascent' (ascent up to loss_cap),
        'inverse_ce' (minimise -log(1 - p_true)), 'uniform_kl' (KL to the uniform
        prediction) or 'max_entropy' (maximise the prediction's entropy).
      lam: weight lambda >= 0 of the bad term.
      loss_cap: the cap of clipped_ascent; None = log C (chance level).
      task_batching: 'vmap', 'map', 'unroll' or 'auto'.
      inner_unroll: the inner loop's lax.scan unroll factor (True = fully
        unrolled); None = per backend (resolve_inner_unroll). Speed only.
      label_mode: 'fixed' (the default: a task's labels are its classes'
        protocol labels, so every task trains the same C-way head and the
        meta-learned params stay a beneficial classifier, which is what the
        evaluation measures) or 'shuffled' (classic MAML: labels 0..N-1
        in random order per task).
    """

    ways: int = 5
    shots: int = 5
    queries: int = 15
    good_tasks: int = 4
    bad_tasks: int = 4
    inner_lr: float = 0.1
    inner_steps: int = 5
    adapt: AdaptMode = "all"
    head_init: HeadInit = "keep"
    meta_grad: MetaGrad = "exact"
    remat: bool = False
    bad_term: BadTerm = "ascent"
    lam: float = 1.0
    loss_cap: Optional[float] = None
    task_batching: TaskBatching = "auto"
    label_mode: LabelMode = "fixed"
    inner_unroll: Optional[int | bool] = None

    DOMAINS = {"ways": validate.COUNT, "shots": validate.COUNT, "queries": validate.COUNT,
               "good_tasks": validate.COUNT, "bad_tasks": validate.Int(0),
               "inner_lr": validate.POSITIVE, "inner_steps": validate.Int(0),
               "adapt": validate.Choice(ADAPT_MODES), "head_init": validate.Choice(HEAD_INITS),
               "meta_grad": validate.Choice(META_GRADS), "remat": validate.Bool(),
               "bad_term": validate.Choice(tuple(BAD_TERMS)), "lam": validate.NONNEGATIVE,
               "loss_cap": validate.Float(0, open_lo=True, none=True),
               "task_batching": validate.Choice(TASK_BATCHINGS),
               "label_mode": validate.Choice(LABEL_MODES)}

    def __post_init__(self) -> None:
        validate.check_fields(self)
        unroll = self.inner_unroll
        if not (unroll is None or isinstance(unroll, bool) or validate.COUNT.ok(unroll)):
            raise ConfigError(f"inner_unroll must be None, a bool or an integer >= 1, got "
                              f"{unroll!r}", field="inner_unroll")
        if self.meta_grad == "reptile" and self.adapt != "all":
            raise ConfigError("meta_grad='reptile' needs adapt='all': Reptile moves "
                             "params towards adapted params, and with adapt='head' the features "
                             "never adapt, so they would get no meta-gradient", field="meta_grad")


def task_logits(params: Params, task: Task, key: chex.PRNGKey, config: MetaConfig,
                model: Any) -> tuple[chex.Array, chex.Array, Params]:
    """Pre- and post-adaptation query logits of one task.

    Args:
      params: ``theta``; with ``adapt="head"``, ``{"features": ..., "head": ...}``.
      task: one :class:`Task` (``support_x[N*K, H, W, C]``, ``query_x[N*Q, H, W, C]``).
      key: used for the fresh head (``head_init="fresh"``) only.
      config: a :class:`MetaConfig`.
      model: ``apply_fn(params, x)`` or a ``Model`` (``adapt="all"``); a
        ``Model``-like object with ``features/head/init_head`` (``adapt="head"``).

    Returns:
      ``(pre_logits[N*Q, C], post_logits[N*Q, C], delta)``: logits before
      adaptation (no gradient flows through them) and after it, and
      ``theta - phi_K`` of the adapted part (all params for ``"all"``, the head
      for ``"head"``; used by Reptile).
    """
    if config.adapt == "all":
        return _adapted_logits(params, task, config, model)
    feats = model.features(params["features"],
                           jnp.concatenate([task.support_x, task.query_x], axis=0))
    num_support = task.support_x.shape[0]
    return _head_logits(params["head"], feats[:num_support], task.support_y,
                        feats[num_support:], key, config, model)


def batch_task_logits(params: Params, tasks: Task, keys: chex.PRNGKey, config: MetaConfig,
                      model: Any) -> tuple[chex.Array, chex.Array, Params]:
    """:func:`task_logits` for every task of a meta-batch (leading ``[T]`` axis).

    ``adapt="all"``: one task per :func:`map_tasks` call (``config.task_batching``).
    ``adapt="head"``: the frozen features are computed once per task (support
    and query in one pass, per ``config.task_batching``; under ``vmap`` they
    are ordinary batched convs, the weights being shared), then the small
    per-task heads adapt under ``vmap``; only the head is differentiated twice.

    Args:
      tasks: :class:`Task` with ``support_x[T, N*K, H, W, C]``, ``query_x[T, N*Q, H, W, C]``.
      keys: ``[T]`` PRNG keys (fresh heads only).

    Returns:
      ``(pre_logits[T, N*Q, C], post_logits[T, N*Q, C], delta[T, ...])``.
    """
    strategy = resolve_task_batching(config.task_batching, adapt=config.adapt)
    if config.adapt == "all":
        return map_tasks(lambda t: _adapted_logits(params, t, config, model), tasks, strategy)
    num_support = tasks.support_x.shape[1]
    images = jnp.concatenate([tasks.support_x, tasks.query_x], axis=1)  # [T, S+Q, ...]
    feats = map_tasks(lambda x: model.features(params["features"], x), images, strategy)
    return jax.vmap(lambda sf, sy, qf, k: _head_logits(params["head"], sf, sy, qf, k, config,
                                                         model))(
        feats[:, :num_support], tasks.support_y, feats[:, num_support:], keys)


def _inner_kwargs(config: MetaConfig) -> dict[str, Any]:
    return dict(inner_lr=config.inner_lr, steps=config.inner_steps,
                first_order=config.meta_grad == "first_order", remat=config.remat,
                unroll=config.inner_unroll)


def _adapted_logits(params: Params, task: Task, config: MetaConfig,
                    model: Any) -> tuple[chex.Array, chex.Array, Params]:
    apply_fn = _apply_fn(model)
    adapted = adapt(params, task.support_x, task.support_y, apply_fn=apply_fn,
                    **_inner_kwargs(config))
    pre = apply_fn(jax.lax.stop_gradient(params), task.query_x)
    return pre, apply_fn(adapted, task.query_x), _tree_sub(params, adapted)


def _head_logits(head: Params, support_f: chex.Array, support_y: chex.Array,
                 query_f: chex.Array, key: chex.PRNGKey, config: MetaConfig,
                 model: Any) -> tuple[chex.Array, chex.Array, Params]:
    """Head-only adaptation on precomputed features ``support_f[S, D]``, ``query_f[Q, D]``."""
    head = head if config.head_init == "keep" else model.init_head(key)
    head_loss = lambda h, f, y: softmax_cross_entropy(model.head(h, f), y)
    adapted = adapt(head, support_f, support_y, loss_fn=head_loss, **_inner_kwargs(config))
    pre = model.head(jax.lax.stop_gradient(head), jax.lax.stop_gradient(query_f))
    return pre, model.head(adapted, query_f), _tree_sub(head, adapted)


def _apply_fn(model: Any) -> ApplyFn:
    return model.apply if hasattr(model, "features") else model


def reverse_maml_loss(params: Params, tasks: Task, is_good: chex.Array, keys: chex.PRNGKey,
                      config: MetaConfig, model: Any) -> tuple[chex.Array, Metrics]:
    r"""The Reverse-MAML objective and metrics over a meta-batch.

    .. math::
      J(\theta) = \frac{1}{|G|} \sum_{t \in G} CE(\phi_t; Q_t)
                - \lambda \frac{1}{|B|} \sum_{t \in B} R(\phi_t; Q_t),
      \qquad \phi_t = \mathrm{adapt}(\theta, S_t)

    Good tasks ``G`` are trained normally (minimise their post-adaptation query
    loss), bad tasks ``B`` in reverse (maximise the resistance ``R`` of
    ``config.bad_term``; ``"ascent"`` is ``R = CE``). Selection is arithmetic
    with ``is_good`` (never ``lax.cond``, which runs both branches under vmap).

    Args:
      params: ``theta``.
      tasks: :class:`Task` with a leading ``[T]`` task axis.
      is_good: ``bool|float[T]``, 1 for good tasks and 0 for bad ones.
      keys: ``[T]`` PRNG keys (fresh heads; unused otherwise).
      config: a :class:`MetaConfig`.
      model: see :func:`task_logits`.

    Returns:
      ``(J, metrics)``; metrics: ``objective``, ``{good,bad}/{pre,post}_{loss,acc}``
      (query cross-entropy and accuracy before/after adaptation; "before" uses
      the fresh random head under ``head_init="fresh"``) and ``bad/term``
      (the mean ``R`` over bad tasks).
    """
    chex.assert_rank(is_good, 1)
    pre, post, _ = batch_task_logits(params, tasks, keys, config, model)
    objective, metrics = _objective_and_metrics(pre, post, tasks.query_y, is_good, config)
    return objective, metrics


def _objective_and_metrics(pre: chex.Array, post: chex.Array, labels: chex.Array,
                           is_good: chex.Array, config: MetaConfig
                           ) -> tuple[chex.Array, Metrics]:
    ce, acc = jax.vmap(softmax_cross_entropy), jax.vmap(accuracy)
    post_loss = ce(post, labels)  # [T]
    resist = jax.vmap(lambda z, y: BAD_TERMS[config.bad_term](z, y, config.loss_cap))(post, labels)
    good = is_good.astype(post_loss.dtype)
    bad = 1 - good
    good_mean = lambda v: jnp.sum(good * v) / jnp.maximum(good.sum(), 1)
    bad_mean = lambda v: jnp.sum(bad * v) / jnp.maximum(bad.sum(), 1)
    objective = good_mean(post_loss) - config.lam * bad_mean(resist)
    stats = {"pre_loss": ce(pre, labels), "post_loss": post_loss,
             "pre_acc": acc(pre, labels), "post_acc": acc(post, labels)}
    metrics = {"objective": objective, "bad/term": bad_mean(resist)}
    for name, value in stats.items():
        value = jax.lax.stop_gradient(value).astype(good.dtype)
        metrics[f"good/{name}"] = good_mean(value)
        metrics[f"bad/{name}"] = bad_mean(value)
    return objective, metrics


def meta_gradient(params: Params, tasks: Task, is_good: chex.Array, keys: chex.PRNGKey,
                  config: MetaConfig, model: Any) -> tuple[Params, Metrics]:
    r"""The meta-gradient of :func:`reverse_maml_loss` per ``config.meta_grad``.

    * ``"exact"``: ``jax.grad`` through the inner ``jax.grad`` s (second order).
    * ``"first_order"``: the same with the inner gradients stopped (FOMAML).
    * ``"reptile"``: ``sum_t c_t (theta - phi_t)`` with ``c_t = 1/|G|`` for good
      tasks and ``-lam/|B|`` for bad ones (sign-flipped: move away from where
      fine-tuning on bad tasks leads). ``bad_term`` then only enters the metrics.

    Returns:
      ``(grads, metrics)``; ``grads`` is a pytree like ``params``.
    """
    if config.meta_grad != "reptile":
        grad_fn = jax.grad(reverse_maml_loss, has_aux=True)
        return grad_fn(params, tasks, is_good, keys, config, model)
    pre, post, deltas = batch_task_logits(params, tasks, keys, config, model)
    _, metrics = _objective_and_metrics(pre, post, tasks.query_y, is_good, config)
    good = is_good.astype(post.dtype)
    coef = good / jnp.maximum(good.sum(), 1) - config.lam * (1 - good) / jnp.maximum(
        (1 - good).sum(), 1)
    grads = jax.tree_util.tree_map(lambda d: jnp.tensordot(coef.astype(d.dtype), d, 1), deltas)
    return grads, metrics


class MetaStep(Protocol):
    def __call__(self, params: Params, opt_state: optax.OptState, key: chex.PRNGKey,
                 good_pool: ClassPool, bad_pool: Optional[ClassPool]
                 ) -> tuple[Params, optax.OptState, Metrics]: ...


def check_pools(config: MetaConfig, good_pool: ClassPool, bad_pool: Optional[ClassPool]) -> None:
    """Raises ``ValueError`` if ``config``'s tasks can't be drawn from the pools.

    Call it on the concrete (host or device) pools before jitting a meta step:
    under jit only the static shapes can be checked.
    """
    check_task_shape(good_pool, config.ways, config.shots, config.queries, "beneficial pool")
    if config.bad_tasks == 0:
        return
    if bad_pool is None:
        raise ConfigError(f"bad_tasks={config.bad_tasks} needs a malicious pool, got None")
    check_task_shape(bad_pool, config.ways, config.shots, config.queries, "malicious pool")
    good_shape, bad_shape = good_pool.images.shape[2:], bad_pool.images.shape[2:]
    if good_shape != bad_shape or good_pool.images.dtype != bad_pool.images.dtype:
        raise ConfigError(f"beneficial and malicious images must match; got "
                         f"{good_shape} {good_pool.images.dtype} and {bad_shape} "
                         f"{bad_pool.images.dtype}")


def make_meta_step(config: MetaConfig, model: Any,
                   optimizer: optax.GradientTransformation) -> MetaStep:
    """Builds one pure outer step ``step(params, opt_state, key, good_pool, bad_pool)``.

    The step samples ``good_tasks`` tasks from ``good_pool`` and ``bad_tasks``
    from ``bad_pool`` (``None`` if ``bad_tasks == 0``), computes the
    meta-gradient (:func:`meta_gradient`) and applies ``optimizer``. It is pure,
    so ``jax.jit(step)`` compiles one outer step and
    ``jax.vmap(step, in_axes=(0, 0, 0, None, None))`` runs many seeds.

    Args:
      config: a :class:`MetaConfig`.
      model: ``apply_fn(params, x) -> logits`` or a ``Model`` (``adapt="all"``);
        a ``Model``-like object with ``features/head/init_head`` (``adapt="head"``).
      optimizer: the outer optax optimizer.

    Returns:
      ``step(params, opt_state, key, good_pool, bad_pool) -> (params, opt_state,
      metrics)``; metrics are scalars: ``objective``, ``meta_grad_norm``,
      ``{good,bad}/{pre,post}_{loss,acc}`` and ``bad/term``.

    Example::

      step = compilation.jit(make_meta_step(MetaConfig(), lenet(5), optax.adam(1e-3)))
      params, opt_state, metrics = step(params, opt_state, key, good_pool, bad_pool)
    """
    if config.adapt == "head" and not all(
            hasattr(model, a) for a in ("features", "head", "init_head")):
        raise ConfigError("adapt='head' needs a Model-like object with features/head/init_head, "
                         f"got {model!r}")
    if config.adapt == "all" and not callable(_apply_fn(model)):
        raise ConfigError(f"adapt='all' needs apply_fn(params, x) or a Model, got {model!r}")

    def step(params: Params, opt_state: optax.OptState, key: chex.PRNGKey,
             good_pool: ClassPool, bad_pool: Optional[ClassPool]
             ) -> tuple[Params, optax.OptState, Metrics]:
        check_pools(config, good_pool, bad_pool)
        _check_labels(config, model, good_pool)
        if config.bad_tasks:
            _check_labels(config, model, bad_pool)
        k_good, k_bad, k_heads = jax.random.split(key, 3)
        sample = lambda k, pool, n: sample_tasks(k, pool, n, config.ways, config.shots,
                                                 config.queries, config.label_mode)
        tasks = sample(k_good, good_pool, config.good_tasks)
        if config.bad_tasks:
            bad = sample(k_bad, bad_pool, config.bad_tasks)
            tasks = jax.tree_util.tree_map(lambda g, b: jnp.concatenate([g, b]), tasks, bad)
        is_good = jnp.arange(config.good_tasks + config.bad_tasks) < config.good_tasks
        keys = jax.random.split(k_heads, config.good_tasks + config.bad_tasks)
        grads, metrics = meta_gradient(params, tasks, is_good, keys, config, model)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        params = optax.apply_updates(params, updates)
        return params, opt_state, {**metrics, "meta_grad_norm": optax.global_norm(grads)}

    return step


def _check_labels(config: MetaConfig, model: Any, pool: ClassPool) -> None:
    """Labels must fit the head (out-of-range labels would silently give wrong losses)."""
    needed = pool.images.shape[0] if config.label_mode == "fixed" else config.ways
    outputs = getattr(model, "num_classes", None)
    if outputs is not None and needed > outputs:
        raise ConfigError(f"label_mode={config.label_mode!r} needs {needed} head outputs but "
                         f"the model has {outputs}")
