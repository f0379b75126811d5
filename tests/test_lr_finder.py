"""tune_lr's reading of the lr range test: fastai's valley, not the noisy start, and no
suggestion from a curve that never falls (the configured lr stays)."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from transferkit.training import lr_finder
from transferkit.training.lr_finder import find_valley

LRS = np.logspace(-6, 0, 100)  # Tuner.lr_find's default sweep: 100 batches, exponential


def smoothed(raw: np.ndarray, beta: float = 0.98) -> list[float]:
    """The curve as Lightning records it: a running average of the batch losses, bias-corrected."""
    average, curve = 0.0, []
    for step, loss in enumerate(raw, 1):
        average = beta * average + (1 - beta) * loss
        curve.append(average / (1 - beta**step))
    return curve


def flat_then_valley(seed: int) -> list[float]:
    """Flat to 1e-4, falling to 1e-2, diverging after; the first batches' losses scattered, as
    the average of a few batches is (Lightning's steepest slope lands there for most seeds)."""
    g = np.random.default_rng(seed)
    x = np.log10(LRS)
    raw = np.where(x < -4, 0.69, np.where(x < -2, 0.69 - 0.17 * (x + 4), 0.35 + 3 * (x + 2) ** 2))
    raw = raw + g.normal(0, 0.05, len(raw))
    raw[:12] += g.normal(0, 0.3, 12)
    return smoothed(raw)


@pytest.mark.parametrize("seed", range(6))
def test_the_suggestion_is_on_the_valley_not_the_noisy_start(seed: int) -> None:
    valley = find_valley(flat_then_valley(seed), min_drop=0.1)
    assert valley is not None
    assert 1e-4 <= LRS[valley.index] <= 1e-2  # on the fall, not at the scattered start below 1e-4
    assert LRS[valley.end] > 1e-2 and valley.start < valley.index < valley.end


@pytest.mark.parametrize(
    "raw",
    [np.full(100, 0.69), np.linspace(0.69, 3.0, 100), np.linspace(0.69, 0.66, 100)],
    ids=["flat", "rising", "falling-4%"],
)
def test_a_curve_that_never_falls_suggests_nothing(raw: np.ndarray) -> None:
    noisy = raw + np.random.default_rng(0).normal(0, 0.03, len(raw))
    assert find_valley(smoothed(noisy), min_drop=0.1) is None


class FakeFinder:
    """What Tuner.lr_find returns: the curve, and its plot."""

    def __init__(self, losses: list[float]) -> None:
        self.results = {"lr": LRS.tolist(), "loss": losses}

    def plot(self, suggest: bool = False):  # noqa: ANN201 - a matplotlib Figure
        import matplotlib.pyplot as plt

        figure, axes = plt.subplots()
        axes.plot(self.results["lr"], self.results["loss"])
        return figure


@pytest.mark.parametrize("curve", ["valley", "flat"])
def test_the_lr_applied_is_the_one_logged_and_saved(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture, curve: str
) -> None:
    losses = flat_then_valley(0) if curve == "valley" else smoothed(np.full(100, 0.69))
    tuner = SimpleNamespace(lr_find=lambda *args, **kwargs: FakeFinder(losses))
    monkeypatch.setattr(lr_finder, "Tuner", lambda trainer: tuner)
    trainer = SimpleNamespace(fit_loop=SimpleNamespace(max_epochs=3), loggers=[])
    model = SimpleNamespace(hparams=SimpleNamespace(optimizer={"lr": 1e-3}))
    with caplog.at_level(logging.INFO, logger=lr_finder.__name__):
        applied = lr_finder.tune_lr(trainer, model, None, tmp_path)
    saved = json.loads((tmp_path / "lr_find.json").read_text())
    (line,) = [r.getMessage() for r in caplog.records]
    assert trainer.fit_loop.max_epochs == 3 and (tmp_path / "lr_find.png").is_file()
    if curve == "valley":
        assert model.hparams.optimizer["lr"] == applied == saved["suggestion"]
        assert f"optimizer.lr 0.001 -> {applied:.3g}" in line
    else:
        assert applied is None and saved["suggestion"] is None and model.hparams.optimizer["lr"] == 1e-3
        refused = "lr finder: the loss never fell by 10% between lr 1e-06 and 1; keeping optimizer.lr=0.001."
        assert line == refused
