"""The leaderboard of a Hydra multirun: every job's overrides, metrics, wall time and run
directory, best first, in `leaderboard.csv` and `leaderboard.md` in the sweep directory.

A Hydra callback. Each job records its own row (`job.json` in its run directory) when it ends,
then rebuilds the board from all rows found, so the board is complete however the sweep ends
(a failed job, Ctrl-C, jobs running in parallel on a cluster) and printed when it finishes.
Jobs ending together rebuild it one at a time (an exclusive lock on `.leaderboard.lock`), so the
last rebuild has every row, and every file is replaced atomically through its own temporary file.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import logging
import math
import statistics
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from filelock import FileLock
from hydra.core.hydra_config import HydraConfig
from hydra.core.utils import JobReturn, JobStatus
from hydra.experimental.callback import Callback
from hydra.types import RunMode
from omegaconf import DictConfig
from rich import get_console
from rich.table import Table

from transferkit.errors import UserError
from transferkit.files import write_atomic
from transferkit.runs.directories import write_json

log = logging.getLogger(__name__)
ROW_FILE = "job.json"
LOCK_FILE = ".leaderboard.lock"


def _direction(metric: str | None, mode: str) -> str:
    """max or min; `auto` minimises losses and errors and maximises the rest."""
    if mode in ("max", "min"):
        return mode
    return "min" if metric and ("loss" in metric or "error" in metric) else "max"


def _error_text(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[-1] if text else ''}".strip()


def job_row(config: DictConfig, job_return: JobReturn, wall_s: float) -> dict[str, Any]:
    """What the board shows for one job, from Hydra's record of it and its results.json."""
    hydra = config.hydra
    run_dir = Path(hydra.runtime.output_dir)
    results_path = run_dir / "results.json"
    results = json.loads(results_path.read_text()) if results_path.is_file() else {}
    failed = job_return.status == JobStatus.FAILED
    metric = config.get("optimized_metric")
    return {
        "job": int(hydra.job.num),
        "overrides": list(hydra.overrides.task),
        "status": "failed" if failed else "ok",
        "metric": metric,
        "value": results.get(metric) if metric else None,
        "metrics": {k: v for k, v in results.items() if isinstance(v, (int, float)) and "/" in k},
        "wall_s": round(float(results.get("wall_s", wall_s)), 2),
        "run_dir": str(run_dir),
        "error": _error_text(job_return._return_value) if failed else "",
    }


def rank(rows: list[dict[str, Any]], direction: str) -> list[dict[str, Any]]:
    """Best first; jobs without a value (failed, or the metric never measured) last, by number."""

    def key(row: dict[str, Any]) -> tuple[int, float, int]:
        value = row["value"]
        if not isinstance(value, (int, float)) or math.isnan(value):
            return (1, 0.0, row["job"])
        return (0, -value if direction == "max" else value, row["job"])

    return sorted(rows, key=key)


FOLD = "data.fold="


def group_folds(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The jobs of one setting swept over `data.fold` as one row: its metrics the folds' mean,
    with their sample standard deviation in `stds`; "ok" only when every fold is. Other jobs stay
    as they are."""
    groups: dict[tuple[str, ...], list[dict[str, Any]]] = {}
    for row in rows:
        if any(o.startswith(FOLD) for o in row["overrides"]):
            groups.setdefault(tuple(o for o in row["overrides"] if not o.startswith(FOLD)), []).append(row)
    grouped = [row for row in rows if not any(o.startswith(FOLD) for o in row["overrides"])]
    for setting, jobs in groups.items():
        jobs = sorted(jobs, key=lambda r: r["job"])
        ok = [r for r in jobs if r["status"] == "ok"]
        names = sorted({k for r in ok for k in r["metrics"]})
        values = {k: [r["metrics"][k] for r in ok if k in r["metrics"]] for k in names}
        folds = ",".join(o.removeprefix(FOLD) for r in jobs for o in r["overrides"] if o.startswith(FOLD))
        metric = jobs[0]["metric"]
        grouped.append(
            {
                "job": jobs[0]["job"],
                "jobs": [r["job"] for r in jobs],
                "overrides": [*setting, f"{FOLD}{folds}"],
                "status": "ok" if len(ok) == len(jobs) else f"{len(ok)}/{len(jobs)} folds ok",
                "metric": metric,
                "value": statistics.fmean(values[metric]) if ok and len(ok) == len(jobs) else None,
                "metrics": {k: statistics.fmean(v) for k, v in values.items()},
                "stds": {k: statistics.stdev(v) if len(v) > 1 else 0.0 for k, v in values.items()},
                "wall_s": sum(r["wall_s"] for r in jobs),
                "run_dir": str(Path(jobs[0]["run_dir"]).parent),
                "error": "; ".join(r["error"] for r in jobs if r["error"]),
            }
        )
    return grouped


def swept(rows: list[dict[str, Any]]) -> list[str]:
    """Each row's overrides that differ between jobs (all of them while there is one job)."""
    if len(rows) < 2:
        return [" ".join(row["overrides"]) for row in rows]
    common = set.intersection(*(set(row["overrides"]) for row in rows))
    return [" ".join(o for o in row["overrides"] if o not in common) for row in rows]


def _columns(rows: list[dict[str, Any]]) -> list[str]:
    metrics = sorted({k for row in rows for k in row["metrics"]})
    return ["rank", "job", "overrides", "status", *metrics, "wall_s", "run_dir", "error"]


def _cells(
    position: int, row: dict[str, Any], overrides: str, columns: list[str], spread: bool = False
) -> dict[str, str]:
    """A row's cells; the folds of one setting show their mean, and with `spread` "mean ± std"
    (the CSV keeps numbers: the standard deviations go in `<metric>_std` columns)."""
    cells = {"rank": str(position), "overrides": overrides}
    cells.update({k: str(row[k]) for k in ("status", "run_dir", "error")})
    cells["job"] = ",".join(map(str, row.get("jobs", [row["job"]])))
    cells["wall_s"] = f"{row['wall_s']:.1f}"
    stds = row.get("stds", {})
    for name, value in row["metrics"].items():
        cells[name] = f"{value:.4f}" + (f" ± {stds[name]:.4f}" if spread and name in stds else "")
        if name in stds and not spread:
            cells[f"{name}_std"] = f"{stds[name]:.4f}"
    return {c: cells.get(c, "") for c in columns}


def write_leaderboard(sweep_dir: Path, rows: list[dict[str, Any]]) -> list[dict[str, str]]:
    """leaderboard.csv and leaderboard.md (the optimized metric first); returns the table."""
    columns = _columns(rows)
    metric = next((r["metric"] for r in rows if r["metric"]), None)
    if metric in columns:  # the optimized metric right after the status
        columns.remove(metric)
        columns.insert(columns.index("status") + 1, metric)
    numbered = list(enumerate(zip(rows, swept(rows), strict=True), 1))
    table = [_cells(i, row, o, columns, spread=True) for i, (row, o) in numbered]
    stds = sorted({f"{k}_std" for row in rows for k in row.get("stds", {})})
    csv_columns = [c for name in columns for c in (name, *([f"{name}_std"] if f"{name}_std" in stds else []))]
    text = io.StringIO()
    writer = csv.DictWriter(text, fieldnames=csv_columns)
    writer.writeheader()
    writer.writerows(_cells(i, row, o, csv_columns) for i, (row, o) in numbered)
    write_atomic(sweep_dir / "leaderboard.csv", text.getvalue())
    jobs = sum(len(row.get("jobs", [row["job"]])) for row in rows)
    lines = [
        f"# Leaderboard: {jobs} jobs, best {metric} first" if metric else f"# Leaderboard: {jobs} jobs",
        "",
        "| " + " | ".join(columns) + " |",
        "|" + "---|" * len(columns),
        *("| " + " | ".join(cell.replace("|", "\\|") for cell in r.values()) + " |" for r in table),
    ]
    write_atomic(sweep_dir / "leaderboard.md", "\n".join(lines) + "\n")
    return table


def read_rows(sweep_dir: Path) -> list[dict[str, Any]]:
    return [json.loads(p.read_text()) for p in sorted(sweep_dir.glob(f"*/{ROW_FILE}"))]


@contextlib.contextmanager
def _board_lock(sweep_dir: Path) -> Iterator[None]:
    """Held while a job scans the rows and writes the board: a job whose row is on disk before
    another's rebuild ends is always scanned by a later rebuild, so no row is lost. The lock is
    the feature cache's kind (`filelock`, flock where the OS has it: across processes and nodes on
    most shared filesystems); where the filesystem refuses locks, the board is rebuilt unlocked
    (a row missed then is back at the next rebuild, and at the sweep's end)."""
    lock = FileLock(sweep_dir / LOCK_FILE, thread_local=False)
    try:
        lock.acquire()
    except OSError as error:  # e.g. ENOLCK: a filesystem without locks
        log.warning("Rebuilding %s/leaderboard.csv unlocked (%s).", sweep_dir, error)
        yield
        return
    try:
        yield
    finally:
        lock.release()


def rebuild(sweep_dir: Path, direction: str) -> list[dict[str, str]]:
    """The board from every row on disk, ranked; the table written, empty when there is no row."""
    if not sweep_dir.is_dir():  # no job got as far as its run directory
        return []
    with _board_lock(sweep_dir):
        rows = group_folds(read_rows(sweep_dir))
        return write_leaderboard(sweep_dir, rank(rows, direction)) if rows else []


def summary(rows: list[dict[str, Any]]) -> str:
    """One line under the board: how many jobs failed, where to see why."""
    failed = sum(row["status"] == "failed" for row in rows)
    if failed:
        return f"{failed} of {len(rows)} jobs failed: see the error column."
    return f"{len(rows)} jobs, none failed."


class Leaderboard(Callback):
    """`mode`: max or min for `optimized_metric`, or auto (min for losses, else max)."""

    def __init__(self, mode: str = "auto") -> None:
        if mode not in ("auto", "max", "min"):
            raise ValueError(f"hydra.callbacks.leaderboard.mode={mode} must be auto, max or min.")
        self.mode = mode
        self._started = time.perf_counter()

    def on_job_start(self, config: DictConfig, **kwargs: Any) -> None:
        self._started = time.perf_counter()

    def on_job_end(self, config: DictConfig, job_return: JobReturn, **kwargs: Any) -> None:
        if config.hydra.mode != RunMode.MULTIRUN:
            return
        row = job_row(config, job_return, time.perf_counter() - self._started)
        write_json(Path(row["run_dir"]) / ROW_FILE, row)  # before the lock: a later rebuild sees it
        rebuild(Path(config.hydra.sweep.dir), _direction(row["metric"], self.mode))
        if row["status"] == "failed":
            error = job_return._return_value
            bug = None if isinstance(error, UserError) else error  # its traceback: how to fix it
            overrides = " ".join(row["overrides"])
            log.error("Job %d (%s) failed: %s", row["job"], overrides, row["error"], exc_info=bug)

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        if not HydraConfig.initialized():  # the sweep dir may interpolate ${hydra:runtime.cwd}
            HydraConfig.instance().set_config(config)
        sweep_dir = Path(config.hydra.sweep.dir)
        metric = config.get("optimized_metric")
        table = rebuild(sweep_dir, _direction(metric, self.mode))
        if not table:
            return
        view = Table(title=f"Leaderboard ({sweep_dir})", title_justify="left")
        # the console gets the essentials; the files have every metric and the run directories
        essentials = ("rank", "job", "overrides", "status", metric, "wall_s", "error")
        shown = [c for c in essentials if c in table[0] and (c != "error" or any(r[c] for r in table))]
        for column in shown:
            view.add_column(column, overflow="fold")
        for cells in table:
            view.add_row(*(cells[c] for c in shown))
        console = get_console()
        console.print(view)
        for line in (summary(read_rows(sweep_dir)), f"Leaderboard: {sweep_dir / 'leaderboard.md'}"):
            console.print(line, soft_wrap=True, markup=False, highlight=False)  # paths whole, to be copied
