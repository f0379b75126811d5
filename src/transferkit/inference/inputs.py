"""What `predict.py input=...` names: one image, a folder searched recursively, or a text file
listing image paths."""

from __future__ import annotations

from pathlib import Path

from transferkit.errors import ConfigError

LIST_SUFFIXES = frozenset({".txt", ".lst"})
# Files operating systems and archivers leave in folders; they are nobody's images.
JUNK_FILES = frozenset({"thumbs.db", "desktop.ini"})
JUNK_DIRS = frozenset({"__MACOSX"})


def is_junk(path: Path, root: Path) -> bool:
    """Hidden files and folders (.DS_Store, .git, ._photo.jpg), Thumbs.db, __MACOSX/."""
    parts = path.relative_to(root).parts
    return any(part.startswith(".") or part in JUNK_DIRS for part in parts) or path.name.lower() in JUNK_FILES


def read_list(path: Path) -> list[Path]:
    """One path per line; blank lines and `#` comments skipped; relative paths are relative to
    the list's own folder."""
    lines = [line.strip() for line in path.read_text().splitlines()]
    paths = [Path(line) for line in lines if line and not line.startswith("#")]
    return [p if p.is_absolute() else path.parent / p for p in paths]


def collect_inputs(input: str | Path) -> list[Path]:
    """The files to classify, in a stable order. Every file in a folder is listed (but junk), so
    a file that is not an image gets its own error row instead of vanishing."""
    path = Path(input)
    if not path.exists():
        raise ConfigError(f"input={input} does not exist; give an image, a folder or a text file of paths.")
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and not is_junk(p, path))
        if not files:
            raise ConfigError(f"input={input} is an empty folder (hidden files and OS junk are skipped).")
        return files
    if path.suffix.lower() in LIST_SUFFIXES:
        files = read_list(path)
        if not files:
            raise ConfigError(f"input={input} lists no paths; write one image path per line.")
        return files
    return [path]
