"""Group norm's channel grouping, as PopART's ``groupNormStridedChannelGrouping`` selects it.

PopTorch lowers ``aten::group_norm`` to PopART's GroupNormalization
(poptorch/source/popart_canonicalization/NormalizationOps.cpp:211-233, sdk/poptorch/3.4.0) and
passes ``opts._Popart.set("groupNormStridedChannelGrouping", ...)`` through unchanged
(popart_compiler/source/SessionOptions.cpp:408). Poplibs then groups channels either
contiguously, channel ``k + (C/G)·g`` in group ``g`` (torch's definition), or, with the option,
strided: channel ``k·G + g`` in group ``g`` (graphcore/poplibs include/popnn/GroupNorm.hpp, the
option's documentation). Layer norm (one group) and instance norm (one channel a group) are the
same function either way; only a group norm with 1 < G < C changes.
"""

import contextlib
from typing import Optional

import torch
from torch.overrides import TorchFunctionMode

from . import lowering

STRIDED_OPTION = "groupNormStridedChannelGrouping"
_GROUP_NORMS = {torch.nn.functional.group_norm, torch.group_norm}


def _to_strided(t: torch.Tensor, groups: int) -> torch.Tensor:
    """Reorder dim 1 so that each strided group's channels lie next to each other."""
    n, c = t.shape[0], t.shape[1]
    return t.reshape(n, c // groups, groups, *t.shape[2:]).transpose(1, 2).reshape(t.shape)


def _from_strided(t: torch.Tensor, groups: int) -> torch.Tensor:
    n, c = t.shape[0], t.shape[1]
    return t.reshape(n, groups, c // groups, *t.shape[2:]).transpose(1, 2).reshape(t.shape)


def _affine_to_strided(p: Optional[torch.Tensor], groups: int) -> Optional[torch.Tensor]:
    return None if p is None else p.reshape(-1, groups).t().reshape(-1)


def strided_group_norm(
    x: torch.Tensor,
    num_groups: int,
    weight: Optional[torch.Tensor] = None,
    bias: Optional[torch.Tensor] = None,
    eps: float = 1e-5,
) -> torch.Tensor:
    """Group norm whose group ``g`` holds channels g, g+G, g+2G, … (poplibs' strided grouping):
    torch's group norm on the channels reordered, then the order restored (reshapes only)."""
    with lowering.hidden():  # PopART does the grouping inside its one op
        xs = _to_strided(x, num_groups)
        ws, bs = _affine_to_strided(weight, num_groups), _affine_to_strided(bias, num_groups)
    out = torch.nn.functional.group_norm(xs, num_groups, ws, bs, eps)
    with lowering.hidden():
        return _from_strided(out, num_groups)


class _StridedGroupNorm(TorchFunctionMode):
    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in _GROUP_NORMS:
            names = ("input", "num_groups", "weight", "bias", "eps")
            bound = dict(zip(names, args))
            bound.update({k: v for k, v in kwargs.items() if k in names})
            return strided_group_norm(
                bound["input"],
                bound["num_groups"],
                bound.get("weight"),
                bound.get("bias"),
                bound.get("eps", 1e-5),
            )
        return func(*args, **kwargs)


def channel_grouping(popart_options: dict) -> contextlib.AbstractContextManager:
    """The grouping an executor with these PopART options computes: strided when the option is
    set true; PopART's default is false, torch's contiguous grouping (graphcore/popart
    willow/include/popart/sessionoptions.hpp, ``groupNormStridedChannelGrouping = false``)."""
    if popart_options.get(STRIDED_OPTION):
        return _StridedGroupNorm()
    return contextlib.nullcontext()
