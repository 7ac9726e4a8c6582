"""Fast paths that only plain eager execution may take.

Eager CPU/GPU code here takes shortcuts a recorded graph must not see: hand-written backwards,
cached proxy-norm statistics, results written into temporaries, batch norm folded into the
preceding conv at inference. Where a graph is traced or compiled (PopTorch, torch.jit,
torch.compile) the plain arithmetic runs instead, and ``eager_fast_paths(False)`` makes eager
code run it too: to compare the two, or to measure what a traced graph would keep for backward.
"""
import contextlib

import torch
from torch import Tensor

_enabled = True


@contextlib.contextmanager
def eager_fast_paths(enabled: bool):
    """Allow (True) or forbid (False) the eager fast paths inside the ``with`` block."""
    global _enabled
    previous, _enabled = _enabled, enabled
    try:
        yield
    finally:
        _enabled = previous


def plain_eager(x: Tensor) -> bool:
    """``x`` lives on a CPU or GPU and nothing records a graph: not PopTorch (its tensors are on
    the IPU device), torch.jit tracing or torch.compile, and the fast paths are allowed."""
    if not _enabled or x.device.type not in ("cpu", "cuda") or torch.jit.is_tracing():
        return False
    dynamo = getattr(torch, "_dynamo", None)
    return not (dynamo is not None and dynamo.is_compiling())


def version_key(*tensors) -> tuple:
    """Which tensors, and their in-place version counters: an equal key means equal values, so
    a result computed from them can be reused (another tensor, storage or in-place update, such
    as an optimiser step or load_state_dict, changes the key)."""
    return tuple((id(t), t.data_ptr(), t._version) for t in tensors if t is not None)
