"""eval.py: a checkpoint's metrics, equal to training's, and its reports, from the checkpoint alone."""

from __future__ import annotations

import csv
import json
import logging
import shutil
from pathlib import Path

import pytest
import torch
from conftest import EXPORTS, compose_task, main_exits, make_image_folder
from omegaconf import DictConfig
from PIL import Image

from transferkit.errors import ConfigError, DataError
from transferkit.runs.checkpoints import recorded_splits
from transferkit.tasks.eval import evaluate, main
from transferkit.tasks.train import train

SHARED = ("loss", "acc", "f1")


def compose_eval(root: Path, overrides: list[str]) -> DictConfig:
    """conf/eval.yaml with the session's shared exports: each checkpoint is exported once."""
    return compose_task("eval", root, [*overrides, f"runtime_dir={EXPORTS}"])


def read_rows(path: Path) -> list[list[str]]:
    with open(path, newline="") as f:
        return list(csv.reader(f))


@pytest.mark.slow
def test_eval_reproduces_the_training_metrics_and_writes_the_reports(
    trained_run: dict, tmp_path: Path
) -> None:
    results = evaluate(compose_eval(tmp_path, [f"ckpt_path={trained_run['best_model_path']}"]))
    assert results["split"] == "test"  # the data has test/: it is the default
    for name in SHARED:
        assert results[f"test/{name}"] == pytest.approx(trained_run[f"test/{name}"], abs=1e-4)
    run = tmp_path / "run"
    assert json.loads((run / "results.json").read_text()) == results
    assert results["images"] == 12 and results["data_root"] == trained_run["data_root"]

    matrix = read_rows(run / "confusion_matrix.csv")
    assert matrix[0][1:] == trained_run["class_names"]
    counts = [[int(c) for c in row[1:]] for row in matrix[1:]]
    assert [row[0] for row in matrix[1:]] == trained_run["class_names"]
    assert all(sum(row) == 4 for row in counts)  # 4 test images per class
    assert sum(counts[i][i] for i in range(3)) / 12 == pytest.approx(results["test/acc"])
    assert 12 - sum(counts[i][i] for i in range(3)) == results["misclassified"]

    with open(run / "per_class.csv", newline="") as f:
        report = list(csv.DictReader(f))
    assert [r["class"] for r in report] == [*trained_run["class_names"], "macro avg", "weighted avg"]
    assert [int(r["support"]) for r in report[:3]] == [4, 4, 4]
    assert float(report[3]["f1"]) == pytest.approx(results["test/f1"], abs=1e-4)
    for picture in ("confusion_matrix.png", "misclassified.png"):
        with Image.open(run / picture) as image:
            assert image.format == "PNG" and min(image.size) >= 200


@pytest.mark.slow
def test_eval_on_val_matches_training_val(trained_run: dict, tmp_path: Path) -> None:
    results = evaluate(compose_eval(tmp_path, [f"ckpt_path={trained_run['best_model_path']}", "split=val"]))
    for name in SHARED:
        assert results[f"val/{name}"] == pytest.approx(trained_run[f"val/{name}"], abs=1e-4)
    assert not any(key.startswith("test/") for key in results)


@pytest.mark.slow
def test_eval_matches_a_run_whose_backbone_trained(
    compose_train, tmp_path: Path, tiny_overrides: list[str]
) -> None:
    """No feature cache: validation ran the whole model on images, in training mode's sibling."""
    trained = train(compose_train(tmp_path / "t", [*tiny_overrides, "finetune=full"]))
    assert trained["feature_cache"] is None
    results = evaluate(compose_eval(tmp_path / "e", [f"ckpt_path={trained['best_model_path']}", "split=val"]))
    for name in SHARED:
        assert results[f"val/{name}"] == pytest.approx(trained[f"val/{name}"], abs=1e-4)


@pytest.mark.slow
def test_eval_on_data_given_on_the_command_line(trained_run: dict, tmp_path: Path) -> None:
    """The training data moved: data.root points at its new place, with or without data=imagefolder."""
    moved = shutil.copytree(trained_run["data_root"], tmp_path / "moved")
    ckpt = f"ckpt_path={trained_run['best_model_path']}"
    by_key = evaluate(compose_eval(tmp_path / "a", [ckpt, f"data.root={moved}"]))
    by_group = evaluate(
        compose_eval(tmp_path / "b", [ckpt, "data=imagefolder", f"data.root={moved}", "data.num_workers=0"])
    )
    for results in (by_key, by_group):
        assert results["data_root"] == str(moved)
        assert results["test/acc"] == pytest.approx(trained_run["test/acc"], abs=1e-4)


@pytest.mark.slow
def test_eval_of_a_run_with_a_val_folder_scores_it_as_it_is_now_unless_the_seed_cuts_it(
    trained_run: dict, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The run's val was its val/ folder (recorded so): a val/ that gained an image is scored as
    it is now, with one warning line. Without val/, val is cut from train/, which the run
    trained on: refused."""
    ckpt = trained_run["best_model_path"]
    assert recorded_splits(ckpt)["val_from"] == "data"
    data = shutil.copytree(trained_run["data_root"], tmp_path / "data")
    shutil.copy(data / "val" / "circle" / "000.png", data / "val" / "circle" / "new.png")
    overrides = [f"ckpt_path={ckpt}", "split=val", f"data.root={data}"]
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        results = evaluate(compose_eval(tmp_path / "a", overrides))
    lines = [r.getMessage() for r in caplog.records if r.name.startswith("transferkit")]
    assert results["images"] == 13
    assert len(lines) == 1 and "the val split held 12 files in the run, 13 now" in lines[0]
    shutil.rmtree(data / "val")
    with pytest.raises(DataError, match="not the one the run held out"):
        evaluate(compose_eval(tmp_path / "b", overrides))


@pytest.mark.slow
def test_eval_refuses_what_cannot_work(trained_run: dict, tmp_path: Path) -> None:
    ckpt = trained_run["best_model_path"]
    other_classes = make_image_folder(
        tmp_path / "other", classes=("circle", "star"), splits={"train": 2, "val": 2}
    )
    no_test = make_image_folder(tmp_path / "no_test", splits={"train": 2, "val": 2})
    gone = tmp_path / "gone.ckpt"
    checkpoint = torch.load(ckpt, weights_only=True)
    checkpoint["transferkit"]["data"]["root"] = str(tmp_path / "deleted")
    torch.save(checkpoint, gone)
    cases = [
        ([f"ckpt_path={tmp_path / 'nope.ckpt'}"], ConfigError, "does not exist"),
        ([f"ckpt_path={ckpt}", f"data.root={other_classes}"], DataError, "trained on classes"),
        (
            [f"ckpt_path={ckpt}", f"data.root={no_test}", "split=test"],
            ConfigError,
            "split=test is not in the data",
        ),
        ([f"ckpt_path={ckpt}", "split=holdout"], ConfigError, "choose one of: train, val, test"),
        ([f"ckpt_path={gone}"], DataError, "deleted does not exist. Set data.root=PATH"),
        ([f"ckpt_path={ckpt}", "precision=fp8"], ConfigError, "precision='fp8' is not one of"),
    ]
    for overrides, error, message in cases:
        with pytest.raises(error, match=message):
            evaluate(compose_eval(tmp_path / "run_dir", overrides))


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"not a checkpoint at all", "is not a PyTorch checkpoint"),
        ({"model": torch.zeros(2)}, "is a checkpoint of another kind"),
        ({"state_dict": {}, "hyper_parameters": {"lr": 0.1}}, "is a checkpoint of another kind"),
    ],
)
def test_checkpoints_of_another_kind_are_named_so(tmp_path: Path, content, message: str) -> None:
    path = tmp_path / "model.ckpt"
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        torch.save(content, path)
    with pytest.raises(ConfigError, match=message):
        evaluate(compose_eval(tmp_path, [f"ckpt_path={path}"]))


def test_an_exported_model_is_not_a_checkpoint(tmp_path: Path) -> None:
    onnx = tmp_path / "model.onnx"
    onnx.write_bytes(b"\x08\x07")
    with pytest.raises(ConfigError, match="exported ONNX model; this task needs the .ckpt"):
        evaluate(compose_eval(tmp_path, [f"ckpt_path={onnx}"]))


def test_eval_bad_input_exits_2_with_one_line(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """What `python eval.py` does (a good command-line run: tests/test_readme.py)."""
    code, errors = main_exits(main, compose_eval(tmp_path, ["ckpt_path=missing.ckpt"]), caplog)
    assert code == 2 and len(errors) == 1 and "ckpt_path=missing.ckpt does not exist" in errors[0]
