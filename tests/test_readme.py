"""The README's cookbook, run as written: every ```bash tested block, in order, on generated
photos. Runs of train.py get a tiny backbone and one epoch unless the command sets them."""

from __future__ import annotations

import csv
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import ROOT, make_image_folder, offline_env

FAST = {  # added to a train.py command that does not set the key itself
    "model.name": "timm:test_efficientnet",
    "model.weights": "null",
    "data.image_size": "32",
    "data.num_workers": "0",
    "trainer.max_epochs": "1",
    "callbacks.rich_progress_bar": "null",
}
SHIM = """#!/usr/bin/env bash
# python, but train.py runs get the test's fast settings for keys they do not set
args=("$@"); extra=()
if [[ "${1:-}" == *train.py || "${2:-}" == *train.py ]]; then
  for kv in %s; do
    key=${kv%%%%=*}
    printf '%%s\\n' "${args[@]}" | grep -q "^${key}=" || extra+=("$kv")
  done
fi
exec %s "${args[@]}" "${extra[@]}"
"""


def readme_blocks(readme: str) -> list[str]:
    return re.findall(r"^```bash tested\n(.*?)^```", readme, flags=re.S | re.M)


def test_the_readme_has_tested_blocks_for_the_walkthrough() -> None:
    blocks = "\n".join(readme_blocks((ROOT / "README.md").read_text()))
    for command in (
        "split_folder.py",
        "train.py",
        "eval.py",
        "predict.py",
        "export.py",
        "ckpt_path=last",
        "-m",
    ):
        assert command in blocks


@pytest.mark.slow
def test_the_cookbook_runs_as_written(tmp_path: Path) -> None:
    project = tmp_path / "project"
    project.mkdir()
    for name in ("train.py", "eval.py", "predict.py", "export.py", "conf", "scripts"):
        (project / name).symlink_to(ROOT / name)
    photos = make_image_folder(project / "data" / "raw", splits={"all": 8}, size=40) / "all"
    photos.rename(project / "data" / "photos")
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    shim = bin_dir / "python"
    shim.write_text(SHIM % (" ".join(f"{k}={v}" for k, v in FAST.items()), sys.executable))
    shim.chmod(0o755)
    script = "set -euo pipefail\n" + "\n".join(readme_blocks((ROOT / "README.md").read_text()))
    env = {**offline_env(), "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}", "WANDB_SILENT": "true"}
    proc = subprocess.run(
        ["bash", "-c", script], cwd=project, env=env, capture_output=True, text=True, timeout=900
    )
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]

    split = project / "data" / "photos_split"
    assert {p.name for p in split.iterdir()} == {"train", "val", "test"}
    runs = sorted((project / "logs" / "train" / "runs").iterdir())
    assert len(runs) == 3  # default recipe, gradual, and the resumed run (continued in place)
    assert all((run / "results.json").is_file() for run in runs)
    with open(project / "preds.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 24 and all(r["label"] in ("circle", "square", "triangle") for r in rows)
    with open(project / "preds_onnx.csv", newline="") as f:
        assert [r["label"] for r in csv.DictReader(f)] == [r["label"] for r in rows]
    assert (project / "exported" / "model.onnx").is_file()
    assert "# Leaderboard: 2 jobs" in proc.stdout
    assert "Per-class report" in proc.stdout and "Exported (onnx, parity checked)" in proc.stdout
    assert "PassManager" not in proc.stdout + proc.stderr  # the ONNX exporter's chatter is kept quiet
    assert (project / "logs" / "mlflow" / "mlflow.db").is_file()
    eval_runs = list((project / "logs" / "eval" / "runs").iterdir())
    assert len(eval_runs) == 1 and (eval_runs[0] / "confusion_matrix.png").is_file()
