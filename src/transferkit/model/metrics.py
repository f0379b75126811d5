"""The classification metrics the module logs, and the states of those that span steps, carried
through checkpoints so that a resumed fit goes on with them."""

from __future__ import annotations

from typing import Any

import lightning as L
import torch
from lightning.pytorch.trainer.states import TrainerFn
from torchmetrics import Metric, MetricCollection
from torchmetrics.classification import MulticlassAccuracy, MulticlassF1Score, MultilabelF1Score


def classification_metrics(num_classes: int, prefix: str) -> MetricCollection:
    metrics: dict[str, Any] = {
        "acc": MulticlassAccuracy(num_classes, average="micro"),
        "f1": MulticlassF1Score(num_classes, average="macro"),
    }
    if num_classes >= 5:
        metrics["acc_top5"] = MulticlassAccuracy(num_classes, top_k=5, average="micro")
    # compute_groups=False: torchmetrics merges metrics whose states match after the first batch
    # (top-5 accuracy and F1 on a batch all wrong, say) and then computes both from one state.
    return MetricCollection(metrics, prefix=prefix, compute_groups=False)


def multilabel_train_metrics(num_classes: int, prefix: str) -> MetricCollection:
    """Micro and macro F1 of 0/1 decisions (made at the thresholds), summed over the epoch's
    batches: the scores of every training image, which val's metrics keep, would not fit."""
    metrics = {
        "f1_micro": MultilabelF1Score(num_classes, average="micro"),
        "f1_macro": MultilabelF1Score(num_classes, average="macro"),
    }
    return MetricCollection(metrics, prefix=prefix, compute_groups=False)


def running_metrics(module: L.LightningModule) -> dict[str, Metric]:
    """The module's metrics whose state outlives a step: the best val/acc, and the train metrics
    that accumulate over an epoch (val and test run whole within one step of training)."""
    metrics = {"val_acc_best": module.val_acc_best, "train_loss": module.train_loss}
    metrics.update({f"train_metrics.{k}": m for k, m in module.train_metrics.items(keep_base=True)})
    return metrics


class RunningMetrics(L.Callback):
    """The states of a TransferModule's `running_metrics` (the best val/acc so far, this epoch's
    train metrics) in each checkpoint's `metric_states`.

    A fit resumed from it carries on the best val/acc; resumed inside an epoch, it carries on
    that epoch's train metrics too, while one resumed at an epoch's end starts the next epoch's
    afresh (Lightning then restarts no epoch). Under DDP the checkpoint holds rank 0's share
    only, so there the resumed epoch's train/* cover the batches after the resume (val/*, which
    decide the best checkpoint, are whole). Validating a checkpoint restores nothing.
    """

    def __init__(self) -> None:
        self._resumed: dict[str, dict[str, torch.Tensor]] = {}

    def on_save_checkpoint(
        self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        checkpoint["metric_states"] = {
            name: {k: v.detach().cpu() for k, v in metric.metric_state.items()}
            for name, metric in running_metrics(pl_module).items()
        }

    def on_load_checkpoint(
        self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        """The best val/acc now; this epoch's train metrics wait for `on_train_start`."""
        if trainer.state.fn != TrainerFn.FITTING:
            return
        self._resumed = checkpoint.get("metric_states", {})
        self._restore(pl_module, ("val_acc_best",))

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.fit_loop.epoch_loop.restarting and trainer.world_size == 1:
            self._restore(pl_module, tuple(n for n in running_metrics(pl_module) if n.startswith("train")))
        self._resumed = {}

    def _restore(self, pl_module: L.LightningModule, names: tuple[str, ...]) -> None:
        running = running_metrics(pl_module)
        for name in names:
            for state, value in self._resumed.get(name, {}).items():
                setattr(running[name], state, value.to(pl_module.device))
