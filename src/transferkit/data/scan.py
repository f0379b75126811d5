"""Every image decoded once before training, so a bad file stops the run at the start (or is
skipped), not an hour in.

Verdicts are cached, so a second run over unchanged files decodes nothing, but only verdicts
about a file's content: it decoded, or bytes that were read in full did not. They are keyed by
what decides them: the file's size and modification time, and the decoder (the Pillow version
and SCAN_VERSION, in the cache's header: a newer Pillow may decode what an older one could not).
A failure to read the bytes at all (a permission, a network drive, a file that vanished) says
nothing about the picture: it makes the file bad for this run only and is never remembered, so
a file fixed with chmod, which leaves its modification time alone, is used by the next run.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import PIL
from rich.progress import Progress

from transferkit.data.images import decode_rgb
from transferkit.errors import DataError
from transferkit.files import write_atomic

SCAN_VERSION = 2  # raise it whenever check_image can give another verdict for the same bytes


@dataclass(frozen=True)
class Verdict:
    """Why a file cannot be used as an image (None: it can), and whether that is a lasting fact
    about its content (cached) or only about reading it this time (not cached)."""

    error: str | None
    lasting: bool = True


def read_bytes(path: Path) -> bytes:
    """The whole file: the one step of a check where the operating system can fail."""
    with open(path, "rb") as file:
        return file.read()


def content_error(data: bytes, name: Path) -> str | None:
    """Why these bytes are not a usable image, or None when they decode in full, decoded by the
    same code as training reads images with; any error here is about the bytes."""
    if not data:
        return "empty file (0 bytes)"
    try:
        decode_rgb(io.BytesIO(data), name)
    except DataError as error:
        return str(error.__cause__ or error)
    return None


def _unreadable(error: OSError) -> Verdict:
    return Verdict(
        f"cannot read the file now ({error.strerror or error}); checked again next run", lasting=False
    )


def check_image(path: Path) -> Verdict:
    """The verdict on one file: its bytes read by the operating system, then decoded from memory."""
    try:
        data = read_bytes(path)
    except OSError as error:
        return _unreadable(error)
    return Verdict(content_error(data, path))


def _signature(path: Path) -> list[int]:
    stat = os.stat(path)
    return [stat.st_size, stat.st_mtime_ns]


def _decoder() -> dict[str, object]:
    """What besides the bytes decides a verdict; a cache written under another one is ignored."""
    return {"scan": SCAN_VERSION, "pillow": PIL.__version__}


def cache_file(directory: str | Path, root: str | Path) -> Path:
    """One cache per dataset folder, shared by every run over it."""
    key = hashlib.sha256(str(Path(root).resolve()).encode()).hexdigest()[:24]
    return Path(directory) / f"{key}.json"


def _load(cache: Path | None, decoder: dict[str, object]) -> dict[str, list]:
    if cache is None or not cache.is_file():
        return {}
    try:
        data = json.loads(cache.read_text())
        return data["files"] if data.get("decoder") == decoder else {}
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return {}  # a damaged cache is only a slower scan


def _save(cache: Path, decoder: dict[str, object], files: dict[str, list]) -> None:
    cache.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(cache, json.dumps({"decoder": decoder, "files": files}))


def scan_images(paths: Iterable[Path], cache: Path | None = None, workers: int = 1) -> dict[Path, str]:
    """The files among `paths` that cannot be read, with why, in the order given. Decoding runs on
    `workers` threads (Pillow releases the GIL while it decodes); `cache` keeps the lasting verdicts."""
    decoder = _decoder()
    known = _load(cache, decoder)
    verdicts: dict[str, Verdict | None] = {}
    todo = []
    for path in paths:
        try:
            signature = _signature(path)
        except OSError as error:
            verdicts[str(path)] = _unreadable(error)
            continue
        entry = known.get(str(path))
        if entry is not None and entry[:2] == signature:
            verdicts[str(path)] = Verdict(entry[2])
        else:
            verdicts[str(path)] = None
            todo.append((path, signature))
    if todo:
        with Progress(transient=True) as progress, ThreadPoolExecutor(max(1, workers)) as pool:
            task = progress.add_task(f"Checking {len(todo)} images", total=len(todo))
            for (path, signature), verdict in zip(
                todo, pool.map(check_image, [p for p, _ in todo]), strict=True
            ):
                verdicts[str(path)] = verdict
                if verdict.lasting:
                    known[str(path)] = [*signature, verdict.error]
                else:
                    known.pop(str(path), None)
                progress.advance(task)
        if cache is not None:
            _save(cache, decoder, known)
    return {Path(p): v.error for p, v in verdicts.items() if v is not None and v.error is not None}
