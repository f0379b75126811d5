"""The train task: set up the run, fit, measure the best checkpoint, write the outputs."""

from __future__ import annotations

import json
import logging
import time
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import lightning as L
from omegaconf import DictConfig

from transferkit.backbones.build import check_input_size
from transferkit.config.build import build, build_model, instantiate_group, plain
from transferkit.console import print_config_tree
from transferkit.data.datamodule import ImageFolderDataModule
from transferkit.data.digests import refuse_resume_on_other_files
from transferkit.errors import ConfigError
from transferkit.features import FrozenFeatures
from transferkit.features.cache import weights_fingerprint
from transferkit.features.frozen import CachePlan
from transferkit.features.precision import precision_name
from transferkit.model.module import TransferModule
from transferkit.runs.checkpoints import recorded_splits
from transferkit.runs.directories import resolve_checkpoint, settle
from transferkit.tasks.cross_validation import cross_validate, write_held_out
from transferkit.tasks.preflight import (
    check_fold_seed,
    check_resume,
    check_resumed_augment,
    check_run,
    optimized_value,
    refuse_eval_only,
    resolve_seed,
)
from transferkit.tasks.run import TrainingRun
from transferkit.tasks.settings import check_config
from transferkit.tasks.train_outputs import (
    log_final,
    log_run_facts,
    loggers_muted,
    plot_training_batch,
    write_bad_images,
    write_plots,
)
from transferkit.tasks.wrapper import exit_on_user_error, task_wrapper
from transferkit.training.finetune import BlockFinetuning
from transferkit.training.swa import refuse_stochastic_weight_averaging

log = logging.getLogger(__name__)

# The Trainer arguments that change what trains, which a resume compares (max_epochs, devices and
# the rest may change: `runs.checkpoints`).
TRAINER_KEYS_THAT_TRAIN = (
    "precision",
    "accumulate_grad_batches",
    "gradient_clip_val",
    "gradient_clip_algorithm",
    "limit_train_batches",
)


@contextmanager
def known_warnings_silenced() -> Iterator[None]:
    """Lightning's warnings that are false for this module and data: frozen parts are in eval mode
    on purpose (`hold_frozen_in_eval`), epoch metrics are torchmetrics objects that sync themselves,
    a run resumed mid-epoch skips what it trained (`data.position`), though Lightning says the
    loader "is not resumable", and metrics are logged per epoch, so few batches per epoch lose no
    step's log; and torch's deprecation of an isinstance check inside Lightning's own code."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r".*your dataloader is not resumable")
        warnings.filterwarnings("ignore", message=r".*module\(s\) in eval mode at the start of training")
        sync_dist = r".*recommended to use `self.log\('(train|val|test)/.*sync_dist"
        warnings.filterwarnings("ignore", message=sync_dist)
        warnings.filterwarnings("ignore", message=r"The number of training batches .* logging interval")
        warnings.filterwarnings("ignore", message=r"`isinstance\(treespec, LeafSpec\)` is deprecated")
        yield


@task_wrapper("Results ({cfg.paths.output_dir})")
def train(cfg: DictConfig) -> dict[str, Any]:
    """Fit, then measure the best checkpoint on val (and test when the data has it); returns
    what results.json holds. With data.folds and no data.fold, every fold in turn."""
    if cfg.data.get("folds"):
        check_fold_seed(cfg)
        if cfg.data.get("fold") is None:
            return cross_validate(cfg, train_once)
        results, run = train_once(cfg)  # one fold (a job of a fold sweep): its oof.csv too
        if run.trainer.is_global_zero:
            write_held_out(run, run.output_dir)
        return results
    return train_once(cfg)[0]


def train_once(cfg: DictConfig, show_config: bool = True) -> tuple[dict[str, Any], TrainingRun]:
    """One training run: its results and the run (model, data and trainer) they are of."""
    started = time.perf_counter()
    run = set_up(cfg, show_config)
    with known_warnings_silenced():
        best = fit(run)
        results = measure(run, best)
    results["wall_s"] = round(time.perf_counter() - started, 2)  # for the loggers' final/* too
    log_final(run.trainer, results)
    write_plots(run.model, run.output_dir)
    return results, run


def set_up(cfg: DictConfig, show_config: bool = True) -> TrainingRun:
    """Settle the checkpoint, run directory and seed, then build data, trainer and model; every
    setting is checked before the images are."""
    refuse_eval_only(cfg)
    refuse_stochastic_weight_averaging(cfg.get("callbacks"))
    ckpt_path, output_dir = resolve_checkpoint(cfg)
    settle(cfg, ckpt_path, output_dir, resolve_seed(cfg.get("seed"), ckpt_path))
    if show_config and cfg.get("print_config"):
        print_config_tree(cfg)
    L.seed_everything(cfg.seed, workers=True)
    datamodule: ImageFolderDataModule = build(cfg.data)
    datamodule.prepare_data()
    check_run(cfg, datamodule.has_test)
    features: FrozenFeatures = build(cfg.features)
    finetune: BlockFinetuning = build(cfg.finetune)
    callbacks = [finetune, *instantiate_group(cfg.get("callbacks"))]  # unfreeze before lr logging
    trainer: L.Trainer = build(cfg.trainer, callbacks=callbacks, logger=instantiate_group(cfg.get("logger")))
    model = prepare_model(cfg, datamodule, trainer, finetune, features)
    datamodule.preprocessing = model.preprocessing  # fed as the backbone's weights expect
    log.info("%d classes: %s", len(model.class_names), ", ".join(model.class_names))
    datamodule.check_images()
    model.run_record["splits"] = datamodule.split_digests()  # what eval and a resume compare
    if cfg.get("ckpt_path"):
        recorded = recorded_splits(cfg.ckpt_path)
        refuse_resume_on_other_files(cfg.ckpt_path, recorded, model.run_record["splits"], datamodule.root)
    write_bad_images(datamodule, Path(cfg.paths.output_dir))
    plan = features.plan(model, datamodule, trainer, finetune, cfg.seed)
    # a resume trains on what the run did: checked on the plan, before a cache is built, and
    # again on what was attached (a full disk leaves a planned cache unbuilt)
    check_resumed_augment(cfg, None if plan is not None and features.views == 1 else datamodule.augment)
    feature_cache = use_feature_cache(features, plan, model, datamodule, trainer)
    if trainer.world_size == 1:  # under DDP the cache attaches as the fit starts
        check_resumed_augment(cfg, datamodule.training_augment)
    return TrainingRun(cfg, datamodule, finetune, trainer, model, feature_cache)


def use_feature_cache(
    features: FrozenFeatures,
    plan: CachePlan | None,
    model: TransferModule,
    datamodule: ImageFolderDataModule,
    trainer: L.Trainer,
) -> Path | None:
    """Train on the `plan`ned cache, if any: built and attached now (the datamodule serves it,
    the model runs its top on a prefix's activations), or under DDP by a callback as the fit
    starts, on every rank. Returns its directory (None: the run trains uncached)."""
    if plan is None:
        return None
    if trainer.world_size > 1:
        parallel = features.parallel(plan, model, datamodule)
        trainer.callbacks.append(parallel)
        return parallel.path
    built = features.build(plan)
    if built is None:
        return None
    sets, path = built
    features.attach(sets, model, datamodule, plan)
    return path


def prepare_model(
    cfg: DictConfig,
    datamodule: ImageFolderDataModule,
    trainer: L.Trainer,
    finetune: BlockFinetuning,
    features: FrozenFeatures,
) -> TransferModule:
    """The model for this data and device, frozen as the strategy starts it; refused if it
    cannot take the image size or would not continue the run it resumes."""
    model = build_model(cfg, datamodule)
    check_input_size(model.backbone, model.preprocessing.image_size, model.hparams.name)
    if not cfg.checkpoint.self_contained:
        model.keep_backbone_by_reference()
    finetune.freeze_before_training(model)  # what trains decides the precision and the cache
    finetune.check(trainer)
    model.frozen_dtype = features.dtype(trainer.strategy.root_device, finetune)
    model.run_record["features"] = features.recorded()
    model.run_record["trainer"] = {key: plain(cfg.trainer.get(key)) for key in TRAINER_KEYS_THAT_TRAIN}
    check_resume(cfg, model)
    return model


def fit(run: TrainingRun) -> str | None:
    """Train (after the lr finder, with tune_lr=true); returns the best checkpoint, if any."""
    cfg, trainer, model = run.cfg, run.trainer, run.model
    log_run_facts(trainer, cfg, model)
    plot_training_batch(run.datamodule, model, run.output_dir / "plots" / "train_batch.png")
    if cfg.get("tune_lr"):  # Lightning sweeps without our callbacks: the model is frozen above
        build(cfg.lr_finder)(trainer, model, run.datamodule, run.output_dir)
    trainer.fit(model, datamodule=run.datamodule, ckpt_path=cfg.get("ckpt_path"))
    if trainer.world_size > 1:  # replicas must agree: DDP all-reduces every trained block
        log.info("Rank %d: weights %s", trainer.global_rank, weights_fingerprint(model))
    checkpoint = trainer.checkpoint_callback
    return checkpoint.best_model_path if checkpoint is not None and checkpoint.best_model_path else None


def measure(run: TrainingRun, best: str | None) -> dict[str, Any]:
    """The best checkpoint's (else the final model's) metrics on val, and test when the data has it."""
    trainer, model, datamodule = run.trainer, run.model, run.datamodule
    with loggers_muted(trainer):  # the best checkpoint's numbers go to results.json and final/*
        validated = trainer.validate(model, datamodule=datamodule, ckpt_path=best, verbose=False)
        if not validated:
            raise ConfigError("Nothing was validated; check trainer.limit_val_batches and the val split.")
        val = {k: float(v) for k, v in validated[0].items()}
        primary = model.primary_metric  # first: val/acc, or val/map for multi-label data
        results: dict[str, Any] = {primary: val[primary], **val}
        if run.cfg.get("test", True) and datamodule.has_test:
            tested = trainer.test(model, datamodule=datamodule, ckpt_path=best, verbose=False)
            results.update({k: float(v) for k, v in tested[0].items()})
    if trainer.world_size > 1:
        log.info("Rank %d: metrics %s", trainer.global_rank, json.dumps(val, sort_keys=True))
    results.update(
        best_model_path=str(Path(best).resolve()) if best else None,
        class_names=model.class_names,
        seed=run.cfg.seed,
        augment=model.run_record.get("augment", datamodule.augment),
        precision=precision_name(model.frozen_dtype),  # of the frozen backbone (or blocks)
        runtime=model.run_record.get("runtime"),  # what ran them: onnxruntime (its version) or torch
        # under DDP the cache is built as the fit starts, and a full disk leaves the run uncached
        feature_cache=str(run.feature_cache) if datamodule.feature_sets is not None else None,
        epochs=trainer.current_epoch,
    )
    return results


@exit_on_user_error
def main(cfg: DictConfig) -> float | None:
    """Hydra entry: train, then hand sweepers the metric named by `optimized_metric`."""
    check_config(cfg)
    return optimized_value(cfg, train(cfg))
