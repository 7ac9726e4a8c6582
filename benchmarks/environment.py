"""Facts about the machine and software that every result row records, so rows stay comparable."""

import datetime
import platform
from typing import Dict

import torch

from app.provenance import cpu_name, git_commit, load_average

from .tf32 import conv_tf32

__all__ = ["git_commit", "load_average", "describe", "device_name"]


def device_name(device: str) -> str:
    if device == "cuda":
        return torch.cuda.get_device_name(0)
    if device == "ipu":
        return "Graphcore IPU (PopTorch)"
    if device == "ipu-model":
        return f"IPU emulator on {platform.processor() or platform.machine()} (emulated)"
    return cpu_name()


def describe(device: str) -> Dict[str, object]:
    """The fixed part of a row for ``device``."""
    return {
        "device": device,
        "device_name": device_name(device),
        "emulated": device == "ipu-model",
        "torch": torch.__version__,
        "cuda": torch.version.cuda or "",
        "threads": torch.get_num_threads(),
        # fp32 convolutions in TF32 (CUDA's default): such rows' fp32 peak was measured in TF32 too.
        "tf32": device == "cuda" and conv_tf32(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "commit": git_commit(),
        "hostname": platform.node(),
    }
