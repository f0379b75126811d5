"""Resume: ckpt_path=last (or a path) continues a run in its own directory; SIGTERM, SIGUSR1 and
Ctrl-C save last.ckpt and exit non-zero with the command that resumes."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import lightning as L
import pytest
import torch
from conftest import ROOT, compose_task, offline_env, tiny_run
from helpers import SendSignal, fit, tiny

from transferkit.errors import ConfigError, exit_code
from transferkit.runs.directories import resolve_checkpoint, settle
from transferkit.tasks.train import train
from transferkit.training.finetune import Freeze
from transferkit.training.interrupts import CheckpointOnInterrupt, Interrupted


def fake_run(runs: Path, name: str, mtime: float) -> Path:
    run = runs / name
    (run / ".hydra").mkdir(parents=True)
    (run / "checkpoints").mkdir()
    last = run / "checkpoints" / "last.ckpt"
    last.write_bytes(b"ckpt")
    os.utime(last, (mtime, mtime))
    return run


def test_ckpt_path_last_is_the_newest_run_and_the_run_continues_in_its_directory(tmp_path: Path) -> None:
    runs = tmp_path / "logs" / "train" / "runs"
    fake_run(runs, "2026-01-01_old", 1_000)
    newest = fake_run(runs, "2026-01-02_new", 2_000)
    fake_run(runs, "2026-01-03_touched_earlier", 1_500)
    cfg = compose_task("train", tmp_path, ["ckpt_path=last"])
    settle(cfg, *resolve_checkpoint(cfg), seed=0)
    assert cfg.ckpt_path == str(newest / "checkpoints" / "last.ckpt")
    assert cfg.paths.output_dir == str(newest.resolve())
    assert cfg.callbacks.model_checkpoint.dirpath == str(newest.resolve() / "checkpoints")  # follows


def test_ckpt_path_last_prefers_the_given_run_dir(tmp_path: Path) -> None:
    runs = tmp_path / "logs" / "train" / "runs"
    fake_run(runs, "newer", 9_000)
    cfg = compose_task("train", tmp_path, ["ckpt_path=last"])
    own = fake_run(tmp_path, "run_parent", 1_000)  # compose_task's run dir is tmp_path/run
    (tmp_path / "run" / "checkpoints").mkdir(parents=True, exist_ok=True)
    (own / "checkpoints" / "last.ckpt").rename(tmp_path / "run" / "checkpoints" / "last.ckpt")
    assert resolve_checkpoint(cfg) == (
        str(tmp_path / "run" / "checkpoints" / "last.ckpt"),
        str((tmp_path / "run").resolve()),
    )


def test_resume_refuses_what_is_not_there(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="ckpt_path=last: no run in .* has checkpoints/last.ckpt"):
        resolve_checkpoint(compose_task("train", tmp_path, ["ckpt_path=last"]))
    with pytest.raises(ConfigError, match="ckpt_path=.*nope.ckpt does not exist"):
        resolve_checkpoint(compose_task("train", tmp_path, [f"ckpt_path={tmp_path / 'nope.ckpt'}"]))


def test_sigusr1_saves_last_ckpt_after_the_current_batch(tmp_path: Path) -> None:
    model = tiny()
    saver = CheckpointOnInterrupt(tmp_path / "checkpoints")
    with pytest.raises(Interrupted) as raised:
        fit(model, tmp_path, callbacks=(Freeze(), saver, SendSignal(4)), epochs=5)
    assert exit_code(raised.value) == 128 + signal.SIGUSR1
    checkpoint = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=True)
    assert checkpoint["global_step"] == 5  # batch 4 finished, then it stopped
    assert signal.getsignal(signal.SIGUSR1) in (signal.SIG_DFL, None)  # the handler is put back


class RngAtStart(L.Callback):
    """The torch generator's state as training starts (after any resume)."""

    def on_train_start(self, trainer: L.Trainer, pl_module) -> None:
        self.state = torch.get_rng_state()


@pytest.mark.slow
def test_a_checkpoint_with_curves_and_generators_at_its_top_level_still_resumes_them(tmp_path: Path) -> None:
    """Checkpoints written before the module's state callbacks kept the curves and the random
    generators' states at their top level: a resume from one goes on with both, as from a new one."""
    trainer = fit(tiny(), tmp_path / "a", callbacks=(Freeze(),), epochs=1)
    trainer.save_checkpoint(tmp_path / "new.ckpt")
    old = torch.load(tmp_path / "new.ckpt", weights_only=True)
    old["history"], old["rng_states"] = (
        old["callbacks"].pop("EpochHistory"),
        old["callbacks"].pop("RandomState"),
    )
    torch.save(old, tmp_path / "old.ckpt")
    resumed = {}
    for name, seed in (("new", 1), ("old", 2)):
        torch.manual_seed(seed)  # whatever the generators were, the checkpoint's go on
        model, starts = tiny(), RngAtStart()
        fit(
            model,
            tmp_path / name,
            callbacks=(Freeze(), starts),
            epochs=2,
            ckpt_path=str(tmp_path / f"{name}.ckpt"),
        )
        resumed[name] = (model.history, starts.state)
        assert [len(model.history[stage]) for stage in ("train", "val")] == [2, 2]
    assert resumed["old"][0] == resumed["new"][0]
    assert torch.equal(resumed["old"][1], resumed["new"][1])


def val_epochs(run: Path) -> list[int]:
    with open(run / "metrics.csv", newline="") as f:
        return [int(r["epoch"]) for r in csv.DictReader(f) if r.get("val/acc")]


@pytest.mark.slow
def test_a_sigterm_ends_the_command_with_a_resume_hint_and_the_run_resumes_in_its_own_directory(
    compose_train, tmp_path: Path, image_folder: Path
) -> None:
    """A real `python train.py` in a given hydra.run.dir gets SIGTERM from outside (SIGUSR1 and
    Ctrl-C: in process above); resuming from its last.ckpt continues that directory to the end."""
    run = tmp_path / "my_run"
    overrides = [*tiny_run(image_folder, epochs=4), "data.batch_size=2", "features.cache=false"]
    args = [sys.executable, str(ROOT / "train.py"), f"paths.root_dir={tmp_path}", *overrides]
    proc = subprocess.Popen(
        [*args, f"hydra.run.dir={run}"],
        cwd=tmp_path,
        env=offline_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    deadline = time.time() + 120
    while not (run / "checkpoints" / "last.ckpt").is_file() and time.time() < deadline:  # epoch 0 is done
        time.sleep(0.1)
    proc.send_signal(signal.SIGTERM)
    out = proc.communicate(timeout=120)[0].decode()
    assert proc.returncode == 128 + signal.SIGTERM, out[-3000:]
    assert "Training interrupted by" in out and "Resume with: python train.py" in out and "ckpt_path=" in out
    assert "Traceback" not in out
    assert (run / ".hydra" / "config.yaml").is_file() and (run / "train.log").is_file()
    assert not (run / "results.json").exists()
    interrupted_at = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)["epoch"]
    assert interrupted_at < 3

    resumed = train(compose_train(tmp_path, [*overrides, f"ckpt_path={run}/checkpoints/last.ckpt"]))
    assert resumed["epochs"] == 4 and json.loads((run / "results.json").read_text()) == resumed
    assert resumed["best_model_path"].startswith(str(run.resolve()))  # continued in its own directory
    assert sorted(set(val_epochs(run)) - {4}) == list(range(4))  # the history before the signal is kept


def epoch_rows(run: Path, metric: str) -> list[int]:
    with open(run / "metrics.csv", newline="") as f:
        return [int(row["epoch"]) for row in csv.DictReader(f) if row.get(metric)]


@pytest.mark.slow
def test_last_ckpt_is_the_final_epoch_whatever_the_metric_did_and_a_resume_adds_no_duplicate_rows(
    compose_train, tmp_path: Path, tiny_overrides: list[str]
) -> None:
    """lr 1e-9: val/acc never improves after epoch 0, so best.ckpt stays at epoch 0; last.ckpt
    must still be epoch 3 of 4, and resuming from it to 6 epochs logs each epoch once."""
    from transferkit.tasks.train import train

    still = [*tiny_overrides, "optimizer.lr=1e-9", "trainer.max_epochs=4"]
    train(compose_train(tmp_path, still))
    run = tmp_path / "run"
    best = torch.load(run / "checkpoints" / "best.ckpt", weights_only=True)
    last = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)
    assert (best["epoch"], last["epoch"]) == (0, 3)
    assert (
        epoch_rows(run, "val/acc") == epoch_rows(run, "train/loss") == [0, 1, 2, 3]
    )  # no final-validate row
    train(compose_train(tmp_path, [*still, "trainer.max_epochs=6", "ckpt_path=last"]))
    assert epoch_rows(run, "val/acc") == epoch_rows(run, "train/loss") == [0, 1, 2, 3, 4, 5]
    last = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)
    assert last["epoch"] == 5
    history = last["callbacks"]["EpochHistory"]
    assert [len(history[stage]) for stage in ("train", "val")] == [6, 6]  # the curves lack no epoch


class OracleLabels(L.Callback):
    """Relabel each val batch with the model's own predictions: val/acc is 1.0."""

    def on_validation_batch_start(self, trainer: L.Trainer, pl_module, batch, batch_idx: int) -> None:
        inputs, targets = batch
        with torch.no_grad():
            logits = pl_module.head(inputs) if inputs.ndim == 2 else pl_module(inputs)
        targets.copy_(logits.argmax(1))


@pytest.mark.slow
def test_val_acc_best_survives_a_resume(compose_train, tmp_path: Path, tiny_overrides: list[str]) -> None:
    """The first run validates perfectly (oracle labels), the resumed epoch at chance: the best
    so far is still the first run's."""
    from transferkit.tasks.train import train

    oracle = ["+callbacks.oracle._target_=test_resume.OracleLabels", "trainer.max_epochs=2"]
    train(compose_train(tmp_path, [*tiny_overrides, *oracle]))
    train(compose_train(tmp_path, [*tiny_overrides, "trainer.max_epochs=3", "ckpt_path=last"]))
    with open(tmp_path / "run" / "metrics.csv", newline="") as f:
        rows = {int(r["epoch"]): r for r in csv.DictReader(f) if r.get("val/acc")}
    assert [float(rows[e]["val/acc"]) for e in (0, 1)] == [1.0, 1.0] and float(rows[2]["val/acc"]) < 1.0
    assert float(rows[2]["val/acc_best"]) == 1.0


@pytest.mark.slow
def test_seed_null_draws_a_seed_that_eval_and_a_resume_read_again(compose_train, tmp_path: Path) -> None:
    """No val/ folder: val is split off train/ by the seed. seed=null draws one; the checkpoint
    records it, so eval's split and a resumed run's are the training run's."""
    from conftest import make_image_folder, tiny_run

    from transferkit.config.build import recorded_datamodule
    from transferkit.data.folders import find_splits
    from transferkit.runs.checkpoints import load_model
    from transferkit.tasks.train import train

    data = make_image_folder(tmp_path / "data", splits={"train": 10})
    first = train(compose_train(tmp_path, [*tiny_run(data, epochs=1), "seed=null"]))
    seed = first["seed"]
    assert isinstance(seed, int)
    model = load_model(first["best_model_path"])
    assert model.data_config["seed"] == model.run_record["seed"] == seed
    drawn = find_splits(data, 0.2, seed).val
    assert [recorded_datamodule(None, model.data_config).splits.val for _ in range(2)] == [drawn, drawn]
    os.environ.pop("PL_GLOBAL_SEED", None)  # the resume must read the seed from the checkpoint
    resumed = train(compose_train(tmp_path, [*tiny_run(data, epochs=2), "seed=null", "ckpt_path=last"]))
    assert resumed["seed"] == seed and resumed["epochs"] == 2


@pytest.mark.slow
@pytest.mark.parametrize(
    ("override", "named"),
    [
        ("optimizer.lr=0.5", "optimizer.lr: 0.05 there, 0.5 here"),
        ("data.image_size=40", "data.image_size: 32 there, 40 here"),
        ("finetune=partial", "finetune._target_"),
        ("model.head.dropout=0.5", "model.head.dropout"),
        ("tune_lr=true", "tune_lr=true with ckpt_path"),
    ],
)
def test_a_resume_that_would_train_something_else_is_refused(
    compose_train, tmp_path: Path, tiny_overrides: list[str], override: str, named: str
) -> None:
    """Lightning would restore the old optimizer (lr included) and quietly mix the two setups."""
    from transferkit.tasks.train import train

    train(compose_train(tmp_path, [*tiny_overrides, "trainer.max_epochs=1"]))
    resume = [*tiny_overrides, "trainer.max_epochs=2", "ckpt_path=last", override]
    with pytest.raises(ConfigError) as refused:
        train(compose_train(tmp_path, resume))
    assert named in str(refused.value)


@pytest.mark.slow
def test_a_gradual_checkpoint_from_before_unfreeze_last_resumes_only_as_it_trained(
    compose_train, tmp_path: Path, tiny_overrides: list[str]
) -> None:
    """Before finetune.unfreeze_last, gradual unfroze the whole backbone: resuming such a
    checkpoint under the new default (one block) would train something else, so it is refused;
    with unfreeze_last=null, as that run trained, it resumes (and the crop it had is the default)."""
    from transferkit.model.module import RECORD_KEY
    from transferkit.tasks.train import train

    gradual = [*tiny_overrides, "finetune=gradual", "finetune.unfreeze_last=null"]
    train(compose_train(tmp_path, [*gradual, "trainer.max_epochs=2"]))
    last = tmp_path / "run" / "checkpoints" / "last.ckpt"
    old = torch.load(last, weights_only=True)
    del old[RECORD_KEY]["finetune"]["unfreeze_last"], old[RECORD_KEY]["data"]["crop_scale"]
    torch.save(old, last)
    default = [*tiny_overrides, "finetune=gradual", "trainer.max_epochs=3", "ckpt_path=last"]
    with pytest.raises(ConfigError, match="finetune.unfreeze_last: None there, 1 here"):
        train(compose_train(tmp_path, default))
    results = train(compose_train(tmp_path, [*default, "finetune.unfreeze_last=null"]))
    assert results["epochs"] == 3


def test_last_ckpt_linked_to_best_ckpt_is_written_as_a_file_of_its_own(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A write into one name of a hard link would change the other: the save unshares it first
    (Lightning writes in place where its temporary file is on another filesystem)."""
    from transferkit.files import link_or_copy
    from transferkit.training.callbacks import unshare

    best, last = tmp_path / "best.ckpt", tmp_path / "last.ckpt"
    best.write_bytes(b"epoch 0")
    link_or_copy(best, last)
    assert os.stat(best).st_ino == os.stat(last).st_ino
    unshare(last)
    last.write_bytes(b"epoch 1")
    assert best.read_bytes() == b"epoch 0"
    monkeypatch.setattr(os, "link", lambda *args: (_ for _ in ()).throw(OSError("no hard links here")))
    link_or_copy(best, last)  # a copy where the filesystem has no hard links
    assert last.read_bytes() == b"epoch 0" and os.stat(best).st_ino != os.stat(last).st_ino


@pytest.mark.slow
def test_a_resume_from_a_last_ckpt_keeping_the_backbone_by_reference_equals_the_whole_run(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Gradual: epoch 0's last.ckpt (one file with best.ckpt) keeps the whole frozen backbone by
    reference; resumed, epoch 1 trains the last block from it exactly as the whole run did, and
    the final checkpoint keeps that block's tensors (the ones that trained) in itself."""
    from conftest import TINY_MODEL
    from helpers import SGD
    from test_backbone_reference import backbone_keys, ship_tiny_weights

    from transferkit.backbones.blocks import backbone_blocks
    from transferkit.model.module import TransferModule
    from transferkit.training.callbacks import ModelCheckpoint
    from transferkit.training.finetune import Gradual

    ship_tiny_weights(monkeypatch, tmp_path / "tiny_weights.pth")

    def model() -> TransferModule:
        torch.manual_seed(0)
        module = TransferModule(TINY_MODEL, ["a", "b", "c"], weights="shipped", optimizer=SGD)
        module.keep_backbone_by_reference()
        return module

    def saver(run: str) -> ModelCheckpoint:
        return ModelCheckpoint(
            tmp_path / run, "best", "val/acc", mode="max", save_last=True, enable_version_counter=False
        )

    whole = model()
    fit(whole, tmp_path / "whole", callbacks=(Gradual(), saver("whole")), epochs=2)
    fit(model(), tmp_path / "first", callbacks=(Gradual(), saver("first")), epochs=2, max_steps=3)  # epoch 0
    last = tmp_path / "first" / "last.ckpt"
    assert os.stat(last).st_ino == os.stat(tmp_path / "first" / "best.ckpt").st_ino
    assert backbone_keys(last) == []
    resumed = model()
    fit(resumed, tmp_path / "resumed", callbacks=(Gradual(),), epochs=2, ckpt_path=str(last))
    for name, tensor in whole.state_dict().items():
        assert torch.equal(resumed.state_dict()[name], tensor), name
    trained = {f"backbone.{p}" for p in backbone_blocks(whole.backbone)[-1].params}
    assert trained <= set(backbone_keys(tmp_path / "whole" / "last.ckpt")) < set(whole.state_dict())


@pytest.mark.slow
def test_a_resume_that_would_change_the_feature_cache_precision_or_trainer_is_refused_naming_the_keys(
    compose_train, tmp_path: Path, tiny_overrides: list[str]
) -> None:
    """A cached run resumed uncached would train epoch 1 on augmented images and report one
    augmentation for the whole run; other views or precision would build another cache mid-run.
    Where the cache lives may change; a limit it no longer fits under is refused as what it
    changes: the augmentation."""
    from transferkit.tasks.train import train

    first = train(compose_train(tmp_path, [*tiny_overrides, "trainer.max_epochs=1"]))
    assert first["feature_cache"] and first["augment"] is None and first["precision"] == "fp32"
    resume = [*tiny_overrides, "trainer.max_epochs=2", "ckpt_path=last"]
    refusals = {
        "features.cache=false": ["features.cache: 'auto' there, False here"],
        "features.views=3": ["features.views: 1 there, 3 here"],
        "features.precision=bf16": [
            "features.precision (as run): 'fp32' there, 'bf16' here",
            "Resume with the run's own settings (for the precision: features.precision=fp32)",
        ],
        "features.batch_size=16": ["features.batch_size: 4096 there, 16 here"],
        "features.max_gb=1e-9": ["trained on cached features of one view", "images under data.augment=basic"],
        "trainer.precision=bf16-mixed": ["trainer.precision: '32-true' there, 'bf16-mixed' here"],
        "trainer.accumulate_grad_batches=2": ["trainer.accumulate_grad_batches: 1 there, 2 here"],
    }
    for override, named in refusals.items():
        with pytest.raises(ConfigError) as refused:
            train(compose_train(tmp_path, [*resume, override]))
        assert all(part in str(refused.value) for part in named), (override, str(refused.value))
        assert "\n" not in str(refused.value)
    moved = train(compose_train(tmp_path, [*resume, f"features.dir={tmp_path / 'elsewhere'}"]))
    assert moved["epochs"] == 2 and moved["augment"] is None
    assert Path(moved["feature_cache"]).parent == tmp_path / "elsewhere"


@pytest.mark.slow
def test_a_resume_on_which_the_cache_would_now_fit_is_refused_before_building_it(
    compose_train, tmp_path: Path, tiny_overrides: list[str]
) -> None:
    """The run trained on augmented images (its cache did not fit): a resume where it fits would
    switch to cached features; it is refused before any feature is computed."""
    from transferkit.tasks.train import train

    cache_dir = tmp_path / "features"
    first = train(
        compose_train(
            tmp_path,
            [*tiny_overrides, "trainer.max_epochs=1", "features.max_gb=1e-9", f"features.dir={cache_dir}"],
        )
    )
    assert first["feature_cache"] is None and first["augment"] == "basic"
    resume = [*tiny_overrides, "trainer.max_epochs=2", "ckpt_path=last", f"features.dir={cache_dir}"]
    with pytest.raises(
        ConfigError, match=r"trained on images under data.augment=basic, but this run would train on cached"
    ):
        train(compose_train(tmp_path, resume))
    assert not cache_dir.exists() or not any(cache_dir.iterdir())
