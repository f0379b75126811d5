"""`tune_lr=true`: Lightning's learning-rate range test before fitting, its plot kept with the run."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import lightning as L
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.tuner import Tuner

from transferkit.errors import ConfigError

log = logging.getLogger(__name__)


def tune_lr(
    trainer: L.Trainer,
    model: L.LightningModule,
    datamodule: L.LightningDataModule,
    output_dir: str | Path,
    **lr_find: Any,
) -> float | None:
    """Sweep the lr over a few batches (`lr_find` goes to `Tuner.lr_find`: min_lr, max_lr,
    num_training, mode), save `lr_find.png` and `lr_find.json` in the run directory, log the
    plot to TensorBoard, and set the optimizer's lr to the suggestion (the steepest descent
    of the loss). The backbone's param groups keep their ratio to it. Returns the suggestion,
    or None (the configured lr stays) when the curve gives none."""
    max_epochs = trainer.fit_loop.max_epochs
    trainer.fit_loop.max_epochs = -1  # a small dataset must not cut the sweep short: it counts batches
    try:
        finder = Tuner(trainer).lr_find(model, datamodule=datamodule, update_attr=False, **lr_find)
    except TypeError as error:
        raise ConfigError(
            f"Bad lr_finder setting: {error} (keys: min_lr, max_lr, num_training, mode)."
        ) from None
    finally:
        trainer.fit_loop.max_epochs = max_epochs
    if finder is None:  # fast_dev_run: nothing to sweep
        return None
    suggestion = finder.suggestion()
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    figure = finder.plot(suggest=suggestion is not None)
    figure.savefig(output_dir / "lr_find.png", dpi=120)
    for logger in trainer.loggers:
        if isinstance(logger, TensorBoardLogger):
            logger.experiment.add_figure("lr_find", figure)
    (output_dir / "lr_find.json").write_text(
        json.dumps({"suggestion": suggestion, "lr": finder.results["lr"], "loss": finder.results["loss"]})
    )
    if suggestion is None:
        log.warning(
            "The lr finder found no clear descent; keeping optimizer.lr=%s.", model.hparams.optimizer["lr"]
        )
        return None
    log.info(
        "lr finder: optimizer.lr %s -> %.3g (plot: %s)",
        model.hparams.optimizer["lr"],
        suggestion,
        output_dir / "lr_find.png",
    )
    model.hparams.optimizer["lr"] = float(suggestion)
    return float(suggestion)
