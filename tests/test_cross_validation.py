"""Cross-validation (data.folds, data.fold): the folds, the held-out split, one feature cache for
every fold, the summary and out-of-fold probabilities, fold sweeps on the leaderboard; and
data.exclude."""

from __future__ import annotations

import csv
import json
import shutil
import statistics
from collections import Counter
from pathlib import Path

import pytest
from conftest import compose_task, main_exits, make_image_folder, tiny_run

from transferkit.data.datamodule import ImageFolderDataModule
from transferkit.data.folders import Splits
from transferkit.data.folds import assign_folds, cross_validation_fold
from transferkit.data.splitting import numbering
from transferkit.errors import ConfigError, DataError
from transferkit.runs.sweeps import group_folds, write_leaderboard

ROOT = Path("/d")


def pool(n_per_class: int = 10, classes: int = 3) -> list[tuple[Path, int]]:
    return [(ROOT / f"{c}_{i:02d}.png", c) for c in range(classes) for i in range(n_per_class)]


def test_folds_are_seeded_per_file_and_blind_to_listing_order() -> None:
    """A file's fold is floor(its number * k): a share of every class in every fold, within a
    hash's spread (test_splits.py: no file changes fold when others come or go)."""
    samples = pool(30)
    folds = assign_folds(samples, 3, seed=7, root=ROOT)
    number = numbering(ROOT, seed=7)
    assert folds == {path: int(number(path) * 3) for path, _ in samples}
    for fold in range(3):
        assert len(Counter(label for path, label in samples if folds[path] == fold)) == 3
    assert assign_folds(list(reversed(samples)), 3, seed=7, root=ROOT) == folds
    assert assign_folds(samples, 3, seed=8, root=ROOT) != folds


def test_a_fold_validates_on_its_part_of_the_pool_and_tests_on_the_held_out_split() -> None:
    samples = pool()
    held_out = [(Path("/d/val.png"), 0)]
    own_val = Splits(["a", "b", "c"], samples, held_out, None, val_from_train=False)
    parts = [cross_validation_fold(own_val, 3, fold, 1, ROOT) for fold in range(3)]
    assert all(p.test == held_out and p.pool == sorted(samples) for p in parts)
    assert sorted(s for p in parts for s in p.val) == sorted(samples)  # every image held out once
    assert all(set(p.train).isdisjoint(p.val) and len(p.train) + len(p.val) == 30 for p in parts)
    # a val cut from train goes back into the pool; a test split is what stays held out
    cut = Splits(["a", "b", "c"], samples[:20], samples[20:], held_out, val_from_train=True)
    assert cross_validation_fold(cut, 3, 0, 1, ROOT).pool == sorted(samples)
    assert cross_validation_fold(cut, 3, 0, 1, ROOT).test == held_out


def test_fold_settings_and_a_fold_without_a_class_are_refused(tmp_path: Path) -> None:
    for kwargs, message in [
        ({"folds": 1}, "data.folds=1 must be 2 or more"),
        ({"folds": 3, "fold": 3}, r"data.fold=3 must lie in 0..2"),
        ({"fold": 0}, "data.fold=0 needs data.folds=K"),
    ]:
        with pytest.raises(ConfigError, match=message):
            ImageFolderDataModule(tmp_path, **kwargs)
    samples = [*pool(4, 2), (Path("/d/rare.png"), 2)]
    with pytest.raises(DataError, match=r"Fold \d of 2 has no training image of class\(es\) c") as refused:
        for fold in range(2):
            cross_validation_fold(Splits(["a", "b", "c"], samples, [], None, True), 2, fold, 0, ROOT)
    # fewer folds would make it likelier (a class of n in one of k folds: k ** (1 - n))
    assert "fewer" not in str(refused.value) and "another seed" in str(refused.value)


def test_data_exclude_leaves_out_the_listed_images(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    root = make_image_folder(tmp_path / "data", splits={"train": 4, "val": 2})
    listed = tmp_path / "exclude.txt"
    absolute = root / "val" / "square" / "000.png"
    listed.write_text(f"# from the audit\ntrain/circle/000.png\n\n{absolute}\nnot/there.png\n")
    data = ImageFolderDataModule(root, exclude=listed, num_workers=0).folders
    kept = {path for path, _ in data.train + data.val}
    assert len(kept) == 16 and root / "train" / "circle" / "000.png" not in kept and absolute not in kept
    assert "1 path(s) that data.exclude=" in caplog.text
    with pytest.raises(DataError, match="does not exist"):
        _ = ImageFolderDataModule(root, exclude=tmp_path / "nope.txt", num_workers=0).folders
    listed.write_text("".join(f"train/circle/{i:03d}.png\n" for i in range(4)))
    with pytest.raises(DataError, match=r"Without the images data.exclude=.* lists, class\(es\) circle"):
        _ = ImageFolderDataModule(root, exclude=listed, num_workers=0).folders


@pytest.mark.slow
def test_a_fold_sweep_is_refused_a_seed_each_job_would_draw(tmp_path: Path, caplog) -> None:
    from transferkit.tasks.train import main

    cfg = compose_task("train", tmp_path, [*tiny_run(tmp_path), "data.folds=3", "data.fold=1", "seed=null"])
    code, lines = main_exits(main, cfg, caplog)
    assert code == 2 and len(lines) == 1 and "data.fold with seed=null" in lines[0]


def board_row(job: int, fold: int, value: float, lr: str = "0.1") -> dict:
    return {
        "job": job,
        "overrides": [f"optimizer.lr={lr}", f"data.fold={fold}"],
        "status": "ok",
        "metric": "val/acc",
        "value": value,
        "metrics": {"val/acc": value},
        "wall_s": 2.0,
        "run_dir": f"/sweep/{job}",
        "error": "",
    }


def test_the_leaderboard_groups_the_folds_of_a_setting_into_mean_and_std(tmp_path: Path) -> None:
    rows = [
        board_row(0, 0, 0.8),
        board_row(1, 1, 0.6),
        board_row(2, 0, 0.9, "0.01"),
        board_row(3, 1, 0.8, "0.01"),
    ]
    grouped = group_folds(rows)
    assert [(g["jobs"], g["overrides"]) for g in grouped] == [
        ([0, 1], ["optimizer.lr=0.1", "data.fold=0,1"]),
        ([2, 3], ["optimizer.lr=0.01", "data.fold=0,1"]),
    ]
    assert grouped[0]["value"] == pytest.approx(0.7) and grouped[0]["stds"]["val/acc"] == pytest.approx(
        statistics.stdev([0.8, 0.6])
    )
    table = write_leaderboard(tmp_path, sorted(grouped, key=lambda g: -g["value"]))
    assert table[0]["val/acc"] == "0.8500 ± 0.0707" and table[0]["job"] == "2,3"
    with open(tmp_path / "leaderboard.csv", newline="") as f:
        first = next(csv.DictReader(f))
    assert (first["val/acc"], first["val/acc_std"]) == ("0.8500", "0.0707")
    assert (tmp_path / "leaderboard.md").read_text().startswith("# Leaderboard: 4 jobs")


@pytest.mark.slow
def test_a_cross_validation_shares_one_cache_and_reports_every_fold(
    compose_train, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """3 folds of train/ (val/ held out, measured as each fold's test): one cache, built in one
    pass over the pool (shared by the folds' train and val) and one over val/; the mean of the
    folds' results; every pool image once in oof.csv, in the fold the data cut it into; eval.py
    of a fold's checkpoint finds that fold's val again. Resumed after an interruption, it keeps
    the folds done and ends with the same numbers."""
    from transferkit.features import cache as cache_module
    from transferkit.tasks.eval import evaluate
    from transferkit.tasks.train import train

    passes: list[int] = []
    extract = cache_module.extract

    def counting(*args, **kwargs):
        ran = extract(*args, **kwargs)
        passes.append(ran)
        return ran

    monkeypatch.setattr(cache_module, "extract", counting)
    data = make_image_folder(tmp_path / "data", splits={"train": 6, "val": 2})
    run = [*tiny_run(data, epochs=2), "data.folds=3", f"features.dir={tmp_path}/cache"]
    results = train(compose_train(tmp_path, run))
    caches = [p for p in (tmp_path / "cache").iterdir() if p.suffix != ".lock"]  # its lock file stays
    assert passes == [18, 6] and len(caches) == 1
    per_fold = [json.loads((Path(d) / "results.json").read_text()) for d in results["fold_dirs"]]
    for key in ("val/acc", "val/loss", "test/acc"):
        values = [fold[key] for fold in per_fold]
        assert results[key] == pytest.approx(statistics.fmean(values))
        assert results[f"{key}_std"] == pytest.approx(statistics.stdev(values))
        assert results["fold_metrics"][key] == pytest.approx(values, abs=1e-6)
    assert list(results)[:2] == ["val/acc", "val/acc_std"] and results["folds"] == 3
    with open(results["oof"], newline="") as f:
        oof = list(csv.DictReader(f))
    folds = assign_folds(ImageFolderDataModule(data, val_fraction=0.2).folders.train, 3, 42, data)
    assert {Path(r["path"]): int(r["fold"]) for r in oof} == folds
    assert all(abs(sum(float(r[f"prob:{c}"]) for c in results["class_names"]) - 1) < 1e-4 for r in oof)
    best = per_fold[1]["best_model_path"]
    measured = evaluate(compose_task("eval", tmp_path / "eval", [f"ckpt_path={best}", "split=val"]))
    held_out_by_1 = sum(r["fold"] == "1" for r in oof)
    assert measured["images"] == held_out_by_1
    assert measured["val/acc"] == pytest.approx(per_fold[1]["val/acc"], abs=1e-4)
    # interrupted: fold 1 trained but not measured, fold 2 not started; ckpt_path=last goes on
    fold_dirs = [Path(d) for d in results["fold_dirs"]]
    kept = (fold_dirs[0] / "results.json").stat().st_mtime_ns
    (fold_dirs[1] / "results.json").unlink()
    shutil.rmtree(fold_dirs[2])
    resumed = train(compose_train(tmp_path, [*run, "ckpt_path=last"]))
    assert (fold_dirs[0] / "results.json").stat().st_mtime_ns == kept  # read back, not trained again
    for key in ("val/acc", "val/acc_std", "val/loss", "test/acc"):
        assert resumed[key] == pytest.approx(results[key], abs=1e-6), key
    with open(results["oof"], newline="") as f:
        assert list(csv.DictReader(f)) == oof
    # one fold alone (a job of a fold sweep) trains what the cross-validation's fold 1 trained
    alone = train(compose_train(tmp_path / "alone", [*run, "data.fold=1"]))
    assert alone["val/acc"] == pytest.approx(per_fold[1]["val/acc"], abs=1e-6)
    with open(tmp_path / "alone" / "run" / "oof.csv", newline="") as f:
        assert list(csv.DictReader(f)) == [r for r in oof if r["fold"] == "1"]
