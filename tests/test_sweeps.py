"""Multirun leaderboards, Optuna searches and launchers (submitit local; SLURM's config)."""

from __future__ import annotations

import csv
import errno
import json
import multiprocessing
import os
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml
from conftest import CONF, run_cli, tiny_run
from hydra import compose, initialize_config_dir
from hydra.core.utils import JobReturn, JobStatus
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from transferkit.errors import ConfigError
from transferkit.runs import sweeps
from transferkit.runs.directories import write_json
from transferkit.runs.sweeps import Leaderboard, rank, swept, write_leaderboard


def row(job: int, value: float | None, status: str = "ok", **metrics: float) -> dict:
    return {
        "job": job,
        "overrides": ["data.root=/d", f"optimizer.lr={job}"],
        "status": status,
        "metric": "val/acc",
        "value": value,
        "metrics": {"val/acc": value, **metrics} if value is not None else {},
        "wall_s": 1.5,
        "run_dir": f"/sweep/{job}",
        "error": "" if status == "ok" else "ConfigError: data.batch_size=0 must be a positive integer.",
    }


def test_the_board_ranks_best_first_and_failures_last(tmp_path: Path) -> None:
    rows = [row(0, 0.5), row(1, None, "failed"), row(2, 0.9), row(3, 0.7)]
    assert [r["job"] for r in rank(rows, "max")] == [2, 3, 0, 1]
    assert [r["job"] for r in rank(rows, "min")] == [0, 3, 2, 1]
    assert swept(rows[:2]) == ["optimizer.lr=0", "optimizer.lr=1"]  # what is common is not repeated
    assert swept(rows[:1]) == ["data.root=/d optimizer.lr=0"]
    write_leaderboard(tmp_path, rank(rows, "max"))
    with open(tmp_path / "leaderboard.csv", newline="") as f:
        table = list(csv.DictReader(f))
    assert [t["job"] for t in table] == ["2", "3", "0", "1"] and [t["rank"] for t in table] == [
        "1",
        "2",
        "3",
        "4",
    ]
    assert list(table[0])[:5] == ["rank", "job", "overrides", "status", "val/acc"]
    assert table[0]["val/acc"] == "0.9000" and table[3]["status"] == "failed"
    assert "batch_size=0" in table[3]["error"] and table[3]["val/acc"] == ""
    markdown = (tmp_path / "leaderboard.md").read_text()
    assert markdown.startswith("# Leaderboard: 4 jobs, best val/acc first") and markdown.count("\n| ") == 5


# Parallel launchers (joblib, submitit, SLURM) finish jobs together: forked workers start at once.
FORK = multiprocessing.get_context("fork")


def _worker(target: Callable[..., None], args: tuple[Any, ...], barrier: Any, errors: Any) -> None:
    barrier.wait()
    try:
        target(*args, errors)
    except Exception as error:  # noqa: BLE001 - reported to the test, which says what failed
        errors.put(f"{type(error).__name__}: {error}")


def _run_together(target: Callable[..., None], args: list[tuple[Any, ...]]) -> list[str]:
    """Each `target(*a, errors)` in its own process, released together; the errors they raised."""
    barrier, errors = FORK.Barrier(len(args)), FORK.Queue()
    procs = [FORK.Process(target=_worker, args=(target, a, barrier, errors)) for a in args]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
    assert all(p.exitcode == 0 for p in procs), [p.exitcode for p in procs]
    found = []
    while not errors.empty():
        found.append(errors.get())
    return found


def _write_many(path: Path, worker: int, times: int, errors: Any) -> None:
    for i in range(times):
        try:
            write_json(path, {"worker": worker, "i": i, "pad": "x" * 2000})
        except Exception as error:  # noqa: BLE001 - every failure is counted, not just the first
            errors.put(f"{type(error).__name__}: {error}")


def test_concurrent_atomic_writes_to_one_path_never_fail(tmp_path: Path) -> None:
    path = tmp_path / "results.json"
    failures = _run_together(_write_many, [(path, w, 75) for w in range(4)])
    assert failures == [], f"{len(failures)} of 300 writes failed, e.g. {failures[0]}"
    assert json.loads(path.read_text())["i"] == 74  # whole: the last write of some worker
    assert [p.name for p in tmp_path.iterdir()] == ["results.json"]  # no temporary file left
    umask = os.umask(0)
    os.umask(umask)
    assert path.stat().st_mode & 0o777 == 0o666 & ~umask  # as readable as a plain write


def _job_config(sweep: Path, job: int) -> DictConfig:
    """What Hydra gives the callback for one job of a multirun, its results.json written."""
    (sweep / str(job)).mkdir()
    (sweep / str(job) / "results.json").write_text(json.dumps({"val/acc": job / 100}))
    return OmegaConf.create(
        {
            "optimized_metric": "val/acc",
            "hydra": {
                "mode": RunMode.MULTIRUN,
                "sweep": {"dir": str(sweep)},
                "runtime": {"output_dir": str(sweep / str(job))},
                "job": {"num": job},
                "overrides": {"task": [f"optimizer.lr={job}"]},
            },
        }
    )


def _finish_job(config: DictConfig, errors: Any) -> None:
    Leaderboard().on_job_end(config, JobReturn(status=JobStatus.COMPLETED))


@pytest.mark.parametrize("error", [ConfigError("data.batch_size=0 must be positive."), KeyError("x")])
def test_a_failed_job_is_logged_in_one_line_unless_it_is_a_bug(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, error: Exception
) -> None:
    """A user error's line is all a user needs; a crash keeps its traceback, to be fixed."""
    failed = JobReturn(status=JobStatus.FAILED)
    failed.return_value = error
    Leaderboard().on_job_end(_job_config(tmp_path, 3), failed)
    (record,) = [r for r in caplog.records if r.levelname == "ERROR"]
    assert record.getMessage().startswith(f"Job 3 (optimizer.lr=3) failed: {type(error).__name__}: ")
    assert (record.exc_info is not None) == (not isinstance(error, ConfigError))
    assert sweeps.summary(sweeps.read_rows(tmp_path)) == "1 of 1 jobs failed: see the error column."


@pytest.mark.slow
@pytest.mark.parametrize(
    "scan_s", [0, 0, 0, 0.05], ids=["together-1", "together-2", "together-3", "slow-scan"]
)
def test_jobs_finishing_together_leave_a_board_with_every_row(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, scan_s: float
) -> None:
    """`slow-scan`: a job that saw fewer rows takes longer to write, so it would finish last."""
    jobs = 8
    read_rows = sweeps.read_rows

    def slow_read_rows(sweep_dir: Path) -> list[dict[str, Any]]:
        rows = read_rows(sweep_dir)
        time.sleep(scan_s * (jobs - len(rows)))
        return rows

    monkeypatch.setattr(sweeps, "read_rows", slow_read_rows)  # the forked jobs inherit it
    failures = _run_together(_finish_job, [(_job_config(tmp_path, j),) for j in range(jobs)])
    board = read_board(tmp_path)
    assert sorted(int(b["job"]) for b in board) == list(range(jobs)), failures
    assert failures == []
    assert [b["job"] for b in board] == [str(j) for j in reversed(range(jobs))]  # best first
    assert (tmp_path / "leaderboard.md").read_text().startswith(f"# Leaderboard: {jobs} jobs")


def test_the_board_is_still_rebuilt_where_the_filesystem_refuses_locks(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Some shared filesystems refuse locks (ENOLCK): the board is rebuilt unlocked, with a line."""

    def refuse(self: Any, *args: Any, **kwargs: Any) -> None:
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(sweeps.FileLock, "acquire", refuse)
    for job in range(2):
        (tmp_path / str(job)).mkdir()
        write_json(tmp_path / str(job) / "job.json", row(job, job / 10))
    assert [t["job"] for t in sweeps.rebuild(tmp_path, "max")] == ["1", "0"]
    assert [b["job"] for b in read_board(tmp_path)] == ["1", "0"]
    assert "unlocked (" in caplog.text and "No locks available" in caplog.text
    assert sweeps.rebuild(tmp_path / "absent", "max") == []


TINY_RUN = (  # the sweeps set the learning rate and batch size themselves
    *(o for o in tiny_run(None, epochs=1) if not o.startswith(("optimizer.lr=", "data.batch_size="))),
    "logger=csv",
)


def run_sweep(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, *args: str, flags: tuple[str, ...] = ()
) -> subprocess.CompletedProcess:
    """`python train.py` from `tmp_path`, each process on one thread: the model is tiny, and
    jobs that run side by side (submitit's) would otherwise spin 2 threads each on 2 cores."""
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # run_cli's environment is a copy of this one
    return run_cli("train.py", *TINY_RUN, *args, cwd=tmp_path, flags=flags)


def sweep_dirs(root: Path) -> set[Path]:
    return set((root / "logs" / "train" / "multiruns").iterdir())


def sweep_dir(root: Path) -> Path:
    (found,) = sweep_dirs(root)
    return found


def read_board(directory: Path) -> list[dict[str, str]]:
    with open(directory / "leaderboard.csv", newline="") as f:
        return list(csv.DictReader(f))


def read_yaml(path: Path) -> dict[str, Any]:
    return yaml.safe_load(path.read_text())


@pytest.mark.slow
def test_a_2x2_multirun_writes_a_leaderboard_of_4_and_a_failed_job_does_not_stop_the_others(
    tmp_path: Path, image_folder: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The basic launcher's one command-line run: jobs 1 and 3 fail, jobs 2 and 4 still train, in
    batches of 2 (Hydra's own sweeper stops after the batch with a failure). The sweep ends with
    the board, how many failed and where the board is, then exits 1, without a traceback."""
    proc = run_sweep(
        tmp_path, monkeypatch, f"data.root={image_folder}", "optimizer.lr=0.01,0.1", "data.batch_size=8,0",
        "hydra.sweeper.max_batch_size=2", flags=("-m",),
    )  # fmt: skip
    directory = sweep_dir(tmp_path)
    assert proc.returncode == 1, proc.stderr[-3000:]
    end = proc.stdout[proc.stdout.index("Leaderboard (") :]
    assert end.count("ConfigError") == 2 and "val/acc" in end  # the board, its failures with their errors
    assert end.rstrip().splitlines()[-2:] == [
        "2 of 4 jobs failed: see the error column.",
        f"Leaderboard: {directory / 'leaderboard.md'}",
    ]
    assert "Traceback" not in proc.stdout + proc.stderr and "Error executing job" not in proc.stderr
    board = read_board(directory)
    assert len(board) == 4
    assert [b["status"] for b in board] == ["ok", "ok", "failed", "failed"]
    assert all("data.batch_size=0 must be a positive integer" in b["error"] for b in board[2:])
    assert sorted(b["job"] for b in board[2:]) == ["1", "3"]  # job 1 failed; jobs 2 and 3 still ran
    ok = board[:2]
    assert float(ok[0]["val/acc"]) >= float(ok[1]["val/acc"])
    assert {b["overrides"] for b in ok} == {
        "optimizer.lr=0.01 data.batch_size=8",
        "optimizer.lr=0.1 data.batch_size=8",
    }
    for b in ok:
        assert (Path(b["run_dir"]) / "results.json").is_file() and Path(b["run_dir"]).parent == directory
        assert float(b["wall_s"]) > 0
    assert (directory / "leaderboard.md").is_file()


OPTUNA_PARAMS = {
    "optimizer.lr", "optimizer.weight_decay", "data.batch_size", "finetune", "model.head.dropout",
}  # fmt: skip


@pytest.mark.slow
@pytest.mark.launchers
def test_an_optuna_study_records_a_failed_trial_reports_the_best_and_resumes_from_its_storage(
    tmp_path: Path, image_folder: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The optuna sweeper's command-line runs: a study of 3 trials whose 2nd fails (and the 3rd
    still runs), then 1 more trial in the same study, from its storage, in a second process."""
    storage = f"sqlite:///{tmp_path / 'study.db'}"
    # The sampler is seeded by ${seed}: seed=7 draws data.batch_size 8, 0, 8 (0 fails: not a batch size).
    study = (
        f"data.root={image_folder}", "hparams_search=optuna", "seed=7", f"hydra.sweeper.storage={storage}",
    )  # fmt: skip
    proc = run_sweep(tmp_path, monkeypatch, *study, "hydra.sweeper.n_trials=3", "data.batch_size=choice(8,0)")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]  # a failed trial is not fatal
    directory = sweep_dir(tmp_path)
    best = read_yaml(directory / "optimization_results.yaml")
    board = read_board(directory)
    assert len(board) == 3 and "Leaderboard" in proc.stdout
    assert "1 of 3 jobs failed: see the error column." in proc.stdout  # Optuna goes on: exit 0
    assert [b["status"] for b in board] == ["ok", "ok", "failed"]
    assert board[2]["job"] == "1" and "data.batch_size=0" in board[2]["overrides"]  # recorded, then job 2 ran
    assert "data.batch_size=0 must be a positive integer" in board[2]["error"]
    assert all("data.batch_size=8" in b["overrides"] for b in board[:2])
    assert best["best_value"] == pytest.approx(max(float(b["val/acc"]) for b in board[:2]), abs=1e-4)
    assert set(best["best_params"]) == OPTUNA_PARAMS and best["best_params"]["data.batch_size"] == 8

    # The added trial fails (data.batch_size fixed at 0): the run still exits 0, and the best it
    # reports is the stored study's, which it could only know by loading the earlier trials.
    again = run_sweep(tmp_path, monkeypatch, *study, "hydra.sweeper.n_trials=1", "data.batch_size=0")
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    (resumed,) = sweep_dirs(tmp_path) - {directory}
    assert [(b["job"], b["status"]) for b in read_board(resumed)] == [("0", "failed")]
    assert "data.batch_size=0" in read_board(resumed)[0]["overrides"]
    assert read_yaml(resumed / "optimization_results.yaml") == best
    import optuna  # here: importing it costs every pytest worker a second at collection

    trials = optuna.load_study(study_name="transferkit", storage=storage).trials
    assert [t.state.name for t in trials] == ["COMPLETE", "FAIL", "COMPLETE", "FAIL"]


@pytest.mark.slow
@pytest.mark.launchers
def test_submitit_local_runs_2_jobs(
    tmp_path: Path, image_folder: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The submitit launcher's one command-line run: each job in its own process."""
    proc = run_sweep(
        tmp_path, monkeypatch, f"data.root={image_folder}", "hydra/launcher=submitit_local",
        "hydra.launcher.timeout_min=5", "optimizer.lr=0.01,0.1", flags=("-m",),
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    directory = sweep_dir(tmp_path)
    board = read_board(directory)
    assert sorted(b["overrides"] for b in board) == ["optimizer.lr=0.01", "optimizer.lr=0.1"]
    assert all(b["status"] == "ok" and (Path(b["run_dir"]) / "results.json").is_file() for b in board)
    assert (directory / ".submitit").is_dir()


def test_the_slurm_launcher_config_composes() -> None:
    """What `python train.py -m hydra/launcher=slurm ...` launches with, composed in process."""
    overrides = ["hydra/launcher=slurm", "hydra.launcher.partition=gpu", "hydra.launcher.gpus_per_node=4"]
    with initialize_config_dir(version_base="1.3", config_dir=str(CONF)):
        cfg = compose("train", overrides=overrides, return_hydra_config=True)
    launcher = OmegaConf.to_container(cfg.hydra.launcher, resolve=False)
    assert launcher["_target_"].endswith("SlurmLauncher")
    assert launcher["partition"] == "gpu" and launcher["gpus_per_node"] == 4
    assert launcher["tasks_per_node"] == "${.gpus_per_node}"  # one process per GPU
    assert cfg.hydra.launcher.tasks_per_node == 4
    assert launcher["timeout_min"] == 240 and launcher["nodes"] == 1 and launcher["mem_gb"] == 64
