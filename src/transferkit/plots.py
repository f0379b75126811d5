"""The pictures a training run leaves in plots/: learning curves, and what the model sees."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from transferkit.preprocessing import Preprocessing


def plot_curves(history: dict[str, list[dict[str, float]]], path: str | Path) -> Path:
    """Loss and accuracy per epoch, train and val side by side (`history[stage]` holds one dict
    of epoch metrics per epoch, as the module logs them)."""
    figure = Figure(figsize=(10, 4), layout="constrained")
    for ax, metric in zip(figure.subplots(1, 2), ("loss", "acc"), strict=True):
        for stage, style in (("train", "-o"), ("val", "-s")):
            values = [
                epoch[f"{stage}/{metric}"] for epoch in history.get(stage, []) if f"{stage}/{metric}" in epoch
            ]
            if values:
                ax.plot(range(len(values)), values, style, label=stage, markersize=4)
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_ylabel({"loss": "cross-entropy loss", "acc": "accuracy"}[metric])
        ax.set_title({"loss": "Loss", "acc": "Accuracy"}[metric])
        ax.grid(alpha=0.3)
        ax.legend()
        if metric == "acc":
            ax.set_ylim(-0.02, 1.02)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=100)
    return path


def unnormalise(images: torch.Tensor, preprocessing: Preprocessing) -> torch.Tensor:
    """Normalised (B, 3, H, W) back to displayable [0, 1] pixels."""
    mean = torch.tensor(preprocessing.mean).view(1, 3, 1, 1)
    std = torch.tensor(preprocessing.std).view(1, 3, 1, 1)
    return (images * std + mean).clamp(0, 1)


def plot_batch(
    images: torch.Tensor,
    labels: Sequence[Any],
    class_names: Sequence[str],
    preprocessing: Preprocessing,
    path: str | Path,
    title: str = "Training images as the model sees them (augmented)",
) -> Path:
    """A contact sheet of a batch, each image captioned with its class."""
    count = len(images)
    columns = min(8, count)
    rows = math.ceil(count / columns)
    figure = Figure(figsize=(1.6 * columns, 1.8 * rows + 0.4), layout="constrained")
    axes = figure.subplots(rows, columns, squeeze=False).ravel()
    pixels = unnormalise(images.float().cpu(), preprocessing).permute(0, 2, 3, 1).numpy()
    for ax, picture, label in zip(axes, pixels, labels, strict=False):
        ax.imshow(picture)
        name = class_names[int(label)]
        ax.set_title(name if len(name) <= 18 else name[:17] + "…", fontsize=8)
    for ax in axes:
        ax.set_axis_off()
    figure.suptitle(title, fontsize=10)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=100)
    return path
