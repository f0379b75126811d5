"""What a run prints says only what matters: a default run piped to a file is short, whole, plain,
free of library noise, and ends with its results and where they went."""

from __future__ import annotations

import logging
import os
from logging.handlers import BufferingHandler
from pathlib import Path

import pytest
from conftest import run_cli

from transferkit.console import PIPED_WIDTH, set_up_console
from transferkit.training.model_summary import RichModelSummary

NOISE = (
    "exists and is not empty",  # Lightning's CSV logger, on a brand-new run directory
    "litlogger",  # an advert
    "already configured with model summary",
    "FLOPs",  # "Total FLOPs: 0": not counted, not zero
    "LeafSpec",  # torch's deprecation of an isinstance check in Lightning's _pytree
    "log_every_n_steps",  # metrics are logged per epoch
    "Warning",
)


@pytest.mark.slow
def test_a_default_run_piped_to_a_file_says_only_what_matters(tmp_path: Path) -> None:
    """`python train.py` (the demo, generated on first use; fewer images and epochs) | cat."""
    small = ["+data.train_per_class=6", "+data.val_per_class=3", "trainer.max_epochs=2"]
    proc = run_cli("train.py", *small, cwd=tmp_path)
    output = proc.stdout + proc.stderr
    lines = output.splitlines()
    assert proc.returncode == 0, output[-3000:]
    assert len(lines) <= 60, output
    assert "\x1b[" not in output
    assert not [line for line in lines if any(noise in line for noise in NOISE)], output
    assert len([line for line in lines if "Generating the demo data" in line]) == 1
    (run_dir,) = (tmp_path / "logs" / "train" / "runs").iterdir()
    assert "_target_" not in output and "_target_" in (run_dir / ".hydra" / "config.yaml").read_text()
    end = proc.stdout.rstrip().splitlines()
    title = next(i for i, line in enumerate(end) if line.startswith("Results ("))
    assert end[title].rstrip() == f"Results ({run_dir})"  # the run directory, whole
    assert all(line[0] in "┌│└" for line in end[title + 1 :]), end[title:]  # the table ends the output
    assert any(str(run_dir / "checkpoints" / "best.ckpt") in line for line in end[title:])


def test_off_a_terminal_lines_are_whole_and_lightning_s_noise_is_dropped(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("COLUMNS", "80")
    set_up_console()  # pytest captures the output: not a terminal
    assert os.environ["COLUMNS"] == str(PIPED_WIDTH)
    lightning, shown = logging.getLogger("lightning.pytorch.utilities.rank_zero"), BufferingHandler(10)
    lightning.addHandler(shown)
    monkeypatch.setattr(lightning, "level", logging.INFO)
    try:
        lightning.info("Trainer already configured with model summary callbacks: [...]")
        lightning.info("GPU available: False, used: False")
    finally:
        lightning.removeHandler(shown)
    assert [r.getMessage() for r in shown.buffer] == ["GPU available: False, used: False"]


def test_the_model_summary_shows_the_modules_with_parameters(capsys: pytest.CaptureFixture) -> None:
    data = [
        (" ", ["0", "1", "2"]),
        ("Name", ["backbone", "head", "criterion"]),
        ("Type", ["EfficientNet", "Sequential", "CrossEntropyLoss"]),
        ("Params", ["3.4 M", "6.4 K", "0"]),
        ("Mode", ["eval", "train", "train"]),
        ("FLOPs", ["0", "0", "0"]),
    ]
    RichModelSummary.summarize(data, 3_400_000, 6_400, 13.5, {"train": 2, "eval": 1}, total_flops=0)
    shown = capsys.readouterr().out
    assert "backbone" in shown and "head" in shown and "eval" in shown
    assert "criterion" not in shown and "FLOPs" not in shown
