"""Figures shared by the experiments (matplotlib, Agg backend: no display needed)."""
from __future__ import annotations

import os
import pathlib
from typing import Any, Mapping

import numpy as np


def _pyplot():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def plot_attack_curves(entries: Mapping[str, Mapping[str, Any]], path: str | os.PathLike,
                       title: str, chance: float | None = None, *,
                       lr: str = "best") -> pathlib.Path:
    """Learning curves of fine-tuning attacks: mean +- std over seeds per entry.

    Args:
      entries: ``{label: entry}`` with ``entry["curves"]: [L][S][E+1]`` (as made by
        :func:`trm_jax.attacks.report.entry`); references (scratch) can be mixed in.
      path: the PNG to write (parent folders are created).
      title: figure title.
      chance: chance accuracy (``1 / num_classes``), drawn as a dashed line.
      lr: ``"best"`` draws each entry at its attacker's learning rate
        (``entry["best_lr_index"]``, else the first); ``"all"`` draws every
        learning rate of every entry.

    Returns:
      The path written.
    """
    if not entries:
        raise ValueError("plot_attack_curves needs at least one entry")
    if lr not in ("best", "all"):
        raise ValueError(f"lr must be 'best' or 'all', got {lr!r}")
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7.0, 4.5), dpi=120)
    for label, entry in entries.items():
        curves = np.asarray(entry["curves"], dtype=np.float64)  # [L, S, E+1]
        if curves.ndim != 3:
            raise ValueError(f"entry {label!r}: curves must be [lr][seed][epoch], got shape {curves.shape}")
        lrs = entry.get("learning_rates", [None] * curves.shape[0])
        indices = range(curves.shape[0]) if lr == "all" else [int(entry.get("best_lr_index", 0))]
        for i in indices:
            mean, std = curves[i].mean(0), curves[i].std(0)
            epochs = np.arange(curves.shape[-1])
            name = label if lrs[i] is None else f"{label} (lr {lrs[i]:g})"
            line, = ax.plot(epochs, mean, marker="o", markersize=3, label=name)
            ax.fill_between(epochs, mean - std, mean + std, color=line.get_color(), alpha=0.2)
    if chance is not None:
        ax.axhline(chance, color="gray", linestyle="--", linewidth=1, label=f"chance ({chance:.2f})")
    num_seeds = {np.asarray(e["curves"]).shape[1] for e in entries.values()}
    seeds = f"{num_seeds.pop()} seeds" if len(num_seeds) == 1 else "seeds"
    ax.set_title(title)
    ax.set_xlabel("attack fine-tuning epoch (0 = before fine-tuning)")
    ax.set_ylabel(f"malicious test accuracy (fraction; mean ± std over {seeds})")
    ax.set_ylim(0.0, 1.0)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7, loc="best")
    fig.tight_layout()
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path


def plot_ablation(rows: list[dict[str, Any]], path, title: str):
    """Teacher / student beneficial accuracy (%) and misses (%) against teacher epochs."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.5, 4.2), dpi=120)
    x = [r["teacher_epochs"] for r in rows]
    for key, label, scale in (("teacher_test_accuracy", "teacher accuracy", 100.0),
                              ("student_test_accuracy", "SKD student accuracy", 100.0),
                              ("misses_percent", "misses (malicious not masked)", 1.0),
                              ("false_masks_percent", "false masks (beneficial masked)", 1.0)):
        mean = np.array([r[key]["mean"] for r in rows]) * scale
        std = np.array([r[key]["std"] for r in rows]) * scale
        ax.errorbar(x, mean, yerr=std, marker="o", capsize=3, label=label)
    ax.set_xscale("log")
    ax.set_xticks(x, [str(e) for e in x])
    ax.set_xlabel("teacher training epochs")
    ax.set_ylabel("% of test images (mean ± std over seeds)")
    ax.set_ylim(-2, 102)
    ax.set_title(title)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8, loc="center right")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def plot_bars(values: Mapping[str, Mapping[str, Any]], path: str | os.PathLike, title: str,
              ylabel: str) -> pathlib.Path:
    """One bar per entry: ``{label: {"mean", "std"}}`` with error bars and the value written."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7.0, 4.0), dpi=120)
    labels = list(values)
    means = [values[k]["mean"] for k in labels]
    stds = [values[k]["std"] for k in labels]
    ax.bar(range(len(labels)), means, yerr=stds, capsize=4, color="tab:blue", alpha=0.8)
    for i, (m, sd) in enumerate(zip(means, stds)):
        ax.text(i + 0.12, m + sd + 0.015, f"{m:.3f}", ha="left", fontsize=8)
    ax.set_xticks(range(len(labels)), labels, rotation=15, fontsize=8)
    ax.set_ylim(0, 1.1)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    ax.grid(True, axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return pathlib.Path(path)


def plot_tradeoff(points: list[tuple[str, float, float, str, str]], path: str | os.PathLike,
                  title: str, *, goal_x: float | None = None,
                  goal_y: float | None = None) -> pathlib.Path:
    """A defence trade-off: beneficial accuracy (y) vs worst-case malicious accuracy (x).

    Args:
      points: ``(label, beneficial, malicious, marker, group)`` per configuration.
      goal_x, goal_y: the goal region (``malicious <= goal_x`` and ``beneficial >= goal_y``),
        shaded when both are given.

    Returns:
      The path written.
    """
    if not points:
        raise ValueError("plot_tradeoff needs at least one point")
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7.5, 5.5))
    groups = list(dict.fromkeys(p[4] for p in points))
    colors = dict(zip(groups, plt.rcParams["axes.prop_cycle"].by_key()["color"]))
    seen = set()
    for label, y, x, marker, group in points:
        ax.scatter([x], [y], marker=marker, color=colors[group],
                   label=None if (group, marker) in seen else group)
        seen.add((group, marker))
        ax.annotate(label, (x, y), fontsize=6, xytext=(3, 3), textcoords="offset points")
    if goal_x is not None and goal_y is not None:
        ax.axvspan(0, goal_x, ymin=0, ymax=1, alpha=0.06, color="green")
        ax.axhline(goal_y, color="green", lw=0.8, ls="--")
        ax.axvline(goal_x, color="green", lw=0.8, ls="--")
    ax.set_xlabel("worst-case malicious accuracy after the reuse attacks (lower is better)")
    ax.set_ylabel("beneficial test accuracy")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=8)
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)
    return path
