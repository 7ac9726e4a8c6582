"""The building blocks of EfficientNet: conv-norm-activation, squeeze-excite and the MBConv block.

Group convolutions (the paper's first idea) are ``group_conv.spatial_groups``: every spatial conv
of a block has ``group_size`` channels per group instead of one (depthwise).
"""

from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .group_conv import spatial_groups
from .norms import NormSpec
from .padding import make_conv
from .proxy_norm import ProxyNormAct

# official: squeeze-excite and head under proxy norm as Graphcore's TF code builds them (see
# docs/official-code.md); v1: this project's first graph, kept to run checkpoints written with it.
GRAPHS = ("official", "v1")


class ConvNormAct(nn.Module):
    """conv → norm → activation (SiLU, proxy-normalised SiLU, or none). Eager inference runs a
    fused copy instead (``model.inference.fuse_for_inference``).

    ``proxy_scale=False``: proxy norm's output stops at φ(γY + β) − μ̃, without the 1/σ̃ (the
    official head, efficientnet.py:384: the classifier after it absorbs a per-channel scale)."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int,
        norm: NormSpec,
        stride: int = 1,
        groups: int = 1,
        activation: bool = True,
        padding: str = "same",
        proxy_scale: bool = True,
    ):
        super().__init__()
        self.conv = make_conv(in_channels, out_channels, kernel_size, stride, groups, padding=padding)
        self.proxy_scale = proxy_scale
        # Under proxy norm a norm without activation (the projection) keeps a scale and no shift.
        self.norm = norm.make(out_channels, shift=activation or not norm.proxy)
        if not activation:
            self.act: Optional[nn.Module] = None
        elif norm.proxy:
            self.act = ProxyNormAct(out_channels)
        else:
            self.act = nn.SiLU()

    def forward(self, x: Tensor) -> Tensor:
        return self.forward_deferred(x, defer_scale=not self.proxy_scale)[0]

    def forward_deferred(self, x: Tensor, defer_scale: bool = True) -> Tuple[Tensor, Optional[Tensor]]:
        """Output and, under proxy norm with ``defer_scale``, the per-channel scale still to apply."""
        x = self.norm(self.conv(x))
        if isinstance(self.act, ProxyNormAct):
            out = self.act(x, self.norm.weight, self.norm.bias, defer_scale)
            return out if defer_scale else (out, None)
        if self.act is not None:
            x = self.act(x)
        return x, None


class SqueezeExcite(nn.Module):
    """Channel gate from globally pooled features; its inner activation is always plain SiLU.

    ``scale`` is a per-channel factor that the input still owes (proxy norm's deferred 1/σ̃). As
    the official code (efficientnet.py:225-242), the gate is computed from the unscaled input and
    the scale is multiplied into the gate after the sigmoid, never applied as a pass of its own.
    ``scale_pooled`` (graph v1 only) also multiplies the pooled vector by it: another function."""

    def __init__(self, channels: int, reduced: int, scale_pooled: bool = False):
        super().__init__()
        self.reduce = nn.Conv2d(channels, reduced, 1)
        self.expand = nn.Conv2d(reduced, channels, 1)
        self.scale_pooled = scale_pooled

    def forward(self, x: Tensor, scale: Optional[Tensor] = None) -> Tensor:
        pooled = x.mean((2, 3), keepdim=True)
        if scale is not None and self.scale_pooled:
            pooled = pooled * scale
        gate = torch.sigmoid(self.expand(F.silu(self.reduce(pooled))))
        if scale is not None:
            gate = gate * scale
        return x * gate


class DropPath(nn.Module):
    """Stochastic depth: drop the residual branch of whole samples with probability p."""

    def __init__(self, p: float):
        super().__init__()
        self.p = p

    def forward(self, x: Tensor) -> Tensor:
        if not self.training or self.p == 0.0:
            return x
        keep = 1.0 - self.p
        mask = x.new_empty((x.shape[0],) + (1,) * (x.dim() - 1)).bernoulli_(keep)
        return x * mask.div_(keep)

    def extra_repr(self) -> str:
        return f"p={self.p:.3f}"


class MBConv(nn.Module):
    """Mobile inverted bottleneck: [expand 1×1] → spatial k×k (grouped) → squeeze-excite →
    project 1×1, with a residual connection when shapes allow. ``expand_ratio=1`` is EfficientNet's
    first-stage depthwise-separable block."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int,
        stride: int,
        expand_ratio: int,
        group_size: int,
        norm: NormSpec,
        se_ratio: float = 0.25,
        drop_path: float = 0.0,
        padding: str = "same",
        graph: str = "official",
    ):
        super().__init__()
        if graph not in GRAPHS:
            raise ValueError(f"graph={graph!r} is not one of {', '.join(GRAPHS)}")
        mid = in_channels * expand_ratio
        self.expand = ConvNormAct(in_channels, mid, 1, norm) if expand_ratio != 1 else None
        self.spatial = ConvNormAct(
            mid,
            mid,
            kernel_size,
            norm,
            stride=stride,
            groups=spatial_groups(mid, group_size),
            padding=padding,
        )
        self.se = SqueezeExcite(mid, max(1, int(in_channels * se_ratio)), scale_pooled=graph == "v1")
        self.project = ConvNormAct(mid, out_channels, 1, norm, activation=False)
        self.residual = stride == 1 and in_channels == out_channels
        self.drop_path = DropPath(drop_path) if self.residual and drop_path > 0 else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        shortcut = x
        if self.expand is not None:
            x = self.expand(x)
        x, scale = self.spatial.forward_deferred(x)
        x = self.project(self.se(x, scale))
        if self.residual:
            x = self.drop_path(x) + shortcut
        return x
