"""On-device control flow and per-tensor annotations that PopTorch 3.4 offers as functions, run
eagerly."""

from typing import Callable, List

import torch

from .errors import Error

# python/ops.py:148 (sdk/poptorch/3.4.0): the formats ipu_print_tensor accepts
PRINT_FORMATS = ("auto", "fixed", "scientific", "none")


def ipu_print_tensor(
    tensor: torch.Tensor,
    title: str = "",
    print_gradient: bool = True,
    summarise_threshold: int = 1000,
    edge_items: int = 3,
    max_line_width: int = 80,
    digits: int = 4,
    float_format: str = "auto",
    separator: str = ", ",
    open_bracket: str = "(",
    close_bracket: str = ")",
) -> torch.Tensor:
    """The input unchanged (python/ops.py:49-156): on an IPU, Poplar prints the tensor (and its
    gradient) while the program runs. The emulator checks the arguments as PopTorch does and
    prints nothing: its printing options are Poplar's, not torch's."""
    if not isinstance(tensor, torch.Tensor):  # python/ops.py:143-147
        raise Error(f"ipu print tensor must take a torch.tensor argument. {type(tensor)} is not supported.")
    if float_format not in PRINT_FORMATS:  # a KeyError in PopTorch's lookup (line 148-153)
        raise KeyError(float_format)
    return tensor


def set_available_memory(tensor: torch.Tensor, available_memory_proportion: float) -> torch.Tensor:
    """The input unchanged (python/ops.py:424-478): a hint to the PopLibs planner about an
    operation's temporary memory, which has no effect on the emulator's numbers."""
    if not isinstance(tensor, torch.Tensor):  # python/ops.py:473-476
        raise Error(
            f"You may only set available memory for torch.tensor values. {type(tensor)} is not supported."
        )
    return tensor


def for_loop(
    count: int, body: Callable[..., List[torch.Tensor]], inputs: List[torch.Tensor]
) -> List[torch.Tensor]:
    """``body`` applied ``count`` times, each output fed back as the next input; the inputs
    are cloned first (passed by value), as python/ops.py:158-198 (sdk/poptorch/3.4.0) does,
    with its refusals."""
    if not isinstance(inputs, list):
        raise ValueError(
            "poptorch.for_loop expects input tensors (inputs) to be a list of tensors. (Object is not list)"
        )
    for index, tensor in enumerate(inputs):
        if not isinstance(tensor, torch.Tensor):
            raise ValueError(
                "poptorch.for_loop expects input tensors (inputs) to be a list of "
                f"tensors. (Object contained in list at index {index} is not "
                "torch.tensor)"
            )
    current = [t.clone() for t in inputs]
    for _ in range(count):
        outputs = body(*current)
        current = list(outputs) if isinstance(outputs, (list, tuple)) else [outputs]
    return current
