"""predict.py: a CSV of labels and top-k probabilities for an image, a folder or a list of paths,
from a checkpoint or an exported model.onnx; unreadable files get an error row."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from conftest import EXPORTS, compose_task, main_exits
from helpers import predict_both, read_csv
from omegaconf import DictConfig
from test_inference_runtime import parity_atol

from transferkit.data.images import load_rgb
from transferkit.errors import ConfigError
from transferkit.features import precision
from transferkit.runs.checkpoints import load_model
from transferkit.tasks.export import export
from transferkit.tasks.predict import main, predict


@pytest.fixture
def messy_folder(trained_run: dict, tmp_path: Path) -> Path:
    """Images in nested folders, one truncated image, one text file, and junk to be skipped."""
    source = Path(trained_run["data_root"]) / "val"
    folder = tmp_path / "inbox"
    (folder / "nested" / "deeper").mkdir(parents=True)
    (folder / "__MACOSX").mkdir()
    shutil.copy(source / "circle" / "000.png", folder / "a.png")
    shutil.copy(source / "square" / "001.png", folder / "nested" / "b.png")
    shutil.copy(source / "triangle" / "002.png", folder / "nested" / "deeper" / "c.png")
    data = (source / "square" / "000.png").read_bytes()
    (folder / "broken.png").write_bytes(data[: len(data) // 3])
    (folder / "notes.txt").write_text("not an image")
    (folder / ".DS_Store").write_bytes(b"\0\0\0\1Bud1")
    (folder / "Thumbs.db").write_bytes(b"\0")
    shutil.copy(source / "circle" / "001.png", folder / "__MACOSX" / "._a.png")
    return folder


def compose_predict(root: Path, overrides: list[str]) -> DictConfig:
    """conf/predict.yaml with the session's shared exports: each checkpoint is exported once."""
    return compose_task("predict", root, [*overrides, f"runtime_dir={EXPORTS}"])


def reference_logits(ckpt: str, paths: list[Path]) -> torch.Tensor:
    """The checkpoint's logits in PyTorch, as train.py validated it."""
    model = load_model(ckpt)
    transform = model.preprocessing.transforms(train=False)
    with torch.no_grad():
        return model(torch.stack([transform(load_rgb(p)) for p in paths]))


def tolerance(logits: torch.Tensor) -> float:
    """How far predict's CSV may be from PyTorch's probabilities: the onnxruntime export's parity
    and the CSV's six decimals."""
    return parity_atol(logits) + 5e-7


def test_predict_a_folder_with_bad_files(trained_run: dict, tmp_path: Path, messy_folder: Path) -> None:
    ckpt = trained_run["best_model_path"]
    output = tmp_path / "out" / "preds.csv"
    results = predict(
        compose_predict(
            tmp_path, [f"ckpt_path={ckpt}", f"input={messy_folder}", f"output={output}", "top_k=2"]
        )
    )
    rows = read_csv(output)
    assert list(rows[0]) == [
        "path", "label", "confidence", "top1_label", "top1_prob", "top2_label", "top2_prob", "error",
    ]  # fmt: skip
    by_name = {Path(r["path"]).name: r for r in rows}
    assert sorted(by_name) == ["a.png", "b.png", "broken.png", "c.png", "notes.txt"]  # junk skipped
    assert "truncated" in by_name["broken.png"]["error"] and by_name["broken.png"]["label"] == ""
    assert "cannot identify image file" in by_name["notes.txt"]["error"]
    good = [
        messy_folder / "a.png",
        messy_folder / "nested" / "b.png",
        messy_folder / "nested" / "deeper" / "c.png",
    ]
    logits = reference_logits(ckpt, good)
    expected = logits.softmax(1)
    names = trained_run["class_names"]
    for path, probs in zip(good, expected, strict=True):
        row = by_name[path.name]
        assert row["error"] == "" and row["path"] == str(path)
        top = probs.topk(2)
        assert row["label"] == row["top1_label"] == names[int(top.indices[0])]
        assert row["top2_label"] == names[int(top.indices[1])]
        assert (
            float(row["confidence"])
            == float(row["top1_prob"])
            == pytest.approx(float(top.values[0]), abs=tolerance(logits))
        )
        assert float(row["top2_prob"]) == pytest.approx(float(top.values[1]), abs=tolerance(logits))
    assert results["files"] == 5 and results["predicted"] == 3 and results["failed"] == 2
    assert json.loads((tmp_path / "run" / "results.json").read_text()) == results


@pytest.mark.slow
def test_predict_one_image_a_list_file_and_tta(trained_run: dict, tmp_path: Path) -> None:
    ckpt = trained_run["best_model_path"]
    val = shutil.copytree(Path(trained_run["data_root"]) / "val", tmp_path / "val")
    image = val / "square" / "003.png"
    listing = val / "paths.txt"
    listing.write_text("# val images\nsquare/003.png\n\n" + str(val / "circle" / "002.png") + "\n")
    one = tmp_path / "one.csv"
    predict(compose_predict(tmp_path / "a", [f"ckpt_path={ckpt}", f"input={image}", f"output={one}"]))
    listed = tmp_path / "listed.csv"
    predict(compose_predict(tmp_path / "b", [f"ckpt_path={ckpt}", f"input={listing}", f"output={listed}"]))
    rows = read_csv(listed)
    assert [r["path"] for r in rows] == [str(val / "square" / "003.png"), str(val / "circle" / "002.png")]
    assert rows[0]["top1_prob"] == read_csv(one)[0]["top1_prob"]
    assert "top3_label" in rows[0] and "top4_label" not in rows[0]  # top_k=5 capped at 3 classes

    tta = tmp_path / "tta.csv"
    predict(
        compose_predict(tmp_path / "c", [f"ckpt_path={ckpt}", f"input={image}", f"output={tta}", "tta=true"])
    )
    model = load_model(ckpt)
    x = model.preprocessing.transforms(train=False)(load_rgb(image))[None]
    with torch.no_grad():
        logits = torch.cat([model(x), model(x.flip(-1))])
    averaged = logits.softmax(1).mean(0)
    row = read_csv(tta)[0]
    assert float(row["confidence"]) == pytest.approx(float(averaged.max()), abs=tolerance(logits))
    assert row["label"] == trained_run["class_names"][int(averaged.argmax())]


def test_predict_gives_the_checkpoint_s_numbers_on_a_cpu_with_native_bf16(
    trained_run: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """predict's default precision is the one the checkpoint recorded (what eval.py uses), not
    the machine's: on a CPU with native bf16 it still gives the recorded numbers."""
    monkeypatch.setattr(precision, "cpu_has_native_bf16", lambda: True)
    ckpt = trained_run["best_model_path"]
    image = Path(trained_run["data_root"]) / "val" / "square" / "003.png"
    output = tmp_path / "one.csv"
    predict(compose_predict(tmp_path, [f"ckpt_path={ckpt}", f"input={image}", f"output={output}"]))
    row = read_csv(output)[0]
    logits = reference_logits(ckpt, [image])  # load_model: the recorded precision, as eval
    assert float(row["confidence"]) == pytest.approx(float(logits.softmax(1).max()), abs=tolerance(logits))


@pytest.mark.slow
def test_predict_on_the_exported_onnx_gives_the_checkpoint_s_labels(
    trained_run: dict, tmp_path: Path, messy_folder: Path
) -> None:
    ckpt = trained_run["best_model_path"]
    exported = export(compose_task("export", tmp_path / "export", [f"ckpt_path={ckpt}", "format=onnx"]))
    a, b = predict_both(ckpt, exported["model"], messy_folder, tmp_path)
    assert [r["path"] for r in a] == [r["path"] for r in b]
    assert [r["label"] for r in a] == [r["label"] for r in b]
    assert [r["error"] for r in a] == [r["error"] for r in b]
    for ra, rb in zip(a, b, strict=True):
        if ra["confidence"]:
            assert float(ra["confidence"]) == pytest.approx(float(rb["confidence"]), abs=1e-5)


@pytest.mark.slow
def test_predict_refuses_what_cannot_work(trained_run: dict, tmp_path: Path) -> None:
    ckpt = trained_run["best_model_path"]
    empty = tmp_path / "empty"
    (empty / "sub").mkdir(parents=True)
    (empty / ".DS_Store").write_bytes(b"\0")
    stray_onnx = tmp_path / "alone" / "model.onnx"
    stray_onnx.parent.mkdir()
    stray_onnx.write_bytes(b"\0")
    image = Path(trained_run["data_root"]) / "val" / "circle" / "000.png"
    cases = [
        ([f"ckpt_path={tmp_path / 'missing.ckpt'}", f"input={image}"], "does not exist"),
        ([f"ckpt_path={ckpt}", f"input={empty}"], "is an empty folder"),
        ([f"ckpt_path={ckpt}", f"input={tmp_path / 'nowhere'}"], "input=.* does not exist"),
        ([f"ckpt_path={stray_onnx}", f"input={image}"], "has no model.json beside it"),
        ([f"ckpt_path={image}", f"input={image}"], "is not a PyTorch checkpoint"),
        ([f"ckpt_path={ckpt}", f"input={image}", "top_k=0"], "top_k=0 must be 1 or more"),
        ([f"ckpt_path={ckpt}", f"input={image}", "device=gpu7"], "device=gpu7 is not a device"),
    ]
    for overrides, message in cases:
        with pytest.raises(ConfigError, match=message):
            predict(compose_predict(tmp_path / "run_dir", overrides))


def test_predict_on_an_empty_folder_exits_2_with_one_line(
    trained_run: dict, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """What `python predict.py` does (a good command-line run: tests/test_readme.py)."""
    (tmp_path / "empty").mkdir()
    ckpt = f"ckpt_path={trained_run['best_model_path']}"
    cfg = compose_predict(tmp_path, [ckpt, f"input={tmp_path / 'empty'}"])
    code, errors = main_exits(main, cfg, caplog)
    assert code == 2 and len(errors) == 1 and "is an empty folder" in errors[0]
