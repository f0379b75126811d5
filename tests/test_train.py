"""The train task end to end, in-process and as users run it from the command line."""

from __future__ import annotations

import csv
import json
import re
from pathlib import Path

import pytest
import torch
from conftest import CONF, compose_task, main_exits, make_image_folder, run_cli, tiny_run
from hydra import compose, initialize_config_dir
from hydra.errors import HydraException

from transferkit.errors import ConfigError, DataError, WeightsError
from transferkit.runs.checkpoints import load_model
from transferkit.tasks.train import main, train


def val_acc_per_epoch(metrics_csv: Path) -> list[float]:
    with open(metrics_csv) as f:
        return [float(r["val/acc"]) for r in csv.DictReader(f) if r.get("val/acc")]


@pytest.fixture
def pretrained_overrides(tmp_path: Path) -> list[str]:
    """The shipped Lite0 weights on 64 px pictures: learns in seconds."""
    root = make_image_folder(tmp_path / "data", splits={"train": 12, "val": 6, "test": 6}, size=64)
    return [
        "data=imagefolder",
        f"data.root={root}",
        "data.image_size=64",
        "data.batch_size=8",
        "data.num_workers=0",
        "trainer=cpu",
        "trainer.max_epochs=3",
        "optimizer.lr=0.01",
        "callbacks.rich_progress_bar=null",
    ]


@pytest.mark.slow
def test_train_learns_and_leaves_the_run_directory(
    compose_train, tmp_path: Path, pretrained_overrides
) -> None:
    cfg = compose_train(tmp_path, pretrained_overrides)
    results = train(cfg)
    run = Path(cfg.paths.output_dir)
    written = json.loads((run / "results.json").read_text())
    assert written == results
    assert set(written) >= {
        "val/acc",
        "val/loss",
        "test/acc",
        "best_model_path",
        "class_names",
        "epochs",
        "wall_s",
    }
    assert written["class_names"] == ["circle", "square", "triangle"] and written["epochs"] == 3
    assert written["val/acc"] > 0.6 and written["test/acc"] > 0.6  # chance is 1/3
    assert (run / "checkpoints" / "best.ckpt").is_file() and (run / "checkpoints" / "last.ckpt").is_file()
    assert written["best_model_path"] == str((run / "checkpoints" / "best.ckpt").resolve())
    per_epoch = val_acc_per_epoch(run / "metrics.csv")
    assert len(per_epoch) >= 3
    assert written["val/acc"] == pytest.approx(max(per_epoch[:3]))  # the best checkpoint's numbers
    restored = load_model(run / "checkpoints" / "best.ckpt")
    assert restored.class_names == written["class_names"] and restored.preprocessing.image_size == 64
    assert restored.preprocessing.mean == (0.5, 0.5, 0.5)  # Lite0's own normalisation


@pytest.mark.slow
def test_no_val_folder_splits_train_and_num_classes_follows_the_data(compose_train, tmp_path: Path) -> None:
    root = make_image_folder(
        tmp_path / "d", classes=("a", "b", "c", "d", "e", "f"), splits={"train": 5}, size=32
    )
    cfg = compose_train(
        tmp_path,
        [*tiny_run(root, epochs=1), "data.val_fraction=0.4"],
    )
    results = train(cfg)
    assert "test/acc" not in results and "val/acc_top5" in results
    model = load_model(results["best_model_path"])
    assert model.head[-1].out_features == 6


@pytest.mark.slow
def test_callbacks_none_leaves_lightning_s_defaults(compose_train, tmp_path: Path, tiny_overrides) -> None:
    overrides = [o for o in tiny_overrides if not o.startswith("callbacks.")]
    results = train(compose_train(tmp_path, [*overrides, "callbacks=none", "trainer.max_epochs=1"]))
    assert Path(results["best_model_path"]).name == "epoch=0-step=5.ckpt"  # Lightning's own checkpoint
    assert not (tmp_path / "run" / "checkpoints" / "best.ckpt").exists()

    no_checkpoints = train(
        compose_train(
            tmp_path,
            [*overrides, "callbacks=none", "trainer.max_epochs=1", "trainer.enable_checkpointing=false"],
        )
    )
    assert (
        no_checkpoints["best_model_path"] is None and no_checkpoints["val/loss"] > 0
    )  # the final model measured


@pytest.mark.slow  # about a second or more
def test_task_errors_are_user_errors(compose_train, tmp_path: Path, tiny_overrides) -> None:
    with pytest.raises(DataError, match="does not exist"):
        train(compose_train(tmp_path, [*tiny_overrides, f"data.root={tmp_path}/missing"]))
    with pytest.raises(WeightsError, match="model.weights=null"):
        train(compose_train(tmp_path, [*tiny_overrides, "model.name=resnet18", "model.weights=DEFAULT"]))


@pytest.mark.slow
@pytest.mark.parametrize(
    "overrides, message",
    [
        (["train=false"], "evaluate a checkpoint with python eval.py ckpt_path=PATH"),
        (["ckpt_path=/no/such.ckpt"], "does not exist"),
        (["optimized_metric=test/acc"], "no test/"),
        (["optimizer.lr=-1"], "optimizer.lr=-1 must be positive"),
        (["trainer=gpu"], "trainer"),
        (["data.root=???"], "data.root must be set"),
    ],
)
def test_config_values_that_cannot_work_are_user_errors(
    compose_train, tmp_path: Path, tiny_overrides, overrides: list[str], message: str
) -> None:
    from transferkit.config.build import build

    cfg = compose_train(tmp_path, [*tiny_overrides, *overrides])
    with pytest.raises(ConfigError, match=message):
        if overrides == ["trainer=gpu"]:
            build(cfg.trainer)  # no GPU on the test machine; where one exists this builds
        else:
            train(cfg)


# ---- what users see from the command line --------------------------------------------------
# The README walk-through (tests/test_readme.py) is the real command-line run of every entry
# point; here one bad input goes through a real `python train.py`, and every other error
# through the same `main` in process.


def test_each_run_gets_its_own_default_directory(monkeypatch: pytest.MonkeyPatch) -> None:
    """Two runs started in the same second differ by the process's random run id."""
    from transferkit.runs import directories as run_dirs

    own = run_dirs._RUN_ID  # drawn with secrets.token_hex when the process imported the module
    dirs = []
    for run_id in ("aaaaaa", "bbbbbb"):
        monkeypatch.setattr(run_dirs, "_RUN_ID", run_id)
        with initialize_config_dir(version_base="1.3", config_dir=str(CONF)):
            cfg = compose("train", return_hydra_config=True)
        dirs.append(Path(cfg.hydra.run.dir))
    assert dirs[0].name.endswith("_aaaaaa") and dirs[1].name.endswith("_bbbbbb")
    assert dirs[0].parent == dirs[1].parent and dirs[0].parent.parts[-2:] == ("train", "runs")
    assert re.fullmatch(r"[0-9a-f]{6}", own)


def _bad_image_folder(tmp_path: Path) -> Path:
    root = make_image_folder(tmp_path / "bad", splits={"train": 4, "val": 2}, size=32)
    (root / "train" / "circle" / "corrupt.jpg").write_bytes(b"\xff\xd8 not really a jpeg")
    return root


def _mismatched(tmp_path: Path) -> Path:
    root = make_image_folder(tmp_path / "m", classes=("a", "b"), splits={"train": 2}, size=32)
    return make_image_folder(root, classes=("a", "c"), splits={"val": 1}, size=32)


# One case per kind of failure as users meet it (exit code 2, the message on one line); the other
# data and weights errors are checked at their boundary (test_data, test_backbones, test_reliability).
BAD_INPUTS = {
    "class mismatch": (lambda t: ["data=imagefolder", f"data.root={_mismatched(t)}"], "different classes"),
    "undecodable image": (
        lambda t: [*tiny_run(_bad_image_folder(t), epochs=1), "data.num_workers=1"],
        "corrupt.jpg",
    ),
    "unknown model": (lambda t: ["model.name=resnet19"], "Did you mean: resnet18"),
    "weights offline": (lambda t: ["model=resnet18", "model.weights=DEFAULT"], "model.weights=null"),
    "root unset": (lambda t: ["data=imagefolder"], "data.root must be set"),
}


# In make test-fast: the class mismatch and the undecodable image; the rest take a second or more.
FAST_BAD_INPUTS = ("class mismatch", "undecodable image")


@pytest.mark.parametrize(
    "case", [pytest.param(c, marks=() if c in FAST_BAD_INPUTS else pytest.mark.slow) for c in BAD_INPUTS]
)
def test_bad_input_ends_with_one_clear_line_and_exit_code_2(
    tmp_path: Path, case: str, caplog: pytest.LogCaptureFixture
) -> None:
    make_args, expected = BAD_INPUTS[case]
    cfg = compose_task("train", tmp_path, [*make_args(tmp_path), "trainer=cpu"])
    code, errors = main_exits(main, cfg, caplog)
    assert code == 2
    assert [line for line in errors if expected in line] == errors and len(errors) == 1, errors


@pytest.mark.parametrize(
    "override, expected",
    [("optimizer.lrr=0.1", "Could not override 'optimizer.lrr'"), ("model=resnet9000", "'model/resnet9000'")],
)
def test_unknown_keys_and_options_are_refused_by_name(tmp_path: Path, override: str, expected: str) -> None:
    """Hydra refuses these before the task starts (from the command line: its one-line error, exit 1)."""
    with pytest.raises(HydraException, match=re.escape(expected)):
        compose_task("train", tmp_path, [override])


@pytest.mark.slow
def test_cli_bad_input_ends_with_one_clear_line(tmp_path: Path) -> None:
    """The real `python train.py` of a bad input (with a DataLoader worker): Hydra's logging shows
    the one line, no traceback. Its run directory is named by this process's own random id."""
    from transferkit.runs import directories as run_dirs

    make_args, expected = BAD_INPUTS["undecodable image"]
    proc = run_cli("train.py", *make_args(tmp_path), "trainer=cpu", cwd=tmp_path)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 2, output[-3000:]
    assert "Traceback" not in output
    assert len([line for line in output.splitlines() if expected in line]) == 1, output[-3000:]
    (run_dir,) = (tmp_path / "logs" / "train" / "runs").iterdir()
    assert re.search(r"_[0-9a-f]{6}$", run_dir.name) and not run_dir.name.endswith(run_dirs._RUN_ID)


@pytest.mark.slow
def test_default_experiment_reaches_90_percent_on_the_demo(compose_train, tmp_path: Path) -> None:
    """`python train.py` as shipped (demo data, shipped Lite0 weights), shortened to 3 epochs."""
    results = train(compose_train(tmp_path, ["trainer.max_epochs=3", "callbacks.rich_progress_bar=null"]))
    assert results["val/acc"] >= 0.9 and len(results["class_names"]) == 5
    assert (
        torch.load(results["best_model_path"], weights_only=True)["hyper_parameters"]["weights"] == "shipped"
    )


@pytest.mark.slow
def test_the_finetune_experiment_trains_the_last_two_blocks_on_cached_activations(
    compose_train, tmp_path: Path, tiny_overrides: list[str]
) -> None:
    """experiment=finetune, shrunk to a tiny backbone and 2 epochs: the last two blocks and the
    head train, on the cached activations below them (so not augmented)."""
    cfg = compose_train(tmp_path, ["experiment=finetune", *tiny_overrides, f"features.dir={tmp_path}/cache"])
    results = train(cfg)
    assert results["augment"] is None and results["feature_cache"] and results["epochs"] == 2
    with open(Path(cfg.paths.output_dir) / "metrics.csv") as f:
        groups = {c.removeprefix("lr-AdamW/") for c in next(csv.reader(f)) if c.startswith("lr-")}
    assert groups == {
        "head", "head.no_decay", "backbone.stage4", "backbone.stage4.no_decay", "backbone.stage5",
        "backbone.stage5.no_decay",
    }  # fmt: skip
