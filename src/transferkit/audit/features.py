"""The backbone's features of every image, through the feature cache: built the way a
finetune=freeze training run builds its cache (the model's backbone and weights, the weights'
evaluation preprocessing with the data's overrides, one view, the frozen precision, the runtime
`features.runtime` chooses), so the audit and such a run on the same data, model and precision
share one file and one forward pass (and one onnxruntime export)."""

from __future__ import annotations

from pathlib import Path

import torch
from omegaconf import DictConfig

from transferkit.audit.items import SPLIT_ORDER
from transferkit.backbones import build_backbone
from transferkit.data.datamodule import ImageFolderDataModule
from transferkit.features.cache import Extraction, load_or_build
from transferkit.features.precision import resolve_precision
from transferkit.runtime import TORCH, resolve_runtime, session_for


def image_features(
    cfg: DictConfig, datamodule: ImageFolderDataModule, device: torch.device
) -> tuple[torch.Tensor, Path, bool]:
    """(N, D) fp32 features of train, val and test in that order (the audit's items); the cache
    file, and whether it was reused."""
    backbone = build_backbone(cfg.model.name, cfg.model.weights)
    model = backbone.model
    if any(isinstance(m, torch.nn.Conv2d) for m in model.modules()):  # as TransferModule runs it
        model.to(memory_format=torch.channels_last)
    preprocessing = backbone.preprocessing.with_overrides(**datamodule.preprocessing_overrides)
    datamodule.preprocessing = preprocessing
    splits = {name: items for name in SPLIT_ORDER if (items := getattr(datamodule.splits, name)) is not None}
    dtype = resolve_precision(cfg.features.precision, device)
    runtime = None
    if resolve_runtime(cfg.features.get("runtime", "auto"), device, dtype) != TORCH:
        size = preprocessing.image_size
        runtime = session_for(model.eval(), (3, size, size), cfg.features.exports_dir, "The backbone")
    job = Extraction(
        model,
        splits,
        train_transform=None,  # one view: train is cached through the evaluation transform
        eval_transform=preprocessing.transforms(train=False),
        views=1,
        dtype=dtype,
        device=device,
        seed=int(cfg.seed),
        batch_size=datamodule.batch_size,
        num_workers=datamodule.num_workers,
        channels_last=any(isinstance(m, torch.nn.Conv2d) for m in model.modules()),
        runtime=runtime,
    )
    sets, path, reused = load_or_build(job, cfg.features.dir)
    features = torch.cat([sets[name].features[0].float() for name in splits])
    return features, path, reused
