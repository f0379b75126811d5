"""Which parameters train, and when: fine-tuning strategies as Lightning `BaseFinetuning` callbacks."""

from __future__ import annotations

import warnings

import lightning as L
from lightning.pytorch.callbacks import BaseFinetuning
from torch import nn

# Frozen parts are in eval mode on purpose (see hold_frozen_in_eval); Lightning warns of it.
warnings.filterwarnings("ignore", message=r".*module\(s\) in eval mode at the start of training")


def hold_frozen_in_eval(module: nn.Module) -> None:
    """Put every sub-module whose parameters are all frozen in eval mode.

    Frozen BatchNorm must not update its running statistics and frozen Dropout must not drop,
    whatever calls `train()`; parts that still train (a trainable BatchNorm inside a frozen
    block, say) keep their mode.
    """
    params = list(module.parameters())
    if params and not any(p.requires_grad for p in params):
        module.eval()
        return
    for child in module.children():
        hold_frozen_in_eval(child)


class FreezeBackbone(BaseFinetuning):
    """The seed recipe (a linear probe): the backbone never trains, only the new head does.

    The backbone is frozen before the optimizer is built, so the optimizer only ever sees the
    head. Its BatchNorm layers are frozen too (statistics and affine parameters) and held in
    eval mode by `TransferModule.train`.
    """

    def freeze_before_training(self, pl_module: L.LightningModule) -> None:
        self.freeze(pl_module.backbone, train_bn=False)
        pl_module.train(pl_module.training)  # re-apply the eval hold to the now-frozen parts

    def finetune_function(self, pl_module: L.LightningModule, epoch: int, optimizer) -> None:
        """Nothing unfreezes."""
