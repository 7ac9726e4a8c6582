"""Convolution padding: TensorFlow's ``SAME`` (the paper's official code) or symmetric k//2 (timm's
efficientnet_* and torchvision).

``same``: the output has ceil(H / stride) rows and the input is padded by
total = max((out − 1)·stride + k − H, 0), total // 2 on the top and the rest on the bottom (the
same for columns), as TensorFlow computes it (``GetWindowedOutputSizeVerbose``, the ``SAME``
branch). With an odd kernel at stride 1, and at stride 2 on an odd input, that is k//2 on each
side; at stride 2 on an even input it is one pixel less on the top/left than on the bottom/right:
the sampling grid then starts at pixel 0 instead of −1. ``symmetric``: k//2 on every side.
Both give the same output size, so the two paddings differ only in which pixels are read.
"""

from typing import Optional, Tuple

import torch.nn.functional as F
from torch import Tensor, nn

PADDINGS = ("same", "symmetric")


def same_pads(size: int, kernel: int, stride: int) -> Tuple[int, int]:
    """(before, after): TensorFlow ``SAME`` padding of one spatial side of ``size`` pixels."""
    out = -(-size // stride)
    total = max((out - 1) * stride + kernel - size, 0)
    return total // 2, total - total // 2


class Conv2dSame(nn.Conv2d):
    """``nn.Conv2d`` with TensorFlow ``SAME`` padding computed from each input's size. Where the
    pads are symmetric the conv pads itself; otherwise a constant-zero ``F.pad`` (PopTorch lowers
    it: ``constant_pad_nd``) comes first. Dilation 1 only (EfficientNet has none)."""

    def __init__(self, *args, **kwargs):
        kwargs["padding"] = 0
        super().__init__(*args, **kwargs)
        if self.dilation != (1, 1):
            raise ValueError("Conv2dSame supports dilation 1 only")

    def pads(self, height: int, width: int) -> Tuple[int, int, int, int]:
        """(left, right, top, bottom) for an input of ``height`` × ``width``: ``F.pad``'s order."""
        top, bottom = same_pads(height, self.kernel_size[0], self.stride[0])
        left, right = same_pads(width, self.kernel_size[1], self.stride[1])
        return left, right, top, bottom

    def _conv_forward(self, x: Tensor, weight: Tensor, bias: Optional[Tensor]) -> Tensor:
        # nn.Conv2d.forward calls this, and so does every wrapper that casts the weights (the IPU
        # precision 16.32): the padding goes wherever the conv goes.
        left, right, top, bottom = self.pads(x.shape[-2], x.shape[-1])
        if left == right and top == bottom:
            return F.conv2d(x, weight, bias, self.stride, (top, left), 1, self.groups)
        return F.conv2d(F.pad(x, (left, right, top, bottom)), weight, bias, self.stride, 0, 1, self.groups)


def make_conv(
    in_channels: int,
    out_channels: int,
    kernel_size: int,
    stride: int = 1,
    groups: int = 1,
    bias: bool = False,
    padding: str = "same",
) -> nn.Conv2d:
    """A conv with ``padding`` (one of ``PADDINGS``). ``same`` with an odd kernel at stride 1 is
    k//2 on every side for any input, so it stays a plain ``nn.Conv2d``."""
    if padding not in PADDINGS:
        raise ValueError(f"padding={padding!r} is not one of {', '.join(PADDINGS)}")
    if padding == "symmetric" or (stride == 1 and kernel_size % 2 == 1):
        return nn.Conv2d(
            in_channels, out_channels, kernel_size, stride, padding=kernel_size // 2, groups=groups, bias=bias
        )
    return Conv2dSame(in_channels, out_channels, kernel_size, stride, groups=groups, bias=bias)
