"""This process in the job, as a backend sees it: who it is and the collectives it may call.

The application decides the context (``app.distributed.init_distributed``: single process,
torchrun or PopRun) and registers it with ``set_current``; backends only read it: the native
backend trains through ``current().wrap`` (DistributedDataParallel under torchrun) and every
backend averages its metrics with ``all_reduce_mean``, so all processes report the same
job-wide figures. With one process every collective is the identity and nothing here touches
``torch.distributed``.
"""

import os
import shlex
from dataclasses import dataclass
from typing import List, Optional

import torch
from torch import Tensor, nn

TORCHRUN_ENV = "TORCHELASTIC_RUN_ID"  # set by torchrun in every worker it starts
POPRUN_ENV = "POPDIST_NUM_TOTAL_REPLICAS"  # set by poprun in every instance it starts


@dataclass
class DistContext:
    """This process in the job. The base class is the single-process job: every collective is the
    identity. ``rank``/``world_size`` count processes (PopRun instances on IPUs, each of which may
    drive several replicas); ``local_rank`` is the process index on its machine."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    engine: str = "single"  # single | torchrun | poprun

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def all_reduce_mean(self, tensor: Tensor) -> Tensor:
        return tensor

    def all_reduce_sum(self, tensor: Tensor) -> Tensor:
        return tensor

    def broadcast_parameters(self, module: nn.Module) -> None:
        """Give every process the main process's initial weights."""

    def wrap(self, module: nn.Module, device: torch.device) -> nn.Module:
        """The module a native backend trains through (DistributedDataParallel when distributed)."""
        return module

    def barrier(self) -> None:
        pass

    def close(self) -> None:
        pass


_CURRENT = DistContext()


def current() -> DistContext:
    """The context the application registered for this process (single-process until then)."""
    return _CURRENT


def set_current(ctx: DistContext) -> DistContext:
    global _CURRENT
    _CURRENT = ctx
    return ctx


def all_reduce_mean(tensor: Tensor) -> Tensor:
    """The mean of ``tensor`` over every process of the job (for backends' metrics)."""
    return _CURRENT.all_reduce_mean(tensor)


def under_torchrun() -> bool:
    return TORCHRUN_ENV in os.environ


def under_poprun() -> bool:
    return POPRUN_ENV in os.environ


def launcher_args(items: List[str]) -> List[str]:
    """``dist.launcher_args`` as launcher arguments: each item is split like a shell would, so
    ``dist.launcher_args="--host h1,h2 --vipu-partition=p"`` needs no YAML list syntax."""
    return [part for item in items for part in shlex.split(item)]


def proc_stat(pid: int) -> Optional[List[str]]:
    """Fields of ``/proc/<pid>/stat`` after the command name (state first, then the parent's pid),
    or None where there is no such entry (process gone, or not Linux). The name is in parentheses
    and may hold spaces, so the fields start after its last ")"."""
    try:
        return open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
