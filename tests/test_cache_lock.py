"""One writer per feature cache, through an OS lock the kernel frees when its holder dies: runs
contending for one key build it once and all open that one cache; a holder killed mid-build is
succeeded cleanly (its build directory removed by the next holder only); a waiter says whom it
waits for, in one line."""

from __future__ import annotations

import logging
import multiprocessing
import os
import queue
import shutil
import signal
import time
from pathlib import Path
from typing import Any

import pytest
import torch
from test_parallel_cache import stand_in

from transferkit.features import store
from transferkit.features.cache import Extraction, cache_path, job_key, load, load_or_build
from transferkit.features.lock import CacheLock

FORK = multiprocessing.get_context("fork")  # children start in milliseconds, torch already imported
CONTENDERS = 3
ROUNDS = 3  # races are a matter of timing: each round is another chance to lose one
BUILD_S = 0.3  # long enough for a contender to strike while a build runs
UNLINK_S = 0.05  # a shared filesystem's metadata round trip, slowed: what widens a race window


def slow_unlinks() -> None:
    """Every unlink in this (forked) process takes UNLINK_S from now on, as on a busy NFS server."""
    unlink = os.unlink

    def slow(*args: Any, **kwargs: Any) -> None:
        time.sleep(UNLINK_S)
        unlink(*args, **kwargs)

    os.unlink = slow


def noting_builds(job: Extraction, on_build: Any) -> Extraction:
    """`job`, whose write_shards first calls `on_build(build_dir)`."""
    write_shards = job.write_shards

    def build(directory: Path, *args: Any, **kwargs: Any) -> None:
        on_build(directory)
        write_shards(directory, *args, **kwargs)

    job.write_shards = build  # type: ignore[method-assign]
    return job


def contend(directory: Path, image_folder: Path, go: Any, results: Any) -> None:
    """A run of the stand-in job under `directory`, started on `go`; puts (pid, outcome, path):
    outcome "built", "reused" or the error. A build checks after BUILD_S that its directory is
    still there and its own (no other process deleted it)."""
    torch.set_num_threads(1)
    slow_unlinks()

    def slow_build(build_dir: Path) -> None:
        (build_dir / "builder").write_text(str(os.getpid()))
        time.sleep(BUILD_S)
        owner = build_dir / "builder"
        if not owner.is_file() or owner.read_text() != str(os.getpid()):
            raise RuntimeError(f"{build_dir} was deleted while its builder ({os.getpid()}) wrote it")

    job = noting_builds(stand_in(image_folder), slow_build)
    go.wait(30)
    try:
        _, path, reused = load_or_build(job, directory)
        results.put((os.getpid(), "reused" if reused else "built", str(path)))
    except Exception as error:  # noqa: BLE001 - the parent asserts on it
        results.put((os.getpid(), repr(error), None))


def die_holding(directory: Path, image_folder: Path, building: Any) -> None:
    """A run that takes the lock, starts its build, and hangs there until it is killed."""
    torch.set_num_threads(1)

    def hang(build_dir: Path) -> None:
        building.set()
        time.sleep(60)

    load_or_build(noting_builds(stand_in(image_folder), hang), directory)


def kill_a_holder(directory: Path, image_folder: Path) -> None:
    """Leave what a run killed mid-build leaves: its build directory (and the old lock's file)."""
    building = FORK.Event()
    holder = FORK.Process(target=die_holding, args=(directory, image_folder, building))
    holder.start()
    try:
        assert building.wait(20), "the holder never started building"
    finally:
        os.kill(holder.pid, signal.SIGKILL)
        holder.join(10)
    assert list(directory.glob("*.tmp-*")), "a killed holder leaves its build directory"


def race(directory: Path, image_folder: Path) -> list[tuple[int, str, str | None]]:
    """CONTENDERS runs of one key started at once; their (pid, outcome, path)."""
    go, results = FORK.Event(), FORK.Queue()
    runs = [
        FORK.Process(target=contend, args=(directory, image_folder, go, results)) for _ in range(CONTENDERS)
    ]
    for run in runs:
        run.start()
    go.set()
    outcomes = []
    try:
        for _ in runs:
            outcomes.append(results.get(timeout=30))
    except queue.Empty:
        pytest.fail(f"a contender never finished: {outcomes}")
    finally:
        for run in runs:
            run.join(10)
            if run.is_alive():
                run.kill()
    return outcomes


@pytest.mark.slow  # about 2 s: 3 rounds of 3 processes
@pytest.mark.parametrize("after", ["nothing", "a killed holder"])
def test_runs_contending_for_a_cache_build_it_once_and_share_it(
    tmp_path: Path, image_folder: Path, after: str
) -> None:
    """3 runs of one key at once (after a holder was killed mid-build, or not), 3 rounds: one
    builds, the others wait and reuse its cache; nobody's build directory is deleted under it;
    the killed holder's is gone, and nothing but the cache and its lock is left."""
    job = stand_in(image_folder)
    key = job_key(job)
    for round_ in range(ROUNDS):
        directory = tmp_path / f"round{round_}"
        if after == "a killed holder":
            kill_a_holder(directory, image_folder)
        outcomes = race(directory, image_folder)
        kinds = sorted(outcome for _, outcome, _ in outcomes)
        assert kinds == ["built", "reused", "reused"], outcomes
        path = cache_path(directory, key)
        assert {where for _, _, where in outcomes} == {str(path)}
        assert load(path, key, job.splits) is not None
        assert list(directory.glob("*.tmp-*")) == []
        assert sorted(p.name for p in directory.iterdir()) == [path.name, CacheLock(path).path.name]


def hold_until(target: Path, published: Path, waited: Any, held: Any) -> None:
    """Another run: holds `target`'s lock, building, until `waited` is set; then publishes the
    cache (a copy of `published`) and ends."""
    lock = CacheLock(target)
    lock.acquire()
    store.temporary_dir(target).mkdir()
    held.set()
    waited.wait(20)
    shutil.copytree(published, target)
    shutil.rmtree(next(target.parent.glob("*.tmp-*")))
    lock.release()


class Flag(logging.Handler):
    """Sets `event` when a record whose message holds `text` is logged."""

    def __init__(self, text: str, event: Any) -> None:
        super().__init__()
        self.text, self.event = text, event

    def emit(self, record: logging.LogRecord) -> None:
        if self.text in record.getMessage():
            self.event.set()


def test_a_cache_another_live_run_is_writing_is_waited_for_and_reused(
    tmp_path: Path, image_folder: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A run finds the lock held by a live process: it says whom it waits for in one line and
    waits; once that run has published, it reuses the cache without computing anything."""
    built = []
    job = noting_builds(stand_in(image_folder), built.append)
    done, path, _ = load_or_build(stand_in(image_folder), tmp_path / "done")  # what the other run publishes
    target = cache_path(tmp_path / "cache", job_key(job))
    waited, held = FORK.Event(), FORK.Event()
    holder = FORK.Process(target=hold_until, args=(target, path, waited, held))
    flag = Flag("waiting for it, to reuse it", waited)
    logging.getLogger("transferkit").addHandler(flag)
    holder.start()
    try:
        assert held.wait(20)
        with caplog.at_level("INFO", logger="transferkit"):
            sets, again, reused = load_or_build(job, tmp_path / "cache")
    finally:
        logging.getLogger("transferkit").removeHandler(flag)
        holder.join(10)
        if holder.is_alive():
            holder.kill()
    assert reused and again == target and built == []
    (line,) = [r.getMessage() for r in caplog.records if "waiting for it" in r.getMessage()]
    assert f"being written by another run (pid {holder.pid} on " in line and "\n" not in line
    assert torch.equal(sets["train"].features, done["train"].features)


def test_the_lock_is_one_holder_s_at_a_time_and_freed_when_it_dies(tmp_path: Path) -> None:
    """While a process holds the lock nobody else takes it; killed, the kernel frees it at once
    (nothing stale to judge) and the next taker holds it alone."""
    target = tmp_path / "cache" / ("x" * 32)
    held = FORK.Event()
    holder = FORK.Process(target=hold_forever, args=(target, held))
    holder.start()
    try:
        assert held.wait(20)
        assert not CacheLock(target).acquire(blocking=False)
    finally:
        os.kill(holder.pid, signal.SIGKILL)
        holder.join(10)
    mine = CacheLock(target)
    assert mine.acquire(blocking=False)
    assert not CacheLock(target).acquire(blocking=False)
    mine.release()
    assert CacheLock(target).acquire(blocking=False)


def hold_forever(target: Path, held: Any) -> None:
    lock = CacheLock(target)  # referenced until killed: a lock no one refers to is released
    lock.acquire()
    held.set()
    time.sleep(60)


def test_a_filesystem_that_refuses_locks_is_one_the_cache_cannot_be_written_on(
    tmp_path: Path, image_folder: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """ENOLCK (an NFS server without its lock daemon): CacheNotWritten, one line saying why, as
    for a full disk, so features.cache=auto trains uncached."""
    import errno
    import fcntl

    from transferkit.features.cache import CacheNotWritten

    def refuse(fd: Any, operation: int) -> None:
        raise OSError(errno.ENOLCK, os.strerror(errno.ENOLCK))

    monkeypatch.setattr(fcntl, "flock", refuse)
    with pytest.raises(CacheNotWritten, match="No locks available") as error:
        load_or_build(stand_in(image_folder), tmp_path / "cache")
    assert "\n" not in str(error.value)
