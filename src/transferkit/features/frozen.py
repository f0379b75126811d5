"""The `features` config group: how a frozen backbone's forward pass runs (its precision) and
whether what its frozen part computes is computed once and cached.

`cache: auto` (the default) caches whenever part of the backbone stays frozen for the whole
run (finetune.bn=frozen or fixed_stats), no batch mixing is on and the cache fits `max_gb`;
under DDP every rank extracts its share (`features.parallel`). When the whole backbone is frozen
(finetune=freeze) the cache holds its features and only the head trains; when only top blocks
train (finetune=partial or gradual) it holds the activations below the lowest block that ever
trains, and each epoch runs the trainable top on them (`features.prefix`).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import lightning as L
import torch

from transferkit.backbones.build import output_shape
from transferkit.errors import ConfigError
from transferkit.features.cache import (
    CacheNotWritten,
    Extraction,
    FeatureSet,
    load_or_build,
)
from transferkit.features.decode import choose_decode
from transferkit.features.loading import head_batch_size
from transferkit.features.parallel import ParallelCache
from transferkit.features.precision import PRECISIONS, run_precision
from transferkit.features.prefix import NoPrefixSplit, PrefixSplit, eval_mode, split_backbone
from transferkit.features.size import GB, cache_bytes, default_limit, readable
from transferkit.runtime import RUNTIMES, TORCH, resolve_runtime, session_for

if TYPE_CHECKING:
    from transferkit.data.datamodule import ImageFolderDataModule
    from transferkit.model.module import TransferModule
    from transferkit.training.finetune import BlockFinetuning

log = logging.getLogger(__name__)


class NoCache(Exception):
    """Why this run cannot train on a cache (a clause)."""


@dataclass
class CachePlan:
    """What a run caches: the extraction (its seed draws the views) and the prefix split it is
    cut at (None: the whole backbone's features)."""

    job: Extraction
    split: PrefixSplit | None


def frozen_blocks(finetune: BlockFinetuning) -> int:
    """How many blocks, from the input side, stay fixed for the whole run (known once the
    strategy has frozen the model): those below the lowest block that ever trains; none with
    finetune.bn=train, where BatchNorm trains in frozen blocks too."""
    if finetune.bn == "train":
        return 0
    return next((i for i, start in enumerate(finetune.starts) if start is not None), len(finetune.starts))


class FrozenFeatures:
    """`cache`: auto, true (refuse a run that cannot use it) or false. `views`: cached views per
    training image (1: the evaluation transform; K > 1: K augmented views, one drawn per epoch).
    `precision`: auto (fp32 on every CPU, bf16 on a CUDA device with it), bf16, fp16 or fp32:
    what a backbone frozen for the whole run computes in (a run that trains blocks: fp32).
    `max_gb`: the largest cache to build (None: a quarter of the free memory or disk).
    `batch_size`: the largest batch the head trains in on cached features (`features.loading`).
    `runtime`: auto (onnxruntime on a CPU in fp32, else PyTorch), onnx or torch: what runs the
    frozen part, its exports kept in `exports_dir` (None: `dir`/onnx; eval, predict and serve
    share it)."""

    def __init__(
        self,
        cache: str | bool = "auto",
        views: int = 1,
        precision: str = "auto",
        dir: str | Path = ".cache/features",
        max_gb: float | None = None,
        batch_size: int = 4096,
        runtime: str = "auto",
        exports_dir: str | Path | None = None,
    ) -> None:
        if not (cache == "auto" or isinstance(cache, bool)):  # 0 and 1 are not false and true here
            raise ConfigError(f"features.cache={cache!r} must be auto, true or false.")
        if int(views) < 1:
            raise ConfigError(f"features.views={views} must be 1 or more.")
        if precision != "auto" and precision not in PRECISIONS:
            raise ConfigError(
                f"features.precision={precision!r} is not one of: auto, {', '.join(PRECISIONS)}."
            )
        if max_gb is not None and not float(max_gb) > 0:
            raise ConfigError(
                f"features.max_gb={max_gb} must be a positive number of GB (null: a quarter of the "
                "free memory or disk)."
            )
        if int(batch_size) < 1:
            raise ConfigError(
                f"features.batch_size={batch_size} must be a positive integer (the largest batch the "
                "head trains in on cached features; 4096 by default)."
            )
        self.cache, self.views, self.precision, self.dir = cache, int(views), precision, Path(dir)
        self.max_gb = None if max_gb is None else float(max_gb)
        self.batch_size = int(batch_size)
        if runtime not in RUNTIMES:
            raise ConfigError(f"features.runtime={runtime!r} is not one of: {', '.join(RUNTIMES)}.")
        self.runtime = runtime
        self.exports_dir = Path(exports_dir) if exports_dir is not None else self.dir / "onnx"
        self._splits: dict[tuple[int, int], PrefixSplit] = {}

    def recorded(self) -> dict[str, Any]:
        """The settings a resume must keep: each changes what trains (cached views replace the
        augmentation, the head batch the steps). The precision is compared as resolved (auto and
        fp32 are one on a CPU); `dir` and `max_gb` say where and how large, and what the limit
        decided is compared as the augmentation training gets."""
        return {"cache": self.cache, "views": self.views, "batch_size": self.batch_size}

    def dtype(self, device: torch.device, finetune: BlockFinetuning) -> torch.dtype:
        """The one dtype the frozen part of the backbone runs in on `device` this run, cached or
        not (`precision.run_precision`); known once `finetune` has frozen the model."""
        strategy = (
            "finetune.bn=train" if finetune.bn == "train" else f"finetune={type(finetune).__name__.lower()}"
        )
        return run_precision(self.precision, device, not finetune.backbone_always_frozen, strategy)

    def source(
        self,
        model: TransferModule,
        datamodule: ImageFolderDataModule,
        trainer: L.Trainer,
        finetune: BlockFinetuning,
    ) -> PrefixSplit | None:
        """What the cache would hold: the whole backbone's features (None) or the activations of
        its frozen prefix (the split). Raises NoCache with the reason when there is nothing to cache."""
        frozen = frozen_blocks(finetune)
        if frozen == 0 and finetune.bn == "train":
            raise NoCache("finetune.bn=train trains BatchNorm in every block, so none stays fixed")
        if frozen == 0:
            raise NoCache(
                "every block of the backbone trains in this run (finetune=full, or gradual with "
                "unfreeze_last=null), so no frozen part is left to cache"
            )
        if datamodule.batch_mix is not None:
            raise NoCache(
                "MixUp/CutMix mix images, not features (set data.mixup_alpha=0 data.cutmix_alpha=0)"
            )
        if frozen == len(finetune.blocks):
            return None
        try:
            return self.prefix_split(model, finetune, frozen)
        except NoPrefixSplit as error:
            raise NoCache(
                f"the backbone cannot be cut below block {finetune.blocks[frozen].name}: {error}"
            ) from None

    def prefix_split(self, model: TransferModule, finetune: BlockFinetuning, frozen: int) -> PrefixSplit:
        """The backbone cut below its first `frozen` blocks, traced once per run (the runtime and
        the cache run the same prefix). Raises NoPrefixSplit."""
        key = (id(model), frozen)
        if key not in self._splits:
            image_size = model.preprocessing.image_size
            self._splits[key] = split_backbone(model.backbone, finetune.blocks, frozen, image_size)
        return self._splits[key]

    def use_runtime(self, model: TransferModule, finetune: BlockFinetuning, device: torch.device) -> str:
        """Run the part of the backbone that stays frozen for the whole run (all of it, or the
        prefix below the lowest block that ever trains) on the chosen runtime, cached or not;
        returns the runtime's name (results.json, the cache key): "torch" when nothing is
        frozen, the runtime is PyTorch, or the part cannot be exported or cut (said why)."""
        model.use_frozen_runtime(None, None)
        if resolve_runtime(self.runtime, device, model.frozen_dtype) == TORCH:
            return TORCH
        if model.hparams.get("compile"):
            if self.runtime == "onnx":
                raise ConfigError(
                    "features.runtime=onnx and model.compile=true both choose what runs the backbone; "
                    "keep one of them."
                )
            log.info("The backbone runs compiled in PyTorch (model.compile=true), not on onnxruntime.")
            return TORCH
        frozen = frozen_blocks(finetune)
        if frozen == 0:
            return TORCH
        split, what = None, "The frozen backbone"
        if frozen < len(finetune.blocks):
            try:
                split = self.prefix_split(model, finetune, frozen)
            except NoPrefixSplit as error:
                log.info(
                    "The frozen blocks run on PyTorch: the backbone cannot be cut below block %s: %s.",
                    finetune.blocks[frozen].name, error,
                )  # fmt: skip
                return TORCH
            what = f"The frozen blocks below {split.block}"
        size = model.preprocessing.image_size
        module = model.backbone if split is None else split.prefix()
        session = session_for(module, (3, size, size), self.exports_dir, what)
        if session is None:
            return TORCH
        model.use_frozen_runtime(session, split)
        return session.name

    def check_size(self, model: TransferModule, split: PrefixSplit | None, images: dict[str, int]) -> None:
        """Log the cache's size, estimated before it is built; raise NoCache past the limit."""
        if split is None:
            with eval_mode(model.backbone):
                shape = tuple(output_shape(model.backbone, model.preprocessing.image_size)[1:])
            what = "the backbone's features"
        else:
            shape = split.activation_shape
            what = f"the activations below block {split.block} ({split.node})"
        numel = int(torch.Size(shape).numel())
        estimate = cache_bytes(numel, images, self.views, model.frozen_dtype)
        limit, meaning = (
            (self.max_gb * GB, f"features.max_gb={self.max_gb:g}") if self.max_gb else default_limit(self.dir)
        )
        counts = " + ".join(
            f"{n} {name}" + (f" x {self.views} views" if name == "train" and self.views > 1 else "")
            for name, n in images.items()
        )
        log.info(
            "Feature cache: %s, %s per image, for %s images: about %s (limit %s, %s).",
            what, "x".join(map(str, shape)), counts, readable(estimate), readable(limit), meaning,
        )  # fmt: skip
        if estimate > limit:
            raise NoCache(
                f"the cache would take about {readable(estimate)}, more than the limit of {readable(limit)} "
                f"({meaning}; set features.max_gb to allow more"
                + (", or use fewer features.views)" if self.views > 1 else ")")
            )

    def plan(
        self,
        model: TransferModule,
        datamodule: ImageFolderDataModule,
        trainer: L.Trainer,
        finetune: BlockFinetuning,
        seed: int | None = None,
    ) -> CachePlan | None:
        """What this run would cache (the extraction, and the prefix split when only the top
        trains), or None when it trains uncached (the reason logged; features.cache=true
        refuses instead). First the frozen part is put on its runtime (`use_runtime`, recorded
        as the run's `runtime`), which the cache and the uncached path share; `set_up` builds
        and attaches the plan. Every split is computed in `model.frozen_dtype`, the one
        precision the frozen part runs in."""
        if self.views > 1 and datamodule.augment is None:
            raise ConfigError(
                f"features.views={self.views} caches augmented views, but data.augment is off; "
                "use features.views=1."
            )
        model.run_record["runtime"] = self.use_runtime(model, finetune, trainer.strategy.root_device)
        if self.cache is False:
            return None
        data = datamodule.splits
        # a cross-validation fold caches the whole pool, shared by every fold, and takes its rows
        splits = {"train": data.pool or data.train, "val": data.pool or data.val}
        if data.test is not None:
            splits["test"] = data.test
        try:
            split = self.source(model, datamodule, trainer, finetune)
            self.check_size(model, split, {name: len(items) for name, items in splits.items()})
        except NoCache as reason:
            if self.cache is True:
                raise ConfigError(f"features.cache=true cannot be used: {reason}.") from None
            log.info("Training without a feature cache: %s.", reason)
            return None
        preprocessing = datamodule.preprocessing
        job = Extraction(
            model.backbone if split is None else split.prefix(),
            splits,
            train_transform=preprocessing.transforms(True, datamodule.augment, datamodule.crop_scale),
            eval_transform=preprocessing.transforms(train=False),
            views=self.views,
            dtype=model.frozen_dtype,
            device=trainer.strategy.root_device,
            seed=seed,
            batch_size=datamodule.batch_size,
            num_workers=datamodule.num_workers,
            channels_last=model.channels_last,
            boundary=None if split is None else split.boundary,
            runtime=model.frozen_runtime,
        )
        paths = [path for items in splits.values() for path, _ in items]
        if trainer.world_size == 1:  # ranks measuring apart could choose apart: other keys
            job.decode = choose_decode(job.device, paths, job.num_workers, job.eval_transform)
        if job.decode != "pil":
            log.info(
                "Extraction decodes the JPEGs on %s (measured faster than the loader workers).", job.decode
            )
        return CachePlan(job, split)

    def build(self, plan: CachePlan) -> tuple[dict[str, FeatureSet], Path] | None:
        """The plan's cache, loaded or built in this process, and its directory; None when the
        disk refuses it (the run trains uncached, said in one line; features.cache=true stops)."""
        try:
            sets, path, _ = load_or_build(plan.job, self.dir)
        except CacheNotWritten as error:
            if self.cache is True:
                raise
            log.warning("Training without a feature cache: %s", error)
            return None
        return sets, path

    def parallel(
        self, plan: CachePlan, model: TransferModule, datamodule: ImageFolderDataModule
    ) -> ParallelCache:
        """The callback that builds the plan's cache on every DDP rank as the fit starts (the
        ranks exist then: rank 0 decides for all) and attaches it."""
        attach = lambda sets: self.attach(sets, model, datamodule, plan)  # noqa: E731
        return ParallelCache(plan.job, self.dir, attach, required=self.cache is True)

    def attach(
        self,
        sets: dict[str, FeatureSet],
        model: TransferModule,
        datamodule: ImageFolderDataModule,
        plan: CachePlan,
    ) -> None:
        """Train and evaluate on `sets`: the datamodule serves them (a cross-validation fold takes
        its rows of the pool) and the model runs the trainable top on a prefix's activations."""
        split, seed = plan.split, plan.job.seed
        data = datamodule.splits
        if data.pool is not None:
            row = {path: i for i, (path, _) in enumerate(data.pool)}
            for name in ("train", "val"):
                sets[name] = sets[name].subset([row[path] for path, _ in getattr(data, name)])
        sets["train"].seed = seed  # which view each epoch draws
        datamodule.use_features(sets, self.head_batch_size(datamodule, split, len(sets["train"])))
        model.use_prefix(split)
        if self.views == 1 and datamodule.augment is not None:
            log.info(
                "data.augment=%s is not applied: %s are cached with 1 view (the evaluation "
                "transform); use features.views=N to cache N augmented views, or features.cache=false.",
                datamodule.augment,
                "features" if split is None else "activations",
            )

    def head_batch_size(self, datamodule: ImageFolderDataModule, split: PrefixSplit | None, rows: int) -> int:
        """The batch training runs in on the cache: on features (only the head trains) up to
        `batch_size`; on a prefix's activations the images' (the top's blocks train on them)."""
        if split is not None:
            return datamodule.batch_size
        batch = head_batch_size(rows, datamodule.batch_size, self.batch_size)
        if batch != datamodule.batch_size:
            log.info(
                "The head trains on cached features in batches of %d (%d rows, up to "
                "features.batch_size=%d for %d steps an epoch; data.batch_size=%d); optimizer.lr is "
                "not scaled.",
                batch, rows, self.batch_size, -(-rows // batch), datamodule.batch_size,
            )  # fmt: skip
        return batch
