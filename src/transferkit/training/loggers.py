"""Lightning's loggers, set up for local, offline-first use and for resumed runs. MLflow and W&B
are extras (`transferkit[mlflow]`, `transferkit[wandb]`), imported when their logger is built."""

from __future__ import annotations

import csv
import netrc
import os
import warnings
from pathlib import Path
from typing import Any

from lightning.pytorch.loggers import CSVLogger as LightningCSVLogger
from lightning.pytorch.loggers import MLFlowLogger as LightningMLFlowLogger
from lightning.pytorch.loggers import WandbLogger as LightningWandbLogger
from lightning.pytorch.loggers.logger import rank_zero_experiment

from transferkit.extras import require


class CSVLogger(LightningCSVLogger):
    """Lightning's CSVLogger, except that a run resumed in its directory keeps the rows it
    logged before (Lightning's deletes metrics.csv) and appends to them; so Lightning's warning
    that the run directory's files "will be deleted" is false, and left out."""

    @property
    @rank_zero_experiment
    def experiment(self) -> Any:
        if self._experiment is not None:
            return self._experiment
        path = os.path.join(self.log_dir, "metrics.csv")
        header, rows = None, []
        if os.path.isfile(path):
            with open(path, newline="") as f:
                reader = csv.DictReader(f)
                header, rows = reader.fieldnames, list(reader)
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=r"Experiment logs directory .* exists and is not empty")
            experiment = super().experiment  # removes metrics.csv
        if header:
            with open(path, "w", newline="") as f:
                writer = csv.DictWriter(f, fieldnames=header)
                writer.writeheader()
                writer.writerows(rows)
            experiment.metrics_keys = sorted(header)
        return experiment


class MLFlowLogger(LightningMLFlowLogger):
    """Lightning's MLFlowLogger on a local store, no server: runs in `store_dir/mlflow.db` (the
    SQLite backend MLflow recommends over its deprecated file store), artifacts beside it.
    Browse with `mlflow ui --backend-store-uri sqlite:///<store_dir>/mlflow.db`."""

    def __init__(self, store_dir: str | os.PathLike, **kwargs: Any) -> None:
        require("mlflow", extra="mlflow", feature="logger=mlflow (and logger=many)")
        store = Path(store_dir).resolve()
        store.mkdir(parents=True, exist_ok=True)
        super().__init__(
            tracking_uri=f"sqlite:///{store / 'mlflow.db'}",
            artifact_location=str(store / "artifacts"),
            **kwargs,
        )


def wandb_logged_in() -> bool:
    """An API key in the environment or in ~/.netrc (what `wandb login` writes)."""
    if os.environ.get("WANDB_API_KEY"):
        return True
    try:
        return netrc.netrc().authenticators("api.wandb.ai") is not None
    except (OSError, netrc.NetrcParseError):
        return False


class WandbLogger(LightningWandbLogger):
    """Lightning's WandbLogger, offline (files under save_dir, `wandb sync` later) unless
    logged in; `offline: true/false` forces either."""

    def __init__(self, offline: bool | str = "auto", **kwargs: Any) -> None:
        require("wandb", extra="wandb", feature="logger=wandb")
        super().__init__(offline=(not wandb_logged_in()) if offline == "auto" else bool(offline), **kwargs)

    def close(self) -> None:
        """End the W&B run once everything is logged (Lightning's finalize leaves it open), so an
        offline run is complete on disk for `wandb sync`."""
        if self._experiment is not None:
            self._experiment.finish()
