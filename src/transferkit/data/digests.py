"""What a checkpoint records of the files it was trained on, and what changed since.

Each split (train, val, test; in a cross-validation fold, the fold's train and val, and the
held-out split as test) is recorded as its file count and the sha256 of its sorted paths under
the data root, one a line with / separators: the same wherever the root is moved, different as
soon as one file is added, removed or renamed. A digest cannot say which files changed, only
that some did and the counts.

Beside them, `"val_from"` records how the run's val was made: `"seed"` (cut from the training
files by their hash: `transferkit.data.splitting`; every cross-validation fold's is) or `"data"`
(a val/ folder, val rows). Only a val the data fixed can change without taking in images the
run may have trained on.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from transferkit.data.folders import Splits
from transferkit.data.samples import Sample
from transferkit.data.splitting import file_key
from transferkit.errors import ConfigError

log = logging.getLogger(__name__)
SPLIT_NAMES = ("train", "val", "test")
TRAINED = ("train", "val")  # what a resume goes on training and choosing the best epoch by
MEASURED = ("test",)  # what a resume only measures at the end


def split_digest(samples: list[Sample], root: Path) -> dict[str, Any]:
    """{"files": n, "sha256": digest of the sorted paths under `root`}."""
    keys = sorted(file_key(path, Path(root).expanduser()) for path, _ in samples)
    return {"files": len(keys), "sha256": hashlib.sha256("\n".join(keys).encode()).hexdigest()}


def split_digests(splits: Splits, root: Path) -> dict[str, Any]:
    """The digest of every split the data has, and how its val was made (`val_from`)."""
    present = {name: getattr(splits, name) for name in SPLIT_NAMES}
    digests: dict[str, Any] = {
        name: split_digest(samples, root) for name, samples in present.items() if samples is not None
    }
    digests["val_from"] = val_from(splits)
    return digests


def val_from(splits: Splits) -> str:
    """`seed` when val was cut from the training files by their hash, else `data`: what eval
    needs to know whether a val that changed may hold images the run trained on."""
    return "seed" if splits.val_from_train else "data"


@dataclass(frozen=True)
class SplitChange:
    """A split whose files differ from the run's: how many it held then and holds now."""

    split: str
    then: int | None  # None: the run had no such split
    now: int | None  # None: the data has it no more

    def __str__(self) -> str:
        if self.then is None:
            return f"the {self.split} split was not in the run and holds {self.now} files now"
        if self.now is None:
            return f"the {self.split} split held {self.then} files in the run and is gone now"
        if self.then == self.now:
            return f"the {self.split} split holds {self.now} files, as in the run, but not the same ones"
        return f"the {self.split} split held {self.then} files in the run, {self.now} now"


def _files(digest: dict[str, Any] | None) -> int | None:
    return None if digest is None else int(digest["files"])


def changed_splits(
    recorded: dict[str, Any], current: dict[str, Any], names: tuple[str, ...] = SPLIT_NAMES
) -> list[SplitChange]:
    """The splits among `names` whose recorded digest differs from the data's now."""
    changes = []
    for name in names:
        then, now = recorded.get(name), current.get(name)
        if then != now:
            changes.append(SplitChange(name, _files(then), _files(now)))
    return changes


def describe_changes(changes: list[SplitChange]) -> str:
    return "; ".join(str(change) for change in changes)


def refuse_resume_on_other_files(
    ckpt_path: str | Path, recorded: dict[str, Any] | None, current: dict[str, Any], root: Path
) -> None:
    """A resume goes on training on the run's own train split and choosing its best epoch on the
    run's own val: refuse one whose data no longer gives them, and say when test changed (a
    checkpoint that predates the digests is not compared)."""
    changes = changed_splits(recorded, current, TRAINED) if recorded else []
    if changes:
        raise ConfigError(
            f"ckpt_path={ckpt_path} continues a run trained on other files "
            f"({describe_changes(changes)}: files were added, removed or renamed under {root}); "
            "resume on the data as it was, or leave out ckpt_path to start a new run."
        )
    warn_of_other_test_files(recorded, current)


def warn_of_other_test_files(recorded: dict[str, Any] | None, current: dict[str, Any]) -> None:
    """The test split is only measured at the end, so a resume may go on when it changed; but
    test/* in results.json will then be of other files than the run's, which the user is told."""
    changes = changed_splits(recorded, current, MEASURED) if recorded else []
    if changes:
        log.warning(
            "The resumed run's test files changed (%s); test/* in results.json will be measured on "
            "the test files as they are now, not the run's.",
            describe_changes(changes),
        )
