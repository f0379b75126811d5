"""The export task: a checkpoint as model.onnx or model.pt plus model.json, parity checked."""

from __future__ import annotations

import logging
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from hydra.errors import InstantiationException
from omegaconf import DictConfig

from transferkit import __version__
from transferkit.config.build import recorded_datamodule
from transferkit.data.images import load_rgb
from transferkit.errors import ConfigError, ExportError, UserError, first_line
from transferkit.inference import collect_inputs
from transferkit.inference.exporting import EXPORTERS, FORMATS, Classifier, load_exported, parity
from transferkit.model.module import TransferModule
from transferkit.runs.checkpoints import load_model
from transferkit.runs.directories import write_json
from transferkit.tasks.settings import check_config
from transferkit.tasks.wrapper import exit_on_user_error, task_wrapper

log = logging.getLogger(__name__)


def val_images(model: TransferModule) -> tuple[list[Path], str]:
    """The val split of the data the checkpoint records (val/, or the part of train/ it held out),
    as eval would find it; none when the data is not recorded or no longer there."""
    if not model.data_config:
        return [], "random inputs"
    try:
        datamodule = recorded_datamodule(None, model.data_config)
        val = datamodule.folders.val
    except (UserError, InstantiationException) as error:
        log.warning("The training data cannot be read as recorded (%s).", first_line(error))
        return [], "random inputs"
    return [path for path, _ in val], f"the val split of {datamodule.root}"


def parity_images(model: TransferModule, source: str | None, count: int) -> tuple[torch.Tensor, str]:
    """Up to `count` real images, preprocessed as the model expects, and where they came from:
    `source` (a folder, image or list), else the training data's val split. Random inputs only
    when there are no images to be had, and the report says so."""
    paths, source = (collect_inputs(source), source) if source is not None else val_images(model)
    transform = model.preprocessing.transforms(train=False)
    images = []
    for path in paths:
        try:
            images.append(transform(load_rgb(path)))
        except Exception:  # noqa: BLE001 - any unreadable file is just not used for the check
            continue
        if len(images) == count:
            break
    if images:
        return torch.stack(images), f"{len(images)} images from {source}"
    size = model.preprocessing.image_size
    log.warning("No images found to check parity on; using random inputs (give parity.images=DIR).")
    return torch.randn(count, 3, size, size, generator=torch.Generator().manual_seed(0)), "random inputs"


def export_checked(
    model: TransferModule, format: str, images: torch.Tensor, source: str, atol: float, output: Path
) -> float:
    """Export into a staging folder, check parity there, then move the files into `output`;
    nothing is left behind on failure. Returns the largest logit difference."""
    name = FORMATS[format]
    net = Classifier(model.backbone, model.head).eval().requires_grad_(False)
    with tempfile.TemporaryDirectory(dir=output, prefix=".export-") as staging:
        staged = Path(staging) / name
        try:
            EXPORTERS[format](net, images[:2], staged)
        except Exception as error:  # noqa: BLE001 - the exporters raise many kinds
            raise ExportError(
                f"{format} export of {model.hparams.name} failed: {first_line(error)}"
            ) from error
        difference = parity(net, load_exported(staged), images)
        if not difference <= atol:
            raise ExportError(
                f"The {format} model's logits differ from PyTorch's by {difference:.2e} "
                f"(> parity.atol={atol:g}) on {source}; nothing was written."
            )
        for file in Path(staging).iterdir():  # model.onnx and, for models over 2 GB, its weights
            shutil.move(str(file), output / file.name)
    return difference


def decision(model: TransferModule) -> dict[str, Any]:
    """How model.json's reader turns the logits into labels: `multilabel`, and for a multi-label
    model the per-class `thresholds` its sigmoids are compared with."""
    if not model.multilabel:
        return {"multilabel": False}
    return {"multilabel": True, "thresholds": model.thresholds.detach().float().cpu().tolist()}


def metadata(model: TransferModule, cfg: DictConfig, image_size: tuple[int, int], parity: dict) -> dict:
    """model.json: what a runtime needs to feed the exported model and read its output. The
    output is logits: a softmax gives a single-label model's probabilities; a multi-label
    model's are independent sigmoids, a class predicted where its reaches its threshold."""
    output_shape = ["batch", len(model.class_names)]
    activation = "sigmoid" if model.multilabel else "softmax"
    return {
        "format": cfg.format,
        "file": FORMATS[cfg.format],
        "class_names": model.class_names,
        **decision(model),
        "preprocessing": model.preprocessing.to_dict(),
        "input": {"name": "images", "shape": ["batch", 3, *image_size], "dtype": "float32"},
        "output": {"name": "logits", "shape": output_shape, "activation": activation},
        "model": model.hparams.name,
        "checkpoint": str(Path(cfg.ckpt_path).resolve()),
        "parity": parity,
        "versions": {"transferkit": __version__, "torch": torch.__version__},
    }


@task_wrapper("Exported ({cfg.format}, parity checked)")
def export(cfg: DictConfig) -> dict[str, Any]:
    """The checkpoint as model.onnx or model.pt plus model.json in `output`, parity checked."""
    if cfg.format not in FORMATS:
        raise ConfigError(f"format={cfg.format} is not supported; use one of: {', '.join(FORMATS)}.")
    count, atol = int(cfg.parity.count), float(cfg.parity.atol)
    if count < 1:
        raise ConfigError(f"parity.count={count} must be 1 or more.")
    model = load_model(cfg.ckpt_path)
    images, source = parity_images(model, cfg.parity.get("images"), count)
    output = Path(cfg.output)
    output.mkdir(parents=True, exist_ok=True)
    difference = export_checked(model, cfg.format, images, source, atol, output)
    checked = {"max_abs_diff": difference, "atol": atol, "checked_on": source}
    write_json(output / "model.json", metadata(model, cfg, tuple(images.shape[2:]), checked))
    log.info("Parity: max |logit difference| %.2e <= %g on %s.", difference, atol, source)
    return {
        "model": str((output / FORMATS[cfg.format]).resolve()),
        "metadata": str((output / "model.json").resolve()),
        "parity_max_abs_diff": difference,
        "parity_checked_on": source,
    }


@exit_on_user_error
def main(cfg: DictConfig) -> None:
    check_config(cfg)
    export(cfg)
