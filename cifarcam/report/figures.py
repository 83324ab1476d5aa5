"""The report's figures: drawing functions that take query results (DataFrames) and images, and
write PNGs. Each returns the file's name, which is how report.md and report.html link it."""

from __future__ import annotations

import io
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

FIGURE_DPI = 100
HEATMAP_ALPHA = 0.45

Draw = Callable[[Any], None]  # draws on a matplotlib Figure


def _pyplot() -> Any:
    # Imported on first use with the file-only backend: the report runs on headless nodes.
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def figure(path: Path, draw: Draw, size: tuple[float, float]) -> str:
    """Draw a ``size``-inch figure with ``draw`` and save it as ``path`` (PNG); return its name."""
    plt = _pyplot()
    fig = plt.figure(figsize=size, dpi=FIGURE_DPI)
    draw(fig)
    fig.savefig(path, dpi=FIGURE_DPI)
    plt.close(fig)
    return path.name


def overlay(ax: Any, image: np.ndarray, heatmap: np.ndarray | None, title: str) -> None:
    """``image`` with ``heatmap`` (flat, square, 0-255) over it in jet. The heatmap's side comes
    from its length and it is stretched over the image, so either may have any resolution."""
    ax.imshow(image, interpolation="nearest")
    if heatmap is not None:
        side = int(np.sqrt(heatmap.size))
        h, w = image.shape[:2]
        ax.imshow(
            heatmap.reshape(side, side), cmap="jet", alpha=HEATMAP_ALPHA, vmin=0, vmax=255, interpolation="bilinear", extent=(-0.5, w - 0.5, h - 0.5, -0.5)
        )
    ax.set_title(title, fontsize=7)
    ax.axis("off")


def overlay_pngs(pairs: Sequence[tuple[np.ndarray, np.ndarray]], pixels: int = 96) -> list[bytes]:
    """Small PNGs (``pixels`` square, no title) of each (image, heatmap) overlay, for the gallery.
    One figure is reused: hundreds of figures would cost more than the drawing."""
    plt = _pyplot()
    fig = plt.figure(figsize=(pixels / FIGURE_DPI,) * 2, dpi=FIGURE_DPI)
    ax = fig.add_axes((0, 0, 1, 1))
    out = []
    for image, heatmap in pairs:
        ax.clear()
        overlay(ax, image, heatmap, "")
        buffer = io.BytesIO()
        fig.savefig(buffer, format="png", dpi=FIGURE_DPI)
        out.append(buffer.getvalue())
    plt.close(fig)
    return out


def cam_grid(
    path: Path,
    title: str,
    picks: pd.DataFrame,
    layers: pd.DataFrame,
    maps: Mapping[tuple[int, str], np.ndarray],
    images: Mapping[int, np.ndarray],
    names: Sequence[str],
) -> str:
    """One row per pick (image_index, label, pred, correct): the image, then its map at each layer."""

    def draw(fig: Any) -> None:
        cols = 1 + len(layers)
        for r, p in enumerate(picks.itertuples(index=False)):
            verdict = "ok" if p.correct else "wrong"
            image = images[p.image_index]
            overlay(fig.add_subplot(len(picks), cols, r * cols + 1), image, None, f"{names[p.label]} -> {names[p.pred]} ({verdict})")
            for c, layer in enumerate(layers.itertuples(index=False)):
                overlay(
                    fig.add_subplot(len(picks), cols, r * cols + 2 + c), image, maps.get((p.image_index, layer.layer)), f"{layer.layer} {layer.h}x{layer.w}"
                )
        fig.suptitle(title, fontsize=9)
        fig.tight_layout()

    return figure(path, draw, (1.6 * (1 + len(layers)), 1.7 * len(picks) + 0.4))


def grouped_bars(path: Path, frame: pd.DataFrame, measures: Mapping[str, str], xlabel: str) -> str:
    """One group of bars per row of ``frame`` (x labels: its first column), one bar per measure
    (column -> legend label) that has any value; shares, so the axis runs from 0 to 1."""

    def draw(fig: Any) -> None:
        ax = fig.add_subplot(1, 1, 1)
        shown = [c for c in measures if frame[c].notna().any()]
        x = np.arange(len(frame))
        width = 0.8 / len(shown)
        for k, column in enumerate(shown):
            values = frame[column].to_numpy(float)
            present = ~np.isnan(values)  # a missing measurement is no bar, never a zero-height one
            ax.bar((x + (k - (len(shown) - 1) / 2) * width)[present], values[present], width, label=measures[column])
        ax.set_xticks(x, frame.iloc[:, 0])
        ax.set_xlabel(xlabel)
        ax.set_ylim(0, 1)
        ax.legend(fontsize=7)
        fig.tight_layout()

    return figure(path, draw, (5, 3.2))


def faithfulness_margins(path: Path, frame: pd.DataFrame) -> str:
    """Each map's deletion and insertion margins over the baseline its verdict names (the one it is
    least surely better than, or the one that beats it), with 2-SE bars."""

    def draw(fig: Any) -> None:
        ax = fig.add_subplot(1, 1, 1)
        labels = [f"{model}\n{layer}\n{method}" for model, layer, method in zip(frame.model, frame.layer, frame.method)]
        x = np.arange(len(frame))
        ax.bar(x - 0.2, frame.deletion_margin, 0.4, yerr=2 * frame.deletion_se, label="deletion margin")
        ax.bar(x + 0.2, frame.insertion_margin, 0.4, yerr=2 * frame.insertion_se, label="insertion margin")
        ax.axhline(0, color="black", linewidth=0.8)
        ax.set_xticks(x, labels, fontsize=6)
        ax.set_ylabel("margin over the verdict's baseline")
        ax.legend(fontsize=7)
        fig.tight_layout()

    return figure(path, draw, (max(5, 0.9 * len(frame)), 3.6))


def sanity_curves(path: Path, steps: pd.DataFrame, fail_spearman: float) -> str:
    """Rank correlation with the trained map as more of the model is randomised, per map."""

    def draw(fig: Any) -> None:
        ax = fig.add_subplot(1, 1, 1)
        for (model, layer, method), part in steps.groupby(["model", "layer", "method"]):
            ax.plot(part.step, part.spearman, marker="o", markersize=3, label=f"{model} {layer} {method}")
        first = steps.drop_duplicates("step").sort_values("step")
        ax.set_xticks(first.step, [f"+{n}" for n in first.randomised_to], fontsize=7)
        ax.set_xlabel("randomised, top down (cumulative)")
        ax.set_ylabel("rank correlation with the trained map")
        ax.axhline(fail_spearman, color="grey", linestyle="--", linewidth=0.8)
        ax.legend(fontsize=6)
        fig.tight_layout()

    return figure(path, draw, (6, 3.6))


def overlay_row(path: Path, panels: Sequence[tuple[str, np.ndarray, np.ndarray]]) -> str:
    """One row of (title, image, heatmap) overlays."""

    def draw(fig: Any) -> None:
        for i, (title, image, heatmap) in enumerate(panels):
            overlay(fig.add_subplot(1, len(panels), i + 1), image, heatmap, title)
        fig.tight_layout()

    return figure(path, draw, (1.8 * len(panels), 2.4))


def per_class_bars(path: Path, frame: pd.DataFrame, names: Sequence[str]) -> str:
    """Accuracy per class (model, label, accuracy), one bar per model; class names up to 20."""

    def draw(fig: Any) -> None:
        ax = fig.add_subplot(1, 1, 1)
        models = list(dict.fromkeys(frame.model))
        width = 0.8 / len(models)
        for k, model in enumerate(models):
            part = frame[frame.model == model]
            ax.bar(part.label + k * width, part.accuracy, width, label=model)
        ticks = sorted(set(frame.label))
        if len(ticks) <= 20:
            ax.set_xticks(ticks, [names[i] for i in ticks], rotation=45, fontsize=7)
        ax.set_ylabel("test accuracy")
        ax.set_ylim(0, 1)
        ax.legend(fontsize=7)
        fig.tight_layout()

    return figure(path, draw, (7, 3.4))


def learning_curves(path: Path, frame: pd.DataFrame) -> str:
    """Validation top-1 per epoch, one line per trial (trial_id, model, optimizer, status)."""

    def draw(fig: Any) -> None:
        ax = fig.add_subplot(1, 1, 1)
        for _trial, part in frame.groupby("trial_id"):
            first = part.iloc[0]
            ax.plot(part.epoch, part.val_top1, marker="o", markersize=3, label=f"{first.model} {first.optimizer} ({first.status})")
        ax.set_xlabel("epoch")
        ax.set_ylabel("val top-1")
        ax.legend(fontsize=6)
        fig.tight_layout()

    return figure(path, draw, (6, 3.6))


def search_scatter(path: Path, frame: pd.DataFrame) -> str:
    """Best validation accuracy against learning rate per trial; x: stopped by ASHA."""

    def draw(fig: Any) -> None:
        from matplotlib.ticker import NullFormatter

        ax = fig.add_subplot(1, 1, 1)
        for (model, opt), part in frame.groupby(["model", "optimizer"]):
            ax.scatter(part.lr, part.best_val_top1, label=f"{model} {opt}", marker="x" if part.stopped_by_asha.all() else "o")
        ax.set_xscale("log")
        ax.xaxis.set_minor_formatter(NullFormatter())  # log-axis minor labels collide
        ax.set_xlabel("learning rate")
        ax.set_ylabel("best val top-1")
        ax.legend(fontsize=6)
        fig.tight_layout()

    return figure(path, draw, (5.5, 3.4))
