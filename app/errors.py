"""Errors the user can fix. Their message names the problem and the fix; the command line prints
it without a traceback and exits with status 2 (ConfigError, raised earlier, does the same).

``AppError`` is ``backends.errors.UserError``: one base for the application's errors and the
device layer's (BackendError, DistributedError), defined below both.
"""

import signal

from backends.errors import UserError

AppError = UserError

# Every signal that asks a command to end: Ctrl-C, a scheduler's stop, a closed terminal or a
# dropped ssh session, Ctrl-\. Each stops after the current step and saves; exit 128 + its number.
STOP_SIGNALS = tuple(
    getattr(signal, name) for name in ("SIGINT", "SIGTERM", "SIGHUP", "SIGQUIT") if hasattr(signal, name)
)


class Interrupted(KeyboardInterrupt):
    """A termination signal (SIGTERM) handled like Ctrl-C where the training loop is not running."""

    def __init__(self, signum: int = signal.SIGINT):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


WORKER_TRACEBACK = "Original Traceback (most recent call last):"


def user_message(error: BaseException) -> str:
    """An error's message for the console. An error raised inside a DataLoader worker arrives with
    the worker's traceback pasted into its message (torch's ExceptionWrapper): keep the original
    message, which is the one that names the fix."""
    text = str(error)
    if WORKER_TRACEBACK not in text:
        return text
    last = text.rstrip().splitlines()[-1]  # "app.data.datasets.DatasetError: <message>"
    marker = type(error).__name__ + ": "
    at = last.find(marker)
    return last[at + len(marker) :] if at >= 0 else last
