"""On-device control flow that PopTorch 3.4 offers as functions, run eagerly."""
from typing import Callable, List

import torch


def for_loop(count: int, body: Callable[..., List[torch.Tensor]],
             inputs: List[torch.Tensor]) -> List[torch.Tensor]:
    """``body`` applied ``count`` times, each output fed back as the next input; the inputs
    are cloned first (passed by value), as python/ops.py:158-198 (sdk/poptorch/3.4.0) does,
    with its refusals."""
    if not isinstance(inputs, list):
        raise ValueError("poptorch.for_loop expects input tensors (inputs) to be a list of "
                         "tensors. (Object is not list)")
    for index, tensor in enumerate(inputs):
        if not isinstance(tensor, torch.Tensor):
            raise ValueError("poptorch.for_loop expects input tensors (inputs) to be a list of "
                             f"tensors. (Object contained in list at index {index} is not "
                             "torch.tensor)")
    current = [t.clone() for t in inputs]
    for _ in range(count):
        outputs = body(*current)
        current = list(outputs) if isinstance(outputs, (list, tuple)) else [outputs]
    return current
