"""IPU execution: PopTorch options, pipelining, recomputation, replication, precision, memory
planning, and the PopTorch emulator it falls back to (the subpackage ``ipu_options.emulator``).

``from ipu_options import poptorch`` gives the real PopTorch module when it imports (Poplar SDK
3.4 installed and enabled), otherwise ``ipu_options.emulator``, which offers the same names and
signatures for everything the application uses. ``EMULATED`` tells which one it is.
Setting ``IPU_OPTIONS_EMULATE=1`` forces the emulator (tests of the emulator on an SDK machine).
``ipu_options.emulator`` is the emulator in either case.
"""

import contextlib
import os

from ipu_options import emulator
from ipu_options.emulator.executor import register_graph_context
from model.fast_paths import eager_fast_paths
from model.norms import backend_groups_channels


def model_as_traced_graph() -> contextlib.ExitStack:
    """Inside an emulated executor, this project's model runs the arithmetic a traced graph keeps
    (model/fast_paths.py), and its group norms emit torch's one op for PopART's grouping option
    to group (model/norms.py), as on an IPU."""
    stack = contextlib.ExitStack()
    stack.enter_context(eager_fast_paths(False))
    stack.enter_context(backend_groups_channels())
    return stack


register_graph_context(model_as_traced_graph)

EMULATED = True
IMPORT_ERROR = None
if os.environ.get("IPU_OPTIONS_EMULATE", "") not in ("1", "true"):
    try:
        import poptorch  # type: ignore  # noqa: F401  (the real one: Poplar SDK)

        EMULATED = False
    except Exception as error:  # ImportError, or OSError when the SDK's libraries are missing
        IMPORT_ERROR = f"{type(error).__name__}: {error}"
if EMULATED:
    poptorch = emulator  # noqa: F811

__all__ = ["EMULATED", "IMPORT_ERROR", "emulator", "poptorch"]
