"""Reliability: bad images, values that cannot work, a diverging loss, earlier runs, atomic
writes, and runs that are reproducible and resume to the same numbers."""

from __future__ import annotations

import builtins
import csv
import errno
import json
import logging
import os
from pathlib import Path

import numpy as np
import PIL
import pytest
import torch
from conftest import CONF, make_image_folder
from fsspec.implementations.local import LocalFileOpener
from helpers import fit, tiny
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from PIL import Image

from transferkit.data import scan
from transferkit.data.datamodule import ImageFolderDataModule
from transferkit.data.images import load_rgb
from transferkit.errors import ConfigError, DataError, TrainingDiverged
from transferkit.runs.directories import write_json
from transferkit.tasks.train import train
from transferkit.training.finetune import Freeze
from transferkit.training.interrupts import Interrupted


def add_bad_files(folder: Path) -> list[Path]:
    """A truncated JPEG, a zero-byte PNG and a text file named .jpg: the three kinds of bad file."""
    good = folder / "000.png"
    Image.open(good).convert("RGB").save(folder / "whole.jpg", quality=90)
    data = (folder / "whole.jpg").read_bytes()
    (folder / "truncated.jpg").write_bytes(data[: len(data) // 2])
    (folder / "empty.png").write_bytes(b"")
    (folder / "notes.jpg").write_text("this is not a picture")
    return [folder / "truncated.jpg", folder / "empty.png", folder / "notes.jpg"]


def add_awkward_good_files(folder: Path) -> None:
    """Files that look odd but must load: CMYK, 16-bit grey, and junk that is not an image at all."""
    Image.new("CMYK", (40, 40), (0, 255, 255, 0)).save(folder / "cmyk.jpg")
    Image.fromarray((np.arange(1600).reshape(40, 40) * 40).astype(np.uint16)).save(folder / "wide.png")
    (folder / ".DS_Store").write_bytes(b"\0\0\0\1Bud1")
    (folder / "Thumbs.db").write_bytes(b"\0")
    (folder / "__MACOSX").mkdir()
    (folder / "__MACOSX" / "._000.png").write_bytes(b"\0\5\26\7")


def test_cmyk_and_16_bit_images_load_as_rgb(tmp_path: Path) -> None:
    add_awkward_good_files(tmp_path)
    assert load_rgb(tmp_path / "cmyk.jpg").getpixel((5, 5)) == (255, 0, 0)  # cyan 0, magenta+yellow full
    wide = load_rgb(tmp_path / "wide.png")
    assert wide.mode == "RGB" and wide.getpixel((0, 0)) == (0, 0, 0) and wide.getpixel((39, 39))[0] > 200


def test_bad_images_stop_the_run_with_their_names_and_junk_is_not_counted(image_folder: Path) -> None:
    bad = add_bad_files(image_folder / "train" / "circle")
    add_awkward_good_files(image_folder / "train" / "square")
    dm = ImageFolderDataModule(image_folder, num_workers=2)
    assert dm.class_names == ["circle", "square", "triangle"]  # listing opens no image
    with pytest.raises(DataError) as raised:
        _ = dm.splits
    message = str(raised.value)
    assert message.startswith("3 file(s) cannot be read as images") and "data.on_bad_image=skip" in message
    for path in bad:
        assert str(path) in message
    assert "image file is truncated" in message and "empty file (0 bytes)" in message
    assert "cmyk" not in message and "DS_Store" not in message and "MACOSX" not in message


def test_the_error_lists_the_first_20_and_counts_the_rest(image_folder: Path) -> None:
    for i in range(25):
        (image_folder / "train" / "circle" / f"bad{i:02d}.png").write_bytes(b"")
    with pytest.raises(DataError, match=r"^25 file\(s\) cannot be read .* and 5 more\."):
        _ = ImageFolderDataModule(image_folder).splits


@pytest.mark.slow
def test_skip_leaves_bad_files_out_names_them_and_writes_bad_images_txt(
    compose_train,
    tmp_path: Path,
    tiny_overrides: list[str],
    image_folder: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    bad = add_bad_files(image_folder / "train" / "circle")
    add_awkward_good_files(image_folder / "train" / "square")
    with caplog.at_level(logging.WARNING, logger="transferkit"):
        results = train(
            compose_train(tmp_path, [*tiny_overrides, "data.on_bad_image=skip", "trainer.max_epochs=1"])
        )
    assert results["epochs"] == 1
    assert "Skipping 3 file(s)" in caplog.text and all(str(p) in caplog.text for p in bad)
    lines = (tmp_path / "run" / "bad_images.txt").read_text().splitlines()
    assert sorted(line.split("\t")[0] for line in lines) == sorted(map(str, bad))
    dm = ImageFolderDataModule(image_folder, on_bad_image="skip")
    trained_on = {path.name for path, _ in dm.splits.train}
    assert {"cmyk.jpg", "wide.png", "whole.jpg"} <= trained_on and not trained_on & {p.name for p in bad}


def test_a_second_scan_decodes_only_changed_files(
    image_folder: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[Path] = []
    real = scan.check_image
    monkeypatch.setattr(scan, "check_image", lambda path: calls.append(path) or real(path))
    cache = tmp_path / "scans"
    _ = ImageFolderDataModule(image_folder, scan_cache_dir=cache).splits
    assert len(calls) == 48  # 12 train + 4 val images for 3 classes
    calls.clear()
    _ = ImageFolderDataModule(image_folder, scan_cache_dir=cache).splits
    assert calls == []
    changed = image_folder / "val" / "square" / "001.png"
    os.utime(changed, (1e9, 1e9))
    (image_folder / "train" / "circle" / "new.png").write_bytes(b"")
    with pytest.raises(DataError, match="new.png"):
        _ = ImageFolderDataModule(image_folder, scan_cache_dir=cache).splits
    assert sorted(p.name for p in calls) == ["001.png", "new.png"]


def fail_reads(monkeypatch: pytest.MonkeyPatch, path: Path, error: OSError) -> None:
    """Reading `path` fails with `error`: a real chmod 000 where that blocks reads, else (as root,
    whom chmod does not stop) every open() of that one file raises, as the operating system would."""
    if isinstance(error, PermissionError):
        os.chmod(path, 0)
        try:
            path.read_bytes()
        except PermissionError:
            return
    real_open = builtins.open

    def failing_open(file, *args, **kwargs):
        if isinstance(file, str | os.PathLike) and Path(file) == path:
            raise error
        return real_open(file, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", failing_open)


@pytest.mark.parametrize(
    "error",
    [PermissionError(errno.EACCES, "Permission denied"), OSError(errno.EIO, "Input/output error")],
    ids=["permission", "eio"],
)
def test_a_read_error_skips_the_file_this_run_only(
    image_folder: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, error: OSError
) -> None:
    """A permission fixed with chmod (which leaves size and mtime alone) or a network drive that
    hiccuped: the file is bad for that run, and used again by the next one."""
    cache = tmp_path / "scans"
    path = image_folder / "train" / "circle" / "003.png"
    stat = os.stat(path)
    with monkeypatch.context() as patched:
        fail_reads(patched, path, error)
        dm = ImageFolderDataModule(image_folder, on_bad_image="skip", scan_cache_dir=cache)
        assert path not in {p for p, _ in dm.splits.train + dm.splits.val}
        assert list(dm.bad_images) == [path] and error.strerror in dm.bad_images[path]
    os.chmod(path, stat.st_mode)
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    now = os.stat(path)
    assert (now.st_size, now.st_mtime_ns) == (stat.st_size, stat.st_mtime_ns)  # only a cache could differ
    dm = ImageFolderDataModule(image_folder, on_bad_image="skip", scan_cache_dir=cache)
    assert path in {p for p, _ in dm.splits.train + dm.splits.val} and dm.bad_images == {}


def test_a_file_that_vanished_since_the_listing_is_bad_for_this_run(tmp_path: Path) -> None:
    gone = tmp_path / "gone.png"
    bad = scan.scan_images([gone], tmp_path / "scan.json")
    assert list(bad) == [gone] and "No such file or directory" in bad[gone]


def test_a_corrupt_file_stays_cached_as_bad(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    bad = add_bad_files(
        make_image_folder(tmp_path / "data", classes=("a",), splits={"train": 1}) / "train" / "a"
    )
    cache = tmp_path / "scan.json"
    first = scan.scan_images(sorted(bad), cache)
    assert sorted(first) == sorted(bad)
    calls: list[Path] = []
    real = scan.check_image
    monkeypatch.setattr(scan, "check_image", lambda path: calls.append(path) or real(path))
    assert scan.scan_images(sorted(bad), cache) == first and calls == []


def test_a_new_pillow_rescans(image_folder: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A newer Pillow may decode what an older one could not: verdicts are the decoder's too."""
    paths = sorted(image_folder.rglob("*.png"))
    cache = tmp_path / "scan.json"
    scan.scan_images(paths, cache)
    calls: list[Path] = []
    real = scan.check_image
    monkeypatch.setattr(scan, "check_image", lambda path: calls.append(path) or real(path))
    scan.scan_images(paths, cache)
    assert calls == []
    monkeypatch.setattr(PIL, "__version__", "99.0.0")
    scan.scan_images(paths, cache)
    assert sorted(calls) == paths


def test_a_class_left_empty_by_skipping_is_an_error(image_folder: Path) -> None:
    for path in (image_folder / "train" / "circle").iterdir():
        path.write_bytes(b"")
    with pytest.raises(DataError, match="class\\(es\\) circle have no training image"):
        _ = ImageFolderDataModule(image_folder, on_bad_image="skip").splits


def test_an_empty_class_folder_is_refused(image_folder: Path) -> None:
    (image_folder / "train" / "star").mkdir()
    (image_folder / "train" / "star" / ".DS_Store").write_bytes(b"\0")
    with pytest.raises(DataError, match="Class folder\\(s\\) with no images in .*train: star"):
        _ = ImageFolderDataModule(image_folder).class_names


REFUSED = {
    "batch size": (["data.batch_size=0"], "data.batch_size=0 must be a positive integer"),
    "lr zero": (["optimizer.lr=0"], "optimizer.lr=0 must be positive"),
    "lr negative": (["optimizer.lr=-0.1"], "optimizer.lr=-0.1 must be positive"),
    "momentum": (["optimizer.momentum=-1"], "Bad optimizer or scheduler setting: Invalid momentum value"),
    "val fraction": (["data.val_fraction=1.5"], r"data.val_fraction=1.5 must lie in \(0, 1\)"),
    "image size": (
        ["model.name=vit_b_16", "data.image_size=64"],
        "data.image_size=64 does not fit model.name=vit_b_16 .*Wrong image height",
    ),
    "late unfreeze": (
        ["finetune=gradual", "finetune.unfreeze_at_epoch=5", "trainer.max_epochs=2"],
        "unfreezes at epoch 5, but this run stops after trainer.max_epochs=2",
    ),
    "cpu devices": (["trainer.devices=512"], "trainer.devices=512 CPU processes, but this machine has"),
    "gpu on cpu": (["trainer=gpu"], r"\(check trainer.\*\)"),
    "bad image policy": (["data.on_bad_image=maybe"], "data.on_bad_image=maybe must be error or skip"),
}


@pytest.mark.slow
@pytest.mark.parametrize("case", list(REFUSED), ids=list(REFUSED))
def test_values_that_cannot_work_are_refused_before_any_work(
    compose_train, tmp_path: Path, tiny_overrides: list[str], monkeypatch: pytest.MonkeyPatch, case: str
) -> None:
    if case == "gpu on cpu" and torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    overrides, message = REFUSED[case]

    def no_scan(*args, **kwargs):
        raise AssertionError("images were read before the config was checked")

    monkeypatch.setattr(scan, "scan_images", no_scan)
    with pytest.raises(ConfigError, match=message):
        train(compose_train(tmp_path, [*tiny_overrides, *overrides]))
    assert not (tmp_path / "run" / "checkpoints").exists()


@pytest.mark.slow
def test_a_diverging_loss_stops_with_the_epoch_step_and_advice(
    compose_train, tmp_path: Path, tiny_overrides: list[str]
) -> None:
    cfg = compose_train(tmp_path, [*tiny_overrides, "optimizer.lr=1e38", "trainer.max_epochs=20"])
    with pytest.raises(
        TrainingDiverged, match=r"became (nan|inf|-inf) at epoch \d+, step \d+: .*optimizer.lr=1e\+?38"
    ):
        train(cfg)
    last = tmp_path / "run" / "checkpoints" / "last.ckpt"
    if last.exists():  # from an epoch before the fault: every weight finite
        state = torch.load(last, weights_only=True)["state_dict"]
        assert all(torch.isfinite(t).all() for t in state.values() if t.is_floating_point())


def test_results_json_is_replaced_whole_or_not_at_all(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "results.json"
    write_json(path, {"val/acc": 0.5})

    def crash(src, dst):
        raise OSError("killed")

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(OSError):
        write_json(path, {"val/acc": 0.9})
    assert json.loads(path.read_text()) == {"val/acc": 0.5}


def test_a_checkpoint_write_that_dies_leaves_the_previous_checkpoint(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Lightning writes a checkpoint to a temporary file and moves it into place at the end."""
    trainer = fit(tiny(), tmp_path, callbacks=(Freeze(),), epochs=1)
    path = tmp_path / "last.ckpt"
    trainer.save_checkpoint(path)
    before = path.read_bytes()

    def die(self) -> None:
        raise OSError("killed mid-write")

    monkeypatch.setattr(LocalFileOpener, "commit", die)
    with pytest.raises(OSError, match="killed mid-write"):
        trainer.save_checkpoint(path)
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir() if p.suffix == ".ckpt"] == ["last.ckpt"]


@pytest.mark.slow
def test_same_seed_same_numbers_and_an_interrupted_run_resumes_to_them(
    compose_train, tmp_path: Path, tiny_overrides: list[str]
) -> None:
    """On a CPU with a fixed seed: two runs agree exactly, and a run interrupted mid-epoch and
    resumed (augmentation, dropout and shuffling included) ends with the same metrics and weights."""
    common = [
        *tiny_overrides, "data.batch_size=4", "trainer.max_epochs=3", "features.cache=false",
        "finetune=partial", "model.head.dropout=0.3", "test=false",
    ]  # fmt: skip
    first = train(compose_train(tmp_path / "a", common))
    second = train(compose_train(tmp_path / "b", common))
    numbers = ("val/acc", "val/loss", "val/f1")
    assert [first[k] for k in numbers] == [second[k] for k in numbers]

    interrupted = compose_train(
        tmp_path / "c",
        [*common, "+callbacks.signal._target_=helpers.SendSignal", "+callbacks.signal.at_step=13"],
    )
    with pytest.raises(Interrupted):
        train(interrupted)
    checkpoint = torch.load(tmp_path / "c" / "run" / "checkpoints" / "last.ckpt", weights_only=True)
    assert checkpoint["global_step"] == 14 and checkpoint["epoch"] == 1  # signalled at 13: stops before 14
    resumed = train(compose_train(tmp_path / "c", [*common, "ckpt_path=last"]))
    assert resumed["epochs"] == 3
    assert [resumed[k] for k in numbers] == [first[k] for k in numbers]
    weights = [
        torch.load(d / "run" / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]
        for d in (tmp_path / "a", tmp_path / "c")
    ]
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])
    assert epoch_metrics(tmp_path / "c" / "run") == epoch_metrics(tmp_path / "a" / "run")  # train/* too


def epoch_metrics(run: Path) -> dict[tuple[str, str], str]:
    """(epoch, metric) -> value of every per-epoch train/ and val/ number in metrics.csv."""
    with open(run / "metrics.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    return {
        (row["epoch"], key): value
        for row in rows
        for key, value in row.items()
        if value and key.startswith(("train/", "val/"))
    }


@pytest.mark.slow  # about a second or more
def test_an_earlier_run_directory_is_never_written_into(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """`hydra.run.dir=<an earlier run>` stops before Hydra writes anything (the check is a Hydra
    callback on run start, composed from conf/ as the command line composes it); resuming that
    run with ckpt_path is allowed."""
    run_dir = tmp_path / "run"
    (run_dir / ".hydra").mkdir(parents=True)  # what Hydra leaves in every run directory
    (run_dir / "results.json").write_text("{}")

    def on_run_start(directory: Path, *overrides: str) -> None:
        with initialize_config_dir(version_base="1.3", config_dir=str(CONF)):
            cfg = compose("train", [f"hydra.run.dir={directory}", *overrides], return_hydra_config=True)
        (callback,) = [c for c in cfg.hydra.callbacks.values() if c._target_.endswith("KeepExistingRuns")]
        instantiate(callback).on_run_start(cfg)

    with caplog.at_level(logging.ERROR), pytest.raises(SystemExit) as exited:
        on_run_start(run_dir, "optimizer.lr=0.5")
    assert exited.value.code == 2 and "already holds a run" in caplog.text
    on_run_start(run_dir, f"ckpt_path={run_dir}/checkpoints/last.ckpt")  # resuming it: no exit
    on_run_start(tmp_path / "new")  # a new directory: no exit
