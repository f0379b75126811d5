"""DDP: one run directory and one results.json, metrics synced, and replicas that agree after a
block is unfrozen mid-run; SyncBatchNorm that keeps timm's fused activations and frozen modes."""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

import pytest
import torch
from conftest import ROOT, TINY_MODEL, run_cli

from transferkit.distributed import SyncBatchNorm
from transferkit.module import TransferModule


def test_sync_batchnorm_keeps_activations_modes_and_outputs() -> None:
    model = TransferModule(TINY_MODEL, ["a", "b"], weights=None).eval()
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        expected = model(images)
    model.backbone.requires_grad_(False)
    model.train()  # the frozen backbone stays in eval
    modes = {name: m.training for name, m in model.named_modules()}
    synced = SyncBatchNorm().apply(model)
    kinds = {type(m).__name__ for m in synced.modules()}
    assert "SyncBatchNormAct" in kinds and "BatchNormAct2d" not in kinds
    assert {name: m.training for name, m in synced.named_modules()} == modes
    reverted = SyncBatchNorm().revert(synced)
    assert "BatchNormAct2d" in {type(m).__name__ for m in reverted.modules()}
    assert {name: m.training for name, m in reverted.named_modules()} == modes
    with torch.no_grad():
        torch.testing.assert_close(reverted.eval()(images), expected, rtol=0, atol=0)


def rank_lines(run_dir: Path, what: str) -> dict[int, str]:
    """`Rank r: <what> <value>` from every rank's log (rank 0: train.log, rank 1: train_ddp_process_1.log)."""
    found = {}
    for log in run_dir.glob("*.log"):
        for rank, value in re.findall(rf"Rank (\d+): {what} (.+)", log.read_text()):
            found[int(rank)] = value.strip()
    return found


def ddp_sim(tmp_path: Path, image_folder: Path, *extra: str):
    return run_cli(
        "train.py", "data=imagefolder", f"data.root={image_folder}", "data.image_size=32",
        "data.num_workers=0", f"model.name={TINY_MODEL}", "model.weights=null", "trainer=ddp_sim",
        "trainer.max_epochs=2",
        "finetune=gradual", "finetune.unfreeze_at_epoch=1", "callbacks.rich_progress_bar=null", *extra,
        cwd=tmp_path, timeout=300,
    )  # fmt: skip


@pytest.mark.slow
def test_ddp_sim_writes_once_syncs_metrics_and_keeps_replicas_equal_after_an_unfreeze(
    tmp_path: Path, image_folder: Path
) -> None:
    proc = ddp_sim(tmp_path, image_folder)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    (run_dir,) = (tmp_path / "logs" / "train" / "runs").iterdir()  # not one per rank
    assert [p.parent for p in tmp_path.rglob("results.json")] == [run_dir]
    results = json.loads((run_dir / "results.json").read_text())
    assert results["epochs"] == 2 and (run_dir / "checkpoints" / "last.ckpt").is_file()
    metrics = {rank: json.loads(value) for rank, value in rank_lines(run_dir, "metrics").items()}
    assert set(metrics) == {0, 1} and metrics[0] == metrics[1]
    assert metrics[0]["val/acc"] == pytest.approx(results["val/acc"])
    weights = rank_lines(run_dir, "weights")
    assert set(weights) == {0, 1} and weights[0] == weights[1]  # the unfrozen blocks were all-reduced


@pytest.mark.slow
def test_lightning_s_own_ddp_lets_replicas_drift_after_an_unfreeze(
    tmp_path: Path, image_folder: Path
) -> None:
    """Why trainer=ddp uses FinetuneDDPStrategy: the check above can fail."""
    proc = ddp_sim(tmp_path, image_folder, "~trainer.strategy", "+trainer.strategy=ddp")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    (run_dir,) = (tmp_path / "logs" / "train" / "runs").iterdir()
    weights = rank_lines(run_dir, "weights")
    assert set(weights) == {0, 1} and weights[0] != weights[1]


def test_gpu_smoke_refuses_to_run_without_a_gpu() -> None:
    if torch.cuda.is_available():
        pytest.skip("a GPU is present: the script would run for real")
    proc = subprocess.run(["bash", str(ROOT / "scripts" / "gpu_smoke.sh")], capture_output=True, text=True)
    assert proc.returncode == 1 and "no CUDA GPU visible" in proc.stderr
