"""IPU execution: PopTorch options, pipelining, recomputation, replication, precision, memory
planning, and a CPU/CUDA emulator of PopTorch.

``from ipu_options import poptorch`` gives the real PopTorch module when it imports (Poplar SDK
3.4 installed and enabled), otherwise ``ipu_options.emulator``, which offers the same names and
signatures for everything the application uses. ``EMULATED`` tells which one it is.
Setting ``IPU_OPTIONS_EMULATE=1`` forces the emulator (tests of the emulator on an SDK machine).
"""
import os

EMULATED = True
IMPORT_ERROR = None
if os.environ.get("IPU_OPTIONS_EMULATE", "") not in ("1", "true"):
    try:
        import poptorch  # type: ignore  # noqa: F401  (the real one: Poplar SDK)

        EMULATED = False
    except Exception as error:  # ImportError, or OSError when the SDK's libraries are missing
        IMPORT_ERROR = f"{type(error).__name__}: {error}"
if EMULATED:
    from . import emulator as poptorch  # noqa: F811

__all__ = ["EMULATED", "IMPORT_ERROR", "poptorch"]
