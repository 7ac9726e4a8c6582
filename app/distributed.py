"""Who this process is among the training processes, and the few collective operations the loop needs.

This is the single-process version: rank 0 of a world of 1, so every collective is the identity.
The loop asks it only two things: ``is_main`` (only rank 0 writes files and prints progress) and
``all_reduce_mean`` (average a metric over processes). Multi-process training (torchrun, DDP)
extends ``init_distributed`` without changing the loop.
"""
from dataclasses import dataclass

from torch import Tensor


@dataclass
class DistContext:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def all_reduce_mean(self, tensor: Tensor) -> Tensor:
        return tensor  # one process: its value is the mean

    def barrier(self) -> None:
        pass

    def close(self) -> None:
        pass


def init_distributed(cfg) -> DistContext:
    """The context of this process (``cfg`` is unused until there is more than one process)."""
    return DistContext()
