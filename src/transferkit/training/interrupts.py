"""An interrupted run loses nothing: on SIGTERM (a scheduler's stop), SIGUSR1 (SLURM's warning
before the time limit or a pre-emption) or Ctrl-C, the exact training state goes to
checkpoints/last.ckpt and the process exits non-zero with the command that resumes it."""

from __future__ import annotations

import logging
import signal
import sys
from pathlib import Path
from types import FrameType
from typing import Any

import lightning as L
from hydra.core.hydra_config import HydraConfig
from lightning.pytorch.utilities.exceptions import SIGTERMException

from transferkit.errors import Interrupted
from transferkit.training.callbacks import unshare

log = logging.getLogger(__name__)


class CheckpointOnInterrupt(L.Callback):
    """Save `dirpath/last.ckpt` when fit is interrupted. Lightning turns SIGTERM into
    SIGTERMException and Ctrl-C into KeyboardInterrupt; SIGUSR1 is handled here (unless Lightning's
    SLURM auto-requeue handles it), stopping before the next batch."""

    def __init__(self, dirpath: str | Path, filename: str = "last") -> None:
        self.path = Path(dirpath) / f"{filename}.ckpt"
        self._signal: int | None = None
        self._previous: Any = None

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        self._signal = signum

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Installed after Lightning takes its snapshot of the handlers, which it puts back at the
        end of fit, so ours never outlives the run."""
        if signal.getsignal(signal.SIGUSR1) in (signal.SIG_DFL, signal.SIG_IGN, None):
            self._previous = signal.signal(signal.SIGUSR1, self._on_signal)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGUSR1, self._previous)
            self._previous = None

    def on_train_batch_start(self, trainer: L.Trainer, *args: Any) -> None:
        """Stop between batches: the last one is counted as done, so a resume neither repeats
        nor skips a batch."""
        if self._signal is not None:
            raise Interrupted(self._signal)

    def on_exception(self, trainer: L.Trainer, module: L.LightningModule, exception: BaseException) -> None:
        if isinstance(exception, Interrupted):
            reason = signal.Signals(exception.signum).name
        elif isinstance(exception, KeyboardInterrupt):
            reason = "Ctrl-C"
        elif isinstance(exception, SIGTERMException):
            reason = "SIGTERM"
        else:
            return
        if trainer.is_global_zero:
            unshare(self.path)  # last.ckpt may be best.ckpt too: write a file of its own
        trainer.save_checkpoint(self.path)
        self.on_train_end(trainer, module)
        log.warning(
            "Training interrupted by %s at epoch %d, step %d; saved %s. Resume with: %s",
            reason,
            trainer.current_epoch,
            trainer.global_step,
            self.path,
            resume_command(self.path),
        )


def resume_command(path: Path) -> str:
    """The command line that was run, with ckpt_path pointing at `path`."""
    overrides = list(HydraConfig.get().overrides.task) if HydraConfig.initialized() else []
    kept = [o for o in overrides if not o.startswith(("ckpt_path=", "hydra.run.dir="))]
    return " ".join(["python", Path(sys.argv[0]).name, *kept, f"ckpt_path={path}"])
