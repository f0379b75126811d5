"""What a checkpoint records of the files it was trained on, and what changed since.

Each split (train, val, test; in a cross-validation fold, the fold's train and val) is recorded
as its file count and the sha256 of its sorted paths under the data root, one a line with /
separators: the same wherever the root is moved, different as soon as one file is added, removed
or renamed. A digest cannot say which files changed, only that some did and the counts.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from transferkit.data.folders import Splits
from transferkit.data.samples import Sample
from transferkit.data.splitting import file_key
from transferkit.errors import ConfigError

SPLIT_NAMES = ("train", "val", "test")
TRAINED = ("train", "val")  # what a resume goes on training and choosing the best epoch by


def split_digest(samples: list[Sample], root: Path) -> dict[str, Any]:
    """{"files": n, "sha256": digest of the sorted paths under `root`}."""
    keys = sorted(file_key(path, Path(root).expanduser()) for path, _ in samples)
    return {"files": len(keys), "sha256": hashlib.sha256("\n".join(keys).encode()).hexdigest()}


def split_digests(splits: Splits, root: Path) -> dict[str, dict[str, Any]]:
    """The digest of every split the data has."""
    present = {name: getattr(splits, name) for name in SPLIT_NAMES}
    return {name: split_digest(samples, root) for name, samples in present.items() if samples is not None}


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
    run's own val: refuse one whose data no longer gives them (a checkpoint that predates the
    digests is not compared)."""
    changes = changed_splits(recorded, current, TRAINED) if recorded else []
    if changes:
        raise ConfigError(
            f"ckpt_path={ckpt_path} continues a run trained on other files "
            f"({describe_changes(changes)}: files were added, removed or renamed under {root}); "
            "resume on the data as it was, or leave out ckpt_path to start a new run."
        )
