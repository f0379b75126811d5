"""The images the audit suggests training without, one path a line, for `data.exclude=FILE`."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path

from transferkit.audit.duplicates import Pair
from transferkit.audit.items import Item


def suggested_exclusions(
    items: Sequence[Item],
    pairs: Iterable[Pair],
    label_issues: Iterable[int],
    unreadable: Iterable[Path] = (),
) -> list[Path]:
    """For a leak, the copy in the earlier split (train before val before test: the held-out copy
    stays); for a pair within a split, the later file (one of each group stays); every likely
    wrong label; every unreadable file. In the order found, each path once."""
    chosen: dict[Path, None] = {}
    for pair in pairs:
        a, b = items[pair.a], items[pair.b]
        chosen[a.path if a.split != b.split else b.path] = None
    for index in label_issues:
        chosen[items[index].path] = None
    for path in unreadable:
        chosen[Path(path)] = None
    return list(chosen)
