"""Which parameters train, from which epoch, at what lr: fine-tuning strategies as Lightning
`BaseFinetuning` callbacks over the backbone's blocks (see `transferkit.backbones.blocks`).

Each strategy comes down to one number per block: the epoch it starts training (or never).
Blocks that train from the start are in the optimizer from the start; a block that starts
later is unfrozen at the start of its epoch and added to the optimizer as a new param group.
Backbone block i of n (0 at the input) trains at

    head lr x backbone_lr_ratio x layer_decay ** (n - 1 - i)

and follows the same schedule as the head. The strategy owns this lr plan (`lr_plan`: each
parameter's param group and lr scale); the module builds its optimizer's first groups from it
and the strategy adds the rest as blocks unfreeze. Lightning's `BaseFinetuning` records the
param groups in the checkpoint, so a run resumed before or after an unfreeze continues as it was.
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Sequence

import lightning as L
from lightning.pytorch.callbacks import BaseFinetuning
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.optim import Optimizer

from transferkit.backbones.blocks import Block, backbone_blocks
from transferkit.errors import ConfigError
from transferkit.training.optim import param_groups, weight_decay
from transferkit.training.schedulers import follow_schedule

log = logging.getLogger(__name__)
# partial and gradual train one top block: measured on ELPV and MNIST (docs/finetuning.md), 0.3 x
# the head lr beat 0.1 there; full, which trains every block, keeps 0.1
TOP_LR_RATIO = 0.3

BN_POLICIES = ("frozen", "train", "fixed_stats")
FIXED_STATS = "transferkit_fixed_stats"  # set on a BatchNorm that normalises with its running statistics


def hold_frozen_in_eval(module: nn.Module, frozen_around: bool = False) -> None:
    """Put every frozen part of `module` in eval mode, whatever called `train()`.

    A sub-module with only frozen parameters is frozen; so is a parameter-free one (Dropout,
    DropPath) that sits among frozen parameters. Frozen BatchNorm then normalises with its
    running statistics and leaves them alone, and frozen Dropout does not drop. Parts that
    train (a trainable BatchNorm inside a frozen block, say) keep their mode, except a BatchNorm
    held to its pretrained statistics (`bn=fixed_stats`), which trains its affine weights in eval mode.
    """
    if getattr(module, FIXED_STATS, False):
        module.eval()
        return
    params = list(module.parameters())
    if not any(p.requires_grad for p in params) and (params or frozen_around):
        module.eval()
        return
    frozen_here = any(not p.requires_grad for p in params)
    for child in module.children():
        hold_frozen_in_eval(child, frozen_here)


def _batchnorms(model: nn.Module, params: set[str]) -> list[_BatchNorm]:
    return [
        m
        for name, m in model.named_modules()
        if isinstance(m, _BatchNorm) and any(f"{name}.{p}" in params for p, _ in m.named_parameters())
    ]


class BlockFinetuning(BaseFinetuning):
    """The common machinery; subclasses say when each block starts training (`start_epochs`).

    `bn`: "frozen" holds BatchNorm in frozen blocks fixed (statistics and affine parameters);
    "train" keeps it training there (fastai's default), at its block's lr; "fixed_stats" is
    "frozen", and BatchNorm in the blocks that train keeps normalising with the pretrained
    statistics while its affine weights train (Keras's advice for fine-tuning): the features a
    head learnt on frozen blocks do not shift when the blocks unfreeze.
    """

    def __init__(self, bn: str = "frozen", backbone_lr_ratio: float = 0.1, layer_decay: float | None = None):
        super().__init__()
        if bn not in BN_POLICIES:
            raise ConfigError(
                f"finetune.bn={bn!r} is not a BatchNorm policy; use one of: {', '.join(BN_POLICIES)}."
            )
        if not backbone_lr_ratio > 0:
            raise ConfigError(f"finetune.backbone_lr_ratio={backbone_lr_ratio} must be positive.")
        if layer_decay is not None and not 0 < layer_decay <= 1:
            raise ConfigError(f"finetune.layer_decay={layer_decay} must lie in (0, 1] (null: no decay).")
        self.bn = bn
        self.backbone_lr_ratio = float(backbone_lr_ratio)
        self.layer_decay = layer_decay
        self.blocks: list[Block] = []
        self.starts: list[int | None] = []
        self.lr_plan: dict[str, tuple[str, float]] = {}  # module parameter name -> (group, lr scale)

    def start_epochs(self, num_blocks: int) -> list[int | None]:
        """The epoch at which each block (input side first) starts training; None: never."""
        raise NotImplementedError

    def check(self, trainer: L.Trainer) -> None:
        """Refuse an unfreeze this run would never reach (epochs count from 0)."""
        max_epochs = trainer.max_epochs
        late = [s for s in self.starts if s is not None and max_epochs not in (None, -1) and s >= max_epochs]
        if late:
            raise ConfigError(
                f"The backbone unfreezes at epoch {min(late)}, but this run stops after "
                f"trainer.max_epochs={max_epochs} (epochs count from 0): unfreeze earlier "
                f"(finetune.unfreeze_at_epoch / finetune.milestones) or train longer."
            )

    def last_blocks_at(self, epoch: int, count: int, num_blocks: int, hint: str) -> list[int | None]:
        """Start epochs with the last `count` blocks (finetune.unfreeze_last) joining at `epoch`."""
        if count > num_blocks:
            raise ConfigError(
                f"finetune.unfreeze_last={count}, but this backbone has {num_blocks} blocks "
                f"({', '.join(b.name for b in self.blocks)}); {hint}."
            )
        return [None] * (num_blocks - count) + [epoch] * count

    @property
    def backbone_always_frozen(self) -> bool:
        """No parameter of the backbone ever trains in this run (known once it has been frozen)."""
        return bool(self.starts) and all(s is None for s in self.starts) and self.bn != "train"

    def lr_scale(self, index: int) -> float:
        decay = self.layer_decay if self.layer_decay is not None else 1.0
        return self.backbone_lr_ratio * decay ** (len(self.blocks) - 1 - index)

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)  # freeze_before_training
        self.check(trainer)

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """A run resumed inside an epoch gets no `on_train_epoch_start` from Lightning, and
        `freeze_before_training` has frozen every block that starts after epoch 0: unfreeze
        what that epoch trains (the param groups are restored already, so none is added)."""
        if trainer.fit_loop.epoch_loop.restarting:
            self.on_train_epoch_start(trainer, pl_module)

    def _set_block(self, pl_module: L.LightningModule, index: int, train: bool) -> None:
        """Freeze or unfreeze one block (BatchNorm as the policy says) and name its lr group."""
        block, backbone = self.blocks[index], pl_module.backbone
        params = dict(backbone.named_parameters())
        norms = _batchnorms(backbone, set(block.params))
        norm_params = {id(p) for m in norms for p in m.parameters()}
        train_norms = train or self.bn == "train"
        for name in block.params:
            param = params[name]
            param.requires_grad = train or (train_norms and id(param) in norm_params)
            group = f"backbone.{block.name}" + ("" if train else ".bn")
            self.lr_plan[f"backbone.{name}"] = (group, self.lr_scale(index))
        fixed = train and self.bn == "fixed_stats"
        for norm in norms:
            norm.track_running_stats = train_norms and not fixed  # as Lightning's freeze/make_trainable do
            setattr(norm, FIXED_STATS, fixed)

    def freeze_before_training(self, pl_module: L.LightningModule) -> None:
        self.blocks = backbone_blocks(pl_module.backbone)
        self.starts = self.start_epochs(len(self.blocks))
        self.lr_plan = {}
        for index, start in enumerate(self.starts):
            self._set_block(pl_module, index, train=start == 0)
        pl_module.train(pl_module.training)  # re-apply the eval hold to the frozen parts
        pl_module.lr_plan = self.lr_plan  # the module's optimizer groups follow it (and its additions)

    def finetune_function(self, pl_module: L.LightningModule, epoch: int, optimizer: Optimizer) -> None:
        """Unfreeze every block whose epoch has come and put what the optimizer lacks in it.

        Idempotent: on a resumed run the groups are already restored (by `BaseFinetuning`) and
        only `requires_grad` and the BatchNorm mode are set again.
        """
        due = [i for i, s in enumerate(self.starts) if s is not None and 0 < s <= epoch]
        if not due:
            return
        for index in due:
            self._set_block(pl_module, index, train=True)
        pl_module.train(pl_module.training)
        in_optimizer = {id(p) for group in optimizer.param_groups for p in group["params"]}
        wanted = {f"backbone.{n}" for i in due for n in self.blocks[i].params}
        new = [(n, p) for n, p in pl_module.named_parameters() if n in wanted and id(p) not in in_optimizer]
        decay = weight_decay(pl_module.hparams.get("optimizer"))
        new_groups = param_groups(new, self.lr_plan, decay, head_lr=optimizer.param_groups[0]["lr"])
        if not new_groups:
            return
        head = optimizer.param_groups[0]
        schedulers = [
            c.scheduler for c in pl_module.trainer.lr_scheduler_configs if c.scheduler.optimizer is optimizer
        ]
        for group in new_groups:
            optimizer.add_param_group(group)
            for scheduler in schedulers:
                follow_schedule(scheduler, head, optimizer.param_groups[-1])
        log.info(
            "Epoch %d: unfroze %s", epoch, ", ".join(f"{g['name']} (lr {g['lr']:.3g})" for g in new_groups)
        )


class Freeze(BlockFinetuning):
    """Linear probe (the seed recipe): the backbone never trains, only the new head does."""

    def start_epochs(self, num_blocks: int) -> list[int | None]:
        return [None] * num_blocks


class Partial(BlockFinetuning):
    """The last `unfreeze_last` blocks train from the start; the rest stays frozen."""

    def __init__(self, unfreeze_last: int = 1, backbone_lr_ratio: float = TOP_LR_RATIO, **kwargs) -> None:
        super().__init__(backbone_lr_ratio=backbone_lr_ratio, **kwargs)
        if int(unfreeze_last) < 1:
            raise ConfigError(
                f"finetune.unfreeze_last={unfreeze_last} must be 1 or more (finetune=freeze trains no block)."
            )
        self.unfreeze_last = int(unfreeze_last)

    def start_epochs(self, num_blocks: int) -> list[int | None]:
        return self.last_blocks_at(0, self.unfreeze_last, num_blocks, "use finetune=full to train them all")


class Gradual(BlockFinetuning):
    """The head trains alone until `unfreeze_at_epoch`; then the last `unfreeze_last` blocks
    (None: the whole backbone) join. Or, with `milestones` [E1, E2, ...], the last block joins
    at E1, the one before it at E2, and so on (the other two are then not used)."""

    def __init__(
        self,
        unfreeze_at_epoch: int = 1,
        unfreeze_last: int | None = 1,
        milestones: Sequence[int] | None = None,
        backbone_lr_ratio: float = TOP_LR_RATIO,
        **kwargs,
    ) -> None:
        super().__init__(backbone_lr_ratio=backbone_lr_ratio, **kwargs)
        epochs = [int(unfreeze_at_epoch)] if milestones is None else [int(m) for m in milestones]
        if not epochs or epochs[0] < 1 or any(b <= a for a, b in itertools.pairwise(epochs)):
            raise ConfigError(
                f"finetune.milestones={list(milestones or [])} / unfreeze_at_epoch={unfreeze_at_epoch}: "
                "unfreeze epochs must be 1 or more and increasing (epoch 0 trains the head alone)."
            )
        if unfreeze_last is not None and int(unfreeze_last) < 1:
            raise ConfigError(
                f"finetune.unfreeze_last={unfreeze_last} must be 1 or more, or null for the whole backbone."
            )
        self.unfreeze_at_epoch = int(unfreeze_at_epoch)
        self.unfreeze_last = None if unfreeze_last is None else int(unfreeze_last)
        self.milestones = None if milestones is None else epochs
        if self.milestones is not None:
            log.info(
                "finetune.milestones=%s sets when each block joins; unfreeze_at_epoch and unfreeze_last "
                "are not used.",
                self.milestones,
            )

    def start_epochs(self, num_blocks: int) -> list[int | None]:
        if self.milestones is None:
            count = num_blocks if self.unfreeze_last is None else self.unfreeze_last
            return self.last_blocks_at(self.unfreeze_at_epoch, count, num_blocks, "null unfreezes them all")
        if len(self.milestones) > num_blocks:
            raise ConfigError(
                f"finetune.milestones has {len(self.milestones)} epochs, but this backbone has only "
                f"{num_blocks} blocks ({', '.join(b.name for b in self.blocks)})."
            )
        starts: list[int | None] = [None] * num_blocks
        for k, epoch in enumerate(self.milestones):
            starts[num_blocks - 1 - k] = epoch
        return starts


class Full(BlockFinetuning):
    """Everything trains from the start (the backbone at the head lr x backbone_lr_ratio)."""

    def start_epochs(self, num_blocks: int) -> list[int | None]:
        return [0] * num_blocks
