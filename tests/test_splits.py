"""A split is a function of the file, not of its neighbours: adding or removing images never
moves another image between train, val and the folds, for folders, label files and labels in
file names; checkpoints record a digest of each split, and eval and a resume compare it."""

from __future__ import annotations

import csv
import hashlib
import logging
import shutil
from pathlib import Path

import pytest
import torch
from conftest import compose_task, main_exits, make_image_folder, make_label_file, tiny_run
from PIL import Image

from transferkit.data import ImageFolderDataModule, LabelFileDataModule
from transferkit.data.file_names import find_named_splits
from transferkit.data.folders import find_splits
from transferkit.errors import DataError
from transferkit.runs.checkpoints import recorded_splits

PET_NAME = r"^(.+)_\d+\.png$"


def members(samples: list) -> set[Path]:
    return {path for path, _ in samples}


def add_copy(root: Path, source: str, name: str) -> Path:
    """A new image beside `source` (a copy of it), as a user adds one."""
    target = (root / source).parent / name
    shutil.copy(root / source, target)
    return target


def where(splits, path: Path) -> str | None:
    return next((s for s in ("train", "val") if path in members(getattr(splits, s))), None)


def added_to(root: Path, split: str, **kwargs) -> Path:
    """A new file under root/train/circle/ (named to sort among the first) that the split puts in
    `split`, found by trying names: blind to how the split is made; left in place."""
    for i in range(100):
        path = add_copy(root, "train/circle/000.png", f"000{i:02d}.png")
        if where(find_splits(root, **kwargs), path) == split:
            return path
        path.unlink()
    raise AssertionError(f"no new file lands in {split}")


# --- folders ---------------------------------------------------------------------------------------


def test_adding_a_file_moves_no_other_file_between_train_and_val(tmp_path: Path) -> None:
    root = make_image_folder(tmp_path, classes=("a", "b"), splits={"train": 20}, size=32)
    before = find_splits(root, val_fraction=0.2, seed=3)
    new = add_copy(root, "train/a/000.png", "zzz_new.png")
    after = find_splits(root, val_fraction=0.2, seed=3)
    assert members(after.val) - {new} == members(before.val)
    assert members(after.train) - {new} == members(before.train)


def test_removing_a_file_moves_no_other_file_between_train_and_val(tmp_path: Path) -> None:
    root = make_image_folder(tmp_path, classes=("a", "b"), splits={"train": 20}, size=32)
    before = find_splits(root, val_fraction=0.2, seed=3)
    # a class's only val image would leave it one to lend (the one exception): take another's
    val_of = {c: sorted(p for p, label in before.val if label == c) for c in (0, 1)}
    assert len(max(val_of.values(), key=len)) >= 2
    for gone in (sorted(members(before.train))[0], max(val_of.values(), key=len)[0]):
        gone.unlink()
        after = find_splits(root, val_fraction=0.2, seed=3)
        assert members(after.val) == members(before.val) - {gone}
        assert members(after.train) == members(before.train) - {gone}
        before = after


def test_the_split_follows_the_path_under_the_root_and_the_seed(tmp_path: Path) -> None:
    root = make_image_folder(tmp_path / "here", classes=("a", "b", "c"), splits={"train": 20}, size=32)
    first = find_splits(root, val_fraction=0.25, seed=1)
    moved = shutil.copytree(root, tmp_path / "elsewhere")

    def relative(samples: list, base: Path) -> set[str]:
        return {str(path.relative_to(base)) for path, _ in samples}

    assert relative(find_splits(moved, 0.25, seed=1).val, moved) == relative(first.val, root)
    assert relative(find_splits(root, 0.25, seed=2).val, root) != relative(first.val, root)
    assert 9 <= len(first.val) <= 21  # 25% of 60, within the spread of a hash


def test_only_a_class_s_loaned_image_can_change_sides(tmp_path: Path) -> None:
    """The one exception, as documented: a class none of whose images falls below the fraction
    lends val its lowest-numbered one, which goes back to train when one that falls below comes."""
    from transferkit.data.splitting import numbering

    root = make_image_folder(tmp_path, classes=("a", "b"), splits={"train": 3}, size=32)
    number = numbering(root, seed=0)
    fraction = min(number(p) for p in (root / "train" / "a").iterdir()) / 2  # below every image of a
    before = find_splits(root, val_fraction=fraction, seed=0)
    loaned = min((root / "train" / "a").iterdir(), key=number)
    assert loaned in members(before.val)
    new = next(p for i in range(500) if number(p := root / "train" / "a" / f"new_{i}.png") < fraction)
    shutil.copy(loaned, new)
    after = find_splits(root, val_fraction=fraction, seed=0)
    assert members(after.val) - members(before.val) == {new} and members(before.val) - members(after.val) == {
        loaned
    }


def test_a_small_class_keeps_one_val_and_one_train_image(tmp_path: Path) -> None:
    """The guarantee the split always gave: a class of 2 or more holds out at least one image
    and trains on at least one; a class of one trains on it."""
    root = make_image_folder(tmp_path, classes=("a", "b", "c"), splits={"train": 2}, size=32)
    shutil.rmtree(root / "train" / "c")
    (root / "train" / "c").mkdir()
    shutil.copy(root / "train" / "a" / "000.png", root / "train" / "c" / "only.png")
    for seed in range(20):
        for fraction in (0.01, 0.99):
            splits = find_splits(root, val_fraction=fraction, seed=seed)
            assert sorted(label for _, label in splits.val) == [0, 1]
            assert sorted(label for _, label in splits.train) == [0, 1, 2]


def test_the_documented_rates_of_the_two_small_class_cases() -> None:
    """docs/data.md: a class of n none of whose images falls below 0.2 lends one in 0.8 ** n of
    seeds (10 images: 11%); a class of 2 lands wholly in one of 5 folds in 20% of them."""
    from transferkit.data.splitting import file_number

    seeds = range(3000)
    lends = sum(all(file_number(f"c/{i}.png", s) >= 0.2 for i in range(10)) for s in seeds)
    assert abs(lends / len(seeds) - 0.8**10) < 0.02
    one_fold = sum(len({int(file_number(f"c/{i}.png", s) * 5) for i in range(2)}) == 1 for s in seeds)
    assert abs(one_fold / len(seeds) - 0.2) < 0.03


# --- label files and file names --------------------------------------------------------------------


def test_a_missing_file_skipped_moves_no_other_file_of_a_label_file(tmp_path: Path) -> None:
    labels = make_label_file(tmp_path, splits={"train": 10}, split_column=False, size=32)
    before = LabelFileDataModule(tmp_path, labels, num_workers=0).folders
    gone = sorted(members(before.train))[3]
    gone.unlink()
    module = LabelFileDataModule(tmp_path, labels, num_workers=0, on_bad_image="skip")
    after = module.folders
    assert set(module.bad_images) == {gone}
    assert members(after.val) == members(before.val)
    assert members(after.train) == members(before.train) - {gone}


def test_a_multi_label_class_val_would_take_whole_gets_one_back_until_it_gains_one(tmp_path: Path) -> None:
    """The second documented exception: class c's two images (of combinations no other image
    has, so pooled) both fall below the fraction, so the first by path trains; it goes back to
    val once c gains a training image."""
    from transferkit.data.splitting import file_number

    seed = next(s for s in range(2000) if all(file_number(f"c_{x}.png", s) < 0.2 for x in "ab"))
    rows = [(f"img{i:02d}.png", "a" if i % 2 else "b") for i in range(20)]
    rows += [("c_a.png", "a;c"), ("c_b.png", "b;c")]

    def c_split(rows: list[tuple[str, str]]) -> tuple[set[str], set[str]]:
        with open(tmp_path / "labels.csv", "w", newline="") as f:
            csv.writer(f).writerows([("path", "label"), *rows])
        for name, _ in rows:
            (tmp_path / name).touch()  # listed, never decoded
        dm = LabelFileDataModule(tmp_path, tmp_path / "labels.csv", multilabel=True, seed=seed, num_workers=0)
        splits = dm.folders
        c = splits.class_names.index("c")
        return tuple({p.name for p, label in part if label[c]} for part in (splits.train, splits.val))

    assert c_split(rows) == ({"c_a.png"}, {"c_b.png"})
    new = next(f"c_new{i}.png" for i in range(500) if file_number(f"c_new{i}.png", seed) >= 0.2)
    assert c_split([*rows, (new, "a;b;c")]) == ({new}, {"c_a.png", "c_b.png"})


def test_adding_a_file_moves_no_other_file_of_labels_from_file_names(tmp_path: Path) -> None:
    for i in range(20):
        for breed in ("cat", "dog"):
            Image.new("RGB", (32, 32), (i * 9, 0, 0)).save(tmp_path / f"{breed}_{i}.png")
    before = find_named_splits(tmp_path, PET_NAME, val_fraction=0.2, seed=5)
    Image.new("RGB", (32, 32)).save(tmp_path / "cat_999.png")
    after = find_named_splits(tmp_path, PET_NAME, val_fraction=0.2, seed=5)
    new = tmp_path / "cat_999.png"
    assert members(after.val) - {new} == members(before.val)
    assert members(after.train) - {new} == members(before.train)


def test_labels_from_file_names_never_train_on_a_test_folder_without_train(tmp_path: Path) -> None:
    for i in range(6):
        for breed in ("cat", "dog"):
            Image.new("RGB", (32, 32), (i * 30, 0, 0)).save(tmp_path / f"{breed}_{i}.png")
    (tmp_path / "test").mkdir()
    tests = [tmp_path / "test" / f"{breed}_{100 + i}.png" for breed in ("cat", "dog") for i in range(2)]
    for path in tests:
        Image.new("RGB", (32, 32)).save(path)
    dm = ImageFolderDataModule(tmp_path, label_from=PET_NAME, num_workers=0)
    splits = dm.splits
    assert members(splits.test) == set(tests) and dm.has_test
    assert not members(splits.train + splits.val) & set(tests)
    assert len(splits.train) + len(splits.val) == 12


def test_labels_from_file_names_with_only_split_folders_have_nothing_to_train_on(tmp_path: Path) -> None:
    (tmp_path / "test").mkdir()
    Image.new("RGB", (32, 32)).save(tmp_path / "test" / "cat_1.png")
    with pytest.raises(DataError, match=r"holds no images to train on outside test/; put the training"):
        find_named_splits(tmp_path, PET_NAME)


# --- cross-validation folds ------------------------------------------------------------------------


def fold_vals(root: Path, folds: int = 3) -> list[set[Path]]:
    return [
        members(ImageFolderDataModule(root, folds=folds, fold=f, num_workers=0, seed=4).folders.val)
        for f in range(folds)
    ]


def test_a_file_added_between_folds_moves_no_other_file_to_another_fold(tmp_path: Path) -> None:
    """A cross-validation resumed on changed data: fold 0 was cut before the file came, folds 1
    and 2 after; no image is held out by two folds, and every old image keeps its fold."""
    root = make_image_folder(tmp_path, classes=("a", "b"), splits={"train": 12}, size=32)
    before = fold_vals(root)
    new = add_copy(root, "train/a/000.png", "zzz_new.png")
    after = fold_vals(root)
    assert [fold - {new} for fold in after] == before
    assert not before[0] & (after[1] | after[2])


# --- digests ---------------------------------------------------------------------------------------


def digest(paths: list[str]) -> str:
    return hashlib.sha256("\n".join(sorted(paths)).encode()).hexdigest()


def test_the_digest_of_a_split_is_the_sha256_of_its_sorted_relative_paths(tmp_path: Path) -> None:
    root = make_image_folder(tmp_path / "data", splits={"train": 6, "test": 2}, size=32)
    dm = ImageFolderDataModule(root, num_workers=0, seed=1)
    digests = dm.split_digests()
    for name in ("train", "val", "test"):
        paths = [path.relative_to(root).as_posix() for path, _ in getattr(dm.splits, name)]
        assert digests[name] == {"files": len(paths), "sha256": digest(paths)}
    moved = shutil.copytree(root, tmp_path / "moved")
    assert ImageFolderDataModule(moved, num_workers=0, seed=1).split_digests() == digests
    folds = ImageFolderDataModule(root, num_workers=0, seed=1, folds=2, fold=1)
    paths = [path.relative_to(root).as_posix() for path, _ in folds.splits.val]
    assert folds.split_digests()["val"]["sha256"] == digest(paths)


# --- eval and resume on changed data (a checkpoint each) ---------------------------------------------


@pytest.fixture(scope="module")
def train_only_run(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """One tiny run on train-only data (val split off by the seed), and its val images."""
    import os

    from transferkit.tasks.train import train

    base = tmp_path_factory.mktemp("train_only")
    data = make_image_folder(base / "data", splits={"train": 10}, size=32)
    results = train(compose_task("train", base, [*tiny_run(data, epochs=1), "seed=3"]))
    for var in ("PL_GLOBAL_SEED", "PL_SEED_WORKERS"):
        os.environ.pop(var, None)
    val = members(ImageFolderDataModule(data, num_workers=0, seed=3).folders.val)
    return {"base": base, "data": data, "ckpt": results["best_model_path"], "val": val}


def scored_by_eval(monkeypatch: pytest.MonkeyPatch) -> list[list[Path]]:
    """The paths each evaluation scores, as they are handed to the predictor."""
    from transferkit.tasks import eval as eval_task

    calls: list[list[Path]] = []
    predict = eval_task.predict_files

    def recording(predictor, paths, *args, **kwargs):
        calls.append([Path(p) for p in paths])
        return predict(predictor, paths, *args, **kwargs)

    monkeypatch.setattr(eval_task, "predict_files", recording)
    return calls


def eval_outcome(
    cfg, calls: list[list[Path]], caplog: pytest.LogCaptureFixture
) -> tuple[int | None, set[Path] | None, list[str]]:
    """What `python eval.py` does: its exit code (None: it finished), the paths it scored (None:
    none), and the lines it logged at warning level or above."""
    from transferkit.tasks.eval import main

    caplog.clear()
    scored, code = len(calls), None
    with caplog.at_level(logging.WARNING):
        try:
            main(cfg)
        except SystemExit as exited:
            code = exited.code
    lines = [
        line for r in caplog.records if r.levelno >= logging.WARNING for line in r.getMessage().splitlines()
    ]
    return code, set(calls[-1]) if len(calls) > scored else None, lines


@pytest.mark.slow
def test_eval_after_a_file_was_added_scores_the_run_s_val_or_refuses(
    train_only_run: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    data, ckpt, val = train_only_run["data"], train_only_run["ckpt"], train_only_run["val"]
    calls = scored_by_eval(monkeypatch)

    def evaluate_on(name: str, ckpt: str = ckpt, split: str = "val") -> tuple:
        return eval_outcome(
            compose_task("eval", tmp_path / name, [f"ckpt_path={ckpt}", f"split={split}"]), calls, caplog
        )

    new = add_copy(data, "train/circle/000.png", "00000.png")  # whatever split it falls in
    code, scored, lines = evaluate_on("any")
    new.unlink()
    assert (code is None and scored == val) or (code == 2 and scored is None), "scored other images"
    assert len(lines) == 1
    new = added_to(data, "train", val_fraction=0.2, seed=3)
    code, scored, lines = evaluate_on("to_train")
    new.unlink()
    assert code is None and scored == val  # exactly the run's val images
    assert len(lines) == 1 and "changed since the run" in lines[0] and "train" in lines[0]
    new = added_to(data, "val", val_fraction=0.2, seed=3)
    try:
        code, scored, lines = evaluate_on("to_val")
        assert code == 2 and scored is None and len(lines) == 1  # nothing scored
        assert "val split" in lines[0] and f"{len(val)} files" in lines[0] and f"{len(val) + 1}" in lines[0]
        old = tmp_path / "old.ckpt"  # a checkpoint from before the digests: not compared
        checkpoint = torch.load(ckpt, weights_only=True)
        checkpoint["transferkit"].pop("splits", None)
        torch.save(checkpoint, old)
        code, scored, lines = evaluate_on("old", str(old))
        assert code is None and scored == val | {new} and not lines
    finally:
        new.unlink()


@pytest.mark.slow
def test_eval_refuses_a_val_folder_made_of_a_seed_cut_run_s_training_images(
    train_only_run: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """The run cut val from train/ by the seed; the user then moves training images into a new
    val/ folder. The run's record, not the data now, decides: its val was cut by the seed and
    val now holds other files, so eval refuses and scores nothing."""
    ckpt = train_only_run["ckpt"]
    assert recorded_splits(ckpt)["val_from"] == "seed"
    data = shutil.copytree(train_only_run["data"], tmp_path / "data")
    trained = sorted(members(ImageFolderDataModule(data, num_workers=0, seed=3).folders.train))
    for name in ("circle", "square", "triangle"):
        (data / "val" / name).mkdir(parents=True)
        for path in [p for p in trained if p.parent.name == name][:2]:
            path.rename(data / "val" / name / path.name)
    calls = scored_by_eval(monkeypatch)
    overrides = [f"ckpt_path={ckpt}", "split=val", f"data.root={data}"]
    code, scored, lines = eval_outcome(compose_task("eval", tmp_path / "eval", overrides), calls, caplog)
    assert code == 2 and scored is None and len(lines) == 1
    assert "the val split" in lines[0] and "not the one the run held out" in lines[0]


@pytest.mark.slow
def test_a_resume_on_changed_test_files_says_so_in_one_line(
    compose_train, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Train and val are the run's, so the resume goes on; test/* in results.json will be of
    other files, which one warning line says, with the counts."""
    from transferkit.tasks.train import train

    data = make_image_folder(tmp_path / "data", splits={"train": 10, "test": 2}, size=32)
    run = [*tiny_run(data, epochs=1), "seed=3"]
    train(compose_train(tmp_path, run))
    add_copy(data, "test/circle/000.png", "new.png")
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        results = train(compose_train(tmp_path, [*tiny_run(data, epochs=2), "seed=3", "ckpt_path=last"]))
    lines = [r.getMessage() for r in caplog.records if r.name.startswith("transferkit")]
    assert results["epochs"] == 2
    assert len(lines) == 1 and "the test split held 6 files in the run, 7 now" in lines[0]


@pytest.mark.slow
def test_a_resume_on_changed_data_is_refused_naming_the_split(
    compose_train, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    from transferkit.tasks.train import main, train

    data = make_image_folder(tmp_path / "data", splits={"train": 10}, size=32)
    run = [*tiny_run(data, epochs=1), "seed=3"]
    train(compose_train(tmp_path, run))
    checkpoint = torch.load(tmp_path / "run" / "checkpoints" / "last.ckpt", weights_only=True)
    recorded = checkpoint["transferkit"]["splits"]
    assert set(recorded) == {"train", "val", "val_from"} and recorded["val_from"] == "seed"
    assert recorded["train"]["files"] + recorded["val"]["files"] == 30
    train_files = recorded["train"]["files"]
    added_to(data, "train", val_fraction=0.2, seed=3)
    resumed = [*tiny_run(data, epochs=2), "seed=3", "ckpt_path=last"]
    code, lines = main_exits(main, compose_train(tmp_path, resumed), caplog)
    assert code == 2 and len(lines) == 1
    assert (
        "train split" in lines[0] and f"{train_files} files" in lines[0] and f"{train_files + 1}" in lines[0]
    )
    assert "val split" not in lines[0]  # the new file went to train: val is the run's own


@pytest.mark.slow
def test_a_cross_validation_resumed_on_changed_data_is_refused_naming_the_fold(
    compose_train, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Fold 0 finished before two images were added: the ones that hash into it would be held
    out by no fold (missing from oof.csv) and the mean would mix two versions of the data, so
    ckpt_path=last refuses in one line, naming the fold and its counts, and trains nothing.
    With the files restored it goes on: every image held out once."""
    from transferkit.tasks.train import main, train

    data = make_image_folder(tmp_path / "data", classes=("a", "b"), splits={"train": 8}, size=32)
    run = [*tiny_run(data, epochs=1), "data.folds=3", "seed=4", f"features.dir={tmp_path}/cache"]
    folds = [Path(d) for d in train(compose_train(tmp_path, run))["fold_dirs"]]
    then = recorded_splits(folds[0] / "checkpoints" / "last.ckpt")
    shutil.rmtree(folds[1])
    shutil.rmtree(folds[2])
    new = [
        add_copy(data, "train/a/000.png", "zzz_new_0.png"),
        add_copy(data, "train/b/000.png", "zzz_new_1.png"),
    ]
    now = ImageFolderDataModule(data, folds=3, fold=0, num_workers=0, seed=4).split_digests()
    code, lines = main_exits(main, compose_train(tmp_path, [*run, "ckpt_path=last"]), caplog)
    assert code == 2 and len(lines) == 1 and lines[0].startswith("Fold 0 of 3")
    for name in ("train", "val"):
        counts = f"the {name} split held {then[name]['files']} files in the run, {now[name]['files']} now"
        assert (counts in lines[0]) == (then[name] != now[name]), name
    assert "restore the files" in lines[0] and "start a new cross-validation" in lines[0]
    assert not (folds[1] / "checkpoints").exists()  # nothing trained
    for path in new:
        path.unlink()
    train(compose_train(tmp_path, [*run, "ckpt_path=last"]))
    with open(tmp_path / "run" / "oof.csv", newline="") as f:
        held_out = [row["path"] for row in csv.DictReader(f)]
    assert sorted(held_out) == sorted(str(p) for p in (data / "train").glob("*/*.png"))
