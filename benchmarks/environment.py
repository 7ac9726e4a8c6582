"""Facts about the machine and software that every result row records, so rows stay comparable."""
import datetime
import os
import platform
import subprocess
from typing import Dict

import torch

from .tf32 import conv_tf32


def git_commit() -> str:
    here = os.path.dirname(os.path.abspath(__file__))
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=here, capture_output=True,
                             text=True, timeout=10)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=here,
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return out.stdout.strip() + ("-dirty" if dirty else "") if out.returncode == 0 else "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def load_average() -> float:
    """1-minute load average: this machine is shared, so noisy rows can be told apart."""
    try:
        return round(os.getloadavg()[0], 2)
    except OSError:
        return float("nan")


def device_name(device: str) -> str:
    if device == "cuda":
        return torch.cuda.get_device_name(0)
    if device == "ipu":
        return "Graphcore IPU (PopTorch)"
    if device == "ipu-model":
        return f"IPU emulator on {platform.processor() or platform.machine()} (emulated)"
    name = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    name = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return name


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
