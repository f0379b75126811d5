"""Start-up: predict.py and serve.py on a checkpoint or its model.onnx import neither Lightning nor
torchmetrics, and a checkpoint whose export is cached is applied without building the PyTorch
model (no timm). Read from `python -X importtime`, which names every module a process imports."""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from conftest import ROOT, compose_task, make_image_folder, offline_env
from test_inference_runtime import tiny_checkpoint

pytestmark = pytest.mark.slow
LIGHTNING = {"lightning", "pytorch_lightning", "torchmetrics"}


def imported(stderr: str) -> set[str]:
    """The top-level packages of every module `-X importtime` reported."""
    return {
        line.rsplit("|", 1)[1].strip().split(".")[0]
        for line in stderr.splitlines()
        if line.startswith("import time:")
        and "|" in line
        and not line.rstrip().endswith("| imported package")
    }


def command(script: str, model: Path, root: Path, *overrides: str) -> list[str]:
    """`python -X importtime <script>` on `model`, its run and exports under `root`."""
    settings = [f"ckpt_path={model}", f"paths.root_dir={root}", f"runtime_dir={root / 'exports'}"]
    return [sys.executable, "-X", "importtime", str(ROOT / script), *settings, *overrides]


def predict_modules(model: Path, image: Path, root: Path) -> set[str]:
    proc = subprocess.run(
        command("predict.py", model, root, f"input={image}", "num_workers=0"),
        cwd=root,
        env=offline_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return imported(proc.stderr)


@pytest.fixture
def model(tmp_path: Path) -> tuple[Path, Path, Path]:
    """A tiny checkpoint, its export.py model.onnx and an image to classify."""
    from transferkit.tasks.export import export

    ckpt = tiny_checkpoint(tmp_path / "tiny.ckpt")
    onnx = export(compose_task("export", tmp_path / "export", [f"ckpt_path={ckpt}", "format=onnx"]))["model"]
    image = next(make_image_folder(tmp_path / "data", splits={"val": 1}).rglob("*.png"))
    return ckpt, Path(onnx), image


def test_predict_imports_no_lightning_and_a_cached_export_no_timm(model: tuple, tmp_path: Path) -> None:
    ckpt, onnx, image = model
    first = predict_modules(ckpt, image, tmp_path)  # exports the checkpoint: builds it (timm)
    assert not first & LIGHTNING, first & LIGHTNING
    again = predict_modules(ckpt, image, tmp_path)
    assert not again & (LIGHTNING | {"timm"}), again & (LIGHTNING | {"timm"})
    exported = predict_modules(onnx, image, tmp_path)
    assert not exported & (LIGHTNING | {"timm"}), exported & (LIGHTNING | {"timm"})


def test_serve_answers_without_lightning(model: tuple, tmp_path: Path) -> None:
    ckpt, _, image = model
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    log = tmp_path / "importtime.txt"  # a file: a pipe would fill and stall the server
    with log.open("w") as stderr:
        process = subprocess.Popen(
            command("serve.py", ckpt, tmp_path, f"port={port}"),
            cwd=tmp_path,
            env=offline_env(),
            stdout=subprocess.DEVNULL,
            stderr=stderr,
        )
    direct = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    request = urllib.request.Request(
        f"http://127.0.0.1:{port}/predict", data=image.read_bytes(), headers={"Content-Type": "image/png"}
    )
    try:
        deadline = time.monotonic() + 120
        while True:
            assert process.poll() is None and time.monotonic() < deadline, "serve.py did not start"
            try:
                with direct.open(request, timeout=30) as response:
                    assert json.loads(response.read())["label"] in ("circle", "square", "triangle")
                    break
            except OSError:
                time.sleep(0.2)
    finally:
        process.send_signal(signal.SIGTERM)
        process.wait(60)
    modules = imported(log.read_text())
    assert not modules & LIGHTNING, modules & LIGHTNING
