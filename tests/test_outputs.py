"""What a run leaves to look at: every logger's files, the plots, and the dataset split helper."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
from conftest import ROOT, make_image_folder
from PIL import Image

from transferkit.errors import UserError
from transferkit.tasks.train import train


def png_size(path: Path) -> tuple[int, int]:
    with Image.open(path) as image:
        assert image.format == "PNG"
        image.verify()
        return image.size


def fast(tiny_overrides: list[str], *extra: str) -> list[str]:
    return [*tiny_overrides, "trainer.max_epochs=3", *extra]


@pytest.mark.slow  # about a second or more
def test_every_run_draws_its_curves_confusion_matrix_and_a_training_batch(
    compose_train, tmp_path: Path, tiny_overrides: list[str]
) -> None:
    results = train(compose_train(tmp_path, fast(tiny_overrides)))
    plots = tmp_path / "run" / "plots"
    for name in ("curves.png", "confusion_matrix.png", "train_batch.png"):
        width, height = png_size(plots / name)
        assert 400 <= width <= 3000 and 150 <= height <= 3000, name
    rows = (plots / "confusion_matrix.csv").read_text().splitlines()
    assert rows[0].split(",")[1:] == results["class_names"]
    counts = [[int(c) for c in row.split(",")[1:]] for row in rows[1:]]
    assert sum(map(sum, counts)) == 12  # the val images: the best checkpoint's last validation
    assert sum(counts[i][i] for i in range(3)) / 12 == pytest.approx(results["val/acc"])


@pytest.mark.slow
def test_csv_logger_gets_the_config_parameter_counts_and_final_metrics(
    compose_train, tmp_path: Path, tiny_overrides: list[str]
) -> None:
    results = train(compose_train(tmp_path, fast(tiny_overrides)))
    hparams = yaml.safe_load((tmp_path / "run" / "hparams.yaml").read_text())
    assert hparams["params/total"] == hparams["params/trainable"] + hparams["params/frozen"]
    assert hparams["params/trainable"] < hparams["params/frozen"]  # the frozen backbone
    assert hparams["config"]["finetune"]["_target_"].endswith("Freeze") and hparams["class_names"]
    lines = (tmp_path / "run" / "metrics.csv").read_text().splitlines()
    header = lines[0].split(",")
    final = dict(zip(header, lines[-1].split(","), strict=True))
    assert float(final["final/val/acc"]) == pytest.approx(results["val/acc"])


@pytest.mark.slow
def test_tensorboard_mlflow_and_many(compose_train, tmp_path: Path, tiny_overrides: list[str]) -> None:
    import mlflow

    results = train(compose_train(tmp_path, fast(tiny_overrides, "logger=many")))
    run = tmp_path / "run"
    assert list((run / "tensorboard").glob("events.out.tfevents.*")) and (run / "metrics.csv").is_file()
    store = tmp_path / "logs" / "mlflow" / "mlflow.db"
    assert store.is_file()
    mlflow.set_tracking_uri(f"sqlite:///{store}")
    (found,) = mlflow.search_runs(experiment_names=["train"], output_format="list")
    assert found.data.metrics["final/val/acc"] == pytest.approx(results["val/acc"])
    assert int(found.data.params["params/total"]) > int(found.data.params["params/trainable"]) > 0
    assert found.data.params["config/data/image_size"] == "32" and found.info.run_name == str(run)
    assert "val/acc" in found.data.metrics  # per-epoch metrics too


@pytest.mark.slow
def test_wandb_runs_offline_without_a_key(
    compose_train, tmp_path: Path, tiny_overrides: list[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.netrc login either
    monkeypatch.setenv("WANDB_SILENT", "true")
    train(compose_train(tmp_path, fast(tiny_overrides, "logger=wandb")))
    (offline,) = (tmp_path / "run" / "wandb").glob("offline-run-*")
    (records,) = offline.glob("run-*.wandb")  # what `wandb sync` uploads: config, history, summary
    data = records.read_bytes()
    for key in (b"params/total", b"task_name", b"val/acc", b"final/val/acc"):
        assert key in data, key


def load_script(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def count_images(root: Path) -> dict[str, dict[str, int]]:
    return {
        s: {c: len(list((root / s / c).rglob("*.png"))) for c in ("a", "b")} for s in ("train", "val", "test")
    }


@pytest.mark.slow
def test_split_folder_is_stratified_seeded_and_copies_or_links(tmp_path: Path) -> None:
    split = load_script("split_folder").split_folder
    source = make_image_folder(tmp_path / "src", classes=("a", "b"), splits={"all": 10}) / "all"
    (source / "b" / "deeper").mkdir()
    (source / "b" / "000.png").rename(source / "b" / "deeper" / "000.png")
    proc = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "split_folder.py"), str(source), str(tmp_path / "dst"),
         "--val", "0.2", "--test", "0.1"], capture_output=True, text=True,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert count_images(tmp_path / "dst") == {
        "train": {"a": 7, "b": 7},
        "val": {"a": 2, "b": 2},
        "test": {"a": 1, "b": 1},
    }
    assert "train: 14 images (a 7, b 7)" in proc.stdout
    assert len(list((tmp_path / "dst").rglob("deeper/000.png"))) == 1  # sub-folders are kept
    split(source, tmp_path / "again", val=0.2, test=0.1, seed=42, link=True)
    first = sorted(p.relative_to(tmp_path / "dst") for p in (tmp_path / "dst").rglob("*.png"))
    second = sorted(p.relative_to(tmp_path / "again") for p in (tmp_path / "again").rglob("*.png"))
    assert first == second  # seeded: the same split
    assert all(p.is_symlink() for p in (tmp_path / "again").rglob("*.png"))
    split(source, tmp_path / "other", val=0.2, test=0.0, seed=1, link=False)
    val_names = sorted(p.name for p in (tmp_path / "dst" / "val").rglob("*.png"))
    assert sorted(p.name for p in (tmp_path / "other" / "val").rglob("*.png")) != val_names
    with pytest.raises(UserError, match="exists and is not empty"):
        split(source, tmp_path / "dst", val=0.2, test=0.0, seed=42, link=False)
    with pytest.raises(UserError, match="summing to less than 1"):
        split(source, tmp_path / "x", val=0.6, test=0.5, seed=42, link=False)


def test_split_counts_keep_a_training_image_and_give_each_split_one() -> None:
    counts = load_script("split_folder").split_counts
    assert counts(10, 0.2, 0.1) == (7, 2, 1)
    assert counts(3, 0.2, 0.1) == (1, 1, 1)  # a small class still reaches every split
    assert counts(2, 0.2, 0.1) == (1, 1, 0) and counts(1, 0.5, 0.0) == (1, 0, 0)  # val before test


def test_real_data_splits_each_stratum_by_its_seed(tmp_path: Path) -> None:
    """scripts/real_data.py (the measurements' datasets): per stratum, val_fraction to val/,
    the same files for the same seed."""
    write_folder = load_script("real_data").write_folder
    grey = np.zeros((8, 8), dtype=np.uint8)
    samples = [
        (f"{label}-{kind}", label, load_script("real_data")._grey(grey))
        for label in "ab"
        for kind in "xyz"
        for _ in range(4)
    ]
    for run in ("one", "two"):
        write_folder(samples, tmp_path / run, 0.25, seed=5)
    listed = {
        run: sorted(p.relative_to(tmp_path / run) for p in (tmp_path / run).rglob("*.png"))
        for run in ("one", "two")
    }
    assert listed["one"] == listed["two"] and len(listed["one"]) == 24
    val = [p for p in listed["one"] if p.parts[0] == "val"]
    assert len(val) == 6 and {p.parts[1] for p in val} == {"a", "b"}  # one of each 4 per stratum
