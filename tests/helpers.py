"""Test helpers that need torch and Lightning: the tiny model fitted on random pictures without
the tasks, and a callback that signals the process mid-epoch."""

from __future__ import annotations

import csv
import os
import signal
from pathlib import Path

import lightning as L
import torch
from conftest import TINY_MODEL, compose_task
from lightning.pytorch.callbacks import ModelCheckpoint
from torch.utils.data import DataLoader, TensorDataset

from transferkit.model.module import TransferModule

SGD = {"_target_": "torch.optim.SGD", "_partial_": True, "lr": 0.1, "momentum": 0.9}
STEPLR = {"_target_": "torch.optim.lr_scheduler.StepLR", "_partial_": True, "step_size": 1, "gamma": 0.5}


def random_loader(n: int = 24, size: int = 32, seed: int = 0, shuffle: bool = False) -> DataLoader:
    """`n` random 3-class pictures, far from BatchNorm's initial statistics."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3, size, size, generator=g) * 2 + 1
    y = torch.randint(0, 3, (n,), generator=g)
    return DataLoader(TensorDataset(x, y), batch_size=8, shuffle=shuffle)


def multilabel_loader(n: int = 16, size: int = 32, seed: int = 0) -> DataLoader:
    """`n` random pictures, each with any of 3 labels (0/1 per class)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3, size, size, generator=g) * 2 + 1
    y = (torch.rand(n, 3, generator=g) > 0.5).long()
    return DataLoader(TensorDataset(x, y), batch_size=8)


def quiet_trainer(
    root: Path, epochs: int = 2, callbacks: tuple[L.Callback, ...] | list[L.Callback] = (), **trainer_kwargs
) -> L.Trainer:
    """A short CPU Trainer with nothing to show: no logger, bar or summary, no sanity check
    unless asked, checkpoints only where a ModelCheckpoint is among the callbacks."""
    return L.Trainer(
        max_epochs=epochs,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=any(isinstance(c, ModelCheckpoint) for c in callbacks),
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=root,
        callbacks=list(callbacks),
        **{"num_sanity_val_steps": 0, **trainer_kwargs},
    )


def tiny(optimizer: dict = SGD, scheduler: dict | None = STEPLR, **kwargs) -> TransferModule:
    """The tiny model for classes a, b, c, with the same initial weights every call."""
    torch.manual_seed(0)
    return TransferModule(
        TINY_MODEL, ["a", "b", "c"], weights=None, optimizer=optimizer, scheduler=scheduler, **kwargs
    )


def fit(
    module: L.LightningModule,
    root: Path,
    callbacks: tuple[L.Callback, ...] | list[L.Callback] = (),
    epochs: int = 2,
    ckpt_path: str | None = None,
    **trainer_kwargs,
) -> L.Trainer:
    """A short, quiet CPU fit on random pictures (24 to train, 12 to validate) by `quiet_trainer`."""
    trainer = quiet_trainer(root, epochs, callbacks, **trainer_kwargs)
    trainer.fit(module, random_loader(), random_loader(12, seed=1), ckpt_path=ckpt_path)
    return trainer


class SendSignal(L.Callback):
    """Sends `signum` to this process as the training batch of `at_step` starts: what Ctrl-C, a
    scheduler's SIGTERM or SLURM's SIGUSR1 does mid-epoch. Also a config target for the tasks
    (`+callbacks.signal._target_=helpers.SendSignal +callbacks.signal.at_step=N`)."""

    def __init__(self, at_step: int, signum: int = signal.SIGUSR1) -> None:
        self.at_step, self.signum = at_step, signum

    def on_train_batch_start(self, trainer: L.Trainer, *args) -> None:
        if trainer.global_step == self.at_step:
            os.kill(os.getpid(), self.signum)


def val_accuracy(model: TransferModule, root: Path | str) -> tuple[float, int]:
    """(accuracy, images) of `model` on the images of root's val split, read as a user's images
    are (the checkpoint's own preprocessing, no cache): what a cached run's val/acc must equal."""
    from transferkit.data.datamodule import ImageFolderDataModule

    data = ImageFolderDataModule(root, batch_size=8, num_workers=0, augment=False)
    data.preprocessing = model.preprocessing
    correct = total = 0
    with torch.no_grad():
        for images, labels in data.val_dataloader():
            correct += int((model(images).argmax(1) == labels).sum())
            total += len(labels)
    return correct / total, total


def read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def predict_both(
    ckpt: str, onnx: str, inputs: Path, root: Path
) -> tuple[list[dict[str, str]], list[dict[str, str]]]:
    """predict.py's CSV rows for `inputs` from the checkpoint and from its exported model.onnx."""
    from transferkit.tasks.predict import predict

    rows = []
    for name, model in (("ckpt", ckpt), ("onnx", onnx)):
        output = root / f"{name}.csv"
        predict(
            compose_task(
                "predict", root / name, [f"ckpt_path={model}", f"input={inputs}", f"output={output}"]
            )
        )
        rows.append(read_csv(output))
    return rows[0], rows[1]
