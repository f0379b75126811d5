"""`tune_lr=true`: Lightning's learning-rate range test before fitting, read with fastai's
`valley` rule (Lightning's steepest-slope point catches the noisy start of a flat curve), its
plot kept with the run."""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning as L
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.tuner import Tuner

from transferkit.errors import ConfigError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Valley:
    """The longest run of falling loss on the curve (indices into it), and the point suggested."""

    start: int
    end: int
    index: int


def longest_valley(losses: Sequence[float]) -> tuple[int, int]:
    """fastai's valley: the longest strictly decreasing subsequence of the losses, as (start,
    end), start being its end less its length, as fastai counts it."""
    falls = [1] * len(losses)  # falls[i]: the longest decreasing run of points ending at i
    end = 0
    for i in range(1, len(losses)):
        for j in range(i):
            if losses[i] < losses[j] and falls[i] < falls[j] + 1:
                falls[i] = falls[j] + 1
        if falls[i] > falls[end]:
            end = i
    return max(end - falls[end], 0), end


def find_valley(losses: Sequence[float], min_drop: float) -> Valley | None:
    """The valley point of a range test's (smoothed) losses, or None when the curve never falls
    by `min_drop` of its level. As fastai does, the first tenth of the curve (where the running
    average has seen few batches) and its last five points (where it diverges) are left out, and
    the suggestion is ⌊s⌋ + ⌊s/2⌋ past the valley's start, s a third of its length."""
    finite = next((i for i, loss in enumerate(losses) if not math.isfinite(loss)), len(losses))
    first, last = len(losses) // 10, min(finite, len(losses) - 5)
    if last - first < 3:
        return None
    start, end = longest_valley(losses[first:last])
    top = max(losses[first + start : first + end + 1])
    if end == start or top - losses[first + end] < min_drop * abs(top):
        return None
    third = (end - start) / 3
    return Valley(first + start, first + end, first + start + int(third) + int(third / 2))


def tune_lr(
    trainer: L.Trainer,
    model: L.LightningModule,
    datamodule: L.LightningDataModule,
    output_dir: str | Path,
    min_drop: float = 0.1,
    **lr_find: Any,
) -> float | None:
    """Sweep the lr over a few batches (`lr_find` goes to `Tuner.lr_find`: min_lr, max_lr,
    num_training, mode), save `lr_find.png` and `lr_find.json` in the run directory, log the
    plot to TensorBoard, and set the optimizer's lr to the valley's point. The backbone's param
    groups keep their ratio to it. Returns the lr applied, or None when the configured lr stays:
    a curve that never falls by `min_drop` of its level suggests nothing."""
    max_epochs = trainer.fit_loop.max_epochs
    trainer.fit_loop.max_epochs = -1  # a small dataset must not cut the sweep short: it counts batches
    try:
        finder = Tuner(trainer).lr_find(model, datamodule=datamodule, update_attr=False, **lr_find)
    except TypeError as error:
        raise ConfigError(
            f"Bad lr_finder setting: {error} (keys: min_lr, max_lr, num_training, mode, min_drop)."
        ) from None
    finally:
        trainer.fit_loop.max_epochs = max_epochs
    if finder is None:  # fast_dev_run: nothing to sweep
        return None
    lrs, losses = finder.results["lr"], finder.results["loss"]
    valley = find_valley(losses, min_drop)
    suggestion = float(lrs[valley.index]) if valley else None
    save_curve(trainer, finder, valley, Path(output_dir))
    configured = model.hparams.optimizer["lr"]
    if valley is None:
        log.warning(
            "lr finder: the loss never fell by %d%% between lr %.3g and %.3g; keeping optimizer.lr=%s.",
            round(min_drop * 100), lrs[0], lrs[-1], configured,
        )  # fmt: skip
        return None
    log.info(
        "lr finder: optimizer.lr %s -> %.3g (the valley from %.3g to %.3g; plot: %s)",
        configured, suggestion, lrs[valley.start], lrs[valley.end], Path(output_dir) / "lr_find.png",
    )  # fmt: skip
    model.hparams.optimizer["lr"] = suggestion
    return suggestion


def save_curve(trainer: L.Trainer, finder: Any, valley: Valley | None, output_dir: Path) -> None:
    """lr_find.png (the curve, its valley shaded and the suggestion marked) and lr_find.json."""
    lrs, losses = finder.results["lr"], finder.results["loss"]
    output_dir.mkdir(parents=True, exist_ok=True)
    figure = finder.plot(suggest=False)
    if valley is not None:
        axes = figure.axes[0]
        axes.axvspan(lrs[valley.start], lrs[valley.end], alpha=0.15, color="green", label="valley")
        axes.plot(lrs[valley.index], losses[valley.index], markersize=10, marker="o", color="red")
    figure.savefig(output_dir / "lr_find.png", dpi=120)
    for logger in trainer.loggers:
        if isinstance(logger, TensorBoardLogger):
            logger.experiment.add_figure("lr_find", figure)
    found = {
        "suggestion": float(lrs[valley.index]) if valley else None,
        "valley": [float(lrs[valley.start]), float(lrs[valley.end])] if valley else None,
        "lr": lrs,
        "loss": losses,
    }
    (output_dir / "lr_find.json").write_text(json.dumps(found))
