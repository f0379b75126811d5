"""The LightningModule: a pretrained backbone, a new head, the loss, metrics and optimizer."""

from __future__ import annotations

import inspect
import warnings
from collections.abc import Callable
from typing import Any

import lightning as L
import torch
from hydra.utils import instantiate
from lightning.pytorch.trainer.states import TrainerFn
from torch import nn
from torchmetrics import MaxMetric, MeanMetric, Metric, MetricCollection
from torchmetrics.classification import MulticlassAccuracy, MulticlassConfusionMatrix, MulticlassF1Score

from transferkit.backbones import build_backbone
from transferkit.errors import ConfigError, TrainingDiverged
from transferkit.features.precision import PRECISIONS, frozen_forward
from transferkit.finetune import hold_frozen_in_eval
from transferkit.heads import build_head
from transferkit.rng import rng_states, set_rng_states

RECORD_KEY = "transferkit"  # the checkpoint entry with what the run records beside the model
SCHEDULER_KEYS = ("monitor", "interval", "frequency")  # Lightning's, beside the constructor's

# Epoch metrics are torchmetrics objects synced by their own compute(); see `_log_epoch`.
warnings.filterwarnings(
    "ignore", message=r".*recommended to use `self.log\('(train|val|test)/.*sync_dist=True"
)


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


def bad_setting(error: Exception) -> ConfigError:
    return ConfigError(f"Bad optimizer or scheduler setting: {error} (check optimizer.* and scheduler.*).")


class TransferModule(L.LightningModule):
    """Backbone + head. Every init argument is plain data, so a checkpoint rebuilds the model
    alone: the class names and the resolved preprocessing are among them.

    `optimizer` and `scheduler` are Hydra configs (`_partial_: true`), built in
    `configure_optimizers` over the parameters that require grad at that time, in param groups
    the fine-tuning strategy names (`lr_plan`). `class_weights` weight the training loss only,
    so val and test losses stay comparable across runs.
    """

    def __init__(
        self,
        name: str,
        class_names: list[str],
        weights: str | bool | None = None,
        head: dict[str, Any] | None = None,
        label_smoothing: float = 0.0,
        optimizer: dict[str, Any] | None = None,
        scheduler: dict[str, Any] | None = None,
        preprocessing: dict[str, Any] | None = None,
        class_weights: list[float] | None = None,
        compile: bool = False,
    ) -> None:
        super().__init__()
        if len(class_names) < 2:
            raise ConfigError(f"A classifier needs at least 2 classes; the data has {len(class_names)}.")
        if not 0.0 <= label_smoothing < 1.0:
            raise ConfigError(f"model.label_smoothing={label_smoothing} must lie in [0, 1).")
        backbone = build_backbone(name, weights)
        self.preprocessing = backbone.preprocessing.with_overrides(**(preprocessing or {}))
        preprocessing = self.preprocessing.to_dict()  # saved resolved: checkpoints and loggers see it
        self.save_hyperparameters()
        self.backbone = backbone.model
        # channels_last: convolutions run markedly faster in it on CPUs and tensor cores alike
        self.channels_last = any(isinstance(m, nn.Conv2d) for m in self.backbone.modules())
        if self.channels_last:
            self.backbone.to(memory_format=torch.channels_last)
        self.frozen_dtype = torch.float32  # the frozen backbone's forward; the train task resolves it
        self.data_config: dict[str, Any] | None = None  # the data it trains on; the train task sets it
        self.run_record: dict[str, Any] = {}  # what else the run records (seed, augmentation)
        self.head = build_head(backbone.num_features, len(class_names), **(head or {}))
        self.criterion = nn.CrossEntropyLoss(label_smoothing=label_smoothing)
        weight = torch.tensor(class_weights, dtype=torch.float32) if class_weights else None
        if weight is not None and len(weight) != len(class_names):
            raise ConfigError(f"{len(weight)} class weights for {len(class_names)} classes.")
        self.train_criterion = nn.CrossEntropyLoss(weight=weight, label_smoothing=label_smoothing)
        # parameter name -> (param group name, lr scale); the fine-tuning strategy fills it in
        self.lr_plan: dict[str, tuple[str, float]] = {}
        self.train_metrics = classification_metrics(len(class_names), "train/")
        self.val_metrics = classification_metrics(len(class_names), "val/")
        self.test_metrics = classification_metrics(len(class_names), "test/")
        self.train_loss, self.val_loss, self.test_loss = MeanMetric(), MeanMetric(), MeanMetric()
        self.val_acc_best = MaxMetric()
        self.val_confusion = MulticlassConfusionMatrix(len(class_names))
        self.confusion: torch.Tensor | None = None  # of the last validation: the plots use it
        self.history: dict[str, list[dict[str, float]]] = {"train": [], "val": []}  # per epoch
        self._resumed_metric_states: dict[str, dict[str, torch.Tensor]] = {}
        self._check_optimizer()

    def _check_optimizer(self) -> None:
        """Build the optimizer and scheduler once on a stand-in parameter, so a value they refuse
        (lr=-1, momentum=2) is reported now, before any data is read."""
        if self.hparams.optimizer is None:
            return
        lr = self.hparams.optimizer.get("lr")
        if lr is not None and not float(lr) > 0:
            raise ConfigError(f"optimizer.lr={lr} must be positive (1e-3 is a usual start).")
        try:
            optimizer = instantiate(self.hparams.optimizer)(params=[nn.Parameter(torch.zeros(1))])
            self._scheduler(optimizer, total_steps=10)
        except (ValueError, TypeError) as error:  # torch checks values: "Invalid learning rate: -1"
            raise bad_setting(error) from None

    def check_input_size(self) -> None:
        """Refuse an image size the backbone cannot take (a ViT's fixed size, a CNN's minimum)."""
        size = self.preprocessing.image_size
        training = self.backbone.training
        try:
            with torch.no_grad():
                self.backbone.eval()(torch.zeros(1, 3, size, size))
        except (RuntimeError, AssertionError, ValueError) as error:
            reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
            raise ConfigError(
                f"data.image_size={size} does not fit model.name={self.hparams.name} ({reason}); "
                "use data.image_size=null for the size its weights expect."
            ) from None
        finally:
            self.backbone.train(training)

    @property
    def class_names(self) -> list[str]:
        return list(self.hparams.class_names)

    @property
    def backbone_frozen(self) -> bool:
        return not any(p.requires_grad for p in self.backbone.parameters())

    @property
    def validation_precision(self) -> str:
        """The precision validation runs the backbone in: `frozen_dtype` while it is frozen."""
        dtype = self.frozen_dtype if self.backbone_frozen else torch.float32
        return next(name for name, d in PRECISIONS.items() if d == dtype)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Record what eval needs to find the data again and reproduce the logged metrics, and
        what a resumed run must carry on: the random number generators, the curves and the
        metric states that span steps (the best val/acc so far, this epoch's train metrics)."""
        checkpoint[RECORD_KEY] = {
            **self.run_record,
            "data": self.data_config,
            "precision": self.validation_precision,
        }
        checkpoint["rng_states"] = rng_states()
        checkpoint["history"] = self.history
        checkpoint["metric_states"] = {
            name: {k: v.detach().cpu() for k, v in metric.metric_state.items()}
            for name, metric in self._running_metrics().items()
        }

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Resuming training: carry on the random draws, the curves and the best val/acc (not
        when validating). This epoch's train metrics wait for `on_train_start`."""
        if self._trainer is None or self.trainer.state.fn != TrainerFn.FITTING:
            return
        if "rng_states" in checkpoint:
            set_rng_states(checkpoint["rng_states"])
        self.history = checkpoint.get("history", self.history)
        self._resumed_metric_states = checkpoint.get("metric_states", {})
        self._restore_metric_states(("val_acc_best",))

    def _running_metrics(self) -> dict[str, Metric]:
        """The metrics whose state outlives a step: the best val/acc, and the train metrics that
        accumulate over an epoch (val and test run whole within one step of training)."""
        metrics = {"val_acc_best": self.val_acc_best, "train_loss": self.train_loss}
        metrics.update({f"train_metrics.{k}": m for k, m in self.train_metrics.items(keep_base=True)})
        return metrics

    def _restore_metric_states(self, names: tuple[str, ...]) -> None:
        running = self._running_metrics()
        for name in names:
            for state, value in self._resumed_metric_states.get(name, {}).items():
                setattr(running[name], state, value.to(self.device))

    def on_train_start(self) -> None:
        """A run resumed inside an epoch carries on that epoch's train metrics; one resumed at
        an epoch's end starts the next epoch's afresh (Lightning then restarts no epoch).

        Under DDP the checkpoint holds rank 0's share only, so there the resumed epoch's train/*
        cover the batches after the resume (val/*, which decide the best checkpoint, are whole).
        """
        if self.trainer.fit_loop.epoch_loop.restarting and self.trainer.world_size == 1:
            self._restore_metric_states(tuple(n for n in self._running_metrics() if n.startswith("train")))
        self._resumed_metric_states = {}

    def train(self, mode: bool = True) -> TransferModule:
        """Frozen parts stay in eval mode whoever switches the model to training."""
        super().train(mode)
        if mode:
            hold_frozen_in_eval(self.backbone)
        return self

    def _run_backbone(self, images: torch.Tensor) -> torch.Tensor:
        if not self.hparams.get("compile"):
            return self.backbone(images)
        if "_compiled" not in self.__dict__:  # kept out of the module tree: no duplicate state dict
            self.__dict__["_compiled"] = torch.compile(self.backbone)
        return self.__dict__["_compiled"](images)

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """Backbone features; a frozen backbone runs without autograd, in `frozen_dtype`, and
        hands the head fp32."""
        if self.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        if self.backbone_frozen:
            return frozen_forward(self._run_backbone, images, self.frozen_dtype)
        return self._run_backbone(images)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(images))

    def _step(self, batch: tuple[torch.Tensor, torch.Tensor], stage: str) -> torch.Tensor:
        """`targets` are class indices, or class probabilities (B, C) after MixUp/CutMix."""
        inputs, targets = batch
        logits = self.head(inputs) if inputs.ndim == 2 else self(inputs)  # cached features or images
        loss = (self.train_criterion if stage == "train" else self.criterion)(logits, targets)
        if stage == "train" and not torch.isfinite(loss):
            lr = (self.hparams.optimizer or {}).get("lr")
            raise TrainingDiverged(
                f"The training loss became {loss.item()} at epoch {self.current_epoch}, step "
                f"{self.global_step}: training diverged. Lower the learning rate (optimizer.lr={lr}, "
                "try a tenth of it). "
                "checkpoints/last.ckpt, if any, is from before the fault."
            )
        labels = targets.argmax(dim=1) if targets.ndim == 2 else targets
        getattr(self, f"{stage}_metrics").update(logits, labels)
        getattr(self, f"{stage}_loss").update(loss.detach(), weight=len(targets))
        if stage == "val":
            self.val_confusion.update(logits.detach(), labels)
        return loss

    def _log_epoch(self, stage: str) -> dict[str, torch.Tensor]:
        """Every rank computes (torchmetrics syncs them) and logs the synced values as they are.

        Lightning's own `sync_dist` would reduce lazily, when a rank-0-only reader such as the
        progress bar asks, and deadlock the other ranks; hence no `sync_dist` anywhere.
        """
        metrics, loss = getattr(self, f"{stage}_metrics"), getattr(self, f"{stage}_loss")
        values = {f"{stage}/loss": loss.compute(), **metrics.compute()}
        metrics.reset()
        loss.reset()
        self.log_dict(values, prog_bar=stage != "test")
        if stage == "val":
            self.confusion = self.val_confusion.compute().cpu()
            self.val_confusion.reset()
        if (
            stage in self.history
            and self.trainer.state.fn == TrainerFn.FITTING
            and not self.trainer.sanity_checking
        ):
            self.history[stage].append({k: float(v) for k, v in values.items()})
        return values

    def training_step(self, batch, batch_idx: int) -> torch.Tensor:
        return self._step(batch, "train")

    def validation_step(self, batch, batch_idx: int) -> None:
        self._step(batch, "val")

    def test_step(self, batch, batch_idx: int) -> None:
        self._step(batch, "test")

    def on_train_epoch_end(self) -> None:
        self._log_epoch("train")

    def on_validation_epoch_end(self) -> None:
        values = self._log_epoch("val")
        if not self.trainer.sanity_checking:
            self.val_acc_best.update(values["val/acc"])
        self.log(
            "val/acc_best",
            self.val_acc_best.compute() if self.val_acc_best.update_called else values["val/acc"],
        )

    def on_test_epoch_end(self) -> None:
        self._log_epoch("test")

    def param_groups(
        self, select: Callable[[str, nn.Parameter], bool], head_lr: float | None = None
    ) -> list[dict[str, Any]]:
        """The selected parameters in named groups, head first: one per `lr_plan` entry, each
        split in two when weight decay is on, as decay is not applied to norms and biases
        (1-D tensors). `head_lr` sets each group's lr to head_lr x its `lr_scale`."""
        decay = float((self.hparams.optimizer or {}).get("weight_decay", 0.0) or 0.0)
        named = [(n, p) for n, p in self.named_parameters() if select(n, p)]
        named.sort(key=lambda item: not item[0].startswith("head."))
        groups: dict[str, dict[str, Any]] = {}
        for name, param in named:
            group, scale = self.lr_plan.get(name, ("head" if name.startswith("head.") else "backbone", 1.0))
            no_decay = decay > 0 and param.ndim <= 1
            key = group + ".no_decay" if no_decay else group
            if key not in groups:
                groups[key] = {"name": key, "params": [], "lr_scale": scale}
                groups[key].update({"weight_decay": 0.0} if no_decay else {})
                groups[key].update({"lr": head_lr * scale} if head_lr is not None else {})
            groups[key]["params"].append(param)
        return list(groups.values())

    def configure_optimizers(self) -> dict[str, Any]:
        if self.hparams.optimizer is None:
            raise ConfigError("No optimizer configured; choose one with optimizer=sgd or optimizer=adamw.")
        groups = self.param_groups(lambda name, param: param.requires_grad)
        if not groups:
            raise ConfigError("Nothing to train: every parameter is frozen.")
        try:
            optimizer = instantiate(self.hparams.optimizer)(params=groups)
            for group in optimizer.param_groups:
                group["lr"] *= group["lr_scale"]
            scheduler = self._scheduler(optimizer)
        except (ValueError, TypeError) as error:
            raise bad_setting(error) from None
        if scheduler is None:
            return {"optimizer": optimizer}
        return {"optimizer": optimizer, "lr_scheduler": scheduler}

    @property
    def metric_names(self) -> list[str]:
        """What this module logs per epoch, for a scheduler's (or a callback's) `monitor`."""
        names = [f"{stage}/loss" for stage in ("train", "val")] + ["val/acc_best"]
        names += [
            f"{stage}/{k}" for stage in ("train", "val") for k in self.train_metrics.keys(keep_base=True)
        ]
        return sorted(names)

    def _scheduler(self, optimizer: torch.optim.Optimizer, total_steps: int | None = None) -> dict | None:
        """Lightning's scheduler dict: the scheduler config's `monitor`, `interval` and
        `frequency` go to Lightning, the rest to the constructor. A scheduler that takes
        `total_steps` (one-cycle) is given the run's and steps per batch; others per epoch."""
        if not self.hparams.scheduler:
            return None
        arguments = dict(self.hparams.scheduler)
        keys = {k: arguments.pop(k) for k in SCHEDULER_KEYS if k in arguments}
        build = instantiate(arguments)
        if "total_steps" in inspect.signature(build.func).parameters:
            steps = total_steps if total_steps is not None else self.trainer.estimated_stepping_batches
            scheduler, interval = build(optimizer=optimizer, total_steps=steps), "step"
        else:
            scheduler, interval = build(optimizer=optimizer), "epoch"
        keys.setdefault("interval", interval)
        self._check_scheduler_keys(scheduler, keys)
        return {"scheduler": scheduler, **keys}

    def _check_scheduler_keys(self, scheduler: Any, keys: dict[str, Any]) -> None:
        monitor = keys.get("monitor")
        if isinstance(scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau) and monitor is None:
            raise ConfigError(
                "scheduler.monitor must name the metric ReduceLROnPlateau watches, e.g. "
                "+scheduler.monitor=val/loss (with mode: min) or val/acc (mode: max)."
            )
        if monitor is not None and monitor not in self.metric_names:
            raise ConfigError(
                f"scheduler.monitor={monitor} is not logged; use one of: {', '.join(self.metric_names)}."
            )
        if keys["interval"] not in ("epoch", "step"):
            raise ConfigError(f"scheduler.interval={keys['interval']} must be epoch or step.")
        frequency = keys.get("frequency", 1)
        if not isinstance(frequency, int) or frequency < 1:
            raise ConfigError(f"scheduler.frequency={frequency} must be a positive whole number.")
