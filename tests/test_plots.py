"""The figures say what they show: steps on the x axis where the tables count steps, legends
beside the curves (never over them), one panel per method where lines would overlap."""
from __future__ import annotations

import numpy as np
import pytest

from trm_jax import plots


@pytest.fixture
def figures(monkeypatch):
    """The matplotlib figures the plot functions close, kept for inspection."""
    plt = plots._pyplot()
    kept, close = [], plt.close
    monkeypatch.setattr(plt, "close", lambda fig=None: kept.append(fig))
    yield kept
    for fig in kept:
        close(fig)


def entry(final: float, epochs: int = 5, **extra) -> dict:
    curve = np.linspace(0.2, final, epochs + 1)
    return {"curves": [[curve, curve]], **extra}  # one lr, two seeds


def legend_outside(fig, ax, legend) -> bool:
    fig.canvas.draw()
    return legend.get_window_extent().x0 >= ax.get_window_extent().x1


def test_attack_curves_count_steps_and_keep_the_legend_off_the_curves(tmp_path, figures):
    path = plots.plot_attack_curves({"linear_probe": entry(0.4, steps_per_epoch=4),
                                     "scratch": entry(0.9, steps_per_epoch=4)},
                                    tmp_path / "f.png", "t", chance=0.2)
    assert path.stat().st_size > 0
    (fig,) = figures
    ax = fig.axes[0]
    assert "steps" in ax.get_xlabel()
    assert max(np.max(line.get_xdata()) for line in ax.get_lines()
               if not line.get_label().startswith("chance")) == 5 * 4
    scratch = next(line for line in ax.get_lines() if line.get_label() == "scratch")
    assert scratch.get_linestyle() == "--" and scratch.get_color() == "black"
    assert legend_outside(fig, ax, ax.get_legend())


def test_attack_curves_without_steps_say_epochs(tmp_path, figures):
    plots.plot_attack_curves({"a": entry(0.4)}, tmp_path / "f.png", "t")
    ax = figures[0].axes[0]
    assert "epoch" in ax.get_xlabel() and "steps" not in ax.get_xlabel()
    assert max(np.max(line.get_xdata()) for line in ax.get_lines()) == 5


def test_budget_panels_draw_each_method_apart_with_the_references_in_each(tmp_path, figures):
    s = lambda *means: [{"mean": m, "std": 0.01} for m in means]
    panels = {f"method {i}": {"worst attack": s(0.8, 0.9), "worst reuse attack": s(0.7, 0.8)}
              for i in range(4)}
    plots.plot_budget_panels(["5", "all"], panels, {"scratch": s(0.85, 0.95)}, tmp_path / "f.png",
                             "t", xlabel="x", ylabel="y", chance=0.2)
    (fig,) = figures
    visible = [ax for ax in fig.axes if ax.get_visible()]
    assert [ax.get_title() for ax in visible] == list(panels)
    assert all(len(ax.get_lines()) >= 3 for ax in visible)  # its two series + scratch
    assert len(fig.legends) == 1 and "chance 0.20" in visible[0].get_ylabel()
    with pytest.raises(ValueError):
        plots.plot_budget_panels(["5"], {}, {}, tmp_path / "g.png", "t", xlabel="x", ylabel="y")


def test_tradeoff_numbers_coinciding_points_one_below_the_other(tmp_path, figures):
    points = [("a", 0.98, 0.95, "o", "validation"), ("b", 0.98, 0.951, "s", "test"),
              ("c", 0.90, 0.50, "o", "validation")]
    plots.plot_tradeoff(points, tmp_path / "f.png", "t", goal_x=0.3, goal_y=0.96)
    ax = figures[0].axes[0]
    numbers = {t.get_text(): t for t in ax.texts}
    assert set(numbers) == {"1", "2", "3"}
    assert numbers["1"].xy == numbers["2"].xy  # stacked beside the same point
    assert numbers["1"].xyann[1] > numbers["2"].xyann[1]
    key = figures[0].texts[0].get_text()
    assert " 1  a (validation)" in key and " 3  c (validation)" in key
