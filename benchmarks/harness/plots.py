"""The report's figures (matplotlib, drawn off-screen): training-loss curves of the historic suites (`loss_plot`)
and the capacity comparison's validation NLL against the learning rate (`plot_lr_curves`).
"""

from __future__ import annotations

import logging
import statistics
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

Record = dict[str, Any]


def pyplot_offscreen() -> Any:
    """matplotlib.pyplot on the off-screen backend, or None (with a warning) when matplotlib is not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        logger.warning("matplotlib is not installed: no figures")
        return None
    return plt


def save_figure(plt: Any, fig: Any, path: Path, dpi: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=dpi)
    plt.close(fig)


def lr_curve_ceiling(values: list[float]) -> float | None:
    """The top of an lr-curve panel's y-axis when a point blew up (above twice the panel's median NLL), so that one
    diverging lr does not flatten the curves a reader compares; None when every point fits on the scale."""
    if not values:
        return None
    cap = 2 * statistics.median(values)
    return cap if max(values) > cap else None


def plot_lr_curves(curves: dict[tuple[str, str], dict[str, dict[float, float]]], path: Path) -> bool:
    """Every method's validation NLL against the lr (`curves`: (task, regime) -> method -> lr -> NLL, one panel per
    task and regime); False when nothing to plot. A point above the panel's ceiling (`lr_curve_ceiling`) is drawn as
    a triangle at the top edge with its value."""
    plt = pyplot_offscreen()
    if not curves or plt is None:
        return False
    keys = sorted(curves)
    fig, axes = plt.subplots(1, len(keys), figsize=(6 * len(keys), 4.2), squeeze=False)
    for ax, key in zip(axes[0], keys):
        values = [v for curve in curves[key].values() for v in curve.values()]
        ceiling = lr_curve_ceiling(values)
        for method, curve in sorted(curves[key].items()):
            xs = sorted(curve)
            off = [x for x in xs if ceiling is not None and curve[x] > ceiling]
            ys = [ceiling if x in off else curve[x] for x in xs]
            (line,) = ax.plot(
                xs, ys, marker="o", label=method, markevery=[i for i, x in enumerate(xs) if x not in off]
            )
            for x in off:
                ax.plot([x], [ceiling], marker="^", markersize=9, color=line.get_color(), clip_on=False)
                ax.annotate(
                    f"{curve[x]:.2f} (off scale)",
                    (x, ceiling),
                    textcoords="offset points",
                    xytext=(-8, -14),
                    ha="right",
                    fontsize=8,
                    color=line.get_color(),
                )
        if ceiling is not None:
            low = min(values)
            ax.set_ylim(low - 0.05 * (ceiling - low), ceiling)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("learning rate")
        ax.set_ylabel("validation answer-token NLL (nats)")
        ax.set_title(f"{key[0]}, {key[1]}")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    save_figure(plt, fig, path, dpi=110)
    return True


def loss_plot(
    kept: dict[str, list[Record]], path: Path, title: str, panels: list[tuple[str, list[str]]], window: int = 10
) -> bool:
    """Training loss (mean over seeds, moving average) of each panel's methods (`kept`: method -> its records);
    False when no curve was drawn."""
    plt = pyplot_offscreen()
    if plt is None:
        return False
    fig, axes = plt.subplots(1, len(panels), figsize=(6.5 * len(panels), 4.5), sharey=True, squeeze=False)
    axes = axes[0]
    drawn = False
    windows: set[int] = set()
    for ax, (name, methods) in zip(axes, panels):
        for method in methods:
            rows = kept.get(method)
            if not rows:
                continue
            length = min(len(r["loss_curve"]) for r in rows)
            if length == 0:
                continue
            mean = [statistics.mean(r["loss_curve"][i][1] for r in rows) for i in range(length)]
            w = max(1, min(window, length // 5 or 1))
            windows.add(w)
            smooth = [statistics.mean(mean[max(0, i - w + 1) : i + 1]) for i in range(length)]
            ax.plot(range(1, length + 1), smooth, label=f"{method} ({len(rows)})")
            drawn = True
        ax.set_title(name)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    shown = "/".join(str(w) for w in sorted(windows)) or str(window)
    axes[0].set_ylabel(f"training loss (mean over seeds, moving average {shown})")
    fig.suptitle(title)
    fig.tight_layout()
    if drawn:
        save_figure(plt, fig, path, dpi=90)
    else:
        plt.close(fig)
    return drawn
