"""Optional dependencies. A feature that needs one imports it here, when it is used, so a plain
`pip install transferkit` imports without them; a missing one is a one-line ConfigError that
names the pip extra bringing it (pyproject.toml lists the extras: mlflow, wandb, onnx, optuna,
slurm, audit, all)."""

from __future__ import annotations

import importlib
from types import ModuleType

from transferkit.errors import ConfigError


def require(module: str, *, extra: str, feature: str) -> ModuleType:
    """`module`, imported; a ConfigError naming `extra` when it (or a package it needs) is not
    installed. `feature` is what the user asked for, as they wrote it: "logger=mlflow"."""
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as error:
        raise missing_extra(error.name or module, extra=extra, feature=feature) from None


def missing_extra(package: str, *, extra: str, feature: str) -> ConfigError:
    return ConfigError(
        f'{feature} needs the {package} package: pip install "transferkit[{extra}]" '
        f'(in a clone of the repository: pip install -e ".[{extra}]").'
    )
