"""Multi-label models: the metrics against hand-computed values, threshold tuning, the loss, and
what a fit logs and saves."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import TINY_MODEL, compose_task, make_label_file, tiny_run
from helpers import SGD, multilabel_loader, quiet_trainer
from lightning.pytorch.callbacks import ModelCheckpoint

from transferkit.model.module import TransferModule
from transferkit.model.multilabel import decide, multilabel_scores, per_class_measures, tune_thresholds
from transferkit.runs.checkpoints import load_model
from transferkit.tasks.eval import evaluate

# 4 images, 3 classes; class c has no positive image
PROBS = torch.tensor([[0.9, 0.2, 0.1], [0.3, 0.8, 0.2], [0.6, 0.4, 0.3], [0.2, 0.1, 0.7]])
TARGETS = torch.tensor([[1, 0, 0], [0, 1, 0], [1, 1, 0], [0, 0, 0]])


def test_metrics_at_half_match_hand_computed_values() -> None:
    half = torch.full((3,), 0.5)
    # decisions at 0.5: a {0, 2}, b {1}, c {3}
    measures = per_class_measures(PROBS, TARGETS, half)
    assert measures["precision"].tolist() == [1.0, 1.0, 0.0]
    assert measures["recall"].tolist() == [1.0, 0.5, 0.0]
    assert measures["f1"].tolist() == pytest.approx([1.0, 2 / 3, 0.0])
    assert measures["support"].tolist() == [2, 2, 0]
    assert measures["ap"][:2].tolist() == [1.0, 1.0] and measures["ap"][2].isnan()
    assert measures["auroc"][2].isnan()
    scores = multilabel_scores(PROBS, TARGETS, half, prefix="val/")
    # micro: tp 3, predicted 4, positives 4 -> 6/8; macro over a, b, c (c was predicted once)
    assert float(scores["val/f1_micro"]) == pytest.approx(0.75, abs=1e-6)
    assert float(scores["val/f1_macro"]) == pytest.approx((1 + 2 / 3 + 0) / 3, abs=1e-6)
    assert float(scores["val/map"]) == pytest.approx(1.0) and float(scores["val/auroc"]) == pytest.approx(1.0)


def test_average_precision_with_a_ranking_mistake() -> None:
    probs = torch.tensor([[0.9, 0.9], [0.8, 0.1], [0.7, 0.8], [0.1, 0.2]])
    targets = torch.tensor([[1, 1], [0, 0], [1, 1], [0, 0]])
    # a: positives ranked 1st and 3rd: AP = (1/1 + 2/3) / 2, AUROC 3 of 4 pairs ordered right;
    # b: ranked perfectly (AP 1, AUROC 1)
    scores = multilabel_scores(probs, targets, torch.tensor([0.5, 0.5]))
    assert float(scores["map"]) == pytest.approx((5 / 6 + 1) / 2, abs=1e-6)
    assert float(scores["auroc"]) == pytest.approx((0.75 + 1) / 2, abs=1e-6)


def test_tuned_thresholds_cut_halfway_between_scores_at_the_best_f1() -> None:
    thresholds = tune_thresholds(PROBS, TARGETS)
    # a: positives 0.9, 0.6 above every negative -> cut between 0.6 and 0.3;
    # b: positives 0.8, 0.4, negatives 0.2, 0.1 -> between 0.4 and 0.2; c: no positive -> 0.5
    assert thresholds.tolist() == pytest.approx([0.45, 0.3, 0.5])
    assert torch.equal(decide(PROBS, thresholds)[:, :2], TARGETS[:, :2])


def test_tuning_never_cuts_between_equal_scores() -> None:
    probs = torch.tensor([[0.7], [0.7], [0.2]])
    targets = torch.tensor([[1], [0], [0]])
    (threshold,) = tune_thresholds(probs, targets).tolist()
    assert threshold == pytest.approx(0.45)  # both 0.7s kept: F1 2/3 beats keeping none


def multilabel_model(**kwargs) -> TransferModule:
    torch.manual_seed(0)
    return TransferModule(TINY_MODEL, ["a", "b", "c"], weights=None, optimizer=SGD, multilabel=True, **kwargs)


def test_loss_is_bce_with_pos_weight_for_training_only() -> None:
    model = multilabel_model(class_weights=[1.0, 3.0, 0.5])
    logits, targets = torch.tensor([[0.2, -1.0, 2.0]]), torch.tensor([[1.0, 1.0, 0.0]])
    expected = torch.nn.functional.binary_cross_entropy_with_logits(
        logits, targets, pos_weight=torch.tensor([1.0, 3.0, 0.5])
    )
    assert torch.allclose(model.train_criterion(logits, targets), expected)
    unweighted = torch.nn.functional.binary_cross_entropy_with_logits(logits, targets)
    assert torch.allclose(model.criterion(logits, targets), unweighted)
    assert model.primary_metric == "val/map"
    assert model.thresholds.tolist() == [0.5, 0.5, 0.5]


def test_single_label_state_dict_has_no_thresholds() -> None:
    torch.manual_seed(0)
    single = TransferModule(TINY_MODEL, ["a", "b", "c"], weights=None, optimizer=SGD)
    assert "thresholds" not in single.state_dict() and not single.multilabel
    assert single.primary_metric == "val/acc"


@pytest.mark.slow
def test_fit_tunes_thresholds_on_val_and_the_best_checkpoint_carries_them(tmp_path: Path) -> None:
    model = multilabel_model()
    checkpoint = ModelCheckpoint(dirpath=tmp_path, filename="best", monitor="val/map", mode="max")
    trainer = quiet_trainer(tmp_path, callbacks=[checkpoint], num_sanity_val_steps=2)
    val = multilabel_loader(16, seed=1)
    trainer.fit(model, multilabel_loader(32, seed=0), val)
    logged = trainer.callback_metrics
    assert {"val/map", "val/auroc", "val/f1_micro", "val/f1_macro", "val/map_best", "train/f1_micro"} <= set(
        logged
    )
    assert "val/acc" not in logged
    # the thresholds are val's best-F1 cuts for the final weights
    model.eval()
    with torch.no_grad():
        probs = torch.cat([model(x).sigmoid() for x, _ in val])
    targets = torch.cat([y for _, y in val])
    assert torch.allclose(model.thresholds, tune_thresholds(probs, targets), atol=1e-6)
    assert not torch.equal(model.thresholds, torch.full((3,), 0.5))
    expected = multilabel_scores(probs, targets, model.thresholds, prefix="val/")
    for key, value in expected.items():
        assert float(logged[key]) == pytest.approx(float(value), abs=1e-5), key
    best = load_model(checkpoint.best_model_path)
    saved = torch.load(checkpoint.best_model_path, weights_only=True)["state_dict"]["thresholds"]
    assert best.multilabel and torch.equal(best.thresholds, saved)


def label_file_run(data: Path, labels: Path, epochs: int) -> list[str]:
    return [
        *(o for o in tiny_run(None, epochs=epochs) if o != "data=imagefolder"),
        f"features.dir={data.parent}/cache",
        "data=csv",
        f"data.root={data}",
        f"data.labels={labels}",
        "data.multilabel=true",
    ]


def test_the_run_is_judged_by_val_map_with_multilabel_data(compose_train, tmp_path: Path) -> None:
    import transferkit.runs.directories  # noqa: F401 - registers the config's resolvers, as every task does

    cfg = compose_train(tmp_path, ["data.multilabel=true"])
    assert cfg.monitor == cfg.optimized_metric == cfg.callbacks.model_checkpoint.monitor == "val/map"
    cfg = compose_train(tmp_path, ["callbacks=early_stopping"])
    assert cfg.monitor == cfg.callbacks.early_stopping.monitor == "val/acc"


@pytest.mark.slow
def test_a_multilabel_run_on_a_label_file_reruns_from_its_cache_and_resumes_to_the_same_numbers(
    compose_train, tmp_path: Path
) -> None:
    """Trained 3 epochs at once, then again as 2 epochs resumed to 3: the same val/map, the
    same thresholds in best.ckpt; the second run reads the first one's feature cache."""
    from transferkit.tasks.train import train

    data = tmp_path / "data"
    labels = make_label_file(data, multilabel=True, splits={"train": 8, "val": 4, "test": 4})
    whole = train(compose_train(tmp_path / "whole", label_file_run(data, labels, epochs=3)))
    assert list(whole)[0] == "val/map"
    assert {"val/map", "val/auroc", "val/f1_micro", "val/f1_macro", "test/map", "test/f1_micro"} <= set(whole)
    assert "val/acc" not in whole and whole["class_names"] == ["circle", "square", "triangle"]
    assert whole["feature_cache"] is not None

    parted = tmp_path / "parted"
    first = train(compose_train(parted, label_file_run(data, labels, epochs=2)))
    assert first["feature_cache"] == whole["feature_cache"]  # the labels rows are part of the key
    resumed = train(compose_train(parted, [*label_file_run(data, labels, epochs=3), "ckpt_path=last"]))
    for key in ("val/map", "val/f1_micro", "test/map", "test/f1_macro", "val/loss"):
        assert resumed[key] == pytest.approx(whole[key], abs=1e-6), key
    thresholds = [
        torch.load(run["best_model_path"], weights_only=True)["state_dict"]["thresholds"]
        for run in (whole, resumed)
    ]
    assert torch.allclose(*thresholds, atol=1e-6)
    model = load_model(whole["best_model_path"])
    assert model.multilabel and model.data_config["labels"] == str(labels.resolve())
    # eval.py finds the label file from the checkpoint alone and measures what training did
    for split in ("val", "test"):
        measured = evaluate(
            compose_task(
                "eval",
                tmp_path / f"eval_{split}",
                [f"ckpt_path={whole['best_model_path']}", f"split={split}"],
            )
        )
        for metric in ("map", "auroc", "f1_micro", "f1_macro", "loss"):
            key = f"{split}/{metric}"
            assert measured[key] == pytest.approx(whole[key], abs=1e-4), key
