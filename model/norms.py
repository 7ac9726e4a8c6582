"""Normalisation layers: batch, group and layer norm behind one constructor.

Every norm here keeps an affine weight and a bias. Under proxy norm that weight and bias *are* the
proxy-normalised activation's γ and β (see ``proxy_norm.py``): the norm applies them in the same
kernel that normalises, instead of in a separate pass. A scale-only norm (the projection norms
under proxy norm) keeps a fixed zero bias, a buffer outside the state dict: PopTorch 3.4 stops on
a norm given a weight without a bias (``ERROR_ON(isNone(*weight) != isNone(*bias))``,
poptorch/source/popart_canonicalization/NormalizationOps.cpp:53, for batch, layer, group and
instance norms alike), and a zero bias is the same arithmetic with no trainable shift.
"""

from dataclasses import dataclass

import torch
from torch import nn

NORM_KINDS = ("batch", "group", "layer")


@dataclass(frozen=True)
class NormSpec:
    """How every normalisation of a model is built.

    kind: ``batch`` (BatchNorm), ``group`` (GroupNorm with ``groups`` groups) or ``layer``
    (GroupNorm with one group: statistics over channels and space of each sample).
    proxy: follow the norm by a proxy-normalised activation instead of a plain one.
    """

    kind: str = "batch"
    groups: int = 4
    eps: float = 1e-3
    proxy: bool = False

    def __post_init__(self):
        if self.kind not in NORM_KINDS:
            raise ValueError(f"norm={self.kind!r} is not one of {', '.join(NORM_KINDS)}")
        if self.groups < 1:
            raise ValueError(f"norm_groups={self.groups} must be a positive integer")
        if not self.eps > 0:
            raise ValueError(f"norm_eps={self.eps} must be > 0 (the paper uses 1e-3)")

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
            layer = nn.GroupNorm(groups, channels, eps=self.eps)
        if not shift:
            del layer.bias
            layer.register_buffer("bias", torch.zeros(channels), persistent=False)
        return layer
