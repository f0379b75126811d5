"""The audit task: read every file once, run the backbone once (through the feature cache), then
look for leaks and duplicates, likely wrong labels and outliers, and write the report with the
list of images to train without."""

from __future__ import annotations

import logging
import shlex
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from transferkit.audit import stats
from transferkit.audit.duplicates import find_duplicates, is_leak
from transferkit.audit.exclude import suggested_exclusions
from transferkit.audit.features import image_features
from transferkit.audit.files import read_all
from transferkit.audit.items import all_items
from transferkit.audit.label_issues import find_label_issues
from transferkit.audit.outliers import find_outliers
from transferkit.audit.report import Findings, write_report
from transferkit.config.build import build
from transferkit.data.datamodule import ImageFolderDataModule
from transferkit.errors import ConfigError
from transferkit.extras import require
from transferkit.inference import best_device
from transferkit.tasks.settings import check_config
from transferkit.tasks.wrapper import exit_on_user_error, task_wrapper

log = logging.getLogger(__name__)
AUDIT_ONLY = ("audit.", "device=", "hydra.", "task_name=")  # overrides training would not take


@contextmanager
def timed(timings: dict[str, float], part: str) -> Iterator[None]:
    started = time.perf_counter()
    yield
    timings[part] = round(time.perf_counter() - started, 2)
    log.info("%s: %.1f s", part, timings[part])


def check_settings(audit: DictConfig) -> None:
    for key in ("near_threshold", "pixel_threshold"):
        if not -1.0 <= float(audit[key]) <= 1.0:
            raise ConfigError(f"audit.{key}={audit[key]} must lie in [-1, 1] (a cosine similarity).")
    if int(audit.neighbours) < 1 or int(audit.show) < 0:
        raise ConfigError("audit.neighbours must be 1 or more and audit.show 0 or more.")
    if not 0.0 < float(audit.max_feature_share) <= 1.0:
        raise ConfigError(f"audit.max_feature_share={audit.max_feature_share} must lie in (0, 1], e.g. 0.05.")
    if not float(audit.probe_c) > 0:
        raise ConfigError(f"audit.probe_c={audit.probe_c} must be a positive number.")


def train_command(exclude: Path) -> str:
    """`python train.py` with this run's data and model overrides and data.exclude=<the file>."""
    given = HydraConfig.get().overrides.task if HydraConfig.initialized() else []
    kept = [o for o in given if not o.startswith(AUDIT_ONLY) and not o.startswith("data.exclude=")]
    return shlex.join(["python", "train.py", *kept, f"data.exclude={exclude.resolve()}"])


@task_wrapper("Audit ({cfg.paths.output_dir})")
def audit(cfg: DictConfig) -> dict[str, Any]:
    """Every finding to the run directory; returns the counts, timings and file paths."""
    require("cleanlab", extra="audit", feature="audit.py")
    check_settings(cfg.audit)
    out, timings = Path(cfg.paths.output_dir), {}
    datamodule: ImageFolderDataModule = build(cfg.data, on_bad_image="skip")  # list them, go on
    with timed(timings, "scan"):
        datamodule.prepare_data()
        splits = datamodule.splits  # every image decoded once (cached verdicts: once per file)
    items, names = all_items(splits), list(datamodule.class_names)
    log.info("Auditing %d images of %d classes in %s.", len(items), len(names), datamodule.root)
    with timed(timings, "files (hash, header, thumbnail)"):
        facts = read_all([item.path for item in items], workers=max(1, datamodule.num_workers))
    with timed(timings, "features"):
        features, cache, reused = image_features(cfg, datamodule, best_device(cfg.device))
    a = cfg.audit
    with timed(timings, "duplicates"):
        pairs, near_threshold = find_duplicates(
            items,
            features,
            facts,
            float(a.near_threshold),
            float(a.pixel_threshold),
            int(a.neighbours),
            float(a.max_feature_share),
        )
    notes = []
    if near_threshold > float(a.near_threshold):
        notes.append(
            f"At audit.near_threshold={a.near_threshold} the features would pair off more than "
            f"{float(a.max_feature_share):.0%} of the images (audit.max_feature_share): this data's "
            f"pictures are alike, not copied. Near duplicates by features are listed from "
            f"{near_threshold:.4f}; exact and thumbnail matches are listed as always."
        )
        log.warning("%s", notes[-1])
    with timed(timings, "label issues"):
        issues = find_label_issues(items, features, names, int(a.folds), int(cfg.seed), float(a.probe_c))
    with timed(timings, "outliers"):
        outliers = find_outliers(items, features, len(names), float(a.outlier_z))
    counts = stats.class_counts(items, names)
    exclude = suggested_exclusions(items, pairs, [i.index for i in issues], datamodule.bad_images)
    found = Findings(
        root=Path(datamodule.root),
        class_names=names,
        items=items,
        pairs=pairs,
        label_issues=issues,
        outliers=outliers,
        counts=counts,
        imbalance=stats.imbalance(counts),
        images=stats.image_summary(facts),
        unreadable=dict(datamodule.bad_images),
        exclude=exclude,
        train_command=train_command(out / "exclude_suggested.txt"),
        timings=timings,
        notes=notes,
    )
    with timed(timings, "report"):
        files = write_report(found, out, int(a.show))
    log.info("Report: %s", out / files["report"])
    return {
        "leaks": len(found.leaks),
        "duplicates_within_splits": sum(not is_leak(p, items) for p in pairs),
        "exact_duplicates": sum(p.kind == "exact" for p in pairs),
        "near_threshold_used": near_threshold,
        "label_issues": len(issues),
        "outliers": len(outliers),
        "unreadable": len(found.unreadable),
        "suggested_exclusions": len(exclude),
        "images": len(items),
        "class_names": names,
        "imbalance": found.imbalance,
        "data_root": str(Path(datamodule.root).resolve()),
        "feature_cache": str(cache),
        "feature_cache_reused": reused,
        "timings_s": timings,
        "files": {k: str(out / v) for k, v in files.items()},
        "train_command": found.train_command,
    }


@exit_on_user_error
def main(cfg: DictConfig) -> None:
    check_config(cfg)
    audit(cfg)
