"""The typed IPU configuration: everything that becomes a ``poptorch.Options`` call.

Declared here (next to the code that turns it into options) and composed into the application's
configuration as its ``ipu`` section, which the application turns into an ``IpuSpec``
(ipu_options/specs.py): the rest of this layer reads only that. ``replicas``, ``micro_batch`` and
``grad_accum`` are not here: they mean the same on every device kind (``train.*``, ``BatchPlan``).
"""

from dataclasses import dataclass, field
from typing import Dict, List, Optional, Union

from backends.errors import ConfigError

PRECISIONS = ("32.32", "16.32", "16.16")
PARTIALS = ("float", "half")


@dataclass
class IPUConfig:
    device_iterations: int = 1
    # Pipeline: module name → IPU index where that module starts a stage, or "auto" to use the
    # memory planner's proposal; empty = the whole model on one IPU.
    pipeline: Union[Dict[str, int], str] = field(default_factory=dict)
    recompute: List[str] = field(default_factory=list)  # module names whose outputs are checkpoints
    available_memory_proportion: List[float] = field(default_factory=lambda: [0.6])
    precision: Union[str, float] = "16.16"  # written 16.16 on a command line, YAML reads a float
    partials: str = "half"
    stochastic_rounding: bool = True  # training only (Graphcore's CNN app: utils/ipu_settings.py:45)
    # A number (static), "auto", or null: 128 with fp16 (16.16, 16.32), what Graphcore's EfficientNet
    # configurations use (vision/cnns/pytorch/train/configs.yml:72, examples v3.4.1), 1 with 32.32.
    loss_scaling: Optional[Union[float, str]] = None
    optimizer_state_offchip: bool = False
    replicated_tensor_sharding: bool = False
    executable_cache: Optional[str] = None
    compile_only: bool = False  # build the executables without hardware (offline target), then stop
    # with compile_only: 1 (Mk1), 2 (Mk2, the default) or 21 (Mk2 with FP8 support), the values of
    # poptorch.Options.useOfflineIpuTarget (python/options.py:1656-1663, sdk/poptorch/3.4.0)
    offline_ipu_version: Optional[int] = None
    seed: Optional[int] = None  # None: the run's seed
    reduction: str = "mean"  # gradients over micro-batches and replicas: mean | sum
    # What a training call returns (the loss only): sum (per replica, over its micro-batches: the
    # exact mean loss, one scalar per replica) | all (every micro-batch's) | final (the last one's)
    output_mode: str = "sum"
    plan_ipus: Optional[int] = None  # IPUs per replica for the planner; None: fewest that fit
    plan_margin: float = 0.3  # share of the 900 MB kept for code, exchange buffers, temporaries

    def validate(self) -> None:
        if self.device_iterations < 1:
            raise ConfigError("ipu.device_iterations", self.device_iterations, "an integer >= 1")
        if isinstance(self.precision, float):
            self.precision = f"{self.precision:.2f}"
        if self.precision not in PRECISIONS:
            raise ConfigError("ipu.precision", self.precision, f"one of {', '.join(PRECISIONS)}")
        if self.partials not in PARTIALS:
            raise ConfigError("ipu.partials", self.partials, f"one of {', '.join(PARTIALS)}")
        if not all(0.0 < p <= 1.0 for p in self.available_memory_proportion):
            raise ConfigError(
                "ipu.available_memory_proportion",
                self.available_memory_proportion,
                "values in (0, 1], one per IPU or a single value for all",
            )
        if isinstance(self.loss_scaling, str) and self.loss_scaling != "auto":
            raise ConfigError("ipu.loss_scaling", self.loss_scaling, 'a positive number or "auto"')
        if (
            self.loss_scaling is not None
            and not isinstance(self.loss_scaling, str)
            and not self.loss_scaling > 0
        ):
            raise ConfigError("ipu.loss_scaling", self.loss_scaling, 'a positive number, "auto" or null')
        if self.loss_scaling == "auto" and self.precision == "32.32":
            # PopART's automatic loss scaling tracks fp16 gradients only and stops the compilation
            # without them: "[AutomaticLossScale transform] No tracked gradient tensors of type
            # fp16 were found." (willow/src/transforms/automaticlossscaling.cpp:275-278, 3.4.0)
            raise ConfigError(
                "ipu.loss_scaling",
                self.loss_scaling,
                "a number or null with ipu.precision=32.32 (automatic loss scaling needs "
                'fp16 gradients: PopART stops with "No tracked gradient tensors of type '
                'fp16 were found"); or ipu.precision=16.16 / 16.32 with auto',
            )
        if self.plan_ipus is not None and self.plan_ipus < 1:
            raise ConfigError("ipu.plan_ipus", self.plan_ipus, "an integer >= 1 or null")
        if not 0.0 <= self.plan_margin < 1.0:
            raise ConfigError("ipu.plan_margin", self.plan_margin, "a fraction in [0, 1)")
        if self.reduction not in ("mean", "sum"):
            raise ConfigError("ipu.reduction", self.reduction, "mean or sum")
        if self.output_mode not in ("all", "final", "sum"):
            raise ConfigError("ipu.output_mode", self.output_mode, "all, final or sum")
        if self.offline_ipu_version is not None and self.offline_ipu_version not in (1, 2, 21):
            raise ConfigError(
                "ipu.offline_ipu_version",
                self.offline_ipu_version,
                "1 (Mk1), 2 (Mk2) or 21 (Mk2 with FP8 support), or null",
            )
        if self.offline_ipu_version is not None and not self.compile_only:
            # An offline target cannot run an executable, only build one.
            raise ConfigError(
                "ipu.offline_ipu_version",
                self.offline_ipu_version,
                "null, or a version together with ipu.compile_only=true",
            )
        if isinstance(self.pipeline, dict) and any(
            not isinstance(v, int) or isinstance(v, bool) or v < 0 for v in self.pipeline.values()
        ):
            raise ConfigError("ipu.pipeline", self.pipeline, "IPU indices that are integers >= 0")
        if isinstance(self.pipeline, str) and self.pipeline != "auto":
            raise ConfigError("ipu.pipeline", self.pipeline, 'a mapping {module name: IPU index} or "auto"')
