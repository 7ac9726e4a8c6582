"""TF32 on CUDA: which fp32 math the convolutions use, and a matmul peak measured with the same.

cuDNN runs fp32 convolutions in TF32 by default while cuBLAS matmuls default to true fp32, so a
peak measured with a plain matmul is ~8x below what the convolutions can reach on an H100 and
fp32 utilisation would come out ~8x too high. torch >= 2.9 has per-backend ``fp32_precision``
strings; reading the legacy ``allow_tf32`` flags after anyone used them raises, so the newer API
is used where it exists and the legacy one (torch 2.0, the Poplar SDK's) otherwise."""

import contextlib
from typing import Iterator

import torch


def _attr(obj, name: str, default=None):
    """getattr that also survives torch 2.0's backend modules, whose unknown attributes raise
    AssertionError ("Unknown attribute") rather than AttributeError."""
    try:
        return getattr(obj, name, default)
    except AssertionError:
        return default


def _resolved(*levels) -> str:
    """The first ``fp32_precision`` that is not 'none' (an op inherits its backend's, and that the
    global one); 'none' all the way up means no TF32."""
    for level in levels:
        value = _attr(level, "fp32_precision", "none")
        if value != "none":
            return value
    return "none"


def conv_tf32() -> bool:
    """Whether cuDNN may run fp32 convolutions in TF32 (this process's setting; CUDA only)."""
    cudnn = torch.backends.cudnn
    conv = _attr(cudnn, "conv")
    if conv is not None and _attr(conv, "fp32_precision") is not None:  # torch >= 2.9
        return _resolved(conv, cudnn, torch.backends) == "tf32"
    return bool(cudnn.allow_tf32)


@contextlib.contextmanager
def matmul_tf32(enabled: bool) -> Iterator[None]:
    """cuBLAS fp32 matmuls in TF32 exactly when ``enabled``, inside the block only; the flag is
    put back as it was (also on an exception), through the same API that read it."""
    matmul = torch.backends.cuda.matmul
    if _attr(matmul, "fp32_precision") is not None:  # torch >= 2.9: restoring the string restores 'none'
        before = matmul.fp32_precision
        matmul.fp32_precision = "tf32" if enabled else "ieee"
        try:
            yield
        finally:
            matmul.fp32_precision = before
        return
    # torch 2.0: allow_tf32 is float32_matmul_precision != 'highest'; saving the precision string
    # keeps a 'medium' that setting the boolean back would turn into 'high'.
    before = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("high" if enabled else "highest")
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(before)


def matmul_tf32_enabled() -> bool:
    """Whether cuBLAS fp32 matmuls would use TF32 now (for tests and logs)."""
    matmul = torch.backends.cuda.matmul
    if _attr(matmul, "fp32_precision") is not None:
        return _resolved(matmul, torch.backends.cuda, torch.backends) == "tf32"
    return torch.get_float32_matmul_precision() != "highest"
