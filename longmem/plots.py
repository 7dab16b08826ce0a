"""Plots written as PNG files, for training (learning curves: ``plot_loss_curves``, the one every training loop
draws) and the evaluations (lines over categories, grouped bars): below both, beside ``io``."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from longmem.io import atomic_write


def pyplot():
    """matplotlib's pyplot on the file-only Agg backend, imported when a plot is drawn (not by every command:
    it takes about half a second)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, path, dpi: int = 120) -> None:
    """Write ``fig`` as a PNG atomically (folders created) and free it."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=dpi, format="png"))
    pyplot().close(fig)


def trailing_mean(values, k: int) -> np.ndarray:
    """The mean of each value and the up to ``k - 1`` before it (fewer at the start)."""
    values = np.asarray(values, dtype=np.float64)
    sums = np.concatenate([[0.0], np.cumsum(values)])
    i = np.arange(len(values))
    lo = np.maximum(0, i - k + 1)
    return (sums[i + 1] - sums[lo]) / (i + 1 - lo)


def plot_loss_curves(path, train: list[tuple[int, float]], checks: dict[str, list[tuple[int, float]]], *,
                     smooth: int = 1, title: str | None = None, xlabel: str = "step", marks=()) -> None:
    """Learning curves: the training loss and each held-out check's loss, by step.

    Args:
        train: (step, loss) of the logged training steps.
        checks: label -> (step, loss) of a held-out check (validation); an empty one is left out.
        smooth: above 1, the training loss is drawn faint with its trailing mean of ``smooth`` steps over it.
        marks: steps where the run changed (a new phase), drawn as dotted vertical lines.
    """
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 4))
    if train:
        steps, losses = zip(*train)
        if smooth > 1:
            ax.plot(steps, losses, alpha=0.25, color="C0")
            ax.plot(steps, trailing_mean(losses, smooth), color="C0", label=f"train loss (mean of {smooth} steps)")
        else:
            ax.plot(steps, losses, color="C0", lw=1, label="train loss")
    for i, (label, pts) in enumerate(checks.items()):
        if pts:
            ax.plot(*zip(*pts), "o-", color=f"C{i + 1}", label=label)
    for step in marks:
        ax.axvline(step, color="black", linestyle=":", linewidth=1)
    ax.set_xlabel(xlabel)
    ax.set_ylabel("cross-entropy (nats/token)")
    if title:
        ax.set_title(title)
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:  # nothing logged yet: no legend (and no warning)
        ax.legend()
    fig.tight_layout()
    save_figure(fig, path, dpi=110)


def plot_lines(path, xs: list[str], lines: dict[str, list], xlabel: str, ylabel: str, title: str, hline=None,
                dashed: str | None = None):
    """One line per entry of ``lines`` over the categories ``xs`` (None values skipped); labels holding
    ``dashed`` are drawn dashed."""

    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for label, ys in lines.items():
        pts = [(x, y) for x, y in zip(xs, ys) if y is not None]
        if pts:
            style = "--" if dashed and dashed in label else "-"
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=label, linestyle=style)
    if hline is not None:
        ax.axhline(hline, color="grey", linestyle=":", label="chance")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    save_figure(fig, path)


def plot_bars(path, groups: list[str], series: dict[str, list], errors: dict[str, list] | None, ylabel: str, title: str,
               hline=None):
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    width = 0.8 / max(1, len(series))
    x = np.arange(len(groups))
    for i, (name, ys) in enumerate(series.items()):
        ax.bar(x + i * width - 0.4 + width / 2, ys, width, yerr=(errors or {}).get(name), label=name, capsize=3)
    if hline is not None:
        ax.axhline(hline, color="grey", linestyle=":", label="chance")
    if len(groups) > 5:  # long rows of labels would overlap
        ax.set_xticks(x, groups, rotation=35, ha="right")
    else:
        ax.set_xticks(x, groups)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.set_ylim(0, 1)
    ax.legend(fontsize=8)
    fig.tight_layout()
    save_figure(fig, path)
