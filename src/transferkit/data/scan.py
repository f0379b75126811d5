"""Every image decoded once before training, so a bad file stops the run at the start (or is
skipped), not an hour in. Results are cached by path, size and modification time: a second run
over unchanged files decodes nothing."""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from rich.progress import Progress

from transferkit.data.images import load_rgb
from transferkit.errors import DataError

CACHE_VERSION = 1


def check_image(path: Path) -> str | None:
    """Why the file cannot be used as an image, or None when it decodes in full."""
    try:
        if os.path.getsize(path) == 0:
            return "empty file (0 bytes)"
        load_rgb(path)
    except DataError as error:
        cause = error.__cause__
        return str(cause) if cause is not None else str(error)
    except OSError as error:
        return str(error)
    return None


def _signature(path: Path) -> list[int]:
    stat = os.stat(path)
    return [stat.st_size, stat.st_mtime_ns]


def cache_file(directory: str | Path, root: str | Path) -> Path:
    """One cache per dataset folder, shared by every run over it."""
    key = hashlib.sha256(str(Path(root).resolve()).encode()).hexdigest()[:24]
    return Path(directory) / f"{key}.json"


def _load(cache: Path | None) -> dict[str, list]:
    if cache is None or not cache.is_file():
        return {}
    try:
        data = json.loads(cache.read_text())
        return data["files"] if data.get("version") == CACHE_VERSION else {}
    except (OSError, ValueError, KeyError, TypeError):
        return {}  # a damaged cache is only a slower scan


def _save(cache: Path, files: dict[str, list]) -> None:
    cache.parent.mkdir(parents=True, exist_ok=True)
    tmp = cache.with_name(f".{cache.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps({"version": CACHE_VERSION, "files": files}))
    os.replace(tmp, cache)


def scan_images(paths: Iterable[Path], cache: Path | None = None, workers: int = 1) -> dict[Path, str]:
    """The files among `paths` that cannot be read, with why. Decoding runs on `workers`
    threads (Pillow releases the GIL while it decodes); `cache` keeps the verdicts."""
    known = _load(cache)
    results: dict[str, list] = {}
    todo = []
    for path in paths:
        signature = _signature(path)
        entry = known.get(str(path))
        if entry is not None and entry[:2] == signature:
            results[str(path)] = entry
        else:
            todo.append((path, signature))
    if todo:
        with Progress(transient=True) as progress, ThreadPoolExecutor(max(1, workers)) as pool:
            task = progress.add_task(f"Checking {len(todo)} images", total=len(todo))
            verdicts = pool.map(check_image, [path for path, _ in todo])
            for (path, signature), error in zip(todo, verdicts, strict=True):
                results[str(path)] = [*signature, error]
                progress.advance(task)
        if cache is not None:
            _save(cache, {**known, **results})
    return {Path(p): entry[2] for p, entry in results.items() if entry[2] is not None}
