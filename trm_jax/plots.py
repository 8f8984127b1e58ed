"""Figures shared by the experiments (matplotlib, Agg backend: no display needed)."""
from __future__ import annotations

import os
import pathlib
import re
import textwrap
from typing import Any, Mapping

import numpy as np


def _pyplot():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def _reference_style(label: str) -> dict[str, Any]:
    """Scratch and the unprotected model look the same in every figure: black and grey dashes."""
    name = label.lower()
    if name.startswith("scratch"):
        return {"color": "black", "linestyle": "--"}
    if name.startswith("unprotected"):
        return {"color": "dimgray", "linestyle": "-."}
    return {}


def _legend_outside(ax, **kwargs: Any) -> None:
    """The legend right of the axes, never over a curve."""
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0.0,
              **kwargs)


def plot_attack_curves(entries: Mapping[str, Mapping[str, Any]], path: str | os.PathLike,
                       title: str, chance: float | None = None, *,
                       lr: str = "best", steps_per_epoch: int | None = None) -> pathlib.Path:
    """Learning curves of fine-tuning attacks: mean +- std over seeds per entry.

    The x axis counts the attacker's optimizer steps, as the result tables do, when the
    entries say how many steps an epoch has (``entry["steps_per_epoch"]``, as
    :func:`trm_jax.attacks.report.entry` records it, or ``steps_per_epoch``); otherwise
    epochs. Scratch and the unprotected model are drawn dashed in black and grey; the
    legend sits right of the axes.

    Args:
      entries: ``{label: entry}`` with ``entry["curves"]: [L][S][E+1]`` (as made by
        :func:`trm_jax.attacks.report.entry`); references (scratch) can be mixed in.
      path: the PNG to write (parent folders are created).
      title: figure title.
      chance: chance accuracy (``1 / num_classes``), drawn as a dotted line.
      lr: ``"best"`` draws each entry at its attacker's learning rate
        (``entry["best_lr_index"]``, else the first); ``"all"`` draws every
        learning rate of every entry.
      steps_per_epoch: attacker steps per epoch, for entries that do not record it.

    Returns:
      The path written.
    """
    if not entries:
        raise ValueError("plot_attack_curves needs at least one entry")
    if lr not in ("best", "all"):
        raise ValueError(f"lr must be 'best' or 'all', got {lr!r}")
    per_epoch = {e.get("steps_per_epoch") or steps_per_epoch for e in entries.values()}
    per_epoch = per_epoch.pop() if len(per_epoch) == 1 else None  # one x axis for all, or epochs
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(8.5, 4.5), dpi=120)
    for label, entry in entries.items():
        curves = np.asarray(entry["curves"], dtype=np.float64)  # [L, S, E+1]
        if curves.ndim != 3:
            raise ValueError(f"entry {label!r}: curves must be [lr][seed][epoch], got shape {curves.shape}")
        lrs = entry.get("learning_rates", [None] * curves.shape[0])
        indices = range(curves.shape[0]) if lr == "all" else [int(entry.get("best_lr_index", 0))]
        for i in indices:
            mean, std = curves[i].mean(0), curves[i].std(0)
            x = np.arange(curves.shape[-1]) * (per_epoch or 1)
            name = label if lrs[i] is None else f"{label} (lr {lrs[i]:g})"
            line, = ax.plot(x, mean, marker="o", markersize=3, label=name, **_reference_style(label))
            ax.fill_between(x, mean - std, mean + std, color=line.get_color(), alpha=0.15)
    if chance is not None:
        ax.axhline(chance, color="gray", linestyle=":", linewidth=1, label=f"chance ({chance:.2f})")
    num_seeds = {np.asarray(e["curves"]).shape[1] for e in entries.values()}
    seeds = f"{num_seeds.pop()} seeds" if len(num_seeds) == 1 else "seeds"
    ax.set_title(title, fontsize=10)
    ax.set_xlabel("attacker's optimizer steps (0 = before fine-tuning)" if per_epoch else
                  "attack fine-tuning epoch (0 = before fine-tuning)")
    ax.set_ylabel(f"malicious test accuracy\n(mean ± std over {seeds})")
    ax.set_ylim(0.0, 1.0)
    ax.grid(True, alpha=0.3)
    _legend_outside(ax)
    fig.tight_layout()
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path


Summary = Mapping[str, float]  # {"mean": m, "std": s}


def plot_budget_panels(x_labels: list[str], panels: Mapping[str, Mapping[str, list[Summary]]],
                       shared: Mapping[str, list[Summary]], path: str | os.PathLike, title: str, *,
                       xlabel: str, ylabel: str, chance: float | None = None) -> pathlib.Path:
    """One panel per method, so no method's lines hide another's: each panel draws its own
    series (``panels[method]``: ``{label: [summary per x]}``) over the ``shared`` ones
    (scratch, the unprotected model), with error bars (std over seeds). One legend below.
    The y axis fits the data (the differences are a few points); ``chance`` goes into the
    axis label instead of a line far below them.

    Returns:
      The path written.
    """
    if not panels:
        raise ValueError("plot_budget_panels needs at least one panel")
    plt = _pyplot()
    columns = 2 if len(panels) == 4 else min(3, len(panels))
    rows = -(-len(panels) // columns)
    fig, axes = plt.subplots(rows, columns, figsize=(3.4 * columns, 2.9 * rows + 0.9), dpi=120,
                             sharex=True, sharey=True, squeeze=False)
    x = np.arange(len(x_labels))
    styles = [{"color": "tab:red", "linestyle": "-"}, {"color": "tab:blue", "linestyle": ":"},
              {"color": "tab:green", "linestyle": "-"}]
    handles: dict[str, Any] = {}
    for ax, (name, series) in zip(axes.flat, panels.items()):
        for label, values in shared.items():
            handles[label] = ax.errorbar(x, [v["mean"] for v in values], [v["std"] for v in values],
                                         capsize=2, marker="o", markersize=3, label=label,
                                         **_reference_style(label))
        for style, (label, values) in zip(styles, series.items()):
            handles[label] = ax.errorbar(x + 0.06, [v["mean"] for v in values],
                                         [v["std"] for v in values], capsize=2, marker="s",
                                         markersize=3, lw=2, label=label, **style)
        ax.set_title(name, fontsize=9)
        ax.set_xticks(x, x_labels, fontsize=8)
        ax.grid(True, alpha=0.3)
    for ax in axes.flat[len(panels):]:
        ax.set_visible(False)
    for ax in axes[:, 0]:
        ax.set_ylabel(ylabel if chance is None else f"{ylabel}\n(chance {chance:.2f})", fontsize=8)
    for ax in axes[-1]:
        ax.set_xlabel(xlabel, fontsize=8)
    fig.suptitle(title, fontsize=10)
    legend_rows = -(-len(handles) // 2)
    fig.legend(list(handles.values()), list(handles), loc="lower center", ncol=2, fontsize=8,
               frameon=False)
    height = fig.get_size_inches()[1]
    fig.tight_layout(rect=(0, (0.15 + 0.2 * legend_rows) / height, 1, 1))  # room for the legend
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path


def plot_ablation(rows: list[dict[str, Any]], path, title: str):
    """Teacher / student beneficial accuracy (%) and misses (%) against teacher epochs."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(8.0, 4.2), dpi=120)
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
    _legend_outside(ax)
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

    Points close together would hide each other's labels, so each point carries a number
    and the key right of the axes says which configuration it is.

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
    fig, ax = plt.subplots(figsize=(11.0, 5.5))
    groups = list(dict.fromkeys(p[4] for p in points))
    colors = dict(zip(groups, plt.rcParams["axes.prop_cycle"].by_key()["color"]))
    seen = set()
    for label, y, x, marker, group in points:
        ax.scatter([x], [y], marker=marker, color=colors[group],
                   label=None if (group, marker) in seen else group)
        seen.add((group, marker))
    if goal_x is not None and goal_y is not None:
        ax.axvspan(0, goal_x, ymin=0, ymax=1, alpha=0.06, color="green")
        ax.axhline(goal_y, color="green", lw=0.8, ls="--",
                   label=f"goal: beneficial >= {goal_y:.3f}, malicious <= {goal_x:.2f}")
        ax.axvline(goal_x, color="green", lw=0.8, ls="--")
    (x0, x1), (y0, y1) = ax.get_xlim(), ax.get_ylim()  # the final limits (goal region in)
    key, stacks = [], {}  # stacks: anchor point -> numbers written beside it
    for number, (label, y, x, marker, group) in enumerate(points, start=1):
        # Numbers of points that (nearly) coincide are stacked beside the first, one per line.
        anchor = next(((ax_, ay) for ax_, ay in stacks
                       if abs(ax_ - x) < 0.02 * (x1 - x0) and abs(ay - y) < 0.02 * (y1 - y0)), (x, y))
        stacks[anchor] = stacks.get(anchor, 0) + 1
        ax.annotate(str(number), anchor, fontsize=7, xytext=(6, 11 - 9 * stacks[anchor]),
                    textcoords="offset points")
        entry = f"{number:>2}  " + (group if group.startswith(label) else f"{label} ({group})")
        # the key's column holds ~70 monospace characters: long variant names wrap at commas
        key += textwrap.wrap(re.sub(r",(?![ )])", ", ", entry), 62, subsequent_indent="      ",
                             break_on_hyphens=False)
    ax.set_xlabel("worst-case malicious accuracy after the reuse attacks (lower is better)")
    ax.set_ylabel("beneficial test accuracy (higher is better)")
    ax.set_title(title, fontsize=9)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8, loc="lower left")
    fig.text(0.63, 0.93, "\n".join(key), fontsize=7, family="monospace", va="top")
    fig.tight_layout(rect=(0, 0, 0.62, 1))
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=130)
    plt.close(fig)
    return path
