"""Multi-label models in eval.py, predict.py and export.py: the checkpoint's thresholds decide
predict's labels (from the checkpoint and from model.onnx alike), eval reports per class at
them, model.json carries them; single-label outputs keep their old columns and keys."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import pytest
import torch
from conftest import TINY_MODEL, compose_task, make_label_file
from helpers import SGD, multilabel_loader, predict_both, quiet_trainer, read_csv
from omegaconf import OmegaConf

from transferkit import reports
from transferkit.data.images import load_rgb
from transferkit.errors import ConfigError, DataError
from transferkit.inference import Predictions
from transferkit.model.module import TransferModule
from transferkit.model.multilabel import decide, multilabel_scores
from transferkit.runs.checkpoints import load_model
from transferkit.tasks.eval import check_same_kind
from transferkit.tasks.export import metadata
from transferkit.tasks.predict import csv_header, write_multilabel_predictions, write_predictions

CLASSES = ["circle", "square", "triangle"]


def logits_of(model: TransferModule, paths: list[Path], mirrored: bool = False) -> torch.Tensor:
    """The model's logits for the images (or their mirror images), by hand."""
    transform = model.preprocessing.transforms(train=False)
    images = torch.stack([transform(load_rgb(p)) for p in paths])
    with torch.no_grad():
        return model.eval()(images.flip(-1) if mirrored else images)


def scores_of(model: TransferModule, paths: list[Path], mirrored: bool = False) -> torch.Tensor:
    return logits_of(model, paths, mirrored).sigmoid()


def split_between_scores(probs: torch.Tensor) -> torch.Tensor:
    """Per class, a threshold halfway across the widest gap between two of its scores: labels
    that differ between images, far from ties, and nowhere near the default 0.5."""
    thresholds = []
    for scores in probs.T.sort(dim=1, descending=True).values:
        gaps = scores[:-1] - scores[1:]
        k = int(gaps.argmax())
        thresholds.append(float((scores[k] + scores[k + 1]) / 2))
    return torch.tensor(thresholds)


@pytest.fixture(scope="module")
def multilabel_run(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """A tiny multi-label model fitted a few steps on random pictures, its thresholds then set
    between the scores it gives the val images of a generated label file, saved as a checkpoint;
    plus an inbox of those images and a broken one."""
    root = tmp_path_factory.mktemp("multilabel")
    labels = make_label_file(root / "data", multilabel=True, splits={"train": 2, "val": 4})
    val = sorted((root / "data" / "images").glob("val_*.png"))
    inbox = root / "inbox"
    inbox.mkdir()
    for path in val:
        shutil.copy(path, inbox / path.name)
    data = val[0].read_bytes()
    (inbox / "broken.png").write_bytes(data[: len(data) // 3])

    torch.manual_seed(0)
    model = TransferModule(
        TINY_MODEL, CLASSES, weights=None, multilabel=True, optimizer=SGD, preprocessing={"image_size": 32}
    )
    loader = multilabel_loader()
    trainer = quiet_trainer(root, epochs=1)
    trainer.fit(model, loader, loader)
    probs = scores_of(model, val)
    thresholds = split_between_scores(probs)
    model.thresholds.copy_(thresholds)
    assert (decide(probs, thresholds) != decide(probs, torch.full((3,), 0.5))).any()  # 0.5 would fail
    ckpt = root / "multilabel.ckpt"
    trainer.save_checkpoint(ckpt)
    return {"ckpt": str(ckpt), "labels": labels, "val": val, "inbox": inbox, "thresholds": thresholds}


def expected_rows(model: TransferModule, paths: list[Path], tta: bool = False) -> dict[str, tuple]:
    """file name -> (labels cell, scores) as the checkpoint's thresholds decide them, by hand."""
    probs = scores_of(model, paths)
    if tta:  # the mean of the image's and its mirror image's sigmoids
        probs = (probs + scores_of(model, paths, mirrored=True)) / 2
    chosen = decide(probs, model.thresholds)
    rows = {}
    for path, on, scores in zip(paths, chosen.tolist(), probs, strict=True):
        cell = ";".join(name for name, yes in zip(CLASSES, on, strict=True) if yes)
        rows[path.name] = (cell, scores)
    return rows


def check_rows(rows: list[dict[str, str]], expected: dict[str, tuple], atol: float) -> None:
    by_name = {Path(r["path"]).name: r for r in rows}
    assert "truncated" in by_name.pop("broken.png")["error"]
    assert sorted(by_name) == sorted(expected)
    for name, (cell, scores) in expected.items():
        row = by_name[name]
        assert row["labels"] == cell and row["error"] == ""
        got = torch.tensor([float(row[f"score:{c}"]) for c in CLASSES])
        torch.testing.assert_close(got, scores.float(), atol=atol, rtol=0)


@pytest.mark.slow
def test_predict_writes_the_labels_the_checkpoint_s_thresholds_decide(
    multilabel_run: dict, tmp_path: Path
) -> None:
    from transferkit.tasks.predict import predict

    ckpt, inbox = multilabel_run["ckpt"], multilabel_run["inbox"]
    model = load_model(ckpt)
    torch.testing.assert_close(model.thresholds, multilabel_run["thresholds"])  # through the checkpoint
    output = tmp_path / "preds.csv"
    overrides = [f"ckpt_path={ckpt}", f"input={inbox}", f"output={output}", "top_k=1"]
    results = predict(compose_task("predict", tmp_path, overrides))
    rows = read_csv(output)
    assert list(rows[0]) == ["path", "labels", "score:circle", "score:square", "score:triangle", "error"]
    expected = expected_rows(model, multilabel_run["val"])
    check_rows(rows, expected, atol=1e-6)
    counts = {c: sum(c in cell.split(";") for cell, _ in expected.values()) for c in CLASSES}
    assert results["labels"] == {c: n for c, n in counts.items() if n}  # every label counted
    assert results["without_label"] == sum(cell == "" for cell, _ in expected.values())
    assert results["multilabel"] is True and results["predicted"] == 6 and results["failed"] == 1

    tta = tmp_path / "tta.csv"
    predict(compose_task("predict", tmp_path / "tta", [*overrides[:2], f"output={tta}", "tta=true"]))
    check_rows(read_csv(tta), expected_rows(model, multilabel_run["val"], tta=True), atol=1e-6)


@pytest.mark.slow
def test_onnx_export_carries_the_thresholds_and_predicts_the_checkpoint_s_labels(
    multilabel_run: dict, tmp_path: Path
) -> None:
    pytest.importorskip("onnxruntime")
    from transferkit.inference import OnnxPredictor
    from transferkit.tasks.export import export

    ckpt, inbox = multilabel_run["ckpt"], multilabel_run["inbox"]
    exported = export(
        compose_task(
            "export", tmp_path / "export", [f"ckpt_path={ckpt}", "format=onnx", f"parity.images={inbox}"]
        )
    )
    meta_path = Path(exported["metadata"])
    meta = json.loads(meta_path.read_text())
    assert meta["multilabel"] is True
    assert meta["thresholds"] == multilabel_run["thresholds"].tolist()
    assert meta["output"] == {"name": "logits", "shape": ["batch", 3], "activation": "sigmoid"}

    a, b = predict_both(ckpt, exported["model"], inbox, tmp_path)
    assert list(a[0]) == list(b[0])
    assert [(r["path"], r["labels"], r["error"]) for r in a] == [
        (r["path"], r["labels"], r["error"]) for r in b
    ]
    for ra, rb in zip(a, b, strict=True):
        for c in CLASSES:
            if ra[f"score:{c}"]:
                assert float(ra[f"score:{c}"]) == pytest.approx(float(rb[f"score:{c}"]), abs=1e-4)

    predictor = OnnxPredictor(Path(exported["model"]))
    assert predictor.multilabel and torch.equal(predictor.thresholds, multilabel_run["thresholds"])
    old = {k: v for k, v in meta.items() if k not in ("multilabel", "thresholds")}
    meta_path.write_text(json.dumps(old))  # a model.json from before multi-label models
    predictor = OnnxPredictor(Path(exported["model"]))
    assert not predictor.multilabel and predictor.thresholds is None
    meta_path.write_text(json.dumps({**old, "multilabel": True}))
    with pytest.raises(ConfigError, match="without a threshold per class"):
        OnnxPredictor(Path(exported["model"]))


@pytest.mark.slow
def test_eval_reports_per_class_at_the_checkpoint_s_thresholds(multilabel_run: dict, tmp_path: Path) -> None:
    from transferkit.tasks.eval import evaluate

    labels = Path(multilabel_run["labels"])
    rows = list(csv.reader(labels.open()))  # no val image holds a triangle: a class without positives
    drop = {r[0] for r in rows[1:] if r[2] == "val"}
    with labels.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(rows[0])
        for r in rows[1:]:
            cell = ";".join(c for c in r[1].split(";") if c and not (r[0] in drop and c == "triangle"))
            writer.writerow([r[0], cell, r[2]])
    overrides = [
        f"ckpt_path={multilabel_run['ckpt']}",
        "data=csv",
        f"data.root={labels.parent}",
        "data.multilabel=true",
        "data.num_workers=0",
        "split=val",
    ]
    results = evaluate(compose_task("eval", tmp_path, overrides))
    run = tmp_path / "run"
    assert sorted(p.name for p in run.iterdir()) == ["per_class.csv", "results.json"]
    assert list(results)[:5] == ["val/map", "val/auroc", "val/f1_micro", "val/f1_macro", "val/loss"]
    assert json.loads((run / "results.json").read_text()) == results
    assert results["classes_without_positives"] == ["triangle"]
    assert results["thresholds"] == multilabel_run["thresholds"].tolist()
    assert "misclassified" not in results

    model = load_model(multilabel_run["ckpt"])
    cells = {Path(r[0]).name: r[1].split(";") for r in csv.reader(labels.open()) if r[2] == "val"}
    targets = torch.tensor([[int(c in cells[p.name]) for c in CLASSES] for p in multilabel_run["val"]])
    logits = logits_of(model, multilabel_run["val"])
    expected = multilabel_scores(logits.sigmoid(), targets, model.thresholds, prefix="val/")
    for key, value in expected.items():
        assert results[key] == pytest.approx(float(value), abs=1e-5)
    bce = torch.nn.functional.binary_cross_entropy_with_logits(logits, targets.float())
    assert results["val/loss"] == pytest.approx(float(bce), abs=1e-5)
    report = read_csv(run / "per_class.csv")
    assert [r["class"] for r in report] == [*CLASSES, "macro avg"]
    assert list(report[0]) == ["class", "threshold", "precision", "recall", "f1", "ap", "auroc", "support"]
    assert report[2]["support"] == "0" and report[2]["ap"] == "" and report[2]["auroc"] == ""
    assert float(report[3]["ap"]) == pytest.approx(results["val/map"], abs=1e-4)


def test_the_per_class_report_by_hand() -> None:
    """Four images, four classes (d has no positive image but one predicted), non-default
    thresholds; every value worked out by hand."""
    probs = torch.tensor(
        [[0.9, 0.2, 0.6, 0.1], [0.4, 0.7, 0.1, 0.3], [0.8, 0.6, 0.3, 0.2], [0.1, 0.3, 0.2, 0.6]]
    )
    targets = torch.tensor([[1, 0, 1, 0], [0, 1, 0, 0], [1, 1, 0, 0], [0, 0, 1, 0]])
    thresholds = torch.tensor([0.5, 0.65, 0.25, 0.5])
    rows = reports.multilabel_report(probs, targets, thresholds, ["a", "b", "c", "d"])
    nan = float("nan")
    expected = [  # threshold, precision, recall, f1, ap, auroc, support
        ("a", 0.5, 1.0, 1.0, 1.0, 1.0, 1.0, 2),
        ("b", 0.65, 1.0, 0.5, 2 / 3, 1.0, 1.0, 2),  # predicted on 1 of its 2 images
        ("c", 0.25, 0.5, 0.5, 0.5, (1 + 2 / 3) / 2, 0.75, 2),  # ranked pos, neg, pos, neg
        ("d", 0.5, 0.0, 0.0, 0.0, nan, nan, 0),
        ("macro avg", nan, 2.5 / 4, 2 / 4, (1 + 2 / 3 + 0.5) / 4, (2 + 5 / 6) / 3, 2.75 / 3, 6),
    ]
    for row, (name, *values, support) in zip(rows, expected, strict=True):
        assert row["class"] == name and row["support"] == support
        got = [row[k] for k in ("threshold", "precision", "recall", "f1", "ap", "auroc")]
        assert got == pytest.approx(values, abs=1e-6, nan_ok=True)
    assert reports.without_positives(rows) == ["d"]
    scores = multilabel_scores(probs, targets, thresholds)
    assert float(scores["map"]) == pytest.approx(rows[-1]["ap"], abs=1e-6)
    assert float(scores["f1_macro"]) == pytest.approx(rows[-1]["f1"], abs=1e-6)
    assert float(scores["auroc"]) == pytest.approx(rows[-1]["auroc"], abs=1e-6)


def test_the_per_class_csv_leaves_what_cannot_be_measured_empty(tmp_path: Path) -> None:
    rows = reports.multilabel_report(
        torch.tensor([[0.9, 0.6], [0.2, 0.1]]),
        torch.tensor([[1, 0], [0, 0]]),
        torch.tensor([0.5, 0.5]),
        ["x", "y"],
    )
    reports.write_multilabel_report(rows, tmp_path / "per_class.csv")
    assert (tmp_path / "per_class.csv").read_text().splitlines() == [
        "class,threshold,precision,recall,f1,ap,auroc,support",
        "x,0.5000,1.0000,1.0000,1.0000,1.0000,1.0000,1",
        "y,0.5000,0.0000,0.0000,0.0000,,,0",
        "macro avg,,0.5000,0.5000,0.5000,1.0000,1.0000,1",
    ]
    reports.print_multilabel_report(rows)  # n/a cells do not trip the table


def test_predict_csv_formats_single_and_multi_label(tmp_path: Path) -> None:
    """A single-label model keeps path,label,confidence,top-k; a multi-label one writes labels
    at the thresholds (score exactly at one counts) and every score."""
    logits = torch.tensor([[2.0, 0.0, -1.0], [float("nan")] * 3, [0.0, -3.0, 1.0]])
    paths = [Path("a.png"), Path("bad.png"), Path("c.png")]
    errors = [None, "truncated", None]
    single = tmp_path / "single.csv"
    write_predictions(single, Predictions(paths, logits, errors), CLASSES, top_k=2)
    assert csv_header(2) == [
        "path",
        "label",
        "confidence",
        "top1_label",
        "top1_prob",
        "top2_label",
        "top2_prob",
        "error",
    ]
    assert single.read_text().splitlines() == [
        ",".join(csv_header(2)),
        "a.png,circle,0.843795,circle,0.843795,square,0.114195,",
        "bad.png,,,,,,,truncated",
        "c.png,triangle,0.721399,triangle,0.721399,circle,0.265388,",
    ]
    multi = tmp_path / "multi.csv"
    write_multilabel_predictions(
        multi, Predictions(paths, logits, errors, multilabel=True), CLASSES, torch.tensor([0.8, 0.5, 0.9])
    )
    assert multi.read_text().splitlines() == [
        "path,labels,score:circle,score:square,score:triangle,error",
        "a.png,circle;square,0.880797,0.500000,0.268941,",
        "bad.png,,,,,truncated",
        "c.png,,0.500000,0.047426,0.731059,",
    ]


def test_model_json_says_how_to_read_the_outputs() -> None:
    cfg = OmegaConf.create({"format": "onnx", "ckpt_path": "best.ckpt"})
    parity = {"max_abs_diff": 0.0}
    for multilabel in (False, True):
        torch.manual_seed(0)
        model = TransferModule(TINY_MODEL, CLASSES, weights=None, multilabel=multilabel)
        meta = metadata(model, cfg, (32, 32), parity)
        assert meta["multilabel"] is multilabel
        assert meta["output"]["activation"] == ("sigmoid" if multilabel else "softmax")
        assert ("thresholds" in meta) is multilabel
    assert meta["thresholds"] == [0.5, 0.5, 0.5]  # untuned


def test_eval_refuses_a_model_of_the_other_kind() -> None:
    torch.manual_seed(0)
    multi = TransferModule(TINY_MODEL, CLASSES, weights=None, multilabel=True)
    single = TransferModule(TINY_MODEL, CLASSES, weights=None)
    with pytest.raises(DataError, match="multi-label model and the data is single-label"):
        check_same_kind(multi, data_multilabel=False)
    with pytest.raises(DataError, match="single-label model and the data is multi-label"):
        check_same_kind(single, data_multilabel=True)
    check_same_kind(multi, data_multilabel=True)
    check_same_kind(single, data_multilabel=False)
