"""Reading a CSV or TSV of labels: which image under the root has which label(s), in which split.

Pure parsing (no Lightning), so every malformed file is refused here in one line, before any
image is opened. Rows hold a path (relative to the root, or absolute) and either a label cell
(several labels joined by a separator in multi-label data; empty: no label) or one 0/1 column
per class; an optional split column says train, val or test.
"""

from __future__ import annotations

import csv
import logging
import os
from collections import Counter
from dataclasses import dataclass, replace
from pathlib import Path

from transferkit.data.folders import Splits, untrained_classes
from transferkit.data.samples import Label, Sample
from transferkit.data.splitting import split_off_val
from transferkit.errors import ConfigError, DataError

log = logging.getLogger(__name__)
SPLIT_NAMES = ("train", "val", "test")
DEFAULT_SPLIT_COLUMN = "split"  # optional; a split column named otherwise must be there
OTHER_COLUMNS = "*"  # class_columns="*": every column but the path and split ones
TSV_SUFFIXES = (".tsv", ".tab")
SHOWN = 5  # rows or names a message lists before "..."
Row = tuple[int, list[str]]  # the file's line number, the cells


@dataclass(frozen=True)
class LabelColumns:
    """Where a label file keeps what: the data.*_column keys and the multi-label separator."""

    path: str = "path"
    label: str = "label"
    sep: str = ";"
    classes: tuple[str, ...] | str | None = None  # one 0/1 column per class, or OTHER_COLUMNS
    split: str | None = DEFAULT_SPLIT_COLUMN

    def __post_init__(self) -> None:
        if not self.sep:
            raise ConfigError('data.label_sep must not be empty; ";" is the default.')
        if isinstance(self.classes, str) and self.classes != OTHER_COLUMNS:
            raise ConfigError(
                f"data.class_columns={self.classes!r} must be a list of column names, or '*' for every "
                "column but the path and split ones."
            )
        if isinstance(self.classes, tuple | list) and not self.classes:
            raise ConfigError("data.class_columns=[] names no class; list the columns or use null.")


@dataclass(frozen=True)
class LabelRows:
    """A label file read: its samples (paths resolved against the root), each one's split when the
    file has a split column (else `split_of` is None), and the class names."""

    file: Path
    class_names: list[str]
    samples: list[Sample]
    split_of: dict[Path, str] | None
    multilabel: bool
    left_out: int = 0  # rows dropped since (their images are missing)

    def without(self, paths: set[Path]) -> LabelRows:
        samples = [s for s in self.samples if s[0] not in paths]
        return replace(self, samples=samples, left_out=self.left_out + len(self.samples) - len(samples))


def _listed(items: list, shown: int = SHOWN) -> str:
    more = f" and {len(items) - shown} more" if len(items) > shown else ""
    return ", ".join(str(item) for item in items[:shown]) + more


def _lines(rows: list[int]) -> str:
    return f"line{'s' if len(rows) > 1 else ''} {_listed(rows)}"


def read_rows(labels: Path) -> tuple[list[str], list[Row]]:
    """The header and the non-blank rows, tab-separated for .tsv/.tab, else comma-separated."""
    if not labels.is_file():
        raise DataError(
            f"data.labels={labels} does not exist. Set data.labels=PATH to a CSV (or .tsv) with "
            "columns path,label."
        )
    delimiter = "\t" if labels.suffix.lower() in TSV_SUFFIXES else ","
    try:
        with labels.open(newline="", encoding="utf-8-sig") as handle:  # -sig: Excel's BOM
            reader = csv.reader(handle, delimiter=delimiter)
            header = [cell.strip() for cell in next(reader, [])]
            rows = [(reader.line_num, row) for row in reader if any(cell.strip() for cell in row)]
    except (UnicodeDecodeError, csv.Error) as error:
        raise DataError(f"data.labels={labels} cannot be read as a label file ({error}).") from None
    if not any(header):
        raise DataError(
            f"data.labels={labels} is empty; it needs a header row (path,label) and a row per image."
        )
    if not rows:
        raise DataError(f"data.labels={labels} has a header but no rows; add a row per image.")
    return header, rows


class _Table:
    """The header's columns, looked up by name with an error that lists the ones there."""

    def __init__(self, labels: Path, header: list[str]) -> None:
        self.labels, self.header = labels, header

    def index(self, name: str, key: str) -> int:
        if name not in self.header:
            raise DataError(
                f"{self.labels.name} has no column {name!r} (data.{key}); its columns are "
                f"{', '.join(self.header)}. Set data.{key} to one of them."
            )
        return self.header.index(name)


@dataclass(frozen=True)
class _Columns:
    """Where each part of a row is: the path, the split (None: no split column), and the label
    cell (None with class columns) or the class columns."""

    path: int
    split: int | None
    label: int | None
    classes: list[int]


def _find_columns(table: _Table, columns: LabelColumns) -> _Columns:
    path = table.index(columns.path, "path_column")
    split = None
    if columns.split is not None and (columns.split in table.header or columns.split != DEFAULT_SPLIT_COLUMN):
        split = table.index(columns.split, "split_column")
    if columns.classes is None:
        return _Columns(path, split, table.index(columns.label, "label_column"), [])
    if columns.classes != OTHER_COLUMNS:
        return _Columns(path, split, None, [table.index(name, "class_columns") for name in columns.classes])
    others = [i for i in range(len(table.header)) if i not in (path, split)]
    if not others:
        raise DataError(f"{table.labels.name} has no column besides the path and split ones.")
    return _Columns(path, split, None, others)


@dataclass(frozen=True)
class _Entry:
    """One row read: its label as written (a name, a set of names, or 0/1 per class column)."""

    line: int
    path: Path
    label: str | frozenset[str] | tuple[int, ...]
    split: str | None


def _binary(value: str, line: int, column: str, labels: Path) -> int:
    try:
        number = float(value)
    except ValueError:
        number = -1.0
    if number not in (0.0, 1.0):
        raise DataError(
            f"{labels.name} line {line}, column {column!r} holds {value!r}; class columns must hold 0 or 1."
        )
    return int(number)


def _read_entries(
    table: _Table, rows: list[Row], at: _Columns, columns: LabelColumns, root: Path, multilabel: bool
) -> list[_Entry]:
    """Every row as an entry; rows without a path, with a split that is none, or without the one
    label single-label data needs, are refused (all such rows named at once)."""
    labels, header = table.labels, table.header
    no_path, no_label, wrong_count, bad_splits = [], [], [], Counter()
    entries = []
    for line, row in rows:
        cells = [cell.strip() for cell in row] + [""] * (len(header) - len(row))
        split = cells[at.split].lower() if at.split is not None else None
        if split is not None and split not in SPLIT_NAMES:
            bad_splits[cells[at.split] or "(empty)"] += 1
        if not cells[at.path]:
            no_path.append(line)
            continue
        label: str | frozenset[str] | tuple[int, ...]
        if at.label is None:
            label = tuple(_binary(cells[i], line, header[i], labels) for i in at.classes)
            if not multilabel and sum(label) != 1:
                wrong_count.append(line)
        elif multilabel:
            label = frozenset(name.strip() for name in cells[at.label].split(columns.sep)) - {""}
        else:
            label = cells[at.label]
            if not label:
                no_label.append(line)
        entries.append(_Entry(line, Path(os.path.normpath(root / cells[at.path])), label, split))
    if no_path:
        raise DataError(
            f"{labels.name} has rows without a path ({_lines(no_path)}); fill them in or remove them."
        )
    if bad_splits:
        values = _listed([f"{value!r} ({n} rows)" for value, n in bad_splits.items()])
        raise DataError(
            f"{labels.name}'s column {header[at.split]!r} holds {values}; a split is train, val or test "
            "(or set data.split_column=null to split off val by data.val_fraction)."
        )
    if no_label:
        raise DataError(
            f"{labels.name} has rows with an empty label ({_lines(no_label)}); label them or remove "
            "them (images with no label need data.multilabel=true)."
        )
    if wrong_count:
        raise DataError(
            f"{labels.name} has rows with no class column or several at 1 ({_lines(wrong_count)}); "
            "single-label data needs exactly one (set data.multilabel=true if images have several)."
        )
    return entries


def _one_per_image(entries: list[_Entry], labels: Path) -> list[_Entry]:
    """One entry per path: identical repeats dropped with a warning; a path given two labels, or
    two splits (a leak between them), is an error."""
    first: dict[Path, _Entry] = {}
    repeated, conflicts, leaks = 0, [], []
    for entry in entries:
        seen = first.setdefault(entry.path, entry)
        if seen is entry:
            continue
        name = entry.path.name
        if seen.label != entry.label:
            conflicts.append(f"{name} (lines {seen.line} and {entry.line})")
        elif seen.split != entry.split:
            leaks.append(f"{name} ({seen.split} on line {seen.line}, {entry.split} on line {entry.line})")
        else:
            repeated += 1
    if conflicts:
        raise DataError(
            f"{labels.name} gives {len(conflicts)} image(s) different labels: {_listed(conflicts)}; "
            "keep one row per image."
        )
    if leaks:
        raise DataError(
            f"{labels.name} puts {len(leaks)} image(s) in two splits, which would leak them into "
            f"evaluation: {_listed(leaks)}; keep one row per image."
        )
    if repeated:
        log.warning("%s repeats %d row(s) exactly; each image is used once.", labels.name, repeated)
    return list(first.values())


def _labelled(
    entries: list[_Entry], class_names: list[str] | None, multilabel: bool
) -> tuple[list[str], list[Sample]]:
    """The class names (the class columns' `class_names`, else the sorted labels) and the samples."""
    if class_names is not None:  # class columns: 0/1 per class already
        return class_names, [(e.path, e.label if multilabel else e.label.index(1)) for e in entries]
    if multilabel:
        names = sorted(set().union(*(e.label for e in entries)))
        return names, [(e.path, tuple(int(name in e.label) for name in names)) for e in entries]
    names = sorted({e.label for e in entries})
    index = {name: i for i, name in enumerate(names)}
    return names, [(e.path, index[e.label]) for e in entries]


def read_label_file(labels: Path, root: Path, columns: LabelColumns, multilabel: bool) -> LabelRows:
    """The label file's samples and class names: sorted unique labels, or the class columns' order.
    Nothing is opened but the file itself (missing images are the caller's: `missing_images`)."""
    header, rows = read_rows(labels)
    root = Path(os.path.abspath(root))  # absolute: paths sort (and split) the same from any cwd
    table = _Table(labels, header)
    at = _find_columns(table, columns)
    entries = _one_per_image(_read_entries(table, rows, at, columns, root, multilabel), labels)
    class_names, samples = _labelled(
        entries, [header[i] for i in at.classes] if at.classes else None, multilabel
    )
    joined = [name for name in class_names if columns.sep in name] if not multilabel else []
    if joined:
        log.warning(
            "%s has labels holding %r (%s): if those images have several labels, set data.multilabel=true.",
            labels.name,
            columns.sep,
            _listed(joined),
        )
    split_of = {e.path: e.split for e in entries} if at.split is not None else None
    return LabelRows(labels, class_names, samples, split_of, multilabel)


def missing_images(rows: LabelRows) -> list[Path]:
    """The files the label file names that are not there (checked with a stat, never decoded)."""
    return [path for path, _ in rows.samples if not path.is_file()]


def missing_message(missing: list[Path], rows: LabelRows, root: Path) -> str:
    listed = _listed([os.path.relpath(path, root) for path in missing], 20)
    return (
        f"{len(missing)} image(s) named in {rows.file.name} are missing: {listed}; fix the paths "
        f"(relative to data.root={root}) or set data.on_bad_image=skip to train without them."
    )


def _multilabel_split(
    samples: list[Sample], fraction: float, seed: int | None, root: Path
) -> tuple[list[Sample], list[Sample]]:
    """Split file by file as single-label data is, the guarantee of a val image applied per
    label combination (those of one image pooled, or with many classes, most combinations
    unique, it would hold nothing out); a class val would take every image of gets one back."""
    combos = Counter(label for _, label in samples)
    train, val = split_off_val(samples, fraction, seed, root, lambda s: s[1] if combos[s[1]] > 1 else ())
    for c in range(len(samples[0][1])):
        if not any(label[c] for _, label in train):
            back = next((s for s in val if s[1][c]), None)
            if back is not None:
                val.remove(back)
                train = sorted([*train, back])
    return train, val


def split_rows(rows: LabelRows, val_fraction: float, seed: int | None, root: Path) -> Splits:
    """The splits the split column gives, with val held out of train file by file (by the hash
    of each path under `root` and the seed: `transferkit.data.splitting`) when it gives none or
    there is no split column. Neither reordering the rows nor adding, removing or skipping one
    moves another image to another split."""
    samples = sorted(rows.samples)
    split_of = rows.split_of or {}
    by_split = {name: [s for s in samples if split_of.get(s[0], "train") == name] for name in SPLIT_NAMES}
    train, val, test = by_split["train"], by_split["val"], by_split["test"] or None
    if not train:
        raise DataError(f"{rows.file.name} has no train rows; mark the images to train on with split=train.")
    val_from_train = not val
    if val_from_train:
        split = _multilabel_split if rows.multilabel else split_off_val
        train, val = split(train, val_fraction, seed, root)
        if not val:
            raise DataError(
                f"{rows.file.name} gives too few training images to split off val (a class needs 2 or "
                "more); add rows or a split column with val rows."
            )
    splits = Splits(rows.class_names, train, val, test, val_from_train, rows.multilabel)
    untrained = untrained_classes(splits)
    if untrained:
        elsewhere = [
            name
            for i, name in enumerate(splits.class_names)
            if name in untrained and any(_has(label, i) for _, label in val + (test or []))
        ]
        where = f" (seen only in val or test: {_listed(elsewhere)})" if elsewhere else ""
        where += f" once the {rows.left_out} missing image(s) are left out" if rows.left_out else ""
        raise DataError(
            f"Class(es) {_listed(untrained)} have no training image in {rows.file.name}{where}; add "
            "training rows for them or remove them."
        )
    return splits


def _has(label: Label, index: int) -> bool:
    return bool(label[index]) if isinstance(label, tuple) else label == index
