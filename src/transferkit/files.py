"""Files replaced whole: a reader (another job, a resume, a user) never sees half of one.

Each write goes through a temporary file of its own beside the target, then `os.replace`, which
is atomic on one filesystem: processes writing one path at once (parallel sweep jobs) never
rename each other's, and a crash leaves the old file. The temporary file is created like a plain
file (the umask's permissions, not mkstemp's 0600: others may read runs).
"""

from __future__ import annotations

import os
import secrets
import shutil
from collections.abc import Callable
from pathlib import Path


def _replace(target: Path, make: Callable[[Path], None]) -> None:
    """`make` the temporary file, then rename it over `target`; nothing is left on failure."""
    tmp = target.with_name(f".{target.name}.{secrets.token_hex(8)}.tmp")
    try:
        make(tmp)
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_atomic(path: str | Path, data: str | bytes) -> None:
    """Replace `path` with `data` (text is written as UTF-8, line endings as given)."""
    payload = data.encode() if isinstance(data, str) else data

    def make(tmp: Path) -> None:
        with tmp.open("xb") as f:
            f.write(payload)

    _replace(Path(path), make)


def link_or_copy(source: str | Path, target: str | Path) -> None:
    """Make `target` a hard link to `source` (a copy where the filesystem has no hard links),
    replacing it atomically. A hard link, not a symbolic one: it survives moving or copying the
    run directory."""

    def make(tmp: Path) -> None:
        try:
            os.link(source, tmp)
        except OSError:
            shutil.copyfile(source, tmp)

    _replace(Path(target), make)
