"""Every option of every config group composes; the objects configs build are the right ones."""

from __future__ import annotations

import inspect
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
from conftest import CONF
from hydra import compose, initialize_config_dir
from hydra.errors import ConfigCompositionException
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

import transferkit.runs.directories  # noqa: F401 - registers the config's resolvers, as every task does
from transferkit.config.build import instantiate_group
from transferkit.config.types import check_types
from transferkit.errors import ConfigError
from transferkit.tasks.settings import SETTINGS, passed_on

GROUPS = sorted(p.name for p in CONF.iterdir() if p.is_dir() and p.name != "hydra")
OPTIONS = [(g, p.stem) for g in GROUPS for p in sorted((CONF / g).glob("*.yaml"))]
TRAINER_ARGUMENTS = set(inspect.signature(L.Trainer.__init__).parameters) - {"self"}
# Importing MLflow takes seconds; a Trainer or a large model takes about one.
SLOW_TO_BUILD = {
    ("logger", "many"),
    ("logger", "mlflow"),
    ("trainer", "default"),
    ("model", "mobilenet_v3_large"),
}


def test_design_groups_and_options_exist() -> None:
    options = {g: {o for gg, o in OPTIONS if gg == g} for g in GROUPS}
    assert {"demo", "imagefolder", "dogs_cats", "hymenoptera"} <= options["data"]
    assert {"default", "cpu", "gpu", "ddp", "ddp_sim", "mps"} <= options["trainer"]
    assert {"default", "none"} <= options["callbacks"]
    assert {"csv", "tensorboard"} <= options["logger"]
    assert {"fdr", "limit", "overfit", "profiler"} <= options["debug"]
    assert {"sgd", "adamw"} <= options["optimizer"] and {"steplr", "cosine", "none"} <= options["scheduler"]
    assert "vgg16_dogs_cats" in options["experiment"] and "freeze" in options["finetune"]


@pytest.mark.parametrize(
    "group, option",
    [
        pytest.param(g, o, id=f"{g}={o}", marks=[pytest.mark.slow] if (g, o) in SLOW_TO_BUILD else [])
        for g, o in OPTIONS
    ],
)
def test_every_option_composes(group: str, option: str, compose_train, tmp_path: Path) -> None:
    """Every option composes, and its values are of the types what they build takes; what it sets
    under trainer reaches Lightning's Trainer by name (true on any Lightning release that keeps
    these arguments, however many a release adds)."""
    cfg = compose_train(tmp_path, [f"{group}={option}"])
    check_types(cfg, SETTINGS["train"], passed_on=passed_on(cfg))
    assert cfg.model.name and cfg.trainer._target_ == "lightning.pytorch.Trainer"
    assert set(cfg.trainer) - {"_target_"} <= TRAINER_ARGUMENTS, set(cfg.trainer) - TRAINER_ARGUMENTS
    if group in ("callbacks", "logger"):
        objects = instantiate_group(cfg[group])
        assert all(isinstance(o, (L.Callback, L.pytorch.loggers.Logger)) for o in objects)
    if group in ("optimizer", "scheduler") and cfg[group] is not None:
        assert callable(instantiate(cfg[group]))
    if group == "model":
        assert_model_option_is_the_base_with_its_own_backbone_and_weights(option, cfg)


def assert_model_option_is_the_base_with_its_own_backbone_and_weights(option: str, cfg: DictConfig) -> None:
    """A model option says only what differs (name, weights); the rest comes from
    model/base/transfer_module.yaml, with the values every option had before it existed."""
    own = OmegaConf.load(CONF / "model" / f"{option}.yaml")
    assert set(own) == {"defaults", "name", "weights"}
    model = OmegaConf.to_container(cfg.model)
    assert model == {
        "_target_": "transferkit.model.module.TransferModule",
        "name": own.name,
        "weights": own.weights,
        "head": {"hidden_dim": None, "dropout": 0.0},
        "label_smoothing": 0.0,
        "compile": False,
    }
    assert list(model)[:3] == ["_target_", "name", "weights"]  # .hydra/config.yaml reads as before


def test_defaults_are_the_documented_ones(compose_train, tmp_path: Path) -> None:
    cfg = compose_train(tmp_path)
    assert cfg.data._target_.endswith("DemoDataModule")
    assert (cfg.model.name, cfg.model.weights) == ("timm:tf_efficientnet_lite0", "shipped")
    assert (cfg.optimizer.lr, cfg.optimizer.momentum) == (1e-3, 0.9)
    assert (cfg.scheduler.step_size, cfg.scheduler.gamma) == (7, 0.1)
    assert cfg.finetune._target_.endswith("Freeze")
    assert cfg.optimized_metric == "val/acc"
    callbacks = {type(c).__name__ for c in instantiate_group(cfg.callbacks)}
    assert callbacks == {
        "ModelCheckpoint", "CheckpointOnInterrupt", "LearningRateMonitor", "RichProgressBar",
        "RichModelSummary",
    }  # fmt: skip


def test_seed_experiment_holds_the_recipe(compose_train, tmp_path: Path) -> None:
    cfg = compose_train(tmp_path, ["experiment=vgg16_dogs_cats"])
    assert cfg.model.name == "vgg16" and cfg.model.weights == "DEFAULT"
    assert cfg.data.root == f"{tmp_path}/data/dogs_vs_cats" and cfg.data.augment == "basic"
    assert cfg.optimizer._target_ == "torch.optim.SGD" and (cfg.optimizer.lr, cfg.optimizer.momentum) == (
        1e-3,
        0.9,
    )
    assert cfg.scheduler._target_.endswith("StepLR") and (cfg.scheduler.step_size, cfg.scheduler.gamma) == (
        7,
        0.1,
    )
    assert cfg.trainer.max_epochs == 10 and cfg.finetune._target_.endswith("Freeze")


def test_finetune_experiment_holds_the_recipe(compose_train, tmp_path: Path) -> None:
    """experiment=finetune: the recipe docs/finetuning.md measures, on the user's folder."""
    cfg = compose_train(tmp_path, ["experiment=finetune", "data=imagefolder", "data.root=somewhere"])
    assert (cfg.model.name, cfg.model.weights) == ("timm:tf_efficientnet_lite0", "shipped")
    assert cfg.finetune._target_.endswith("Partial") and cfg.finetune.unfreeze_last == 2
    assert cfg.finetune.backbone_lr_ratio == 0.3 and cfg.data.root == "somewhere"
    optimizer = (cfg.optimizer._target_, cfg.optimizer.lr, cfg.optimizer.weight_decay)
    assert optimizer == ("torch.optim.AdamW", 1e-3, 0.05)
    assert cfg.scheduler._target_.endswith("WarmupCosineLR") and cfg.scheduler.warmup_epochs == 1
    assert cfg.features.cache == "auto" and cfg.features.views == 1 and cfg.trainer.max_epochs == 8


@pytest.mark.slow  # about a second or more
def test_trainer_keys_and_plus_keys_reach_the_trainer(compose_train, tmp_path: Path) -> None:
    """trainer.<arg>= for the arguments trainer/default.yaml lists, +trainer.<arg>= for any other."""
    cfg = compose_train(tmp_path, ["trainer.gradient_clip_val=0.5", "trainer.accumulate_grad_batches=2"])
    trainer = instantiate(cfg.trainer)
    assert (trainer.gradient_clip_val, trainer.accumulate_grad_batches) == (0.5, 2)
    assert "max_steps" not in cfg.trainer  # not listed: Lightning's default, reachable with a `+`
    cfg = compose_train(tmp_path, ["+trainer.max_steps=7", "+trainer.val_check_interval=0.5"])
    trainer = instantiate(cfg.trainer)
    assert (trainer.max_steps, trainer.val_check_interval) == (7, 0.5)
    with (
        initialize_config_dir(version_base="1.3", config_dir=str(CONF)),
        pytest.raises(ConfigCompositionException, match="max_steps"),
    ):
        compose("train", overrides=["trainer.max_steps=7"])  # Hydra asks for the `+`


def test_cpu_trainer_builds(compose_train, tmp_path: Path) -> None:
    trainer = instantiate(compose_train(tmp_path, ["trainer=cpu"]).trainer)
    assert trainer.max_epochs == 10 and trainer.accelerator.__class__.__name__ == "CPUAccelerator"


@pytest.mark.parametrize("override", ["model=resnet9000", "no_such_key=1", "data.no_such_key=1"])
def test_unknown_options_and_keys_are_refused(override: str) -> None:
    with (
        initialize_config_dir(version_base="1.3", config_dir=str(CONF)),
        pytest.raises(ConfigCompositionException),
    ):
        compose("train", overrides=[override])


@pytest.mark.parametrize("logger, package", [("mlflow", "mlflow"), ("wandb", "wandb")])
def test_a_logger_whose_package_is_missing_names_its_extra(
    logger: str, package: str, compose_train, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cfg = compose_train(tmp_path, [f"logger={logger}"])
    monkeypatch.setitem(sys.modules, package, None)  # what `import mlflow` meets when it is not installed
    with pytest.raises(
        ConfigError,
        match=rf'logger={logger}.* needs the {package} package: pip install "transferkit\[{logger}\]"',
    ):
        instantiate_group(cfg.logger)


@pytest.mark.slow
def test_the_package_imports_without_its_extras() -> None:
    """A plain `pip install transferkit` (no extras): every module imports; the extras' packages
    are imported only by the features that use them."""
    extras = [
        "mlflow",
        "wandb",
        "onnx",
        "onnxscript",
        "onnxruntime",
        "optuna",
        "submitit",
        "sqlalchemy",
        "alembic",
    ]
    code = f"""
import importlib, pkgutil, sys
for name in {extras!r}:
    sys.modules[name] = None
import transferkit
for module in pkgutil.walk_packages(transferkit.__path__, "transferkit."):
    importlib.import_module(module.name)
print("imported", transferkit.__version__)
"""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and "imported" in proc.stdout, proc.stderr[-3000:]


def test_a_group_node_without_a_target_is_refused_by_name() -> None:
    """A run config saved before `features:` became a group has no _target_ there."""
    from transferkit.config.build import build

    with pytest.raises(ConfigError, match=r"features: this config builds nothing .* features=default"):
        build(OmegaConf.create({"features": {"cache": "auto"}}).features)
