"""The LightningModule: a pretrained backbone, a new head, the loss and the metrics it logs (the
optimizer is `transferkit.training.optim`'s; the state a resume goes on with, its callbacks')."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import lightning as L
import torch
from lightning.pytorch.trainer.states import TrainerFn
from torch import nn
from torchmetrics import MaxMetric, MeanMetric
from torchmetrics.classification import MulticlassConfusionMatrix

from transferkit.backbones import build_backbone
from transferkit.backbones.reference import RECORD_ENTRY, BackboneReference, put_back
from transferkit.errors import ConfigError, TrainingDiverged
from transferkit.features.precision import frozen_forward, precision_name
from transferkit.model.decisions import DEFAULT_THRESHOLD, decide
from transferkit.model.heads import build_head
from transferkit.model.history import EpochHistory
from transferkit.model.metrics import RunningMetrics, classification_metrics, multilabel_train_metrics
from transferkit.model.multilabel import ScoresAndTargets, multilabel_scores, tune_thresholds
from transferkit.training.finetune import hold_frozen_in_eval
from transferkit.training.optim import check_settings, configure_optimizers, param_groups, weight_decay
from transferkit.training.rng import RandomState

RECORD_KEY = "transferkit"  # the checkpoint entry with what the run records beside the model


class TransferModule(L.LightningModule):
    """Backbone + head. Every hyper-parameter is plain data, so a checkpoint rebuilds the model
    alone: the class names and the resolved preprocessing are among them. `optimizer` and
    `scheduler` are Hydra configs (`_partial_: true`; see `configure_optimizers`).
    `class_weights` weight the training loss only, so val and test losses stay comparable.

    `multilabel`: an image may have any number of the classes. The head's outputs are then
    independent sigmoids trained with BCEWithLogitsLoss (`class_weights` are its `pos_weight`),
    each class has a decision threshold (the `thresholds` buffer, tuned on val at every
    validation of the fit, so each checkpoint carries those of its epoch), and the metrics are
    mean average precision (`val/map`, what the best checkpoint is chosen by), AUROC and F1.

    The last four arguments are what the run records beside the model, in its checkpoints'
    `transferkit` entry: `data_config` (where eval finds the data again), `seed`, `finetune`
    (the strategy's config) and `frozen_dtype` (what the frozen backbone computes in: fp32 in a
    run that trains blocks of it, `features.precision.run_precision`).
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
        data_config: dict[str, Any] | None = None,
        seed: int | None = None,
        finetune: dict[str, Any] | None = None,
        frozen_dtype: torch.dtype = torch.float32,
        multilabel: bool = False,
    ) -> None:
        super().__init__()
        if len(class_names) < 2:
            raise ConfigError(f"A classifier needs at least 2 classes; the data has {len(class_names)}.")
        if not 0.0 <= label_smoothing < 1.0:
            raise ConfigError(f"model.label_smoothing={label_smoothing} must lie in [0, 1).")
        backbone = build_backbone(name, weights)
        self.preprocessing = backbone.preprocessing.with_overrides(**(preprocessing or {}))
        preprocessing = self.preprocessing.to_dict()  # saved resolved: checkpoints and loggers see it
        self.save_hyperparameters(ignore=["data_config", "seed", "finetune", "frozen_dtype"])
        self.backbone = backbone.model
        # channels_last: convolutions run markedly faster in it on CPUs and tensor cores alike
        self.channels_last = any(isinstance(m, nn.Conv2d) for m in self.backbone.modules())
        if self.channels_last:
            self.backbone.to(memory_format=torch.channels_last)
        self.frozen_dtype = frozen_dtype
        self.data_config = data_config
        recorded = {"seed": seed, "finetune": finetune}  # and `augment`, known as the fit starts
        self.run_record: dict[str, Any] = {k: v for k, v in recorded.items() if v is not None}
        self.backbone_reference: BackboneReference | None = None  # see keep_backbone_by_reference
        # parameter name -> (param group, lr scale): the fine-tuning strategy's plan, handed over
        # as it freezes the model (`BlockFinetuning.freeze_before_training`); empty: head, backbone
        self.lr_plan: dict[str, tuple[str, float]] = {}
        self.head = build_head(backbone.num_features, len(class_names), **(head or {}))
        num_classes = len(class_names)
        weight = torch.tensor(class_weights, dtype=torch.float32) if class_weights else None
        if weight is not None and len(weight) != num_classes:
            raise ConfigError(f"{len(weight)} class weights for {num_classes} classes.")
        if multilabel:
            self.criterion = nn.BCEWithLogitsLoss()
            self.train_criterion = nn.BCEWithLogitsLoss(pos_weight=weight)
            self.register_buffer("thresholds", torch.full((num_classes,), DEFAULT_THRESHOLD))
            self.train_metrics = multilabel_train_metrics(num_classes, "train/")
            self.val_metrics, self.test_metrics = ScoresAndTargets(), ScoresAndTargets()
        else:
            self.criterion = nn.CrossEntropyLoss(label_smoothing=label_smoothing)
            self.train_criterion = nn.CrossEntropyLoss(weight=weight, label_smoothing=label_smoothing)
            self.train_metrics = classification_metrics(num_classes, "train/")
            self.val_metrics = classification_metrics(num_classes, "val/")
            self.test_metrics = classification_metrics(num_classes, "test/")
            self.val_confusion = MulticlassConfusionMatrix(num_classes)
        self.train_loss, self.val_loss, self.test_loss = MeanMetric(), MeanMetric(), MeanMetric()
        self.val_acc_best = MaxMetric()  # of the primary metric: val/acc, or val/map (multi-label)
        self.confusion: torch.Tensor | None = None  # of the last validation: the plots use it
        self._history = EpochHistory()
        self._state_callbacks = (self._history, RandomState(), RunningMetrics())  # configure_callbacks
        check_settings(optimizer, scheduler, self.metric_names)

    @property
    def class_names(self) -> list[str]:
        return list(self.hparams.class_names)

    @property
    def multilabel(self) -> bool:
        return bool(self.hparams.get("multilabel"))

    @property
    def primary_metric(self) -> str:
        """What the best checkpoint is chosen by and results.json reports first."""
        return "val/map" if self.multilabel else "val/acc"

    @property
    def history(self) -> dict[str, list[dict[str, float]]]:
        """This fit's metric values per epoch: `history["val"][3]` holds epoch 3's val/*."""
        return self._history.epochs

    @property
    def backbone_frozen(self) -> bool:
        return not any(p.requires_grad for p in self.backbone.parameters())

    def configure_callbacks(self) -> list[L.Callback]:
        """The callbacks that carry what a resumed fit goes on with: the curves so far, the random
        generators, the running metrics (attached once: Lightning logs each swap)."""
        return [c for c in self._state_callbacks if c not in self.trainer.callbacks]

    def on_fit_start(self) -> None:
        """Record the augmentation training gets (none on cached features of one view)."""
        datamodule = self.trainer.datamodule
        if hasattr(datamodule, "training_augment"):
            self.run_record["augment"] = datamodule.training_augment

    def keep_backbone_by_reference(self) -> None:
        """From now on checkpoints leave out the backbone tensors still equal to the named weights
        it was built with (none if it was not built from named weights); called as built."""
        self.backbone_reference = BackboneReference.of(self.hparams.name, self.hparams.weights, self.backbone)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Record what eval needs to find the data again and reproduce the logged metrics."""
        checkpoint[RECORD_KEY] = {
            **self.run_record,
            "data": self.data_config,
            "precision": precision_name(self.frozen_dtype),
        }
        if self.backbone_reference is not None:
            reference = self.backbone_reference.leave_out(checkpoint["state_dict"])
            checkpoint[RECORD_KEY].update({RECORD_ENTRY: reference} if reference else {})

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Put back the backbone tensors a checkpoint keeps by reference."""
        put_back(checkpoint.get(RECORD_KEY), checkpoint["state_dict"], self.backbone)

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

    def features(
        self, images: torch.Tensor, run: Callable[[torch.Tensor], Any] | None = None
    ) -> torch.Tensor:
        """Backbone features (or `run`'s: the top of a split backbone, on its prefix's
        activations); a frozen backbone runs without autograd, in `frozen_dtype`, and hands the
        head fp32. Images go through the frozen runtime first where the run has one
        (`use_frozen_runtime`): the whole backbone's, or its prefix's with the top after it."""
        frozen = self.__dict__.get("_frozen_runtime")
        if run is None and frozen is not None:
            session, split = frozen
            if split is None:
                return frozen_forward(session, images, self.frozen_dtype)
            images, run = frozen_forward(session, images, self.frozen_dtype), split
        run = run or self._run_backbone
        if self.channels_last and images.ndim == 4:
            images = images.contiguous(memory_format=torch.channels_last)
        if self.backbone_frozen:
            return frozen_forward(run, images, self.frozen_dtype)
        return run(images)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(images))

    def use_frozen_runtime(
        self,
        session: Callable[[torch.Tensor], torch.Tensor] | None,
        split: Callable[[torch.Tensor], Any] | None,
    ) -> None:
        """Run the part of the backbone frozen for the whole run on `session` (an onnxruntime
        export of it: `transferkit.runtime`): the whole backbone (`split` None), or the prefix of
        `split`, whose top then runs in PyTorch. None: all in PyTorch. Kept out of the module
        tree, so the state dict is unchanged."""
        self.__dict__["_frozen_runtime"] = None if session is None else (session, split)

    @property
    def frozen_runtime(self) -> Callable[[torch.Tensor], torch.Tensor] | None:
        """The session the frozen part runs on (its `name` says which runtime), or None: PyTorch."""
        frozen = self.__dict__.get("_frozen_runtime")
        return None if frozen is None else frozen[0]

    def use_prefix(self, split: Callable[[torch.Tensor], Any] | None) -> None:
        """Train and evaluate on cached activations of the backbone's frozen prefix: `split` runs
        the top on them (None: on images or features). Kept out of the module tree, so the state
        dict is unchanged; `forward` always takes images."""
        self.__dict__["_prefix_split"] = split

    def logits(self, inputs: torch.Tensor) -> torch.Tensor:
        """The head's output for what the loaders serve: images, cached features (N, D), or
        cached prefix activations after `use_prefix`."""
        split = self.__dict__.get("_prefix_split")
        if split is not None:
            return self.head(self.features(inputs, split))
        return self.head(inputs) if inputs.ndim == 2 else self(inputs)

    def _step(self, batch: tuple[torch.Tensor, torch.Tensor], stage: str) -> torch.Tensor:
        """`inputs` are images, cached features (N, D), or cached prefix activations after
        `use_prefix`; `targets` class indices, class probabilities (B, C) after MixUp/CutMix, or
        with multi-label data 0/1 per class (B, C)."""
        inputs, targets = batch
        logits = self.logits(inputs)
        if self.multilabel:
            targets = targets.float()
            smoothing = self.hparams.label_smoothing
            loss_targets = targets * (1 - smoothing) + smoothing / 2 if stage == "train" else targets
        else:
            loss_targets = targets
        loss = (self.train_criterion if stage == "train" else self.criterion)(logits, loss_targets)
        if stage == "train" and not torch.isfinite(loss):
            lr = (self.hparams.optimizer or {}).get("lr")
            raise TrainingDiverged(
                f"The training loss became {loss.item()} at epoch {self.current_epoch}, step "
                f"{self.global_step}: training diverged. Lower the learning rate (optimizer.lr={lr}, "
                "try a tenth of it). checkpoints/last.ckpt, if any, is from before the fault."
            )
        getattr(self, f"{stage}_loss").update(loss.detach(), weight=len(targets))
        if self.multilabel:
            probs = logits.detach().float().sigmoid()
            if stage == "train":  # F1 at the thresholds of the last validation
                self.train_metrics.update(decide(probs, self.thresholds), targets.long())
            else:
                getattr(self, f"{stage}_metrics").update(probs, targets)
            return loss
        labels = targets.argmax(dim=1) if targets.ndim == 2 else targets
        getattr(self, f"{stage}_metrics").update(logits, labels)
        if stage == "val":
            self.val_confusion.update(logits.detach(), labels)
        return loss

    def _log_epoch(self, stage: str) -> dict[str, torch.Tensor]:
        """Every rank computes (torchmetrics syncs them) and logs the synced values as they are.

        Lightning's own `sync_dist` would reduce lazily, when a rank-0-only reader such as the
        progress bar asks, and deadlock the other ranks; hence no `sync_dist` anywhere.
        """
        metrics, loss = getattr(self, f"{stage}_metrics"), getattr(self, f"{stage}_loss")
        if self.multilabel and stage != "train":
            values = {f"{stage}/loss": loss.compute(), **self._multilabel_values(stage)}
        else:
            values = {f"{stage}/loss": loss.compute(), **metrics.compute()}
        metrics.reset()
        loss.reset()
        self.log_dict(values, prog_bar=stage != "test")
        if stage == "val" and not self.multilabel:
            self.confusion = self.val_confusion.compute().cpu()
            self.val_confusion.reset()
        self._history.record(self.trainer, stage, values)
        return values

    def _multilabel_values(self, stage: str) -> dict[str, torch.Tensor]:
        """The epoch's multi-label metrics; a validation of the fit first tunes the thresholds on
        its images (every rank alike: the scores are gathered from all), so the checkpoint of
        this epoch carries them. F1 on val is therefore at thresholds fitted to val (optimistic);
        test's F1 is at val's thresholds."""
        probs, targets = getattr(self, f"{stage}_metrics").compute()
        fitting = self.trainer.state.fn == TrainerFn.FITTING and not self.trainer.sanity_checking
        if stage == "val" and fitting:
            self.thresholds.copy_(tune_thresholds(probs, targets))
        scores = multilabel_scores(probs, targets, self.thresholds.cpu(), prefix=f"{stage}/")
        return {k: v.to(self.device) for k, v in scores.items()}

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
        primary = values[self.primary_metric]
        if not self.trainer.sanity_checking:
            self.val_acc_best.update(primary)
        self.log(
            f"{self.primary_metric}_best",
            self.val_acc_best.compute() if self.val_acc_best.update_called else primary,
        )

    def on_test_epoch_end(self) -> None:
        self._log_epoch("test")

    def configure_optimizers(self) -> dict[str, Any]:
        """The optimizer over the parameters that train now, in the param groups of `lr_plan`
        (the fine-tuning strategy's; without one: "head" and "backbone")."""
        trainable = [(name, p) for name, p in self.named_parameters() if p.requires_grad]
        groups = param_groups(trainable, self.lr_plan, weight_decay(self.hparams.optimizer))
        return configure_optimizers(
            self.hparams.optimizer,
            self.hparams.scheduler,
            groups,
            total_steps=lambda: self.trainer.estimated_stepping_batches,
            metric_names=self.metric_names,
        )

    @property
    def metric_names(self) -> list[str]:
        """What this module logs per epoch, for a scheduler's (or a callback's) `monitor`."""
        names = [f"{stage}/loss" for stage in ("train", "val")] + [f"{self.primary_metric}_best"]
        names += [f"train/{k}" for k in self.train_metrics.keys(keep_base=True)]
        if self.multilabel:
            names += [f"val/{k}" for k in ("map", "auroc", "f1_micro", "f1_macro")]
        else:
            names += [f"val/{k}" for k in self.val_metrics.keys(keep_base=True)]
        return sorted(names)
