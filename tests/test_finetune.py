"""Fine-tuning strategies and the BatchNorm policy, proven on real optimizer steps.

For each strategy: which blocks require grad at each epoch, the lr of every param group at each
epoch, and which tensors (weights and BatchNorm buffers) change or stay bit-identical.
"""

from __future__ import annotations

import copy
from pathlib import Path

import lightning as L
import pytest
import torch
from helpers import fit, tiny
from lightning.pytorch.callbacks import ModelCheckpoint
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from transferkit.backbones.blocks import backbone_blocks
from transferkit.errors import ConfigError
from transferkit.model.module import TransferModule
from transferkit.training.finetune import Freeze, Full, Gradual, Partial, hold_frozen_in_eval

LR = 0.1
ADAMW = {"_target_": "torch.optim.AdamW", "_partial_": True, "lr": LR, "weight_decay": 0.05}
ONECYCLE = {"_target_": "transferkit.training.schedulers.one_cycle", "_partial_": True}
BLOCKS = ["stem", "stage1", "stage2", "stage3", "stage4", "stage5"]  # timm's grouping of the tiny model


class Recorder(L.Callback):
    """At each epoch's first batch: which blocks train, and every param group's name and lr."""

    def __init__(self) -> None:
        self.grads: dict[int, dict[str, bool]] = {}
        self.groups: dict[int, list[tuple[str, float]]] = {}
        self.step_groups: list[list[tuple[str, float]]] = []
        self.bn_training: dict[int, dict[str, bool]] = {}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        groups = [(g["name"], g["lr"]) for g in trainer.optimizers[0].param_groups]
        self.step_groups.append(groups)
        if batch_idx:
            return
        epoch, params = trainer.current_epoch, dict(pl_module.backbone.named_parameters())
        blocks = backbone_blocks(pl_module.backbone)
        self.grads[epoch] = {b.name: all(params[p].requires_grad for p in b.params) for b in blocks}
        self.groups[epoch] = groups
        self.bn_training[epoch] = {
            n: m.training for n, m in pl_module.backbone.named_modules() if isinstance(m, _BatchNorm)
        }


def fit_recording(
    module: TransferModule,
    strategy: L.Callback,
    root: Path,
    epochs: int = 3,
    ckpt_path: str | None = None,
    checkpoints: bool = False,
) -> tuple[L.Trainer, Recorder]:
    """Fit under `strategy` with a Recorder (and a checkpoint per epoch if asked)."""
    recorder = Recorder()
    callbacks = [strategy, recorder]
    if checkpoints:
        callbacks.append(ModelCheckpoint(dirpath=root / "ckpt", save_top_k=-1, filename="{epoch}"))
    return fit(module, root, callbacks, epochs=epochs, ckpt_path=ckpt_path), recorder


def block_state(module: TransferModule) -> dict[str, dict[str, torch.Tensor]]:
    """Each block's tensors: parameters and the BatchNorm buffers of its layers."""
    state = {k: v.clone() for k, v in module.backbone.state_dict().items()}
    blocks = backbone_blocks(module.backbone)
    owner = {p.rsplit(".", 1)[0]: b.name for b in blocks for p in b.params}
    out: dict[str, dict[str, torch.Tensor]] = {b.name: {} for b in blocks}
    for key, tensor in state.items():
        out[owner[key.rsplit(".", 1)[0]]][key] = tensor
    return out


def changed(before: dict[str, torch.Tensor], after: dict[str, torch.Tensor], kind: str) -> set[str]:
    return {k for k in before if k.endswith(kind) and not torch.equal(before[k], after[k])}


def names(groups: list[tuple[str, float]]) -> list[str]:
    return [name for name, _ in groups]


def lrs(groups: list[tuple[str, float]]) -> dict[str, float]:
    return dict(groups)


def test_blocks_of_the_tiny_backbone_are_timms_stages() -> None:
    assert [b.name for b in backbone_blocks(tiny().backbone)] == BLOCKS


def test_freeze_trains_only_the_head_and_keeps_every_backbone_tensor(tmp_path: Path) -> None:
    module = tiny()
    before = block_state(module)
    _, rec = fit_recording(module, Freeze(), tmp_path)
    after = block_state(module)
    for epoch in range(3):
        assert not any(rec.grads[epoch].values())
        assert names(rec.groups[epoch]) == ["head"]
        assert not any(rec.bn_training[epoch].values())
    assert [lrs(rec.groups[e])["head"] for e in range(3)] == pytest.approx([LR, LR / 2, LR / 4])
    for block in BLOCKS:
        assert all(torch.equal(before[block][k], after[block][k]) for k in before[block]), block


def test_partial_trains_the_last_blocks_at_the_backbone_lr(tmp_path: Path) -> None:
    module = tiny()
    before = block_state(module)
    _, rec = fit_recording(module, Partial(unfreeze_last=2), tmp_path)
    after = block_state(module)
    for epoch in range(3):
        assert rec.grads[epoch] == {b: b in ("stage4", "stage5") for b in BLOCKS}
        assert names(rec.groups[epoch]) == ["head", "backbone.stage4", "backbone.stage5"]
        head = LR / 2**epoch
        assert [lr for _, lr in rec.groups[epoch]] == pytest.approx([head, head * 0.3, head * 0.3])
    for block in BLOCKS:
        if block in ("stage4", "stage5"):
            assert changed(before[block], after[block], "weight"), block
            assert changed(before[block], after[block], "running_mean"), block
        else:
            assert all(torch.equal(before[block][k], after[block][k]) for k in before[block]), block
    # frozen blocks' BatchNorm stayed in eval mode while the trained blocks' trained
    modes = rec.bn_training[0]
    assert {n for n, training in modes.items() if training} == {
        n for n in modes if n.startswith(("blocks.3", "blocks.4", "conv_head", "bn2"))
    }


def test_gradual_unfreezes_the_whole_backbone_at_its_epoch(tmp_path: Path) -> None:
    module = tiny()
    before = block_state(module)
    trainer, rec = fit_recording(module, Gradual(unfreeze_at_epoch=1, unfreeze_last=None), tmp_path)
    after = block_state(module)
    assert not any(rec.grads[0].values()) and names(rec.groups[0]) == ["head"]
    for epoch in (1, 2):
        assert all(rec.grads[epoch].values())
        assert names(rec.groups[epoch]) == ["head"] + [f"backbone.{b}" for b in BLOCKS]
        head = LR / 2**epoch
        assert [lr for _, lr in rec.groups[epoch]] == pytest.approx([head] + [head * 0.3] * len(BLOCKS))
    for block in BLOCKS:
        assert changed(before[block], after[block], "weight"), block
    optimizer = trainer.optimizers[0]
    assert {id(p) for g in optimizer.param_groups for p in g["params"]} == {
        id(p) for p in module.parameters()
    }


def test_gradual_by_default_warms_the_head_up_then_trains_the_last_block(tmp_path: Path) -> None:
    module = tiny()
    before = block_state(module)
    _, rec = fit_recording(module, Gradual(), tmp_path)
    after = block_state(module)
    assert [sorted(b for b, g in rec.grads[e].items() if g) for e in range(3)] == [[], ["stage5"], ["stage5"]]
    assert names(rec.groups[1]) == ["head", "backbone.stage5"]
    assert changed(before["stage5"], after["stage5"], "weight")
    assert not changed(before["stage4"], after["stage4"], "weight")


def test_gradual_unfreeze_last_sets_how_many_blocks_join(tmp_path: Path) -> None:
    _, rec = fit_recording(tiny(), Gradual(unfreeze_at_epoch=2, unfreeze_last=2), tmp_path)
    assert [sorted(b for b, g in rec.grads[e].items() if g) for e in range(3)] == [
        [],
        [],
        ["stage4", "stage5"],
    ]


def test_gradual_milestones_unfreeze_one_block_each_from_the_top(tmp_path: Path) -> None:
    module = tiny()
    _, rec = fit_recording(module, Gradual(milestones=[1, 2]), tmp_path)
    assert [sorted(b for b, g in rec.grads[e].items() if g) for e in range(3)] == [
        [],
        ["stage5"],
        ["stage4", "stage5"],
    ]
    assert names(rec.groups[2]) == ["head", "backbone.stage5", "backbone.stage4"]
    assert lrs(rec.groups[2])["backbone.stage4"] == pytest.approx(LR / 4 * 0.3)
    assert lrs(rec.groups[2])["backbone.stage5"] == pytest.approx(LR / 4 * 0.3)


def test_full_trains_everything_with_layer_decay(tmp_path: Path) -> None:
    module = tiny()
    before = block_state(module)
    _, rec = fit_recording(module, Full(backbone_lr_ratio=0.5, layer_decay=0.5), tmp_path, epochs=2)
    after = block_state(module)
    for block in BLOCKS:
        assert changed(before[block], after[block], "running_mean"), block
        assert changed(before[block], after[block], "weight"), block
    for epoch in range(2):
        assert all(rec.grads[epoch].values())
        head = LR / 2**epoch
        expected = [head] + [head * 0.5 * 0.5 ** (len(BLOCKS) - 1 - i) for i in range(len(BLOCKS))]
        assert [lr for _, lr in rec.groups[epoch]] == pytest.approx(expected)
    assert all(rec.bn_training[0].values())


def test_bn_train_policy_trains_batchnorm_inside_frozen_blocks(tmp_path: Path) -> None:
    module = tiny()
    before = block_state(module)
    _, rec = fit_recording(module, Freeze(bn="train"), tmp_path)
    after = block_state(module)
    assert names(rec.groups[0]) == ["head"] + [f"backbone.{b}.bn" for b in BLOCKS]
    assert all(rec.bn_training[0].values())
    for block in BLOCKS:
        convs = {k for k in before[block] if ".conv" in k or k.startswith("conv")}
        assert convs and all(torch.equal(before[block][k], after[block][k]) for k in convs), block
        assert changed(before[block], after[block], "running_mean"), block
        assert changed(before[block], after[block], "bn1.weight") or changed(
            before[block], after[block], "bn2.weight"
        ), block


def test_bn_frozen_policy_holds_against_train_calls() -> None:
    module = tiny()
    strategy = Partial(unfreeze_last=1)
    strategy.freeze_before_training(module)
    module.train()
    frozen = [
        m for n, m in module.backbone.named_modules() if isinstance(m, _BatchNorm) and n.startswith("bn1")
    ]
    assert frozen and not any(m.training for m in frozen)
    assert not any(p.requires_grad for m in frozen for p in m.parameters())
    x = torch.randn(4, 3, 32, 32) * 3
    buffers = copy.deepcopy(frozen[0].state_dict())
    module(x)
    assert all(torch.equal(v, frozen[0].state_dict()[k]) for k, v in buffers.items())


@pytest.mark.slow
def test_bn_fixed_stats_trains_the_unfrozen_blocks_with_their_pretrained_statistics(tmp_path: Path) -> None:
    """The trained blocks' weights and BatchNorm affine weights change, their running statistics
    do not, and their BatchNorm stays in eval mode through every train() call; frozen blocks are
    as with bn=frozen."""
    module = tiny()
    before = block_state(module)
    _, rec = fit_recording(
        module, Gradual(unfreeze_at_epoch=1, unfreeze_last=None, bn="fixed_stats"), tmp_path, epochs=2
    )
    after = block_state(module)
    assert not any(rec.bn_training[0].values()) and not any(rec.bn_training[1].values())
    assert rec.grads[0] == dict.fromkeys(BLOCKS, False) and rec.grads[1] == dict.fromkeys(BLOCKS, True)
    for block in BLOCKS:
        assert not changed(before[block], after[block], "running_mean"), block
        assert not changed(before[block], after[block], "running_var"), block
        assert changed(before[block], after[block], "weight"), block


def test_dropout_among_frozen_parameters_is_held_in_eval() -> None:
    block = nn.Sequential(nn.Linear(4, 4), nn.Dropout(0.5), nn.BatchNorm1d(4))
    block[0].weight.requires_grad_(False)
    block[0].bias.requires_grad_(False)
    block.train()
    hold_frozen_in_eval(block)
    assert not block[0].training and not block[1].training and block[2].training


def test_weight_decay_spares_norms_and_biases(tmp_path: Path) -> None:
    module = tiny(optimizer=ADAMW)
    trainer, rec = fit_recording(module, Partial(unfreeze_last=1), tmp_path, epochs=1)
    groups = {g["name"]: g for g in trainer.optimizers[0].param_groups}
    assert set(groups) == {"head", "head.no_decay", "backbone.stage5", "backbone.stage5.no_decay"}
    assert groups["head"]["weight_decay"] == 0.05 and groups["head.no_decay"]["weight_decay"] == 0.0
    assert all(p.ndim == 1 for p in groups["backbone.stage5.no_decay"]["params"])
    assert all(p.ndim > 1 for p in groups["backbone.stage5"]["params"])
    assert lrs(rec.groups[0])["backbone.stage5.no_decay"] == pytest.approx(LR * 0.3)


def test_one_cycle_steps_per_batch_and_unfrozen_groups_follow_the_head(tmp_path: Path) -> None:
    module = tiny(scheduler=ONECYCLE)
    _, rec = fit_recording(module, Gradual(unfreeze_at_epoch=1, unfreeze_last=None), tmp_path)
    heads = [lrs(step)["head"] for step in rec.step_groups]
    assert len(set(heads)) == len(heads) == 9  # a new lr every batch
    assert max(heads) == pytest.approx(LR, rel=0.05)
    for step in rec.step_groups[3:]:
        values = lrs(step)
        assert all(values[f"backbone.{b}"] == pytest.approx(values["head"] * 0.3) for b in BLOCKS)


@pytest.mark.slow
@pytest.mark.parametrize("resume_after", [0, 1])
def test_gradual_resumes_before_and_after_the_unfreeze(tmp_path: Path, resume_after: int) -> None:
    """Stop after epoch `resume_after` (before / after the unfreeze at epoch 1), resume to 3 epochs:
    the param groups, lrs and trainable blocks match an uninterrupted run, and the optimizer's
    momentum for the backbone survives."""
    _, straight = fit_recording(
        tiny(), Gradual(unfreeze_at_epoch=1, unfreeze_last=None), tmp_path / "straight", epochs=3
    )
    fit_recording(
        tiny(), Gradual(unfreeze_at_epoch=1, unfreeze_last=None), tmp_path / "a", epochs=3, checkpoints=True
    )
    checkpoint = str(next((tmp_path / "a" / "ckpt").glob(f"epoch={resume_after}*.ckpt")))
    resumed_model = tiny()
    trainer, resumed = fit_recording(
        resumed_model, Gradual(unfreeze_at_epoch=1, unfreeze_last=None), tmp_path / "b", ckpt_path=checkpoint
    )
    for epoch in range(resume_after + 1, 3):
        assert resumed.grads[epoch] == straight.grads[epoch]
        assert names(resumed.groups[epoch]) == names(straight.groups[epoch])
        assert [lr for _, lr in resumed.groups[epoch]] == pytest.approx(
            [lr for _, lr in straight.groups[epoch]]
        )
    optimizer = trainer.optimizers[0]
    backbone = [p for g in optimizer.param_groups[1:] for p in g["params"]]
    assert len(backbone) == len(list(resumed_model.backbone.parameters()))
    assert all("momentum_buffer" in optimizer.state[p] for p in backbone)


@pytest.mark.parametrize(
    ("strategy", "message"),
    [
        (lambda: Freeze(bn="sometimes"), "finetune.bn='sometimes'"),
        (lambda: Partial(unfreeze_last=0), "finetune.unfreeze_last=0"),
        (lambda: Gradual(milestones=[2, 1]), "increasing"),
        (lambda: Gradual(unfreeze_at_epoch=0), "1 or more"),
        (lambda: Gradual(unfreeze_last=0), "finetune.unfreeze_last=0"),
        (lambda: Full(layer_decay=1.5), "finetune.layer_decay=1.5"),
        (lambda: Full(backbone_lr_ratio=0), "finetune.backbone_lr_ratio=0"),
    ],
)
def test_bad_strategy_settings_are_config_errors(strategy, message: str) -> None:
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace(".", r"\.")):
        strategy()


@pytest.mark.parametrize(
    ("strategy", "message"),
    [
        (Partial(unfreeze_last=7), "has 6 blocks"),
        (Gradual(milestones=[1, 2, 3, 4, 5, 6, 7]), "has only 6 blocks"),
        (Gradual(unfreeze_last=7), "has 6 blocks"),
    ],
)
def test_strategies_that_cannot_apply_to_the_run_are_config_errors(
    tmp_path: Path, strategy: L.Callback, message: str
) -> None:
    with pytest.raises(ConfigError, match=message):
        fit_recording(tiny(), strategy, tmp_path, epochs=3)


def test_an_unfreeze_after_the_last_epoch_is_refused(tmp_path: Path) -> None:
    with pytest.raises(
        ConfigError, match="unfreezes at epoch 3, but this run stops after trainer.max_epochs=3"
    ):
        fit_recording(tiny(), Gradual(unfreeze_at_epoch=3), tmp_path, epochs=3)


def test_gradual_with_bn_train_trains_batchnorm_first_and_the_rest_at_the_unfreeze(tmp_path: Path) -> None:
    module = tiny()
    before = block_state(module)

    _, rec = fit_recording(
        module, Gradual(unfreeze_at_epoch=1, unfreeze_last=None, bn="train"), tmp_path, epochs=2
    )
    assert not any(rec.grads[0].values()) and all(rec.grads[1].values())
    assert names(rec.groups[0]) == ["head"] + [f"backbone.{b}.bn" for b in BLOCKS]
    assert names(rec.groups[1]) == names(rec.groups[0]) + [f"backbone.{b}" for b in BLOCKS]
    assert all(rec.bn_training[0].values()) and all(rec.bn_training[1].values())
    head = LR / 2
    assert [lr for _, lr in rec.groups[1]][1:] == pytest.approx([head * 0.3] * (2 * len(BLOCKS)))
    after = block_state(module)
    for block in BLOCKS:
        assert changed(before[block], after[block], "running_mean"), block
        convs = {k for k, v in before[block].items() if v.ndim == 4}
        assert convs and any(not torch.equal(before[block][k], after[block][k]) for k in convs), block


class SaveAt(L.Callback):
    """Write the training state at the start of step `step`, as an interrupt there would."""

    def __init__(self, step: int, path: Path) -> None:
        self.step, self.path = step, path

    def on_train_batch_start(self, trainer: L.Trainer, *args) -> None:
        if trainer.global_step == self.step:
            trainer.save_checkpoint(self.path)


class StepState(L.Callback):
    """At every step: which backbone parameters train, every BatchNorm's mode, the param groups."""

    def __init__(self) -> None:
        self.steps: dict[int, tuple] = {}

    def on_train_batch_start(self, trainer: L.Trainer, pl_module, batch, batch_idx: int) -> None:
        groups = [
            (g["name"], g["lr"], sorted(id_names(pl_module)[id(p)] for p in g["params"]))
            for g in trainer.optimizers[0].param_groups
        ]
        trainable = sorted(n for n, p in pl_module.backbone.named_parameters() if p.requires_grad)
        modes = {n: m.training for n, m in pl_module.backbone.named_modules() if isinstance(m, _BatchNorm)}
        self.steps[trainer.global_step] = (trainable, modes, groups)


def id_names(module: nn.Module) -> dict[int, str]:
    return {id(p): n for n, p in module.named_parameters()}


@pytest.mark.slow
@pytest.mark.parametrize(
    "strategy",
    [
        lambda: Freeze(),
        lambda: Partial(unfreeze_last=2),
        lambda: Gradual(unfreeze_at_epoch=1, unfreeze_last=None),
        lambda: Gradual(milestones=[1, 2]),
        lambda: Gradual(unfreeze_at_epoch=2, unfreeze_last=None, bn="train"),
        lambda: Full(),
    ],
    ids=["freeze", "partial", "gradual", "gradual-milestones", "gradual-bn-train", "full"],
)
def test_a_mid_epoch_resume_trains_what_the_uninterrupted_run_trains(tmp_path: Path, strategy) -> None:
    """Saved during epoch 2 (3 steps an epoch), after every unfreeze: from the resumed step on,
    the trainable parameters, BatchNorm modes and param groups are the straight run's."""
    straight, saved = StepState(), tmp_path / "mid.ckpt"
    fit(tiny(), tmp_path / "a", [strategy(), straight, SaveAt(7, saved)], epochs=3)
    resumed = StepState()
    fit(tiny(), tmp_path / "b", [strategy(), resumed], epochs=3, ckpt_path=str(saved))
    assert min(resumed.steps) == 7 and max(resumed.steps) == max(straight.steps) == 8
    for step in resumed.steps:
        assert resumed.steps[step] == straight.steps[step], f"step {step}"
