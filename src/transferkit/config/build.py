"""Objects from config: `instantiate` with user errors kept as themselves,
config groups of named objects, and the model and data a checkpoint records."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from hydra.errors import InstantiationException
from hydra.utils import instantiate
from lightning.fabric.utilities.exceptions import MisconfigurationException
from omegaconf import DictConfig, MissingMandatoryValue, OmegaConf

from transferkit.errors import ConfigError, UserError

if TYPE_CHECKING:
    from transferkit.data.datamodule import ImageFolderDataModule
    from transferkit.model.module import TransferModule


def build(cfg: DictConfig, **kwargs: Any) -> Any:
    """`hydra.utils.instantiate`, but a user error raised while building comes out as itself
    (Hydra wraps every exception in InstantiationException). A group node without `_target_` (a
    run config saved before the group built objects) is refused by name."""
    if isinstance(cfg, DictConfig) and "_target_" not in cfg:
        name = cfg._key() or "config"
        raise ConfigError(
            f"{name}: this config builds nothing (no _target_); choose an option, e.g. {name}=default."
        )
    try:
        return instantiate(cfg, **kwargs)
    except MissingMandatoryValue as error:
        raise ConfigError(
            f"{error.full_key} must be set: add {error.full_key}=... to the command line."
        ) from None
    except InstantiationException as error:
        cause = error.__cause__
        if isinstance(cause, UserError):
            raise cause from None
        if isinstance(cause, MisconfigurationException):  # Lightning: devices, accelerator, strategy
            raise ConfigError(f"{cause} (check trainer.*)") from None
        raise


def plain(cfg: Any) -> Any:
    """A config node as plain Python data (what checkpoints and loggers can store)."""
    return OmegaConf.to_container(cfg, resolve=True) if isinstance(cfg, DictConfig) else cfg


def instantiate_group(cfg: DictConfig | None) -> list[Any]:
    """Objects of a group laid out as `name: {_target_: ...}`; `name: null` drops one."""
    if not cfg:
        return []
    return [build(node) for node in cfg.values() if node is not None and "_target_" in node]


def build_model(cfg: DictConfig, datamodule: ImageFolderDataModule) -> TransferModule:
    """The LightningModule from the model, optimizer and scheduler groups, for the data's
    classes, with the data's preprocessing overrides and class weights, and what the run records
    beside it: the data, seed and fine-tuning (the frozen part's dtype is set once the strategy
    has frozen the model: `FrozenFeatures.dtype`)."""
    return build(
        cfg.model,
        class_names=list(datamodule.class_names),
        class_weights=datamodule.class_weights(),
        optimizer=plain(cfg.get("optimizer")),
        scheduler=plain(cfg.get("scheduler")),
        preprocessing=datamodule.preprocessing_overrides,
        data_config=recorded_data_config(cfg.data, datamodule),
        seed=cfg.seed,
        finetune=plain(cfg.finetune),
        multilabel=datamodule.multilabel,
        _recursive_=False,
        _convert_="all",
    )


def recorded_data_config(cfg: DictConfig, datamodule: ImageFolderDataModule) -> dict[str, Any]:
    """The data config a checkpoint records, so eval finds the same splits again: the root (and a
    label file, an exclude list) made absolute, without the settings that belong to the machine (workers)."""
    data = {k: v for k, v in plain(cfg).items() if k not in ("num_workers", "persistent_workers")}
    data["root"] = str(Path(datamodule.root).resolve())
    for key in ("labels", "exclude"):  # a label file, a list of images left out
        if getattr(datamodule, key, None) is not None:
            data[key] = str(Path(getattr(datamodule, key)).expanduser().resolve())
    return data


def recorded_datamodule(data: DictConfig | None, recorded: dict[str, Any] | None) -> ImageFolderDataModule:
    """The data config given (one with a `_target_`), else the checkpoint's own data with the
    keys given here (data.root=...) laid over it."""
    given = plain(data) or {}
    if "_target_" in given:
        return build(data)
    if not recorded:
        raise ConfigError(
            "The checkpoint does not record its data; name it: data=imagefolder data.root=PATH."
        )
    merged = {**recorded, **{k: v for k, v in given.items() if v is not None}}
    return build(OmegaConf.create(merged))
