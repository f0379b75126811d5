"""Evaluation reports: confusion matrix, per-class metrics and the misclassified-image grid,
checked against hand-computed numbers and by reading back the files they write."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest
import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from PIL import Image

from transferkit.data.images import load_rgb
from transferkit.errors import DataError
from transferkit.reports import (
    confusion_matrix,
    most_confident_mistakes,
    per_class_report,
    print_per_class_report,
    write_confusion_matrix,
    write_misclassified_grid,
    write_per_class_report,
)
from transferkit.reports.confusion import _draw_confusion_matrix

NAMES = ["cat", "dog", "fox"]
# 10 samples, hand-counted below.
LABELS = torch.tensor([0, 0, 0, 0, 1, 1, 1, 2, 2, 2])
PREDS = torch.tensor([0, 0, 0, 1, 1, 1, 2, 0, 2, 2])
EXPECTED = [
    [3, 1, 0],  # cat: 3 right, 1 called dog
    [0, 2, 1],  # dog: 2 right, 1 called fox
    [1, 0, 2],  # fox: 2 right, 1 called cat
]


def read_csv(path: Path) -> list[list[str]]:
    with path.open(newline="") as handle:
        return list(csv.reader(handle))


def by_class(rows: list[dict]) -> dict[str, dict]:
    return {row["class"]: row for row in rows}


def make_images(directory: Path, count: int, size: int = 24) -> list[Path]:
    directory.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(count):
        path = directory / f"img_{i}.png"
        Image.new("RGB", (size, size + i), (20 * i % 256, 100, 200)).save(path)
        paths.append(path)
    return paths


# --- confusion matrix ---------------------------------------------------------------------------


def test_confusion_matrix_counts_true_rows_predicted_columns() -> None:
    matrix = confusion_matrix(LABELS, PREDS, num_classes=3)
    assert matrix.dtype == torch.int64
    assert matrix.tolist() == EXPECTED
    assert int(matrix.sum()) == len(LABELS)


def test_confusion_matrix_keeps_classes_absent_from_the_data() -> None:
    matrix = confusion_matrix(torch.tensor([0, 1]), torch.tensor([1, 1]), num_classes=4)
    assert matrix.shape == (4, 4)
    assert matrix.tolist() == [[0, 1, 0, 0], [0, 1, 0, 0], [0, 0, 0, 0], [0, 0, 0, 0]]


def test_write_confusion_matrix_csv_and_png(tmp_path: Path) -> None:
    matrix = torch.tensor(EXPECTED)
    csv_path, png_path = write_confusion_matrix(matrix, NAMES, tmp_path / "eval")
    assert csv_path == tmp_path / "eval" / "confusion_matrix.csv"
    assert png_path == tmp_path / "eval" / "confusion_matrix.png"
    rows = read_csv(csv_path)
    assert rows[0] == ["true \\ predicted", "cat", "dog", "fox"]
    assert rows[1:] == [[name, *map(str, counts)] for name, counts in zip(NAMES, EXPECTED, strict=True)]
    with Image.open(png_path) as image:
        assert image.format == "PNG"
        assert 300 <= image.width <= 1500 and 300 <= image.height <= 1500


@pytest.mark.slow
def test_confusion_matrix_png_grows_with_the_number_of_classes(tmp_path: Path) -> None:
    small_png = write_confusion_matrix(torch.tensor(EXPECTED), NAMES, tmp_path / "small")[1]
    generator = torch.Generator().manual_seed(0)
    many = torch.randint(0, 30, (50, 50), generator=generator)
    names = [f"class_with_a_long_name_{i:02d}" for i in range(50)]
    big_csv, big_png = write_confusion_matrix(many, names, tmp_path / "big")
    with Image.open(small_png) as small, Image.open(big_png) as big:
        assert big.width > 1.5 * small.width and big.height > 1.5 * small.height
        assert big.width <= 3000 and big.height <= 3000
    rows = read_csv(big_csv)
    assert len(rows) == 51 and rows[0][1:] == names
    assert [int(v) for v in rows[7][1:]] == many[6].tolist()


@pytest.mark.parametrize(
    "names",
    [
        ["a", "b"],
        [f"n{i}" if i % 3 else f"Very Long Class Name Number {i} (with extras)" for i in range(10)],
        [f"class_with_a_long_name_{i:02d}" for i in range(12)],
    ],
    ids=["short", "long-45deg", "long-90deg"],
)
def test_confusion_matrix_labels_all_lie_inside_the_picture(names: list[str]) -> None:
    """The margins are measured from the text, not found by a layout engine: no label is clipped."""
    figure = _draw_confusion_matrix(torch.ones(len(names), len(names), dtype=torch.long), names)
    canvas = FigureCanvasAgg(figure)
    canvas.draw()
    renderer = canvas.get_renderer()
    width, height = canvas.get_width_height()
    texts = [
        text
        for ax in figure.axes
        for text in (*ax.get_xticklabels(), *ax.get_yticklabels(), ax.title, ax.xaxis.label, ax.yaxis.label)
        if text.get_text()
    ]
    assert len(texts) >= 2 * len(names) + 4  # tick labels, title, axis labels, colour bar label
    clipped = []
    for text in texts:
        box = text.get_window_extent(renderer)
        if box.x0 < -0.5 or box.y0 < -0.5 or box.x1 > width + 0.5 or box.y1 > height + 0.5:
            clipped.append(text.get_text())
    assert not clipped


def test_write_confusion_matrix_rejects_wrong_number_of_names(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="class names"):
        write_confusion_matrix(torch.tensor(EXPECTED), ["cat", "dog"], tmp_path)


# --- per-class report ---------------------------------------------------------------------------


def test_per_class_report_matches_hand_computed_values() -> None:
    rows = per_class_report(torch.tensor(EXPECTED), NAMES)
    assert [row["class"] for row in rows] == [*NAMES, "macro avg", "weighted avg"]
    report = by_class(rows)
    # cat: tp 3, predicted 4 (column), support 4 (row)
    assert report["cat"]["precision"] == pytest.approx(3 / 4)
    assert report["cat"]["recall"] == pytest.approx(3 / 4)
    assert report["cat"]["f1"] == pytest.approx(3 / 4)
    assert report["cat"]["support"] == 4
    # dog: tp 2, predicted 3, support 3
    assert report["dog"]["precision"] == pytest.approx(2 / 3)
    assert report["dog"]["recall"] == pytest.approx(2 / 3)
    assert report["dog"]["support"] == 3
    # fox: tp 2, predicted 3, support 3
    assert report["fox"]["f1"] == pytest.approx(2 / 3)
    macro = report["macro avg"]
    assert macro["precision"] == pytest.approx((3 / 4 + 2 / 3 + 2 / 3) / 3)
    assert macro["support"] == 10
    weighted = report["weighted avg"]
    assert weighted["recall"] == pytest.approx((4 * 3 / 4 + 3 * 2 / 3 + 3 * 2 / 3) / 10)  # = accuracy 0.7
    assert weighted["recall"] == pytest.approx(0.7)
    assert weighted["support"] == 10
    assert all(isinstance(row["support"], int) and isinstance(row["f1"], float) for row in rows)


def test_per_class_report_with_unequal_precision_and_recall() -> None:
    # a: tp 2, fn 2, fp 1 -> p 2/3, r 1/2, f1 2*2/(3+4) = 4/7.  b: tp 5, fn 1, fp 1 -> 5/6 each.
    # c: never true, predicted once -> p 0/1 = 0, r 0/0 = 0, f1 0.
    matrix = torch.tensor([[2, 1, 1], [1, 5, 0], [0, 0, 0]])
    report = by_class(per_class_report(matrix, ["a", "b", "c"]))
    assert report["a"]["precision"] == pytest.approx(2 / 3)
    assert report["a"]["recall"] == pytest.approx(1 / 2)
    assert report["a"]["f1"] == pytest.approx(4 / 7)
    assert report["b"]["precision"] == pytest.approx(5 / 6)
    assert report["b"]["recall"] == pytest.approx(5 / 6)
    assert report["b"]["f1"] == pytest.approx(5 / 6)
    assert report["c"] == {"class": "c", "precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 0}
    # c was predicted once, so it counts in the macro average (as sklearn does).
    assert report["macro avg"]["precision"] == pytest.approx((2 / 3 + 5 / 6 + 0) / 3)
    assert report["macro avg"]["f1"] == pytest.approx((4 / 7 + 5 / 6 + 0) / 3)
    assert report["weighted avg"]["f1"] == pytest.approx((4 * 4 / 7 + 6 * 5 / 6) / 10)
    assert report["weighted avg"]["support"] == 10


def test_zero_division_is_zero() -> None:
    # "b" is never predicted: precision 0/0. "c" is neither true nor predicted anywhere.
    matrix = torch.tensor([[3, 0, 0], [2, 0, 0], [0, 0, 0]])
    report = by_class(per_class_report(matrix, ["a", "b", "c"]))
    assert report["b"] == {"class": "b", "precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 2}
    assert report["c"] == {"class": "c", "precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 0}
    assert report["a"]["precision"] == pytest.approx(3 / 5)
    assert report["a"]["recall"] == pytest.approx(1.0)
    assert report["a"]["f1"] == pytest.approx(3 / 4)
    # the macro average is over a and b only: "c" never occurred, so it says nothing about the model
    assert report["macro avg"]["precision"] == pytest.approx(3 / 10)
    assert report["macro avg"]["f1"] == pytest.approx(3 / 8)
    assert report["weighted avg"]["recall"] == pytest.approx(3 / 5)


def test_empty_evaluation_gives_zero_averages() -> None:
    report = by_class(per_class_report(torch.zeros(2, 2, dtype=torch.int64), ["a", "b"]))
    for name in ("a", "b", "macro avg", "weighted avg"):
        assert report[name]["f1"] == 0.0 and report[name]["support"] == 0


def test_write_per_class_report_csv(tmp_path: Path) -> None:
    rows = per_class_report(torch.tensor(EXPECTED), NAMES)
    path = write_per_class_report(rows, tmp_path / "out" / "per_class.csv")
    assert path == tmp_path / "out" / "per_class.csv"
    table = read_csv(path)
    assert table[0] == ["class", "precision", "recall", "f1", "support"]
    assert [row[0] for row in table[1:]] == [*NAMES, "macro avg", "weighted avg"]
    assert table[1] == ["cat", "0.7500", "0.7500", "0.7500", "4"]
    assert table[2] == ["dog", "0.6667", "0.6667", "0.6667", "3"]
    assert table[-1] == ["weighted avg", "0.7000", "0.7000", "0.7000", "10"]


def test_print_per_class_report_shows_every_row(capsys: pytest.CaptureFixture[str]) -> None:
    import rich

    rich.get_console().width = 120  # the console may have been created before capsys
    rows = per_class_report(torch.tensor(EXPECTED), NAMES)
    print_per_class_report(rows, title="Test split")
    output = capsys.readouterr().out
    for text in ("Test split", "cat", "dog", "fox", "macro avg", "weighted avg", "0.7500", "0.6667"):
        assert text in output


# --- misclassified images -----------------------------------------------------------------------


def test_most_confident_mistakes_orders_by_confidence() -> None:
    labels = torch.tensor([0, 1, 2, 0, 1, 2])
    probs = torch.tensor(
        [
            [0.90, 0.05, 0.05],  # right
            [0.60, 0.30, 0.10],  # wrong, 0.60
            [0.05, 0.90, 0.05],  # wrong, 0.90
            [0.20, 0.70, 0.10],  # wrong, 0.70
            [0.10, 0.80, 0.10],  # right
            [0.99, 0.00, 0.01],  # wrong, 0.99
        ]
    )
    assert most_confident_mistakes(labels, probs, count=16) == [5, 2, 3, 1]
    assert most_confident_mistakes(labels, probs, count=2) == [5, 2]
    assert most_confident_mistakes(labels, probs, count=0) == []
    assert most_confident_mistakes(torch.tensor([0, 1]), torch.tensor([[0.9, 0.1], [0.2, 0.8]]), 5) == []


def test_most_confident_mistakes_keeps_data_order_on_ties() -> None:
    labels = torch.tensor([1, 1, 1])
    probs = torch.tensor([[0.7, 0.3], [0.7, 0.3], [0.9, 0.1]])
    assert most_confident_mistakes(labels, probs, 3) == [2, 0, 1]


def test_most_confident_mistakes_rejects_mismatched_shapes() -> None:
    with pytest.raises(ValueError):
        most_confident_mistakes(torch.tensor([0, 1, 0]), torch.rand(2, 3), 4)


def _mistakes(n: int, num_classes: int = 3) -> tuple[torch.Tensor, torch.Tensor]:
    """n samples, all wrong (true 0, predicted 1), confidence rising with the index."""
    labels = torch.zeros(n, dtype=torch.int64)
    probs = torch.zeros(n, num_classes)
    confidence = torch.linspace(0.55, 0.95, n)
    probs[:, 1] = confidence
    probs[:, 0] = 1 - confidence
    return labels, probs


def test_misclassified_grid_draws_the_most_confident_ones(tmp_path: Path) -> None:
    paths = make_images(tmp_path / "images", 10)
    labels, probs = _mistakes(10)
    labels[0] = 1  # sample 0 is right after all
    out = tmp_path / "eval" / "misclassified.png"
    assert write_misclassified_grid(paths, labels, probs, NAMES, out, count=6, thumb=64) == 6
    assert most_confident_mistakes(labels, probs, 6) == [9, 8, 7, 6, 5, 4]
    with Image.open(out) as image:
        assert image.format == "PNG"
        assert image.width > image.height  # 4 columns, 2 rows
        assert 200 <= image.width <= 2000


@pytest.mark.slow
def test_misclassified_grid_counts_at_most_the_mistakes(tmp_path: Path) -> None:
    paths = make_images(tmp_path / "images", 3)
    labels, probs = _mistakes(3)
    out = tmp_path / "grid.png"
    assert write_misclassified_grid([str(p) for p in paths], labels, probs, NAMES, out, count=16) == 3
    with Image.open(out) as image:
        assert image.size[0] > 100 and image.size[1] > 100


def test_misclassified_grid_survives_an_unreadable_file(tmp_path: Path) -> None:
    paths = make_images(tmp_path / "images", 3)
    broken = tmp_path / "images" / "broken.jpg"
    broken.write_bytes(b"not an image at all")
    missing = tmp_path / "images" / "gone.png"
    for bad in (broken, missing):
        with pytest.raises(DataError):
            load_rgb(bad)
    labels, probs = _mistakes(5)
    out = tmp_path / "grid.png"
    # the broken and missing files are the two most confident mistakes, so they are surely drawn
    drawn = write_misclassified_grid([*paths, broken, missing], labels, probs, NAMES, out, count=4)
    assert drawn == 4
    with Image.open(out) as image:
        image.verify()


def test_misclassified_grid_without_mistakes_still_writes_a_png(tmp_path: Path) -> None:
    paths = make_images(tmp_path / "images", 2)
    labels = torch.tensor([0, 2])
    probs = torch.tensor([[0.8, 0.1, 0.1], [0.1, 0.1, 0.8]])
    out = tmp_path / "nested" / "misclassified.png"
    assert write_misclassified_grid(paths, labels, probs, NAMES, out) == 0
    with Image.open(out) as image:
        assert image.format == "PNG" and image.width > 100
        # not a blank canvas: the message is drawn in dark pixels
        assert min(image.convert("L").getdata()) < 100


def test_misclassified_grid_rejects_mismatched_inputs(tmp_path: Path) -> None:
    labels, probs = _mistakes(3)
    with pytest.raises(ValueError, match="paths"):
        write_misclassified_grid(make_images(tmp_path, 2), labels, probs, NAMES, tmp_path / "g.png")
    with pytest.raises(ValueError, match="class names"):
        write_misclassified_grid(make_images(tmp_path, 3), labels, probs, ["a", "b"], tmp_path / "g.png")
