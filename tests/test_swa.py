"""StochasticWeightAveraging by config is refused, before any work, in one line saying why
(transferkit/training/swa.py: Lightning's callback breaks a frozen backbone's BatchNorm statistics)."""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import compose_task, main_exits, tiny_run

from transferkit.tasks.train import main

SWA = "lightning.pytorch.callbacks.StochasticWeightAveraging"


def test_stochastic_weight_averaging_is_refused_before_the_data_is_read(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    missing = tmp_path / "no-such-data"  # read first, its own error would show instead
    swa = [f"+callbacks.swa._target_={SWA}", "+callbacks.swa.swa_lrs=1e-3"]
    cfg = compose_task("train", tmp_path, [*tiny_run(missing), *swa])
    code, lines = main_exits(main, cfg, caplog)
    assert code == 2 and len(lines) == 1
    assert lines[0].startswith("callbacks.swa: StochasticWeightAveraging is not supported: ")
    assert "frozen backbone" in lines[0] and lines[0].endswith("remove callbacks.swa.")
    assert not (tmp_path / "run" / "checkpoints").exists()
