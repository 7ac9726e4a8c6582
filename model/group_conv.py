"""Group convolutions, the paper's first idea: the spatial (k×k) convolution of every MBConv block
has ``group_size`` channels per group instead of EfficientNet's one (depthwise). Wider groups do
more arithmetic per byte they move, which suits hardware built for dense arithmetic (the IPU,
GPUs), although the multiply-adds grow (B0 with expansion 4: 0.27G at G1, 0.64G at G16, the
paper's figures). The pointwise convolutions stay dense.
"""


def spatial_groups(channels: int, group_size: int) -> int:
    """Groups of a spatial conv with ``group_size`` channels per group: max(C // G, 1), lowered to
    the nearest divisor of C where C // G does not divide C (only B6's 56-channel stem with G=16)."""
    groups = max(channels // group_size, 1)
    while channels % groups:
        groups -= 1
    return groups
