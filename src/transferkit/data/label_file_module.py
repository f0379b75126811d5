"""The datamodule over images labelled by a CSV or TSV file (`data=csv`), single- or multi-label."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from transferkit.data.datamodule import ImageFolderDataModule
from transferkit.data.folders import Splits
from transferkit.data.label_file import (
    LabelColumns,
    missing_images,
    missing_message,
    read_label_file,
    split_rows,
)
from transferkit.errors import ConfigError, DataError

log = logging.getLogger(__name__)


class LabelFileDataModule(ImageFolderDataModule):
    """Images anywhere under `root`, labelled by the file `labels` (tab-separated for .tsv/.tab).

    Columns: `path_column` (relative to `root`, or absolute), and `label_column` or one 0/1 column
    per class (`class_columns`: a list, or "*" for all but the path and split ones); a
    `split_column` of train/val/test is used when the file has it. With `multilabel`, a label cell
    holds any number of labels joined by `label_sep` (empty: none). Every other option is the
    image-folder module's.
    """

    def __init__(
        self,
        root: str | Path,
        labels: str | Path,
        path_column: str = "path",
        label_column: str = "label",
        label_sep: str = ";",
        class_columns: Sequence[str] | str | None = None,
        split_column: str | None = "split",
        multilabel: bool = False,
        label_from: str | None = None,
        **kwargs: Any,
    ) -> None:
        if label_from is not None:
            raise ConfigError(
                "data.label_from does not combine with data=csv, whose labels come from data.labels; "
                "drop data.label_from, or use data=imagefolder to read labels from file names."
            )
        super().__init__(root, **kwargs)
        self.labels = Path(labels).expanduser()
        classes = class_columns if isinstance(class_columns, str | None) else tuple(class_columns)
        self.columns = LabelColumns(path_column, label_column, label_sep, classes, split_column)
        self._multilabel = bool(multilabel)
        if self._multilabel and self.balance == "sampler":
            raise ConfigError(
                "data.balance=sampler cannot draw classes equally often when images have several "
                "labels; use data.balance=weights (BCE pos_weight per class)."
            )
        if self._multilabel and (self.mixup_alpha > 0 or self.cutmix_alpha > 0):
            raise ConfigError(
                "data.mixup_alpha and data.cutmix_alpha work on single-label data only; set both to 0 "
                "with data.multilabel=true."
            )

    def listed(self) -> Splits:
        """The label file's splits. Images it names that are not there stop the run here, before
        any is decoded, or with on_bad_image=skip are left out and listed in `bad_images`."""
        if not self.root.is_dir():
            raise DataError(
                f"data.root={self.root} does not exist. Set data.root=PATH to the folder the paths in "
                f"{self.labels.name} are relative to."
            )
        rows = read_label_file(self.labels, self.root, self.columns, self.multilabel)
        missing = missing_images(rows)
        if missing and self.on_bad_image == "error":
            raise DataError(missing_message(missing, rows, self.root))
        if missing:
            log.warning("Skipping %d image(s) named in %s that are missing.", len(missing), self.labels.name)
            self.bad_images.update({path: f"missing (named in {self.labels.name})" for path in missing})
            rows = rows.without(set(missing))
        return split_rows(rows, self.val_fraction, self.seed, self.root)
