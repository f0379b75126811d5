"""Running a predictor over a list of files in batches, with a progress bar; a file that cannot
be read is recorded with its error and the run goes on."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from rich.progress import Progress
from torch.utils.data import DataLoader, Dataset

from transferkit.data.images import load_rgb
from transferkit.errors import DataError


class FileDataset(Dataset):
    """(index, image tensor or None, error or None) per file: errors travel in the batch, as
    workers cannot report them any other way."""

    def __init__(self, paths: Sequence[Path], transform: Callable[[Any], torch.Tensor]) -> None:
        self.paths, self.transform = list(paths), transform

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> tuple[int, torch.Tensor | None, str | None]:
        try:
            return index, self.transform(load_rgb(self.paths[index])), None
        except DataError as error:
            cause = error.__cause__
            return index, None, str(cause) if cause is not None else str(error)


def collate(items: list[tuple[int, torch.Tensor | None, str | None]]) -> dict[str, Any]:
    good = [(i, image) for i, image, _ in items if image is not None]
    return {
        "indices": [i for i, _ in good],
        "images": torch.stack([image for _, image in good]) if good else None,
        "errors": {i: error for i, _, error in items if error is not None},
    }


@dataclass
class Predictions:
    """Per file: logits (a row of NaN where the file failed) and the error, if any. The logits
    of a `multilabel` model are independent per class: their probabilities are sigmoids."""

    paths: list[Path]
    logits: torch.Tensor
    errors: list[str | None]
    multilabel: bool = False

    @property
    def ok(self) -> torch.Tensor:
        return torch.tensor([e is None for e in self.errors], dtype=torch.bool)

    @property
    def probs(self) -> torch.Tensor:
        return self.logits.sigmoid() if self.multilabel else self.logits.softmax(dim=1)


def mirror_averaged(logits: torch.Tensor, mirrored: torch.Tensor, multilabel: bool) -> torch.Tensor:
    """Logits whose probabilities are the mean of the image's and its mirror image's."""
    if multilabel:
        return ((logits.sigmoid() + mirrored.sigmoid()) / 2).logit()
    return ((logits.softmax(1) + mirrored.softmax(1)) / 2).log()


def predict_files(
    predictor: Any,
    paths: Sequence[Path],
    batch_size: int = 32,
    num_workers: int = 0,
    tta: bool = False,
    description: str = "Predicting",
) -> Predictions:
    """Logits of every file under the predictor's evaluation preprocessing.

    With `tta`, each image is also classified mirrored left-right, and the logits returned are
    the log of the two softmaxes' mean (their softmax is the averaged probabilities); for a
    multi-label predictor, the logit of the two sigmoids' mean (their sigmoid is that mean).
    """
    paths = list(paths)
    dataset = FileDataset(paths, predictor.preprocessing.transforms(train=False))
    loader = DataLoader(dataset, batch_size=batch_size, num_workers=num_workers, collate_fn=collate)
    logits = torch.full((len(paths), len(predictor.class_names)), float("nan"))
    errors: list[str | None] = [None] * len(paths)
    multilabel = bool(predictor.multilabel)
    with Progress(transient=False) as progress:
        task = progress.add_task(description, total=len(paths))
        for batch in loader:
            for index, error in batch["errors"].items():
                errors[index] = error
            if batch["images"] is not None:
                out = predictor.logits(batch["images"])
                if tta:
                    out = mirror_averaged(out, predictor.logits(batch["images"].flip(-1)), multilabel)
                logits[batch["indices"]] = out
            progress.advance(task, len(batch["indices"]) + len(batch["errors"]))
    return Predictions(paths, logits, errors, multilabel)
