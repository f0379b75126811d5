"""The frozen part on onnxruntime: exported once per weights and input shape, checked against
PyTorch as it is made, reused by later runs, falling back to PyTorch in one line; chosen by
`features.runtime`, part of the cache key and results.json, and the same numbers as PyTorch's
(val metrics within 1e-3), cached or not."""

from __future__ import annotations

import importlib.util
import json
import logging
import pickle
from pathlib import Path

import pytest
import torch
from torch import nn

import transferkit.runtime.onnx as onnx_runtime
from transferkit.errors import ConfigError
from transferkit.runtime import PARITY_RTOL, TORCH, OnnxModule, resolve_runtime, session_for
from transferkit.tasks.train import train

CPU, CUDA = torch.device("cpu"), torch.device("cuda")


def small_net(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten()
    ).eval()


class DataDependent(nn.Module):
    """A forward whose control flow reads the data: the exporter cannot trace it."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.sum() > 0:
            return x.mean((2, 3))
        return x.amax((2, 3))


def test_auto_is_onnxruntime_on_a_cpu_in_fp32_and_pytorch_elsewhere() -> None:
    assert resolve_runtime("auto", CPU, torch.float32) == "onnx"
    assert resolve_runtime("auto", CUDA, torch.float32) == TORCH
    assert resolve_runtime("auto", CPU, torch.bfloat16) == TORCH
    assert resolve_runtime("torch", CPU, torch.float32) == TORCH
    with pytest.raises(ConfigError, match=r"^features.runtime=onnx cannot be used: onnxruntime runs here on"):
        resolve_runtime("onnx", CUDA, torch.float32)
    with pytest.raises(ConfigError, match=r"onnxruntime runs fp32 here and the precision is torch.bfloat16"):
        resolve_runtime("onnx", CPU, torch.bfloat16)
    with pytest.raises(ConfigError, match=r"features.runtime='ort' is not one of: auto, onnx, torch"):
        resolve_runtime("ort", CPU, torch.float32)


def test_without_onnxruntime_auto_says_so_and_onnx_is_refused(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name: None if name == "onnxruntime" else real(name)
    )
    with caplog.at_level(logging.INFO, logger="transferkit"):
        assert resolve_runtime("auto", CPU, torch.float32) == TORCH
    assert "The frozen backbone runs on PyTorch: onnxruntime is not installed (pip install onnxruntime)" in (
        caplog.text
    )
    with pytest.raises(ConfigError, match="onnxruntime is not installed"):
        resolve_runtime("onnx", CPU, torch.float32)


@pytest.mark.slow
def test_an_export_is_made_once_checked_and_reused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The session agrees with PyTorch within the tolerance at any batch size and memory format;
    a second call opens the file (no export); other weights or another input size are another
    export; a session pickles as its path."""
    net = small_net()
    session = session_for(net, (3, 16, 16), tmp_path, "The net")
    assert isinstance(session, OnnxModule) and session.name.startswith("onnxruntime ")
    (made,) = tmp_path.glob("*.onnx")
    record = json.loads(made.with_suffix(".json").read_text())
    assert record["tolerance"] == PARITY_RTOL and 0 <= record["parity"] <= PARITY_RTOL
    for batch in (1, 5):
        x = torch.randn(batch, 3, 16, 16).contiguous(memory_format=torch.channels_last)
        with torch.no_grad():
            want = net(x)
        assert (session(x) - want).abs().max() <= PARITY_RTOL * want.abs().max()

    def no_export(*args, **kwargs):
        raise AssertionError("exported again")

    monkeypatch.setattr(onnx_runtime, "_export", no_export)
    again = session_for(net, (3, 16, 16), tmp_path, "The net")
    assert again is not None and again.path == made
    monkeypatch.undo()
    assert session_for(small_net(seed=1), (3, 16, 16), tmp_path, "The net").path != made
    assert session_for(net, (3, 24, 24), tmp_path, "The net").path != made
    assert len(list(tmp_path.glob("*.onnx"))) == 3
    x = torch.randn(2, 3, 16, 16)
    assert torch.equal(pickle.loads(pickle.dumps(session))(x), session(x))


@pytest.mark.slow
def test_what_cannot_be_exported_or_disagrees_runs_on_pytorch_said_in_one_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.INFO, logger="transferkit"):
        assert session_for(DataDependent(), (3, 8, 8), tmp_path / "a", "The odd one") is None
    assert "The odd one runs on PyTorch: it cannot be exported to ONNX (" in caplog.text
    caplog.clear()
    monkeypatch.setattr(onnx_runtime, "PARITY_RTOL", 0.0)  # any rounding difference fails it
    monkeypatch.setattr(
        OnnxModule, "__call__", lambda self, x: torch.from_numpy(
            self.session.run(None, {self.input: x.contiguous().numpy()})[0]
        ) + 1e-3,
    )  # fmt: skip
    with caplog.at_level(logging.INFO, logger="transferkit"):
        assert session_for(small_net(), (3, 8, 8), tmp_path / "b", "The net") is None
    assert "The net runs on PyTorch: its onnxruntime export differs from PyTorch by" in caplog.text
    assert not list((tmp_path / "b").glob("*.onnx"))  # nothing kept that failed its check


@pytest.mark.slow
def test_a_frozen_run_gives_pytorch_s_numbers_on_onnxruntime_cached_or_not(
    compose_train, tmp_path: Path, tiny_overrides: list[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """finetune=freeze and partial, data.augment=false: onnxruntime cached, onnxruntime uncached
    and PyTorch agree on val (loss within 1e-3, the same accuracy); the session computes every
    image the uncached run sees, and none in PyTorch's; the runtime is recorded in results.json
    and the checkpoint, and is part of the cache key (PyTorch's cache is another)."""
    ran: list[int] = []
    call = OnnxModule.__call__
    monkeypatch.setattr(OnnxModule, "__call__", lambda self, x: ran.append(len(x)) or call(self, x))
    epochs, images = 3, 36 + 12  # the image folder's train and val
    for strategy in ("freeze", "partial"):
        common = [
            *tiny_overrides,
            f"finetune={strategy}",
            "data.augment=false",
            f"trainer.max_epochs={epochs}",
        ]
        runs, seen = {}, {}
        for name, extra in {
            "onnx": ["features.runtime=onnx"],
            "onnx_uncached": ["features.runtime=onnx", "features.cache=false"],
            "torch": ["features.runtime=torch"],
        }.items():
            ran.clear()
            runs[name] = train(compose_train(tmp_path / strategy / name, [*common, *extra]))
            seen[name] = sum(ran)
        onnx, uncached, plain = runs["onnx"], runs["onnx_uncached"], runs["torch"]
        assert seen["torch"] == 0 and seen["onnx"] >= images  # the cache: one pass (and the check)
        assert seen["onnx_uncached"] >= epochs * images  # every epoch's images, val's included
        assert onnx["runtime"].startswith("onnxruntime ") and uncached["runtime"] == onnx["runtime"]
        assert plain["runtime"] == TORCH
        assert onnx["feature_cache"] and plain["feature_cache"] and uncached["feature_cache"] is None
        assert Path(onnx["feature_cache"]).name != Path(plain["feature_cache"]).name
        assert onnx["val/loss"] == pytest.approx(uncached["val/loss"], abs=1e-5)
        assert onnx["val/loss"] == pytest.approx(plain["val/loss"], abs=1e-3)
        assert onnx["val/acc"] == uncached["val/acc"] == plain["val/acc"]
        record = torch.load(onnx["best_model_path"], map_location="cpu", weights_only=True)["transferkit"]
        assert record["runtime"] == onnx["runtime"]
        written = json.loads((Path(onnx["best_model_path"]).parents[1] / "results.json").read_text())
        assert written["runtime"] == onnx["runtime"]


@pytest.mark.slow
def test_a_run_whose_backbone_cannot_be_exported_trains_on_pytorch(
    compose_train,
    tmp_path: Path,
    tiny_overrides: list[str],
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    def refuse(*args, **kwargs):
        raise RuntimeError("unsupported operator aten::made_up\nmore detail")

    monkeypatch.setattr(onnx_runtime, "_export", refuse)
    with caplog.at_level(logging.INFO, logger="transferkit"):
        results = train(
            compose_train(tmp_path, [*tiny_overrides, "features.exports_dir=" + str(tmp_path / "x")])
        )
    assert results["runtime"] == TORCH and results["feature_cache"]
    assert (
        "The frozen backbone runs on PyTorch: it cannot be exported to ONNX (unsupported operator "
        "aten::made_up)" in caplog.text
    )


@pytest.mark.slow
def test_model_compile_keeps_pytorch_and_refuses_an_explicit_onnx(
    compose_train, tmp_path: Path, tiny_overrides: list[str]
) -> None:
    with pytest.raises(ConfigError, match="features.runtime=onnx and model.compile=true both choose"):
        train(compose_train(tmp_path, [*tiny_overrides, "model.compile=true", "features.runtime=onnx"]))


@pytest.mark.slow
def test_the_audit_and_a_frozen_run_share_one_export_and_one_feature_cache(
    compose_train, tmp_path: Path, image_folder: Path
) -> None:
    """The shipped Lite0 weights at 32 px: the audit after a default frozen run on the same data
    reuses its features, computed by the same onnxruntime export (a run's frozen BatchNorm,
    which stops tracking statistics, computes what the audit's unfrozen one does)."""
    from conftest import compose_task, tiny_run

    from transferkit.tasks.audit import audit

    exports, cache = tmp_path / "exports", tmp_path / "cache"
    shared = [f"features.exports_dir={exports}", f"features.dir={cache}", "data.image_size=32"]
    overrides = [o for o in tiny_run(image_folder) if not o.startswith(("model.", "features.exports_dir"))]
    trained = train(compose_train(tmp_path / "train", [*overrides, *shared, "data.augment=false"]))
    assert trained["runtime"].startswith("onnxruntime ")
    audited = audit(
        compose_task(
            "audit",
            tmp_path / "audit",
            ["data=imagefolder", f"data.root={image_folder}", "data.num_workers=0", *shared],
        )
    )
    assert audited["feature_cache_reused"] and audited["feature_cache"] == trained["feature_cache"]
    assert len(list(exports.glob("*.onnx"))) == 1


@pytest.mark.slow
def test_a_resume_may_change_the_runtime_and_records_the_one_it_ran_on(
    compose_train, tmp_path: Path, tiny_overrides: list[str]
) -> None:
    """A run on onnxruntime resumed with features.runtime=torch goes on (the two agree within
    the parity tolerance) on a cache of its own, and says which runtime it ended on."""
    common = [*tiny_overrides, "data.augment=false"]
    first = train(compose_train(tmp_path, [*common, "trainer.max_epochs=2"]))
    resumed = train(
        compose_train(tmp_path, [*common, "trainer.max_epochs=3", "features.runtime=torch", "ckpt_path=last"])
    )
    assert first["runtime"].startswith("onnxruntime ") and resumed["runtime"] == TORCH
    assert resumed["epochs"] == 3 and resumed["feature_cache"] != first["feature_cache"]
    record = torch.load(Path(resumed["best_model_path"]).with_name("last.ckpt"), weights_only=True)
    assert record["transferkit"]["runtime"] == TORCH


@pytest.mark.slow
def test_making_an_export_draws_nothing_from_the_random_generators(tmp_path: Path) -> None:
    """A run that exports and one that finds the export go on with the same random numbers."""
    net = small_net(seed=3)
    torch.manual_seed(7)
    expected = torch.rand(3)
    torch.manual_seed(7)
    assert session_for(net, (3, 16, 16), tmp_path, "The net") is not None
    assert torch.equal(torch.rand(3), expected)
