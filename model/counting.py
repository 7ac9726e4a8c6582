"""Model size and cost, counted from the layers themselves (no lookup tables)."""

import copy
from typing import Tuple

import torch
from torch import Tensor, nn


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def count_macs(model: nn.Module, resolution: int) -> int:
    """Multiply-adds of one forward pass of one image at ``resolution``×``resolution``: every conv
    and linear layer, by the shape it actually sees. Runs on the meta device (no memory, no time);
    falls back to a CPU pass where an op lacks a meta kernel."""
    macs = []

    def conv_hook(m: nn.Conv2d, inputs: Tuple[Tensor, ...], output: Tensor) -> None:
        per_output = (m.in_channels // m.groups) * m.kernel_size[0] * m.kernel_size[1]
        macs.append(output[0].numel() * per_output)  # output[0]: one image

    def linear_hook(m: nn.Linear, inputs: Tuple[Tensor, ...], output: Tensor) -> None:
        macs.append(output[0].numel() * m.in_features)

    def run(device: str) -> int:
        probe = copy.deepcopy(model).to(device).eval()
        handles = []
        for m in probe.modules():
            if isinstance(m, nn.Conv2d):
                handles.append(m.register_forward_hook(conv_hook))
            elif isinstance(m, nn.Linear):
                handles.append(m.register_forward_hook(linear_hook))
        with torch.no_grad():
            probe(torch.zeros(1, 3, resolution, resolution, device=device))
        return int(sum(macs))

    try:
        return run("meta")
    except (NotImplementedError, RuntimeError):
        macs.clear()
        return run("cpu")
