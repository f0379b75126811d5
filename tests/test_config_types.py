"""A value of the wrong type is refused before any work, in one line naming the key, the value and
the type expected; what the shipped configs hold is never refused."""

from __future__ import annotations

import copy
import functools
import importlib
from collections.abc import Callable
from pathlib import Path
from typing import Literal

import pytest
from conftest import CONF, compose_task, main_exits
from omegaconf import DictConfig, OmegaConf

from transferkit.config.types import accepts, check_types, describe
from transferkit.errors import ConfigError
from transferkit.tasks.settings import SETTINGS, passed_on

CHECKPOINT_TASKS = {"eval", "predict", "export", "serve"}


@pytest.fixture(scope="module")
def composed(tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], DictConfig]:
    """A task's config, composed once per test worker (a composition takes half a second), with
    a checkpoint that is not there: any work the task began would fail otherwise."""
    root = tmp_path_factory.mktemp("composed")

    @functools.cache
    def compose(task: str) -> DictConfig:
        given = [f"ckpt_path={root / 'missing.ckpt'}"] if task in CHECKPOINT_TASKS else []
        return compose_task(task, root, [*given, f"input={root}"] if task == "predict" else given)

    return compose


@pytest.mark.parametrize(
    "task, key, value, expected",
    [
        ("train", "trainer.max_epochs", "abc", "an integer or null (lightning.pytorch.Trainer's max_epochs)"),
        ("train", "optimizer.lr", "abc", "a number (torch.optim.SGD's lr)"),
        ("train", "data.batch_size", "abc", "an integer (transferkit.data.DemoDataModule's batch_size)"),
        ("train", "data.image_size", "abc", "an integer or null"),
        (
            "train",
            "model.weights",
            3,
            "a string, true or false or null (transferkit.model.module.TransferModule's",
        ),
        ("train", "scheduler.step_size", 1.5, "an integer (torch.optim.lr_scheduler.StepLR's step_size)"),
        ("train", "finetune.backbone_lr_ratio", "fast", "a number (transferkit.training.finetune.Freeze's"),
        ("train", "features.views", "many", "an integer (transferkit.features.FrozenFeatures's views)"),
        (
            "train",
            "callbacks.model_checkpoint.save_top_k",
            "all",
            "an integer (transferkit.training.callbacks.",
        ),
        ("train", "model.head.dropout", "none", "a number (transferkit.model.heads.build_head's dropout)"),
        (
            "train",
            "lr_finder.num_training",
            "many",
            "an integer (lightning.pytorch.tuner.tuning.Tuner.lr_find's",
        ),
        ("train", "seed", "abc", "an integer or null (train.py's seed)"),
        ("train", "tune_lr", "maybe", "true or false (train.py's tune_lr)"),
        ("eval", "batch_size", "big", "an integer (eval.py's batch_size)"),
        ("predict", "tta", 3, "true or false (predict.py's tta)"),
        ("export", "parity.atol", "tiny", "a number (export.py's parity.atol)"),
        ("serve", "port", "http", "an integer (serve.py's port)"),
        ("audit", "audit.folds", "five", "an integer (audit.py's audit.folds)"),
    ],
)
def test_a_value_of_the_wrong_type_is_refused_before_any_work(
    task: str, key: str, value: object, expected: str, composed, tmp_path: Path, monkeypatch, caplog
) -> None:
    tasks = importlib.import_module(f"transferkit.tasks.{task}")
    if task == "train":  # nothing of the run is set up: no data generated or loaded, nothing built
        monkeypatch.setattr(tasks, "set_up", lambda *a: pytest.fail("the run was set up"))
    cfg = copy.deepcopy(composed(task))
    OmegaConf.update(cfg, key, value)
    cfg.paths.output_dir = str(tmp_path)
    code, lines = main_exits(tasks.main, cfg, caplog)
    assert code == 2 and len(lines) == 1, lines
    assert lines[0].startswith(f"{key}={value}: expected {expected}"), lines[0]
    assert not (tmp_path / "results.json").exists()


@pytest.mark.parametrize("task", sorted(SETTINGS))
def test_each_task_s_own_keys_have_a_type_and_its_defaults_are_accepted(task: str, composed) -> None:
    """conf/<task>.yaml and the task's settings stay in step: every plain key has its type."""
    own = OmegaConf.to_container(OmegaConf.load(CONF / f"{task}.yaml"))
    plain = {k for k, v in own.items() if k != "defaults" and not isinstance(v, dict)}
    assert plain <= set(SETTINGS[task].__dataclass_fields__), plain - set(SETTINGS[task].__dataclass_fields__)
    check_types(composed(task), SETTINGS[task], passed_on=passed_on(composed(task)))


def test_hints_as_constructors_write_them() -> None:
    assert accepts(int | None, None) and not accepts(int, True) and accepts(float, 3)
    assert accepts(Literal["onnx", "torchscript"], "onnx") and not accepts(Literal[16, 32], "16")
    assert accepts(list[float], OmegaConf.create([1, 2.5])) and not accepts(
        list[float], OmegaConf.create([1, "x"])
    )
    assert accepts(
        float, OmegaConf.create({"_target_": "builds.Anything"})
    )  # what it builds is not known here
    assert describe(Literal["a", "b"] | int | None) == "one of a, b, an integer or null"


def test_a_value_resolved_later_is_left_to_what_takes_it() -> None:
    cfg = OmegaConf.create(
        {"trainer": {"_target_": "lightning.pytorch.Trainer", "max_epochs": "${oc.env:NO_SUCH_VAR}"}}
    )
    check_types(cfg)
    cfg.trainer.max_epochs = "${epochs}"
    with pytest.raises(ConfigError, match=r"trainer.max_epochs=x: expected an integer or null"):
        check_types(OmegaConf.merge(cfg, {"epochs": "x"}))
