"""A CPU/CUDA emulator of the PopTorch API the application uses (SDK 3.4 names and signatures).

Used by ``ipu_options`` when ``import poptorch`` fails. It imports nothing of the application or
the model (a model's eager shortcuts are switched off through ``executor.register_graph_context``).
Everything it runs is emulated: its numbers are not IPU measurements. Modules: ``options``
(Options and sub-objects), ``executor`` (trainingModel / inferenceModel), ``blocks`` (BeginBlock,
Block, recomputationCheckpoint, identity_loss), ``recompute`` (recomputation realised with
torch.utils.checkpoint), ``optim``, ``dataloader``, ``precision`` (fp16 rounding, stochastic
rounding, fp16 kernels on the CPU), ``lowering`` (the compile-time check of a forward pass
against PopTorch 3.4's handlers and rules, with the facts in ``poptorch_ops.json`` that
``poptorch_sources`` extracts from PopTorch's sources)."""

from . import optim
from .blocks import BeginBlock, Block, identity_loss, recomputationCheckpoint, removeBlocks
from .custom_args import ICustomArgParser, registerCustomArgParser
from .dataloader import AsynchronousDataAccessor, DataLoader
from .enums import (
    AutoStage,
    ConnectionType,
    DataLoaderMode,
    MeanReductionStrategy,
    OutputMode,
    ReductionType,
    SyncPattern,
)
from .errors import Error, RecoverableError, UnrecoverableError
from .executor import (
    PoplarExecutor,
    inferenceModel,
    ipuHardwareIsAvailable,
    isRunningOnIpu,
    trainingModel,
)
from .ops import for_loop, ipu_print_tensor, set_available_memory
from .options import Options, PipelinedExecution, ShardedExecution, TensorLocationSettings

__version__ = "3.4.0+emulated"
EMULATED = True

__all__ = [
    "AsynchronousDataAccessor",
    "AutoStage",
    "BeginBlock",
    "Block",
    "ConnectionType",
    "DataLoader",
    "DataLoaderMode",
    "Error",
    "ICustomArgParser",
    "MeanReductionStrategy",
    "Options",
    "OutputMode",
    "PipelinedExecution",
    "PoplarExecutor",
    "RecoverableError",
    "ReductionType",
    "ShardedExecution",
    "SyncPattern",
    "TensorLocationSettings",
    "UnrecoverableError",
    "for_loop",
    "identity_loss",
    "inferenceModel",
    "ipu_print_tensor",
    "ipuHardwareIsAvailable",
    "isRunningOnIpu",
    "optim",
    "recomputationCheckpoint",
    "registerCustomArgParser",
    "removeBlocks",
    "set_available_memory",
    "trainingModel",
]
