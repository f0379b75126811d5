"""Lightning's DDP, fitted to fine-tuning: blocks unfrozen mid-run are all-reduced, and
BatchNorm syncs across GPUs for timm's fused norm+activation layers too.

DDP only synchronises the parameters that required grad when it wrapped the model, so with the
stock strategy a block that `gradual` unfreezes later trains on each rank's own gradients and
the replicas drift apart. Here every parameter is registered (frozen ones are reported unused).
"""

from __future__ import annotations

import torch
from lightning.pytorch.plugins.layer_sync import LayerSync, TorchSyncBatchNorm
from lightning.pytorch.strategies import DDPStrategy
from timm.layers import BatchNormAct2d, SyncBatchNormAct, convert_sync_batchnorm
from torch import nn
from torch.nn.parallel import DistributedDataParallel


class FinetuneDDPStrategy(DDPStrategy):
    """DDP with every parameter registered, frozen or not (`find_unused_parameters` on when
    some are frozen, as those get no gradient)."""

    strategy_name = "transferkit_ddp"

    def _setup_model(self, model: nn.Module) -> DistributedDataParallel:
        frozen = [p for p in model.parameters() if not p.requires_grad]
        if frozen:
            self._ddp_kwargs["find_unused_parameters"] = True
        for param in frozen:
            param.requires_grad_(True)
        try:
            return super()._setup_model(model)
        finally:
            for param in frozen:
                param.requires_grad_(False)


def _modes(model: nn.Module) -> dict[str, bool]:
    return {name: module.training for name, module in model.named_modules()}


def _restore_modes(model: nn.Module, modes: dict[str, bool]) -> nn.Module:
    """Converted layers start in training mode; a frozen BatchNorm must stay in eval."""
    for name, module in model.named_modules():
        if name in modes:
            module.training = modes[name]
    return model


def _revert(module: nn.Module) -> nn.Module:
    if isinstance(module, SyncBatchNormAct):
        plain = BatchNormAct2d(
            module.num_features, module.eps, module.momentum, module.affine, module.track_running_stats
        )
        plain.act, plain.drop = module.act, module.drop
        if module.affine:
            with torch.no_grad():
                plain.weight, plain.bias = module.weight, module.bias
        plain.running_mean, plain.running_var = module.running_mean, module.running_var
        plain.num_batches_tracked = module.num_batches_tracked
        return plain
    if isinstance(module, nn.SyncBatchNorm):
        return TorchSyncBatchNorm().revert(module)
    for name, child in module.named_children():
        module.add_module(name, _revert(child))
    return module


class SyncBatchNorm(LayerSync):
    """`Trainer(plugins=[SyncBatchNorm()])`: Lightning's sync_batchnorm, but timm's BatchNormAct
    layers keep their activation, and every layer keeps its train/eval mode."""

    def apply(self, model: nn.Module) -> nn.Module:
        modes = _modes(model)
        return _restore_modes(convert_sync_batchnorm(model), modes)

    def revert(self, model: nn.Module) -> nn.Module:
        modes = _modes(model)
        return _restore_modes(_revert(model), modes)
