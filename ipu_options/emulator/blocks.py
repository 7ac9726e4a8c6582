"""Pipeline and recomputation annotations: ``BeginBlock``, ``Block``, ``recomputationCheckpoint``
and ``identity_loss``, as PopTorch defines them.

``BeginBlock`` attaches a forward pre-hook to the module (PopTorch does the same): when a stage
trace is active, entering the module starts a new block on ``ipu_id``. The executor turns the
trace into pipeline stages and checks them against PopTorch's rules."""

from typing import List, Optional, Tuple, Union

import torch
from torch import nn

from . import lowering

_trace: Optional[List[Tuple[Optional[str], int]]] = None  # (block id, ipu) in execution order


def start_trace() -> None:
    global _trace
    _trace = []


def stop_trace() -> List[Tuple[Optional[str], int]]:
    global _trace
    trace, _trace = _trace or [], None
    return trace


def _begin(user_id: Optional[str], ipu_id: Optional[int]) -> None:
    if _trace is not None:
        previous = _trace[-1][1] if _trace else 0
        _trace.append((user_id, previous if ipu_id is None else int(ipu_id)))


class _BlockHook:
    """Forward pre-hook that opens a block (stage) where its module starts."""

    def __init__(self, user_id: Optional[str], ipu_id: Optional[int]):
        self.user_id, self.ipu_id = user_id, ipu_id

    def __call__(self, module: nn.Module, inputs) -> None:
        _begin(self.user_id, self.ipu_id)

    def __repr__(self) -> str:
        return f"BeginBlock(user_id={self.user_id}, ipu_id={self.ipu_id})"


def BeginBlock(
    layer_to_call: nn.Module, user_id: Optional[str] = None, ipu_id: Optional[int] = None
) -> nn.Module:
    if not isinstance(layer_to_call, nn.Module):
        raise TypeError("BeginBlock: module is not an instance of torch.nn.Module")
    if any(isinstance(h, _BlockHook) for h in layer_to_call._forward_pre_hooks.values()):
        raise RuntimeError("BeginBlock: module has already been assigned to a block.")
    layer_to_call.register_forward_pre_hook(_BlockHook(user_id, ipu_id))
    return layer_to_call


def removeBlocks(module: nn.Module) -> None:
    for m in module.modules():
        for key in [k for k, h in m._forward_pre_hooks.items() if isinstance(h, _BlockHook)]:
            del m._forward_pre_hooks[key]


class Block(nn.Module):
    """``with poptorch.Block(ipu_id=n):`` — everything called inside runs on IPU n."""

    def __init__(self, user_id: Optional[str] = None, ipu_id: Optional[int] = None):
        super().__init__()
        self._user_id, self._ipu_id = user_id, ipu_id

    @staticmethod
    def useAutoId() -> None:
        pass

    @staticmethod
    def start(user_id: Optional[str] = None, ipu_id: Optional[int] = None) -> None:
        _begin(user_id, ipu_id)

    def __enter__(self):
        _begin(self._user_id, self._ipu_id)

    def __exit__(self, *exc) -> None:
        return None


def recomputationCheckpoint(
    *tensors: Union[torch.Tensor, List[torch.Tensor], Tuple[torch.Tensor, ...]],
) -> Union[torch.Tensor, List[torch.Tensor], Tuple[torch.Tensor, ...]]:
    """Marks tensors to keep for the backward pass; everything between marks is recomputed.
    The emulator realises the recomputation by module (see ``recompute.py``); the tensors pass
    through unchanged, as PopTorch's do on the CPU."""
    if len(tensors) == 1 and isinstance(tensors[0], (tuple, list)):
        return type(tensors[0])(recomputationCheckpoint(*tensors[0]))
    for t in tensors:
        if not isinstance(t, torch.Tensor):
            raise ValueError("All inputs must be tensors")
    return tensors[0] if len(tensors) == 1 else tuple(tensors)


_LOSS_REDUCTIONS = {"sum": torch.sum, "mean": torch.mean, "none": lambda x: x}


def identity_loss(x: torch.Tensor, reduction: str) -> torch.Tensor:
    """Marks the model's loss, reduced as asked (python/ops.py:1014). The compile-time lowering
    check counts it as a loss (``lowering.note_identity_loss``); the executor back-propagates
    from the one final loss."""
    if reduction not in _LOSS_REDUCTIONS:
        raise ValueError(f"identity_loss: unsupported reduction {reduction!r} (sum, mean or none)")
    with lowering.hidden():  # PopTorch sees one poptorch::identity_loss node
        loss = _LOSS_REDUCTIONS[reduction](x)
        if loss is x:
            loss = x.view_as(x)  # a tensor of its own: the loss is not its input
    lowering.note_identity_loss(x, loss)
    return loss
