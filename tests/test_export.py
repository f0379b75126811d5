"""export.py: model.onnx / model.pt with model.json, written only when its logits match PyTorch's."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import onnxruntime as ort
import pytest
import torch
import yaml
from conftest import CONF, compose_task, main_exits, make_image_folder

from transferkit.data.folders import find_splits
from transferkit.errors import ConfigError, ExportError
from transferkit.inference import exporting
from transferkit.inference.exporting import EXPORTERS, Classifier, load_exported, parity
from transferkit.model.module import TransferModule
from transferkit.runs.checkpoints import load_model
from transferkit.tasks.export import export, main, val_images


@pytest.mark.slow
def test_onnx_export_with_its_metadata_and_a_dynamic_batch(trained_run: dict, tmp_path: Path) -> None:
    ckpt = trained_run["best_model_path"]
    results = export(compose_task("export", tmp_path, [f"ckpt_path={ckpt}", "format=onnx"]))
    run = tmp_path / "run"
    assert sorted(p.name for p in run.iterdir()) == ["model.json", "model.onnx", "results.json"]
    meta = json.loads((run / "model.json").read_text())
    model = load_model(ckpt)
    assert meta["class_names"] == trained_run["class_names"]
    assert meta["preprocessing"] == model.preprocessing.to_dict()
    assert meta["preprocessing"]["image_size"] == 32 and meta["preprocessing"]["interpolation"] == "bicubic"
    assert meta["parity"]["max_abs_diff"] <= 1e-4 and meta["parity"]["checked_on"].startswith("8 images from")
    assert results["parity_max_abs_diff"] == meta["parity"]["max_abs_diff"]

    session = ort.InferenceSession(str(run / "model.onnx"), providers=["CPUExecutionProvider"])
    for batch in (1, 5):  # exported with 2: the batch dimension is free
        images = torch.randn(batch, 3, 32, 32)
        (logits,) = session.run(None, {"images": images.numpy()})
        with torch.no_grad():
            torch.testing.assert_close(torch.from_numpy(logits), model(images), atol=1e-4, rtol=0)


@pytest.mark.slow
def test_torchscript_export_loads_without_transferkit_classes(trained_run: dict, tmp_path: Path) -> None:
    ckpt = trained_run["best_model_path"]
    results = export(compose_task("export", tmp_path, [f"ckpt_path={ckpt}", "format=torchscript"]))
    assert results["parity_max_abs_diff"] <= 1e-4
    scripted = torch.jit.load(str(tmp_path / "run" / "model.pt"))
    model = load_model(ckpt)
    images = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(scripted(images), model(images), atol=1e-4, rtol=0)
    assert json.loads((tmp_path / "run" / "model.json").read_text())["format"] == "torchscript"


@pytest.mark.slow
def test_a_failed_parity_check_writes_nothing(  # the check is the same for both formats
    trained_run: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def drifting(path: Path):
        run = load_exported(path)
        return lambda images: run(images) + 1e-3

    monkeypatch.setattr("transferkit.tasks.export.load_exported", drifting)
    output = tmp_path / "exported"
    cfg = compose_task(
        "export",
        tmp_path,
        [f"ckpt_path={trained_run['best_model_path']}", "format=torchscript", f"output={output}"],
    )
    with pytest.raises(ExportError, match=r"differ from PyTorch's by 1\.00e-03 .* nothing was written"):
        export(cfg)
    assert list(output.iterdir()) == []


@pytest.mark.slow
def test_parity_uses_given_images_or_says_it_used_random_ones(trained_run: dict, tmp_path: Path) -> None:
    ckpt = trained_run["best_model_path"]
    test_dir = Path(trained_run["data_root"]) / "test"
    given = export(
        compose_task(
            "export",
            tmp_path / "a",
            [f"ckpt_path={ckpt}", "format=torchscript", f"parity.images={test_dir}", "parity.count=3"],
        )
    )
    assert given["parity_checked_on"] == f"3 images from {test_dir}"
    orphan = tmp_path / "orphan.ckpt"
    checkpoint = torch.load(ckpt, weights_only=True)
    checkpoint["transferkit"]["data"] = None  # the training data is unknown
    torch.save(checkpoint, orphan)
    random = export(compose_task("export", tmp_path / "b", [f"ckpt_path={orphan}", "format=torchscript"]))
    assert random["parity_checked_on"] == "random inputs" and random["parity_max_abs_diff"] <= 1e-4


def test_export_refuses_what_cannot_work(trained_run: dict, tmp_path: Path) -> None:
    ckpt = trained_run["best_model_path"]
    cases = [
        (
            [f"ckpt_path={ckpt}", "format=tflite"],
            "format=tflite is not supported; use one of: onnx, torchscript",
        ),
        ([f"ckpt_path={tmp_path / 'missing.ckpt'}"], "does not exist"),
        ([f"ckpt_path={ckpt}", "parity.count=0"], "parity.count=0 must be 1 or more"),
    ]
    for overrides, message in cases:
        with pytest.raises(ConfigError, match=message):
            export(compose_task("export", tmp_path, overrides))
    plain_state_dict = tmp_path / "weights.pt"
    torch.save(load_model(ckpt).state_dict(), plain_state_dict)
    with pytest.raises(ConfigError, match="is a checkpoint of another kind"):
        export(compose_task("export", tmp_path, [f"ckpt_path={plain_state_dict}"]))


def model_configs() -> list[tuple[str, str]]:
    return [(p.stem, yaml.safe_load(p.read_text())["name"]) for p in sorted((CONF / "model").glob("*.yaml"))]


@pytest.mark.models  # make test-models; make test exports the tiny model in both formats
@pytest.mark.parametrize(("config", "name"), model_configs(), ids=[c for c, _ in model_configs()])
def test_every_model_config_exports_with_parity(config: str, name: str, tmp_path: Path) -> None:
    size = 224 if "vit" in name else 32  # torchvision's ViT takes its own size only
    model = TransferModule(name, ["a", "b", "c"], weights=None, preprocessing={"image_size": size})
    net = Classifier(model.backbone, model.head).eval().requires_grad_(False)
    images = torch.randn(3, 3, size, size, generator=torch.Generator().manual_seed(0))
    for format, file in exporting.FORMATS.items():
        path = tmp_path / file
        EXPORTERS[format](net, images[:2], path)
        assert parity(net, load_exported(path), images) <= 1e-4, (config, format)


def test_export_of_an_unknown_format_exits_2_with_one_line(
    trained_run: dict, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """What `python export.py` does (a good command-line run: tests/test_readme.py)."""
    cfg = compose_task("export", tmp_path, [f"ckpt_path={trained_run['best_model_path']}", "format=tflite"])
    code, errors = main_exits(main, cfg, caplog)
    assert code == 2 and len(errors) == 1 and "format=tflite is not supported" in errors[0]


def test_parity_images_are_the_recorded_val_split_even_one_held_out_of_train(tmp_path: Path) -> None:
    """As eval finds them (val_fraction of train/, by the seed), not all of train/; data that can
    no longer be built as recorded falls back to random inputs."""
    root = make_image_folder(tmp_path / "d", splits={"train": 10}, size=32)
    data = {
        "_target_": "transferkit.data.ImageFolderDataModule",
        "root": str(root),
        "val_fraction": 0.2,
        "seed": 3,
    }
    paths, source = val_images(SimpleNamespace(data_config=data))
    held_out = [path for path, _ in find_splits(root, 0.2, 3).val]
    assert paths == held_out and 0 < len(held_out) < 30 and source == f"the val split of {root}"
    assert val_images(SimpleNamespace(data_config={**data, "no_such_key": 1})) == ([], "random inputs")
