"""A checkpoint on a CPU in fp32 runs on onnxruntime by default (eval, predict, serve): the whole
classifier exported once, found again by the checkpoint file's digest without building the
model, with PyTorch's probabilities to the export's parity tolerance; runtime=torch keeps
PyTorch, runtime=onnx where it cannot run is refused in one line, and a model that cannot be
exported runs on PyTorch, said in one INFO line."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch
from conftest import EXPORTS, ROOT, TINY_MODEL, compose_task, make_image_folder

from transferkit.errors import ConfigError
from transferkit.inference import SessionPredictor, TorchPredictor, load_predictor, predict_files
from transferkit.inference import checkpoint as checkpoint_module
from transferkit.model.module import TransferModule
from transferkit.runtime import PARITY_RTOL
from transferkit.tasks.predict import predict

LITE0_BY_REFERENCE = ROOT / "tests" / "fixtures" / "lite0_frozen_2026-12-08.ckpt"


def parity_atol(logits: torch.Tensor) -> float:
    """How far onnxruntime's probabilities may be from PyTorch's: its logits are within
    PARITY_RTOL of the largest (the export's check), and neither a softmax nor a sigmoid moves
    by more than half its logits' change."""
    return PARITY_RTOL * float(logits.abs().max()) / 2


def save_checkpoint(model: TransferModule, path: Path) -> Path:
    """`model` as train.py's checkpoints hold it (hyper-parameters, state dict, the run's
    record), without a Trainer."""
    checkpoint = {"state_dict": model.state_dict(), "hyper_parameters": dict(model.hparams)}
    model.on_save_checkpoint(checkpoint)
    torch.save(checkpoint, path)
    return path


def tiny_checkpoint(path: Path, multilabel: bool = False) -> Path:
    """The tiny backbone at 32 px with a head scaled up, so that its probabilities spread over
    the classes; the same weights every call (so the session's tests share one export)."""
    torch.manual_seed(0)
    model = TransferModule(
        TINY_MODEL, ["circle", "square", "triangle"], weights=None, multilabel=multilabel,
        preprocessing={"image_size": 32},
    )  # fmt: skip
    with torch.no_grad():
        model.head[-1].weight.mul_(100)
        if multilabel:
            model.thresholds.copy_(torch.tensor([0.2, 0.5, 0.8]))
    return save_checkpoint(model, path)


@pytest.fixture
def images(tmp_path: Path) -> list[Path]:
    return sorted(make_image_folder(tmp_path / "images", splits={"val": 4}, size=40).rglob("*.png"))


def both(ckpt: Path, images: list[Path], runtime_dir: Path = EXPORTS) -> tuple:
    """The predictions of the checkpoint's default predictor and of its PyTorch one."""
    default = load_predictor(ckpt, "cpu", runtime_dir=runtime_dir)
    torch_predictor = load_predictor(ckpt, "cpu", runtime="torch", runtime_dir=runtime_dir)
    return default, predict_files(default, images), predict_files(torch_predictor, images)


@pytest.mark.slow
def test_a_checkpoint_runs_on_onnxruntime_with_pytorch_s_probabilities(
    tmp_path: Path, images: list[Path]
) -> None:
    ckpt = tiny_checkpoint(tmp_path / "tiny.ckpt")
    predictor, ort, eager = both(ckpt, images)
    assert isinstance(predictor, SessionPredictor) and predictor.runtime.startswith("onnxruntime ")
    assert predictor.class_names == ["circle", "square", "triangle"] and not predictor.multilabel
    assert len(set(eager.probs.argmax(1).tolist())) > 1  # the images are told apart
    difference = float((ort.probs - eager.probs).abs().max())
    assert difference <= parity_atol(eager.logits), difference
    assert ort.probs.argmax(1).tolist() == eager.probs.argmax(1).tolist()


@pytest.mark.slow
def test_a_multilabel_checkpoint_keeps_its_thresholds_on_onnxruntime(
    tmp_path: Path, images: list[Path]
) -> None:
    ckpt = tiny_checkpoint(tmp_path / "multi.ckpt", multilabel=True)
    predictor, ort, eager = both(ckpt, images)
    assert isinstance(predictor, SessionPredictor) and predictor.multilabel
    assert predictor.thresholds.tolist() == pytest.approx([0.2, 0.5, 0.8])
    assert torch.allclose(ort.probs, ort.logits.sigmoid())  # independent sigmoids, not a softmax
    assert float((ort.probs - eager.probs).abs().max()) <= parity_atol(eager.logits)


def test_runtime_torch_keeps_pytorch_and_exports_nothing(tmp_path: Path) -> None:
    ckpt = tiny_checkpoint(tmp_path / "tiny.ckpt")
    predictor = load_predictor(ckpt, "cpu", runtime="torch", runtime_dir=tmp_path / "exports")
    assert isinstance(predictor, TorchPredictor) and predictor.runtime == "torch"
    assert not (tmp_path / "exports").exists()


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"runtime": "onnx", "precision": "bf16"}, "runtime=onnx cannot be used: onnxruntime runs fp32 here"),
        ({"runtime": "tensorrt"}, "runtime='tensorrt' is not one of: auto, onnx, torch"),
    ],
)
def test_a_runtime_that_cannot_run_is_refused_in_one_line(
    tmp_path: Path, settings: dict, message: str
) -> None:
    ckpt = tiny_checkpoint(tmp_path / "tiny.ckpt")
    with pytest.raises(ConfigError, match=message) as error:
        load_predictor(ckpt, "cpu", runtime_dir=tmp_path / "exports", **settings)
    assert "\n" not in str(error.value)


def test_auto_in_bf16_runs_pytorch_in_bf16(tmp_path: Path) -> None:
    """onnxruntime runs fp32: a checkpoint asked for in bf16 keeps PyTorch's autocast."""
    ckpt = tiny_checkpoint(tmp_path / "tiny.ckpt")
    predictor = load_predictor(ckpt, "cpu", precision="bf16", runtime_dir=tmp_path / "exports")
    assert isinstance(predictor, TorchPredictor) and predictor.dtype == torch.bfloat16


def test_an_exported_model_refuses_runtime_torch(tmp_path: Path) -> None:
    exported = tmp_path / "model.onnx"
    exported.write_bytes(b"\0")
    with pytest.raises(ConfigError, match=r"runtime=torch cannot run ckpt_path=.*model\.onnx"):
        load_predictor(exported, runtime="torch")


@pytest.mark.slow
def test_a_cached_export_is_found_by_the_file_without_building_the_model(
    tmp_path: Path, images: list[Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The second load of a checkpoint opens its export without building the model; another
    checkpoint (other weights) gets an export of its own."""
    exports = tmp_path / "exports"
    ckpt = tiny_checkpoint(tmp_path / "tiny.ckpt")
    first = load_predictor(ckpt, "cpu", runtime_dir=exports)

    def no_build(*args: object) -> None:
        raise AssertionError("the model was built")

    monkeypatch.setattr("transferkit.inference.predictors.build_classifier", no_build)
    again = load_predictor(ckpt, "cpu", runtime_dir=exports)
    assert isinstance(again, SessionPredictor) and again.session.path == first.session.path
    assert torch.equal(predict_files(again, images).logits, predict_files(first, images).logits)
    monkeypatch.undo()

    other = tmp_path / "other.ckpt"
    model = TransferModule(
        TINY_MODEL, ["circle", "square", "triangle"], weights=None, preprocessing={"image_size": 32}
    )
    save_checkpoint(model, other)
    assert load_predictor(other, "cpu", runtime_dir=exports).session.path != first.session.path
    assert len(list(exports.glob("*.onnx"))) == 2 and len(list((exports / "checkpoints").glob("*.json"))) == 2


@pytest.mark.slow
def test_a_model_that_cannot_be_exported_runs_on_pytorch_said_in_one_info_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    def unsupported(*args: object, **kwargs: object) -> None:
        raise RuntimeError("aten::made_up has no ONNX symbol\nmore detail")

    monkeypatch.setattr(torch.onnx, "export", unsupported)
    ckpt = tiny_checkpoint(tmp_path / "tiny.ckpt")
    with caplog.at_level(logging.INFO):
        predictor = load_predictor(ckpt, "cpu", runtime_dir=tmp_path / "exports")
    assert isinstance(predictor, TorchPredictor)
    said = [r.getMessage() for r in caplog.records if "runs on PyTorch" in r.getMessage()]
    assert said == [
        f"ckpt_path={ckpt} runs on PyTorch: it cannot be exported to ONNX (aten::made_up has no ONNX symbol)."
    ]


@pytest.mark.slow
def test_a_backbone_kept_by_reference_runs_on_onnxruntime(tmp_path: Path) -> None:
    """Lite0 with the shipped weights, which the checkpoint names instead of holding (100 KB): put
    back from this machine before the export."""
    data = make_image_folder(tmp_path / "data", splits={"val": 2}, size=72)
    paths = sorted(data.rglob("*.png"))
    predictor, ort, eager = both(LITE0_BY_REFERENCE, paths, tmp_path / "exports")
    assert isinstance(predictor, SessionPredictor)
    assert float((ort.probs - eager.probs).abs().max()) <= parity_atol(eager.logits)
    assert checkpoint_module.recorded_info(
        torch.load(LITE0_BY_REFERENCE, weights_only=True), LITE0_BY_REFERENCE
    )


@pytest.mark.slow
def test_predict_and_eval_record_their_runtime_and_agree_across_them(
    trained_run: dict, tmp_path: Path
) -> None:
    from transferkit.tasks.eval import evaluate

    ckpt = trained_run["best_model_path"]
    image = Path(trained_run["data_root"]) / "val" / "circle" / "000.png"
    evaluated = {}
    for runtime in ("auto", "torch"):
        shared = [f"ckpt_path={ckpt}", f"runtime={runtime}", f"runtime_dir={EXPORTS}"]
        predicted = predict(compose_task("predict", tmp_path / f"p_{runtime}", [*shared, f"input={image}"]))
        evaluated[runtime] = evaluate(compose_task("eval", tmp_path / f"e_{runtime}", shared))
        assert predicted["runtime"] == evaluated[runtime]["runtime"]
    assert (
        evaluated["auto"]["runtime"].startswith("onnxruntime ") and evaluated["torch"]["runtime"] == "torch"
    )
    assert evaluated["auto"]["precision"] == evaluated["torch"]["precision"] == "fp32"
    assert evaluated["auto"]["test/acc"] == evaluated["torch"]["test/acc"]
    assert evaluated["auto"]["test/loss"] == pytest.approx(evaluated["torch"]["test/loss"], abs=1e-4)


def test_preprocessing_a_checkpoint_leaves_to_its_backbone_is_load_model_s(tmp_path: Path) -> None:
    """A checkpoint recording part of its preprocessing (one saved before crop modes and with
    no interpolation, say) is read as load_model reads it: the rest from its backbone."""
    from transferkit.runs.checkpoints import load_model

    checkpoint = torch.load(tiny_checkpoint(tmp_path / "tiny.ckpt"), weights_only=True)
    recorded = checkpoint["hyper_parameters"]["preprocessing"]
    del recorded["interpolation"], recorded["crop_mode"]
    torch.save(checkpoint, tmp_path / "old.ckpt")
    predictor = load_predictor(tmp_path / "old.ckpt", "cpu", runtime="torch")
    assert predictor.preprocessing == load_model(tmp_path / "old.ckpt").preprocessing
    assert predictor.preprocessing.crop_mode == "center" and predictor.preprocessing.image_size == 32
