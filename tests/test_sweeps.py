"""Multirun leaderboards, Optuna searches and launchers (submitit local; SLURM's config)."""

from __future__ import annotations

import csv
from pathlib import Path

import optuna
import pytest
import yaml
from conftest import TINY_MODEL, run_cli

from transferkit.sweeps import rank, swept, write_leaderboard


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


TINY_RUN = (
    "data=imagefolder", "data.image_size=32", "data.num_workers=0", f"model.name={TINY_MODEL}",
    "model.weights=null", "trainer=cpu", "trainer.max_epochs=1", "callbacks.rich_progress_bar=null",
)  # fmt: skip


def sweep_dir(root: Path) -> Path:
    (found,) = (root / "logs" / "train" / "multiruns").iterdir()
    return found


def read_board(directory: Path) -> list[dict[str, str]]:
    with open(directory / "leaderboard.csv", newline="") as f:
        return list(csv.DictReader(f))


@pytest.mark.slow
def test_a_2x2_multirun_writes_a_leaderboard_of_4_and_a_failed_job_does_not_stop_the_others(
    tmp_path: Path, image_folder: Path
) -> None:
    proc = run_cli(
        "train.py", *TINY_RUN, f"data.root={image_folder}",
        "optimizer.lr=0.01,0.1", "data.batch_size=8,0", cwd=tmp_path, flags=("-m",),
    )  # fmt: skip
    assert proc.returncode != 0  # a job failed: the sweep says so at the end
    directory = sweep_dir(tmp_path)
    board = read_board(directory)
    assert len(board) == 4
    assert [b["status"] for b in board] == ["ok", "ok", "failed", "failed"]
    assert all("data.batch_size=0 must be a positive integer" in b["error"] for b in board[2:])
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


@pytest.mark.slow
def test_an_optuna_study_of_3_trials_reports_the_best_and_resumes_from_its_storage(
    tmp_path: Path, image_folder: Path
) -> None:
    storage = f"sqlite:///{tmp_path / 'study.db'}"
    search = ("hparams_search=optuna", "hydra.sweeper.n_trials=3", f"hydra.sweeper.storage={storage}")
    proc = run_cli("train.py", *TINY_RUN, f"data.root={image_folder}", *search, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    directory = sweep_dir(tmp_path)
    best = yaml.safe_load((directory / "optimization_results.yaml").read_text())
    board = read_board(directory)
    assert len(board) == 3 and "Leaderboard" in proc.stdout
    assert best["best_value"] == pytest.approx(max(float(b["val/acc"]) for b in board), abs=1e-4)
    assert set(best["best_params"]) == {
        "optimizer.lr", "optimizer.weight_decay", "data.batch_size", "finetune", "model.head.dropout",
    }  # fmt: skip
    again = run_cli(
        "train.py", *TINY_RUN, f"data.root={image_folder}", search[0], "hydra.sweeper.n_trials=1", search[2],
        cwd=tmp_path,
    )  # fmt: skip
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    study = optuna.load_study(study_name="transferkit", storage=storage)
    assert len(study.trials) == 4


@pytest.mark.slow
def test_a_failed_optuna_trial_is_recorded_not_fatal(tmp_path: Path, image_folder: Path) -> None:
    proc = run_cli(
        "train.py", *TINY_RUN, f"data.root={image_folder}", "hparams_search=optuna",
        "hydra.sweeper.n_trials=4", "data.batch_size=choice(8,0)", cwd=tmp_path,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    board = read_board(sweep_dir(tmp_path))
    statuses = [b["status"] for b in board]
    assert len(board) == 4 and "failed" in statuses and "ok" in statuses
    assert all("data.batch_size=0" in b["overrides"] for b in board if b["status"] == "failed")


@pytest.mark.slow
def test_submitit_local_runs_2_jobs(tmp_path: Path, image_folder: Path) -> None:
    proc = run_cli(
        "train.py", *TINY_RUN, f"data.root={image_folder}", "hydra/launcher=submitit_local",
        "hydra.launcher.timeout_min=5", "optimizer.lr=0.01,0.1", cwd=tmp_path, flags=("-m",),
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    directory = sweep_dir(tmp_path)
    board = read_board(directory)
    assert sorted(b["overrides"] for b in board) == ["optimizer.lr=0.01", "optimizer.lr=0.1"]
    assert all(b["status"] == "ok" and (Path(b["run_dir"]) / "results.json").is_file() for b in board)
    assert (directory / ".submitit").is_dir()


@pytest.mark.slow
def test_the_slurm_launcher_config_composes(tmp_path: Path) -> None:
    proc = run_cli(
        "train.py", "hydra/launcher=slurm", "hydra.launcher.partition=gpu", "hydra.launcher.gpus_per_node=4",
        cwd=tmp_path, flags=("--cfg", "hydra", "--package", "hydra.launcher"),
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    launcher = yaml.safe_load(proc.stdout)
    assert launcher["_target_"].endswith("SlurmLauncher")
    assert launcher["partition"] == "gpu" and launcher["gpus_per_node"] == 4
    assert launcher["tasks_per_node"] == "${.gpus_per_node}"  # one process per GPU
    assert launcher["timeout_min"] == 240 and launcher["nodes"] == 1 and launcher["mem_gb"] == 64
