"""Eager inference as an explicit step: ``fuse_for_inference(model)`` returns a folded copy.

The copy computes what the model computes (to float32 rounding) in fewer passes over the
activations, with three changes to every conv-norm-activation layer:
  * batch norm with running statistics is folded into the conv before it: it is a per-channel
    affine map, so conv → BN is one conv with a bias;
  * proxy norm's statistics depend on four parameter vectors only: they are computed once, here,
    and kept as buffers;
  * SiLU and the proxy standardisation are computed in the norm's output, a temporary that
    nothing else holds, instead of in fresh tensors (on CPUs each fresh activation-sized tensor
    also costs page faults).
The copy is a snapshot: it never trains, and weights changed afterwards (an optimiser step, a
checkpoint load) reach it only by fusing again. The model itself is left as it was, so training,
hooks, tracing and compilers see the layers as written. Forward hooks on the model's
conv-norm-activation layers or their norms are not carried over (the fused layers replace them).
"""

import copy
from typing import Callable, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .blocks import ConvNormAct
from .proxy_norm import ProxyNormAct


def _folded_conv(conv: nn.Conv2d, bn: nn.BatchNorm2d) -> nn.Conv2d:
    """conv (no bias) → BN with running statistics, as one conv with a bias (the conv's memory
    format kept: a channels-last model stays channels-last)."""
    scale = torch.rsqrt(bn.running_var + bn.eps)
    if bn.weight is not None:
        scale = scale * bn.weight
    bias = -bn.running_mean * scale
    if bn.bias is not None:
        bias = bias + bn.bias
    weight = conv.weight * scale.view(-1, 1, 1, 1).to(conv.weight.dtype)
    if conv.weight.is_contiguous(memory_format=torch.channels_last):
        weight = weight.contiguous(memory_format=torch.channels_last)
    folded = copy.deepcopy(conv)
    folded.weight = nn.Parameter(weight, requires_grad=False)
    folded.bias = nn.Parameter(bias.to(conv.weight.dtype), requires_grad=False)
    return folded


def _folds(norm: nn.Module) -> bool:
    return isinstance(norm, nn.BatchNorm2d) and norm.running_mean is not None


class FusedConvNormAct(nn.Module):
    """A ``ConvNormAct`` for eager inference (see the module's docstring); the same interface."""

    def __init__(self, layer: ConvNormAct):
        super().__init__()
        fold = _folds(layer.norm)
        self.conv = _folded_conv(layer.conv, layer.norm) if fold else layer.conv
        self.norm = nn.Identity() if fold else layer.norm
        self.activation: Optional[Callable[[Tensor], Tensor]] = None
        self.proxy = isinstance(layer.act, ProxyNormAct)
        self.proxy_scale = layer.proxy_scale
        if self.proxy:
            self.activation = layer.act.activation
            mean, inv_std = layer.act.proxy_statistics(layer.norm.weight, layer.norm.bias)
            self.register_buffer("mean", mean.detach().float().view(1, -1, 1, 1))
            self.register_buffer("inv_std", inv_std.detach().float().view(1, -1, 1, 1))
        elif layer.act is not None:
            self.activation = F.silu

    def forward(self, x: Tensor) -> Tensor:
        return self.forward_deferred(x, defer_scale=not self.proxy_scale)[0]

    def forward_deferred(self, x: Tensor, defer_scale: bool = True) -> Tuple[Tensor, Optional[Tensor]]:
        x = self.norm(self.conv(x))  # a temporary of ours: what follows is computed in it
        if self.activation is None:
            return x, None
        z = F.silu(x, inplace=True) if self.activation is F.silu else self.activation(x)
        if not self.proxy:
            return z, None
        mean, inv_std = self.mean.to(z.dtype), self.inv_std.to(z.dtype)
        if defer_scale:
            return z.sub_(mean), inv_std
        return z.mul_(inv_std).add_(-mean * inv_std), None


def _fuse_children(module: nn.Module) -> None:
    for name, child in module.named_children():
        if isinstance(child, ConvNormAct):
            setattr(module, name, FusedConvNormAct(child))
        else:
            _fuse_children(child)


@torch.no_grad()
def fuse_for_inference(model: nn.Module) -> nn.Module:
    """A copy of ``model`` (in eval mode, nothing trainable) whose conv-norm-activation layers are
    fused for eager inference; ``model`` itself is unchanged."""
    fused = copy.deepcopy(model).eval()
    _fuse_children(fused)
    for p in fused.parameters():
        p.requires_grad_(False)
    return fused
