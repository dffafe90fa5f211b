"""The experiment's pictures: learning curves, the substitution curve, the score against the teacher's cost and
the grid of samples."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from sdit.files import replacing
from sdit.images import captioned_grid


def plot_curves(png: Path, curves: dict[str, list[dict]], teacher: dict) -> None:
    """Step on x; the fair held-out score and the seen accuracy on y; a line per run, the teacher dashed."""
    plot_scores(png, {name: [(p["step"], p) for p in curve] for name, curve in curves.items()}, teacher,
                "training step")


def plot_scores(png: Path, lines: dict[str, list[tuple[float, dict]]], teacher: dict, xlabel: str,
                log_x: bool = False) -> None:
    """Two panels, the fair held-out score and the seen accuracy, against x: a line of (x, figures) points per
    run, the teacher's figure dashed (the learning curves, and the substitution curve on log records)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    fig, axes = plt.subplots(1, 2, figsize=(10, 4), dpi=100)
    for ax, key, title in ((axes[0], "heldout_acc", "held-out concepts (fair: hit - false positive)"),
                           (axes[1], "seen_acc", "seen prompts: shape and colour")):
        for k, (name, points) in enumerate(lines.items()):
            ax.plot([x for x, _ in points], [f[key] for _, f in points], marker="o", markersize=3, label=name,
                    color=f"C{k}")
        ax.axhline(teacher[key], color="black", linestyle="--", linewidth=1, label="teacher")
        if log_x:  # a tick at each measured x, written out (not 2x10^3)
            ax.set_xscale("log")
            xs = sorted({x for points in lines.values() for x, _ in points})
            ax.set_xticks(xs, [f"{x:,.0f}" for x in xs])
            ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        ax.set_xlabel(xlabel)
        ax.set_title(title, fontsize=10)
        ax.grid(alpha=0.3, which="both")
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    with replacing(png) as tmp:
        fig.savefig(tmp)
    plt.close(fig)


def plot_budget(png: Path, runs: dict[str, dict], teacher: dict) -> None:
    """Each run's fair held-out score, with its 95% interval, against the teacher forwards its labels cost
    (labelling and teacher samples together); the teacher's own score dashed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    fig, ax = plt.subplots(figsize=(6, 4), dpi=100)
    for k, (name, run) in enumerate(runs.items()):
        x, y = run["teacher_forwards"], run["heldout_acc"]
        low, high = run.get("intervals", {}).get("heldout_acc", (y, y))
        ax.errorbar([x], [y], yerr=[[y - low], [high - y]], fmt="o", markersize=4, capsize=3, color=f"C{k}",
                    label=name)
    ax.axhline(teacher["heldout_acc"], color="black", linestyle="--", linewidth=1, label="teacher")
    ax.set_xlabel("teacher forwards (labels and samples)")
    ax.set_ylabel("held-out concepts (fair)")
    ax.set_ylim(min(0.0, ax.get_ylim()[0]), max(1.0, ax.get_ylim()[1]))
    ax.xaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda x, _: f"{x:,.0f}"))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    with replacing(png) as tmp:
        fig.savefig(tmp)
    plt.close(fig)


def write_grid(path: Path, images: dict, prompts: dict, per_prompt: int, columns: int = 8) -> None:
    """The first image of `columns` prompts, half held-out and half seen: one row per model."""
    picks = {"heldout": np.linspace(0, len(prompts["heldout"]) - 1, columns // 2).astype(int),
             "seen": np.linspace(0, len(prompts["seen"]) - 1, columns - columns // 2).astype(int)}
    rows = {name: [images[name][split][i * per_prompt] for split, idx in picks.items() for i in idx]
            for name in images}
    captions = [prompts[split][i].text for split, idx in picks.items() for i in idx]
    with replacing(path) as tmp:
        captioned_grid(rows, captions, columns).save(tmp)
