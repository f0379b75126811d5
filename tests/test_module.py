"""The LightningModule: the frozen-backbone contract, metrics, optimizer and checkpoints."""

from __future__ import annotations

import copy
from pathlib import Path

import lightning as L
import pytest
import torch
from conftest import TINY_MODEL
from helpers import SGD, fit, tiny
from torch import nn

from transferkit.errors import ConfigError
from transferkit.model.module import TransferModule
from transferkit.runs.checkpoints import load_model
from transferkit.training.finetune import Freeze


def test_frozen_backbone_is_bit_identical_after_real_optimizer_steps(tmp_path: Path) -> None:
    model = tiny()
    assert any(isinstance(m, nn.BatchNorm2d) for m in model.backbone.modules())
    backbone_before = copy.deepcopy(model.backbone.state_dict())  # weights and BN buffers
    head_before = copy.deepcopy(model.head.state_dict())
    trainer = fit(model, tmp_path, callbacks=(Freeze(),))
    assert trainer.global_step == 6
    for name, tensor in model.backbone.state_dict().items():
        assert torch.equal(tensor, backbone_before[name]), f"{name} moved"
    assert not any(torch.equal(t, head_before[k]) for k, t in model.head.state_dict().items())
    assert all(not p.requires_grad for p in model.backbone.parameters())
    optimizer_params = {id(p) for group in trainer.optimizers[0].param_groups for p in group["params"]}
    assert optimizer_params == {id(p) for p in model.head.parameters()}


def test_no_backbone_module_trains_during_fit(tmp_path: Path) -> None:
    """Frozen BatchNorm must normalise with its running statistics, not the batch's."""
    modes = []

    class Spy(L.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            modes.append(any(m.training for m in pl_module.backbone.modules()))

    model = tiny()
    fit(model, tmp_path, callbacks=(Freeze(), Spy()))
    assert modes and not any(modes)
    x = torch.randn(4, 3, 32, 32) * 3
    model.train()
    train_mode = model.features(x)
    model.eval()
    torch.testing.assert_close(train_mode, model.features(x), rtol=0, atol=0)


def test_train_mode_never_wakes_the_frozen_backbone(tmp_path: Path) -> None:
    model = tiny()
    fit(model, tmp_path, callbacks=(Freeze(),), epochs=1)
    model.train()
    assert model.training and model.head.training
    assert not any(m.training for m in model.backbone.modules())
    stats = copy.deepcopy(model.backbone.state_dict())
    model(torch.randn(4, 3, 32, 32) * 5)  # a forward in "training" mode
    assert all(torch.equal(t, stats[k]) for k, t in model.backbone.state_dict().items())


def test_frozen_backbone_runs_without_autograd() -> None:
    model = tiny()
    Freeze().freeze_before_training(model)
    features = model.features(torch.randn(2, 3, 32, 32))
    assert not features.requires_grad and features.grad_fn is None
    assert model(torch.randn(2, 3, 32, 32)).requires_grad  # the head still learns


def test_metrics_and_lr_schedule_are_logged_with_contract_names(tmp_path: Path) -> None:
    trainer = fit(tiny(), tmp_path, callbacks=(Freeze(),), epochs=2)
    logged = set(trainer.callback_metrics)
    assert {"train/loss", "train/acc", "train/f1", "val/loss", "val/acc", "val/f1", "val/acc_best"} <= logged
    assert "val/acc_top5" not in logged  # only with 5 or more classes
    assert trainer.optimizers[0].param_groups[0]["lr"] == pytest.approx(0.1 * 0.5**2)


def test_top5_accuracy_appears_with_five_classes() -> None:
    model = TransferModule(TINY_MODEL, list("abcde"), weights=None)
    assert "val/acc_top5" in model.val_metrics.keys(keep_base=False)


def test_val_acc_best_is_the_running_maximum(tmp_path: Path) -> None:
    L.seed_everything(0)  # an initial head whose sanity-check score beats every trained epoch
    model = tiny()
    seen = []

    class Record(L.Callback):
        def on_validation_end(self, trainer, pl_module):
            seen.append(
                (float(trainer.callback_metrics["val/acc"]), float(trainer.callback_metrics["val/acc_best"]))
            )

    fit(model, tmp_path, callbacks=(Freeze(), Record()), epochs=3, num_sanity_val_steps=2)  # sanity check on
    assert len(seen) == 4
    sanity, fitted = seen[0], seen[1:]
    for i, (_, best) in enumerate(fitted):
        assert best == pytest.approx(max(acc for acc, _ in fitted[: i + 1]))  # the sanity check never counts
    assert sanity[0] > max(best for _, best in fitted)  # (here it scored higher than any epoch)


def test_checkpoint_rebuilds_the_model_alone(tmp_path: Path) -> None:
    model = tiny(preprocessing={"image_size": 40, "mean": [0.1, 0.2, 0.3]})
    trainer = fit(model, tmp_path, callbacks=(Freeze(),), epochs=1)
    path = tmp_path / "model.ckpt"
    trainer.save_checkpoint(path)
    restored = load_model(path)
    assert restored.class_names == ["a", "b", "c"]
    assert restored.preprocessing == model.preprocessing
    assert restored.preprocessing.image_size == 40 and restored.preprocessing.mean == (0.1, 0.2, 0.3)
    x = torch.randn(2, 3, 40, 40)
    model.eval()
    restored.eval()
    with torch.no_grad():
        torch.testing.assert_close(restored(x), model(x), rtol=0, atol=0)


@pytest.mark.slow  # about a second or more
def test_weights_are_not_fetched_again_when_a_checkpoint_is_loaded(tmp_path: Path) -> None:
    model = TransferModule("resnet18", ["a", "b"], weights=None, optimizer=SGD)
    path = tmp_path / "m.ckpt"
    torch.save(
        {
            "state_dict": model.state_dict(),
            "hyper_parameters": {**model.hparams, "weights": "DEFAULT"},
            "pytorch-lightning_version": L.__version__,
        },
        path,
    )
    restored = load_model(path)  # DEFAULT would need the network here
    assert torch.equal(restored.backbone.conv1.weight, model.backbone.conv1.weight)


def test_bad_module_values_are_refused() -> None:
    with pytest.raises(ConfigError, match="at least 2 classes"):
        TransferModule(TINY_MODEL, ["only"], weights=None)
    with pytest.raises(ConfigError, match="label_smoothing"):
        TransferModule(TINY_MODEL, ["a", "b"], weights=None, label_smoothing=1.5)
    with pytest.raises(ConfigError, match="dropout"):
        TransferModule(TINY_MODEL, ["a", "b"], weights=None, head={"dropout": 1.0})


def test_mlp_head_with_dropout() -> None:
    model = TransferModule(TINY_MODEL, ["a", "b"], weights=None, head={"hidden_dim": 16, "dropout": 0.2})
    kinds = [type(m).__name__ for m in model.head]
    assert kinds == ["Dropout", "Linear", "ReLU", "Dropout", "Linear"]
    assert model.head[1].out_features == 16 and model.head[-1].out_features == 2


def test_metrics_stay_separate_when_the_first_batch_makes_their_states_equal() -> None:
    """A first validation batch of one class, all wrong, once made torchmetrics compute macro F1
    from the top-5 accuracy's state; each metric must match its standalone value."""
    from torchmetrics.classification import MulticlassAccuracy, MulticlassF1Score

    from transferkit.model.module import classification_metrics

    collection = classification_metrics(10, "val/")
    alone = {
        "val/acc": MulticlassAccuracy(10, average="micro"),
        "val/f1": MulticlassF1Score(10, average="macro"),
        "val/acc_top5": MulticlassAccuracy(10, top_k=5, average="micro"),
    }
    wrong = torch.zeros(32, 10)
    wrong[:, 3] = 1
    batches = [(wrong, torch.zeros(32, dtype=torch.long))]
    g = torch.Generator().manual_seed(0)
    for _ in range(4):
        y = torch.randint(0, 10, (32,), generator=g)
        x = torch.randn(32, 10, generator=g)
        x[torch.arange(32), y] += 2
        batches.append((x, y))
    for x, y in batches:
        collection.update(x, y)
        for metric in alone.values():
            metric.update(x, y)
    computed = collection.compute()
    for name, metric in alone.items():
        assert computed[name] == pytest.approx(metric.compute().item()), name
