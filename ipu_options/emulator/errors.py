"""``poptorch.Error`` and its two subclasses, as PopTorch 3.4 defines them.

python/poptorch.cpp:624-640 and 745-752 (sdk/poptorch/3.4.0) create ``Error`` (a subclass of
``Exception``) with ``RecoverableError`` and ``UnrecoverableError`` below it; python/_impl.py:67-73
(``createPoptorchError``) raises ``Error`` for the refusals PopTorch makes in Python, with the
message ``'poptorch_py_error': <msg>`` and the attributes ``type``, ``message``, ``location``.
The emulator's refusals are Errors too; each also keeps the builtin class it had (ValueError,
RuntimeError) so that code catching those still catches them.
"""

PY_ERROR = "poptorch_py_error"


class Error(Exception):
    """Every refusal of PopTorch (and of the emulator)."""

    def __init__(self, message: str = "", *args):
        super().__init__(message, *args)
        self.type = PY_ERROR
        self.message = message
        self.location = ""

    def __str__(self) -> str:
        return self.message if not self.args[1:] else super().__str__()


class RecoverableError(Error):
    recovery_action = ""


class UnrecoverableError(Error):
    pass


class RuntimeRefusal(Error, RuntimeError):
    """A refusal PopTorch raises as ``poptorch.Error``; a RuntimeError for existing callers."""


class ValueRefusal(Error, ValueError):
    """A refusal of a value PopTorch raises as ``poptorch.Error``; a ValueError for callers."""
