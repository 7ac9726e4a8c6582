"""``poptorch.Options`` from the configuration, with the SDK 3.4 calls.

Every field of the ``IpuSpec`` (ipu_options/specs.py) and of the ``BatchPlan`` maps to
one documented call (tests/test_ipu_options.py checks each against a recording stand-in written
from the SDK 3.4 signatures):

  train.replicas / dist.instances  opts.replicationFactor(local replicas)
  ipu.device_iterations            opts.deviceIterations(n)
  train.grad_accum                 opts.Training.gradientAccumulation(n)   (training only)
  ipu.reduction                    opts.Training.accumulationAndReplicationReductionType(...)
  ipu.output_mode                  opts.outputMode(poptorch.OutputMode.X)   (training; inference: All)
  train.replicas > 1               opts.broadcastBuffers(False)   (per-replica norm statistics)
  ipu.seed / train.seed            opts.randomSeed(s)
  ipu.available_memory_proportion  opts.setAvailableMemoryProportion({"IPU0": p, ...})
  ipu.pipeline (several IPUs)      opts.setExecutionStrategy(poptorch.PipelinedExecution(
                                       poptorch.AutoStage.SameAsIpu)),
                                   opts._Popart.set("autoRecomputation", 3)   (pipeline recompute)
  ipu.recompute (one IPU)          opts._Popart.set("explicitRecomputation", True),
                                   opts._Popart.set("autoRecomputation", 4)   (recompute all but
                                       the checkpoints; 3 and 4 are PopART's RecomputationType
                                       Pipeline and RecomputeAll)
  ipu.partials                     opts.Precision.setPartialsType(torch.half | torch.float)
  ipu.stochastic_rounding          opts.Precision.enableStochasticRounding(b)   (training only)
  (always)                         opts._Popart.set("engineOptions",
                                       {"target.deterministicWorkers": "portable"})
  ipu.loss_scaling == "auto"       opts.Training.setAutomaticLossScaling(True)
                                   (a number is the optimiser's ``loss_scaling``: see optimizer.py)
  ipu.optimizer_state_offchip,     opts.TensorLocations.setOptimizerLocation(
  ipu.replicated_tensor_sharding       poptorch.TensorLocationSettings().useOnChipStorage(not off)
                                       .useReplicatedTensorSharding(rts))
  ipu.executable_cache             opts.enableExecutableCaching(path)
  ipu.compile_only                 opts.useOfflineIpuTarget(ipu.offline_ipu_version or 2)
                                       (compile without hardware, then stop)
  device == "ipu-model"            opts.useIpuModel(True)  (real PopTorch only)
  model.norm_grouping (IpuSpec)    opts._Popart.set("groupNormStridedChannelGrouping",
                                       norm_grouping == "strided"): PopART groups a group norm's
                                   channels as the model does, so a checkpoint computes the same
                                   function on an IPU, the emulator and a CPU/GPU (see below)
  (always)                         opts._Popart.set("scheduleNonWeightUpdateGradientConsumersEarly",
                                   True), opts._Popart.set("disableGradAccumulationTensorStreams",
                                   True): the PopART settings Graphcore's CNN application used
                                   (faster group/layer norm layout; smaller host streams).
``ipu.precision`` is not an option call: it is the model's and inputs' dtype (precision.py).
"""

from types import ModuleType
from typing import Any, Dict, Optional

import torch
from torch import nn

from backends.process import under_poprun
from backends.specs import BatchPlan
from ipu_options.pipeline import num_ipus
from ipu_options.poprun import popdist_local_replicas, popdist_options
from ipu_options.specs import IpuSpec
from model.norms import GroupNorm

AUTO_RECOMPUTATION_PIPELINE = 3  # popart.RecomputationType.Pipeline
AUTO_RECOMPUTATION_ALL = 4  # popart.RecomputationType.RecomputeAll


def local_replicas(replicas: int, instances: int) -> int:
    """Replicas of this process: inside a PopRun job what PopDist says (a poprun started by hand
    need not match dist.instances); otherwise ``replicas`` over ``instances``."""
    if under_poprun():
        return popdist_local_replicas()
    instances = max(1, instances)
    if replicas % instances:
        raise ValueError(
            f"train.replicas={replicas} is not divisible by "
            f"dist.instances={instances}: use a multiple of {instances} replicas"
        )
    return replicas // instances


def check_norm_grouping(model: nn.Module, ipu: IpuSpec) -> None:
    """Refuse a model whose group norms group channels otherwise than ``ipu.norm_grouping``: the
    IPU would compute another function (PopART's option is set from the spec)."""
    for name, m in model.named_modules():
        if isinstance(m, GroupNorm) and 1 < m.num_groups < m.num_channels and m.grouping != ipu.norm_grouping:
            raise ValueError(
                f"{name or 'model'}: group norm grouping {m.grouping!r}, while the IPU is set "
                f"for {ipu.norm_grouping!r} (IpuSpec.norm_grouping): build both from one "
                "model.norm_grouping"
            )


def memory_proportions(ipu: IpuSpec, ipus: int) -> Dict[str, float]:
    amp = ipu.available_memory_proportion
    if len(amp) not in (1, ipus):
        raise ValueError(
            f"ipu.available_memory_proportion has {len(amp)} values for {ipus} IPUs: "
            f"give one value for all IPUs or one per IPU"
        )
    return {f"IPU{i}": float(amp[0] if len(amp) == 1 else amp[i]) for i in range(ipus)}


def _set_pipeline(
    opts: Any, poptorch: ModuleType, ipu: IpuSpec, splits: Optional[dict], training: bool
) -> None:
    """Memory proportions per IPU; pipelined execution over several IPUs, or recomputation on one."""
    ipus = num_ipus(ipu, splits)
    opts.setAvailableMemoryProportion(memory_proportions(ipu, ipus))
    if ipus > 1:
        opts.setExecutionStrategy(poptorch.PipelinedExecution(poptorch.AutoStage.SameAsIpu))
        opts._Popart.set("autoRecomputation", AUTO_RECOMPUTATION_PIPELINE)
    elif ipu.recompute and training:
        opts._Popart.set("explicitRecomputation", True)
        opts._Popart.set("autoRecomputation", AUTO_RECOMPUTATION_ALL)


def _set_precision(opts: Any, ipu: IpuSpec, training: bool) -> None:
    opts.Precision.setPartialsType(torch.half if ipu.partials == "half" else torch.float)
    if training:
        # Graphcore's CNN application enables stochastic rounding in train_settings only
        # (vision/cnns/pytorch/utils/ipu_settings.py:42-45, graphcore/examples v3.4.1): an
        # inference executable rounds to nearest (PopTorch's default).
        opts.Precision.enableStochasticRounding(bool(ipu.stochastic_rounding))
    # Worker randomness (stochastic rounding) the same on every IPU, so that replicas' weights do
    # not drift apart: set for every executable by Graphcore's CNN application
    # (vision/cnns/pytorch/utils/ipu_settings.py:18 and 29-30, v3.4.1).
    opts._Popart.set("engineOptions", {"target.deterministicWorkers": "portable"})


def build_options(
    ipu: IpuSpec,
    poptorch: ModuleType,
    batch: BatchPlan,
    training: bool = True,
    splits: Optional[dict] = None,
    use_ipu_model: bool = False,
    base: Any = None,
) -> Any:
    """The ``poptorch.Options`` of a run whose sizes are ``batch``. ``splits``: the resolved
    pipeline ({name: ipu}, from the plan when ``ipu.pipeline`` is "auto"); ``base``: an Options
    to start from (PopDist's)."""
    if base is None and under_poprun():  # an instance of a PopRun job: PopDist sets replication
        base = popdist_options(ipu, num_ipus(ipu, splits))
    opts = base if base is not None else poptorch.Options()
    if base is None:
        opts.replicationFactor(batch.local_replicas)
    opts.deviceIterations(batch.device_iterations)
    opts.randomSeed(ipu.seed)
    if training:
        opts.Training.gradientAccumulation(batch.grad_accum)
        reduction = poptorch.ReductionType.Sum if ipu.reduction == "sum" else poptorch.ReductionType.Mean
        opts.Training.accumulationAndReplicationReductionType(reduction)
    # ipu.output_mode is what a training call returns; inference always returns every logit
    # (the loop scores each image).
    opts.outputMode(
        {"all": poptorch.OutputMode.All, "final": poptorch.OutputMode.Final, "sum": poptorch.OutputMode.Sum}[
            ipu.output_mode if training else "all"
        ]
    )
    if batch.local_replicas > 1:
        # Each replica keeps its own norm running statistics: PopTorch refuses to compile in-place
        # buffer updates (batch norm in training) with broadcast buffers and several replicas.
        opts.broadcastBuffers(False)

    _set_pipeline(opts, poptorch, ipu, splits, training)
    _set_precision(opts, ipu, training)
    if training and ipu.loss_scaling == "auto":
        opts.Training.setAutomaticLossScaling(True)
    if ipu.optimizer_state_offchip or ipu.replicated_tensor_sharding:
        location = (
            poptorch.TensorLocationSettings()
            .useOnChipStorage(not ipu.optimizer_state_offchip)
            .useReplicatedTensorSharding(bool(ipu.replicated_tensor_sharding))
        )
        opts.TensorLocations.setOptimizerLocation(location)
    if ipu.executable_cache:
        opts.enableExecutableCaching(ipu.executable_cache)
    if ipu.compile_only:
        opts.useOfflineIpuTarget(ipu.offline_ipu_version or 2)
    if use_ipu_model:
        opts.useIpuModel(True)
    # A group norm's channel grouping, the model's (model/norms.py). On the IPU the model emits
    # torch's one aten::group_norm, which PopTorch lowers unchanged to one PopART
    # GroupNormalization (poptorch/source/popart_canonicalization/NormalizationOps.cpp:211-233,
    # sdk/poptorch/3.4.0: input, γ, β, num_groups, ε; no channel reordering): this option alone
    # then picks the grouping (poplibs include/popnn/GroupNorm.hpp: strided puts channel k·G + g in
    # group g, the official TF code's; Graphcore's CNN application sets it for speed,
    # vision/cnns/pytorch/utils/ipu_settings.py:17, v3.4.1). The stride is applied once: the model
    # reorders nothing on the IPU. Set either way so that no base Options can change it.
    opts._Popart.set("groupNormStridedChannelGrouping", ipu.norm_grouping == "strided")
    opts._Popart.set("scheduleNonWeightUpdateGradientConsumersEarly", True)
    if training:
        opts._Popart.set("disableGradAccumulationTensorStreams", True)
    return opts
