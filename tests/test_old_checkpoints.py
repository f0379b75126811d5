"""A checkpoint written before the packages by noun (its `finetune._target_` names
`transferkit.finetune.Freeze`) still evaluates to its numbers, predicts, exports and resumes."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import ROOT, compose_task, make_image_folder

from transferkit.model.module import RECORD_KEY
from transferkit.runs.checkpoints import current_paths, load_model
from transferkit.tasks.eval import evaluate
from transferkit.tasks.export import export
from transferkit.tasks.predict import predict
from transferkit.tasks.train import train

OLD = ROOT / "tests" / "fixtures" / "lite0_frozen_2026-12-08.ckpt"
ITS_RUN = [
    "data=imagefolder", "data.image_size=64", "data.batch_size=8", "data.num_workers=0",
    "model=efficientnet_lite0", "trainer=cpu", "callbacks.rich_progress_bar=null",
    "callbacks.rich_model_summary=null", "seed=7",
]  # fmt: skip


def test_old_module_paths_are_read_as_today_s() -> None:
    record = torch.load(OLD, map_location="cpu", weights_only=True)[RECORD_KEY]
    assert record["finetune"]["_target_"] == "transferkit.finetune.Freeze"  # as it was written
    assert current_paths(record)["finetune"]["_target_"] == "transferkit.training.finetune.Freeze"
    assert current_paths({"a": ["transferkit.data.ImageFolderDataModule"]}) == {
        "a": ["transferkit.data.ImageFolderDataModule"]  # a path that did not move stays
    }
    assert load_model(OLD).run_record["finetune"]["_target_"] == "transferkit.training.finetune.Freeze"


@pytest.mark.slow
def test_an_old_checkpoint_evaluates_to_its_numbers_predicts_exports_and_resumes(tmp_path: Path) -> None:
    data = make_image_folder(tmp_path / "data", splits={"train": 12, "val": 4})  # the run's images
    evaluated = evaluate(compose_task("eval", tmp_path / "eval", [f"ckpt_path={OLD}", f"data.root={data}"]))
    assert evaluated["val/acc"] == pytest.approx(0.5833, abs=1e-4)
    assert evaluated["val/loss"] == pytest.approx(0.8972, abs=1e-4)
    output = tmp_path / "preds.csv"
    predict(
        compose_task(
            "predict", tmp_path / "predict", [f"ckpt_path={OLD}", f"input={data / 'val'}", f"output={output}"]
        )
    )
    rows = output.read_text().splitlines()
    assert len(rows) == 1 + 12 and rows[0].startswith("path,label,confidence")
    exported = export(
        compose_task(
            "export", tmp_path / "export", [f"ckpt_path={OLD}", "format=torchscript", f"parity.images={data}"]
        )
    )
    assert Path(exported["model"]).is_file()
    resumed = train(
        compose_task(
            "train",
            tmp_path / "train",
            [*ITS_RUN, f"data.root={data}", "trainer.max_epochs=2", f"ckpt_path={OLD}"],
        )
    )
    assert resumed["epochs"] == 2
