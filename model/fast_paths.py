"""Fast paths that only plain eager execution may take.

Eager CPU/GPU code here takes shortcuts a recorded graph must not see: hand-written backwards,
cached proxy-norm statistics, results written into temporaries, batch norm folded into the
preceding conv at inference. Where a graph is traced or compiled (PopTorch, torch.jit,
torch.compile) the plain arithmetic runs instead, and ``eager_fast_paths(False)`` makes eager
code run it too: to compare the two, or to measure what a traced graph would keep for backward.
"""
import contextlib
import weakref
from typing import Optional, Sequence

import torch
from torch import Tensor, nn

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
    return all(t is None or (t.device.type in ("cpu", "cuda") and not _functorch_wrapped(t))
               for t in tensors)


class Versions:
    """Which tensors a cached result was computed from, and their in-place version counters.

    ``same(tensors)`` holds while they are the same objects (weak references: a new tensor that
    reuses a freed one's id or memory is not mistaken for it), on the same storage, and no
    in-place operation (optimiser step, load_state_dict, copy_) has touched them since. Writes
    that bypass autograd's version counter — through ``.data`` or a NumPy view — are invisible,
    as they are to autograd: call ``clear_caches(model)`` after such writes."""

    __slots__ = ("_entries",)

    def __init__(self, tensors: Sequence[Optional[Tensor]]):
        self._entries = tuple(None if t is None else (weakref.ref(t), t._version, t.data_ptr())
                              for t in tensors)

    def same(self, tensors: Sequence[Optional[Tensor]]) -> bool:
        if len(tensors) != len(self._entries):
            return False
        for t, entry in zip(tensors, self._entries):
            if t is None or entry is None:
                if (t is None) != (entry is None):
                    return False
                continue
            ref, version, pointer = entry
            if ref() is not t or t._version != version or t.data_ptr() != pointer:
                return False
        return True


def clear_caches(model: nn.Module) -> None:
    """Forget every cached eager result (folded batch norms, proxy statistics) in ``model``."""
    for module in model.modules():
        for name in ("_folded", "_cached"):
            if getattr(module, name, None) is not None:
                setattr(module, name, None)


def watched(*modules: nn.Module) -> bool:
    """A forward hook (the module's own, or a global one) may look at these modules' inputs or
    outputs: they must then run as themselves and their outputs must not be overwritten."""
    hooks = nn.modules.module
    if hooks._global_forward_hooks or hooks._global_forward_pre_hooks:
        return True
    return any(m._forward_hooks or m._forward_pre_hooks for m in modules if m is not None)
