"""``IpuSpec``: what the IPU layer is told about a run besides its sizes (``BatchPlan``), optimiser
(``OptimSpec``) and network (``ModelSpec``). Built once by the application (app/specs.py) from its
``ipu`` section (ipu_options/config.py, validated there) and the run's seed; frozen."""

from dataclasses import dataclass, field
from typing import Dict, Optional, Tuple, Union


@dataclass(frozen=True)
class IpuSpec:
    # Pipeline: module name → IPU index where a stage starts, or "auto" (the planner's proposal);
    # empty: the whole model on one IPU.
    pipeline: Union[Dict[str, int], str] = field(default_factory=dict)
    recompute: Tuple[str, ...] = ()
    available_memory_proportion: Tuple[float, ...] = (0.6,)
    precision: str = "16.16"  # 32.32 | 16.32 | 16.16
    partials: str = "half"
    stochastic_rounding: bool = True
    loss_scaling: Optional[Union[float, str]] = None  # a number, "auto", or None (by precision)
    optimizer_state_offchip: bool = False
    replicated_tensor_sharding: bool = False
    executable_cache: Optional[str] = None
    compile_only: bool = False
    offline_ipu_version: Optional[int] = None
    seed: int = 0  # the device's random seed (ipu.seed, else the run's)
    reduction: str = "mean"
    output_mode: str = "sum"
    plan_ipus: Optional[int] = None
    plan_margin: float = 0.3
    # The network's group-norm channel grouping (the model's, model/norms.py): strided or
    # contiguous; PopART's groupNormStridedChannelGrouping is set to it (options.py).
    norm_grouping: str = "strided"
