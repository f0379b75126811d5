"""Label files (CSV/TSV, single- and multi-label), labels from file names, and their bad input."""

from __future__ import annotations

import csv
import json
import random
import re
from collections import Counter
from pathlib import Path

import pytest
import torch
from conftest import compose_task, main_exits, make_label_file, tiny_run
from hydra.utils import instantiate
from omegaconf import OmegaConf
from PIL import Image
from torch.utils.data import DataLoader

from transferkit.config.build import recorded_data_config
from transferkit.data import ImageFolderDataModule, LabelFileDataModule
from transferkit.data.file_names import find_named_splits
from transferkit.data.folders import Splits, skip_files
from transferkit.data.images import ImageListDataset
from transferkit.errors import ConfigError, DataError, UserError


def write_images(root: Path, names: list[str]) -> None:
    """Tiny solid images (never decoded by these tests unless the scan runs)."""
    for i, name in enumerate(names):
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (8, 8), (i * 37 % 256, 0, 0)).save(root / name)


def write_table(path: Path, rows: list[list[str]], delimiter: str = ",") -> Path:
    with path.open("w", newline="") as handle:
        csv.writer(handle, delimiter=delimiter).writerows(rows)
    return path


def label_data(tmp_path: Path, rows: list[list[str]], images: list[str] | None = None) -> Path:
    """root/labels.csv holding `rows` (header first), and an image for every path named in it
    (or only `images`)."""
    root = tmp_path / "data"
    root.mkdir(exist_ok=True)
    write_images(root, images if images is not None else [r[0] for r in rows[1:] if r and r[0]])
    return write_table(root / "labels.csv", rows)


def module(labels: Path, **kwargs) -> LabelFileDataModule:
    return LabelFileDataModule(labels.parent, labels, num_workers=0, **kwargs)


def paths(samples: list) -> list[str]:
    return [path.name for path, _ in samples]


# --- label files ---------------------------------------------------------------------------------


def test_split_column_gives_the_splits_and_classes_are_the_sorted_labels(tmp_path: Path) -> None:
    labels = make_label_file(tmp_path, classes=("b", "a", "c"), splits={"train": 3, "val": 2, "test": 1})
    splits = module(labels).splits
    assert splits.class_names == ["a", "b", "c"] and not splits.multilabel
    assert (len(splits.train), len(splits.val), len(splits.test)) == (9, 6, 3)
    assert not splits.val_from_train
    assert all(path.name.startswith("val_") for path, _ in splits.val)
    with labels.open() as handle:
        truth = {row["path"]: row["label"] for row in csv.DictReader(handle)}
    assert all(truth[f"images/{p.name}"] == splits.class_names[c] for p, c in splits.train + splits.test)


def test_without_split_column_val_is_split_off_each_class_and_row_order_never_moves_it(
    tmp_path: Path,
) -> None:
    labels = make_label_file(tmp_path, splits={"train": 10}, split_column=False)
    first = module(labels, val_fraction=0.3).splits
    assert first.val_from_train
    assert sorted(Counter(c for _, c in first.val)) == [0, 1, 2]  # a share of each class (a hash's)
    assert len(first.train) + len(first.val) == 30
    header, *rows = list(csv.reader(labels.open()))
    random.Random(0).shuffle(rows)
    write_table(labels, [header, *rows])
    again = module(labels, val_fraction=0.3).splits
    assert again.val == first.val and again.train == first.train
    assert module(labels, val_fraction=0.3, seed=7).splits.val != first.val


def test_tsv_configurable_columns_and_absolute_paths(tmp_path: Path) -> None:
    root = tmp_path / "data"
    write_images(root, ["x/1.png", "x/2.png", "y/3.png", "y/4.png"])
    rows = [
        ["fold", "file", "species", "notes"],
        ["train", "x/1.png", "cat", ""],
        ["val", "x/2.png", "cat", "blurry"],
        ["train", str(root / "y/3.png"), "dog", ""],
        ["val", "y/4.png", "dog", ""],
    ]
    labels = write_table(root / "labels.tsv", rows, delimiter="\t")
    dm = module(labels, path_column="file", label_column="species", split_column="fold")
    assert dm.class_names == ["cat", "dog"]
    assert dm.splits.train == [(root / "x/1.png", 0), (root / "y/3.png", 1)]
    assert paths(dm.splits.val) == ["2.png", "4.png"]


def test_multilabel_from_the_label_cell(tmp_path: Path) -> None:
    labels = make_label_file(tmp_path, multilabel=True, splits={"train": 8, "val": 4})
    dm = module(labels, multilabel=True)
    splits = dm.splits
    assert dm.multilabel and splits.multilabel and dm.class_names == ["circle", "square", "triangle"]
    with labels.open() as handle:
        truth = {
            Path(row["path"]).name: set(filter(None, row["label"].split(";")))
            for row in csv.DictReader(handle)
        }
    for path, label in splits.train + splits.val:
        assert label == tuple(int(name in truth[path.name]) for name in dm.class_names)
    assert (0, 0, 0) in [label for _, label in splits.train]  # an image with no label is kept
    assert dm.class_counts == [sum(label[c] for _, label in splits.train) for c in range(3)]


def test_multilabel_from_class_columns_listed_or_star(tmp_path: Path) -> None:
    rows = [
        ["path", "road", "water", "split"],
        ["a.png", "1", "0", "train"],
        ["b.png", "1", "1", "train"],
        ["c.png", "0", "0", "train"],
        ["d.png", "0", "1.0", "val"],
    ]
    labels = label_data(tmp_path, rows)
    for columns in (["water", "road"], "*"):
        dm = module(labels, multilabel=True, class_columns=columns)
        assert dm.class_names == (["water", "road"] if columns != "*" else ["road", "water"])
        flip = (lambda t: t[::-1]) if columns != "*" else (lambda t: t)
        assert [label for _, label in dm.splits.train] == [flip(t) for t in [(1, 0), (1, 1), (0, 0)]]
        assert dm.splits.val == [(labels.parent / "d.png", flip((0, 1)))]


def test_one_hot_class_columns_give_single_label_data(tmp_path: Path) -> None:
    rows = [["path", "healthy", "rust"], *[[f"{i}.png", str(i % 2), str(1 - i % 2)] for i in range(6)]]
    dm = module(label_data(tmp_path, rows), class_columns="*", val_fraction=0.34)
    assert dm.class_names == ["healthy", "rust"] and not dm.multilabel
    assert {label for _, label in dm.splits.train + dm.splits.val} == {0, 1}
    assert all(label == (0 if int(p.stem) % 2 else 1) for p, label in dm.splits.train)


def test_multilabel_split_without_split_column_keeps_every_class_in_train(tmp_path: Path) -> None:
    names = [f"{i:02d}.png" for i in range(40)]
    # many unique combinations: pooled into one stratum rather than all kept in train
    rows = [["path", "label"]] + [
        [n, ";".join(f"c{j}" for j in range(6) if (i >> j) & 1)] for i, n in enumerate(names)
    ]
    dm = module(label_data(tmp_path, rows), multilabel=True, val_fraction=0.25)
    splits = dm.splits
    assert splits.val_from_train and 6 <= len(splits.val) <= 14
    assert all(count > 0 for count in dm.class_counts)


def test_pos_weight_is_negatives_over_positives_in_train(tmp_path: Path) -> None:
    rows = [
        ["path", "label", "split"],
        ["1.png", "a", "train"],
        ["2.png", "a;b", "train"],
        ["3.png", "a", "train"],
        ["4.png", "", "train"],
        ["5.png", "b", "val"],
    ]
    labels = label_data(tmp_path, rows)
    dm = module(labels, multilabel=True, balance="weights")
    assert dm.class_counts == [3, 1]
    assert dm.class_weights() == pytest.approx([1 / 3, 3 / 1])  # a: 1 negative / 3; b: 3 / 1
    assert module(labels, multilabel=True).class_weights() is None


def test_targets_collate_to_float_vectors_for_multilabel_and_indices_otherwise(tmp_path: Path) -> None:
    write_images(tmp_path, ["a.png", "b.png"])
    files = [tmp_path / "a.png", tmp_path / "b.png"]
    multi = ImageListDataset(
        [(files[0], (1, 0, 1)), (files[1], (0, 0, 0))], transform=lambda _: torch.zeros(1)
    )
    image, target = multi[0]
    assert target.dtype == torch.float32 and target.tolist() == [1.0, 0.0, 1.0]
    _, targets = next(iter(DataLoader(multi, batch_size=2)))
    assert targets.shape == (2, 3) and targets.dtype == torch.float32
    single = ImageListDataset([(files[0], 2), (files[1], 0)], transform=lambda _: torch.zeros(1))
    assert single[0][1] == 2
    _, targets = next(iter(DataLoader(single, batch_size=2)))
    assert targets.tolist() == [2, 0] and targets.dtype == torch.int64


def test_skip_files_needs_a_positive_training_image_per_class(tmp_path: Path) -> None:
    a, b, c = tmp_path / "a.png", tmp_path / "b.png", tmp_path / "c.png"
    splits = Splits(["x", "y"], [(a, (1, 0)), (b, (1, 1))], [(c, (0, 1))], None, False, multilabel=True)
    assert skip_files(splits, {c}).val == []
    with pytest.raises(DataError, match="class\\(es\\) y have no training image"):
        skip_files(splits, {b})


# --- labels from file names ----------------------------------------------------------------------

PET_NAME = r"^(.+)_\d+\.png$"


def test_labels_from_file_names_in_one_folder(tmp_path: Path) -> None:
    names = [f"{breed}_{i}.png" for breed in ("Abyssinian", "great_pyrenees") for i in range(5)]
    write_images(tmp_path, [f"{'sub/' if i % 3 else ''}{n}" for i, n in enumerate(names)])
    dm = ImageFolderDataModule(tmp_path, label_from=PET_NAME, val_fraction=0.4, num_workers=0)
    splits = dm.splits
    assert dm.class_names == ["Abyssinian", "great_pyrenees"] and splits.val_from_train
    assert sorted(Counter(c for _, c in splits.val)) == [0, 1] and len(splits.train) + len(splits.val) == 10
    assert all(p.name.startswith(dm.class_names[c]) for p, c in splits.train + splits.val)


def test_labels_from_file_names_in_a_split_tree(tmp_path: Path) -> None:
    write_images(tmp_path, ["train/cat_1.png", "train/x/dog_2.png", "val/cat_3.png", "test/dog_4.png"])
    splits = find_named_splits(tmp_path, PET_NAME)
    assert splits.class_names == ["cat", "dog"] and not splits.val_from_train
    assert [(p.name, c) for p, c in splits.train] == [("cat_1.png", 0), ("dog_2.png", 1)]
    assert paths(splits.val) == ["cat_3.png"] and splits.test[0][1] == 1


@pytest.mark.parametrize(
    ("pattern", "files", "message"),
    [
        ("^(.+_", ["a_1.png"], r"data.label_from='\^\(\.\+_' is not a regular expression"),
        (r"^(.+)_(\d+)", ["a_1.png"], "has 2 groups; it needs exactly one"),
        (r"^.+\.png$", ["a_1.png"], "has 0 groups"),
        (r"^(\w+)-\d+\.png$", ["a_1.png", "b_2.png"], "matches none of the 2 file names .*a_1.png, b_2.png"),
        (
            PET_NAME,
            ["a_1.png", "b_2.png", "IMG.png", "c.png"],
            "leaves 2 of 4 file.* unmatched: IMG.png, c.png",
        ),
        (PET_NAME, ["train/a_1.png", "train/a_2.png", "val/b_3.png"], "Class\\(es\\) b are seen only in val"),
    ],
)
def test_bad_file_name_patterns(tmp_path: Path, pattern: str, files: list[str], message: str) -> None:
    write_images(tmp_path, files)
    with pytest.raises(UserError) as error:
        _ = ImageFolderDataModule(tmp_path, label_from=pattern, num_workers=0).folders
    assert re.search(message, str(error.value)) and "\n" not in str(error.value)


# --- bad label files -----------------------------------------------------------------------------

GOOD = [["path", "label"], ["a.png", "x"], ["b.png", "x"], ["c.png", "y"], ["d.png", "y"]]


@pytest.mark.parametrize(
    ("rows", "kwargs", "message"),
    [
        ([["path", "label"]], {}, "has a header but no rows"),
        ([], {}, "is empty"),
        (
            GOOD,
            {"label_column": "class"},
            "has no column 'class' \\(data.label_column\\); its columns are path, label",
        ),
        (GOOD, {"path_column": "file"}, "has no column 'file' \\(data.path_column\\)"),
        (GOOD, {"split_column": "fold"}, "has no column 'fold' \\(data.split_column\\)"),
        (GOOD, {"class_columns": ["x", "z"]}, "has no column 'x' \\(data.class_columns\\)"),
        ([*GOOD, ["a.png", "y"]], {}, "gives 1 image\\(s\\) different labels: a.png \\(lines 2 and 6\\)"),
        (
            [["path", "label"], ["a.png", "x"], ["b.png", ""], ["c.png", " "]],
            {},
            "empty label \\(lines 3, 4\\)",
        ),
        ([["path", "label"], ["", "x"], ["b.png", "x"]], {}, "rows without a path \\(line 2\\)"),
        (
            [
                ["path", "label", "split"],
                ["a.png", "x", "train"],
                ["b.png", "x", "valid"],
                ["c.png", "x", ""],
            ],
            {},
            "'split' holds 'valid' \\(1 rows\\), '\\(empty\\)' \\(1 rows\\); a split is train, val or test",
        ),
        (
            [["path", "label", "split"], ["a.png", "x", "train"], ["a.png", "x", "val"]],
            {},
            "puts 1 image\\(s\\) in two splits, which would leak.*a.png \\(train on line 2, val on line 3\\)",
        ),
        (
            [
                ["path", "label", "split"],
                ["a.png", "x", "train"],
                ["b.png", "y", "val"],
                ["c.png", "z", "test"],
            ],
            {},
            "Class\\(es\\) y, z have no training image in labels.csv \\(seen only in val or test: y, z\\)",
        ),
        (
            [["path", "label", "split"], ["a.png", "x", "val"]],
            {},
            "has no train rows",
        ),
        (
            [["path", "a", "b"], ["1.png", "1", "yes"]],
            {"class_columns": "*", "multilabel": True},
            "line 2, column 'b' holds 'yes'; class columns must hold 0 or 1",
        ),
        (
            [["path", "a", "b"], ["1.png", "1", "1"], ["2.png", "0", "1"]],
            {"class_columns": "*"},
            "no class column or several at 1 \\(line 2\\); single-label data needs exactly one",
        ),
        (
            [["path", "a", "b"], ["1.png", "1", "0"], ["2.png", "1", "0"]],
            {"class_columns": "*", "multilabel": True},
            "Class\\(es\\) b have no training image",
        ),
    ],
)
def test_bad_label_files_are_refused_in_one_line(
    tmp_path: Path, rows: list, kwargs: dict, message: str
) -> None:
    labels = label_data(tmp_path, rows)
    with pytest.raises(DataError) as error:
        _ = module(labels, **kwargs).folders
    assert re.search(message, str(error.value)), str(error.value)
    assert "\n" not in str(error.value)


def test_identical_duplicate_rows_are_kept_once_with_a_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    dm = module(label_data(tmp_path, [*GOOD, ["a.png", "x"], ["./a.png", "x"]]))
    assert len(dm.folders.train) + len(dm.folders.val) == 4
    assert "repeats 2 row(s) exactly" in caplog.text


def test_missing_label_file_and_root(tmp_path: Path) -> None:
    (tmp_path / "data").mkdir()
    with pytest.raises(DataError, match=r"data.labels=.*nope.csv does not exist. Set data.labels=PATH"):
        _ = module(tmp_path / "data" / "nope.csv").folders
    with pytest.raises(DataError, match="data.root=.*gone does not exist"):
        _ = LabelFileDataModule(tmp_path / "gone", tmp_path / "l.csv").folders


def test_missing_images_are_listed_or_skipped_into_bad_images(tmp_path: Path) -> None:
    rows = [["path", "label"], *[[f"{c}{i}.png", c] for c in "xy" for i in range(4)]]
    rows += [[f"gone/{i:02d}.png", "x"] for i in range(23)]
    labels = label_data(tmp_path, rows, images=[r[0] for r in rows[1:9]])
    with pytest.raises(DataError) as error:
        _ = module(labels).folders
    text = str(error.value)
    assert text.startswith("23 image(s) named in labels.csv are missing: gone/00.png, gone/01.png")
    assert "gone/19.png and 3 more; fix the paths (relative to data.root=" in text and "gone/20" not in text
    assert "data.on_bad_image=skip" in text and "\n" not in text

    dm = module(labels, on_bad_image="skip")
    assert len(dm.splits.train) + len(dm.splits.val) == 8  # the scan decodes only what is there
    assert sorted(p.name for p in dm.bad_images) == [f"{i:02d}.png" for i in range(23)]
    assert all("missing" in why for why in dm.bad_images.values())
    write_table(labels, [*rows, ["gone/z.png", "z"]])
    with pytest.raises(DataError, match="z have no training image in labels.csv once the 24 missing"):
        _ = module(labels, on_bad_image="skip").folders


def test_skipped_missing_and_unreadable_images_are_both_recorded(tmp_path: Path) -> None:
    labels = label_data(
        tmp_path, [*GOOD, ["e.png", "x"], ["gone.png", "y"]], images=["a.png", "b.png", "c.png", "d.png"]
    )
    (labels.parent / "e.png").write_bytes(b"not an image")
    dm = module(labels, on_bad_image="skip")
    _ = dm.splits
    assert {p.name for p in dm.bad_images} == {"e.png", "gone.png"}


# --- config refusals -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"balance": "sampler"}, "data.balance=sampler cannot .* use data.balance=weights"),
        ({"mixup_alpha": 0.2}, "data.mixup_alpha and data.cutmix_alpha work on single-label data only"),
        ({"cutmix_alpha": 1.0}, "set both to 0 with data.multilabel=true"),
    ],
)
def test_multilabel_refuses_sampler_and_mixing(tmp_path: Path, kwargs: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        LabelFileDataModule(tmp_path, tmp_path / "labels.csv", multilabel=True, **kwargs)


def test_multilabel_without_a_label_file_and_label_from_with_one_are_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="data.multilabel=true needs a label file: use data=csv"):
        ImageFolderDataModule(tmp_path, multilabel=True)
    with pytest.raises(ConfigError, match="data.label_from does not combine with data=csv"):
        LabelFileDataModule(tmp_path, tmp_path / "labels.csv", label_from=PET_NAME)
    with pytest.raises(ConfigError, match="class_columns='road' must be a list"):
        LabelFileDataModule(tmp_path, tmp_path / "labels.csv", class_columns="road")


@pytest.mark.slow
def test_data_csv_composes_builds_and_records_the_label_file_absolute(tmp_path: Path, monkeypatch) -> None:
    labels = make_label_file(tmp_path / "ds")
    monkeypatch.chdir(tmp_path)
    cfg = compose_task("train", tmp_path, ["data=csv", "data.root=ds"])
    dm = instantiate(cfg.data)
    assert isinstance(dm, LabelFileDataModule) and dm.labels == Path("ds/labels.csv")
    assert dm.class_names == ["circle", "square", "triangle"]
    splits = dm.splits
    recorded = recorded_data_config(cfg.data, dm)
    assert recorded["labels"] == str(labels.resolve()) and recorded["root"] == str(labels.parent.resolve())
    assert recorded["label_from"] is None and recorded["multilabel"] is False
    monkeypatch.chdir(tmp_path / "ds")  # eval from elsewhere: the recorded config finds the data
    again = instantiate(OmegaConf.create(recorded))
    assert again.class_names == dm.class_names
    assert again.splits == splits


def test_old_checkpoints_do_not_compare_the_new_data_keys() -> None:
    """A checkpoint recorded before label_from/multilabel/labels: only its own keys are compared."""
    from transferkit.runs.checkpoints import _as_trained, _setup

    there = _as_trained(_setup({}, {"root": "/d", "batch_size": 8}, None))
    new_keys = {"label_from": None, "multilabel": False, "labels": "/d/labels.csv"}
    here = _setup({}, {"root": "/d", "batch_size": 8, "crop_scale": [0.08, 1.0], **new_keys}, None)
    assert [key for key in sorted(there) if there[key] != here.get(key)] == []
    assert "data.label_from" not in there and "data.multilabel" not in there


# --- runs ----------------------------------------------------------------------------------------


@pytest.mark.slow
def test_train_on_a_label_file(tmp_path: Path) -> None:
    from transferkit.tasks.train import train

    labels = make_label_file(tmp_path / "ds", classes=("square", "circle"), splits={"train": 8, "val": 3})
    overrides = [*tiny_run(labels.parent, epochs=1), "data=csv", f"data.root={labels.parent}"]
    cfg = compose_task("train", tmp_path, overrides)
    train(cfg)
    written = json.loads((Path(cfg.paths.output_dir) / "results.json").read_text())
    assert written["class_names"] == ["circle", "square"] and "val/acc" in written


def test_a_bad_label_file_ends_the_train_task_with_exit_2_and_one_line(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    from transferkit.tasks.train import main

    labels = label_data(tmp_path, [["file", "label"], ["a.png", "x"]])
    cfg = compose_task(
        "train", tmp_path, [*tiny_run(labels.parent), "data=csv", f"data.root={labels.parent}"]
    )
    code, lines = main_exits(main, cfg, caplog)
    assert code == 2 and len(lines) == 1 and "has no column 'path' (data.path_column)" in lines[0]
