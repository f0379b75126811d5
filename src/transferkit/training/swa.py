"""Why a run refuses Lightning's StochasticWeightAveraging callback, before any work.

Read from its source (lightning/pytorch/callbacks/stochastic_weight_avg.py), it cannot keep this
project's promises: on a model with BatchNorm it resets every BatchNorm layer's running statistics,
the frozen backbone's too, and re-estimates them in an epoch it adds to `max_epochs`. Frozen layers
run in eval mode and a cached backbone does not run at all, so their statistics stay at zero mean
and unit variance: the saved model is broken for eval.py, predict.py and export.py. The average
also leaves out the last epoch's training (it averages the weights each epoch starts from), and
it reaches the model only at the end, while results.json reports best.ckpt.
"""

from __future__ import annotations

from hydra.utils import get_class
from lightning.pytorch.callbacks import StochasticWeightAveraging
from omegaconf import DictConfig

from transferkit.errors import ConfigError


def refuse_stochastic_weight_averaging(callbacks: DictConfig | None) -> None:
    """One line naming the callback and why, before the data is read."""
    for name, node in (callbacks or {}).items():
        target = node.get("_target_") if isinstance(node, DictConfig) else None
        try:
            swa = target is not None and issubclass(get_class(target), StochasticWeightAveraging)
        except Exception:  # noqa: BLE001 - a target that cannot be imported is refused where it is built
            swa = False
        if swa:
            raise ConfigError(
                f"callbacks.{name}: StochasticWeightAveraging is not supported: Lightning's callback "
                "resets every BatchNorm layer's statistics, the frozen backbone's too, in an epoch it "
                "adds, and results.json, eval.py and export.py would use best.ckpt, not the average; "
                f"remove callbacks.{name}."
            )
