"""Fast paths that only plain eager training may take.

Eager CPU/GPU training runs proxy norm's hand-written backwards (model/proxy_norm.py): the same
arithmetic, with fewer tensors kept for backward. Where a graph is traced or compiled (PopTorch,
torch.jit, torch.compile, a torch.func transform) the plain arithmetic runs instead, and
``eager_fast_paths(False)`` makes eager code run it too: to compare the two, or to measure what a
traced graph would keep for backward. Inference has its own, explicit step: ``model.inference``.
"""

import contextlib
from typing import Iterator, Optional

import torch
from torch import Tensor

_enabled = True


@contextlib.contextmanager
def eager_fast_paths(enabled: bool) -> Iterator[None]:
    """Allow (True) or forbid (False) the eager fast paths inside the ``with`` block."""
    global _enabled
    previous, _enabled = _enabled, enabled
    try:
        yield
    finally:
        _enabled = previous


def _functorch_wrapped(x: Tensor) -> bool:
    # vmap/grad (torch.func) wrap tensors; hand-written autograd Functions have no rule for them.
    functorch = getattr(torch._C, "_functorch", None)
    test = getattr(functorch, "is_functorch_wrapped_tensor", None)
    return bool(test is not None and test(x))


def plain_eager(*tensors: Optional[Tensor]) -> bool:
    """The tensors live on a CPU or GPU and nothing records a graph: not PopTorch (its tensors
    are on the IPU device), torch.jit tracing, torch.compile or a torch.func transform, and the
    fast paths are allowed."""
    if not _enabled or torch.jit.is_tracing():
        return False
    dynamo = getattr(torch, "_dynamo", None)
    if dynamo is not None and dynamo.is_compiling():
        return False
    return all(t is None or (t.device.type in ("cpu", "cuda") and not _functorch_wrapped(t)) for t in tensors)
