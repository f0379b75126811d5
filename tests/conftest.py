"""Shared fixtures: generated image folders, configs composed from the real conf/, and a
network that is never reachable (so no test can download). Kept free of torch and Lightning
imports, which every pytest-xdist controller would pay for; the helpers that need them are in
helpers.py."""

from __future__ import annotations

import functools
import logging
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig, open_dict

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "conf"
TINY_MODEL = "timm:test_efficientnet"  # 0.1 M parameters, with BatchNorm
DEAD_PROXY = "http://127.0.0.1:9"  # the discard port: every download fails at once
# The frozen backbones' onnxruntime exports, shared by the session's runs as by a user's: an
# export is named by its weights, code and input shape, so a run finds only its own (the tiny
# backbone exports in seconds, which each of ~100 runs would pay again under its own root).
EXPORTS = Path(tempfile.mkdtemp(prefix="transferkit-test-exports-"))


def pytest_configure(config: pytest.Config) -> None:
    """Under pytest-xdist (`make test` runs one worker per core), each worker gets its share of
    the cores: torch's default of one thread per core in every worker would oversubscribe them."""
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    if workers > 1:
        import torch

        torch.set_num_threads(max(1, len(os.sched_getaffinity(0)) // workers))


def pytest_unconfigure(config: pytest.Config) -> None:
    shutil.rmtree(EXPORTS, ignore_errors=True)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """A test that needs the shared trained run is slow: the run alone takes seconds per worker."""
    for item in items:
        if "trained_run" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.slow)


@pytest.fixture(autouse=True)
def cpu_kind(monkeypatch: pytest.MonkeyPatch) -> None:
    """No test reads the host's CPU kind (CI gets AVX2-only and native-bf16 CPUs alike): it is
    fixed here as one without native bf16, and a test about the other kind patches it so."""
    from transferkit.features import precision

    monkeypatch.setattr(precision, "cpu_has_native_bf16", lambda: False)


@pytest.fixture(autouse=True)
def no_network(monkeypatch: pytest.MonkeyPatch, tmp_path_factory: pytest.TempPathFactory) -> None:
    for var in ("HTTP_PROXY", "HTTPS_PROXY", "http_proxy", "https_proxy"):
        monkeypatch.setenv(var, DEAD_PROXY)
    for var in ("NO_PROXY", "no_proxy"):  # nothing may bypass the dead proxy
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    for var in ("PL_GLOBAL_SEED", "PL_SEED_WORKERS"):  # Lightning's seed_everything leaves them set
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path_factory.getbasetemp() / "torch_home"))
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)


def offline_env() -> dict[str, str]:
    """The environment for subprocesses: the same dead network."""
    env = dict(os.environ)
    env.update({v: DEAD_PROXY for v in ("HTTP_PROXY", "HTTPS_PROXY", "http_proxy", "https_proxy")})
    env["HF_HUB_OFFLINE"] = "1"
    env.pop("NO_PROXY", None)
    env.pop("no_proxy", None)
    if "PYTEST_XDIST_WORKER" in env:  # the worker's share of the cores, as in process
        import torch

        env.setdefault("OMP_NUM_THREADS", str(torch.get_num_threads()))
    return env


def run_cli(
    script: str, *args: str, cwd: Path, flags: tuple[str, ...] = (), timeout: int = 600
) -> subprocess.CompletedProcess:
    """`python <script> [flags] args...` as a user runs it, from `cwd`, offline."""
    return subprocess.run(
        [sys.executable, str(ROOT / script), *flags, f"paths.root_dir={cwd}", *args],
        cwd=cwd,
        env=offline_env(),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def main_exits(
    main: Callable[[DictConfig], Any], cfg: DictConfig, caplog: pytest.LogCaptureFixture
) -> tuple[int, list[str]]:
    """Run a task's `main` (the entry point behind `python <task>.py`) in process on a config that
    must fail: its exit code and the lines of every error it logged, which the command line shows
    (a record logged with a traceback adds a "Traceback" line)."""
    caplog.clear()
    with caplog.at_level(logging.ERROR), pytest.raises(SystemExit) as exited:
        main(cfg)
    lines = []
    for record in caplog.records:
        if record.levelno >= logging.ERROR:
            lines += record.getMessage().splitlines()
            lines += ["Traceback (logged with exc_info)"] if record.exc_info else []
    return exited.value.code, lines


def make_image_folder(
    root: Path,
    classes: tuple[str, ...] = ("circle", "square", "triangle"),
    splits: dict[str, int] | None = None,
    size: int = 40,
) -> Path:
    """root/<split>/<class>/<n>.png with learnable pictures (a shape per class)."""
    from transferkit.data.demo import SHAPES, draw_shape

    splits = splits or {"train": 12, "val": 4}
    for s, (split, n) in enumerate(splits.items()):
        for c, name in enumerate(classes):
            folder = root / split / name
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                shape = SHAPES[c % len(SHAPES)]
                draw_shape(shape, seed=10_000 * s + 100 * c + i, size=size).save(folder / f"{i:03d}.png")
    return root


def make_label_file(
    root: Path,
    classes: tuple[str, ...] = ("circle", "square", "triangle"),
    splits: dict[str, int] | None = None,
    multilabel: bool = False,
    split_column: bool = True,
    size: int = 40,
) -> Path:
    """root/images/<split>_<n>.png and root/labels.csv (path,label[,split]); returns the CSV.

    Single-label: one shape per picture, `splits[s]` per class. Multi-label: `splits[s]` pictures
    per class that hold it among others; pictures hold one to three shapes (labels joined by ';'),
    and every seventh holds none (an empty cell)."""
    import csv
    import random

    from transferkit.data.demo import draw_shape, draw_shapes

    splits = splits or {"train": 12, "val": 4}
    (root / "images").mkdir(parents=True, exist_ok=True)
    rows = []
    for s, (split, n) in enumerate(splits.items()):
        rng = random.Random(s)
        count = n * len(classes) if not multilabel else round(n * len(classes) / 2)
        for i in range(count):
            seed = 10_000 * s + i
            name = f"images/{split}_{i:03d}.png"
            if multilabel:
                shown = [] if i % 7 == 6 else rng.sample(classes, rng.randint(1, min(3, len(classes))))
                shown = sorted(shown, key=classes.index)
                draw_shapes(shown, seed, size).save(root / name)
                label = ";".join(shown)
            else:
                label = classes[i % len(classes)]
                draw_shape(label, seed, size).save(root / name)
            rows.append([name, label] + ([split] if split_column else []))
    labels = root / "labels.csv"
    with labels.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["path", "label"] + (["split"] if split_column else []))
        writer.writerows(rows)
    return labels


@pytest.fixture
def image_folder(tmp_path: Path) -> Path:
    return make_image_folder(tmp_path / "data")


def compose_task(task: str, root: Path, overrides: list[str] = ()) -> DictConfig:
    """Compose conf/<task>.yaml as the command line would, with paths and the run dir under `root`."""
    with initialize_config_dir(version_base="1.3", config_dir=str(CONF)):
        cfg = compose(task, overrides=[f"paths.root_dir={root}", *overrides])
    with open_dict(cfg):
        cfg.paths.output_dir = str(root / "run")
    Path(cfg.paths.output_dir).mkdir(parents=True, exist_ok=True)
    return cfg


@pytest.fixture(scope="session")
def compose_train() -> Callable[..., DictConfig]:
    """Compose conf/train.yaml as the command line would, with paths under `root`."""
    return functools.partial(compose_task, "train")


def tiny_run(data_root: Path | None, epochs: int = 2, trainer: str = "cpu") -> list[str]:
    """Overrides for a train run that takes seconds: tiny backbone, small images, no workers, no
    rich output (the one list every in-process and command-line run starts from)."""
    return [
        "data=imagefolder",
        *([f"data.root={data_root}"] if data_root is not None else []),
        "data.image_size=32",
        "data.batch_size=8",
        "data.num_workers=0",
        f"model.name={TINY_MODEL}",
        "model.weights=null",
        f"trainer={trainer}",
        f"trainer.max_epochs={epochs}",
        "callbacks.rich_progress_bar=null",
        "callbacks.rich_model_summary=null",
        "optimizer.lr=0.05",
        f"features.exports_dir={EXPORTS}",
    ]


@pytest.fixture
def tiny_overrides(image_folder: Path) -> list[str]:
    return tiny_run(image_folder)


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """One tiny training run (train/val/test, cached features) shared by the eval, predict and
    export tests: its results.json, plus `data_root`."""
    from transferkit.tasks.train import train

    root = tmp_path_factory.mktemp("trained")
    data = make_image_folder(root / "data", splits={"train": 12, "val": 4, "test": 4})
    overrides = tiny_run(data, epochs=3)
    results = train(compose_task("train", root, overrides))
    for var in ("PL_GLOBAL_SEED", "PL_SEED_WORKERS"):  # not left to the test that asked for the run
        os.environ.pop(var, None)
    return {**results, "data_root": str(data)}
