"""Errors the user can fix. Their message names the problem and the fix; the command line prints
it without a traceback and exits with status 2 (ConfigError, raised earlier, does the same)."""


class AppError(RuntimeError):
    pass
