"""What a PopTorch executable knows of its optimiser: a snapshot taken at ``setOptimizer``.

PopTorch 3.4 reads the optimiser only when ``trainingModel`` is built and at every
``setOptimizer`` call (python/_poplar_executor.py:241-242 and 631-668, sdk/poptorch/3.4.0): it
converts it to an attribute dict (``_optimizer_attributes.convertOptimizerToDict``), compiles with
that dict and uploads it on attach (``_update_optimizer_if_needed``). A learning rate written into
``param_groups`` afterwards reaches the device only through another ``setOptimizer``. The emulator
steps the torch optimiser it was given (that object holds the "device" state), with the snapshot's
hyper-parameters written in for the duration of the step and the live values put back after.

The same conversion picks the mean-reduction strategy: with ``accum_type=torch.float16`` (and no
combined accumulator) PopTorch switches ``Training.meanAccumulationAndReplicationReductionStrategy``
to ``Running`` before compilation, and refuses a new such optimiser once compiled with another
strategy (python/_optimizer_attributes.py:130-152).
"""

import contextlib
from dataclasses import dataclass
from typing import Any, Dict, Iterator, List, Optional

import torch

from .enums import MeanReductionStrategy
from .options import Options

# python/_optimizer_attributes.py:147-152 (sdk/poptorch/3.4.0)
RUNNING_AFTER_COMPILE = (
    "Invalid optimizer: the new optimizer would require changing "
    "options.Training.meanAccumulationAndReplicationReductionStrategy to "
    "poptorch.MeanReductionStrategy.Running but the executable is already "
    "compiled."
)


@dataclass
class Snapshot:
    groups: List[Dict[str, Any]]  # every group's hyper-parameters (no "params")
    loss_scaling: float
    max_grad_norm: Optional[float]

    @contextlib.contextmanager
    def applied(self, optimizer: torch.optim.Optimizer) -> Iterator[None]:
        """The optimiser steps with the snapshot's hyper-parameters; its own come back after."""
        live = [{k: v for k, v in g.items() if k != "params"} for g in optimizer.param_groups]
        for group, values in zip(optimizer.param_groups, self.groups):
            group.update(values)
        try:
            yield
        finally:
            for group, values in zip(optimizer.param_groups, live):
                group.update(values)

    def lrs(self) -> tuple:
        return tuple(float(g["lr"]) for g in self.groups if "lr" in g)


def take(optimizer: torch.optim.Optimizer, options: Options, is_compiled: bool) -> Snapshot:
    if getattr(optimizer, "accum_type", torch.float32) == torch.float16 and not getattr(
        optimizer, "use_combined_accum", False
    ):
        training = options.Training
        if not is_compiled:
            training.mean_reduction_strategy = MeanReductionStrategy.Running
        elif training.mean_reduction_strategy != MeanReductionStrategy.Running:
            raise ValueError(RUNNING_AFTER_COMPILE)
    groups = [{k: v for k, v in g.items() if k != "params"} for g in optimizer.param_groups]
    return Snapshot(
        groups,
        float(getattr(optimizer, "loss_scaling", 1.0) or 1.0),
        getattr(optimizer, "max_grad_norm", None),
    )
