"""Errors the user can fix. Their message names the problem and the fix; the command line prints
it without a traceback and exits with status 2 (ConfigError, raised earlier, does the same).

``AppError`` is ``backends.errors.UserError``: one base for the application's errors and the
device layer's (BackendError, DistributedError), defined below both.
"""
from backends.errors import UserError

AppError = UserError
