"""Where a measurement came from: the commit, the machine's load, the CPU's name. Reports that
state numbers (``make paper``, ``make study``, ``benchmarks/``) record these with them."""

import os
import platform
import subprocess


def git_commit() -> str:
    """The checkout's short commit, ``-dirty`` when tracked files differ from it."""
    here = os.path.dirname(os.path.abspath(__file__))
    try:
        out = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=here, capture_output=True, text=True, timeout=10
        )
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=here,
            capture_output=True,
            text=True,
            timeout=10,
        ).stdout.strip()
        return out.stdout.strip() + ("-dirty" if dirty else "") if out.returncode == 0 else "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def load_average() -> float:
    """1-minute load average: on a shared machine, noisy timings can be told apart."""
    try:
        return round(os.getloadavg()[0], 2)
    except OSError:
        return float("nan")


def cpu_name() -> str:
    name = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return name
