"""The errors a user can fix, shared by the application and the device layer.

Each message names the problem and the fix. The command line prints them without a traceback
and exits with status 2. They live here, below both sides, so that a backend can refuse a
configuration without importing the application that reads it.
"""

from typing import Any


class UserError(RuntimeError):
    """Something the user can change (a setting, a file, the launch); the application calls it
    ``AppError``."""


class ConfigError(ValueError):
    """A configuration value is invalid: names the field, the value and what is allowed."""

    def __init__(self, field_name: str, value: Any, allowed: str):
        self.field_name = field_name
        super().__init__(f"{field_name}={value!r} is invalid: expected {allowed}")


class BackendError(UserError):
    """The chosen device cannot do what the configuration asks; the message says what to change."""


class DistributedError(UserError):
    """The scale-out settings do not fit the launch; the message says what to change."""
