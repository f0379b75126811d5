"""The data audit: its pieces on small fixed inputs, a user error, and end to end on generated
images with planted leaks, duplicates and flipped labels (recall and precision asserted), and
on their clean copy (few false alarms)."""

from __future__ import annotations

import csv
import io
import random
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import EXPORTS, compose_task, main_exits
from PIL import Image

from transferkit.audit.duplicates import Pair, crowded_threshold, exact_groups, find_duplicates
from transferkit.audit.exclude import suggested_exclusions
from transferkit.audit.files import read_facts
from transferkit.audit.items import Item
from transferkit.audit.label_issues import check_folds
from transferkit.audit.outliers import find_outliers
from transferkit.audit.report import Findings, write_report
from transferkit.audit.similarity import normalized, similar_pairs
from transferkit.data.datamodule import ImageFolderDataModule
from transferkit.errors import DataError

CLASSES = ("circle", "square", "triangle")


# --- the pieces ------------------------------------------------------------------------------


def brute_force(vectors: torch.Tensor, threshold: float) -> set[tuple[int, int]]:
    sims = vectors @ vectors.T
    return {(i, j) for i, j in torch.nonzero(sims >= threshold).tolist() if i < j}


def test_blocked_search_equals_brute_force_across_block_boundaries() -> None:
    generator = torch.Generator().manual_seed(0)
    base = torch.randn(150, 32, generator=generator)
    # near copies of some rows, placed so pairs straddle the 64-row blocks
    copies = base[[3, 60, 63, 100, 149]] + 0.05 * torch.randn(5, 32, generator=generator)
    vectors = normalized(torch.cat([base, copies, base[[10]]]))  # an exact copy too
    found = similar_pairs(vectors, 0.9, per_row=50, block=64)
    assert {(i, j) for i, j, _ in found} == brute_force(vectors, 0.9)
    assert len(found) >= 6
    for i, j, similarity in found:
        assert similarity == pytest.approx(float(vectors[i] @ vectors[j]), abs=1e-5)


def test_blocked_search_keeps_per_row_most_similar() -> None:
    vectors = normalized(torch.ones(6, 4) + 0.01 * torch.arange(24.0).reshape(6, 4))  # all alike
    found = similar_pairs(vectors, 0.5, per_row=2, block=4)
    assert len(found) == 2 + 2 + 2 + 2 + 1  # rows 0-3 list 2 later rows, row 4 the one left
    assert all(i < j for i, j, _ in found)


def test_exact_duplicates_by_content(tmp_path: Path) -> None:
    image = Image.new("RGB", (20, 20), (200, 10, 10))
    image.putpixel((3, 3), (0, 0, 0))
    image.save(tmp_path / "a.png")
    shutil.copyfile(tmp_path / "a.png", tmp_path / "b.png")
    Image.new("RGB", (20, 20), (10, 200, 10)).save(tmp_path / "c.png")
    facts = [read_facts(tmp_path / n) for n in ("a.png", "b.png", "c.png")]
    assert exact_groups([f.sha256 for f in facts]) == [[0, 1]]
    assert (facts[0].width, facts[0].height, facts[0].mode, facts[0].format) == (20, 20, "RGB", "PNG")
    assert facts[2].thumbnail is None  # a flat picture matches nothing
    assert read_facts(tmp_path / "missing.png") is None


def items_and_features() -> tuple[list[Item], torch.Tensor]:
    """Six images: val/0 copied into train/3 (a leak), train/1 and train/2 alike (a pair within
    train), the rest unlike."""
    items = [
        Item(Path("/d/val/a/0.png"), "val", 0),
        Item(Path("/d/train/a/1.png"), "train", 0),
        Item(Path("/d/train/a/2.png"), "train", 0),
        Item(Path("/d/train/b/3.png"), "train", 1),
        Item(Path("/d/train/b/4.png"), "train", 1),
        Item(Path("/d/test/b/5.png"), "test", 1),
    ]
    features = torch.eye(6)
    features[3] = features[0] + 0.1 * features[4]  # cosine 0.995 with 0
    features[2] = features[1] + 0.3 * features[5]  # cosine 0.958 with 1
    return items, features


def test_duplicates_leaks_first_train_side_first() -> None:
    items, features = items_and_features()
    pairs, _ = find_duplicates(items, features, [None] * 6, feature_threshold=0.95, pixel_threshold=0.98)
    assert [(p.a, p.b, p.kind) for p in pairs] == [(3, 0, "near"), (1, 2, "near")]
    assert pairs[0].similarity > pairs[1].similarity > 0.95


def test_suggested_exclusions() -> None:
    items, _ = items_and_features()
    pairs = [Pair(3, 0, "near", 0.99, 0.0), Pair(1, 2, "exact", 1.0, 1.0), Pair(4, 5, "near", 0.97, 0.0)]
    excluded = suggested_exclusions(items, pairs, label_issues=[4, 3], unreadable=[Path("/d/bad.png")])
    # the train copy of each leak, the later file of a pair within a split, wrong labels, bad files
    assert excluded == [
        Path(p) for p in ("/d/train/b/3.png", "/d/train/a/2.png", "/d/train/b/4.png", "/d/bad.png")
    ]


def test_outliers_are_far_from_every_class() -> None:
    generator = torch.Generator().manual_seed(0)
    centres = torch.eye(8)[:2] * 5
    labels = [0] * 30 + [1] * 30
    features = centres[labels] + 0.3 * torch.randn(60, 8, generator=generator)
    features[7] = torch.eye(8)[5] * 5  # a picture like neither class
    items = [Item(Path(f"/d/{i}.png"), "train", label) for i, label in enumerate(labels)]
    outliers = find_outliers(items, features, 2, z=3.5)
    assert outliers[0].index == 7 and outliers[0].z > 10 * max(o.z for o in outliers[1:])
    assert len(outliers) <= 3  # the noise's own tail may pass a robust z of 3.5


def test_too_few_images_for_the_folds_is_one_clear_error() -> None:
    items = [Item(Path(f"/d/{i}.png"), "train", int(i >= 9)) for i in range(12)]  # 9 a, 3 b
    with pytest.raises(DataError, match=r"audit.folds=5.*b \(3\).*audit.folds=3"):
        check_folds(items, ["a", "b"], 5)


@pytest.mark.slow  # cleanlab and scikit-learn import in about a second
def test_label_issues_single_and_multi_label() -> None:
    from transferkit.audit.label_issues import find_label_issues

    generator = torch.Generator().manual_seed(0)
    centres = torch.eye(16)[:3] * 4
    single = [i % 3 for i in range(90)]
    features = centres[single] + 0.5 * torch.randn(90, 16, generator=generator)
    given = list(single)
    flipped = {5, 40, 11, 60, 22, 79}  # 2 per class, as cleanlab estimates noise per class
    for i in flipped:
        given[i] = (single[i] + 1 + i % 2) % 3
    items = [Item(Path(f"/d/{i}.png"), "train", label) for i, label in enumerate(given)]
    issues = find_label_issues(items, features, ["a", "b", "c"], folds=5, seed=0)
    assert {i.index for i in issues[:6]} == flipped and len(issues) <= 7
    assert all(i.suggested == single[i.index] for i in issues[:6])
    assert [i.score for i in issues] == sorted(i.score for i in issues)

    rng = np.random.default_rng(0)
    present = (rng.random((120, 3)) < 0.5).astype(int)
    features = torch.from_numpy(present).float() @ centres + torch.randn(120, 16, generator=generator)
    given = [tuple(int(v) for v in row) for row in present]
    given[7] = tuple(1 - v for v in given[7])  # every class of image 7 wrong
    items = [Item(Path(f"/d/{i}.png"), "train", label) for i, label in enumerate(given)]
    issues = find_label_issues(items, features, ["a", "b", "c"], folds=5, seed=0)
    assert issues and issues[0].index == 7
    assert issues[0].suggested == tuple(int(v) for v in present[7])


def test_report_files_and_columns(tmp_path: Path) -> None:
    items, _ = items_and_features()
    found = Findings(
        root=Path("/d"),
        class_names=["a", "b"],
        items=items,
        pairs=[Pair(3, 0, "near", 0.99, 0.5), Pair(1, 2, "exact", 1.0, 1.0)],
        label_issues=[],
        outliers=[],
        counts={"a": {"train": 2, "val": 1}, "b": {"train": 2, "val": 0}},
        imbalance=1.0,
        images={"images": 0},
        unreadable={Path("/d/train/a/bad.png"): "truncated"},
        exclude=[Path("/d/train/b/3.png"), Path("/elsewhere/x.png")],
        train_command="python train.py data.exclude=/r/exclude_suggested.txt",
        timings={"features": 1.5},
    )
    files = write_report(found, tmp_path, show=0)
    with (tmp_path / files["duplicates"]).open() as handle:
        rows = list(csv.DictReader(handle))
    assert list(rows[0])[:5] == ["path_a", "path_b", "split_a", "split_b", "similarity"]
    assert [(r["path_a"], r["path_b"], r["split_a"], r["split_b"], r["kind"]) for r in rows] == [
        ("train/b/3.png", "val/a/0.png", "train", "val", "near"),
        ("train/a/1.png", "train/a/2.png", "train", "train", "exact"),
    ]
    header = (tmp_path / files["label_issues"]).read_text().splitlines()[0]
    assert header.split(",")[:4] == ["path", "given", "suggested", "score"]
    assert (tmp_path / files["exclude"]).read_text() == "train/b/3.png\n/elsewhere/x.png\n"
    report = (tmp_path / files["report"]).read_text()
    assert report.index("Leaks across splits") < report.index("Duplicates within a split")
    assert "python train.py data.exclude=/r/exclude_suggested.txt" in report
    assert "| features | 1.50 |" in report


# --- the task ------------------------------------------------------------------------------


@pytest.mark.slow  # the first import of the task (Lightning, cleanlab, scikit-learn) takes seconds
def test_audit_of_a_missing_folder_exits_2_with_one_line(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    from transferkit.tasks.audit import main

    cfg = compose_task("audit", tmp_path, ["data=imagefolder", f"data.root={tmp_path / 'nowhere'}"])
    code, errors = main_exits(main, cfg, caplog)
    assert code == 2
    assert len(errors) == 1 and "nowhere" in errors[0]


def test_audit_without_cleanlab_names_the_extra(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    from transferkit.tasks.audit import main

    monkeypatch.setitem(sys.modules, "cleanlab", None)  # import cleanlab now fails
    cfg = compose_task("audit", tmp_path, ["data=imagefolder", f"data.root={tmp_path}"])
    code, errors = main_exits(main, cfg, caplog)
    assert code == 2
    assert len(errors) == 1 and "transferkit[audit]" in errors[0]


# --- end to end on planted problems ----------------------------------------------------------


def picture(shape: str, seed: int, size: int = 64) -> Image.Image:
    """A drawn shape over a smooth random colour field: each picture its own, as photos are."""
    from transferkit.data.demo import draw_shape

    rng = random.Random(seed)
    field = Image.new("RGB", (6, 6))
    field.putdata([tuple(rng.randrange(256) for _ in range(3)) for _ in range(36)])
    return Image.blend(
        draw_shape(shape, seed, size), field.resize((size, size), Image.Resampling.BICUBIC), 0.35
    )


def make_folder(root: Path, train: int = 40, val: int = 15) -> Path:
    for s, (split, n) in enumerate({"train": train, "val": val}.items()):
        for c, name in enumerate(CLASSES):
            (root / split / name).mkdir(parents=True, exist_ok=True)
            for i in range(n):
                picture(name, 10_000 * s + 100 * c + i).save(root / split / name / f"{i:03d}.png")
    return root


def recompressed(image: Image.Image) -> Image.Image:
    data = io.BytesIO()
    image.save(data, "JPEG", quality=80)
    return Image.open(data).convert("RGB")


EDITS = {
    "exact": None,
    "resized": lambda image: image.resize((48, 48), Image.Resampling.BILINEAR),
    "jpeg": recompressed,
    "cropped": lambda image: image.crop((2, 2, image.width - 2, image.height - 2)),  # 3% a side
}


def plant(root: Path, seed: int = 0) -> tuple[set[frozenset[str]], set[str]]:
    """12 val images copied into train (3 each: exact, resized, recompressed, cropped), 3 exact
    copies within train, 6 training labels flipped (5%: the file moved to another class).
    Returns the planted pairs and flipped files, as paths relative to `root`."""
    rng = random.Random(seed)
    rel = lambda path: path.relative_to(root).as_posix()  # noqa: E731
    val = sorted((root / "val").rglob("*.png"))
    rng.shuffle(val)
    pairs = set()
    for k, (kind, edit) in enumerate([e for e in EDITS.items() for _ in range(3)]):
        source = val[k]
        target = root / "train" / source.parent.name / f"leak_{kind}_{k}.{'jpg' if kind == 'jpeg' else 'png'}"
        if edit is None:
            shutil.copyfile(source, target)
        else:
            edit(Image.open(source).convert("RGB")).save(target)
        pairs.add(frozenset((rel(source), rel(target))))
    train = sorted((root / "train").rglob("[0-9]*.png"))
    rng.shuffle(train)
    for k, source in enumerate(train[:3]):
        shutil.copyfile(source, source.with_name(f"dup_{k}.png"))
        pairs.add(frozenset((rel(source), rel(source.with_name(f"dup_{k}.png")))))
    flipped = set()
    for k, source in enumerate(train[3:9]):
        other = rng.choice([c for c in CLASSES if c != source.parent.name])
        target = root / "train" / other / f"flip_{k}.png"
        shutil.move(source, target)
        flipped.add(rel(target))
    return pairs, flipped


def run_audit(tmp_path: Path, root: Path) -> tuple[dict, Path]:
    from transferkit.tasks.audit import audit

    # the shipped Lite0 weights, at 96 px: 3 s of features for 180 images on 2 cores; exported once
    data = ["data=imagefolder", f"data.root={root}", "data.image_size=96", "data.num_workers=0"]
    cfg = compose_task("audit", tmp_path, [*data, "audit.show=4", f"features.exports_dir={EXPORTS}"])
    return audit(cfg), Path(cfg.paths.output_dir)


def read_csv(path: Path) -> list[dict[str, str]]:
    with path.open() as handle:
        return list(csv.DictReader(handle))


@pytest.mark.slow
def test_audit_finds_planted_leaks_duplicates_and_flipped_labels(tmp_path: Path) -> None:
    root = make_folder(tmp_path / "data")
    planted, flipped = plant(root)
    results, out = run_audit(tmp_path, root)

    pairs = [frozenset((r["path_a"], r["path_b"])) for r in read_csv(out / "duplicates.csv")]
    first = pairs[: len(planted)]
    assert len(planted & set(first)) >= 13  # of 15 (measured: 14, a cropped copy missed)
    assert sum(p not in planted for p in pairs) <= 1  # measured: 0 false alarms
    leaks = [r for r in read_csv(out / "duplicates.csv") if r["split_a"] != r["split_b"]]
    assert all(r["split_a"] == "train" and r["split_b"] == "val" for r in leaks)
    assert read_csv(out / "duplicates.csv")[0]["split_a"] != read_csv(out / "duplicates.csv")[0]["split_b"]

    suspects = [r["path"] for r in read_csv(out / "label_issues.csv")]
    assert len(flipped & set(suspects[: len(flipped)])) >= 4  # of 6 (measured: 5 in the top 6)
    assert len(suspects) <= 2 * len(flipped)  # measured: 8 flagged
    assert {r["given"] != r["suggested"] for r in read_csv(out / "label_issues.csv")} == {True}

    excluded = (out / "exclude_suggested.txt").read_text().splitlines()
    assert {p for p in excluded if "leak_" in p} >= {p for pair in first for p in pair if "leak_" in p} - {""}
    assert not any(p.startswith("val/") for p in excluded)  # held-out copies stay
    # acting on it in one step: training with data.exclude= drops exactly those files
    kept = ImageFolderDataModule(root, exclude=out / "exclude_suggested.txt", num_workers=0).folders
    kept_paths = {str(path.relative_to(root)) for path, _ in kept.train + kept.val}
    assert kept_paths.isdisjoint(excluded) and len(kept_paths) == results["images"] - len(excluded)
    assert "data.exclude=" in (out / "audit.md").read_text()
    assert {"duplicates.png", "label_issues.png"} <= {p.name for p in out.glob("*.png")}
    assert results["leaks"] == len(leaks) and set(results["timings_s"]) >= {
        "features",
        "duplicates",
        "label issues",
        "outliers",
    }


@pytest.mark.slow
def test_audit_of_clean_data_finds_little(tmp_path: Path) -> None:
    results, out = run_audit(tmp_path, make_folder(tmp_path / "data"))
    assert results["leaks"] == results["duplicates_within_splits"] == 0  # measured: 0
    assert results["label_issues"] <= 2  # measured: 0
    assert results["outliers"] <= 4  # of 165 (measured: 2 past a robust z of 3.5)
    assert results["images"] == 165 and not results["feature_cache_reused"]
    again, _ = run_audit(tmp_path, tmp_path / "data")  # a second audit reuses the forward pass
    assert again["feature_cache_reused"] and again["feature_cache"] == results["feature_cache"]


def test_a_crowd_of_alike_pictures_raises_the_feature_threshold() -> None:
    pairs = [(4, 5, 0.96), (0, 1, 0.99), (6, 7, 0.955), (2, 3, 0.97)]
    raised = crowded_threshold(pairs, n=20, max_share=0.2, floor=0.95)  # 4 images: the 2 best pairs
    assert 0.96 < raised <= 0.97
    assert crowded_threshold(pairs, n=20, max_share=0.5, floor=0.95) == 0.95  # 8 images of 20: as set
