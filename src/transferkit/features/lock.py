"""One writer per cache: a lock file beside the cache directory, so a second run on the same data
waits for the first one's cache instead of computing it again.

The lock is created whole (written under another name, then hard-linked: `link` fails when the
name exists), and holds the writer's host and pid; the writer touches it as it goes. It is
stale, and taken over, when its process is gone (same host) or it has not been touched for
`STALE_S`. Two writers (a lock broken by mistake) are wasted work, never a wrong cache: each
builds its own temporary directory and the rename that publishes it is atomic.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import time
import uuid
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

STALE_S = 600.0  # a writer touches its lock at least every HEARTBEAT_S while it extracts
HEARTBEAT_S = 30.0
POLL_S = 1.0


def process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


class CacheLock:
    """`<cache>.lock`: `acquire` until `release`; `holder` says who has it, `stale` whether
    that holder is gone."""

    def __init__(self, cache: Path) -> None:
        self.path = cache.with_name(cache.name + ".lock")
        self.touched = 0.0
        self.held = False

    def acquire(self) -> bool:
        """Take the lock if it is free (or stale: then it is broken first); False when another
        live run holds it."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if self.path.exists() and self.stale():
            log.info("Taking over the stale lock %s (%s).", self.path, self.describe())
            self.path.unlink(missing_ok=True)
        mine = self.path.with_name(f"{self.path.name}.{uuid.uuid4().hex[:8]}")
        mine.write_text(json.dumps({"host": socket.gethostname(), "pid": os.getpid()}))
        try:
            os.link(mine, self.path)
        except FileExistsError:
            return False
        finally:
            mine.unlink()
        self.touched, self.held = time.time(), True
        return True

    def heartbeat(self) -> None:
        """Say the writer is still at it (cheap enough to call every batch)."""
        now = time.time()
        if self.held and now - self.touched >= HEARTBEAT_S:
            os.utime(self.path)
            self.touched = now

    def release(self) -> None:
        """Give the lock up, if this process holds it (never another run's)."""
        if self.held:
            self.path.unlink(missing_ok=True)
            self.held = False

    def holder(self) -> dict[str, Any]:
        """Who holds the lock and how long ago it was touched ({} when there is none)."""
        try:
            age = time.time() - self.path.stat().st_mtime
        except OSError:
            return {}
        try:
            holder = json.loads(self.path.read_text())
        except (OSError, ValueError):
            holder = {}
        return {**holder, "age_s": age}

    def stale(self) -> bool:
        holder = self.holder()
        if not holder:
            return True
        if holder["age_s"] > STALE_S:
            return True
        pid = holder.get("pid")
        return holder.get("host") == socket.gethostname() and isinstance(pid, int) and not process_alive(pid)

    def describe(self) -> str:
        holder = self.holder()
        return f"pid {holder.get('pid')} on {holder.get('host')}, touched {holder.get('age_s', 0):.0f} s ago"

    def wait(self) -> None:
        """Until the lock is released or its holder is gone."""
        while self.path.exists() and not self.stale():
            time.sleep(POLL_S)
