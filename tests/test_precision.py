"""The precision a run's frozen backbone computes in: one decision per run, never read from the
host's CPU kind, recorded in the checkpoint and results.json, and applied identically with the
feature cache on and off (so turning the cache on never changes what trains)."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import lightning as L
import pytest
import torch
from conftest import compose_task
from torch import nn

from transferkit.errors import ConfigError
from transferkit.features import precision
from transferkit.features.precision import checkpoint_precision, resolve_precision, run_precision
from transferkit.model.module import RECORD_KEY
from transferkit.tasks.eval import evaluate
from transferkit.tasks.train import train

SEEN: list[dict[str, list[str]]] = []  # what trained, one entry per epoch, from TrainingState


class TrainingState(L.Callback):
    """Records, at each epoch's first batch, which parameters train and which BatchNorm layers
    are in training mode (what a cached and an uncached run must agree on)."""

    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch, batch_idx: int
    ) -> None:
        if batch_idx == 0:
            SEEN.append(
                {
                    "trainable": sorted(n for n, p in pl_module.named_parameters() if p.requires_grad),
                    "bn_training": sorted(
                        n
                        for n, m in pl_module.named_modules()
                        if isinstance(m, nn.BatchNorm2d) and m.training
                    ),
                }
            )


def native(monkeypatch: pytest.MonkeyPatch, value: bool) -> None:
    """Run as on a CPU with (True) or without native bf16: what `auto` would read if it read it."""
    monkeypatch.setattr(precision, "cpu_has_native_bf16", lambda: value)


def test_auto_is_fp32_on_every_cpu_kind_and_bf16_on_a_cuda_device_with_it(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    for value in (False, True):
        native(monkeypatch, value)
        assert resolve_precision("auto", cpu) == torch.float32
        assert resolve_precision("bf16", cpu) == torch.bfloat16
    for supported, expected in ((True, torch.bfloat16), (False, torch.float32)):
        monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda supported=supported: supported)
        assert resolve_precision("auto", cuda) == expected


def test_a_run_that_trains_blocks_computes_its_frozen_ones_in_fp32(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: True)
    cuda = torch.device("cuda")
    assert run_precision("auto", cuda, trains_backbone=False, strategy="finetune=freeze") == torch.bfloat16
    assert run_precision("auto", cuda, trains_backbone=True, strategy="finetune=partial") == torch.float32
    assert run_precision("fp32", cuda, trains_backbone=True, strategy="finetune=partial") == torch.float32
    with pytest.raises(
        ConfigError, match=r"^features.precision=bf16 .* finetune=partial trains blocks of it"
    ):
        run_precision("bf16", cuda, trains_backbone=True, strategy="finetune=partial")
    with pytest.raises(ConfigError, match=r"features.precision='half' is not one of"):
        run_precision("half", cuda, trains_backbone=True, strategy="finetune=partial")


def test_eval_runs_the_recorded_precision_whatever_the_cpu(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    cpu = torch.device("cpu")
    for value in (False, True):
        native(monkeypatch, value)
        assert checkpoint_precision(None, torch.bfloat16, cpu) == torch.bfloat16
        assert checkpoint_precision(None, torch.float32, cpu) == torch.float32
        assert checkpoint_precision("fp32", torch.bfloat16, cpu) == torch.float32
    native(monkeypatch, False)
    with caplog.at_level(logging.INFO, logger="transferkit"):
        checkpoint_precision(None, torch.bfloat16, cpu)
    assert "only emulates: slower, with the run's numbers (precision=fp32 runs faster" in caplog.text


# (strategy, features.precision, as a CPU with native bf16?, what the frozen part computes in)
MATRIX = [
    ("freeze", "auto", True, "fp32"),
    ("freeze", "bf16", False, "bf16"),
    ("partial", "auto", True, "fp32"),
    ("gradual", "auto", True, "fp32"),
]


@pytest.mark.slow
@pytest.mark.parametrize(("strategy", "setting", "bf16_cpu", "expected"), MATRIX)
def test_the_cache_on_or_off_trains_the_same_thing_at_the_same_precision(
    compose_train,
    tmp_path: Path,
    tiny_overrides: list[str],
    monkeypatch: pytest.MonkeyPatch,
    strategy: str,
    setting: str,
    bf16_cpu: bool,
    expected: str,
) -> None:
    """data.augment=false, 3 epochs (gradual unfreezes its last block at epoch 1): the same
    parameters train and the same BatchNorm layers are in training mode at every epoch, val's
    loss agrees to 1e-5 (fp32) or 1e-3 (bf16, whose kernels round by batch) and val/acc exactly,
    and both runs record the one precision. `auto` runs as on a CPU with native bf16, which it
    must not read."""
    native(monkeypatch, bf16_cpu)
    overrides = [
        *tiny_overrides, f"finetune={strategy}", f"features.precision={setting}", "data.augment=false",
        "trainer.max_epochs=3", "+callbacks.state._target_=test_precision.TrainingState",
    ]  # fmt: skip
    runs, seen = {}, {}
    for cache in ("true", "false"):
        SEEN.clear()
        runs[cache] = train(compose_train(tmp_path / cache, [*overrides, f"features.cache={cache}"]))
        seen[cache] = list(SEEN)
    cached, plain = runs["true"], runs["false"]
    assert cached["feature_cache"] and plain["feature_cache"] is None
    assert len(seen["true"]) == 3 and seen["true"] == seen["false"]
    if strategy == "gradual":
        assert seen["true"][0]["trainable"] != seen["true"][2]["trainable"]  # the block joined
    assert cached["val/loss"] == pytest.approx(plain["val/loss"], abs=1e-5 if expected == "fp32" else 1e-3)
    assert cached["val/acc"] == plain["val/acc"]
    for run in (cached, plain):
        assert run["precision"] == expected
        record = torch.load(run["best_model_path"], map_location="cpu", weights_only=True)[RECORD_KEY]
        assert record["precision"] == expected
        written = json.loads((Path(run["best_model_path"]).parents[1] / "results.json").read_text())
        assert written["precision"] == expected


@pytest.mark.slow
def test_a_command_gives_the_same_numbers_on_either_cpu_kind(
    compose_train, tmp_path: Path, tiny_overrides: list[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The default precision on a CPU with native bf16 and on one without: the same run, to the
    bit (the host's kind is never read; before, auto trained in bf16 on the one and fp32 on the other)."""
    results = []
    for value in (True, False):
        native(monkeypatch, value)
        results.append(train(compose_train(tmp_path / str(value), [*tiny_overrides, "data.augment=false"])))
    assert results[0]["val/loss"] == results[1]["val/loss"] and results[0]["precision"] == "fp32"


@pytest.mark.slow
def test_a_bf16_run_is_evaluated_in_bf16_and_gives_its_numbers_on_a_cpu_without_it(
    compose_train, tmp_path: Path, tiny_overrides: list[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    native(monkeypatch, False)
    results = train(compose_train(tmp_path, [*tiny_overrides, "features.precision=bf16"]))
    assert results["precision"] == "bf16"
    evaluated = evaluate(
        compose_task("eval", tmp_path / "eval", [f"ckpt_path={results['best_model_path']}", "split=val"])
    )
    assert evaluated["val/acc"] == results["val/acc"]
    assert evaluated["val/loss"] == pytest.approx(results["val/loss"], abs=1e-4)


@pytest.mark.slow
def test_bf16_with_a_strategy_that_trains_blocks_is_refused_before_the_images_are_read(
    compose_train, tmp_path: Path, tiny_overrides: list[str]
) -> None:
    with pytest.raises(ConfigError, match=r"features.precision=bf16 .* finetune=partial trains blocks"):
        train(compose_train(tmp_path, [*tiny_overrides, "finetune=partial", "features.precision=bf16"]))
    assert not (tmp_path / ".cache" / "features").exists()
