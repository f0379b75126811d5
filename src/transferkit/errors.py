"""Errors a user can cause, and a run a signal stopped (`Interrupted`). The entry points print
them as one line and exit non-zero. Nothing here imports Lightning: predict and serve start without it."""

import signal

_WORKER_MARK = "Original Traceback"


class UserError(Exception):
    """A problem with the user's data, config or weights, with the fix in the message."""

    exit_code = 2

    def __init__(self, message: str) -> None:
        # A DataLoader worker re-raises our error with its whole traceback as the message;
        # the user only needs our sentence, which is the traceback's last line.
        if _WORKER_MARK in message:
            last = message.strip().splitlines()[-1]
            message = last.split(": ", 1)[1] if ": " in last else last
        super().__init__(message)


class DataError(UserError):
    """The image folders are missing, malformed or hold unreadable files."""


class ConfigError(UserError):
    """A config value that cannot work."""


class WeightsError(UserError):
    """Pretrained weights that cannot be had (offline, wrong name, missing file, wrong shape)."""


class ExportError(UserError):
    """A model that does not export, or whose export does not reproduce PyTorch's logits."""


class TrainingDiverged(UserError):
    """The loss became NaN or infinite (usually a learning rate too high for the data)."""


def first_line(error: BaseException) -> str:
    """An exception's first line, or its type's name when it has no message."""
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


class Interrupted(Exception):
    """Training stopped by a signal; `signum` gives the exit code 128 + signum."""

    def __init__(self, signum: int) -> None:
        super().__init__(f"interrupted by {signal.Signals(signum).name}")
        self.signum = signum


def exit_code(error: BaseException) -> int:
    """128 + the signal, as shells report a process a signal ended."""
    if isinstance(error, Interrupted):
        return 128 + error.signum
    return 128 + int(signal.SIGTERM)  # SIGTERMException
