"""One writer per cache: an OS lock on `<cache>.lock` beside the cache directory, so a second run
on the same data waits for the first one's cache instead of computing it again.

The lock is `filelock.FileLock` (flock on Unix): the kernel releases it when its holder's process
ends, however it ends (kill -9 included), so there is no staleness to judge and no lock to break.
Whoever takes it next is the only holder, and whatever a dead holder left (its build directory,
`store.temporary_dir`) is the new holder's to remove. The lock file itself stays, empty: deleting
it while another run has it open would let two runs hold two files of one name. Who holds the
lock is told by its build directory's name (host and pid), which only the holder makes.
"""

from __future__ import annotations

from pathlib import Path

from filelock import FileLock, Timeout

from transferkit.features import store

POLL_S = 0.1  # a waiter's try interval: a cheap open and flock of a local or shared file


class CacheLock:
    """`<cache>.lock`: `acquire` until `release`, per run (not per thread: a DDP rank's hooks
    may run on another thread than the one that took it)."""

    def __init__(self, cache: Path) -> None:
        self.cache = cache
        self.path = cache.with_name(cache.name + ".lock")
        self.lock = FileLock(self.path, thread_local=False, poll_interval=POLL_S)

    @property
    def held(self) -> bool:
        return self.lock.is_locked

    def acquire(self, blocking: bool = True) -> bool:
        """Take the lock, waiting while another run holds it when `blocking`; False when it is
        held elsewhere (only without blocking). OSError when the filesystem refuses locks."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if self.held:
            return True
        try:
            self.lock.acquire(blocking=blocking)
        except Timeout:
            return False
        return True

    def release(self) -> None:
        """Give the lock up, if this run holds it (never another run's)."""
        if self.held:
            self.lock.release(force=True)

    def describe(self) -> str:
        """Who holds the lock, as its newest build directory's name says ("pid 4242 on node3"),
        or that it has made none yet (it has just taken the lock)."""
        builds = store.build_dirs(self.cache)
        return store.builder(builds[0]) if builds else "just started"
