"""The training recipe through the train task, as a user composes it from the command line."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import lightning as L
import pytest
import torch
from conftest import make_image_folder, tiny_run

from transferkit.errors import ConfigError
from transferkit.runs.checkpoints import load_model
from transferkit.tasks.train import train
from transferkit.training import lr_finder


def lr_columns(run: Path) -> dict[str, list[float]]:
    """The LearningRateMonitor's columns of metrics.csv, one value per logged step."""
    with open(run / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    columns = {k for r in rows for k, v in r.items() if k.startswith("lr-") and v}
    return {c: [float(r[c]) for r in rows if r.get(c)] for c in sorted(columns)}


@pytest.mark.slow
@pytest.mark.parametrize(
    ("strategy", "groups", "ratio"),
    [
        ("finetune=freeze", ["lr-SGD/head"], None),
        ("finetune=partial", ["lr-SGD/backbone.stage5", "lr-SGD/head"], 0.3),
        (
            "finetune=full",
            [f"lr-SGD/backbone.{b}" for b in ("stage1", "stage2", "stage3", "stage4", "stage5", "stem")]
            + ["lr-SGD/head"],
            0.1,
        ),
    ],
)
def test_each_strategy_trains_its_groups_and_logs_their_lr(
    compose_train, tmp_path: Path, tiny_overrides: list[str], strategy: str, groups: list[str], ratio
) -> None:
    """Backbone groups at the strategy's default ratio to the head: 0.3 for partial (one top
    block), 0.1 for full."""
    cfg = compose_train(
        tmp_path, [*tiny_overrides, strategy, "scheduler=cosine", "scheduler.warmup_epochs=1"]
    )
    results = train(cfg)
    columns = lr_columns(Path(cfg.paths.output_dir))
    assert sorted(columns) == sorted(groups)
    head = columns["lr-SGD/head"]
    assert head[0] == pytest.approx(0.05 * 0.1)  # warmup starts at warmup_start_factor x lr
    for name, values in columns.items():
        if name != "lr-SGD/head":
            assert values == pytest.approx([h * ratio for h in head])
    assert results["epochs"] == 2


@pytest.mark.slow
def test_gradual_through_the_task_adds_the_backbone_at_its_epoch(
    compose_train, tmp_path: Path, tiny_overrides: list[str]
) -> None:
    cfg = compose_train(tmp_path, [*tiny_overrides, "finetune=gradual", "finetune.milestones=[1]"])
    train(cfg)
    columns = lr_columns(Path(cfg.paths.output_dir))
    assert len(columns["lr-SGD/head"]) == 2 and len(columns["lr-SGD/backbone.stage5"]) == 1
    assert columns["lr-SGD/backbone.stage5"][0] == pytest.approx(columns["lr-SGD/head"][1] * 0.3)


@pytest.mark.slow
def test_onecycle_steps_every_batch(compose_train, tmp_path: Path, tiny_overrides: list[str]) -> None:
    cfg = compose_train(
        tmp_path,
        [
            *tiny_overrides,
            "scheduler=onecycle",
            "callbacks.lr_monitor.logging_interval=step",
            "trainer.log_every_n_steps=1",
        ],
    )
    train(cfg)
    head = lr_columns(Path(cfg.paths.output_dir))["lr-SGD/head"]
    assert len(head) >= 6 and len(set(head)) == len(head)  # a new lr at every batch
    assert head[0] == pytest.approx(0.05 / 25) and max(head) == pytest.approx(0.05, rel=0.1)
    assert head[-1] < head[0]


@pytest.mark.slow
def test_plateau_watches_its_monitor_and_unfrozen_blocks_follow_it(
    compose_train, tmp_path: Path, tiny_overrides: list[str]
) -> None:
    """val/acc_best never falls, so in mode min it never improves: with patience 0 the lr drops
    tenfold after every epoch but the first, the block unfrozen at epoch 1 with it."""
    overrides = [
        *tiny_overrides, "trainer.max_epochs=3", "finetune=gradual", "finetune.milestones=[1]",
        "scheduler=plateau", "scheduler.monitor=val/acc_best", "scheduler.patience=0",
    ]  # fmt: skip
    cfg = compose_train(tmp_path, overrides)
    train(cfg)
    columns = lr_columns(Path(cfg.paths.output_dir))
    assert columns["lr-SGD/head"] == pytest.approx([0.05, 0.05, 0.005])
    assert columns["lr-SGD/backbone.stage5"] == pytest.approx([0.015, 0.0015])


@pytest.mark.slow
def test_class_weights_follow_the_training_counts(compose_train, tmp_path: Path) -> None:
    root = make_image_folder(tmp_path / "d", splits={"train": 4, "val": 2}, size=32)
    for extra in range(4):  # circle: 8 images, square and triangle: 4
        src = next((root / "train" / "circle").iterdir())
        (root / "train" / "circle" / f"extra{extra}.png").write_bytes(src.read_bytes())
    cfg = compose_train(
        tmp_path,
        [*tiny_run(root, epochs=1), "data.balance=weights"],
    )
    results = train(cfg)
    model = load_model(results["best_model_path"])
    expected = torch.tensor([16 / (3 * 8), 16 / (3 * 4), 16 / (3 * 4)])
    assert torch.allclose(model.train_criterion.weight, expected)
    assert model.criterion.weight is None  # val and test losses stay unweighted


BATCHES: list[tuple[torch.Tensor, torch.Tensor]] = []  # what TrainingBatches saw, images and targets


class TrainingBatches(L.Callback):
    """Keeps every training batch as the model receives it (after MixUp/CutMix)."""

    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch, batch_idx: int
    ) -> None:
        BATCHES.append((batch[0].detach().clone(), batch[1].detach().clone()))


@pytest.mark.slow
def test_mixup_with_full_fine_tuning_trains_on_mixed_batches(
    compose_train, tmp_path: Path, tiny_overrides: list[str]
) -> None:
    """Every batch the model trains on is mixed: soft targets (B, C) that sum to 1, most rows
    not one-hot; and the whole backbone trains (uncached: mixing needs images)."""
    BATCHES.clear()
    cfg = compose_train(
        tmp_path,
        [
            *tiny_overrides, "finetune=full", "data.mixup_alpha=0.4", "data.cutmix_alpha=1.0",
            "+callbacks.batches._target_=test_recipe.TrainingBatches",
        ],
    )  # fmt: skip
    results = train(cfg)
    assert results["epochs"] == 2 and results["feature_cache"] is None and BATCHES
    for images, targets in BATCHES:
        assert images.ndim == 4 and targets.ndim == 2 and targets.shape[1] == 3
        assert torch.allclose(targets.sum(1), torch.ones(len(targets)))
    mixed = torch.cat([(targets.max(1).values < 1).float() for _, targets in BATCHES])
    assert mixed.mean() > 0.5


@pytest.mark.slow
def test_tune_lr_trains_at_the_suggestion_and_keeps_the_plot(
    compose_train, tmp_path: Path, tiny_overrides: list[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The lr applied is the one trained at, logged and saved. The tiny run's curve never falls
    (tests/test_lr_finder.py reads curves): its valley is set here, at the 13th of 20 points."""
    monkeypatch.setattr(lr_finder, "find_valley", lambda losses, min_drop: lr_finder.Valley(2, 15, 12))
    cfg = compose_train(
        tmp_path, [*tiny_overrides, "tune_lr=true", "lr_finder.num_training=20", "finetune=partial"]
    )
    results = train(cfg)
    run = Path(cfg.paths.output_dir)
    found = json.loads((run / "lr_find.json").read_text())
    assert (run / "lr_find.png").stat().st_size > 1000
    assert len(found["lr"]) == len(found["loss"]) == 20
    suggestion = found["suggestion"]
    assert suggestion == found["lr"][12] and found["valley"] == [found["lr"][2], found["lr"][15]]
    model = load_model(results["best_model_path"])
    assert model.hparams.optimizer["lr"] == pytest.approx(suggestion)
    columns = lr_columns(run)
    assert columns["lr-SGD/head"][0] == pytest.approx(suggestion)
    assert columns["lr-SGD/backbone.stage5"][0] == pytest.approx(suggestion * 0.3)
    assert not any(Path(cfg.paths.output_dir).glob(".lr_find*.ckpt"))


@pytest.mark.slow
@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("finetune.bn=sometimes", "finetune.bn='sometimes' is not a BatchNorm policy"),
        ("finetune=partial finetune.unfreeze_last=99", "has 6 blocks"),
        ("data.augment=heavy", "data.augment"),
        ("data.balance=oversample", "data.balance"),
        ("scheduler=cosine scheduler.warmup_epochs=5", "scheduler.warmup_epochs=5"),
        ("lr_finder.bogus=1 tune_lr=true", "lr_finder"),
        ("scheduler=plateau ~scheduler.monitor", "scheduler.monitor must name the metric"),
        ("scheduler=plateau scheduler.monitor=val/nothing", "scheduler.monitor=val/nothing is not logged"),
        ("+scheduler.interval=hour", "scheduler.interval=hour must be epoch or step"),
        ("+scheduler.frequency=0", "scheduler.frequency=0"),
    ],
)
def test_recipe_mistakes_are_config_errors(
    compose_train, tmp_path: Path, tiny_overrides: list[str], override: str, message: str
) -> None:
    extra = [o if "bogus" not in o else "+" + o for o in override.split()]
    cfg = compose_train(tmp_path, [*tiny_overrides, *extra])
    with pytest.raises(ConfigError, match=message.replace(".", r"\.").replace("(", r"\(")):
        train(cfg)
