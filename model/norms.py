"""Normalisation layers: batch, group and layer norm behind one constructor.

Every norm here keeps an affine weight and a bias. Under proxy norm that weight and bias *are* the
proxy-normalised activation's γ and β (see ``proxy_norm.py``): the norm applies them in the same
kernel that normalises, instead of in a separate pass. A scale-only norm (the projection norms
under proxy norm) keeps a fixed zero bias, a buffer outside the state dict: PopTorch 3.4 stops on
a norm given a weight without a bias (``ERROR_ON(isNone(*weight) != isNone(*bias))``,
poptorch/source/popart_canonicalization/NormalizationOps.cpp:53, for batch, layer, group and
instance norms alike), and a zero bias is the same arithmetic with no trainable shift.

Group norm's channel grouping (``NormSpec.grouping``). ``strided``, the official code's: group g
holds channels g, g+G, g+2G, … (channel k in group k mod G). Graphcore's TF1 EfficientNet calls
``normalization_ops.group_norm`` (efficientnet.py:137-139, graphcore/examples 09b7c67) without
``strided_channel_grouping``, whose default is True in Graphcore's TensorFlow
(tensorflow/python/ipu/ops/normalization_ops.py, ``group_norm``: "group the channels dimension …
with a stride between channels … more efficient but is unconventional"). ``contiguous``: torch's
``nn.GroupNorm``, group g holds channels g·C/G … (g+1)·C/G − 1. Layer norm (one group) is the
same function either way. Where a backend groups channels itself (PopTorch lowers
``aten::group_norm`` to one PopART GroupNormalization and PopART's ``groupNormStridedChannelGrouping``
picks the grouping: ipu_options sets it to the model's), the model hands it torch's op unchanged
(``backend_groups_channels``); everywhere else it computes the strided grouping on a view.
"""

import contextlib
from dataclasses import dataclass
from typing import Iterator, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

NORM_KINDS = ("batch", "group", "layer")
NORM_GROUPINGS = ("strided", "contiguous")
_BACKEND_GROUPS = [0]  # >0: inside ``backend_groups_channels``


@contextlib.contextmanager
def backend_groups_channels() -> Iterator[None]:
    """Inside: the backend that runs the graph groups a group norm's channels itself as the model
    asks (the PopTorch emulator with PopART's option set by ipu_options), so the model emits
    torch's one group-norm op. Tensors on PopTorch's ``ipu`` device are in this case always."""
    _BACKEND_GROUPS[0] += 1
    try:
        yield
    finally:
        _BACKEND_GROUPS[0] -= 1


def _backend_groups(x: Tensor) -> bool:
    # PopTorch 3.4 traces with tensors on the "ipu" device (python/_utils.py:69, isOnIpu)
    return _BACKEND_GROUPS[0] > 0 or x.device.type == "ipu"


def strided_group_norm(
    x: Tensor, groups: int, weight: Optional[Tensor], bias: Optional[Tensor], eps: float
) -> Tensor:
    """Group norm whose group g holds channels g, g+G, g+2G, … of ``x`` (N, C, *): statistics over
    a (N, C/G, G, *) view (no copy of a contiguous or channels-last input), then one fused
    scale-and-shift. fp16/bf16 inputs are normalised in float32 and returned in their own dtype."""
    n, c = x.shape[0], x.shape[1]
    view = x.reshape(n, c // groups, groups, *x.shape[2:])
    low = x.dtype in (torch.float16, torch.bfloat16)
    if low:
        view = view.float()
    dims = (1,) + tuple(range(3, view.dim()))
    var, mean = torch.var_mean(view, dim=dims, unbiased=False, keepdim=True)
    scale = torch.rsqrt(var + eps)  # (N, 1, G, 1, …)
    pshape = (1, c // groups, groups) + (1,) * (view.dim() - 3)
    if weight is not None:
        scale = scale * weight.to(scale.dtype).reshape(pshape)
    shift = -mean * scale
    if bias is not None:
        shift = shift + bias.to(scale.dtype).reshape(pshape)
    out = torch.addcmul(shift, view, scale).reshape(x.shape)
    return out.to(x.dtype) if low else out


class GroupNorm(nn.GroupNorm):
    """``nn.GroupNorm`` with a channel grouping: ``strided`` (the official code's) or
    ``contiguous`` (torch's). The same parameters and state dict as ``nn.GroupNorm``."""

    def __init__(self, num_groups: int, num_channels: int, eps: float = 1e-5, grouping: str = "strided"):
        if grouping not in NORM_GROUPINGS:
            raise ValueError(f"norm_grouping={grouping!r} is not one of {', '.join(NORM_GROUPINGS)}")
        super().__init__(num_groups, num_channels, eps=eps)
        self.grouping = grouping

    def strided(self) -> bool:
        """Whether the grouping changes the function: strided with 1 < G < C."""
        return self.grouping == "strided" and 1 < self.num_groups < self.num_channels

    def normalize(self, x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor]) -> Tensor:
        """The norm of ``x`` with these affine parameters (IPU precision passes fp16 copies)."""
        if not self.strided() or _backend_groups(x):
            return F.group_norm(x, self.num_groups, weight, bias, self.eps)
        return strided_group_norm(x, self.num_groups, weight, bias, self.eps)

    def forward(self, x: Tensor) -> Tensor:
        return self.normalize(x, self.weight, self.bias)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, grouping={self.grouping}"


@dataclass(frozen=True)
class NormSpec:
    """How every normalisation of a model is built.

    kind: ``batch`` (BatchNorm), ``group`` (GroupNorm with ``groups`` groups) or ``layer``
    (GroupNorm with one group: statistics over channels and space of each sample).
    proxy: follow the norm by a proxy-normalised activation instead of a plain one.
    grouping: a group norm's channel grouping, ``strided`` (the official) or ``contiguous``.
    """

    kind: str = "batch"
    groups: int = 4
    eps: float = 1e-3
    proxy: bool = False
    grouping: str = "strided"

    def __post_init__(self):
        if self.kind not in NORM_KINDS:
            raise ValueError(f"norm={self.kind!r} is not one of {', '.join(NORM_KINDS)}")
        if self.groups < 1:
            raise ValueError(f"norm_groups={self.groups} must be a positive integer")
        if not self.eps > 0:
            raise ValueError(f"norm_eps={self.eps} must be > 0 (the paper uses 1e-3)")
        if self.grouping not in NORM_GROUPINGS:
            raise ValueError(f"norm_grouping={self.grouping!r} is not one of {', '.join(NORM_GROUPINGS)}")

    def make(self, channels: int, shift: bool = True) -> nn.Module:
        """A norm over ``channels``; ``shift=False`` makes it scale-only: its bias is a zero
        buffer, neither trained nor saved (checkpoints and parameter counts are those of a norm
        without bias), which every backend, PopTorch included, lowers."""
        if self.kind == "batch":
            layer = nn.BatchNorm2d(channels, eps=self.eps)
        else:
            groups = 1 if self.kind == "layer" else self.groups
            if channels % groups:
                raise ValueError(
                    f"norm_groups={groups} does not divide a layer of {channels} channels; "
                    f"choose a divisor of every width (1, 2, 4 or 8 always work)"
                )
            layer = GroupNorm(groups, channels, eps=self.eps, grouping=self.grouping)
        if not shift:
            del layer.bias
            layer.register_buffer("bias", torch.zeros(channels), persistent=False)
        return layer
